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
copied host -> device. A unit left in its file (host_memory.py) has no slab: on a GPU a reader thread stages
it into a small ring of host buffers ahead of its copy (staging.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .config import check_choice, check_int
from .host_memory import (  # noqa: F401  (re-exported: the engine's public names for hosts and tests)
    DEFAULT_PINNED_RAM_SHARE,
    HOST_TIERS,
    HostMemoryError,
    HostSlabs,
    available_ram,
    default_pinned_budget,
    pinned_bytes_in_use,
)
from .staging import StagingReader
from .tensor_layout import (  # noqa: F401  (re-exported, as above)
    TENSOR_ALIGNMENT,
    ByteRange,
    SwapUnit,
    TensorSpec,
    _check_movable,
    _layout_size,
    _leaves,
    _set_tensor,
    _view,
    bind,
    inner_tensors,
    is_wrapper_tensor,
    plain_tensor,
    tensor_nbytes,
)
from .utils import format_bytes

log = logging.getLogger(__name__)

UnitLoadedCallback = Callable[[str, nn.Module], None]


# ----------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------


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
    staged_units: int = 0  # copies of units left in their files made from a staging buffer
    staged_bytes: int = 0
    staging_waits: int = 0  # of those, copies that waited for the reader (it was not ahead of them)

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

    def record_copies(self, event) -> None:
        """Record `event` where it completes once every copy issued so far has read its source (the host
        waits on it before it overwrites a staging buffer). Here the copies are done already."""

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

    def record_copies(self, event) -> None:
        event.record(self.copy_stream)

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
# Device buffers and CUDA graph capture
# ----------------------------------------------------------------------------------------------


def _device_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """A run's slot memory on the compute device (a seam: the CPU stream model replaces it with a caching
    allocator that hands a run the memory the previous run freed, as torch's does)."""
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


CUDA_GRAPH_MESSAGE = (
    "[BlockSwap] Called inside a CUDA graph capture (torch.cuda.graph, or a torch.compile mode='reduce-overhead' "
    "/ cudagraphs backend that records BlockSwap's hooks): a graph replays the weight addresses and copies it "
    "recorded, while BlockSwap fills its GPU slots anew every step, so the replays would be silently wrong. "
    "Use the default torch.compile mode (or another without CUDA graphs), or no block swapping."
)


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
        # The reader that stages units left in their files ahead of their copies (None: they are copied
        # straight from the file, as on a CPU compute device where a copy is synchronous anyway).
        self.staging: StagingReader | None = None
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
    host_memory: where swapped units wait between runs: "ram" (a slab each), "file" (no slab for a unit
        whose tensors are views of a file mapping: copied from the file into the slot), "auto" (slabs
        while they fit the free RAM less a reserve, the file for the rest). See host_memory.py.
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
        host_memory: str = "auto",
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
        check_choice("host_memory", host_memory, HOST_TIERS)

        self.compute_device = torch.device(compute_device)
        self.offload_device = torch.device(offload_device)
        self.prefetch_blocks = prefetch_blocks
        self.use_non_blocking = use_non_blocking
        self.pinned_budget_bytes = pinned_budget_bytes
        self.debug = debug
        self.placement = placement
        self._placement = _StandalonePlacement() if placement == "standalone" else _HostPlacement()
        self.on_unit_loaded = on_unit_loaded
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
        # The host tier: slabs, pinning within the shared budget, RAM checks.
        self.host = HostSlabs(
            self.offload_device,
            pinned_budget_bytes,
            self.counters,
            on_slab_built=on_slab_built,
            remember_home=self._placement.remember_home,
            tier=host_memory,
            copy_streams=self._copy_streams,
        )
        self._described = False
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
    def on_slab_built(self) -> Callable[[int, int], None] | None:
        """fn(done, total) after each swapped unit's host copy is made (the host tier calls it)."""
        return self.host.on_slab_built

    @on_slab_built.setter
    def on_slab_built(self, callback: Callable[[int, int], None] | None) -> None:
        self.host.on_slab_built = callback

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
        return self.host.pinned_bytes(self.order)

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
        self.host.release(self.order)

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
        self.host.forget(self.order)
        self._placement.forget()

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
            self.host.drop(unit)
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
        # A unit left in its file is not adopted: this plan decides its tier afresh (nothing big to copy).
        theirs = {u.module: u for u in other.order if u.slab is not None and not u.in_file}
        adopted = 0
        for unit in self.order:
            donor = theirs.get(unit.module)
            if unit.slab is not None or donor is None:
                continue
            if [(t.owner, t.attr) for t in donor.layout] != [(o, a) for o, a, _, _ in unit.tensors()]:
                continue  # the module's tensors changed since the donor built its slab
            self.host.take_over(unit, donor, other.host)
            adopted += unit.nbytes
        self._claim_pinned_share()
        return adopted

    def _claim_pinned_share(self) -> None:
        if self.use_non_blocking and self.order:
            self.host.claim(self.order)

    def _teardown(self) -> None:
        run, self._run = self._run, None
        stats = None
        if run is not None:
            for handle in run.hooks:
                handle.remove()
            if run.staging is not None:
                run.staging.stop()
            run.transport.finish()
            stats = run.transport.stats()
        # Every swapped tensor views its slab again (a unit interrupted mid-forward is still bound to a
        # slot); then the placement puts tensors whose home is elsewhere back there.
        for unit in self.order:
            if unit.slab_views:
                self._bind(unit, unit.slab_views)
        self._placement.after_run(self)
        self.last_run = stats

    # -- slabs ---------------------------------------------------------------------------------

    def _ensure_slabs(self, sources: Mapping[int, torch.Tensor] | None = None) -> None:
        """Every swapped unit in its host slab (see `HostSlabs.ensure`)."""
        pin = self.use_non_blocking and self._streams is not None and self.offload_device.type == "cpu"
        self._claim_pinned_share()
        self.host.ensure(self.order, pin, sources, self._staging_buffers())

    def _staging_buffers(self) -> int:
        """Staging buffers for the units left in their files: where copies are asynchronous (a stream API),
        one per copy in flight plus one the reader fills ahead, at least two. On a CPU compute device the slot
        is host memory and a copy is the read itself: no staging."""
        if self._streams is None or self.transport_factory is not None:
            return 0
        return max(2, self.prefetch_blocks + 1)

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
        if self.host.staging is not None and isinstance(transport, CudaStreamTransport):
            # Last: the reader thread starts reading now, and nothing after it can fail before `_run` is set.
            run.staging = StagingReader(
                self.host.staging, self.order, self.host.copies_into, self._streams.Event
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
        if unit.in_file and run.staging is not None:
            # One copy from the staging buffer the reader filled (it waits here if the reader is behind).
            staged, waited = run.staging.take(position)
            run.transport.start_copy(slot, run.slots[slot][: unit.nbytes], staged[: unit.nbytes])
            run.staging.issued(run.transport.record_copies)
            self.counters.staged_units += 1
            self.counters.staged_bytes += unit.nbytes
            self.counters.staging_waits += waited
        else:
            for dst, src in self.host.copies_into(unit, run.slots[slot]):
                run.transport.start_copy(slot, dst, src)
        run.loaded[slot] = position
        run.fresh[slot] = True
        self.counters.copies += 1
        self.counters.bytes_copied += unit.nbytes

    _bind = staticmethod(bind)

    def _log_run_summary(self) -> None:
        c, stats = self.counters, self.last_run
        parts = [
            f"{c.passes} passes",
            f"{c.copies} copies",
            f"{format_bytes(c.bytes_copied)} moved ({format_bytes(c.bytes_copied // max(c.passes, 1))}/pass)",
            f"{c.misses} on-demand",
        ]
        if c.staged_units:
            parts.append(f"{c.staged_units} from the staging ring ({c.staging_waits} waited for its reader)")
        if stats is not None and stats.copy_ms:
            parts.append(f"copy {stats.copy_gbps(c.bytes_copied):.1f} GB/s")
            parts.append(f"stall {stats.stall_ms:.1f} ms ({stats.stall_ms / max(c.passes, 1):.2f} ms/pass)")
        if stats is not None and stats.peak_allocated is not None:
            parts.append(f"peak VRAM allocated {format_bytes(stats.peak_allocated)}")
        log.info("[BlockSwap] Run: %s", ", ".join(parts))


# ----------------------------------------------------------------------------------------------
# Plan summary
# ----------------------------------------------------------------------------------------------


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
