"""The staging ring on CPU: units left in their file reach the slot through staging buffers that a reader
thread fills ahead of the copy stream, checked against the CPU model of CUDA streams (tests/fakes/cuda_streams.py).
The reader's writes go through the model (`StreamModel.host_write`): a refill of a buffer that a copy may still
read, or a copy issued before its buffer was filled, is a detected race."""

from __future__ import annotations

import gc
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tests.core.test_host_memory import map_from_file
from tests.core.test_stream_protocol import OUT_OF_ORDER, TIMINGS, CheckingCudart, interrupt_before, run_chain
from tests.fakes.cuda_streams import StreamModel
from tests.fakes.cudart import FakeCudart
from wan22_blockswap import block_manager as bm
from wan22_blockswap import host_memory as hm
from wan22_blockswap import staging as st
from wan22_blockswap.bench import synthetic_model as sm
from wan22_blockswap.tensor_layout import _set_tensor
from wan22_blockswap.wan import units as wu

READER = "BlockSwap staging reader"


@pytest.fixture
def cuda_model(monkeypatch):
    """make(...) -> a StreamModel that serves the engine's slot memory and sees the reader's writes."""

    def make(copies="late", compute="late", **kwargs):
        model = StreamModel(copies, compute, **kwargs)
        monkeypatch.setattr(bm, "_device_buffer", model.allocate)
        monkeypatch.setattr(st, "_stage_bytes", model.host_write)
        return model

    return make


def file_chain(path, n=5, width=16, seed=0, biases_in_ram=(1, 3)):
    """Linear units whose weights (and some biases) are views of a file mapping, as a GGUF loader leaves
    them; the other biases are in anonymous RAM (the unit's small slab holds them)."""
    torch.manual_seed(seed)
    units = [(f"blocks.{i}", nn.Linear(width, width)) for i in range(n)]
    tensors = [(m, "weight") for _, m in units] + [
        (m, "bias") for i, (_, m) in enumerate(units) if i not in biases_in_ram
    ]
    raw = b"".join(getattr(m, a).detach().numpy().tobytes().ljust(1024, b"\0") for m, a in tensors)
    path.write_bytes(raw)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for i, (m, a) in enumerate(tensors):
            p = getattr(m, a)
            view = torch.from_numpy(mapped[i * 1024 : i * 1024 + p.numel() * 4]).view(p.dtype).view(p.shape)
            _set_tensor(m, a, True, view)
    return units, mapped


def file_engine(units, model, prefetch, **kwargs):
    return bm.BlockSwapEngine(
        units,
        [name for name, _ in units],
        "cpu",
        prefetch_blocks=prefetch,
        stream_api=model,
        host_memory="file",
        **kwargs,
    )


def readers():
    return [t for t in threading.enumerate() if t.name == READER]


def assert_all_copies_staged(engine):
    c = engine.counters
    assert c.staged_units == c.copies > 0 and c.staged_bytes == c.bytes_copied


@pytest.mark.parametrize("copies, compute", TIMINGS)
@pytest.mark.parametrize("prefetch", [0, 1, 2, 3])
def test_file_tier_through_the_ring_computes_exactly_with_units_out_of_order(
    cuda_model, tmp_path, copies, compute, prefetch
):
    units, _mapped = file_chain(tmp_path / "w.bin")
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = [run_chain(units, order, x) for order in OUT_OF_ORDER]
    model = cuda_model(copies, compute, seed=prefetch)
    engine = file_engine(units, model, prefetch)
    with torch.no_grad(), model, engine.attached():
        got = [run_chain(units, order, x) for order in OUT_OF_ORDER]
    assert model.races == []
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert all(u.in_file for u in engine.order)
    assert [u.slab is not None for u in engine.order] == [False, True, False, True, False]  # RAM biases
    ring = engine.host.staging
    assert ring.count == max(2, prefetch + 1) and ring.size == max(u.nbytes for u in engine.order)
    assert_all_copies_staged(engine)
    assert readers() == []


@pytest.mark.parametrize("copies, compute", TIMINGS)
def test_back_to_back_runs_through_the_ring_without_a_host_sync(cuda_model, tmp_path, copies, compute):
    """Each run's reader starts refilling the buffers the last run's copies (still queued) read."""
    units, _mapped = file_chain(tmp_path / "w.bin")
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = run_chain(units, range(5), x)
    model = cuda_model(copies, compute, seed=3)
    engine = file_engine(units, model, 2)
    with torch.no_grad(), model:
        for _ in range(4):
            with engine.attached():
                assert torch.equal(run_chain(units, range(5), x), expected)
    assert model.races == []
    assert model.log.count(("synchronize", "all")) == 0
    assert_all_copies_staged(engine)


def test_slab_units_and_file_units_mixed_only_the_file_units_are_staged(cuda_model, tmp_path):
    units, _mapped = file_chain(tmp_path / "w.bin")
    for _, m in units[:2]:  # two units back in anonymous RAM: they get slabs
        for attr, p in list(m._parameters.items()):
            _set_tensor(m, attr, True, p.detach().clone())
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = run_chain(units, range(5), x)
    model = cuda_model("random", "random", seed=11)
    engine = file_engine(units, model, 1)
    with torch.no_grad(), model, engine.attached():
        for _ in range(3):
            assert torch.equal(run_chain(units, range(5), x), expected)
    assert model.races == []
    assert [u.in_file for u in engine.order] == [False, False, True, True, True]
    c = engine.counters
    # Three passes of five units, plus the next pass's first unit (a slab) prefetched at the end.
    assert c.copies == 16 and c.staged_units == 9
    assert c.staged_bytes == 3 * sum(u.nbytes for u in engine.order[2:])


def test_the_wan_model_left_in_its_file_under_late_copies_and_late_compute(cuda_model, tmp_path):
    net = sm.build_model("tiny", "vace", num_layers=4)
    inputs = sm.example_inputs(net, tokens=16, text_tokens=8, vace_contexts=2)
    with torch.no_grad():
        reference = net(**inputs)
    map_from_file(net, tmp_path / "weights.bin")
    model = cuda_model("late", "late")
    choice = wu.select_wan_units(net, 3, offload_txt_emb=True)
    engine = bm.BlockSwapEngine(
        choice.units, choice.swap, "cpu", prefetch_blocks=2, stream_api=model, host_memory="file"
    )
    with torch.no_grad(), model:
        for _ in range(2):
            with engine.attached():
                assert torch.equal(net(**inputs), reference)
    assert model.races == []
    staged = [u for u in engine.order if u.in_file]
    assert staged and engine.counters.staged_units > 0
    assert engine.host.staging.size == max(u.nbytes for u in staged)


def test_a_copy_is_issued_only_after_its_unit_is_staged(cuda_model, tmp_path, monkeypatch):
    """A slow reader (a cold page cache): the engine waits for it; a copy that ran early would read a buffer
    not yet filled."""
    units, _mapped = file_chain(tmp_path / "w.bin")
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = run_chain(units, range(5), x)
    model = cuda_model("early", "late")

    def slow_write(dst, src):
        time.sleep(0.002)
        model.host_write(dst, src)

    monkeypatch.setattr(st, "_stage_bytes", slow_write)
    engine = file_engine(units, model, 1)
    with torch.no_grad(), model, engine.attached():
        for _ in range(2):
            assert torch.equal(run_chain(units, range(5), x), expected)
    assert model.races == []
    assert engine.counters.staging_waits > 0  # the engine did wait for the reader
    assert_all_copies_staged(engine)


def test_a_run_cut_short_by_an_exception_stops_the_reader(cuda_model, tmp_path):
    units, _mapped = file_chain(tmp_path / "w.bin")
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = run_chain(units, range(5), x)
    model = cuda_model("late", "late")
    engine = file_engine(units, model, 2)

    handle = interrupt_before(units[2][1])
    with torch.no_grad(), model:
        with pytest.raises(RuntimeError, match="interrupted"), engine.attached():
            run_chain(units, range(5), x)
        assert readers() == [] and not engine.is_attached
        handle.remove()
        with engine.attached():
            assert torch.equal(run_chain(units, range(5), x), expected)
    assert model.races == []
    assert readers() == []


def fail_reading(engine, unit_name: str, monkeypatch):
    """Reading `unit_name` from its file raises an I/O error from now on; returns the real reader, which
    monkeypatch.setattr(engine.host, "copies_into", ...) puts back."""
    copies_into = engine.host.copies_into

    def unreadable(unit, buffer):
        if unit.name == unit_name:
            raise OSError(5, "Input/output error")
        return copies_into(unit, buffer)

    monkeypatch.setattr(engine.host, "copies_into", unreadable)
    return copies_into


def test_a_read_that_fails_surfaces_in_the_run_naming_the_unit(cuda_model, tmp_path, monkeypatch):
    units, _mapped = file_chain(tmp_path / "w.bin")
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = run_chain(units, range(5), x)
    model = cuda_model("late", "late")
    engine = file_engine(units, model, 1)
    engine.park()
    copies_into = fail_reading(engine, "blocks.3", monkeypatch)
    with torch.no_grad(), model:
        with (
            pytest.raises(
                RuntimeError,
                match=r"\[BlockSwap\] Reading blocks\.3 from its file into a staging buffer failed "
                r"\(OSError: \[Errno 5\] Input/output error\)",
            ) as failure,
            engine.attached(),
        ):
            run_chain(units, range(5), x)
        assert isinstance(failure.value.__cause__, OSError)
        assert readers() == [] and not engine.is_attached
        monkeypatch.setattr(engine.host, "copies_into", copies_into)
        with engine.attached():
            assert torch.equal(run_chain(units, range(5), x), expected)
    assert model.races == []


def test_a_read_that_fails_ahead_of_a_unit_the_run_never_needs_is_logged(
    cuda_model, tmp_path, monkeypatch, caplog
):
    units, _mapped = file_chain(tmp_path / "w.bin")
    model = cuda_model("late", "late")
    engine = file_engine(units, model, 0)
    engine.park()
    fail_reading(engine, "blocks.2", monkeypatch)
    with torch.no_grad(), model, engine.attached():
        run_chain(units, [0], torch.randn(3, 16))  # the reader stages ahead: blocks.1, then blocks.2
        reader = engine._run.staging
        deadline = time.monotonic() + 10
        while reader._error is None and time.monotonic() < deadline:
            time.sleep(0.001)
    assert "Reading blocks.2 from its file into a staging buffer failed (OSError" in caplog.text
    assert readers() == []


@pytest.mark.parametrize("end", ["release", "forget_slabs", "set_swapped", "garbage_collected"])
def test_the_ring_is_unpinned_only_after_the_copies_reading_it(cuda_model, tmp_path, monkeypatch, end):
    model = cuda_model("late", "late")
    runtime = CheckingCudart(model)
    monkeypatch.setattr(hm, "_cuda_runtime", lambda: runtime)
    units, _mapped = file_chain(tmp_path / "w.bin", biases_in_ram=())
    engine = file_engine(units, model, 2, use_non_blocking=True)
    with torch.no_grad(), model:
        with engine.attached():
            run_chain(units, range(5), torch.randn(2, 16))
        ring = engine.host.staging
        assert ring.pinned and ring.count == 3
        assert set(runtime.registered) == {b.data_ptr() for b in ring.buffers}  # no slab: all in the file
        assert engine.pinned_bytes() == ring.nbytes == bm.pinned_bytes_in_use()
        assert model.pending(model.created[0]) > 0  # the last prefetch still queued
        if end == "set_swapped":
            engine.set_swapped(["blocks.0"])
            engine.park()  # the ring is resized for what is left: one buffer
            assert engine.host.staging.count == 1 and len(runtime.registered) == 1
            engine.release()
        elif end == "garbage_collected":
            del engine
            gc.collect()
        else:
            getattr(engine, end)()
    assert runtime.registered == {} and bm.pinned_bytes_in_use() == 0
    assert model.races == []


def test_the_ring_takes_its_pinned_share_first_and_falls_back_to_pageable(tmp_path, monkeypatch, caplog):
    runtime = FakeCudart()
    registered = runtime.registered
    monkeypatch.setattr(hm, "_cuda_runtime", lambda: runtime)
    units, _mapped = file_chain(tmp_path / "w.bin", biases_in_ram=())
    model = StreamModel()
    size = max(bm._layout_size(bm.SwapUnit(n, m, True)) for n, m in units)
    small = file_engine(units, model, 1, use_non_blocking=True, pinned_budget_bytes=2 * size - 1)
    small.park()
    assert not small.host.staging.pinned and registered == {}
    assert "for the staging ring" in caplog.text and "pageable RAM" in caplog.text
    summary = small.host.tier_summary(small.order)
    ring = (summary["staging_buffers"], summary["staging_bytes"], summary["staging_pinned"])
    assert ring == (2, 2 * size, False)
    small.release()
