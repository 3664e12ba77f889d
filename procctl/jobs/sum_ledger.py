"""The sum job's ledger: one shared page that outlives any worker.

Both sides use this module; it holds no policy.  The manager creates the
page, every worker maps it, and each worker writes only its own slot, so a
SIGKILLed worker still leaves its counts behind (its return value is lost
with it).

    word 0      the claim: 0 while nobody has won, else the winner's index + 1
    slot i      8 words for worker i:
      [0]       commit number; its low bit picks the valid pair below
      [1] [2]   pair 0: items, value sum
      [3] [4]   pair 1: items, value sum
      [5] [6]   pending: a producer's item count and value sum about to be
                put; a consumer's 1 while it is inside a get

A commit writes the pair that is not in use, then bumps the commit number: a
worker killed at any instruction leaves a whole pair behind.  Whether a
pending put went through, or a get took an item the consumer never counted,
the manager reads off the channel's own accounting (see sum_threshold.py).

Value sums are kept modulo 2**64 (the words are unsigned); the manager makes
a killed worker's whole again from its count of values (sum_threshold._unwrap).

The claim is a test-and-set under a POSIX record lock on the page's file: a
winner killed while it holds the lock releases it with its death.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from dataclasses import dataclass
from typing import Any

from ..channel import InheritedFd, size_shared

SLOT_WORDS = 8
WORD = 8
MASK = (1 << 64) - 1
_CLAIM = 0
_FIRST_SLOT = 1


@dataclass(frozen=True)
class SlotRecord:
    """What a worker left in its slot."""

    items: int
    value_sum: int  # modulo 2**64
    pending_items: int
    pending_sum: int


class Ledger:
    """The shared page: the manager's (`Ledger(workers)`) or a worker's (`Ledger.attach`)."""

    def __init__(self, workers: int, fd: int | None = None) -> None:
        size = max((_FIRST_SLOT + workers * SLOT_WORDS) * WORD, mmap.PAGESIZE)
        self.fd = os.memfd_create("procctl-sum-ledger", os.MFD_CLOEXEC) if fd is None else fd
        if fd is None:
            try:
                size_shared(self.fd, size, "the sum job's shared ledger")
            except OSError:
                os.close(self.fd)
                raise
        self._map = mmap.mmap(self.fd, size)
        self.words = memoryview(self._map).cast("Q")
        self.workers = workers

    @classmethod
    def attach(cls, passed: Any, workers: int) -> Ledger:
        """A worker's view of the page handed over as `handoff()`."""
        return cls(workers, passed.detach())

    def handoff(self) -> InheritedFd:
        """What to pass to the workers, under any start method."""
        return InheritedFd(self.fd)

    def close(self) -> None:
        if self._map.closed:
            return
        self.words.release()
        self._map.close()
        os.close(self.fd)

    # -- the claim -------------------------------------------------------------

    def claim(self, index: int) -> bool:
        """True for the first caller only, across processes."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            if self.words[_CLAIM]:
                return False
            self.words[_CLAIM] = index + 1
            return True
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def winner(self) -> int:
        """The index that claimed first, or -1."""
        return int(self.words[_CLAIM]) - 1

    # -- slots -------------------------------------------------------------------

    def slot(self, worker_id: int) -> Slot:
        if not 0 <= worker_id < self.workers:
            raise IndexError(f"no slot for worker {worker_id}")
        return Slot(self.words, _FIRST_SLOT + worker_id * SLOT_WORDS)

    def read(self, worker_id: int) -> SlotRecord:
        w, b = self.words, _FIRST_SLOT + worker_id * SLOT_WORDS
        pair = b + 1 + 2 * (w[b] & 1)
        return SlotRecord(int(w[pair]), int(w[pair + 1]), int(w[b + 5]), int(w[b + 6]))


class Slot:
    """One worker's words; only that worker writes them."""

    __slots__ = ("words", "base")

    def __init__(self, words: memoryview, base: int) -> None:
        self.words = words
        self.base = base

    def commit(self, items: int, value_sum: int) -> None:
        w, b = self.words, self.base
        seq = w[b] + 1
        pair = b + 1 + 2 * (seq & 1)
        w[pair] = items
        w[pair + 1] = value_sum & MASK
        w[b] = seq  # the switch: one store

    def pend(self, items: int, value_sum: int) -> None:
        w, b = self.words, self.base
        w[b + 5] = items
        w[b + 6] = value_sum & MASK

    def clear_pending(self) -> None:
        self.words[self.base + 5] = 0
