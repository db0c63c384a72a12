"""Where ComfyUI's loads and unloads put a swapped model's tensors, on the simulated card (see lowvram.py).

- With --highvram / --gpu-only ComfyUI's offload device is the card itself: every unload (unload_all_models,
  a looper turn, the reload an auto re-plan triggers) must leave the swapped blocks in their host slabs, never
  move them "back" to the card.
- The resident weights ComfyUI's partial-style load never lists (a block's `modulation`, `head.modulation`:
  parameters of modules that have children) go to the card with the rest, so a sampling step copies no
  weight from host RAM but the swapped blocks' own slot copies.
"""

from __future__ import annotations

import contextlib

import comfy.model_management as mm
import pytest
import torch
from comfy.patcher_extension import WrappersMP

from wan22_blockswap import callbacks, looper, nodes
from wan22_blockswap.config import SwapConfig

from .comfy_helpers import load, write_checkpoint
from .comfy_helpers import sample as _sample
from .lowvram import DEVICE, SimulatedCard, _in_slab, loaded_weight_memory


def sample(model, **kwargs):
    with torch.no_grad():
        return _sample(model, steps=kwargs.pop("steps", 2), **kwargs)


def swap(model, **settings):
    (out,) = nodes.WAN22BlockSwap().apply(model, **{"blocks_to_swap": 2, "prefetch_blocks": 1, **settings})
    return out


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    return write_checkpoint(root, "t2v", seed=31), write_checkpoint(root, "t2v", seed=32)


def assert_swapped_in_slabs(model, card, unmoved=None):
    """Every swapped tensor lies in its own slab (CPU RAM), and no `.to()` moved one of the units `unmoved` (all
    by default) to the card since the ledger last said otherwise."""
    engine = callbacks.plan_of(model).engine
    assert engine.swapped_units
    for unit in engine.swapped_units:
        span = [(unit.slab.data_ptr(), unit.slab.data_ptr() + unit.slab.numel())]
        for owner, attr, _, t in unit.tensors():
            assert t.device.type == "cpu", (unit.name, attr)
            assert _in_slab(t, span), f"{unit.name}.{attr} left its slab"
            if unmoved is None or unit.name in unmoved:
                assert card.ledger.get((owner, attr)) != DEVICE, f"{unit.name}.{attr} was moved to the card"


# -- item 2: --highvram / --gpu-only --------------------------------------------------------------------------


def test_highvram_unload_all_models_leaves_swapped_blocks_in_their_slabs(experts):
    card = SimulatedCard(total=2**40, vram_state="HIGH_VRAM")  # offload device = the card, as --highvram
    with card.active():
        base = load(experts[0])
        assert base.offload_device == DEVICE
        reference = sample(base)
        mm.unload_all_models()
        model = swap(base)
        assert torch.equal(sample(model), reference)
        card.ledger.clear()
        mm.unload_all_models()
        assert loaded_weight_memory(model) == 0
        assert_swapped_in_slabs(model, card)
        assert torch.equal(sample(model), reference)
        assert_swapped_in_slabs(model, card)


def test_highvram_looper_turn_leaves_the_rivals_swapped_blocks_in_their_slabs(experts):
    card = SimulatedCard(total=2**40, vram_state="HIGH_VRAM")
    with card.active():
        bases = [load(path) for path in experts]
        references = [sample(b) for b in bases]
        mm.unload_all_models()
        high, low = looper.swap_pair(*bases, SwapConfig(blocks_to_swap=2, prefetch_blocks=1))
        assert torch.equal(sample(high), references[0])
        card.ledger.clear()
        assert torch.equal(sample(low), references[1])  # its turn unloads high (callbacks.unload_rivals)
        assert loaded_weight_memory(high) == 0
        assert_swapped_in_slabs(high, card)
        card.ledger.clear()
        assert torch.equal(sample(high), references[0])
        assert_swapped_in_slabs(low, card)


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    # 4 blocks of 48 MiB (fp32), 225 MiB in all: ComfyUI 0.3.64 never grants less than 128 MiB.
    return write_checkpoint(tmp_path_factory.mktemp("large"), "t2v", dim=1024, ffn_dim=2048, num_layers=4)


def test_auto_re_plan_with_the_card_as_offload_device_leaves_swapped_blocks_in_their_slabs(large):
    """The reload a re-plan triggers unpatches the model to its offload device: a stand-in for --highvram's
    (the card) on a card small enough for partial grants."""
    card = SimulatedCard(total=2**40)
    with card.active():
        base = load(large)
        reference = sample(base, steps=1)
        mm.unload_all_models()
        model = swap(base, auto_blocks_to_swap=True, prefetch_blocks=0)
        model.offload_device = DEVICE
        plan = callbacks.plan_of(model)
        block, whole = plan.engine.unit_bytes()["blocks.0"], model.model_size()
        card.total = whole  # ComfyUI grants a little less than the whole model: some blocks swapped
        assert torch.equal(sample(model, steps=1), reference)
        first = {u.name for u in plan.engine.swapped_units}
        assert 0 < len(first) < 3
        assert_swapped_in_slabs(model, card)
        card.total = whole - 2 * block  # more join: a re-plan and ComfyUI's reload
        assert torch.equal(sample(model, steps=1), reference)
        assert {u.name for u in plan.engine.swapped_units} > first
        # (the joined blocks were on the card: the ledger cannot tell whether the reload moved them there again)
        assert_swapped_in_slabs(model, card, unmoved=first)


# -- item 7: no per-call copies of small resident weights -----------------------------------------------------


@contextlib.contextmanager
def host_casts(card, *models):
    """Counts the casts of a weight that lies in host RAM which ComfyUI's layers and WAN's forward make
    (`comfy.model_management.cast_to`: a block's `modulation`, `head.modulation`, an offloaded layer's weight).
    On a GPU each is a blocking host -> device copy in every call. Yields the list of their names."""
    names: list[str] = []
    host: dict[int, str] = {}

    def find_host_tensors(executor, *args, **kwargs):
        host.clear()
        for model in models:
            dm = model.model.diffusion_model
            plan = callbacks.plan_of(model)
            slabs = [
                (u.slab.data_ptr(), u.slab.data_ptr() + u.slab.numel())
                for u in (plan.engine.units if plan is not None else [])
                if u.slab is not None
            ]
            for path, module in dm.named_modules():
                for name, t in [*module._parameters.items(), *module._buffers.items()]:
                    if t is not None and (card.ledger.get((module, name)) != DEVICE or _in_slab(t, slabs)):
                        host[t.data_ptr()] = f"{path}.{name}"
        return executor(*args, **kwargs)

    real = mm.cast_to

    def counting_cast_to(weight, *args, **kwargs):
        if isinstance(weight, torch.Tensor) and weight.data_ptr() in host:
            names.append(host[weight.data_ptr()])
        return real(weight, *args, **kwargs)

    for model in models:
        model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test_host_casts", find_host_tensors)
    mm.cast_to = counting_cast_to
    try:
        yield names
    finally:
        mm.cast_to = real


def test_a_step_copies_no_resident_weight_from_host_ram_only_the_swapped_blocks(experts):
    card = SimulatedCard(total=2**40)  # room for the whole model: ComfyUI loads the unswapped one fully
    with card.active():
        base = load(experts[0])
        plain = base.clone()
        with host_casts(card, plain) as casts:
            reference = sample(plain)
        unswapped = list(casts)
        mm.unload_all_models()
        for settings in ({"blocks_to_swap": 2}, {"auto_blocks_to_swap": True}):
            model = swap(base, prefetch_blocks=0, **settings)
            with host_casts(card, model) as casts:
                assert torch.equal(sample(model), reference)
            engine = callbacks.plan_of(model).engine
            assert casts == unswapped, (
                settings
            )  # the swapped blocks' own copies are the engine's: one per pass
            assert engine.counters.copies == engine.counters.passes * len(engine.swapped_units), settings
            # what ComfyUI counts as loaded is what lies on the card, the resident weights it never lists included
            assert loaded_weight_memory(model) == card.weights_on_card(model) > 0, settings
            mm.unload_all_models()
    assert unswapped == []
