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
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from .config import check_int
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


def tensor_nbytes(t: torch.Tensor) -> int:
    return torch.Tensor.numel(t) * t.element_size()


def _set_tensor(owner: nn.Module, attr: str, is_param: bool, value: torch.Tensor) -> None:
    """Point a parameter or buffer at new storage without replacing the Parameter object.

    Keeping the object keeps everything that refers to it valid (optimizers don't matter here, but
    ComfyUI's accounting, LoRA backups and tensor-subclass attributes such as a GGUF quant type do).
    """
    if is_param:
        owner._parameters[attr].data = value
    else:
        owner._buffers[attr] = value


# ----------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    """Where one parameter or buffer of a unit lives inside its slab (and inside any device slot)."""

    owner: nn.Module
    attr: str
    is_param: bool
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size


@dataclasses.dataclass(eq=False)
class SwapUnit:
    """One module the engine manages: a transformer block, a VACE block, an embedding."""

    name: str
    module: nn.Module
    swapped: bool
    layout: list[TensorSlot] = dataclasses.field(default_factory=list)
    nbytes: int = 0  # slab size including alignment padding
    slab: torch.Tensor | None = None  # uint8 host buffer, built on first attach
    slab_views: list[torch.Tensor] = dataclasses.field(default_factory=list)
    slab_pinned: bool = False
    # Where the unit's tensors were before the engine first touched them (restored by detach).
    home_device: torch.device | None = None
    # Resident units moved by attach(): the original tensors, so detach restores them without a copy.
    originals: list[tuple[nn.Module, str, bool, torch.Tensor]] | None = None

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

    def reset(self) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, 0)


@dataclasses.dataclass
class RunStats:
    """Measured at the end of a run when debug telemetry is on (CUDA only)."""

    copy_ms: float = 0.0
    stall_ms: float = 0.0
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
        """Fill slot `slot` (dst) from src once compute has finished with the slot's previous contents."""
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
    """Copies on a dedicated CUDA stream; compute waits on events, never on the host."""

    def __init__(self, device: torch.device, num_slots: int, non_blocking: bool, timing: bool):
        self.device = device
        self.non_blocking = non_blocking
        self.copy_stream = torch.cuda.Stream(device=device)
        self.ready = [torch.cuda.Event() for _ in range(num_slots)]
        self.free = [torch.cuda.Event() for _ in range(num_slots)]
        self.timing = timing
        # (start, end) event pairs, read once at the end of the run, never mid-run.
        self._copy_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._stall_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start_copy(self, slot: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        stream = self.copy_stream
        stream.wait_event(self.free[slot])
        with torch.cuda.stream(stream):
            if self.timing:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
            dst.copy_(src, non_blocking=self.non_blocking)
            if self.timing:
                end.record(stream)
                self._copy_events.append((start, end))
        self.ready[slot].record(stream)

    def wait_copied(self, slot: int) -> None:
        compute = torch.cuda.current_stream(self.device)
        if self.timing:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(compute)
            compute.wait_event(self.ready[slot])
            end.record(compute)
            self._stall_events.append((start, end))
        else:
            compute.wait_event(self.ready[slot])

    def mark_free(self, slot: int) -> None:
        self.free[slot].record(torch.cuda.current_stream(self.device))

    def finish(self) -> None:
        # A prefetch that wrapped around to the next step may still be in flight: the compute stream
        # (which will reuse the slot memory through the caching allocator) must not overtake it.
        torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)

    def stats(self) -> RunStats:
        stats = RunStats()
        if self._copy_events or self._stall_events:
            torch.cuda.synchronize(self.device)
            stats.copy_ms = sum(s.elapsed_time(e) for s, e in self._copy_events)
            stats.stall_ms = sum(s.elapsed_time(e) for s, e in self._stall_events)
        stats.peak_allocated = torch.cuda.max_memory_allocated(self.device)
        return stats


# ----------------------------------------------------------------------------------------------
# Pinned host memory
# ----------------------------------------------------------------------------------------------


class _PinnedLedger:
    """Process-wide count of bytes this pack has page-locked, so several engines share one budget."""

    def __init__(self):
        self.lock = threading.Lock()
        self.bytes = 0


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


def _pin_in_place(buffer: torch.Tensor, budget: int) -> bool:
    """Page-lock exactly buffer's bytes (cudaHostRegister), within the process-wide budget.

    torch's pin_memory() goes through the caching host allocator, which rounds each block up to a
    power of two: a 670 MiB block would lock 1 GiB. Registering the plain allocation locks what we use.
    """
    nbytes = buffer.numel()
    with _PINNED.lock:
        if _PINNED.bytes + nbytes > budget:
            return False
        err = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0)
        if int(err) != 0:
            return False
        _PINNED.bytes += nbytes
    return True


def _unpin(buffer: torch.Tensor) -> None:
    with _PINNED.lock:
        torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
        _PINNED.bytes -= buffer.numel()


def _release_slabs(pinned: list[torch.Tensor]) -> None:
    # Runs at release() or when the engine is garbage-collected. Holding the buffers until after the
    # unregister keeps their memory valid while it is still registered; parameters that still view
    # the slabs keep them alive afterwards as ordinary pageable memory.
    while pinned:
        _unpin(pinned.pop())


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


class _Slot:
    __slots__ = ("index", "buffer", "unit", "fresh")

    def __init__(self, index: int, buffer: torch.Tensor):
        self.index = index
        self.buffer = buffer
        self.unit: SwapUnit | None = None
        self.fresh = False  # filled by a copy and not yet seen by the unit-loaded callback


class _Run:
    """Everything that exists only while the engine is attached."""

    def __init__(self, slots: list[_Slot], transport):
        self.slots = slots
        self.transport = transport
        self.slot_of: dict[int, _Slot] = {}  # id(unit) -> slot holding it
        self.views: dict[tuple[int, int], list[torch.Tensor]] = {}  # (id(unit), slot) -> views
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.bound: set[int] = set()  # units currently bound to a slot (inside their forward)


class BlockSwapEngine:
    """Streams the swapped units of a model through `prefetch_blocks + 1` device slots.

    units: (name, module) pairs in the order they execute in one forward pass. A module that runs
        several times in a row (a VACE block with several contexts) is listed once.
    swap: names of the units to keep in host RAM; the others are resident on the compute device.
    prefetch_blocks: 0 copies a unit when it starts (no overlap); N keeps copies N units ahead.
    use_non_blocking: pinned host slabs and asynchronous copies (needed for copy/compute overlap).
    pinned_budget_bytes: most host RAM to page-lock (None: a safe share of physical RAM).
    move_resident: move resident units to the compute device on attach (and back on detach). An
        integration whose host already placed them turns this off.
    on_unit_loaded: called as fn(name, module) after a unit's bytes landed in a slot and before it
        runs, once per copy (e.g. to apply a LoRA to the slot, leaving the slab pristine).
    transport_factory: for tests: fn(num_slots) -> transport, replacing the built-in ones.
    """

    def __init__(
        self,
        units: Sequence[tuple[str, nn.Module]],
        swap: Iterable[str],
        compute_device: torch.device | str,
        offload_device: torch.device | str = "cpu",
        prefetch_blocks: int = 0,
        use_non_blocking: bool = False,
        pinned_budget_bytes: int | None = None,
        debug: bool = False,
        move_resident: bool = True,
        on_unit_loaded: UnitLoadedCallback | None = None,
        transport_factory: Callable[[int], object] | None = None,
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
        check_int("prefetch_blocks", prefetch_blocks, 0)
        if pinned_budget_bytes is not None and pinned_budget_bytes < 0:
            raise ValueError(f"pinned_budget_bytes must be >= 0 or None (got {pinned_budget_bytes})")

        self.compute_device = torch.device(compute_device)
        self.offload_device = torch.device(offload_device)
        self.prefetch_blocks = prefetch_blocks
        self.use_non_blocking = use_non_blocking
        self.pinned_budget_bytes = pinned_budget_bytes
        self.debug = debug
        self.move_resident = move_resident
        self.on_unit_loaded = on_unit_loaded
        self.transport_factory = transport_factory

        # Execution order of the swapped units, and each one's position in it (for prefetch).
        self.order: list[SwapUnit] = [u for u in self.units if u.swapped]
        self._position = {id(u): i for i, u in enumerate(self.order)}
        # For each position: that unit and the ones prefetched behind it (wrapping into the next
        # pass). Precomputed so the per-block hooks allocate nothing.
        n, depth = len(self.order), min(prefetch_blocks, max(len(self.order) - 1, 0))
        self._windows = [[self.order[(p + k) % n] for k in range(depth + 1)] for p in range(n)]
        self._window_ids = [frozenset(id(u) for u in window) for window in self._windows]
        self.counters = SwapCounters()
        self.last_run: RunStats | None = None
        self._run: _Run | None = None
        self._pinned_slabs: list[torch.Tensor] = []
        self._described = False
        self._finalizer = weakref.finalize(self, _release_slabs, self._pinned_slabs)

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
        return [slot.buffer for slot in self._run.slots] if self._run is not None else []

    # -- attach / detach -----------------------------------------------------------------------

    def attach(self) -> None:
        """Start a run: build slabs (first time only), allocate slots, install hooks. Idempotent."""
        if self._run is not None:
            log.debug("[BlockSwap] attach(): already attached, nothing to do")
            return
        try:
            self._build_slabs()
            if self.move_resident:
                self._place_resident()
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
        """End a run: remove hooks, release slots, put every tensor back where it was. Idempotent."""
        if self._run is None and not any(u.originals for u in self.units):
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
        _release_slabs(self._pinned_slabs)
        for unit in self.order:
            unit.slab_pinned = False

    def park(self) -> None:
        """Put every swapped unit into its host slab now (built on first use), without a run.

        A host calls this at load time, so swapped units are in host RAM before anything could move
        them to the device. Cheap when the slabs are current.
        """
        self._build_slabs()

    def forget_slabs(self) -> None:
        """Give up the slabs (another plan takes over the module): detach, unpin, and leave the memory
        to the tensors that view it. The next attach or park builds fresh slabs from the tensors."""
        self.release()
        for unit in self.order:
            unit.slab, unit.slab_views, unit.layout, unit.nbytes = None, [], [], 0
            unit.home_device = None

    def _teardown(self) -> None:
        run, self._run = self._run, None
        stats = None
        if run is not None:
            for handle in run.hooks:
                handle.remove()
            run.transport.finish()
            stats = run.transport.stats()
        # Rebind every swapped tensor to its slab (a unit interrupted mid-forward is still bound
        # to a slot), then put units whose home was another device back there.
        for unit in self.order:
            if unit.slab is not None:
                self._bind(unit, unit.slab_views)
                if unit.home_device is not None and unit.home_device != self.offload_device:
                    for spec, view in zip(unit.layout, unit.slab_views, strict=True):
                        _set_tensor(spec.owner, spec.attr, spec.is_param, view.to(unit.home_device))
        for unit in self.units:
            if unit.originals:
                for owner, attr, is_param, original in unit.originals:
                    _set_tensor(owner, attr, is_param, original)
                unit.originals = None
        self.last_run = stats

    # -- slabs ---------------------------------------------------------------------------------

    def _build_slabs(self) -> None:
        """Copy each swapped unit into one contiguous host buffer and point its tensors at it.

        First attach: every unit. Later attaches: only tensors that someone re-pointed since (for
        example a host that replaced a weight); untouched units cost nothing.
        """
        pin = (
            self.use_non_blocking and self.compute_device.type == "cuda" and self.offload_device.type == "cpu"
        )
        budget = self.pinned_budget_bytes if self.pinned_budget_bytes is not None else default_pinned_budget()
        warned_pin = False
        for unit in self.order:
            current = list(unit.tensors())
            if unit.slab is not None and all(
                t.data_ptr() == view.data_ptr()
                for (*_, t), view in zip(current, unit.slab_views, strict=True)
            ):
                continue
            if unit.slab is None:
                unit.layout, unit.nbytes = _layout(current)
                unit.home_device = current[0][3].device if current else self.offload_device
                unit.slab = torch.empty(unit.nbytes, dtype=torch.uint8, device=self.offload_device)
                unit.slab_views = [_view(unit.slab, spec) for spec in unit.layout]
                if pin:
                    unit.slab_pinned = _pin_in_place(unit.slab, budget)
                    if unit.slab_pinned:
                        self._pinned_slabs.append(unit.slab)
                    elif not warned_pin:
                        warned_pin = True
                        log.warning(
                            "[BlockSwap] Pinned-memory budget (%s) reached or pinning failed at %s: "
                            "remaining swapped units use pageable RAM, so their copies cannot overlap compute",
                            format_bytes(budget),
                            unit.name,
                        )
            for (*_, t), view in zip(current, unit.slab_views, strict=True):
                if t.data_ptr() != view.data_ptr():
                    view.copy_(plain_tensor(t))
            self._bind(unit, unit.slab_views)

    def _place_resident(self) -> None:
        for unit in self.resident_units:
            moved = []
            for owner, attr, is_param, t in unit.tensors():
                if t.device != self.compute_device:
                    moved.append((owner, attr, is_param, plain_tensor(t)))
                    _set_tensor(owner, attr, is_param, plain_tensor(t).to(self.compute_device))
            unit.originals = moved or None

    # -- runs ----------------------------------------------------------------------------------

    def _start_run(self) -> _Run:
        n = self.num_slots()
        size = max((u.nbytes for u in self.order), default=0)
        slots = [_Slot(i, torch.empty(size, dtype=torch.uint8, device=self.compute_device)) for i in range(n)]
        if self.transport_factory is not None:
            transport = self.transport_factory(n)
        elif self.compute_device.type == "cuda":
            transport = CudaStreamTransport(self.compute_device, n, self.use_non_blocking, self.debug)
        else:
            transport = SyncTransport()
        run = _Run(slots, transport)
        for unit in self.order:
            run.hooks.append(unit.module.register_forward_pre_hook(self._make_pre_hook(unit)))
            run.hooks.append(unit.module.register_forward_hook(self._make_post_hook(unit), always_call=True))
        return run

    def _prime(self) -> None:
        """Start copying the first units of the pass, so even the run's first unit need not wait."""
        if self.prefetch_blocks and self.order:
            for unit in self._windows[0]:
                self._load(unit, keep=self._window_ids[0])

    def _make_pre_hook(self, unit: SwapUnit):
        @torch.compiler.disable()
        def pre_hook(module, args):
            self._before_unit(unit)

        return pre_hook

    def _make_post_hook(self, unit: SwapUnit):
        @torch.compiler.disable()
        def post_hook(module, args, output):
            self._after_unit(unit)

        return post_hook

    def _before_unit(self, unit: SwapUnit) -> None:
        run = self._run
        counters = self.counters
        counters.unit_runs += 1
        position = self._position[id(unit)]
        if position == 0:
            counters.passes += 1
        slot = run.slot_of.get(id(unit))
        if slot is None:
            counters.misses += 1
            slot = self._load(unit, keep=self._window_ids[position])
        elif not slot.fresh:
            counters.slot_hits += 1
        run.transport.wait_copied(slot.index)
        self._bind(unit, self._slot_views(run, unit, slot))
        run.bound.add(id(unit))
        if slot.fresh:
            slot.fresh = False
            if self.on_unit_loaded is not None:
                self.on_unit_loaded(unit.name, unit.module)
        # Issue the copies for the next units now, so they run while this unit computes.
        for ahead in self._windows[position][1:]:
            if id(ahead) not in run.slot_of:
                self._load(ahead, keep=self._window_ids[position])

    def _after_unit(self, unit: SwapUnit) -> None:
        run = self._run
        if run is None or id(unit) not in run.bound:
            return
        run.bound.discard(id(unit))
        run.transport.mark_free(run.slot_of[id(unit)].index)
        # Between forwards the tensors view the slab again: nothing outside the unit's own forward can
        # read a slot that a later copy overwrites.
        self._bind(unit, unit.slab_views)

    def _load(self, unit: SwapUnit, keep: frozenset[int]) -> _Slot:
        """Copy `unit` into a free slot, or evict a unit that is neither running nor in `keep`."""
        run = self._run
        slot = next((s for s in run.slots if s.unit is None), None)
        if slot is None:
            slot = next(s for s in run.slots if id(s.unit) not in keep and id(s.unit) not in run.bound)
            del run.slot_of[id(slot.unit)]
        run.transport.start_copy(slot.index, slot.buffer[: unit.nbytes], unit.slab)
        slot.unit = unit
        slot.fresh = True
        run.slot_of[id(unit)] = slot
        self.counters.copies += 1
        self.counters.bytes_copied += unit.nbytes
        return slot

    def _slot_views(self, run: _Run, unit: SwapUnit, slot: _Slot) -> list[torch.Tensor]:
        key = (id(unit), slot.index)
        views = run.views.get(key)
        if views is None:
            views = run.views[key] = [_view(slot.buffer, spec) for spec in unit.layout]
        return views

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


def _layout(tensors: list[tuple[nn.Module, str, bool, torch.Tensor]]) -> tuple[list[TensorSlot], int]:
    """Where each tensor goes in a slab (and in any slot), and the slab's size."""
    layout, offset = [], 0
    for owner, attr, is_param, t in tensors:
        nbytes = tensor_nbytes(t)
        layout.append(TensorSlot(owner, attr, is_param, offset, nbytes, t.dtype, torch.Tensor.size(t)))
        offset = _align(offset + nbytes)
    return layout, offset


def _layout_size(unit: SwapUnit) -> int:
    """The unit's slab size, also before its slab exists (a host reserves slot memory at load time)."""
    return unit.nbytes or _layout(list(unit.tensors()))[1]


def _view(buffer: torch.Tensor, spec: TensorSlot) -> torch.Tensor:
    raw = buffer[spec.offset : spec.offset + spec.nbytes]
    return raw.view(spec.dtype).view(spec.shape)


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
