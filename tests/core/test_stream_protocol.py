"""The CUDA stream protocol of the engine, on CPU: `CudaStreamTransport` itself runs against a model of CUDA
streams in which copies and compute really complete late (tests/fakes/cuda_streams.py), and every access
that is not ordered after the one it conflicts with is a detected race."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.fakes.cuda_streams import StreamModel
from wan22_blockswap import block_manager as bm
from wan22_blockswap import host_memory as hm
from wan22_blockswap.bench import synthetic_model as sm
from wan22_blockswap.wan import units as wu

# One pass each: in order; block 2 skipped; block 3 twice in a row (a VACE block's second context); a pass
# cut short after block 1 (the ring jumps back to the start); then a full one.
OUT_OF_ORDER = [[0, 1, 2, 3, 4], [0, 1, 3, 4], [0, 1, 2, 3, 3, 4], [0, 1], [0, 1, 2, 3, 4]]

# (copy stream, compute stream): copies slower than compute, compute slower than copies, both as late as
# possible, and seeded random progress of every stream.
TIMINGS = [("late", "early"), ("early", "late"), ("late", "late"), ("random", "random")]


@pytest.fixture
def cuda_model(monkeypatch):
    """make(...) -> a StreamModel whose caching allocator serves the engine's slot memory."""

    def make(copies="late", compute="late", **kwargs):
        model = StreamModel(copies, compute, **kwargs)
        monkeypatch.setattr(bm, "_device_buffer", model.allocate)
        return model

    return make


def chain(n=5, width=16, seed=0, layer=nn.Linear):
    torch.manual_seed(seed)
    return [(f"blocks.{i}", layer(width, width)) for i in range(n)]


def run_chain(units, order, x):
    for i in order:
        x = torch.tanh(units[i][1](x))
    return x


def streamed_engine(units, model, prefetch, **kwargs):
    return bm.BlockSwapEngine(
        units, [name for name, _ in units], "cpu", prefetch_blocks=prefetch, stream_api=model, **kwargs
    )


def copies_on(model):
    return {stream for op, stream, *_ in model.log if op == "copy"}


@pytest.mark.parametrize("copies, compute", TIMINGS)
@pytest.mark.parametrize("prefetch", [1, 2, 3])
def test_stream_transport_computes_exactly_with_units_out_of_order(cuda_model, copies, compute, prefetch):
    units = chain()
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = [run_chain(units, order, x) for order in OUT_OF_ORDER]
    model = cuda_model(copies, compute, seed=prefetch)
    engine = streamed_engine(units, model, prefetch)
    with torch.no_grad(), model, engine.attached():
        got = [run_chain(units, order, x) for order in OUT_OF_ORDER]
    assert model.races == []
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert copies_on(model) == {"stream0"} and engine.counters.copies > len(units)


@pytest.mark.parametrize("copies, compute", TIMINGS)
def test_back_to_back_runs_without_a_host_sync(cuda_model, copies, compute):
    """The wrapper path: attach and detach around every model call, nothing synchronises the host. Each run
    gets the slot memory the last one freed, with the last prefetch still queued."""
    units = chain()
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = run_chain(units, range(5), x)
    model = cuda_model(copies, compute, seed=7)
    engine = streamed_engine(units, model, 2)
    with torch.no_grad(), model:
        for _ in range(4):
            with engine.attached():
                assert torch.equal(run_chain(units, range(5), x), expected)
    assert model.races == []
    assert model.log.count(("synchronize", "all")) == 0  # nothing but the stream protocol orders the runs


def test_a_timed_run_reads_its_events_only_after_they_completed(cuda_model):
    """debug / time_next_run: CUDA events around every copy and swapped unit, read at the end of the run (the
    model refuses elapsed_time on an event still pending)."""
    units = chain()
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = run_chain(units, range(5), x)
    model = cuda_model("late", "late")
    engine = streamed_engine(units, model, 1)
    engine.time_next_run = True
    with torch.no_grad(), model:
        with engine.attached():
            assert torch.equal(run_chain(units, range(5), x), expected)
        stats = engine.last_run
        assert stats.copies == engine.counters.copies and stats.computes == engine.counters.unit_runs == 5
        assert stats.copy_ms > 0 and stats.compute_ms > 0
        with engine.attached():
            run_chain(units, range(5), x)
    assert engine.last_run.copies == 0  # only the next run is timed
    assert model.races == []


def interrupt_before(module: nn.Module):
    """Make `module`'s next forwards raise RuntimeError("interrupted") (a run cut short); returns the hook's
    handle, whose remove() ends it."""

    def fail(module, args):
        raise RuntimeError("interrupted")

    return module.register_forward_pre_hook(fail)


def test_a_run_cut_short_by_an_exception_leaves_no_copy_racing_the_next(cuda_model):
    units = chain()
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = run_chain(units, range(5), x)
    model = cuda_model("late", "late")
    engine = streamed_engine(units, model, 2)

    handle = interrupt_before(units[2][1])
    with torch.no_grad(), model:
        with pytest.raises(RuntimeError, match="interrupted"), engine.attached():
            run_chain(units, range(5), x)
        handle.remove()
        with engine.attached():
            assert torch.equal(run_chain(units, range(5), x), expected)
    assert model.races == []
    assert all(
        t.data_ptr() == v.data_ptr()
        for u in engine.order
        for (*_, t), v in zip(u.tensors(), u.slab_views, strict=True)
    )


def test_the_wan_model_under_late_copies_and_late_compute(cuda_model):
    """The synthetic WAN model (VACE blocks with two contexts, the text embedding swapped) end to end."""
    net = sm.build_model("tiny", "vace", num_layers=4)
    inputs = sm.example_inputs(net, tokens=16, text_tokens=8, vace_contexts=2)
    with torch.no_grad():
        reference = net(**inputs)
    model = cuda_model("late", "late")
    choice = wu.select_wan_units(net, 3, offload_txt_emb=True)
    engine = bm.BlockSwapEngine(choice.units, choice.swap, "cpu", prefetch_blocks=2, stream_api=model)
    with torch.no_grad(), model:
        for _ in range(2):
            with engine.attached():
                assert torch.equal(net(**inputs), reference)
    assert model.races == []


# -- a host that casts weights on its own offload streams (ComfyUI 0.3.76+ async offload) ----------------


class ComfyStyleCasts:
    """ComfyUI's offload streams as its `get_offload_stream` hands them out: the oldest of two is made to wait
    for the compute stream, the next one is returned (so it has not waited for anything recent), the weight is
    cast on it, and the compute stream waits for that stream before using the copy."""

    def __init__(self, model: StreamModel):
        self.model = model
        self.streams: list = []
        self.turn = 0

    def all(self):
        if not self.streams:
            self.streams = [self.model.Stream(priority=0) for _ in range(2)]
        return self.streams

    def next(self):
        streams = self.all()
        streams[self.turn].wait_stream(self.model.current_stream())
        self.turn = (self.turn + 1) % len(streams)
        return streams[self.turn]

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        stream = self.next()
        with self.model.stream(stream):
            out = torch.empty_like(t)
            out.copy_(t)
        self.model.current_stream().wait_stream(stream)
        return out


class CastingLinear(nn.Linear):
    casts: ComfyStyleCasts | None = None

    def forward(self, x):
        return F.linear(x, self.casts.cast(self.weight), self.casts.cast(self.bias))


@pytest.mark.parametrize("copies", ["late", "early"])
def test_a_hosts_offload_streams_read_slots_only_after_their_copy(cuda_model, copies):
    units = chain(layer=CastingLinear)
    x = torch.randn(3, 16)
    model = cuda_model(copies, "late", side="early")  # the host's casts run as soon as nothing blocks them
    casts = CastingLinear.casts = ComfyStyleCasts(model)
    with torch.no_grad(), model:
        expected = run_chain(units, range(5), x)
        engine = streamed_engine(units, model, 1, reader_streams=casts.all)
        for _ in range(2):
            with engine.attached():
                assert torch.equal(run_chain(units, range(5), x), expected)
    assert model.races == []
    assert not ({"stream0", "stream1"} & copies_on(model) - {s.name for s in casts.streams})


# -- issue 20, item 4: fresh slots are written only after the compute stream is done with that memory ----


def test_the_copy_stream_waits_for_the_compute_stream_before_its_first_copy_of_a_run(cuda_model):
    units = chain()
    model = cuda_model()
    engine = streamed_engine(units, model, 1)
    starts = []
    with torch.no_grad(), model:
        for _ in range(2):
            starts.append(len(model.log))
            with engine.attached():
                run_chain(units, range(5), torch.randn(2, 16))
    copy_stream = model.created[0].name
    for start, end in zip(starts, [*starts[1:], len(model.log)], strict=True):
        run = model.log[start:end]
        first_copy = run.index(("copy", copy_stream))
        assert ("wait_stream", copy_stream, "compute") in run[:first_copy], run[: first_copy + 1]
    assert model.races == []


# -- issue 20, item 5: one copy stream per engine, never one of the host's ------------------------------


def test_forty_runs_use_one_copy_stream_that_is_none_of_the_hosts(cuda_model):
    units = chain()
    x = torch.randn(2, 16)
    # torch's pool: a few streams per priority, handed out in turn. The host has two low-priority ones, and
    # two high-priority ones as well (another pack), which the pool would hand the engine next.
    model = cuda_model(pool_size=4)
    high = [model.Stream(priority=-1) for _ in range(4)]
    host = [model.Stream(priority=0), model.Stream(priority=0), *high[:2]]
    engine = streamed_engine(units, model, 1, reader_streams=lambda: host)
    used = set()
    with torch.no_grad(), model:
        for _ in range(40):
            with engine.attached():
                run_chain(units, range(5), x)
                used.add(engine._run.transport.copy_stream)
    assert used == {high[2]}
    assert model.races == []


# -- issue 20, item 10: the host waits for the copy stream before unpinning a slab -----------------------


class CheckingCudart:
    """cudaHostRegister/Unregister that report to the stream model: unpinning memory a copy may still read is
    a race."""

    def __init__(self, model: StreamModel):
        self.model = model
        self.registered: dict[int, int] = {}

    def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 (CUDA's name)
        self.registered[ptr] = size
        return 0

    def cudaHostUnregister(self, ptr):  # noqa: N802
        self.model.check_host_access(ptr, "unpin a slab")
        self.registered.pop(ptr)
        return 0


@pytest.mark.parametrize("end", ["release", "forget_slabs", "set_swapped", "garbage_collected"])
def test_slabs_are_unpinned_only_after_the_copies_reading_them(cuda_model, monkeypatch, end):
    model = cuda_model("late", "late")
    runtime = CheckingCudart(model)
    monkeypatch.setattr(hm, "_cuda_runtime", lambda: runtime)
    units = chain()
    engine = streamed_engine(units, model, 2, use_non_blocking=True)
    with torch.no_grad(), model:
        with engine.attached():
            run_chain(units, range(5), torch.randn(2, 16))
        assert len(runtime.registered) == 5 and model.pending(model.created[0]) > 0  # last prefetch queued
        if end == "set_swapped":
            engine.set_swapped([])
        elif end == "garbage_collected":
            del engine
            gc.collect()
        else:
            getattr(engine, end)()
    assert runtime.registered == {}
    assert model.races == []


# -- issue 20, item 9: CUDA graph capture is refused --------------------------------------------------------


def test_a_run_inside_a_cuda_graph_capture_is_refused_naming_the_setting(cuda_model):
    units = chain()
    x = torch.randn(2, 16)
    model = cuda_model()
    engine = streamed_engine(units, model, 1)
    before = [t.data_ptr() for _, m in units for t in m.parameters()]
    with torch.no_grad(), model:
        model.capturing = True
        with pytest.raises(
            RuntimeError, match=r"CUDA graph capture.*mode='reduce-overhead'.*default torch\.compile mode"
        ):
            engine.attach()
        model.capturing = False
        with engine.attached():  # capture starting after the run began (a graph around the forward)
            model.capturing = True
            with pytest.raises(RuntimeError, match="CUDA graph capture"):
                run_chain(units, range(5), x)
            model.capturing = False
    assert not engine.is_attached
    engine.park()
    assert [t.data_ptr() for _, m in units for t in m.parameters()] != before  # back in the slabs
    assert all(not m._forward_pre_hooks for _, m in units)
