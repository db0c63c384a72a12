"""BlockSwap under ComfyUI's real memory manager, driven as on a small card (see lowvram.py)."""

from __future__ import annotations

import contextlib

import comfy.model_management as mm
import comfy.model_patcher
import pytest
import torch

from wan22_blockswap import callbacks, nodes

from .comfy_helpers import load, sample, write_checkpoint, write_fp8_scaled_checkpoint
from .host_blockswap import _lora_patches
from .lowvram import DEVICE, SimulatedCard, loaded_weight_memory


def swap(model, **settings):
    (out,) = nodes.WAN22BlockSwap().apply(model, **{"blocks_to_swap": 2, **settings})
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # dim 1024, 4 blocks: 48 MiB per block in fp32, 225 MiB in all. ComfyUI 0.3.64 never gives a model
    # less than 128 MiB, so smaller models would always load fully there.
    return write_checkpoint(tmp_path_factory.mktemp("lowvram"), "t2v", dim=1024, ffn_dim=2048, num_layers=4)


def model_bytes(patcher) -> int:
    return sum(t.numel() * t.element_size() for t in patcher.model.diffusion_model.state_dict().values())


def test_canary_an_unswapped_model_really_gets_a_partial_load_with_lowvram_patches(checkpoint):
    """Proves the harness works: ComfyUI itself offloads layers, with per-forward LoRA patches."""
    card = SimulatedCard(total=0)
    with card.active():
        model = load(checkpoint)
        assert model.load_device == DEVICE
        card.total = int(model_bytes(model) * 0.6)
        lora = model.clone()
        lora.add_patches(_lora_patches(model), 1.0)
        sample(lora, steps=1)
        loaded = loaded_weight_memory(lora)
        assert 0 < loaded < model_bytes(model) * 0.75, loaded
        assert loaded == pytest.approx(card.weights_on_card(lora), rel=0.05)
        dm = model.model.diffusion_model
        patched = [
            m
            for m in dm.modules()
            if any(isinstance(f, comfy.model_patcher.LowVramPatch) for f in getattr(m, "weight_function", []))
        ]
        casting = [m for m in dm.modules() if getattr(m, "comfy_cast_weights", False)]
        assert patched and casting
        assert any(mod is not dm and device == DEVICE for mod, device in card.moves)


# -- the five findings -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp8_scaled(tmp_path_factory):
    return write_fp8_scaled_checkpoint(tmp_path_factory.mktemp("fp8s"), "t2v")


def lora_effect_ratio(swapped_out, reference_lora, reference_plain) -> float:
    """How far the swapped LoRA run is from the unswapped LoRA run, as a share of the LoRA's own effect."""
    effect = (reference_lora - reference_plain).abs().mean()
    return float((swapped_out - reference_lora).abs().mean() / effect)


def test_fp8_scaled_blocks_are_swapped_for_real_and_sample_like_unswapped(fp8_scaled):
    """Finding 1: on 0.8.1+ these weights are comfy_kitchen QuantizedTensors; the first BlockSwap load
    used to kill the process in park()."""
    from safetensors import safe_open

    base = load(fp8_scaled)
    reference = sample(base)
    swapped = swap(base, blocks_to_swap=3, prefetch_blocks=1)
    assert torch.equal(sample(swapped), reference)
    engine = callbacks.plan_of(swapped).engine
    assert engine.counters.bytes_copied > 0
    # The bytes that moved are the file's: fp8 weights and their scales, not a float copy of them.
    with safe_open(str(fp8_scaled), "pt") as f:
        file_bytes = sum(
            f.get_tensor(k).numel() * f.get_tensor(k).element_size()
            for k in f.keys()
            if k.startswith("blocks.3.")
        )
    unit = next(u for u in engine.swapped_units if u.name == "blocks.3")
    assert 0.9 * file_bytes <= unit.param_bytes() <= 1.01 * file_bytes  # a float copy would be 4x
    assert unit.slab is not None and all(
        unit.slab.data_ptr() <= leaf.data_ptr() < unit.slab.data_ptr() + unit.slab.numel()
        for _, _, _, t in unit.tensors()
        for _, leaf in callbacks_inner(t)
    )


def callbacks_inner(t):
    from wan22_blockswap.block_manager import inner_tensors

    return inner_tensors(t)


def test_lora_on_swapped_fp8_scaled_layers_is_comfyuis_own_per_forward_patch(fp8_scaled):
    """Finding 2: swapped layers get the per-forward LoRA patch exactly as ComfyUI's lowvram path builds
    it (with the layer's convert/set functions). On a card where ComfyUI offloads every layer it lists,
    the unswapped model runs that same patch on every layer, so both must agree."""
    card = SimulatedCard(total=2**40, vram_state="NO_VRAM")  # NO_VRAM: ComfyUI offloads every layer
    with card.active(), torch.no_grad():  # ComfyUI runs nodes without autograd
        base = load(fp8_scaled)
        plain = sample(base)
        lora = base.clone()
        lora.add_patches(_lora_patches(base), 1.0)
        reference = sample(lora)
        swapped = swap(lora, blocks_to_swap=3)
        out = sample(swapped)
    assert callbacks.plan_of(swapped).engine.counters.bytes_copied > 0
    assert lora_effect_ratio(out, reference, plain) < 0.05
    assert lora_effect_ratio(plain, reference, plain) == pytest.approx(1.0)  # the LoRA has an effect


@pytest.mark.parametrize("first", ["unswapped", "swapped"])
def test_compute_dtype_is_honoured_on_swapped_blocks(checkpoint, first):
    """Finding 3: ModelComputeDtype (force_cast_weights) reaches hidden modules too, whichever clone
    loaded the shared module first."""
    base = load(checkpoint)
    cast = base.clone()
    cast.set_model_compute_dtype(torch.bfloat16)
    swapped = swap(cast, blocks_to_swap=2)
    runs = {"unswapped": lambda: sample(cast, steps=1), "swapped": lambda: sample(swapped, steps=1)}
    order = [first, "swapped" if first == "unswapped" else "unswapped"]
    out = {name: runs[name]() for name in order}
    torch.testing.assert_close(out["swapped"], out["unswapped"], rtol=0, atol=0)


def test_comfyuis_numbers_are_where_the_tensors_are_on_every_sampling_call(checkpoint):
    """Finding 4: the slots exist only during a run; counting them as loaded weights made the second
    call's budget one slot set too large."""
    card = SimulatedCard(total=0)
    with card.active():
        base = load(checkpoint)
        block = max(
            sum(t.numel() * t.element_size() for t in b.state_dict().values())
            for b in base.model.diffusion_model.blocks
        )
        card.total = model_bytes(base) - block  # the whole model does not fit
        swapped = swap(base, blocks_to_swap=2, prefetch_blocks=1)
        engine = callbacks.plan_of(swapped).engine
        resident = []
        for _ in range(3):  # a looper's calls: high, high, low ... with no unload in between
            sample(swapped, steps=1)
            assert loaded_weight_memory(swapped) == card.weights_on_card(swapped)
            assert card.slots_on_card() == 0 and not engine.is_attached
            resident.append(card.weights_on_card(swapped))
            for unit in engine.swapped_units:  # no swapped block ever went to the card
                assert all(
                    card.ledger.get((m, a)) != DEVICE for m, a in ((s.owner, s.attr) for s in unit.layout)
                )
        assert resident[1] == resident[0] == resident[2]
        assert resident[0] + engine.slot_bytes() <= card.total


# -- the formats users load, each swapped == unswapped -----------------------------------------------

# ComfyUI 0.3.64 never grants a model less than 128 MiB: tiny models always load fully there.
HAS_128_MIB_FLOOR = "128 * 1024 * 1024" in __import__("inspect").getsource(mm.load_models_gpu)
FORMATS = ["fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2", "fp8_scaled", "gguf", "comfyui_gguf"]
QUANTIZED = {"fp8_e4m3fn", "fp8_e5m2", "fp8_scaled", "gguf", "comfyui_gguf"}


@pytest.fixture(scope="module")
def format_files(tmp_path_factory):
    from wan22_blockswap.bench.gguf_writer import write_wan_gguf

    from .comfy_helpers import checkpoint_state_dict
    from .host_loader import qtype_for

    root = tmp_path_factory.mktemp("formats")
    gguf_path = root / "tiny_wan_t2v.gguf"
    write_wan_gguf(gguf_path, checkpoint_state_dict("t2v"), qtype_for)
    return {
        "safetensors": write_checkpoint(root, "t2v"),
        "fp8_scaled": write_fp8_scaled_checkpoint(root),
        "gguf": gguf_path,
    }


def load_format(fmt, files, model_dir):
    from wan22_blockswap import loader

    from .host_loader import COMFY_GGUF, _import_comfyui_gguf, place

    if fmt in ("fp32", "fp16", "bf16"):
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[fmt]
        return load(files["safetensors"], dtype=dtype)
    if fmt.startswith("fp8_e"):
        return load(files["safetensors"], dtype=getattr(torch, "float8_" + fmt[4:]))
    if fmt == "fp8_scaled":
        return load(files["fp8_scaled"])
    if fmt == "gguf":
        return loader.load_gguf_model(str(files["gguf"]))
    if not COMFY_GGUF.is_dir():
        pytest.skip(f"ComfyUI-GGUF not found at {COMFY_GGUF}")
    gguf_nodes = __import__("sys").modules.get("ComfyUI-GGUF.nodes") or _import_comfyui_gguf()
    (name,) = place(model_dir, files["gguf"])
    (model,) = gguf_nodes.UnetLoaderGGUF().load_unet(name, dequant_dtype="float32")
    return model


@pytest.mark.parametrize("card", ["cpu_mode", "small_card"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_swapped_equals_unswapped(fmt, card, format_files, model_dir):
    simulated = SimulatedCard(total=0) if card == "small_card" else None
    with simulated.active() if simulated else _nothing():
        model = load_format(fmt, format_files, model_dir)
        if simulated:
            simulated.total = int(model_bytes(model) * 0.5)  # ComfyUI must offload part of the model
        reference = sample(model, steps=2)
        if simulated and not HAS_128_MIB_FLOOR:
            assert loaded_weight_memory(model) < model_bytes(model)  # really a partial load
        swapped = swap(model, blocks_to_swap=2, prefetch_blocks=1)
        assert torch.equal(sample(swapped, steps=2), reference)
        assert callbacks.plan_of(swapped).engine.counters.bytes_copied > 0
        assert torch.equal(sample(model, steps=2), reference)  # the plain model afterwards


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_with_a_lora_swapped_equals_unswapped(fmt, format_files, model_dir):
    """LoRA: the swapped layers apply ComfyUI's own per-forward patch; on a card where ComfyUI offloads
    every layer it lists (NO_VRAM) the unswapped model runs that same patch everywhere."""
    from .host_loader import lora_patches

    card = SimulatedCard(total=2**40, vram_state="NO_VRAM")
    with card.active(), torch.no_grad():
        model = load_format(fmt, format_files, model_dir)
        plain = sample(model, steps=2)
        lora = model.clone()
        lora.add_patches(lora_patches(model), 1.0)
        reference = sample(lora, steps=2)
        swapped = swap(lora, blocks_to_swap=2, prefetch_blocks=1)
        out = sample(swapped, steps=2)
    assert lora_effect_ratio(plain, reference, plain) == pytest.approx(1.0)
    if fmt in QUANTIZED:
        assert lora_effect_ratio(out, reference, plain) < 0.05
    else:
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


@contextlib.contextmanager
def _nothing():
    yield


# -- the model patches users stack on WAN ---------------------------------------------------------


def node_model(output):
    """The MODEL a ComfyUI node returned (v1 tuples and v3 NodeOutput alike)."""
    result = getattr(output, "result", output)
    return result[0]


def _patch_shift(model):
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    return node_model(ModelSamplingSD3().patch(model, 8.0))


def _patch_compile(model):
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    out = model.clone()
    set_torch_compile_wrapper(out, backend="eager")  # a backend that runs on CPU without a compiler
    return out


def _patch_cache(kind):
    def patch(model):
        import comfy_extras.nodes_easycache as nodes_easycache

        node = getattr(nodes_easycache, kind, None)
        if node is None:
            pytest.skip(f"this ComfyUI has no {kind}")
        return node_model(node.execute(model, 0.2, 0.0, 1.0, False))

    return patch


def _patch_slg(model):
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiT

    node = SkipLayerGuidanceDiT
    execute = node.execute if hasattr(node, "define_schema") else node().skip_guidance
    # Blocks 2 and 3 are swapped: skipping them makes the engine's ring jump over them.
    return node_model(execute(model, 3.0, 0.0, 1.0, "2,3", "", 0))


MODEL_PATCHES = {
    "ModelSamplingSD3": _patch_shift,
    "TorchCompileModel": _patch_compile,
    "EasyCache": _patch_cache("EasyCacheNode"),
    "LazyCache": _patch_cache("LazyCacheNode"),
    "SkipLayerGuidanceDiT": _patch_slg,
}


@pytest.mark.parametrize("patch", list(MODEL_PATCHES))
@pytest.mark.parametrize("order", ["patch_then_swap", "swap_then_patch"])
def test_model_patches_give_the_same_output_with_block_swap(patch, order, format_files):
    base = load(format_files["safetensors"])
    apply = MODEL_PATCHES[patch]
    patched = apply(base)
    with torch.no_grad():
        reference = sample(patched, steps=4)
        swapped = (
            swap(patched, blocks_to_swap=2, prefetch_blocks=1)
            if order == "patch_then_swap"
            else apply(swap(base, blocks_to_swap=2, prefetch_blocks=1))
        )
        assert torch.equal(sample(swapped, steps=4), reference)
    assert callbacks.plan_of(swapped).engine.counters.bytes_copied > 0


# -- WAN 2.2 high/low as most users run it --------------------------------------------------------


def ksampler_advanced(model, latent, start, end, seed=0, add_noise=True, leftover=True):
    import nodes as comfy_nodes  # ComfyUI's nodes.py (tests import ours as wan22_blockswap.nodes)

    from .comfy_helpers import conditioning

    out = comfy_nodes.KSamplerAdvanced().sample(
        model,
        "enable" if add_noise else "disable",
        seed,
        8,
        1.0,  # distilled experts run without CFG
        "euler",
        "simple",
        conditioning(1),
        conditioning(2),
        latent,
        start,
        end,
        "enable" if leftover else "disable",
    )
    return out[0]


def two_expert_run(high, low):
    latent = {"samples": torch.zeros(1, 16, 1, 8, 8)}
    with torch.no_grad():
        mid = ksampler_advanced(high, latent, 0, 4)
        return ksampler_advanced(low, mid, 4, 8, add_noise=False, leftover=False)["samples"]


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    high = write_checkpoint(tmp_path_factory.mktemp("high"), "t2v", seed=11)
    low = write_checkpoint(tmp_path_factory.mktemp("low"), "t2v", seed=12)
    return high, low


def distilled(path, seed):
    """An expert as the LightX2V 4-step workflow has it: a distill LoRA and ModelSamplingSD3 shift 5."""
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    base = load(path)
    lora = base.clone()
    lora.add_patches(_lora_patches(base, seed=seed), 1.0)
    return node_model(ModelSamplingSD3().patch(lora, 5.0))


@pytest.mark.parametrize("card", ["cpu_mode", "both_fit", "one_fits"])
def test_wan22_high_low_with_distill_loras_and_two_advanced_samplers(experts, card):
    high_path, low_path = experts
    simulated = None if card == "cpu_mode" else SimulatedCard(total=0)
    with simulated.active() if simulated else _nothing():
        high, low = distilled(high_path, 5), distilled(low_path, 6)
        if simulated:
            one = model_bytes(high)
            simulated.total = 3 * one if card == "both_fit" else int(one * 1.3)
        reference = two_expert_run(high, low)
        swapped = [swap(m, blocks_to_swap=2, prefetch_blocks=1) for m in (high, low)]
        first = two_expert_run(*swapped)
        again = two_expert_run(*swapped)  # high, low, high, low: each expert comes back
        if simulated:
            for m in swapped:
                assert loaded_weight_memory(m) == simulated.weights_on_card(m)
            assert simulated.used() <= simulated.total
    tol = dict(rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    torch.testing.assert_close(first, reference, **tol)
    torch.testing.assert_close(again, reference, **tol)
    for m in swapped:
        assert callbacks.plan_of(m).engine.counters.bytes_copied > 0


def test_an_unswapped_clone_then_the_swapped_one_then_the_unswapped_one_again(checkpoint):
    card = SimulatedCard(total=0)
    with card.active():
        base = load(checkpoint)
        card.total = int(model_bytes(base) * 0.8)
        reference = sample(base, steps=1)
        swapped = swap(base, blocks_to_swap=2, prefetch_blocks=1)
        assert torch.equal(sample(swapped, steps=1), reference)
        assert loaded_weight_memory(swapped) == card.weights_on_card(swapped)
        assert torch.equal(sample(base, steps=1), reference)
        assert loaded_weight_memory(base) == pytest.approx(card.weights_on_card(base), rel=0.02)
        assert torch.equal(sample(swapped, steps=1), reference)


# -- dynamic VRAM opt-in (ComfyUI 0.16+) ------------------------------------------------------------


def test_dynamic_vram_opt_in_reuses_the_loaded_weights_instead_of_reloading_the_file(checkpoint, monkeypatch):
    """Finding 5: override_dynamic_vram used `clone(disable_dynamic=True)`, which rebuilds the model from
    its file while the dynamic one stays cached (2x RAM), and fails for loaders with no reload function."""
    dynamic_cls = getattr(comfy.model_patcher, "ModelPatcherDynamic", None)
    if dynamic_cls is None:
        pytest.skip("this ComfyUI has no dynamic VRAM (ModelPatcherDynamic)")
    # Its per-device host buffers come from comfy-aimdo's CUDA library; without a GPU skip only that.
    monkeypatch.setattr(dynamic_cls, "register_load_device", lambda self, device: None)
    card = SimulatedCard(total=2**40)
    with card.active():
        base = load(checkpoint)
        reference = sample(base, steps=1)
        dynamic = dynamic_cls(base.model, base.load_device, base.offload_device, base.size)
        assert dynamic.is_dynamic()
        reloads = []
        dynamic.cached_patcher_init = (lambda *a, **k: reloads.append(a) or load(checkpoint), ())
        (swapped,) = nodes.WAN22BlockSwap().apply(dynamic, blocks_to_swap=2, override_dynamic_vram=True)
        assert reloads == []  # the file was not loaded a second time
        assert swapped.model is base.model and not swapped.is_dynamic()
        assert torch.equal(sample(swapped, steps=1), reference)
        dynamic.cached_patcher_init = None  # a loader with no reload function works the same
        (again,) = nodes.WAN22BlockSwap().apply(dynamic, blocks_to_swap=2, override_dynamic_vram=True)
        assert again.model is base.model
