"""The host tiers of the swap engine: where a swapped unit's bytes wait between its runs.

- RAM slab: one contiguous anonymous buffer per unit, page-locked within a budget shared by every engine
  in the process (the fastest copy source);
- file: a unit whose tensors are all views of a file mapping (a GGUF the loader memory-mapped) keeps no
  copy at all: its bytes stay the file's, in the page cache or on disk, and are copied into the device
  slot straight from those views.
The RAM policy ("auto") keeps slabs while they fit the free RAM less a reserve, and leaves the rest to
their files; RAM checks are made before anything is copied.

Pure torch, no ComfyUI import. The engine (block_manager.py) owns one `HostSlabs` and asks it for a unit's
host bytes; how those bytes reach a device slot (the ring, the copy stream, the hooks) is the engine's.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping

import torch

from .config import HOST_MEMORY_CHOICES
from .staging import StagingRing
from .tensor_layout import (
    SwapUnit,
    _check_views_alias,
    _copy_bytes,
    _layout,
    _layout_size,
    _leaves,
    _range_view,
    _view,
    bind,
    is_wrapper_tensor,
    plain_tensor,
    tensor_nbytes,
)
from .utils import format_bytes

log = logging.getLogger(__name__)

# Page-locked memory is not swappable; pinning more than this share of physical RAM starves the OS
# (Windows refuses beyond about half of RAM anyway).
DEFAULT_PINNED_RAM_SHARE = 0.45
WINDOWS_PINNED_RAM_SHARE = 0.40

# The share of the machine's RAM (or the cgroup's limit) that "auto" leaves free when it decides how
# many swapped units get a RAM slab: sampling, the VAE and the OS need it.
RAM_RESERVE_SHARE = 0.25

# The host tiers a plan can use: "auto" (RAM slabs while they fit, the file for the rest), "ram" (slabs
# for every swapped unit, the behaviour before the file tier), "file" (no slab for any unit whose bytes
# are a file's).
HOST_TIERS = HOST_MEMORY_CHOICES

# cudaHostRegisterPortable: the pinned range counts as pinned for every CUDA context, not only the current
# device's (ComfyUI's load device need not be the device current when the slab is built).
CUDA_HOST_REGISTER_PORTABLE = 1


# ----------------------------------------------------------------------------------------------
# Pinned host memory
# ----------------------------------------------------------------------------------------------


class _PinnedLedger:
    """Process-wide count of bytes this pack has page-locked, and the engines that share the budget.

    Each live engine's host tier claims its swapped bytes when it is made; it may pin up to its claim's
    share of the budget, so the second expert of a WAN 2.2 high/low pair is not left with pageable slabs
    because the first one took everything. A claim ends when the engine gives up its slabs or dies.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.bytes = 0
        self.claims: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()

    def share(self, owner: object, budget: int) -> int:
        total = sum(self.claims.values())
        claim = self.claims.get(owner, 0)
        return budget if total <= 0 else budget * claim // total


_PINNED = _PinnedLedger()


def pinned_bytes_in_use() -> int:
    return _PINNED.bytes


def pinned_ram_share(platform: str | None = None) -> float:
    """The most of the RAM that page-locked memory may take on this OS: Windows refuses or pages badly
    beyond about 40 %, ComfyUI there pins far less than on Linux."""
    return WINDOWS_PINNED_RAM_SHARE if (platform or sys.platform) == "win32" else DEFAULT_PINNED_RAM_SHARE


def default_pinned_budget() -> int:
    total = total_ram()
    if total is None:  # psutil missing or unreadable: pin nothing rather than guess
        return 0
    return int(total * pinned_ram_share())


def capped_pinned_budget(host_limit: float | None, host_pinned: int, total: int | None) -> int:
    """What this pack may page-lock beside a host that pins too: the host's own limit where it has one,
    never more than this OS's share of the RAM, less what the host pinned itself (both count against one
    limit, so the machine keeps at least the rest). host_limit None: the host has no such setting; <= 0: the
    host turned pinning off (ComfyUI's --disable-pinned-memory), so this pack pins nothing either."""
    cap = int(total * pinned_ram_share()) if total is not None else 0
    if host_limit is not None and host_limit <= 0:
        return 0
    limit = cap if host_limit is None else min(int(host_limit), cap)
    return max(limit - int(host_pinned), 0)


def _cgroup_memory() -> tuple[int, int] | None:
    """(limit, reclaimable-aware usage) of this process's memory cgroup, v2 or v1; None where none limits it.

    A container or a cgroup caps RAM below what the machine reports: the cap is what kills the process."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _id, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            base, files = f"/sys/fs/cgroup{path}", ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base = f"/sys/fs/cgroup/memory{path}"
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        try:
            with open(f"{base}/{files[0]}") as f:
                raw = f.read().strip()
            if raw == "max":
                return None
            with open(f"{base}/{files[1]}") as f:
                usage = int(f.read())
            with open(f"{base}/memory.stat") as f:
                stat = dict(line.split() for line in f if line.strip())
        except (OSError, ValueError):
            continue
        limit = int(raw)
        if limit >= 2**60:  # v1's "no limit"
            return None
        return limit, max(usage - int(stat.get(files[2], 0)), 0)
    return None


def total_ram() -> int | None:
    """This process's RAM: the machine's, or its memory cgroup's limit where that is lower."""
    try:
        import psutil

        total = int(psutil.virtual_memory().total)
    except Exception:
        return None
    cgroup = _cgroup_memory()
    return min(total, cgroup[0]) if cgroup else total


def available_ram() -> int | None:
    """Bytes of RAM the OS can give this process now without swapping (None if unknown): the machine's
    available memory, or what its memory cgroup has left where that is less (page cache counts as free)."""
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except Exception:
        return None
    cgroup = _cgroup_memory()
    return min(available, cgroup[0] - cgroup[1]) if cgroup else available


def _cuda_runtime():
    """CUDA's runtime API as torch exposes it (a seam: tests put a fake here)."""
    return torch.cuda.cudart()


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
    err = _cuda_runtime().cudaHostRegister(buffer.data_ptr(), nbytes, CUDA_HOST_REGISTER_PORTABLE)
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


def _remove_identical(items: list[torch.Tensor], item: torch.Tensor) -> None:
    """Remove `item` itself from `items`, in place (the engine's finalizer holds that very list).

    list.remove compares with ==, which for tensors is elementwise: it allocates a buffer-sized bool
    tensor and then fails (ambiguous truth value, or a size mismatch) for any entry but the first."""
    for i, other in enumerate(items):
        if other is item:
            del items[i]
            return
    raise ValueError("the slab is not in the pinned list")


def _release_slabs(pinned: list[torch.Tensor]) -> None:
    # Runs at release() or when the engine is garbage-collected. Holding the buffers until after the
    # unregister keeps their memory valid while it is still registered; parameters that still view
    # the slabs keep them alive afterwards as ordinary pageable memory.
    while pinned:
        _unpin(pinned.pop())


def _release_after_copies(pinned: list[torch.Tensor], copy_streams: list) -> None:
    # The finalizer: copies still in flight read the pinned slabs, so the host waits for them before
    # unregistering the memory.
    for stream in copy_streams:
        try:
            stream.synchronize()
        except RuntimeError:  # CUDA already torn down at interpreter exit: nothing is in flight any more
            pass
    _release_slabs(pinned)


class HostMemoryError(MemoryError):
    """The host slabs of a plan would not fit in the RAM that is free: raised before any is built."""


# ----------------------------------------------------------------------------------------------
# Where a tensor's bytes live: the process's own file mappings
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FileMapping:
    """One file-backed range of this process's address space whose bytes are the file's bytes unchanged:
    shared (writes would go to the file itself) or private and read-only (never copied on write)."""

    start: int
    end: int
    offset: int  # file offset of `start`
    path: str


def file_mappings(maps_text: str | None = None) -> list[FileMapping]:
    """The mappings of /proc/self/maps that hold a regular file's own bytes, sorted by address ([] where
    the OS has no /proc). A private writable mapping is left out: its pages may have been copied. So are
    files under /dev: device memory (CUDA's pinned host allocations map /dev/nvidia*) and /dev/shm, whose
    pages are RAM the OS cannot drop and re-read."""
    if maps_text is None:
        try:
            with open("/proc/self/maps") as f:
                maps_text = f.read()
        except OSError:
            return []
    found = []
    for line in maps_text.splitlines():
        parts = line.split(maxsplit=5)
        if (
            len(parts) < 6
            or not parts[5].startswith("/")
            or parts[5].endswith("(deleted)")
            or parts[5].startswith("/dev/")
        ):
            continue
        span, perms, offset, _dev, inode, path = parts
        if int(inode) == 0 or perms[0] != "r" or (perms[3] == "p" and perms[1] == "w"):
            continue
        start, end = (int(x, 16) for x in span.split("-"))
        found.append(FileMapping(start, end, int(offset, 16), path))
    found.sort(key=lambda m: m.start)
    return found


def file_backing(t: torch.Tensor, mappings: list[FileMapping]) -> tuple[str, int] | None:
    """(path, offset) of the file whose bytes t's plain CPU tensor is, contiguous, in one mapping; or None."""
    if t.device.type != "cpu" or not t.is_contiguous() or is_wrapper_tensor(t):
        return None
    nbytes = torch.Tensor.numel(t) * t.element_size()
    ptr = t.data_ptr()
    i = bisect.bisect_right([m.start for m in mappings], ptr) - 1
    if i < 0 or nbytes == 0:
        return None
    m = mappings[i]
    if not (m.start <= ptr and ptr + nbytes <= m.end):
        return None
    return m.path, m.offset + ptr - m.start


def choose_file_tier(
    sizes: list[int], file_backed: list[bool], mode: str, available: int | None, total: int | None
) -> list[bool]:
    """Which units keep no slab (True) and are read from their files.

    "ram": none. "file": every unit whose bytes are a file's. "auto": in execution order, a unit gets a
    RAM slab while the slabs so far leave `RAM_RESERVE_SHARE` of the RAM available; the file-backed units
    beyond that stay in their files (a unit that is not a file's always gets a slab). Unknown RAM figures
    keep the slabs, as before the file tier existed."""
    if mode not in HOST_TIERS:
        raise ValueError(f"host_memory must be one of {', '.join(HOST_TIERS)} (got {mode!r})")
    if mode == "ram":
        return [False] * len(sizes)
    if mode == "file":
        return list(file_backed)
    if available is None or total is None:
        return [False] * len(sizes)
    room = available - int(total * RAM_RESERVE_SHARE)
    chosen, used = [], 0
    for size, backed in zip(sizes, file_backed, strict=True):
        if backed and used + size > room:
            chosen.append(True)
            continue
        # A slab of a file-backed unit is new RAM; any other unit's slab replaces the RAM its tensors hold.
        used += size if backed else 0
        chosen.append(False)
    return chosen


# ----------------------------------------------------------------------------------------------
# Slabs: one contiguous host buffer per swapped unit
# ----------------------------------------------------------------------------------------------


class HostSlabs:
    """The host copies of one engine's swapped units, and which of them are page-locked.

    offload_device: where slabs live (CPU RAM).
    pinned_budget_bytes: most host RAM all engines together may page-lock, an int or a function returning
        one; None: a safe share of physical RAM.
    counters: the engine's counters (slab builds and source reads are counted there).
    on_slab_built: fn(done, total) after each unit's host copy is made or it is bound to its file (a
        progress bar; `done` counts the units in their order).
    remember_home: fn(unit, device) before a unit's tensors move into a new slab (where they were).
    tier: "auto", "ram" or "file" (see `choose_file_tier`).
    copy_streams: the engine's copy streams (a list it fills later): copies on them read the pinned slabs and
        staging buffers, so the finalizer waits for them before unpinning.
    """

    def __init__(
        self,
        offload_device: torch.device,
        pinned_budget_bytes: int | Callable[[], int] | None,
        counters,
        on_slab_built: Callable[[int, int], None] | None = None,
        remember_home: Callable[[SwapUnit, torch.device], None] | None = None,
        tier: str = "auto",
        copy_streams: list | None = None,
    ):
        if tier not in HOST_TIERS:
            raise ValueError(f"host_memory must be one of {', '.join(HOST_TIERS)} (got {tier!r})")
        self.tier = tier
        self.offload_device = offload_device
        self.pinned_budget_bytes = pinned_budget_bytes
        self.counters = counters
        self.on_slab_built = on_slab_built
        self.remember_home = remember_home
        # The slabs (and staging buffers) this tier has page-locked. The finalizer holds this very list:
        # every change is in place.
        self.pinned: list[torch.Tensor] = []
        self.copy_streams = copy_streams if copy_streams is not None else []
        # The buffers units left in their files are staged in on their way to a slot (see staging.py).
        self.staging: StagingRing | None = None
        self._finalizer = weakref.finalize(self, _release_after_copies, self.pinned, self.copy_streams)

    # -- the pinned budget ---------------------------------------------------------------------

    def claim(self, units: list[SwapUnit]) -> None:
        """Claim a share of the pinned budget in proportion to these units' bytes."""
        with _PINNED.lock:
            _PINNED.claims[self] = sum(_layout_size(u) for u in units)

    def give_up_claim(self) -> None:
        with _PINNED.lock:
            _PINNED.claims.pop(self, None)

    def budget(self) -> int:
        budget = self.pinned_budget_bytes
        if callable(budget):
            budget = budget()
        return max(int(default_pinned_budget() if budget is None else budget), 0)

    def share(self, budget: int) -> int:
        return _PINNED.share(self, budget)

    def may_pin(self, nbytes: int, budget: int, pinned_now: int) -> bool:
        """Whether `nbytes` more fit both the process-wide budget and this tier's share of it."""
        return nbytes <= min(budget - _PINNED.bytes, _PINNED.share(self, budget) - pinned_now)

    def pinned_bytes(self, units: list[SwapUnit]) -> int:
        """Bytes this tier holds page-locked: the units' pinned slabs and a pinned staging ring."""
        ring = self.staging.nbytes if self.staging is not None and self.staging.pinned else 0
        return ring + sum(u.slab.numel() for u in units if u.slab is not None and u.slab_pinned)

    # -- slabs ---------------------------------------------------------------------------------

    def ensure(
        self,
        units: list[SwapUnit],
        pin: bool,
        sources: Mapping[int, torch.Tensor] | None = None,
        staging_buffers: int = 0,
    ) -> None:
        """Every unit in its slab: built on first use, refreshed where a tensor was re-pointed since (a host
        that replaced a weight); untouched units cost nothing. pin: page-lock within the budget.

        staging_buffers: how many staging buffers the units left in their files need (0: none, their copies
        read the files directly); the ring is made before any slab is pinned: it serves every such unit."""
        sources = sources or {}
        for unit in units:
            if unit.in_file:
                if not _still_bound(unit):
                    # A host re-pointed a tensor (a weight replaced): decide the unit's tier again.
                    self.drop(unit)
            elif unit.slab is not None:
                self._refresh_slab(unit)
        if pin:
            self._pin_adopted_slabs(units)
        every = [u for u in units if u.slab is None and not u.in_file]
        started = time.perf_counter()
        to_build = self._leave_in_files(every, sources) if every else []
        if to_build:
            self.check_ram_for(to_build, sources)
        self._ensure_staging(units, staging_buffers, pin)
        if every:
            self._build_slabs(units, every, pin, sources, started)

    def _build_slabs(
        self,
        units: list[SwapUnit],
        every: list[SwapUnit],
        pin: bool,
        sources: Mapping[int, torch.Tensor],
        started: float,
    ) -> None:
        """A slab for each of `every` that the policy did not leave in its file (those are bound already)."""
        to_build = [u for u in every if not u.in_file]
        in_files = [u for u in every if u.in_file]
        budget = self.budget() if pin else 0
        pinned_bytes, warned_pin = 0, False
        for done, unit in enumerate(every, 1):
            if unit.in_file:  # bound to its file already: only the progress to report
                if self.on_slab_built is not None:
                    self.on_slab_built(done, len(every))
                continue
            allowed = self.may_pin(_layout_size(unit), budget, self.pinned_bytes(units))
            if self._build_slab(unit, pin and allowed, sources):
                pinned_bytes += unit.nbytes
            elif pin and not warned_pin:
                warned_pin = True
                log.warning(
                    "[BlockSwap] Pinned-memory budget (%s for this model of %s for all) reached or pinning "
                    "failed at %s: remaining swapped units use pageable RAM, so their copies cannot overlap compute",
                    format_bytes(max(self.share(budget), 0)),
                    format_bytes(budget),
                    unit.name,
                )
            if self.on_slab_built is not None:
                self.on_slab_built(done, len(every))
        total = sum(u.nbytes for u in to_build)
        log.info(
            "[BlockSwap] Host copies of %d swapped units built: %s (%s pinned, %s pageable) in %.2f s; "
            "%d units read from their files when they run: %s in the files (host_memory %s)",
            len(to_build),
            format_bytes(total),
            format_bytes(pinned_bytes),
            format_bytes(total - pinned_bytes),
            time.perf_counter() - started,
            len(in_files),
            format_bytes(sum(_file_bytes(u) for u in in_files)),
            self.tier,
        )

    # -- the staging ring ----------------------------------------------------------------------

    def _ensure_staging(self, units: list[SwapUnit], count: int, pin: bool) -> None:
        """`count` staging buffers (at most one per unit in its file), each the size of the largest such unit:
        kept while they fit, else replaced (after the copies that read them) or dropped."""
        in_file = [u for u in units if u.in_file]
        count = min(count, len(in_file))
        size = max((u.nbytes for u in in_file), default=0)
        ring = self.staging
        if ring is not None and ring.count == count and ring.size >= size:
            return
        if ring is not None:
            self._drop_staging(wait=True)
        if count == 0 or size == 0:
            return
        buffers = [torch.empty(size, dtype=torch.uint8, device=self.offload_device) for _ in range(count)]
        budget = self.budget() if pin else 0
        pinned = pin and self.may_pin(count * size, budget, self.pinned_bytes(units))
        if pinned:
            done = list(itertools.takewhile(_pin_in_place, buffers))
            pinned = len(done) == count
            if pinned:
                self.pinned.extend(buffers)
            else:  # all or none: a ring half pinned would copy at two speeds
                for buffer in done:
                    _unpin(buffer)
        self.staging = StagingRing(buffers, pinned)
        log.info(
            "[BlockSwap] %d staging buffers of %s %s (%s) for the %d swapped units read from their files",
            count,
            format_bytes(size),
            "pinned" if pinned else "pageable",
            format_bytes(count * size),
            len(in_file),
        )
        if pin and not pinned:
            log.warning(
                "[BlockSwap] Pinned-memory budget (%s for this model of %s for all) reached or pinning failed "
                "for the staging ring: units read from their files are copied from pageable RAM, so their "
                "copies cannot overlap compute",
                format_bytes(max(self.share(budget), 0)),
                format_bytes(budget),
            )

    def _drop_staging(self, wait: bool) -> None:
        """Give up the staging ring; wait: for the copy streams first (copies may still read it)."""
        ring, self.staging = self.staging, None
        if ring is None or not ring.pinned:
            return
        if wait:
            for stream in self.copy_streams:
                stream.synchronize()
        for buffer in ring.buffers:
            _remove_identical(self.pinned, buffer)
            _unpin(buffer)

    def _leave_in_files(self, units: list[SwapUnit], sources: Mapping[int, torch.Tensor]) -> list[SwapUnit]:
        """Put the units the policy leaves in their files there (bound to the file views, no copy); return
        the units that need a slab."""
        if self.tier == "ram" or self.offload_device.type != "cpu":
            return units
        mappings = file_mappings()
        views = [_file_views(u, sources, mappings) for u in units]
        in_file = choose_file_tier(
            [_layout_size(u) for u in units],
            [any(v is not None for v in unit_views) for unit_views in views],
            self.tier,
            available_ram(),
            total_ram(),
        )
        slabs = []
        for unit, unit_views, chosen in zip(units, views, in_file, strict=True):
            if chosen:
                self._bind_to_files(unit, unit_views, sources)
            else:
                slabs.append(unit)
        return slabs

    def _bind_to_files(
        self, unit: SwapUnit, file_views: list[torch.Tensor | None], sources: Mapping[int, torch.Tensor]
    ) -> None:
        """Leave the unit's file-backed tensors in their file; the others (norms ComfyUI copied into new
        parameters, converted weights) go into a small slab of their own. Its tensors are then bound to
        those homes: the file views and the small slab's views."""
        current = list(unit.tensors())
        if self.remember_home is not None:
            self.remember_home(unit, self.offload_device)
        unit.layout, unit.nbytes = _layout(current)
        rest = [entry for entry, view in zip(current, file_views, strict=True) if view is None]
        rest_layout, rest_bytes = _layout(rest)
        unit.slab = torch.empty(rest_bytes, dtype=torch.uint8, device=self.offload_device) if rest else None
        rest_views = iter([_view(unit.slab, spec) for spec in rest_layout])
        home = [view if view is not None else next(rest_views) for view in file_views]
        for (owner, attr, _, t), view, file_view in zip(current, home, file_views, strict=True):
            if file_view is None:
                self._fill(unit, owner, attr, t, view, sources)
            elif sources.get(id(t)) is not None:
                self.counters.slab_tensors_from_sources += 1
                self.counters.slab_bytes_from_sources += tensor_nbytes(file_view)
        unit.slab_views, unit.in_file = home, True
        bind(unit, home)
        if rest:
            self.counters.slab_bytes_built += rest_bytes

    def copies_into(self, unit: SwapUnit, slot: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(destination, source) pairs that fill `slot` with the unit's bytes: the whole slab at once, or
        for a unit left in its file each tensor from its file view into its place in the slot."""
        if not unit.in_file:
            return [(slot[: unit.nbytes], unit.slab)]
        pairs = []
        for spec, home in zip(unit.layout, unit.slab_views, strict=True):
            for r, leaf in zip(spec.ranges, _leaves(home), strict=True):
                pairs.append((_range_view(slot, r), leaf))
        return pairs

    def tier_summary(self, units: list[SwapUnit]) -> dict[str, int]:
        """Units and bytes per host tier: pinned slabs, pageable slabs, file-backed."""
        slabs = [u for u in units if u.slab is not None and not u.in_file]
        pinned = [u for u in slabs if u.slab_pinned]
        pageable = [u for u in slabs if not u.slab_pinned]
        in_file = [u for u in units if u.in_file]
        return {
            "pinned_units": len(pinned),
            "pinned_bytes": sum(u.nbytes for u in pinned),
            "pageable_units": len(pageable),
            "pageable_bytes": sum(u.nbytes for u in pageable),
            "file_units": len(in_file),
            "file_bytes": sum(_file_bytes(u) for u in in_file),
            "file_units_rest_bytes": sum(u.slab.numel() for u in in_file if u.slab is not None),
            "staging_buffers": self.staging.count if self.staging is not None else 0,
            "staging_bytes": self.staging.nbytes if self.staging is not None else 0,
            "staging_pinned": bool(self.staging is not None and self.staging.pinned),
        }

    def drop(self, unit: SwapUnit) -> None:
        """The unit leaves the swapped set: unpin its slab and leave the memory to the tensors viewing it."""
        if unit.slab is not None and unit.slab_pinned:
            _remove_identical(self.pinned, unit.slab)
            _unpin(unit.slab)
        unit.slab, unit.slab_views, unit.layout, unit.nbytes, unit.slab_pinned = None, [], [], 0, False
        unit.pin_failed = unit.in_file = False

    def take_over(self, unit: SwapUnit, donor: SwapUnit, donor_slabs: HostSlabs) -> None:
        """`unit` (same module) takes `donor`'s slab, pinned or not, from the tier that built it."""
        unit.layout, unit.nbytes, unit.slab, unit.slab_views = (
            donor.layout,
            donor.nbytes,
            donor.slab,
            donor.slab_views,
        )
        unit.slab_pinned, donor.slab_pinned = donor.slab_pinned, False
        unit.pin_failed = donor.pin_failed
        if unit.slab_pinned:
            _remove_identical(donor_slabs.pinned, donor.slab)
            self.pinned.append(unit.slab)
        donor.slab, donor.slab_views, donor.layout, donor.nbytes = None, [], [], 0

    def release(self, units: list[SwapUnit]) -> None:
        """Unpin every slab; they stay valid as pageable memory. The staging ring is given up (the next
        attach makes a new one). The caller has waited for the copies that read them."""
        _release_slabs(self.pinned)
        self.staging = None
        for unit in units:
            unit.slab_pinned = False

    def forget(self, units: list[SwapUnit]) -> None:
        """Give up the slabs (unpinned first): the tensors that view them keep the memory."""
        self.release(units)
        for unit in units:
            unit.slab, unit.slab_views, unit.layout, unit.nbytes, unit.pin_failed = None, [], [], 0, False
            unit.in_file = False
        self.give_up_claim()

    def _pin_adopted_slabs(self, units: list[SwapUnit]) -> None:
        """Pin, within the budget, slabs this plan took over pageable (from a plan made without
        use_non_blocking, or beyond the budget then): without it their copies could never overlap."""
        pageable = [
            u
            for u in units
            if u.slab is not None and not u.in_file and not u.slab_pinned and not u.pin_failed
        ]
        if not pageable:
            return
        budget = self.budget()
        for unit in pageable:
            if not self.may_pin(unit.nbytes, budget, self.pinned_bytes(units)):
                continue
            unit.slab_pinned = _pin_in_place(unit.slab)
            unit.pin_failed = not unit.slab_pinned
            if unit.slab_pinned:
                self.pinned.append(unit.slab)

    def check_ram_for(self, units: list[SwapUnit], sources: Mapping[int, torch.Tensor] | None = None) -> None:
        """Refuse, before copying anything, slabs the free RAM cannot hold.

        A unit whose tensors are in CPU RAM frees them as its slab takes over (the parameters are the only
        owners), so it needs one unit of headroom at a time; a unit that sits on another device (a model
        created on the GPU), is read from sources (its tensors were never filled, so freeing them returns
        nothing) or views a mapped file (page cache, which the slab does not give back) needs its whole
        slab in new RAM.
        """
        sources = sources or {}
        free = available_ram()
        if free is None or self.offload_device.type != "cpu":
            return
        mappings = file_mappings()
        sizes = [_layout_size(u) for u in units]
        elsewhere = sum(
            size
            for size, u in zip(sizes, units, strict=True)
            if any(
                t.device.type != "cpu"
                or id(t) in sources
                or any(file_backing(leaf, mappings) is not None for leaf in _leaves(t))
                for *_, t in u.tensors()
            )
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
        if self.remember_home is not None:
            self.remember_home(unit, current[0][3].device if current else self.offload_device)
        unit.slab = torch.empty(unit.nbytes, dtype=torch.uint8, device=self.offload_device)
        unit.slab_views = [_view(unit.slab, spec) for spec in unit.layout]
        _check_views_alias(unit, unit.slab)
        if pin:
            unit.slab_pinned = _pin_in_place(unit.slab)
            unit.pin_failed = not unit.slab_pinned
            if unit.slab_pinned:
                self.pinned.append(unit.slab)
        for (owner, attr, _, t), view in zip(current, unit.slab_views, strict=True):
            self._fill(unit, owner, attr, t, view, sources)
        bind(unit, unit.slab_views)
        self.counters.slabs_built += 1
        self.counters.slab_bytes_built += unit.nbytes
        return unit.slab_pinned

    def _fill(self, unit, owner, attr, t, view, sources: Mapping[int, torch.Tensor]) -> None:
        """Copy t's value into its slab view: from its source where `sources` names one, else from t."""
        source = sources.get(id(t))
        if source is None:
            _copy_bytes(view, t)
            return
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
            bind(unit, unit.slab_views)


def _file_views(
    unit: SwapUnit, sources: Mapping[int, torch.Tensor], mappings: list[FileMapping]
) -> list[torch.Tensor | None]:
    """Each of the unit's tensors (in its tensor order) as a view of the file mapping that holds its bytes
    unchanged (from `sources` where one is given for it), or None where its bytes are not a file's.

    A plain tensor's home is a plain alias of its file bytes; a wrapper subclass (fp8_scaled weights) keeps
    its own object when every inner tensor is a file view."""
    views: list[torch.Tensor | None] = []
    for _owner, _attr, _is_param, t in unit.tensors():
        source = sources.get(id(t))
        if source is not None:
            same = (
                not is_wrapper_tensor(t)
                and not is_wrapper_tensor(source)
                and source.dtype == t.dtype
                and tuple(torch.Tensor.size(source)) == tuple(torch.Tensor.size(t))
            )
            if not same:  # converted on the way in: the file does not hold these bytes
                views.append(None)
                continue
            t = source
        if not mappings or any(file_backing(leaf, mappings) is None for leaf in _leaves(t)):
            views.append(None)
        else:
            views.append(t if is_wrapper_tensor(t) else plain_tensor(t))
    return views


def _file_bytes(unit: SwapUnit) -> int:
    """Bytes of a unit that stay in its file (the tensors whose home is not its small slab)."""
    if unit.slab is None:
        return sum(spec.nbytes for spec in unit.layout)
    start, end = unit.slab.data_ptr(), unit.slab.data_ptr() + unit.slab.numel()
    return sum(
        spec.nbytes
        for spec, home in zip(unit.layout, unit.slab_views, strict=True)
        if not all(start <= leaf.data_ptr() < end for leaf in _leaves(home))
    )


def at_home(unit: SwapUnit) -> bool:
    """Every tensor of the unit views its home between runs: its slab, or the file bytes it was bound to."""
    return bool(unit.slab_views) and _still_bound(unit)


def _still_bound(unit: SwapUnit) -> bool:
    """Every tensor of a unit left in its file still views the file bytes it was bound to."""
    return all(
        [leaf.data_ptr() for leaf in _leaves(t)] == [leaf.data_ptr() for leaf in _leaves(home)]
        for (*_, t), home in zip(unit.tensors(), unit.slab_views, strict=True)
    )
