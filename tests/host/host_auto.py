"""auto_blocks_to_swap under ComfyUI's real memory manager, driven as on a small card (see lowvram.py): the
swapped set follows the VRAM ComfyUI grants at each load, with the hysteresis the node promises."""

from __future__ import annotations

import logging

import comfy.model_management as mm
import pytest
import torch

from wan22_blockswap import callbacks, looper, nodes
from wan22_blockswap.config import SwapConfig

from .comfy_helpers import load, write_checkpoint
from .comfy_helpers import sample as _sample
from .lowvram import DEVICE, SimulatedCard, _in_slab, loaded_weight_memory

PREFETCH = 1


def sample(model, **kwargs):
    with torch.no_grad():
        return _sample(model, steps=kwargs.pop("steps", 1), **kwargs)


def auto(model, **settings):
    (out,) = nodes.WAN22BlockSwap().apply(
        model, **{"blocks_to_swap": 20, "prefetch_blocks": PREFETCH, "auto_blocks_to_swap": True, **settings}
    )
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # dim 1024, 8 blocks of 48 MiB (fp32): 410 MiB in all, above ComfyUI 0.3.64's 128 MiB smallest grant.
    return write_checkpoint(tmp_path_factory.mktemp("auto"), "t2v", dim=1024, ffn_dim=2048, num_layers=8)


def sizes(model):
    engine = callbacks.plan_of(model).engine
    unit = engine.unit_bytes()
    return engine, unit["blocks.0"], model.model_size()


def swapped_count(model) -> int:
    return sum(1 for u in callbacks.plan_of(model).engine.swapped_units if u.name.startswith("blocks."))


def _span(unit):
    return (unit.slab.data_ptr(), unit.slab.data_ptr() + unit.slab.numel())


def check_plan(model, card) -> int:
    """The plan fits the grant ComfyUI gave, is the fewest blocks that fit, and ComfyUI's numbers are where
    the tensors are. Returns the number of swapped blocks."""
    plan = callbacks.plan_of(model)
    engine, block, whole = sizes(model)
    grant = plan.last_grant
    count = swapped_count(model)
    assert loaded_weight_memory(model) == card.weights_on_card(model)
    assert card.slots_on_card() == 0 and not engine.is_attached
    for unit in engine.swapped_units:  # no swapped block on the card: each lies in its host copy
        assert all(
            card.ledger.get((s.owner, s.attr)) != DEVICE or _in_slab(getattr(s.owner, s.attr), [_span(unit)])
            for s in unit.layout
        )
    if count:
        assert whole - plan.swapped_bytes + plan.slot_bytes <= grant
    return count


def fewest_for(model, grant) -> int:
    """The fewest blocks that fit `grant`, computed here from the shapes (independently of the plan)."""
    engine, block, whole = sizes(model)
    unit = engine.unit_bytes()
    n = len(model.model.diffusion_model.blocks)
    for k in range(n + 1):
        swapped = [unit[f"blocks.{i}"] for i in range(n - k, n)]
        slots = min(PREFETCH + 1, k) * max(swapped, default=0)
        if whole - sum(swapped) + slots <= grant:
            return k
    return n


def test_the_swapped_set_follows_the_grant_with_hysteresis_and_outputs_stay_exact(checkpoint, caplog):
    card = SimulatedCard(total=2**40)
    with card.active():
        base = load(checkpoint)
        reference = sample(base)
        mm.unload_all_models()
        model = auto(base)
        engine, block, whole = sizes(model)
        history = []

        def run(total):
            card.total = total
            out = sample(model)
            assert torch.equal(out, reference)
            count = check_plan(model, card)
            history.append((callbacks.plan_of(model).last_grant, count))
            return count

        # The whole model fits: nothing swapped, no engine hooks during the run.
        hooks = []

        def spy(executor, *args, **kwargs):
            hooks.extend(m for m in model.model.diffusion_model.modules() if m._forward_pre_hooks)
            return executor(*args, **kwargs)

        model.add_wrapper_with_key("diffusion_model", "test_spy", spy)
        assert run(2**40) == 0 and not hooks
        # Shrinking grants: blocks join at once, the fewest that fit.
        for total in (whole - block, whole - 3 * block, whole - 5 * block):
            count = run(total)
            assert count == fewest_for(model, history[-1][0]) > history[-2][1]
        most = history[-1][1]
        # A grant one block larger: nothing leaves (less than two blocks of growth).
        assert run(whole - 4 * block) == most
        # Two blocks more than at the last change: blocks leave, down to the fewest that fit.
        count = run(whole - 3 * block + block // 2)
        assert count == fewest_for(model, history[-1][0]) < most
        # Everything fits again: nothing swapped.
        assert run(2**40) == 0
        assert engine.counters.slabs_built > 0
    # The first run after each change reports the plan (no copy timing on CPU).
    lines = [r.getMessage() for r in caplog.records if "auto:" in r.getMessage()]
    assert any("of 8 blocks swapped to fit" in line and "CUDA events only" in line for line in lines), lines


def test_slabs_exist_only_for_swapped_blocks_and_joining_blocks_get_theirs_then(checkpoint):
    card = SimulatedCard(total=2**40)
    with card.active():
        model = auto(load(checkpoint))
        engine, block, whole = sizes(model)
        card.total = whole - 2 * block
        sample(model)
        first = {u.name for u in engine.swapped_units}
        assert all(u.slab is not None for u in engine.swapped_units)
        assert all(u.slab is None for u in engine.units if u.name not in first)
        built = engine.counters.slabs_built
        card.total = whole - 4 * block
        sample(model)
        joined = {u.name for u in engine.swapped_units} - first
        assert joined and engine.counters.slabs_built == built + len(joined)  # only the joining ones
        card.total = 2**40
        sample(model)
        assert not engine.swapped_units and all(u.slab is None for u in engine.units)


def test_a_grant_too_small_for_the_other_weights_gets_a_clear_message_and_comfyuis_fallback(
    checkpoint, caplog
):
    card = SimulatedCard(total=2**40)
    with card.active():
        base = load(checkpoint)
        reference = sample(base)
        mm.unload_all_models()
        model = auto(base, prefetch_blocks=3)  # four slots: more than ComfyUI 0.3.64's smallest grant
        engine, block, whole = sizes(model)
        card.total = block  # not even the embeddings and the slots
        with caplog.at_level(logging.WARNING):
            out = sample(model)
        assert torch.equal(out, reference)
        assert swapped_count(model) == len(model.model.diffusion_model.blocks)
        assert loaded_weight_memory(model) == card.weights_on_card(model)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("even with all 8 blocks swapped" in w and "ComfyUI offloads the rest" in w for w in warnings)


def test_model_size_is_the_whole_model_while_auto_is_on(checkpoint):
    base = load(checkpoint)
    fixed = nodes.WAN22BlockSwap().apply(base, blocks_to_swap=4, prefetch_blocks=1)[0]
    assert auto(base).model_size() == base.model_size() > fixed.model_size()


def test_with_a_lora_the_plan_follows_the_grant_and_matches_comfyuis_own_offloading(checkpoint):
    from .host_loader import lora_patches

    card = SimulatedCard(total=2**40, vram_state="NO_VRAM")  # ComfyUI's per-forward LoRA everywhere
    with card.active():
        base = load(checkpoint)
        lora = base.clone()
        lora.add_patches(lora_patches(base), 1.0)
        reference = sample(lora)
        mm.unload_all_models()
    card = SimulatedCard(total=2**40)
    with card.active():
        base = load(checkpoint)
        lora = base.clone()
        lora.add_patches(lora_patches(base), 1.0)
        model = auto(lora)
        engine, block, whole = sizes(model)
        for total, expect_swapped in ((whole - 3 * block, True), (2**40, False)):
            card.total = total
            out = sample(model)
            assert (swapped_count(model) > 0) == expect_swapped
            check_plan(model, card)
            torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


def test_the_looper_pair_plans_each_expert_for_the_grant_it_gets_in_its_turn(checkpoint, tmp_path):
    low_path = write_checkpoint(tmp_path, "t2v", dim=1024, ffn_dim=2048, num_layers=8, seed=5)
    card = SimulatedCard(total=2**40)
    with card.active():
        high_base, low_base = load(checkpoint), load(low_path)
        references = [sample(high_base), sample(low_base)]
        mm.unload_all_models()
        high, low = looper.swap_pair(
            high_base, low_base, SwapConfig(prefetch_blocks=PREFETCH, auto_blocks_to_swap=True)
        )
        engine, block, whole = sizes(high)
        card.total = whole - 3 * block  # one expert at a time, and not even one whole
        for _ in range(2):  # high, low, high, low: each takes its turn with the whole card
            for model, reference in zip((high, low), references, strict=True):
                assert torch.equal(sample(model), reference)
                count = check_plan(model, card)
                assert count == fewest_for(model, callbacks.plan_of(model).last_grant) > 0
                # the rival left the card before this expert was granted its VRAM
                assert card.weights_on_card() == card.weights_on_card(model)


def test_the_combined_loader_reads_the_blocks_the_free_vram_calls_for_and_the_first_load_corrects_it(
    checkpoint, model_dir
):
    from .host_loader import place

    (name,) = place(model_dir, checkpoint)
    card = SimulatedCard(total=2**40)
    with card.active():
        probe = auto(load(checkpoint))
        engine, block, whole = sizes(probe)
        del probe
        card.total = whole - 3 * block
        (model,) = nodes.WAN22BlockSwapLoader().load_model(
            "safetensors",
            name,
            "none",
            prefetch_blocks=PREFETCH,
            blocks_to_swap=20,
            offload_txt_emb=False,
            offload_img_emb=False,
            auto_blocks_to_swap=True,
        )
        plan = callbacks.plan_of(model)
        engine = plan.engine
        at_read = swapped_count(model)
        assert at_read == fewest_for(model, card.total) > 0  # free VRAM (no reserve set) at read time
        assert all(u.slab is not None for u in engine.swapped_units)
        assert engine.counters.slab_tensors_from_sources > 0  # read from the file straight into the slabs
        card.inference_reserve = 2 * block  # the run needs more than the estimate left free
        sample(model)
        assert check_plan(model, card) == fewest_for(model, plan.last_grant) > at_read


def test_clones_of_an_auto_model_do_not_reload_each_other_after_a_re_plan(checkpoint, monkeypatch):
    """A re-plan marks the shared model for a reload; the clones keep their own weight-patch identity, so
    switching between them afterwards (a second sampler with its own shift) reloads nothing."""
    import comfy.model_patcher
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    unloads = []
    real = comfy.model_patcher.ModelPatcher.unpatch_model

    def counting(self, device_to=None, unpatch_weights=True, *args, **kwargs):
        if unpatch_weights and self.model.current_weight_patches_uuid is not None:
            unloads.append(1)
        return real(self, device_to, unpatch_weights, *args, **kwargs)

    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "unpatch_model", counting)
    card = SimulatedCard(total=2**40)
    with card.active():
        model = auto(load(checkpoint))
        engine, block, whole = sizes(model)
        sample(model)  # the whole model fits
        other = ModelSamplingSD3().patch(model, 5.0)[0]  # a sibling clone, made before the re-plan
        card.total = whole - 3 * block
        for _ in range(3):  # a smaller grant: re-planned and reloaded (the card's free memory settles first)
            sample(model)
        assert swapped_count(model) > 0
        sample(other)  # its first load after the model's re-plan
        before = len(unloads)
        for m in (other, model, other, model):
            sample(m)
        assert len(unloads) == before
