"""The block swap engine: keeps chosen units of a model in host RAM and streams them into a few
preallocated device slots just before they run.

Pure torch, no ComfyUI import: the engine serves any stack of modules that run in a known order.

Life cycle
    engine = BlockSwapEngine(units, swap=[...], compute_device=cuda, prefetch_blocks=1)
    with engine.attached():      # per run: slots, copy stream, events, hooks
        model(x)                 # as often as the run needs
    engine.release()             # end of the plan: unpins the host slabs

Host slabs (one contiguous buffer per swapped unit) are built on the first attach and live as long as
the engine, so repeated runs never re-copy weights into RAM. Between runs a swapped unit's tensors
are views into its slab; while it runs they are views into a device slot. Weights are only ever
copied host -> device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .config import check_choice, check_int
from .utils import format_bytes

log = logging.getLogger(__name__)

# Offsets of tensors inside a slab (and the identical slot layout) are rounded up to this, so every
# view starts where the CUDA caching allocator would start a fresh tensor: kernels see the same
# alignment as with the unswapped model and produce bit-identical results.
TENSOR_ALIGNMENT = 256

# Page-locked memory is not swappable; pinning more than this share of physical RAM starves the OS
# (Windows refuses beyond about half of RAM anyway).
DEFAULT_PINNED_RAM_SHARE = 0.45

UnitLoadedCallback = Callable[[str, nn.Module], None]


def _align(n: int, alignment: int = TENSOR_ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain torch.Tensor aliasing t's storage, whatever subclass t is.

    Quantized tensor subclasses (GGUF) override shape, .to() or copy_; the engine moves their raw
    bytes, so it looks at the storage through a plain alias.
    """
    with torch._C.DisableTorchFunctionSubclass():
        alias = torch.empty(0, dtype=t.dtype, device=t.device)
        return alias.set_(t.untyped_storage(), t.storage_offset(), torch.Tensor.size(t), t.stride())


def is_wrapper_tensor(t: torch.Tensor) -> bool:
    """A wrapper tensor subclass (comfy_kitchen's QuantizedTensor for fp8_scaled / mixed-precision
    weights): it reports a logical dtype and shape while its bytes live in inner tensors that
    ``__tensor_flatten__`` names. Its own "storage" is not its data: never alias or copy it directly."""
    return is_traceable_wrapper_subclass(t)


def inner_tensors(t: torch.Tensor) -> list[tuple[str | None, torch.Tensor]]:
    """The plain tensors that hold t's bytes: (None, t) for an ordinary tensor, one entry per inner
    tensor of a wrapper subclass."""
    if not is_wrapper_tensor(t):
        return [(None, t)]
    names, _ctx = t.__tensor_flatten__()
    return [(name, getattr(t, name)) for name in names]


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes t really occupies (a wrapper's inner tensors, not its logical dtype and shape)."""
    return sum(torch.Tensor.numel(part) * part.element_size() for _, part in inner_tensors(t))


def _set_tensor(owner: nn.Module, attr: str, is_param: bool, value: torch.Tensor) -> None:
    """Point a parameter or buffer at new storage without replacing the Parameter object.

    Keeping the object keeps everything that refers to it valid (optimizers don't matter here, but
    ComfyUI's accounting, LoRA backups and tensor-subclass attributes such as a GGUF quant type do).
    A wrapper subclass has no storage of its own to re-point: the wrapper built around the new inner
    views takes the old one's place.
    """
    if not is_param:
        owner._buffers[attr] = value
    elif is_wrapper_tensor(value):
        owner._parameters[attr] = value
    else:
        owner._parameters[attr].data = value


# ----------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ByteRange:
    """One plain tensor's bytes inside a slab (and inside any device slot)."""

    name: str | None  # the inner tensor's attribute in a wrapper subclass; None for a plain tensor
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size
    stride: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Where one parameter or buffer of a unit lives inside its slab (and inside any device slot).

    A plain tensor is one byte range; a wrapper subclass is one range per inner tensor, plus what its
    ``__tensor_unflatten__`` needs to build the same wrapper around views of them.
    """

    owner: nn.Module
    attr: str
    is_param: bool
    ranges: tuple[ByteRange, ...]
    wrapper: tuple[type, object, torch.Size, tuple[int, ...]] | None = None  # (class, ctx, size, stride)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.ranges)


@dataclasses.dataclass(eq=False)
class SwapUnit:
    """One module the engine manages: a transformer block, a VACE block, an embedding."""

    name: str
    module: nn.Module
    swapped: bool
    layout: list[TensorSpec] = dataclasses.field(default_factory=list)
    nbytes: int = 0  # slab size including alignment padding
    slab: torch.Tensor | None = None  # uint8 host buffer, built on first attach
    slab_views: list[torch.Tensor] = dataclasses.field(default_factory=list)
    slab_pinned: bool = False

    def tensors(self) -> Iterator[tuple[nn.Module, str, bool, torch.Tensor]]:
        """Every parameter and buffer of the unit, once each, with its owning module."""
        for module in self.module.modules():
            for attr, p in module._parameters.items():
                if p is not None:
                    yield module, attr, True, p
            for attr, b in module._buffers.items():
                if b is not None:
                    yield module, attr, False, b

    def param_bytes(self) -> int:
        return sum(tensor_nbytes(t) for *_, t in self.tensors())


@dataclasses.dataclass
class SwapCounters:
    """Always kept (cheap integers): tests use them to prove the engine really ran."""

    copies: int = 0
    bytes_copied: int = 0
    unit_runs: int = 0  # forwards of swapped units
    passes: int = 0  # forwards of the first swapped unit in execution order
    misses: int = 0  # unit not in a slot when it started: copied on demand (no overlap)
    slot_hits: int = 0  # unit still in its slot from an earlier forward: no copy needed
    slabs_built: int = 0  # host slabs made (each swapped byte is copied into RAM once per build)
    slab_bytes_built: int = 0
    slab_tensors_from_sources: int = 0  # tensors copied into a slab straight from a given source (a file)
    slab_bytes_from_sources: int = 0  # bytes read from those sources (the source's dtype)

    def reset(self) -> None:
        """Zero the per-run counters (slab builds count over the plan's life and stay)."""
        for field in dataclasses.fields(self):
            if not field.name.startswith("slab"):
                setattr(self, field.name, 0)


@dataclasses.dataclass
class RunStats:
    """Measured at the end of a run when debug telemetry is on (CUDA only)."""

    copy_ms: float = 0.0
    stall_ms: float = 0.0
    compute_ms: float = 0.0  # swapped units' own compute, from their slot being ready to being released
    copies: int = 0
    computes: int = 0
    peak_allocated: int | None = None

    def copy_gbps(self, bytes_copied: int) -> float | None:
        return bytes_copied / (self.copy_ms * 1e6) if self.copy_ms > 0 else None


# ----------------------------------------------------------------------------------------------
# Transports: how bytes get from a slab into a slot, and how compute waits for them
# ----------------------------------------------------------------------------------------------


class SyncTransport:
    """Copies immediately on the calling thread: CPU compute devices and tests.

    Every transport implements the same four calls; the engine's correctness rests on calling them in
    the right places, which the fake transports in the tests check.
    """

    def start_copy(self, slot: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Fill slot `slot` (dst) from src once compute has finished with the slot's previous contents.

        Copies into one slot land in the order they were issued (one copy stream); copies into different
        slots may land in any order."""
        dst.copy_(src)

    def wait_copied(self, slot: int) -> None:
        """Make the compute that follows wait until the latest copy into `slot` has landed."""

    def mark_free(self, slot: int) -> None:
        """Compute that reads `slot` has been issued; a later copy into it must wait for that compute."""

    def finish(self) -> None:
        """Wait for every copy issued so far (end of run: slots are about to be released)."""

    def stats(self) -> RunStats:
        return RunStats()


class CudaStreamTransport:
    """Copies on a dedicated CUDA stream; compute waits on events, never on the host.

    cuda: the stream API (torch.cuda); the core tests pass a CPU model of it whose work really runs late,
    so every wait below is checked on every commit.
    """

    def __init__(
        self,
        device: torch.device,
        num_slots: int,
        non_blocking: bool,
        timing: bool,
        reader_streams: Callable[[], Iterable[torch.cuda.Stream]] | None = None,
        copy_stream: torch.cuda.Stream | None = None,
        cuda=torch.cuda,
    ):
        self.device = device
        self.cuda = cuda
        # Streams other than the compute stream that may read a slot (a host casting weights on its own
        # offload streams): each waits for a slot's copy as well.
        self.reader_streams = reader_streams
        self.non_blocking = non_blocking
        self.copy_stream = copy_stream if copy_stream is not None else cuda.Stream(device=device)
        # The slots were just allocated on the compute stream: with the caching allocator (or
        # cudaMallocAsync) their memory is only free in compute-stream order, and compute still in flight
        # may read it (a previous run's slots, activations). No copy may write it before that compute.
        self.copy_stream.wait_stream(cuda.current_stream(device))
        self.ready = [cuda.Event() for _ in range(num_slots)]
        self.free = [cuda.Event() for _ in range(num_slots)]
        self.timing = timing
        # (start, end) event pairs, read once at the end of the run, never mid-run.
        self._copy_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._stall_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._compute_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._compute_start: dict[int, torch.cuda.Event] = {}

    def start_copy(self, slot: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        stream = self.copy_stream
        stream.wait_event(self.free[slot])
        with self.cuda.stream(stream):
            if self.timing:
                start, end = self.cuda.Event(enable_timing=True), self.cuda.Event(enable_timing=True)
                start.record(stream)
            dst.copy_(src, non_blocking=self.non_blocking)
            if self.timing:
                end.record(stream)
                self._copy_events.append((start, end))
        self.ready[slot].record(stream)

    def wait_copied(self, slot: int) -> None:
        compute = self.cuda.current_stream(self.device)
        if self.timing:
            start, end = self.cuda.Event(enable_timing=True), self.cuda.Event(enable_timing=True)
            start.record(compute)
            compute.wait_event(self.ready[slot])
            end.record(compute)
            self._stall_events.append((start, end))
            self._compute_start[slot] = end
        else:
            compute.wait_event(self.ready[slot])
        if self.reader_streams is not None:
            for stream in self.reader_streams():
                stream.wait_event(self.ready[slot])

    def mark_free(self, slot: int) -> None:
        compute = self.cuda.current_stream(self.device)
        started = self._compute_start.pop(slot, None) if self.timing else None
        if started is not None:
            end = self.cuda.Event(enable_timing=True)
            end.record(compute)
            self._compute_events.append((started, end))
        self.free[slot].record(compute)

    def finish(self) -> None:
        # A prefetch that wrapped around to the next step may still be in flight: the compute stream
        # (which will reuse the slot memory through the caching allocator) must not overtake it.
        self.cuda.current_stream(self.device).wait_stream(self.copy_stream)

    def stats(self) -> RunStats:
        stats = RunStats()
        if self._copy_events or self._stall_events:
            self.cuda.synchronize(self.device)
            stats.copy_ms = sum(s.elapsed_time(e) for s, e in self._copy_events)
            stats.stall_ms = sum(s.elapsed_time(e) for s, e in self._stall_events)
            stats.compute_ms = sum(s.elapsed_time(e) for s, e in self._compute_events)
            stats.copies, stats.computes = len(self._copy_events), len(self._compute_events)
        stats.peak_allocated = self.cuda.max_memory_allocated(self.device)
        return stats


# ----------------------------------------------------------------------------------------------
# Pinned host memory
# ----------------------------------------------------------------------------------------------


class _PinnedLedger:
    """Process-wide count of bytes this pack has page-locked, and the engines that share the budget.

    Each live engine claims its swapped bytes when it is made; an engine may pin up to its claim's share
    of the budget, so the second expert of a WAN 2.2 high/low pair is not left with pageable slabs
    because the first one took everything. A claim ends when the engine gives up its slabs or dies.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.bytes = 0
        self.claims: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()

    def share(self, engine: object, budget: int) -> int:
        total = sum(self.claims.values())
        claim = self.claims.get(engine, 0)
        return budget if total <= 0 else budget * claim // total


_PINNED = _PinnedLedger()


def pinned_bytes_in_use() -> int:
    return _PINNED.bytes


def default_pinned_budget() -> int:
    try:
        import psutil

        total = psutil.virtual_memory().total
    except Exception:  # psutil missing or unreadable: pin nothing rather than guess
        return 0
    return int(total * DEFAULT_PINNED_RAM_SHARE)


def available_ram() -> int | None:
    """Bytes of RAM the OS can give this process now without swapping (None if unknown)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


def _cuda_runtime():
    """CUDA's runtime API as torch exposes it (a seam: tests put a fake here)."""
    return torch.cuda.cudart()


def _device_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """A run's slot memory on the compute device (a seam: the CPU stream model replaces it with a caching
    allocator that hands a run the memory the previous run freed, as torch's does)."""
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def _release_after_copies(pinned: list[torch.Tensor], copy_streams: list) -> None:
    # The engine's finalizer: copies still in flight read the pinned slabs, so the host waits for them
    # before unregistering the memory.
    for stream in copy_streams:
        try:
            stream.synchronize()
        except RuntimeError:  # CUDA already torn down at interpreter exit: nothing is in flight any more
            pass
    _release_slabs(pinned)


CUDA_GRAPH_MESSAGE = (
    "[BlockSwap] Called inside a CUDA graph capture (torch.cuda.graph, or a torch.compile mode='reduce-overhead' "
    "/ cudagraphs backend that records BlockSwap's hooks): a graph replays the weight addresses and copies it "
    "recorded, while BlockSwap fills its GPU slots anew every step, so the replays would be silently wrong. "
    "Use the default torch.compile mode (or another without CUDA graphs), or no block swapping."
)


def _discard_cuda_error() -> None:
    """Clear the error a failed cudaHostRegister/Unregister leaves behind.

    The runtime keeps it as the thread's last error, and the next kernel launch would report it as its
    own failure. torch exposes no cudaGetLastError; a tiny kernel plus a synchronize surfaces the
    pending error once, which clears it (the failure itself was already seen in the return code).
    """
    try:
        torch.ones(1, device="cuda").add_(1)
        torch.cuda.synchronize()
    except RuntimeError:  # torch.AcceleratorError: the stale error, now consumed
        pass


def _pin_in_place(buffer: torch.Tensor) -> bool:
    """Page-lock exactly buffer's bytes (cudaHostRegister); False (and CUDA's error cleared) on failure.

    torch's pin_memory() goes through the caching host allocator, which rounds each block up to a
    power of two: a 670 MiB block would lock 1 GiB. Registering the plain allocation locks what we use.
    """
    nbytes = buffer.numel()
    err = _cuda_runtime().cudaHostRegister(buffer.data_ptr(), nbytes, 0)
    if int(err) != 0:
        _discard_cuda_error()
        log.debug("[BlockSwap] cudaHostRegister of %s failed (error %s)", format_bytes(nbytes), int(err))
        return False
    with _PINNED.lock:
        _PINNED.bytes += nbytes
    return True


def _unpin(buffer: torch.Tensor) -> None:
    err = _cuda_runtime().cudaHostUnregister(buffer.data_ptr())
    with _PINNED.lock:
        _PINNED.bytes -= buffer.numel()
    if int(err) != 0:
        _discard_cuda_error()
        log.warning("[BlockSwap] cudaHostUnregister failed (error %s); the slab is freed anyway", int(err))


def _release_slabs(pinned: list[torch.Tensor]) -> None:
    # Runs at release() or when the engine is garbage-collected. Holding the buffers until after the
    # unregister keeps their memory valid while it is still registered; parameters that still view
    # the slabs keep them alive afterwards as ordinary pageable memory.
    while pinned:
        _unpin(pinned.pop())


class HostMemoryError(MemoryError):
    """The host slabs of a plan would not fit in the RAM that is free: raised before any is built."""


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------


def choose_swapped_blocks(
    block_names: Sequence[str],
    blocks_to_swap: int,
    placement: str = "tail",
    input_name: str = "blocks_to_swap",
) -> list[str]:
    """Which of `block_names` to swap.

    "tail": keep the first N-K on the device and swap the last K (the layout users know from
    the debug output). "spread": interleave resident blocks among swapped ones, which gives the copy
    stream the resident blocks' compute time to catch up.
    """
    n = len(block_names)
    check_int(input_name, blocks_to_swap, 0, n, scope="for this model")
    if placement == "tail":
        return list(block_names[n - blocks_to_swap :])
    if placement == "spread":
        # Evenly spaced indices, ending at the last block.
        picked = {n - 1 - (i * n) // blocks_to_swap for i in range(blocks_to_swap)}
        return [name for i, name in enumerate(block_names) if i in picked]
    raise ValueError(f"placement must be 'tail' or 'spread' (got {placement!r})")


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    """What `fewest_swapped_for_budget` chose."""

    count: int  # blocks swapped (the index into the candidates)
    swap: tuple[str, ...]
    resident_bytes: int
    slot_bytes: int
    fits: bool  # False: even the last candidate does not fit (the host must offload the rest itself)

    @property
    def device_bytes(self) -> int:
        return self.resident_bytes + self.slot_bytes


def fewest_swapped_for_budget(
    candidates: Sequence[Sequence[str]],
    unit_bytes: dict[str, int],
    total_bytes: int,
    num_slots: int,
    budget: float,
) -> BudgetPlan:
    """The first candidate swap set whose device footprint fits `budget`.

    candidates[k]: the unit names swapped when k blocks are swapped, k = 0, 1, ... (each a superset of the
    one before). Footprint: the model's bytes outside the swapped units (`total_bytes` minus theirs) plus
    `num_slots` slots of the largest swapped unit (fewer when fewer units are swapped).
    """
    if not candidates:
        raise ValueError("fewest_swapped_for_budget needs at least one candidate swap set")
    plan = None
    for count, names in enumerate(candidates):
        sizes = [unit_bytes[n] for n in names]
        slots = min(num_slots, len(sizes)) * max(sizes, default=0)
        resident = total_bytes - sum(sizes)
        plan = BudgetPlan(count, tuple(names), resident, slots, resident + slots <= budget)
        if plan.fits:
            return plan
    return plan


class _Run:
    """Everything that exists only while the engine is attached: the slot ring, hooks, transport.

    The ring: the swapped units run as one long sequence, pass after pass. Sequence number t is unit
    `order[t % n]` and uses slot `t % num_slots`; while t computes, the copies for t+1 .. t+depth are in
    flight. A unit that starts out of order (a VACE block running again for its next context, a block a
    patch skipped, a pass cut short) moves the ring to the next sequence number that is that unit: its
    slot is reused if it already holds the unit, else reloaded.
    """

    def __init__(self, slots: list[torch.Tensor], transport, num_units: int):
        self.slots = slots
        self.transport = transport
        self.loaded = [-1] * len(slots)  # position (in execution order) of the unit each slot holds
        self.fresh = [False] * len(slots)  # filled by a copy, not yet seen by the unit-loaded callback
        self.next_seq = 0
        self.bound_position = -1  # the unit inside its forward now (bound to a slot), -1 for none
        self.bound_slot = -1
        # Views of each unit's tensors into each slot, made on first use: the hooks allocate nothing after.
        self.views: list[list[list[torch.Tensor] | None]] = [[None] * len(slots) for _ in range(num_units)]
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []


class _StandalonePlacement:
    """The engine alone decides where weights live (plain torch use, the benchmark).

    A run moves the resident units to the compute device and moves them back after it; swapped tensors
    go back to the device they were on before the engine first touched them.
    """

    def __init__(self):
        self.home: dict[SwapUnit, torch.device] = {}
        self.moved: list[tuple[nn.Module, str, bool, torch.Tensor]] = []

    def remember_home(self, unit: SwapUnit, device: torch.device) -> None:
        self.home.setdefault(unit, device)

    def forget(self) -> None:
        self.home.clear()

    @property
    def active(self) -> bool:
        return bool(self.moved)

    def before_run(self, engine: BlockSwapEngine) -> None:
        for unit in engine.resident_units:
            for owner, attr, is_param, t in unit.tensors():
                if t.device != engine.compute_device:
                    original = t if is_wrapper_tensor(t) else plain_tensor(t)
                    self.moved.append((owner, attr, is_param, original))
                    _set_tensor(owner, attr, is_param, original.to(engine.compute_device))

    def after_run(self, engine: BlockSwapEngine) -> None:
        for unit in engine.order:
            home = self.home.get(unit)
            if unit.slab is not None and home is not None and home != engine.offload_device:
                for spec, view in zip(unit.layout, unit.slab_views, strict=True):
                    _set_tensor(spec.owner, spec.attr, spec.is_param, view.to(home))
        for owner, attr, is_param, original in self.moved:
            _set_tensor(owner, attr, is_param, original)
        self.moved = []


class _HostPlacement:
    """A host (ComfyUI) places the resident units; between runs a swapped tensor's home is its slab."""

    active = False

    def remember_home(self, unit: SwapUnit, device: torch.device) -> None:
        pass

    def forget(self) -> None:
        pass

    def before_run(self, engine: BlockSwapEngine) -> None:
        pass

    def after_run(self, engine: BlockSwapEngine) -> None:
        pass


PLACEMENTS = ("standalone", "host")


class BlockSwapEngine:
    """Streams the swapped units of a model through `prefetch_blocks + 1` device slots.

    units: (name, module) pairs in the order they execute in one forward pass. A module that runs
        several times in a row (a VACE block with several contexts) is listed once.
    swap: names of the units to keep in host RAM; the others are resident on the compute device.
    prefetch_blocks: 0 copies a unit when it starts (no overlap); N keeps copies N units ahead.
    use_non_blocking: pinned host slabs and asynchronous copies (needed for copy/compute overlap).
    pinned_budget_bytes: most host RAM this pack may page-lock, an int or a function returning one
        (a host subtracts what it pinned itself); None: a safe share of physical RAM. Live engines share
        it in proportion to their swapped bytes.
    placement: "standalone" moves resident units to the compute device for each run (and back after)
        and returns swapped tensors to their original device; "host" leaves resident units to the
        host that placed them, and keeps swapped tensors in their slabs between runs.
    on_unit_loaded: called as fn(name, module) after a unit's bytes landed in a slot and before it
        runs, once per copy (e.g. to apply a LoRA to the slot, leaving the slab pristine).
    on_slab_built: called as fn(done, total) after each host slab is built (a progress bar).
    reader_streams: fn() -> CUDA streams besides the compute stream that read weights (a host's own
        offload streams); each is made to wait for a slot's copy too.
    transport_factory: for tests: fn(num_slots) -> transport, replacing the built-in ones.
    stream_api: the CUDA stream API the copy stream and events come from (default torch.cuda on a CUDA
        compute device, none elsewhere); the core tests pass a CPU model of it, which makes a CPU engine
        run the stream transport.
    """

    def __init__(
        self,
        units: Sequence[tuple[str, nn.Module]],
        swap: Iterable[str],
        compute_device: torch.device | str,
        offload_device: torch.device | str = "cpu",
        prefetch_blocks: int = 0,
        use_non_blocking: bool = False,
        pinned_budget_bytes: int | Callable[[], int] | None = None,
        debug: bool = False,
        placement: str = "standalone",
        on_unit_loaded: UnitLoadedCallback | None = None,
        on_slab_built: Callable[[int, int], None] | None = None,
        reader_streams: Callable[[], Iterable[torch.cuda.Stream]] | None = None,
        transport_factory: Callable[[int], object] | None = None,
        stream_api=None,
    ):
        self.units = self._validate_units(units)
        by_name = {u.name: u for u in self.units}
        swap = list(swap) if not isinstance(swap, str) else [swap]
        unknown = [s for s in swap if s not in by_name]
        if unknown:
            raise ValueError(
                f"swap names unknown unit(s) {unknown}; valid names are the {len(self.units)} units given: "
                f"{_summarize_names([u.name for u in self.units])}"
            )
        for name in swap:
            by_name[name].swapped = True
            _check_movable(by_name[name])
        check_int("prefetch_blocks", prefetch_blocks, 0)
        if isinstance(pinned_budget_bytes, int) and pinned_budget_bytes < 0:
            raise ValueError(f"pinned_budget_bytes must be >= 0 or None (got {pinned_budget_bytes})")
        check_choice("placement", placement, PLACEMENTS)

        self.compute_device = torch.device(compute_device)
        self.offload_device = torch.device(offload_device)
        self.prefetch_blocks = prefetch_blocks
        self.use_non_blocking = use_non_blocking
        self.pinned_budget_bytes = pinned_budget_bytes
        self.debug = debug
        self.placement = placement
        self._placement = _StandalonePlacement() if placement == "standalone" else _HostPlacement()
        self.on_unit_loaded = on_unit_loaded
        self.on_slab_built = on_slab_built
        self.reader_streams = reader_streams
        self.transport_factory = transport_factory
        if stream_api is None and self.compute_device.type == "cuda":
            stream_api = torch.cuda
        self._streams = stream_api
        # One copy stream for the engine's life, made at the first run (see `_copy_stream_for_runs`); the
        # finalizer holds the list, so it can wait for the stream's copies before unpinning.
        self._copy_streams: list = []

        # The swapped units in execution order; the ring keeps copies `_depth` units ahead.
        self.order: list[SwapUnit] = [u for u in self.units if u.swapped]
        self._depth = max(self.num_slots() - 1, 0)
        self.counters = SwapCounters()
        self.last_run: RunStats | None = None
        self._run: _Run | None = None
        self.time_next_run = False  # CUDA events on the next run's copies and swapped units (as in debug)
        self._pinned_slabs: list[torch.Tensor] = []
        self._described = False
        self._finalizer = weakref.finalize(
            self, _release_after_copies, self._pinned_slabs, self._copy_streams
        )
        self._claim_pinned_share()

    # -- validation ----------------------------------------------------------------------------

    @staticmethod
    def _validate_units(units) -> list[SwapUnit]:
        if isinstance(units, (str, bytes)) or not isinstance(units, Sequence):
            raise ValueError("units must be a sequence of (name, torch.nn.Module) pairs in execution order")
        result: list[SwapUnit] = []
        seen_names: set[str] = set()
        owner_of: dict[int, str] = {}
        for i, item in enumerate(units):
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise ValueError(f"units[{i}] must be a (name, module) pair (got {item!r:.80})")
            name, module = item
            if not isinstance(module, nn.Module):
                raise ValueError(
                    f"units[{i}] ({name!r}) must be a torch.nn.Module (got {type(module).__name__})"
                )
            if name in seen_names:
                raise ValueError(f"units[{i}]: the name {name!r} is used twice")
            seen_names.add(name)
            unit = SwapUnit(name=name, module=module, swapped=False)
            for *_, t in unit.tensors():
                other = owner_of.get(id(t))
                if other is not None:
                    raise ValueError(
                        f"units[{i}] ({name!r}) shares tensors with unit {other!r}: units must not "
                        "overlap (one may not contain the other)"
                    )
                owner_of[id(t)] = name
            result.append(unit)
        return result

    # -- public state --------------------------------------------------------------------------

    @property
    def is_attached(self) -> bool:
        return self._run is not None

    @property
    def swapped_units(self) -> list[SwapUnit]:
        return self.order

    @property
    def resident_units(self) -> list[SwapUnit]:
        return [u for u in self.units if not u.swapped]

    def swapped_bytes(self) -> int:
        """Parameter bytes of all swapped units (what one forward pass copies)."""
        return sum(u.param_bytes() for u in self.order)

    def resident_bytes(self) -> int:
        return sum(u.param_bytes() for u in self.resident_units)

    def num_slots(self) -> int:
        return min(self.prefetch_blocks + 1, len(self.order))

    def slot_bytes(self) -> int:
        """Device memory the slots of one run take (what a host must keep free for them)."""
        largest = max((_layout_size(u) for u in self.order), default=0)
        return self.num_slots() * largest

    def pinned_bytes(self) -> int:
        return sum(u.slab.numel() for u in self.order if u.slab is not None and u.slab_pinned)

    def describe(self) -> list[str]:
        """The plan in the words of the debug output, one line each (logged on attach in debug mode)."""
        lines = []
        groups = _group_units(self.units)
        for group in sorted(groups, key=lambda g: (g != "blocks", g)):
            members = groups[group]
            if group in {u.name for u in members}:  # a single named unit such as text_embedding
                where = "streamed from CPU RAM" if members[0].swapped else "kept on the GPU"
                lines.append(f"{group}: {where} ({format_bytes(members[0].param_bytes())})")
                continue
            resident = [u.name for u in members if not u.swapped]
            swapped = [u.name for u in members if u.swapped]
            lines.append(f"Total {group}: {len(members)}")
            lines.append(f"Keeping on GPU: {group} {_ranges(resident) or 'none'}")
            lines.append(f"Offloading to CPU: {group} {_ranges(swapped) or 'none'}")
            lines.append(f"GPU {group}: {len(resident)}")
            lines.append(f"CPU {group}: {len(swapped)}")
        lines.append(
            f"Resident {format_bytes(self.resident_bytes())} on {self.compute_device}, swapped {format_bytes(self.swapped_bytes())} "
            f"in CPU RAM, {self.num_slots()} slot(s) = {format_bytes(self.slot_bytes())}, prefetch {self.prefetch_blocks}, "
            f"non_blocking {self.use_non_blocking}"
        )
        return lines

    def slot_buffers(self) -> list[torch.Tensor]:
        """The device slot buffers of the current run ([] when detached)."""
        return list(self._run.slots) if self._run is not None else []

    # -- attach / detach -----------------------------------------------------------------------

    def attach(self) -> None:
        """Start a run: build slabs (first time only), allocate slots, install hooks. Idempotent."""
        if self._run is not None:
            log.debug("[BlockSwap] attach(): already attached, nothing to do")
            return
        self._refuse_graph_capture()  # before anything is copied: a capture would record the copies too
        try:
            self._ensure_slabs()
            self._placement.before_run(self)
            self._run = self._start_run()
            self._prime()
        except BaseException:
            self._teardown()
            raise
        if self.debug:
            if not self._described:
                self._described = True
                for line in self.describe():
                    log.info("[BlockSwap] %s", line)
            if self.compute_device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.compute_device)

    def detach(self) -> None:
        """End a run: remove hooks, release slots, put every tensor back where it belongs. Idempotent."""
        if self._run is None and not self._placement.active:
            return
        run = self._run
        self._teardown()
        if run is not None and self.debug:
            self._log_run_summary()

    @contextlib.contextmanager
    def attached(self) -> Iterator[BlockSwapEngine]:
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    def release(self) -> None:
        """End of the plan: detach and unpin the slabs. Tensors stay valid (pageable host memory)."""
        self.detach()
        self._wait_for_copies()
        _release_slabs(self._pinned_slabs)
        for unit in self.order:
            unit.slab_pinned = False

    def park(self, sources: Mapping[int, torch.Tensor] | None = None) -> None:
        """Put every swapped unit into its host slab now (built on first use), without a run.

        A host calls this at load time, so swapped units are in host RAM before anything could move
        them to the device. Cheap when the slabs are current.

        sources: id(tensor) -> where its value is to be read from when its slab is built, instead of the
            tensor itself (a loader that held back filling freshly allocated, never-touched parameters reads
            each one straight from the file into the slab). The slab keeps the tensor's dtype and shape; a
            source of another dtype is converted as ``Tensor.copy_`` converts.
        """
        self._ensure_slabs(sources or {})

    def forget_slabs(self) -> None:
        """Give up the slabs (another plan takes over the module): detach, unpin, and leave the memory
        to the tensors that view it. The next attach or park builds fresh slabs from the tensors."""
        self.release()
        for unit in self.order:
            unit.slab, unit.slab_views, unit.layout, unit.nbytes = None, [], [], 0
        self._placement.forget()
        with _PINNED.lock:
            _PINNED.claims.pop(self, None)

    def set_swapped(self, names: Iterable[str]) -> tuple[list[str], list[str]]:
        """Change which units are swapped (between runs). Returns (joined, left) unit names.

        A unit that joins gets its slab at the next park or attach; a unit that leaves gives up its slab
        (unpinned; its tensors keep the memory as ordinary RAM until the host places them).
        """
        if self.is_attached:
            raise RuntimeError("set_swapped: detach the engine first (a run is using the slots)")
        wanted = set(names)
        unknown = wanted - {u.name for u in self.units}
        if unknown:
            raise ValueError(f"set_swapped names unknown unit(s) {sorted(unknown)}")
        self._wait_for_copies()
        joined, left = [], []
        for unit in self.units:
            if (unit.name in wanted) == unit.swapped:
                continue
            if unit.name in wanted:
                _check_movable(unit)
                unit.swapped = True
                joined.append(unit.name)
                continue
            if unit.slab is not None and unit.slab_pinned:
                self._pinned_slabs.remove(unit.slab)
                _unpin(unit.slab)
            unit.slab, unit.slab_views, unit.layout, unit.nbytes, unit.slab_pinned = None, [], [], 0, False
            unit.swapped = False
            left.append(unit.name)
        self.order = [u for u in self.units if u.swapped]
        self._depth = max(self.num_slots() - 1, 0)
        self._claim_pinned_share()
        return joined, left

    def unit_bytes(self) -> dict[str, int]:
        """Each unit's slab (and slot) size, swapped or not: what a plan for a byte budget weighs."""
        return {u.name: _layout_size(u) for u in self.units}

    def adopt_slabs(self, other: BlockSwapEngine) -> int:
        """Take over `other`'s slabs for the units both engines swap (same modules, same tensors), instead
        of copying the weights again: a LoRA or setting change on the same model re-uses its host copy.
        Returns the bytes adopted. Call before `other.forget_slabs()`; both must be detached."""
        if self.is_attached or other.is_attached:
            raise RuntimeError(
                "adopt_slabs: detach both engines first (slabs are bound to slots while attached)"
            )
        theirs = {u.module: u for u in other.order if u.slab is not None}
        adopted = 0
        for unit in self.order:
            donor = theirs.get(unit.module)
            if unit.slab is not None or donor is None:
                continue
            if [(t.owner, t.attr) for t in donor.layout] != [(o, a) for o, a, _, _ in unit.tensors()]:
                continue  # the module's tensors changed since the donor built its slab
            unit.layout, unit.nbytes, unit.slab, unit.slab_views = (
                donor.layout,
                donor.nbytes,
                donor.slab,
                donor.slab_views,
            )
            unit.slab_pinned, donor.slab_pinned = donor.slab_pinned, False
            if unit.slab_pinned:
                other._pinned_slabs.remove(donor.slab)
                self._pinned_slabs.append(unit.slab)
            donor.slab, donor.slab_views, donor.layout, donor.nbytes = None, [], [], 0
            adopted += unit.nbytes
        self._claim_pinned_share()
        return adopted

    def _claim_pinned_share(self) -> None:
        if self.use_non_blocking and self.order:
            with _PINNED.lock:
                _PINNED.claims[self] = sum(_layout_size(u) for u in self.order)

    def _teardown(self) -> None:
        run, self._run = self._run, None
        stats = None
        if run is not None:
            for handle in run.hooks:
                handle.remove()
            run.transport.finish()
            stats = run.transport.stats()
        # Every swapped tensor views its slab again (a unit interrupted mid-forward is still bound to a
        # slot); then the placement puts tensors whose home is elsewhere back there.
        for unit in self.order:
            if unit.slab is not None:
                self._bind(unit, unit.slab_views)
        self._placement.after_run(self)
        self.last_run = stats

    # -- slabs ---------------------------------------------------------------------------------

    def _ensure_slabs(self, sources: Mapping[int, torch.Tensor] | None = None) -> None:
        """Every swapped unit in its slab: built on first use, refreshed where a tensor was re-pointed
        since (a host that replaced a weight); untouched units cost nothing."""
        sources = sources or {}
        for unit in self.order:
            if unit.slab is not None:
                self._refresh_slab(unit)
        to_build = [u for u in self.order if u.slab is None]
        if not to_build:
            return
        self._check_ram_for(to_build, sources)
        self._claim_pinned_share()
        pin = self.use_non_blocking and self._streams is not None and self.offload_device.type == "cpu"
        budget = self._pinned_budget() if pin else 0
        started, pinned_bytes, warned_pin = time.perf_counter(), 0, False
        for done, unit in enumerate(to_build, 1):
            allowed = min(budget - _PINNED.bytes, _PINNED.share(self, budget) - self.pinned_bytes())
            if self._build_slab(unit, pin and _layout_size(unit) <= allowed, sources):
                pinned_bytes += unit.nbytes
            elif pin and not warned_pin:
                warned_pin = True
                log.warning(
                    "[BlockSwap] Pinned-memory budget (%s for this model of %s for all) reached or pinning "
                    "failed at %s: remaining swapped units use pageable RAM, so their copies cannot overlap compute",
                    format_bytes(max(_PINNED.share(self, budget), 0)),
                    format_bytes(budget),
                    unit.name,
                )
            if self.on_slab_built is not None:
                self.on_slab_built(done, len(to_build))
        total = sum(u.nbytes for u in to_build)
        log.info(
            "[BlockSwap] Host copies of %d swapped units built: %s (%s pinned, %s pageable) in %.2f s",
            len(to_build),
            format_bytes(total),
            format_bytes(pinned_bytes),
            format_bytes(total - pinned_bytes),
            time.perf_counter() - started,
        )

    def _pinned_budget(self) -> int:
        budget = self.pinned_budget_bytes
        if callable(budget):
            budget = budget()
        return max(int(default_pinned_budget() if budget is None else budget), 0)

    def _check_ram_for(
        self, units: list[SwapUnit], sources: Mapping[int, torch.Tensor] | None = None
    ) -> None:
        """Refuse, before copying anything, slabs the free RAM cannot hold.

        A unit whose tensors are in CPU RAM frees them as its slab takes over (the parameters are the only
        owners), so it needs one unit of headroom at a time; a unit that sits on another device (a model
        created on the GPU) or is read from sources (its tensors were never filled, so freeing them returns
        nothing) needs its whole slab in new RAM.
        """
        sources = sources or {}
        free = available_ram()
        if free is None or self.offload_device.type != "cpu":
            return
        sizes = [_layout_size(u) for u in units]
        elsewhere = sum(
            size
            for size, u in zip(sizes, units, strict=True)
            if any(t.device.type != "cpu" or id(t) in sources for *_, t in u.tensors())
        )
        needed = elsewhere + max(sizes)
        if needed <= free:
            return
        largest = max(sizes)
        fits = sum(1 for _ in itertools.takewhile(lambda total: total <= free, itertools.accumulate(sizes)))
        raise HostMemoryError(
            f"[BlockSwap] Not enough free RAM for the swapped blocks' host copies: {format_bytes(needed)} needed, "
            f"{format_bytes(free)} available. What would fit: at most {max(fits - 1, 0)} swapped units of up to "
            f"{format_bytes(largest)} each, or a smaller file format (fp8 weights take half of bf16; GGUF Q8_0 "
            "about 53 %, Q4_K about 28 %), or closing what else uses RAM."
        )

    def _build_slab(
        self, unit: SwapUnit, pin: bool, sources: Mapping[int, torch.Tensor] | None = None
    ) -> bool:
        """Copy the unit into one new contiguous host buffer and point its tensors at it. True if pinned.

        A tensor listed in `sources` is filled from its source instead of from itself."""
        sources = sources or {}
        current = list(unit.tensors())
        unit.layout, unit.nbytes = _layout(current)
        self._placement.remember_home(unit, current[0][3].device if current else self.offload_device)
        unit.slab = torch.empty(unit.nbytes, dtype=torch.uint8, device=self.offload_device)
        unit.slab_views = [_view(unit.slab, spec) for spec in unit.layout]
        _check_views_alias(unit, unit.slab)
        if pin:
            unit.slab_pinned = _pin_in_place(unit.slab)
            if unit.slab_pinned:
                self._pinned_slabs.append(unit.slab)
        for (owner, attr, _, t), view in zip(current, unit.slab_views, strict=True):
            source = sources.get(id(t))
            if source is None:
                _copy_bytes(view, t)
                continue
            if is_wrapper_tensor(t) or tuple(source.shape) != tuple(torch.Tensor.size(t)):
                raise ValueError(
                    f"{unit.name}: the source given for {type(owner).__name__}.{attr} has shape "
                    f"{tuple(source.shape)}, the tensor {tuple(torch.Tensor.size(t))}"
                    + (" and is a wrapper subclass" if is_wrapper_tensor(t) else "")
                )
            with torch.no_grad():
                plain_tensor(view).copy_(source)
            self.counters.slab_tensors_from_sources += 1
            self.counters.slab_bytes_from_sources += tensor_nbytes(source)
        self._bind(unit, unit.slab_views)
        self.counters.slabs_built += 1
        self.counters.slab_bytes_built += unit.nbytes
        return unit.slab_pinned

    def _refresh_slab(self, unit: SwapUnit) -> None:
        """Copy into the slab only the tensors that no longer view it, then bind the unit to it again."""
        stale = [
            (t, view)
            for (*_, t), view in zip(unit.tensors(), unit.slab_views, strict=True)
            if [leaf.data_ptr() for leaf in _leaves(t)] != [leaf.data_ptr() for leaf in _leaves(view)]
        ]
        for t, view in stale:
            _copy_bytes(view, t)
        if stale:
            self._bind(unit, unit.slab_views)

    # -- runs ----------------------------------------------------------------------------------

    def _start_run(self) -> _Run:
        n = self.num_slots()
        size = max((u.nbytes for u in self.order), default=0)
        # Slots first, then the transport: it orders the copy stream after the compute stream that owns
        # the slots' memory now.
        slots = [_device_buffer(size, self.compute_device) for _ in range(n)]
        if self.transport_factory is not None:
            transport = self.transport_factory(n)
        elif self._streams is not None:
            timing, self.time_next_run = self.debug or self.time_next_run, False
            transport = CudaStreamTransport(
                self.compute_device,
                n,
                self.use_non_blocking,
                timing,
                self.reader_streams,
                copy_stream=self._copy_stream_for_runs(),
                cuda=self._streams,
            )
        else:
            transport = SyncTransport()
        run = _Run(slots, transport, len(self.order))
        for position, unit in enumerate(self.order):
            run.hooks.append(unit.module.register_forward_pre_hook(self._make_pre_hook(position)))
            run.hooks.append(
                unit.module.register_forward_hook(self._make_post_hook(position), always_call=True)
            )
        return run

    def _copy_stream_for_runs(self):
        """The engine's copy stream, made once and reused by every run.

        torch hands out streams from a small per-device pool in turn (32 per priority), and ComfyUI's
        offload streams come from the low-priority one: a stream per run would now and then be one of them,
        and our prefetch would queue behind its casts. A high-priority stream comes from the other pool; it
        is also checked against the host's streams, which `reader_streams` creates if they do not exist yet.
        """
        if not self._copy_streams:
            theirs = list(self.reader_streams()) if self.reader_streams is not None else []
            for _ in range(64):
                stream = self._streams.Stream(device=self.compute_device, priority=-1)
                if not any(stream == other for other in theirs):
                    break
            self._copy_streams.append(stream)
        return self._copy_streams[0]

    def _wait_for_copies(self) -> None:
        """The host waits for every copy the engine issued: they read the host slabs, which are about to be
        unpinned or given up (a run's last prefetch is still in flight after it ends)."""
        for stream in self._copy_streams:
            stream.synchronize()

    def _refuse_graph_capture(self) -> None:
        if self._streams is not None and self._streams.is_current_stream_capturing():
            raise RuntimeError(CUDA_GRAPH_MESSAGE)

    def _prime(self) -> None:
        """Start copying the first units of the pass, so even the run's first unit need not wait."""
        if self.prefetch_blocks and self.order:
            for seq in range(self._depth + 1):
                self._copy(self._run, seq % len(self.order), seq % len(self._run.slots))

    def _make_pre_hook(self, position: int):
        @torch.compiler.disable()
        def pre_hook(module, args):
            self._before_unit(position)

        return pre_hook

    def _make_post_hook(self, position: int):
        @torch.compiler.disable()
        def post_hook(module, args, output):
            self._after_unit(position)

        return post_hook

    def _before_unit(self, position: int) -> None:
        self._refuse_graph_capture()
        run, counters = self._run, self.counters
        n, num_slots = len(self.order), len(run.slots)
        counters.unit_runs += 1
        if position == 0:
            counters.passes += 1
        # The next sequence number that is this unit: the expected one, the one just run (a repeat),
        # or a later one (units were skipped).
        seq = run.next_seq - 1 + (position - run.next_seq + 1) % n
        slot = seq % num_slots
        if run.loaded[slot] != position:
            counters.misses += 1
            self._copy(run, position, slot)
        elif not run.fresh[slot]:
            counters.slot_hits += 1
        run.next_seq = seq + 1
        run.transport.wait_copied(slot)
        unit = self.order[position]
        views = run.views[position][slot]
        if views is None:
            views = run.views[position][slot] = [_view(run.slots[slot], spec) for spec in unit.layout]
        self._bind(unit, views)
        run.bound_position, run.bound_slot = position, slot
        if run.fresh[slot]:
            run.fresh[slot] = False
            if self.on_unit_loaded is not None:
                self.on_unit_loaded(unit.name, unit.module)
        # Issue the copies for the next units now, so they run while this unit computes.
        for ahead in range(seq + 1, seq + 1 + self._depth):
            if run.loaded[ahead % num_slots] != ahead % n:
                self._copy(run, ahead % n, ahead % num_slots)

    def _after_unit(self, position: int) -> None:
        run = self._run
        if run is None or run.bound_position != position:
            return
        run.transport.mark_free(run.bound_slot)
        run.bound_position = run.bound_slot = -1
        # Between forwards the tensors view the slab again: nothing outside the unit's own forward can
        # read a slot that a later copy overwrites.
        unit = self.order[position]
        self._bind(unit, unit.slab_views)

    def _copy(self, run: _Run, position: int, slot: int) -> None:
        unit = self.order[position]
        run.transport.start_copy(slot, run.slots[slot][: unit.nbytes], unit.slab)
        run.loaded[slot] = position
        run.fresh[slot] = True
        self.counters.copies += 1
        self.counters.bytes_copied += unit.nbytes

    @staticmethod
    def _bind(unit: SwapUnit, views: list[torch.Tensor]) -> None:
        for spec, view in zip(unit.layout, views, strict=True):
            _set_tensor(spec.owner, spec.attr, spec.is_param, view)

    def _log_run_summary(self) -> None:
        c, stats = self.counters, self.last_run
        parts = [
            f"{c.passes} passes",
            f"{c.copies} copies",
            f"{format_bytes(c.bytes_copied)} moved ({format_bytes(c.bytes_copied // max(c.passes, 1))}/pass)",
            f"{c.misses} on-demand",
        ]
        if stats is not None and stats.copy_ms:
            parts.append(f"copy {stats.copy_gbps(c.bytes_copied):.1f} GB/s")
            parts.append(f"stall {stats.stall_ms:.1f} ms ({stats.stall_ms / max(c.passes, 1):.2f} ms/pass)")
        if stats is not None and stats.peak_allocated is not None:
            parts.append(f"peak VRAM allocated {format_bytes(stats.peak_allocated)}")
        log.info("[BlockSwap] Run: %s", ", ".join(parts))


# ----------------------------------------------------------------------------------------------
# Layout helpers
# ----------------------------------------------------------------------------------------------


def _layout(tensors: list[tuple[nn.Module, str, bool, torch.Tensor]]) -> tuple[list[TensorSpec], int]:
    """Where each tensor goes in a slab (and in any slot), and the slab's size."""
    layout, offset = [], 0
    for owner, attr, is_param, t in tensors:
        ranges = []
        for name, part in inner_tensors(t):
            nbytes = torch.Tensor.numel(part) * part.element_size()
            ranges.append(ByteRange(name, offset, nbytes, part.dtype, torch.Tensor.size(part), part.stride()))
            offset = _align(offset + nbytes)
        wrapper = None
        if is_wrapper_tensor(t):
            _names, ctx = t.__tensor_flatten__()
            wrapper = (type(t), ctx, t.size(), t.stride())
        layout.append(TensorSpec(owner, attr, is_param, tuple(ranges), wrapper))
    return layout, offset


def _layout_size(unit: SwapUnit) -> int:
    """The unit's slab size, also before its slab exists (a host reserves slot memory at load time)."""
    return unit.nbytes or _layout(list(unit.tensors()))[1]


def _range_view(buffer: torch.Tensor, r: ByteRange) -> torch.Tensor:
    raw = buffer[r.offset : r.offset + r.nbytes]
    return raw.view(r.dtype).as_strided(r.shape, r.stride)


def _view(buffer: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """The tensor `spec` describes, with its bytes in `buffer` (a slab or a slot)."""
    if spec.wrapper is None:
        return _range_view(buffer, spec.ranges[0])
    cls, ctx, size, stride = spec.wrapper
    inner = {r.name: _range_view(buffer, r) for r in spec.ranges}
    rebuilt = cls.__tensor_unflatten__(inner, ctx, size, stride)
    if spec.is_param:
        # What nn.Parameter(wrapper) marks; Parameter() itself would detach, and a wrapper's detach may
        # copy its inner tensors (QuantizedTensor clones its scale) out of the slab.
        rebuilt._is_param = True
    return rebuilt


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """Plain aliases of the tensors that hold t's bytes (see `inner_tensors`)."""
    return [plain_tensor(part) for _, part in inner_tensors(t)]


def _check_movable(unit: SwapUnit) -> None:
    """Refuse, before anything is touched, a tensor whose bytes the engine cannot move: a wrapper
    subclass whose inner tensors are wrappers again."""
    for owner, attr, _, t in unit.tensors():
        for name, part in inner_tensors(t):
            if name is not None and is_wrapper_tensor(part):
                raise ValueError(
                    f"{unit.name}: {type(owner).__name__}.{attr} is a {type(t).__name__} whose inner tensor "
                    f"{name!r} is itself a {type(part).__name__}: the engine cannot swap this layout; keep "
                    "this block resident (fewer blocks_to_swap) or load the model in another format"
                )


def _check_views_alias(unit: SwapUnit, buffer: torch.Tensor) -> None:
    """Every rebuilt view must keep its bytes in `buffer`; a wrapper that copies its inner tensors when it
    is rebuilt would silently read stale data from elsewhere."""
    start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    for spec, view in zip(unit.layout, unit.slab_views, strict=True):
        if not all(start <= leaf.data_ptr() < end for leaf in _leaves(view)):
            raise ValueError(
                f"{unit.name}: {type(spec.owner).__name__}.{spec.attr} ({type(view).__name__}) does not keep "
                "its bytes in the views it is rebuilt from, so it cannot be swapped; keep this block resident"
            )


def _copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy src's bytes into dst (same layout), tensor by inner tensor, without any subclass logic."""
    for to, frm in zip(_leaves(dst), _leaves(src), strict=True):
        to.copy_(frm)


def _group_units(units: list[SwapUnit]) -> dict[str, list[SwapUnit]]:
    """Group "blocks.3", "vace_blocks.1", "text_embedding" by their prefix for the plan summary."""
    groups: dict[str, list[SwapUnit]] = {}
    for unit in units:
        prefix, _, index = unit.name.rpartition(".")
        group = prefix if prefix and index.isdigit() else unit.name
        groups.setdefault(group, []).append(unit)
    return groups


def _ranges(names: list[str]) -> str:
    """ "blocks.0 blocks.1 blocks.2 blocks.7" -> "0-2, 7"; non-numbered names are listed as they are."""
    numbers: list[int] = []
    others: list[str] = []
    for name in names:
        _, _, index = name.rpartition(".")
        if index.isdigit():
            numbers.append(int(index))
        else:
            others.append(name)
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and spans[-1][1] == n - 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    text = [f"{a}-{b}" if a != b else f"{a}" for a, b in spans] + others
    return ", ".join(text)


def _summarize_names(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 8 else ", ".join(names[:4]) + ", ..., " + ", ".join(names[-2:])
