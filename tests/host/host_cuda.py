"""BlockSwap inside a real ComfyUI on a CUDA GPU: no VRAM spike at load, stable memory over runs,
cooperation with ComfyUI's pinned memory. Run with WAN22_COMFYUI_GPU=1 (scripts/gpu_check.sh)."""

from __future__ import annotations

import logging

import comfy.model_management as mm
import pytest
import torch

from wan22_blockswap import nodes, utils

from .comfy_helpers import load, plan, sample, write_checkpoint

pytestmark = pytest.mark.skipif(
    mm.get_torch_device().type != "cuda", reason="needs ComfyUI running on a CUDA GPU (WAN22_COMFYUI_GPU=1)"
)
DEVICE = torch.device("cuda")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # 1.3B block shapes (dim 1536, ffn 8960), 8 blocks: blocks of ~90 MB in bf16.
    return write_checkpoint(tmp_path_factory.mktemp("gpu"), "t2v", num_layers=8, dim=1536, ffn_dim=8960)


def swap(model, **settings):
    (out,) = nodes.WAN22BlockSwap().apply(model, **settings)
    return out


def gpu_sample(model, seed=0):
    return sample(model, steps=2, seed=seed, frames=5, size=32).to(DEVICE)


def test_load_never_puts_swapped_blocks_in_vram(checkpoint):
    base = load(checkpoint, dtype=torch.bfloat16)
    swapped = swap(base, blocks_to_swap=6, prefetch_blocks=1, use_non_blocking=True)
    p = plan(swapped)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    mm.load_models_gpu([swapped])
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    # ComfyUI's loaded-memory figure is the resident weights it moved; the slots are not counted (room for
    # them is kept by loading slot_bytes less than granted, and they exist only during a run).
    resident = swapped.loaded_size()
    assert 0 < resident <= swapped.model_size() - p.slot_bytes, (resident, swapped.model_size(), p.slot_bytes)
    assert torch.cuda.memory_allocated() - before >= resident  # those bytes really are in VRAM now
    largest_block = max(u.param_bytes() for u in p.engine.swapped_units)
    assert peak <= resident + largest_block, (peak, resident, largest_block)
    for unit in p.engine.swapped_units:
        assert all(t.device.type == "cpu" for *_, t in unit.tensors()), unit.name


def test_peak_vram_while_sampling_is_resident_plus_slots_plus_activations(checkpoint):
    def measured_run(model):
        gpu_sample(model)  # warm-up: loads the model, fills ComfyUI's and torch's caches
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        gpu_sample(model)
        return before, torch.cuda.max_memory_allocated()

    base = load(checkpoint, dtype=torch.bfloat16)
    base_before, base_peak = measured_run(base)
    activations = base_peak - base_before
    mm.unload_all_models()
    swapped = swap(base, blocks_to_swap=6, prefetch_blocks=1, use_non_blocking=True)
    p = plan(swapped)
    before, peak = measured_run(swapped)
    # Between runs the swapped blocks are not in VRAM (whatever else both runs keep cached)...
    assert base_before - before >= p.swapped_bytes, (base_before, before, p.swapped_bytes)
    # ...and during a run they cost the slots, nothing more (4 MiB for library workspaces).
    assert peak <= before + p.slot_bytes + activations + 4 * 2**20, (peak, before, p.slot_bytes, activations)


def test_gpu_output_equals_unswapped_and_memory_is_stable_over_runs(checkpoint, caplog):
    base = load(checkpoint, dtype=torch.bfloat16)
    reference = gpu_sample(base)
    swapped = swap(base, blocks_to_swap=6, prefetch_blocks=1, use_non_blocking=True)
    p = plan(swapped)
    readings = []
    with caplog.at_level(logging.WARNING):
        for i in range(5):
            out = gpu_sample(swapped)
            assert torch.equal(out, reference), f"run {i}: max diff {(out - reference).abs().max()}"
            torch.cuda.synchronize()
            readings.append((torch.cuda.memory_allocated(), utils.process_rss()))
    assert p.engine.pinned_bytes() == sum(u.slab.numel() for u in p.engine.swapped_units) > 0
    (vram_1, rss_1), (vram_5, rss_5) = readings[0], readings[-1]
    assert abs(vram_5 - vram_1) <= 0.01 * vram_1, readings
    assert abs(rss_5 - rss_1) <= 0.01 * rss_1, readings
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "Tried to unpin" in m or "invalid argument" in m], messages


def test_comfyui_lowvram_clone_and_swapped_clone_take_turns_without_pin_trouble(checkpoint, caplog):
    base = load(checkpoint, dtype=torch.bfloat16)
    reference = gpu_sample(base)
    swapped = swap(base, blocks_to_swap=6, prefetch_blocks=1, use_non_blocking=True)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert torch.equal(gpu_sample(swapped), reference)
            mm.unload_all_models()
            # The plain clone, loaded by ComfyUI in lowvram mode (it pins what it offloads).
            loaded = mm.LoadedModel(base)
            loaded.model_load(lowvram_model_memory=200 * 2**20)
            assert base.model.model_lowvram
            base.detach()
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "Tried to unpin" in m or "invalid argument" in m], messages
    assert torch.equal(gpu_sample(base), reference)


# -- --highvram / --gpu-only: ComfyUI's offload device is the GPU (run with WAN22_COMFYUI_FLAGS=highvram) --------

highvram_only = pytest.mark.skipif(
    mm.vram_state != mm.VRAMState.HIGH_VRAM,
    reason="needs ComfyUI's --highvram (WAN22_COMFYUI_FLAGS=highvram)",
)


def assert_swapped_in_host_ram(model):
    for unit in plan(model).engine.swapped_units:
        lo, hi = unit.slab.data_ptr(), unit.slab.data_ptr() + unit.slab.numel()
        for *_, t in unit.tensors():
            assert t.device.type == "cpu" and lo <= t.data_ptr() < hi, unit.name


@highvram_only
def test_highvram_unload_all_models_leaves_swapped_blocks_in_host_ram(checkpoint):
    base = load(checkpoint, dtype=torch.bfloat16)
    assert base.offload_device.type == "cuda"
    swapped = swap(base, blocks_to_swap=6, prefetch_blocks=1, use_non_blocking=True)
    reference = gpu_sample(base)
    mm.unload_all_models()
    assert torch.equal(gpu_sample(swapped), reference)
    torch.cuda.synchronize()
    loaded = torch.cuda.memory_allocated()
    mm.unload_all_models()  # ComfyUI moves the model to its offload device: the GPU
    torch.cuda.synchronize()
    assert_swapped_in_host_ram(swapped)
    # the resident weights stay where they were; no swapped block was added to them (4 MiB for workspaces)
    assert torch.cuda.memory_allocated() <= loaded + 4 * 2**20, (torch.cuda.memory_allocated(), loaded)
    assert torch.equal(gpu_sample(swapped), reference)


@highvram_only
def test_highvram_looper_turn_leaves_the_rivals_swapped_blocks_in_host_ram(checkpoint, tmp_path):
    from wan22_blockswap import looper
    from wan22_blockswap.config import SwapConfig

    low_path = write_checkpoint(tmp_path, "t2v", num_layers=8, dim=1536, ffn_dim=8960, seed=9)
    bases = [load(checkpoint, dtype=torch.bfloat16), load(low_path, dtype=torch.bfloat16)]
    config = SwapConfig(blocks_to_swap=6, prefetch_blocks=1, use_non_blocking=True)
    high, low = looper.swap_pair(*bases, config)
    gpu_sample(high)
    gpu_sample(low)  # its turn unloads high to the offload device (the GPU)
    torch.cuda.synchronize()
    assert_swapped_in_host_ram(high)
    gpu_sample(high)
    torch.cuda.synchronize()
    assert_swapped_in_host_ram(low)
