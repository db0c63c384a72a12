"""Per-block timers for the benchmark: compute time per block and time spent moving weights.

One accumulator with two clocks: CUDA events on a stream (GPU work is asynchronous, so host time
would measure the launch, not the work) and `perf_counter` on a CPU, where every copy and every block
runs synchronously on the calling thread. The CUDA clock reads its events once, at the end of a
run, so timing never makes the host wait mid-run. No ComfyUI imports.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


class CpuClock:
    def mark(self, stream=None) -> float:
        return time.perf_counter()

    def elapsed_ms(self, start, end) -> float:
        return (end - start) * 1e3


class CudaClock:
    def __init__(self, device: torch.device):
        self.device = device

    def mark(self, stream=None):
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return event

    def elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end)

    def settle(self) -> None:
        torch.cuda.synchronize(self.device)


def clock_for(device: torch.device):
    return CudaClock(device) if device.type == "cuda" else CpuClock()


class Spans:
    """Start/end marks of timed spans; totals are read (once) after the run."""

    def __init__(self, clock):
        self.clock = clock
        self.pairs: list[tuple[object, object]] = []
        self._open: dict[int, object] = {}

    def start(self, key: int = 0, stream=None) -> None:
        self._open[key] = self.clock.mark(stream)

    def stop(self, key: int = 0, stream=None) -> None:
        start = self._open.pop(key, None)
        if start is not None:
            self.pairs.append((start, self.clock.mark(stream)))

    def reset(self) -> None:
        self.pairs.clear()
        self._open.clear()

    @property
    def count(self) -> int:
        return len(self.pairs)

    def total_ms(self) -> float:
        if self.pairs and hasattr(self.clock, "settle"):
            self.clock.settle()
        return sum(self.clock.elapsed_ms(s, e) for s, e in self.pairs)


class BlockTimer:
    """Times each block's forward with hooks around it.

    Installed after a BlockSwap run is attached, its pre-hook runs after the engine's (which waits for,
    or on a CPU performs, the block's copy) and its post-hook is put first (before the engine starts
    the next prefetch), so for swapped blocks the span is the block's compute alone.
    """

    def __init__(self, blocks, clock):
        self.spans = Spans(clock)
        self.handles = []
        for index, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre(index)))
            self.handles.append(block.register_forward_hook(self._post(index), prepend=True))

    def _pre(self, index: int) -> Callable:
        def hook(module, args):
            self.spans.start(index)

        return hook

    def _post(self, index: int) -> Callable:
        def hook(module, args, output):
            self.spans.stop(index)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class CastTimer:
    """Wraps weight-cast functions so every call is a timed span; `restore()` puts them back.

    Used on ComfyUI's (and the GGUF layers') weight-cast functions: the time layers spend getting their
    weights to the compute device (copy, dtype conversion, for GGUF the dequantization) inside a
    block's forward, and the bytes of the weights they cast. On a GPU the marks go on the compute
    stream: what compute spends on casts (copies ComfyUI issues on its offload streams overlap and
    show up only when compute has to wait for them).
    """

    def __init__(self, clock):
        self.spans = Spans(clock)
        self.bytes = 0
        self._depth = 0  # a cast calling another wrapped cast counts once, in the outer span
        self._wrapped: list[tuple[object, str, object]] = []

    def wrap(self, owner, name: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        def timed(layer, *args, **kwargs):
            self._depth += 1
            outer = self._depth == 1
            if outer:
                self.bytes += sum(raw_nbytes(getattr(layer, a, None)) for a in ("weight", "bias"))
                self.spans.start(0)
            try:
                return original(layer, *args, **kwargs)
            finally:
                self._depth -= 1
                if outer:
                    self.spans.stop(0)

        self._wrapped.append((owner, name, owner.__dict__.get(name, original)))
        setattr(owner, name, timed)

    def reset(self) -> None:
        self.spans.reset()
        self.bytes = 0

    def restore(self) -> None:
        for owner, name, original in reversed(self._wrapped):
            setattr(owner, name, original)
        self._wrapped = []


def raw_nbytes(t) -> int:
    """Bytes a weight occupies as stored (a quantized weight's raw bytes, not its decoded size)."""
    if not isinstance(t, torch.Tensor):
        return 0
    try:
        plain = t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t
        return plain.numel() * plain.element_size()
    except (RuntimeError, TypeError):  # wrapper subclasses (quantized tensors) without plain storage
        return t.numel() * t.element_size()


class TimedTransport:
    """The engine's CPU transport with each slab-to-slot copy timed (what CUDA events do on a GPU).

    Handed to the engine as its `transport_factory`; copies stay synchronous, as in the built-in one.
    """

    def __init__(self, base, spans: Spans):
        self.base, self.spans = base, spans

    def start_copy(self, slot, dst, src) -> None:
        self.spans.start(0)
        self.base.start_copy(slot, dst, src)
        self.spans.stop(0)

    def wait_copied(self, slot) -> None:
        self.base.wait_copied(slot)

    def mark_free(self, slot) -> None:
        self.base.mark_free(slot)

    def finish(self) -> None:
        self.base.finish()

    def stats(self):
        return self.base.stats()
