"""The swap engine on a CUDA GPU: copy stream, events, pinned slabs, VRAM bounds."""

from __future__ import annotations

import threading

import pytest
import torch

from wan22_blockswap import block_manager as bm
from wan22_blockswap import host_memory as hm
from wan22_blockswap.bench import synthetic_model as sm
from wan22_blockswap.wan import units as wu

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none found)"),
]
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def model():
    # 1.3B block shapes, 8 blocks, bf16: big enough for real kernels, small enough to be quick.
    m = sm.build_model("1.3b", "vace", num_layers=8, dtype=torch.bfloat16, device="cpu", init_device=CUDA)
    for name, child in m.named_children():
        if name not in ("blocks", "vace_blocks", "text_embedding", "img_emb"):
            child.to(CUDA)
    return m


def engine_for(model, blocks_to_swap, prefetch, non_blocking, **kwargs):
    choice = wu.select_wan_units(model, blocks_to_swap, offload_txt_emb=kwargs.pop("offload_txt_emb", False))
    return bm.BlockSwapEngine(
        choice.units, choice.swap, CUDA, prefetch_blocks=prefetch, use_non_blocking=non_blocking, **kwargs
    )


def reference_output(model, inputs):
    engine = engine_for(model, 0, 0, False)  # everything resident
    with engine.attached(), torch.inference_mode():
        out = model(**inputs)
    torch.cuda.synchronize()
    return out.clone()


@pytest.mark.parametrize("prefetch, non_blocking", [(0, False), (0, True), (1, True), (2, True), (1, False)])
def test_cuda_swapped_output_equals_unswapped(model, prefetch, non_blocking):
    inputs = sm.example_inputs(model, tokens=1024, vace_contexts=2)
    reference = reference_output(model, inputs)
    engine = engine_for(model, 8, prefetch, non_blocking, offload_txt_emb=True, debug=True)
    for _ in range(2):  # the second run reuses the slabs
        with engine.attached(), torch.inference_mode():
            for _ in range(3):
                assert torch.equal(model(**inputs), reference)
    c = engine.counters
    if prefetch == 0:
        # Every copy happens on demand; a VACE block's second context finds it still in its slot.
        assert c.misses == c.copies and c.misses + c.slot_hits == c.unit_runs
    else:
        assert c.misses == 0
    assert engine.last_run.copy_ms > 0
    engine.release()


def test_cuda_no_swapped_parameter_on_the_gpu_after_a_run(model):
    engine = engine_for(model, 6, 1, True)
    with engine.attached(), torch.inference_mode():
        model(**sm.example_inputs(model, tokens=256, vace_contexts=1))
    for unit in engine.swapped_units:
        assert all(t.device.type == "cpu" for *_, t in unit.tensors()), unit.name
    for unit in engine.resident_units:
        assert all(t.device.type == "cpu" for *_, t in unit.tensors()), unit.name  # moved back by detach
    engine.release()


def test_cuda_slabs_are_pinned_exactly_and_unpinned_on_release(model):
    before = bm.pinned_bytes_in_use()
    engine = engine_for(model, 6, 1, True)
    with engine.attached():
        slab_bytes = sum(u.slab.numel() for u in engine.swapped_units)
        assert engine.pinned_bytes() == slab_bytes
        assert bm.pinned_bytes_in_use() - before == slab_bytes
        assert all(u.slab.is_pinned() for u in engine.swapped_units)
    engine.release()
    assert bm.pinned_bytes_in_use() == before
    assert not any(u.slab.is_pinned() for u in engine.swapped_units)


def test_cuda_pinned_budget_falls_back_to_pageable_with_one_warning(model, caplog):
    engine = engine_for(model, 6, 1, True, pinned_budget_bytes=1)
    with caplog.at_level("WARNING"), engine.attached(), torch.inference_mode():
        model(**sm.example_inputs(model, tokens=256, vace_contexts=1))
    warnings = [r for r in caplog.records if "Pinned-memory budget" in r.getMessage()]
    assert len(warnings) == 1
    assert engine.pinned_bytes() == 0
    engine.release()


def test_cuda_peak_vram_stays_within_resident_plus_slots_plus_activations(model):
    inputs = sm.example_inputs(model, tokens=4096, vace_contexts=1)
    # Activation peak of the unswapped model, measured: peak minus what was allocated before.
    resident_all = engine_for(model, 0, 0, False)
    with resident_all.attached(), torch.inference_mode():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(**inputs)
        torch.cuda.synchronize()
        activations = torch.cuda.max_memory_allocated() - base
    non_unit = torch.cuda.memory_allocated()  # time embedding, head, ... (stay on the GPU)

    engine = engine_for(model, 6, 1, True)
    with engine.attached(), torch.inference_mode():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        model(**inputs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    bound = non_unit + engine.resident_bytes() + engine.slot_bytes() + activations
    # The caching allocator rounds each resident tensor up to 512 bytes; library workspaces (cuBLAS,
    # SDPA) may differ by a little between the two runs (measured: 1.1 MiB on an H200).
    slack = 512 * sum(len(list(u.tensors())) for u in engine.resident_units) + 4 * 2**20
    assert peak <= bound + slack, (peak, bound)
    assert peak < non_unit + resident_all.resident_bytes() + activations  # and it does save memory
    engine.release()


def test_cuda_host_placement_keeps_swapped_blocks_in_ram_for_a_model_created_on_the_gpu():
    """Checkpoint loaders create the model on the GPU when it fits: inside ComfyUI (placement "host") a
    swapped block's home between runs is its host slab, never VRAM."""
    m = sm.build_model("1.3b", "t2v", num_layers=4, dtype=torch.bfloat16, device=CUDA, init_device=CUDA)
    inputs = sm.example_inputs(m, tokens=256)
    with torch.inference_mode():
        reference = m(**inputs).clone()
    choice = wu.select_wan_units(m, 3)
    engine = bm.BlockSwapEngine(choice.units, choice.swap, CUDA, prefetch_blocks=1, placement="host")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(2):
        with engine.attached(), torch.inference_mode():
            assert torch.equal(m(**inputs), reference)
        for unit in engine.swapped_units:
            assert all(t.device.type == "cpu" for *_, t in unit.tensors()), unit.name
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before - engine.swapped_bytes() + 2**20
    engine.release()


def test_cuda_a_failed_pin_leaves_no_error_for_the_next_kernel():
    buffer = torch.empty(2**20, dtype=torch.uint8)
    runtime = torch.cuda.cudart()
    assert int(runtime.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)) == 0
    try:
        before = bm.pinned_bytes_in_use()
        assert hm._pin_in_place(buffer) is False  # already registered: CUDA refuses
        assert bm.pinned_bytes_in_use() == before
        x = torch.ones(4, device=CUDA) + 1  # would raise the stale error without the clear
        torch.cuda.synchronize()
        assert x.sum().item() == 8
    finally:
        runtime.cudaHostUnregister(buffer.data_ptr())


def test_a_timed_run_measures_copies_and_the_swapped_units_compute(model):
    """time_next_run (what auto_blocks_to_swap asks for after a re-plan): CUDA events around each copy and
    each swapped unit's compute, for that run only."""
    inputs = sm.example_inputs(model, tokens=256, vace_contexts=1)
    engine = engine_for(model, 4, 1, True)
    engine.time_next_run = True
    with engine.attached(), torch.inference_mode():
        model(**inputs)
    stats = engine.last_run
    assert stats.copies == engine.counters.copies > 0 and stats.copy_ms > 0
    assert stats.computes == engine.counters.unit_runs and stats.compute_ms > 0
    with engine.attached(), torch.inference_mode():
        model(**inputs)
    assert engine.last_run.copies == 0  # the next run is not timed
    engine.release()


def _pinned_as_recorded(engine):
    """Every pinned slab is page-locked for CUDA, every other one is not, and the ledger agrees."""
    for unit in engine.swapped_units:
        assert unit.slab.is_pinned() == unit.slab_pinned, unit.name
    assert engine.pinned_bytes() == sum(u.slab.numel() for u in engine.swapped_units if u.slab_pinned)


def test_cuda_pinned_blocks_join_then_leave_with_the_text_embedding_swapped(model):
    """auto_blocks_to_swap with offload_txt_emb: the embedding's slab is first in the pinned list."""
    inputs = sm.example_inputs(model, tokens=256, vace_contexts=1)
    reference = reference_output(model, inputs)
    before = bm.pinned_bytes_in_use()
    engine = engine_for(model, 2, 1, True, offload_txt_emb=True)
    names = [u.name for u in engine.units]
    for swap in (["blocks.4", "blocks.5", "blocks.6", "blocks.7"], ["blocks.7"]):
        with engine.attached(), torch.inference_mode():
            assert torch.equal(model(**inputs), reference)
        engine.set_swapped(
            ["text_embedding", *swap, *[n for n in names if n.startswith("vace_blocks.")][-1:]]
        )
        _pinned_as_recorded(engine)
    with engine.attached(), torch.inference_mode():
        assert torch.equal(model(**inputs), reference)
    _pinned_as_recorded(engine)
    engine.release()
    assert bm.pinned_bytes_in_use() == before


def test_cuda_slabs_adopted_across_swap_sets_stay_pinned_and_pageable_ones_get_pinned(model):
    inputs = sm.example_inputs(model, tokens=256, vace_contexts=1)
    reference = reference_output(model, inputs)
    before = bm.pinned_bytes_in_use()
    pageable = engine_for(model, 6, 1, False)  # use_non_blocking off: its slabs are never pinned
    pageable.park()
    pinned = engine_for(model, 4, 1, True)
    pinned.adopt_slabs(pageable)
    pageable.forget_slabs()
    with pinned.attached(), torch.inference_mode():
        assert torch.equal(model(**inputs), reference)
    assert pinned.pinned_bytes() == sum(u.nbytes for u in pinned.swapped_units)
    _pinned_as_recorded(pinned)
    fewer = engine_for(model, 2, 1, True)  # the last two of pinned's blocks, behind others in its list
    fewer.adopt_slabs(pinned)
    pinned.forget_slabs()
    with fewer.attached(), torch.inference_mode():
        assert torch.equal(model(**inputs), reference)
    _pinned_as_recorded(fewer)
    fewer.release()
    assert bm.pinned_bytes_in_use() == before


def test_cuda_file_tier_copies_from_the_mapped_file_bit_identically(model, tmp_path):
    """Blocks left in their file (host_memory="file") are copied to the slot from the file's mapping."""
    from wan22_blockswap.bench.file_backed import FileBackedBlocks

    inputs = sm.example_inputs(model, tokens=1024, vace_contexts=1)
    reference = reference_output(model, inputs)
    files = FileBackedBlocks(model, tmp_path / "blocks.bin")
    files.bind()
    engine = engine_for(model, 8, 1, True, host_memory="file")
    for cold in (False, True):
        if cold:
            files.drop_page_cache()
        with engine.attached(), torch.inference_mode():
            assert torch.equal(model(**inputs), reference)
    blocks = [u for u in engine.swapped_units if u.name.startswith("blocks.")]
    assert blocks and all(u.in_file for u in blocks)
    # Pinned: the RAM slabs (units that are not the file's) and the staging ring the file units go through.
    ring = engine.host.staging
    assert ring.pinned and ring.count == 2 and ring.size == max(u.nbytes for u in blocks)
    assert engine.pinned_bytes() == ring.nbytes + sum(u.nbytes for u in engine.swapped_units if not u.in_file)
    c = engine.counters
    assert c.staged_units >= 2 * len(blocks) and c.staged_bytes >= 2 * sum(u.nbytes for u in blocks)
    copy_stream = engine._copy_streams[0]
    engine.release()
    assert copy_stream.query() and engine.pinned_bytes() == 0 and engine.host.staging is None


@pytest.mark.parametrize("prefetch", [1, 2])
def test_cuda_file_tier_copies_from_the_staging_ring_overlap_compute(model, tmp_path, prefetch):
    """Compute-heavy blocks left in their file: the reader stages each block ahead of its copy and the pinned
    staged copy hides behind compute, as a pinned slab's does; exact, also back to back without a host sync."""
    from wan22_blockswap.bench.file_backed import FileBackedBlocks

    inputs = sm.example_inputs(model, tokens=32760, vace_contexts=1)
    reference = reference_output(model, inputs)
    files = FileBackedBlocks(model, tmp_path / "blocks.bin")
    files.bind()
    engine = engine_for(model, 8, prefetch, True, host_memory="file", debug=True)
    outputs = []
    with torch.inference_mode():
        for _ in range(3):
            with engine.attached():
                outputs.append(model(**inputs))
    torch.cuda.synchronize()
    assert all(torch.equal(out, reference) for out in outputs)
    stats, c = engine.last_run, engine.counters
    assert engine.host.staging.pinned and engine.host.staging.count == prefetch + 1
    assert c.staged_units > 0 and stats.stall_ms < stats.compute_ms, (stats.stall_ms, stats.compute_ms)
    assert not [t for t in threading.enumerate() if t.name == "BlockSwap staging reader"]
    engine.release()


# -- the stream protocol under real timing (issue 20: items 4, 5, 9, 10) ------------------------------------


def test_cuda_back_to_back_wrapper_attaches_with_pending_kernels(model):
    """The wrapper path: attach and detach around every model call with no host sync, while the compute
    stream lags far behind the host (a spin kernel queued first). Each run's slots reuse the memory the last
    run's kernels may still be reading; its first copies must wait for them."""
    inputs = sm.example_inputs(model, tokens=1024, vace_contexts=1)
    reference = reference_output(model, inputs)
    engine = engine_for(model, 8, 2, True, offload_txt_emb=True)
    outputs = []
    with torch.inference_mode():
        for _ in range(6):
            torch.cuda._sleep(20_000_000)  # tens of ms of GPU time: everything after it is still pending
            with engine.attached():
                outputs.append(model(**inputs))
    torch.cuda.synchronize()
    assert all(torch.equal(out, reference) for out in outputs)
    engine.release()


def test_cuda_forty_attaches_use_one_copy_stream_never_a_comfyui_one(model):
    # ComfyUI's offload streams (priority 0, from torch's low-priority pool), made before the engine's.
    comfy_streams = [torch.cuda.Stream(device=CUDA, priority=0) for _ in range(2)]
    engine = engine_for(model, 4, 1, True, reader_streams=lambda: comfy_streams)
    inputs = sm.example_inputs(model, tokens=128, vace_contexts=1)
    used = []
    with torch.inference_mode():
        for _ in range(40):
            with engine.attached():
                model(**inputs)
                used.append(engine._run.transport.copy_stream)
            torch.cuda.Stream(device=CUDA, priority=0)  # the pool keeps turning (other users)
    assert all(stream == used[0] for stream in used)
    assert not any(used[0] == theirs for theirs in comfy_streams)
    engine.release()


def test_cuda_compute_heavy_run_hides_its_copies_and_stays_exact(model):
    """Long compute per block (copies hidden behind it) next to the copy-bound cases above: a copy that
    overwrote a slot while its kernels still ran would show up here."""
    inputs = sm.example_inputs(model, tokens=16384, vace_contexts=1)
    reference = reference_output(model, inputs)
    engine = engine_for(model, 8, 1, True, debug=True)
    with engine.attached(), torch.inference_mode():
        for _ in range(2):
            assert torch.equal(model(**inputs), reference)
    stats = engine.last_run
    assert stats.stall_ms < stats.compute_ms, (stats.stall_ms, stats.compute_ms)
    engine.release()


def test_cuda_slabs_are_unpinned_after_the_last_prefetch_landed(model):
    """release() right after a run: the wrapped prefetch still reads a pinned slab; the host waits for it."""
    inputs = sm.example_inputs(model, tokens=256, vace_contexts=1)
    engine = engine_for(model, 8, 2, True)
    with torch.inference_mode():
        torch.cuda._sleep(50_000_000)  # the copies queue behind the compute of this run
        with engine.attached():
            model(**inputs)
    copy_stream = engine._copy_streams[0]
    engine.release()
    assert copy_stream.query()  # nothing left in flight when the slabs were unpinned
    assert engine.pinned_bytes() == 0


def test_cuda_a_graph_capture_of_a_swapped_model_is_refused():
    m = sm.build_model("tiny", "t2v", num_layers=3, device=CUDA, init_device=CUDA)
    inputs = sm.example_inputs(m, tokens=64)
    choice = wu.select_wan_units(m, 2)
    engine = bm.BlockSwapEngine(choice.units, choice.swap, CUDA, prefetch_blocks=1, placement="host")
    with torch.inference_mode():
        m(**inputs)  # warm-up (cuBLAS handles) outside the capture
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match=r"reduce-overhead"), torch.cuda.graph(graph):
            engine.attach()
        assert not engine.is_attached
        with engine.attached():
            graph = torch.cuda.CUDAGraph()
            with pytest.raises(RuntimeError, match="CUDA graph capture"), torch.cuda.graph(graph):
                m(**inputs)
    assert not engine.is_attached
    engine.release()


def test_cuda_reduce_overhead_compile_is_exact_or_refused():
    """torch.compile(mode='reduce-overhead') records CUDA graphs of each block's compiled body; the hooks run
    outside them (torch.compiler.disable). Either the replays read the slots correctly or the run is refused
    with the message naming the setting: never a silently different output."""
    m = sm.build_model("tiny", "t2v", num_layers=3, device=CUDA, init_device=CUDA)
    inputs = sm.example_inputs(m, tokens=64)
    for block in m.blocks:
        block.compile(mode="reduce-overhead")
    with torch.inference_mode():
        reference = [m(**inputs).clone() for _ in range(3)]
    choice = wu.select_wan_units(m, 2)
    engine = bm.BlockSwapEngine(choice.units, choice.swap, CUDA, prefetch_blocks=1, placement="host")
    try:
        with engine.attached(), torch.inference_mode():
            got = [m(**inputs).clone() for _ in range(3)]
    except RuntimeError as error:
        assert "reduce-overhead" in str(error)
    else:
        assert all(torch.equal(a, b) for a, b in zip(got, reference, strict=True))
    engine.release()
