"""The staging ring: how a swapped unit left in its file reaches a device slot with one asynchronous copy.

A unit of the file tier has no host copy of its own: its bytes are a file's mapping (page cache, or the disk
when the page cache dropped them). A GPU copy from pageable memory is staged by the driver while the host
waits, so it never overlaps compute. Instead a reader thread fills a few staging buffers (pinned within the
pinned budget), each laid out as the unit's slot, with the next file-tier units in execution order, ahead of
the copy stream; the engine then fills the slot with one copy from a staged buffer.

Ordering, per staging buffer:
- the engine issues a unit's copy only once the reader has staged it (`StagingReader.take` waits);
- right after that copy the engine records the buffer's event on the copy stream (`StagingReader.issued`);
  the reader overwrites the buffer only after that event completed (`event.synchronize()` on the reader
  thread): the copy has read it by then. The events live with the buffers, so a run's first refill also
  waits for the last run's copies.

The buffers live as long as the engine's host tier (`HostSlabs.staging`); the reader thread lives for one run.
Pure torch, no ComfyUI import.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable

import torch

from .tensor_layout import SwapUnit

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class StagingRing:
    """The staging buffers of one engine: `count` host buffers of `size` bytes, pinned or pageable, and per
    buffer the event recorded after the latest copy that read it (made by the first run that has a stream
    API; None before)."""

    buffers: list[torch.Tensor]
    pinned: bool
    events: list | None = None

    @property
    def count(self) -> int:
        return len(self.buffers)

    @property
    def size(self) -> int:
        return self.buffers[0].numel() if self.buffers else 0

    @property
    def nbytes(self) -> int:
        return self.count * self.size


def _stage_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """The reader's host write into a staging buffer (a seam: the stream-model tests check every write
    against the copies that may still read the buffer)."""
    dst.copy_(src)


# What a staging buffer holds: nothing the run wants (free to refill), a unit being read, a unit read, or a
# unit whose copy the engine is issuing now.
_FREE, _STAGING, _STAGED, _ISSUING = "free", "staging", "staged", "issuing"


@dataclasses.dataclass
class _Entry:
    position: int = -1  # the unit (its index in execution order) the buffer holds or is being filled with
    seq: int = -1  # the reader's count of units staged, at this one: the run takes them in this order
    state: str = _FREE
    valid: bool = False  # False: the run left the order the reader predicted; the bytes will not be used


class StagingReader:
    """One run's reader thread over a `StagingRing`.

    The reader stages the file-tier units in execution order (cyclically: the next pass follows), as many
    ahead as there are free buffers. The engine takes the unit it copies next; when the run leaves that
    order (a unit repeated or skipped, a pass cut short) the reader is restarted at the unit taken.

    units: the swapped units in execution order; only those with `in_file` are staged.
    copies_into: fn(unit, buffer) -> (destination, source) pairs that fill buffer with the unit's bytes in
        its slot layout (`HostSlabs.copies_into`).
    new_event: the stream API's Event (None: copies are synchronous, nothing to wait for).
    """

    def __init__(
        self,
        ring: StagingRing,
        units: list[SwapUnit],
        copies_into: Callable[[SwapUnit, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]],
        new_event: Callable[[], object] | None = None,
    ):
        self.ring = ring
        self.units = units
        self.copies_into = copies_into
        if new_event is not None and ring.events is None:
            ring.events = [new_event() for _ in ring.buffers]
        in_file = [i for i, u in enumerate(units) if u.in_file]
        self._next = {p: in_file[(j + 1) % len(in_file)] for j, p in enumerate(in_file)}
        self._entries = [_Entry() for _ in ring.buffers]
        # Free buffers, the one whose last copy was issued longest ago first (its event is the likeliest done).
        self._free = collections.deque(range(ring.count))
        self._cursor = in_file[0] if in_file else None  # the next unit to stage
        self._seq = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._error: BaseException | None = None
        self._error_unit = ""
        self._error_raised = False
        self._taken = -1  # the buffer `take` returned last
        self._thread = threading.Thread(target=self._read, name="BlockSwap staging reader", daemon=True)
        self._thread.start()

    # -- the run's thread ------------------------------------------------------------------------------------

    def take(self, position: int) -> tuple[torch.Tensor, bool]:
        """(the staging buffer holding unit `position`, whether the reader had not staged it yet), once the
        reader has staged it. Its bytes must be copied before the next call, and `issued` called right after
        the copy."""
        with self._cond:
            k = self._find(position)
            if k is None:
                # The run left the predicted order: what is staged will not be used; stage from here on.
                for i in range(len(self._entries)):
                    self._invalidate(i)
                self._cursor = position
                self._cond.notify_all()
            waited = False
            while True:
                k = self._find(position)
                if k is not None and self._entries[k].state == _STAGED:
                    break
                self._raise_reader_error()  # it will stage nothing more
                waited = True
                self._cond.wait()
            taken = self._entries[k]
            for i, entry in enumerate(self._entries):  # staged before this one: units the run skipped
                if entry.valid and entry.seq < taken.seq:
                    self._invalidate(i)
            taken.state, taken.valid = _ISSUING, False
            self._taken = k
            return self.ring.buffers[k], waited

    def issued(self, record: Callable[[object], None]) -> None:
        """The copy from the buffer `take` returned is issued: record(event) marks its completion on the copy
        stream, and the reader may refill the buffer once that event completed."""
        k = self._taken
        if self.ring.events is not None:
            record(self.ring.events[k])
        with self._cond:
            self._entries[k].state = _FREE
            self._free.append(k)
            self._cond.notify_all()

    def stop(self) -> None:
        """End of the run: stop the reader and wait for it (a unit it is reading is finished first). A reader
        error the run never met (a unit staged ahead that was not needed) is logged."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
        if self._error is not None and not self._error_raised:
            log.warning("[BlockSwap] %s", self._error_message())

    # -- the reader thread -----------------------------------------------------------------------------------

    def _read(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not (self._free and self._cursor is not None):
                    self._cond.wait()
                if self._stopping:
                    return
                k = self._free.popleft()
                position, self._cursor = self._cursor, self._next[self._cursor]
                entry = self._entries[k]
                entry.position, entry.seq, entry.state, entry.valid = position, self._seq, _STAGING, True
                self._seq += 1
            try:
                self._fill(k, self.units[position])
            except BaseException as exc:  # handed to the run's thread at its next take, never dropped
                with self._cond:
                    self._error, self._error_unit = exc, self.units[position].name
                    self._cond.notify_all()
                return
            with self._cond:
                if entry.valid:
                    entry.state = _STAGED
                elif entry.state == _STAGING:  # the run moved on while it was read: free, nothing pending
                    entry.state = _FREE
                    self._free.appendleft(k)
                self._cond.notify_all()

    def _fill(self, k: int, unit: SwapUnit) -> None:
        if self.ring.events is not None:
            # The copy that read this buffer last (this run's or an earlier run's) must have finished.
            self.ring.events[k].synchronize()
        for dst, src in self.copies_into(unit, self.ring.buffers[k]):
            _stage_bytes(dst, src)

    # -- shared state (under the condition's lock) -----------------------------------------------------------

    def _find(self, position: int) -> int | None:
        for k, entry in enumerate(self._entries):
            if entry.valid and entry.position == position:
                return k
        return None

    def _invalidate(self, k: int) -> None:
        entry = self._entries[k]
        if not entry.valid:
            return
        entry.valid = False
        if entry.state == _STAGED:  # read, never copied: nothing pending on it
            entry.state = _FREE
            self._free.appendleft(k)

    def _raise_reader_error(self) -> None:
        if self._error is not None:
            self._error_raised = True
            raise RuntimeError(f"[BlockSwap] {self._error_message()}") from self._error

    def _error_message(self) -> str:
        exc = self._error
        return f"Reading {self._error_unit} from its file into a staging buffer failed ({type(exc).__name__}: {exc})"
