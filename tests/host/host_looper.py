"""The looper nodes (WAN22 BlockSwap Looper Models / Sequencer) with loops run as WanVideoLooper runs them."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

from wan22_blockswap import block_manager as bm
from wan22_blockswap import callbacks, nodes

from .comfy_helpers import conditioning, load, write_checkpoint
from .host_blockswap import _lora_patches
from .host_lowvram import model_bytes
from .lowvram import SimulatedCard, loaded_weight_memory

LOOPER = Path(os.environ.get("WANVIDEOLOOPER_PATH") or Path.home() / "comfy-hosts" / "WanVideoLooper")
SETTINGS = {"blocks_to_swap": 2, "offload_txt_emb": False, "offload_img_emb": False, "prefetch_blocks": 1}


def comfy_nodes():
    import nodes as comfy_nodes_module  # ComfyUI's nodes.py

    return comfy_nodes_module


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    return (
        write_checkpoint(tmp_path_factory.mktemp("high"), "t2v", seed=21),
        write_checkpoint(tmp_path_factory.mktemp("low"), "t2v", seed=22),
    )


def run_sampler_step(model, latent, cfg, start, last, disable_noise, force_full_denoise, steps=4, seed=7):
    """One sampling call exactly as WanVideoLooper's _run_sampler_step makes it."""
    (out,) = comfy_nodes().common_ksampler(
        model=model,
        seed=seed,
        steps=steps,
        cfg=cfg,
        sampler_name="euler",
        scheduler="simple",
        positive=conditioning(1),
        negative=conditioning(2),
        latent={"samples": latent["samples"]},
        denoise=1.0,
        disable_noise=disable_noise,
        start_step=start,
        last_step=last,
        force_full_denoise=force_full_denoise,
    )
    return {"samples": out["samples"]}


def looper_segments(high_for, low_for, segments=3, between=None, steps=4):
    """WanVideoLooper's per-segment calls: segment 1 uses motion CFG (3 calls), the last one has its switch
    step at the end, so its low call has an empty step range (ComfyUI returns before loading)."""
    latent = {"samples": torch.zeros(1, 16, 1, 8, 8)}
    outputs = []
    for i in range(segments):
        switch = steps if i == segments - 1 else 2
        high, low = high_for(i), low_for(i)
        if i == 1:  # cfg_motion_noise != 1 and switch > 1: a first call for step 0 -> 1
            first = run_sampler_step(high, latent, 3.0, 0, 1, False, False, steps)
            mid = run_sampler_step(high, first, 1.0, 1, switch, True, False, steps)
        else:
            mid = run_sampler_step(high, latent, 1.0, 0, switch, False, False, steps)
        if between:
            between()
        final = run_sampler_step(low, mid, 1.0, switch, steps, True, True, steps)
        outputs.append(final["samples"])
        if between:
            between()  # decode of the window, then text/vision/VAE-encode of the next one
    return torch.stack(outputs)


def pick(sequence, base, index):
    """The model WanVideoLooper uses for segment i: the sequence's entry, or its base model for None."""
    return lambda i: (
        sequence[i][index] if sequence[i] is not None and sequence[i][index] is not None else base
    )


def looper_models(high, low, **settings):
    return nodes.WAN22BlockSwapLooperModels().apply(high, low, **{**SETTINGS, **settings})


@pytest.mark.parametrize("card", ["cpu_mode", "small_card"])
def test_a_looper_loop_with_looper_models_equals_the_loop_without_swapping(experts, card):
    simulated = SimulatedCard(total=0) if card == "small_card" else None
    with simulated.active() if simulated else contextlib.nullcontext():
        high, low = (load(p) for p in experts)
        size = model_bytes(high)
        between = None
        if simulated:
            simulated.total = int(size * 2.5)  # both experts would fit side by side

            def between():  # a VAE decode's worth of memory, asked from ComfyUI like any node does
                with simulated.allocate(int(size * 0.8)):
                    pass

        reference = looper_segments(lambda i: high, lambda i: low, between=between)
        s_high, s_low = looper_models(high.clone(), low.clone())
        got = looper_segments(lambda i: s_high, lambda i: s_low, between=between)
    assert torch.equal(got, reference)
    for m in (s_high, s_low):
        assert callbacks.plan_of(m).engine.counters.bytes_copied > 0


def test_the_experts_take_turns_and_comfyuis_numbers_stay_true(experts):
    card = SimulatedCard(total=0)
    with card.active():
        high, low = (load(p) for p in experts)
        size = model_bytes(high)
        card.total = int(size * 2.5)  # room for both side by side: turns are the pack's doing
        s_high, s_low = looper_models(high, low)
        seen = []

        def watch(me, rival):
            def wrapper(executor, *args, **kwargs):
                seen.append((card.weights_on_card(me), card.weights_on_card(rival)))
                return executor(*args, **kwargs)

            return wrapper

        import comfy.patcher_extension as pe

        s_high.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test_watch", watch(s_high, s_low))
        s_low.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test_watch", watch(s_low, s_high))
        pinned = bm.pinned_bytes_in_use()

        def check_numbers():
            for m in (s_high, s_low):
                assert (
                    loaded_weight_memory(m) == card.weights_on_card(m)
                    if m.model.model_loaded_weight_memory
                    else True
                )

        looper_segments(lambda i: s_high, lambda i: s_low, segments=10, between=check_numbers)
        assert seen and all(mine > 0 and theirs == 0 for mine, theirs in seen), seen[:4]
        for m in (s_high, s_low):
            engine = callbacks.plan_of(m).engine
            assert engine.counters.slabs_built == len(
                engine.swapped_units
            )  # built once, kept for 10 segments
        assert bm.pinned_bytes_in_use() == pinned


def sequence_with_a_lora_at_segment_2(high):
    lora = high.clone()
    lora.add_patches(_lora_patches(high), 1.0)
    return [None, (lora, None, None)] + [None] * 8, lora


def test_the_sequencer_keeps_the_structure_and_shares_one_plan_per_base_model(experts):
    high, low = (load(p) for p in experts)
    sequence, _ = sequence_with_a_lora_at_segment_2(high)
    sequence[4] = (high, low, "a clip stand-in")
    (out,) = nodes.WAN22BlockSwapSequencer().apply(sequence, **SETTINGS)
    assert isinstance(out, list) and len(out) == 10
    assert [e is None for e in out] == [e is None for e in sequence]
    assert out[4][2] == "a clip stand-in" and out[1][1] is None and out[1][2] is None
    assert all(callbacks.plan_of(m) is not None for e in out if e for m in e[:2] if m is not None)
    assert callbacks.plan_of(out[1][0]) is callbacks.plan_of(out[4][0])  # LoRA clone and base: one plan
    assert callbacks.plan_of(out[4][0]) is not callbacks.plan_of(out[4][1])
    assert out[1][0].patches.keys() == sequence[1][0].patches.keys()  # its LoRA kept
    assert nodes.WAN22BlockSwapSequencer().apply(None, **SETTINGS) == (None,)


def test_a_loop_with_the_sequencer_equals_the_loop_without_swapping(experts):
    high, low = (load(p) for p in experts)
    sequence, _ = sequence_with_a_lora_at_segment_2(high)

    reference = looper_segments(pick(sequence, high, 0), pick(sequence, low, 1))
    (swapped_seq,) = nodes.WAN22BlockSwapSequencer().apply(sequence, **SETTINGS)
    s_high, s_low = looper_models(high, low)
    got = looper_segments(pick(swapped_seq, s_high, 0), pick(swapped_seq, s_low, 1))
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    assert callbacks.plan_of(swapped_seq[1][0]).engine.counters.bytes_copied > 0


def test_bad_sequences_are_refused_naming_the_position(experts):
    high, _ = (load(p) for p in experts)
    node = nodes.WAN22BlockSwapSequencer()
    with pytest.raises(ValueError, match="model_clip_sequence must be a list .* \\(got dict\\)"):
        node.apply({"a": 1}, **SETTINGS)
    with pytest.raises(ValueError, match=r"model_clip_sequence\[2\] must be a tuple .* \(got a tuple of 2\)"):
        node.apply([None, None, (high, None)], **SETTINGS)
    with pytest.raises(ValueError, match=r"model_clip_sequence\[0\] holds str where its model_low"):
        node.apply([(high, "not a model", None)], **SETTINGS)
    with pytest.raises(ValueError, match="model_high must be a MODEL"):
        nodes.WAN22BlockSwapLooperModels().apply("x", high, **SETTINGS)
    assert high.model.diffusion_model is not None and callbacks.plan_of(high) is None  # left unharmed


def test_looper_nodes_are_registered_with_the_seed_inputs():
    for node_id, name, first in (
        ("wan22BlockSwapLooperModels", "WAN22 BlockSwap Looper Models", ["model_high", "model_low"]),
        ("wan22BlockSwapSequencer", "WAN22 BlockSwap Sequencer", ["model_clip_sequence"]),
    ):
        cls = nodes.NODE_CLASS_MAPPINGS[node_id]
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == name
        assert cls.CATEGORY == "ComfyUI_Wan22Blockswap/looper"
        spec = cls.INPUT_TYPES()
        assert list(spec["required"]) == [*first, "blocks_to_swap", "offload_txt_emb", "offload_img_emb"]
        assert list(spec["optional"]) == [
            "use_non_blocking",
            "vace_blocks_to_swap",
            "prefetch_blocks",
            "block_swap_debug",
            "override_dynamic_vram",
            "auto_blocks_to_swap",
            "host_memory",
        ]
    assert nodes.WAN22BlockSwapSequencer.RETURN_TYPES == ("ANY",)
    assert nodes.WAN22BlockSwapLooperModels.RETURN_NAMES == ("model_high", "model_low")


# -- the real WanVideoLooper nodes, driven directly --------------------------------------------------


def _import_wanvideolooper():
    import importlib.util
    import sys

    if "WanVideoLooper" in sys.modules:
        return sys.modules["WanVideoLooper"]
    spec = importlib.util.spec_from_file_location(
        "WanVideoLooper", LOOPER / "__init__.py", submodule_search_locations=[str(LOOPER)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["WanVideoLooper"] = module
    spec.loader.exec_module(module)
    return module


class StandInClip:
    """What the looper asks of a CLIP: tokenize, encode_from_tokens, clone. No WAN text encoder exists at
    test size, so the conditioning is random, seeded by the prompt."""

    def clone(self):
        return self

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_pooled=True, return_dict=True):
        g = torch.Generator().manual_seed(sum(map(ord, tokens)) + 1)
        return {"cond": torch.randn(1, 8, 4096, generator=g), "pooled_output": None}


class StandInVae:
    """Encodes pixels to a WAN latent and back, deterministically, asking ComfyUI for room as a real VAE's
    load does (VAE work between sampling calls is where small cards run out of memory)."""

    def __init__(self, card=None, nbytes=0):
        self.card, self.nbytes = card, nbytes

    def _room(self):
        if self.card is not None:
            with self.card.allocate(self.nbytes):
                pass

    def encode(self, pixels):
        self._room()
        frames, h, w, _ = pixels.shape
        t = (frames + 3) // 4
        pooled = torch.nn.functional.adaptive_avg_pool2d(pixels[:, :, :, 0].unsqueeze(0), (h // 8, w // 8))
        return pooled[:, :t].unsqueeze(1).repeat(1, 16, 1, 1, 1)

    def decode(self, latent):
        self._room()
        b, c, t, h, w = latent.shape
        frames = (t - 1) * 4 + 1
        image = torch.sigmoid(latent.mean(1, keepdim=True)).repeat_interleave(4, dim=2)[:, :, :frames]
        image = torch.nn.functional.interpolate(image[0].permute(1, 0, 2, 3), scale_factor=8)  # (F, 1, H, W)
        return image.permute(0, 2, 3, 1).repeat(1, 1, 1, 3).unsqueeze(0)  # (1, F, H, W, 3)


def run_wanvideolooper(high, low, sequence=None, vae=None):
    looper_pack = _import_wanvideolooper()
    prompts, negative = looper_pack.WanVideoLooperPrompts().process_multiline_prompts(
        "a red fox\nthe fox runs\nthe fox sleeps", "blurry", False, "", ""
    )
    with torch.no_grad():
        images, last = looper_pack.WanVideoLooper().loop_video(
            high,
            low,
            StandInClip(),
            vae or StandInVae(),
            torch.full((1, 64, 64, 3), 0.5),
            prompts,
            negative,
            seed=3,
            steps=4,
            cfg_motion_noise=2.0,
            cfg_noise=1.0,
            sampler_name="euler",
            scheduler="simple",
            model_switch_point=0.9,
            sigma_shift=8.0,
            denoise=1.0,
            width=64,
            height=64,
            frame_merge=1,
            duration_sec=1,
            enable_dry_run=False,
            color_match_strength=1.0,
            color_match_method="Disabled",
            color_match_reference_frame="First Frame",
            model_clip_sequence=sequence,
        )
    return images


needs_looper = pytest.mark.skipif(
    not (LOOPER / "wan_looper_node.py").is_file(),
    reason=f"WanVideoLooper not found at {LOOPER} (set WANVIDEOLOOPER_PATH to a checkout of SquirrelRat/WanVideoLooper)",
)


@needs_looper
@pytest.mark.parametrize("card", ["cpu_mode", "small_card"])
def test_the_real_wanvideolooper_with_looper_models_equals_it_without_swapping(experts, card):
    simulated = SimulatedCard(total=0) if card == "small_card" else None
    with simulated.active() if simulated else contextlib.nullcontext():
        high, low = (load(p) for p in experts)
        size = model_bytes(high)
        if simulated:
            simulated.total = int(size * 2.5)
        vae = StandInVae(simulated, int(size * 0.8))
        reference = run_wanvideolooper(high, low, vae=vae)
        s_high, s_low = looper_models(high, low)
        got = run_wanvideolooper(s_high, s_low, vae=vae)
    assert reference.shape[0] > 17 and torch.equal(got, reference)
    for m in (s_high, s_low):
        engine = callbacks.plan_of(m).engine
        assert engine.counters.bytes_copied > 0 and engine.counters.slabs_built == len(engine.swapped_units)


@needs_looper
def test_the_real_wanvideolooper_with_its_lora_sequencer_and_ours(experts):
    looper_pack = _import_wanvideolooper()
    high, low = (load(p) for p in experts)
    lora = high.clone()
    lora.add_patches(_lora_patches(high), 1.0)
    (sequence,) = looper_pack.WanVideoLoraSequencer().sequence_models_clips(model_high_2=lora)
    assert isinstance(sequence, list) and len(sequence) == 10
    reference = run_wanvideolooper(high, low, sequence)
    assert not torch.allclose(reference, run_wanvideolooper(high, low), atol=1e-4)  # segment 2's LoRA shows
    (swapped_sequence,) = nodes.WAN22BlockSwapSequencer().apply(sequence, **SETTINGS)
    s_high, s_low = looper_models(high, low)
    got = run_wanvideolooper(s_high, s_low, swapped_sequence)
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)
    assert callbacks.plan_of(swapped_sequence[1][0]).engine.counters.bytes_copied > 0


def test_a_gguf_pair_with_a_lora_in_the_sequence_loops_like_unswapped(experts, tmp_path):
    from wan22_blockswap import loader
    from wan22_blockswap.bench.gguf_writer import write_wan_gguf

    from .comfy_helpers import checkpoint_state_dict
    from .host_loader import lora_patches, qtype_for
    from .host_lowvram import lora_effect_ratio

    paths = []
    for name, seed in (("high", 21), ("low", 22)):
        path = tmp_path / f"{name}.gguf"
        write_wan_gguf(path, checkpoint_state_dict("t2v", seed=seed), qtype_for)
        paths.append(str(path))
    high, low = (loader.load_gguf_model(p) for p in paths)
    lora = high.clone()
    lora.add_patches(lora_patches(high), 1.0)
    sequence = [None, (lora, None, None)] + [None] * 8

    with torch.no_grad():
        plain = looper_segments(lambda i: high, lambda i: low)
        reference = looper_segments(pick(sequence, high, 0), pick(sequence, low, 1))
        (swapped_seq,) = nodes.WAN22BlockSwapSequencer().apply(sequence, **SETTINGS)
        s_high, s_low = looper_models(high, low)
        got = looper_segments(pick(swapped_seq, s_high, 0), pick(swapped_seq, s_low, 1))
    # Segment 2's LoRA is the only difference from the plain loop; the swapped loop must reproduce it.
    assert lora_effect_ratio(got, reference, plain) < 0.05
    assert callbacks.plan_of(swapped_seq[1][0]).engine.counters.bytes_copied > 0
