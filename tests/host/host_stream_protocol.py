"""What the integration hands the engine for its copies: pristine host copies (never a LoRA some load fused
in) and a pinned-memory budget that leaves room for what ComfyUI pinned itself."""

from __future__ import annotations

import comfy.model_management as mm
import pytest
import torch

from wan22_blockswap import block_manager as bm
from wan22_blockswap import host_memory as hm

from .comfy_helpers import load, plan, sample, write_checkpoint
from .host_blockswap import _lora_patches, swap


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), "t2v")


def block_weights(patcher) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in patcher.model.state_dict().items()
        if k.startswith("diffusion_model.blocks.")
    }


def test_slabs_hold_the_original_weights_after_a_lora_clone_fused_its_patches_in(checkpoint):
    """An unswapped clone with a LoRA, fully loaded: ComfyUI fuses the LoRA into the shared module's weights
    and keeps the originals in the backup that every clone shares. The swapped clone of the same model,
    without the LoRA, must build its host copies from the originals and sample as the LoRA-free model."""
    base = load(checkpoint)
    originals = block_weights(base)
    reference = sample(base)
    with_lora = base.clone()
    with_lora.add_patches(_lora_patches(base), 1.0)  # patches every block weight, nothing else
    lora_out = sample(with_lora)
    assert not torch.allclose(lora_out, reference, atol=1e-3)
    fused = {k for k in originals if k in with_lora.backup}
    assert fused and not all(torch.equal(block_weights(base)[k], originals[k]) for k in fused)

    swapped = swap(base, blocks_to_swap=4, prefetch_blocks=1)  # every block: all the LoRA's keys
    # ComfyUI's own loads restore the backup first, because the swapped clone has a patch identity of its
    # own; a load entered directly (ModelPatcher.patch_model, public API) sees the fused weights still there.
    swapped.patch_model(swapped.load_device)
    engine = plan(swapped).engine
    for unit in engine.swapped_units:
        for name, t in unit.module.state_dict().items():
            key = f"diffusion_model.{unit.name}.{name}"
            assert torch.equal(t, originals[key]), key
    assert torch.equal(sample(swapped), reference)
    assert torch.equal(sample(base), reference)
    assert torch.allclose(sample(with_lora), lora_out)  # ComfyUI fuses it again for the LoRA clone


class FakeCudart:
    """cudaHostRegister/Unregister on a machine without CUDA: the engine's pins are counted, nothing locked."""

    def __init__(self):
        self.registered: dict[int, int] = {}

    def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 (CUDA's name)
        self.registered[ptr] = size
        return 0

    def cudaHostUnregister(self, ptr):  # noqa: N802
        self.registered.pop(ptr, None)
        return 0


@pytest.mark.skipif(not hasattr(mm, "MAX_PINNED_MEMORY"), reason="this ComfyUI has no pinned-memory budget")
def test_the_plan_pins_within_comfyuis_budget_less_what_comfyui_pinned(checkpoint, monkeypatch):
    runtime = FakeCudart()
    monkeypatch.setattr(hm, "_cuda_runtime", lambda: runtime)
    monkeypatch.setattr(hm, "_discard_cuda_error", lambda: None)
    base = load(checkpoint)
    base.load_device = torch.device("cuda", 0)  # pinning is for a GPU; nothing runs here
    swapped = swap(base, blocks_to_swap=4, prefetch_blocks=1, use_non_blocking=True)
    engine = plan(swapped).engine
    slab_bytes = sum(bm._layout_size(u) for u in engine.swapped_units)
    comfy_pinned = 3 * 2**30
    monkeypatch.setattr(mm, "TOTAL_PINNED_MEMORY", comfy_pinned)
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", comfy_pinned + slab_bytes * 6 // 10)
    try:
        engine.park()
        pinned = engine.pinned_bytes()
        assert sum(runtime.registered.values()) == pinned
        assert 0 < pinned <= mm.MAX_PINNED_MEMORY - mm.TOTAL_PINNED_MEMORY
    finally:
        engine.release()
    assert runtime.registered == {} and bm.pinned_bytes_in_use() == 0


@pytest.mark.skipif(not hasattr(mm, "MAX_PINNED_MEMORY"), reason="this ComfyUI has no pinned-memory setting")
def test_the_plan_pins_nothing_when_comfyui_pinning_is_off(checkpoint, monkeypatch):
    """--disable-pinned-memory leaves ComfyUI's limit at -1: the swapped blocks stay in ordinary RAM too."""
    runtime = FakeCudart()
    monkeypatch.setattr(hm, "_cuda_runtime", lambda: runtime)
    monkeypatch.setattr(hm, "_discard_cuda_error", lambda: None)
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", -1)
    base = load(checkpoint)
    base.load_device = torch.device("cuda", 0)  # pinning is for a GPU; nothing runs here
    engine = plan(swap(base, blocks_to_swap=4, prefetch_blocks=1, use_non_blocking=True)).engine
    try:
        engine.park()
        assert engine.pinned_bytes() == 0 and runtime.registered == {}
        assert all(u.slab is not None and not u.slab_pinned for u in engine.swapped_units)
    finally:
        engine.release()
