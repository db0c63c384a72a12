"""A CPU model of the CUDA stream API (the part of torch.cuda the engine and ComfyUI's casts use), in which
work issued on a stream really runs late, and every access that is not ordered after the accesses it
conflicts with is reported as a race.

    model = StreamModel(copies="late", compute="late")
    with model:                       # intercepts tensor ops (a TorchDispatchMode)
        engine = BlockSwapEngine(..., stream_api=model)
        ...
    assert model.races == []

What it models:
- Streams and events as torch.cuda has them: `Stream(device=, priority=)`, `wait_event`, `wait_stream`,
  `record_event`, `query`, `synchronize`; `Event(enable_timing=)`, `record`, `wait`, `query`, `synchronize`,
  `elapsed_time`; `current_stream`, the `stream(s)` context, `synchronize()`, `is_current_stream_capturing()`.
  Waiting on an event that was never recorded is a no-op, as in CUDA.
- The compute stream is the default stream: tensor ops issued outside a `stream(s)` context run eagerly on
  the CPU (the module forward), but only after the copies the compute stream waited for have landed
  (those are forced then, never earlier). Its ops complete *logically* late: "late" keeps them pending until
  something waits on them (an event another stream waits for, a host synchronize).
- Inside `stream(s)` for another stream only copies are allowed (`Tensor.copy_`); they are queued on that
  stream and run when something forces them ("late"), as soon as nothing blocks them ("early"), or at
  seeded random points ("random"). The destination is filled with 0xFF bytes (NaN for floats) when the
  copy is issued, so a read before the copy ran computes garbage.
- Happens-before checking with vector clocks, independent of the schedule: every op on a tracked buffer (a
  buffer a side stream touched, or slot memory from `allocate`) must be ordered after every earlier
  conflicting op of another stream (read after write, write after read or write), through stream order,
  event waits, or a host synchronize. Anything else is appended to `races`.
- A caching allocator for the engine's slot memory (`allocate`, installed as block_manager._device_buffer):
  memory a run frees goes back to a pool and the next run gets it again, as torch's allocator does; the
  compute stream owns it from the allocation on (an allocation is a compute-stream write), so other streams
  must be ordered after it, and the compute stream must be ordered after what other streams still do to it.
- Host accesses (`check_host_access`, e.g. unpinning a slab): every stream op on that memory must be
  known complete to the host (a synchronize that covered it).
- Host writes (`host_write`, a reader thread filling a staging buffer): the same, and the write is an op of
  a "host" pseudo-stream, so a later stream op on that memory must be issued after the write finished (a
  copy issued before the buffer was filled is a race too).
- Threads: the model is locked (one lock for every call into it); tensor ops on a thread other than the one
  that entered the model are not intercepted (dispatch modes are per thread), which is why host writes go
  through `host_write`. Waits and synchronizes from any thread are the host's.
"""

from __future__ import annotations

import contextlib
import functools
import random
import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose tensor arguments give only metadata (shape, dtype, device): no data is read.
_NO_DATA = {
    aten.empty_like.default,
    aten.empty.memory_format,
    aten.empty_strided.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
    aten.set_.source_Storage_storage_offset,
    aten.set_.source_Tensor,
    aten.lift_fresh.default,
    aten.detach.default,
}


def _locked(method):
    """Run the method under the model's lock (a reader thread synchronizes events while the run's thread
    issues work)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with getattr(self, "model", self).lock:
            return method(self, *args, **kwargs)

    return locked


class _Op:
    __slots__ = ("kind", "fn", "target", "target_pos", "desc")

    def __init__(self, kind, desc, fn=None, target=None, target_pos=0):
        self.kind, self.desc, self.fn, self.target, self.target_pos = kind, desc, fn, target, target_pos


class FakeStream:
    def __init__(self, model: StreamModel, name: str, speed: str, priority: int = 0):
        self.model, self.name, self.speed, self.priority = model, name, speed, priority
        self.ops: list[_Op] = []
        self.done = 0  # ops executed
        self.resolved = 0  # compute stream: ops whose waits were forced for eager data
        self.clock: dict[FakeStream, int] = {}
        self._running = False

    def __repr__(self):
        return f"<FakeStream {self.name}>"

    @property
    def pos(self) -> int:
        return len(self.ops)

    # -- torch.cuda.Stream API ---------------------------------------------------------------------------

    @_locked
    def wait_event(self, event: FakeEvent) -> None:
        self.model.log.append(("wait_event", self.name, event.stream.name if event.stream else None))
        if event.stream is None:
            return  # never recorded: CUDA treats the wait as satisfied
        self._append(
            _Op(
                "wait", f"wait for {event.stream.name}@{event.pos}", target=event.stream, target_pos=event.pos
            )
        )
        _merge(self.clock, event.clock)
        self.model._pump()

    @_locked
    def wait_stream(self, other: FakeStream) -> None:
        self.model.log.append(("wait_stream", self.name, other.name))
        event = FakeEvent(self.model)
        event._record(other)
        self.wait_event(event)

    @_locked
    def record_event(self, event: FakeEvent | None = None) -> FakeEvent:
        event = event or FakeEvent(self.model)
        event.record(self)
        return event

    @_locked
    def query(self) -> bool:
        return self.done >= self.pos

    @_locked
    def synchronize(self) -> None:
        self.model.log.append(("synchronize", self.name))
        self.run_to(self.pos)
        self.model._host_saw(self, self.pos, self.clock)

    # -- the model ---------------------------------------------------------------------------------------

    def _append(self, op: _Op) -> int:
        _merge(self.clock, self.model.host_clock)  # what the host knows complete precedes new work
        self.ops.append(op)
        self.clock[self] = self.pos
        return self.pos

    def run_to(self, n: int) -> None:
        """Execute this stream's ops up to position n, forcing whatever they wait for first."""
        if self.done >= n:
            return
        if self._running:
            raise AssertionError(f"stream model deadlock: {self.name} waits for itself")
        self._running = True
        try:
            while self.done < n:
                self._execute(self.ops[self.done], force=True)
        finally:
            self._running = False

    def advance(self, limit: int | None = None) -> bool:
        """Execute ops that nothing blocks (no forcing). True if any ran."""
        ran = 0
        while self.done < self.pos and (limit is None or ran < limit):
            op = self.ops[self.done]
            if op.kind == "wait" and op.target.done < op.target_pos:
                break
            self._execute(op, force=False)
            ran += 1
        return ran > 0

    def _execute(self, op: _Op, force: bool) -> None:
        if op.kind == "wait" and force:
            op.target.run_to(op.target_pos)
        if op.fn is not None:
            with self.model._passthrough():
                op.fn()
        self.done += 1

    def _resolve_waits(self) -> None:
        """Eager work on this stream is about to run: force everything it waits for."""
        while self.resolved < self.pos:
            op = self.ops[self.resolved]
            if op.kind == "wait":
                op.target.run_to(op.target_pos)
            self.resolved += 1


class FakeEvent:
    def __init__(self, model: StreamModel, enable_timing: bool = False, **_):
        self.model, self.enable_timing = model, enable_timing
        self.stream: FakeStream | None = None
        self.pos = 0
        self.clock: dict[FakeStream, int] = {}

    def _record(self, stream: FakeStream) -> None:
        pos = stream._append(_Op("record", "record"))
        self.stream, self.pos, self.clock = stream, pos, dict(stream.clock)

    @_locked
    def record(self, stream: FakeStream | None = None) -> None:
        stream = stream or self.model.current
        self.model.log.append(("record", stream.name))
        self._record(stream)
        self.model._pump()

    @_locked
    def wait(self, stream: FakeStream | None = None) -> None:
        (stream or self.model.current).wait_event(self)

    @_locked
    def query(self) -> bool:
        return self.stream is None or self.stream.done >= self.pos

    @_locked
    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.run_to(self.pos)
            self.model._host_saw(self.stream, self.pos, self.clock)

    @_locked
    def elapsed_time(self, end: FakeEvent) -> float:
        if not (self.enable_timing and end.enable_timing):
            raise RuntimeError("elapsed_time needs two events made with enable_timing=True")
        if not (self.query() and end.query()):
            raise RuntimeError("elapsed_time on an event that has not completed (CUDA: cudaErrorNotReady)")
        return 1.0


class _BufferState:
    """The last position of each stream's read and write of one buffer (storage)."""

    __slots__ = ("last",)

    def __init__(self):
        self.last: dict[FakeStream, list[int]] = {}


class StreamModel:
    """See the module docstring. How fast the engine's copy stream (high priority), the compute stream and
    other streams run: "late", "early" or "random" (seeded)."""

    def __init__(
        self,
        copies: str = "late",
        compute: str = "late",
        side: str | None = None,
        seed: int = 0,
        pool_size: int | None = None,
    ):
        self.copies, self.side = copies, side or copies
        # torch hands out streams from a fixed pool per priority, in turn (32 each); None: a new one each time.
        self.pool_size = pool_size
        self._stream_pool: dict[int, list[FakeStream]] = {}
        self._next_in_pool: dict[int, int] = {}
        self.rng = random.Random(seed)
        self.default = FakeStream(self, "compute", compute)
        self.current = self.default
        self.streams: list[FakeStream] = [self.default]
        self.created: list[FakeStream] = []
        self.host_clock: dict[FakeStream, int] = {}
        self.races: list[str] = []
        self.log: list[tuple] = []
        self.capturing = False
        self.lock = threading.RLock()
        # The host's writes (host_write) as ops of a stream of their own: never run, never waited for.
        self.host = FakeStream(self, "host writes", "late")
        self._buffers: dict[int, _BufferState] = {}
        self._pool: dict[int, list[torch.Tensor]] = {}
        self._passing = 0
        self._mode = _Dispatch(self)

    # -- torch.cuda API ---------------------------------------------------------------------------------

    @_locked
    def Stream(self, device=None, priority: int = 0) -> FakeStream:  # noqa: N802 (torch.cuda's name)
        if self.pool_size is not None:
            pool = self._stream_pool.setdefault(priority, [])
            turn = self._next_in_pool.get(priority, 0)
            self._next_in_pool[priority] = (turn + 1) % self.pool_size
            if turn < len(pool):
                return pool[turn]
            pool.append(self._new_stream(priority))
            return pool[-1]
        return self._new_stream(priority)

    def _new_stream(self, priority: int) -> FakeStream:
        # High priority: the engine's copy stream; others (ComfyUI's offload streams) are "side" streams.
        speed = self.copies if priority < 0 else self.side
        stream = FakeStream(self, f"stream{len(self.created)}", speed, priority)
        self.created.append(stream)
        self.streams.append(stream)
        return stream

    @_locked
    def Event(self, enable_timing: bool = False, **kwargs) -> FakeEvent:  # noqa: N802
        return FakeEvent(self, enable_timing)

    def current_stream(self, device=None) -> FakeStream:
        return self.current

    @contextlib.contextmanager
    def stream(self, stream: FakeStream | None):
        if stream is None:
            yield
            return
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    @_locked
    def synchronize(self, device=None) -> None:
        self.log.append(("synchronize", "all"))
        for stream in self.streams:
            stream.run_to(stream.pos)
        for stream in self.streams:
            self._host_saw(stream, stream.pos, stream.clock)

    def is_current_stream_capturing(self) -> bool:
        return self.capturing

    def max_memory_allocated(self, device=None) -> int:
        return 0

    # -- use --------------------------------------------------------------------------------------------

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    @_locked
    def allocate(self, nbytes: int, device=None) -> torch.Tensor:
        """Slot memory from a caching allocator: the buffer a previous run freed, if any."""
        free = self._pool.setdefault(nbytes, [])
        root = free.pop() if free else torch.empty(nbytes, dtype=torch.uint8)
        compute = self.default
        compute._resolve_waits()
        self._check(
            compute, [], [root], f"allocate {nbytes} B of slot memory on the compute stream", track=True
        )
        with self._passthrough():
            root.fill_(0xFF)  # fresh memory holds anything
        handed_out = root[:]
        weakref.finalize(handed_out, free.append, root)
        self._pump()
        return handed_out

    @_locked
    def check_host_access(self, data_ptr: int, what: str) -> None:
        """The host touches memory at data_ptr now (unpinning it, writing it): every stream op on it must be
        known complete to the host."""
        state = self._buffers.get(data_ptr)
        if state is None:
            return
        for stream, (read, write) in state.last.items():
            if max(read, write) > self.host_clock.get(stream, 0):
                self.races.append(
                    f"host: {what} while {stream.name} may still access it (op {max(read, write)}, host knows "
                    f"{self.host_clock.get(stream, 0)} done)"
                )

    @_locked
    def host_write(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """The host writes dst (from src) now, on any thread: every stream op on dst's memory must be known
        complete to the host, and stream ops issued later are ordered after this write."""
        stream = self.host
        self._check(stream, [], [dst], f"write {dst.untyped_storage().data_ptr():#x} on the host", track=True)
        with self._passthrough():
            dst.copy_(src)
        self._host_saw(stream, stream.pos, stream.clock)

    @_locked
    def pending(self, stream: FakeStream) -> int:
        return stream.pos - stream.done

    # -- internals --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _passthrough(self):
        self._passing += 1
        try:
            yield
        finally:
            self._passing -= 1

    def _host_saw(self, stream: FakeStream, pos: int, clock: dict) -> None:
        _merge(self.host_clock, clock)
        self.host_clock[stream] = max(self.host_clock.get(stream, 0), pos)

    def _state(self, t: torch.Tensor, track: bool) -> _BufferState | None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if storage.nbytes() == 0:
            return None
        state = self._buffers.get(key)
        if state is None and track:
            state = self._buffers[key] = _BufferState()
            weakref.finalize(storage, self._buffers.pop, key, None)
        return state

    def _check(self, stream: FakeStream, reads, writes, desc: str, fn=None, track: bool = False) -> None:
        """Issue an op on `stream` that reads/writes these tensors; report what it is not ordered after.

        Side-stream ops and allocations start tracking the memory they touch; eager compute ops are checked
        only on memory already tracked."""
        track = track or stream is not self.default
        states = [(self._state(t, track), False) for t in reads] + [
            (self._state(t, track), True) for t in writes
        ]
        states = [(s, w) for s, w in states if s is not None]
        if not states and fn is None:
            return
        pos = stream._append(_Op("access", desc, fn=fn))
        clock = stream.clock
        for state, is_write in states:
            for other, (read, write) in state.last.items():
                if other is stream:
                    continue
                last = max(read, write) if is_write else write
                if last > clock.get(other, 0):
                    kind = "write" if is_write else "read"
                    self.races.append(
                        f"{stream.name}: {desc} ({kind}) is not ordered after {other.name}'s op {last} on that "
                        f"memory (ordered after only {clock.get(other, 0)} of its ops)"
                    )
            entry = state.last.setdefault(stream, [0, 0])
            entry[1 if is_write else 0] = pos

    def _pump(self) -> None:
        progress = True
        while progress:
            progress = False
            for stream in self.streams:
                if stream.speed == "early":
                    progress |= stream.advance()
                elif stream.speed == "random" and self.rng.random() < 0.5:
                    progress |= stream.advance(self.rng.randint(1, 3))

    def _issue_eager(self, func, args, kwargs, reads, writes):
        compute = self.default
        compute._resolve_waits()
        out = func(*args, **kwargs)
        self._check(compute, reads, writes, str(func))
        compute.resolved = compute.pos
        self._pump()
        return out

    def _issue_deferred(self, stream, func, args, kwargs, reads, writes):
        if func is not aten.copy_.default:
            raise NotImplementedError(f"the stream model runs only copies on {stream.name} (got {func})")
        dst = args[0]
        with self._passthrough():
            if dst.is_contiguous():
                dst.view(torch.uint8).fill_(0xFF)
            elif dst.is_floating_point():
                dst.fill_(float("nan"))
        self._check(
            stream,
            reads,
            writes,
            f"copy into {dst.untyped_storage().data_ptr():#x}",
            lambda: func(*args, **kwargs),
        )
        self.log.append(("copy", stream.name))
        self._pump()
        return dst


class _Dispatch(TorchDispatchMode):
    def __init__(self, model: StreamModel):
        super().__init__()
        self.model = model

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        model = self.model
        with model.lock:
            if model._passing or func in _NO_DATA or func.is_view:
                return func(*args, **kwargs)
            reads, writes = _accesses(func, args, kwargs)
            if model.current is model.default:
                return model._issue_eager(func, args, kwargs, reads, writes)
            return model._issue_deferred(model.current, func, args, kwargs, reads, writes)


def _accesses(func, args, kwargs):
    reads, writes = [], []
    for i, arg in enumerate(func._schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if isinstance(value, torch.Tensor):
            tensors = [value]
        elif isinstance(value, (list, tuple)):
            tensors = [v for v in value if isinstance(v, torch.Tensor)]
        else:
            continue
        written = arg.alias_info is not None and arg.alias_info.is_write
        (writes if written else reads).extend(tensors)
    return reads, writes


def _merge(into: dict, other: dict) -> None:
    for key, value in other.items():
        if into.get(key, 0) < value:
            into[key] = value
