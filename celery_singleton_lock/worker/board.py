"""Shared memory where prefork pool children post the locks they hold, for the main process.

The worker's main process makes one :class:`LeaseBoard` before its pool forks, so every child
inherits the same pages. A child posts each lock it takes into a slot of its own and clears the
slot before it releases the lock: two writes to memory, no system call, nothing for the main
process to do while tasks come and go. The main process reads the board on a timer (and before
any decision that depends on it) to renew the locks that stay, and to release those of a child
that is gone or terminated.

Layout: ``SLOTS_PER_CHILD`` slots per pool child index (billiard's ``Process.index``, which a
replacement child inherits from the one it replaces). A child uses only slots that are empty,
so a slot still holding the lock of a child killed mid-task stays untouched until the main
process has released that lock and emptied it. Each slot has

* a header written only by its child: ``seq`` (odd while a write is in progress, the usual
  seqlock), the child's ``pid``, the payload ``length`` (0: empty) and a CRC-32 of the payload;
* a word written only by the main process: the ``seq`` of the post it renews and the number of
  renewals so far, which the child reads back when it lets go (for ``task-lock-released``);
* the payload: the lock's description, a dict of strings and numbers in ``marshal`` format
  (both sides run the same interpreter).

Headers sit together at the start of the board, so the main process sees "nothing changed"
with one comparison of bytes.
"""

from __future__ import annotations

import marshal
import mmap
import struct
import zlib
from typing import Any

__all__ = ["LeaseBoard", "SLOTS_PER_CHILD"]

#: Slots per pool child index: the running task's lock, a nested one, and room for the
#: predecessor's (a child killed holding a lock) until the main process has released it.
SLOTS_PER_CHILD = 4
#: Largest payload a slot holds; a longer description is not posted (the child renews itself).
PAYLOAD_SIZE = 2048

_SEQ = struct.Struct("<Q")
_HEAD = struct.Struct("<QIII4x")  # seq, pid, length, crc32
_MAIN = struct.Struct("<QI4x")  # seq of the renewed post, renewals (| LOST_FLAG)
#: Set in a post's renewal count once the main process found its lock lost (and said so).
LOST_FLAG = 1 << 31
_LENGTH_AT = 12  # offset of ``length`` in a header


class LeaseBoard:
    """``n_indexes`` rows of :data:`SLOTS_PER_CHILD` slots in anonymous shared memory."""

    def __init__(self, n_indexes: int) -> None:
        if n_indexes < 1:
            raise ValueError(f"n_indexes must be >= 1, got {n_indexes}")
        self.n_indexes = n_indexes
        self.n_slots = n_indexes * SLOTS_PER_CHILD
        #: Bytes of one slot's header in :meth:`headers`.
        self.header_size = _HEAD.size
        self._mains = self.n_slots * _HEAD.size
        self._payloads = self._mains + self.n_slots * _MAIN.size
        self.mem = mmap.mmap(-1, self._payloads + self.n_slots * PAYLOAD_SIZE)

    # -- the child's side ------------------------------------------------------------------

    def post(self, index: int, pid: int, msg: dict[str, Any]) -> tuple[int, int] | None:
        """Write ``msg`` into a free slot of child ``index``; ``(slot, seq)``, or None if full."""
        if not 0 <= index < self.n_indexes:
            return None
        payload = marshal.dumps(msg)
        if len(payload) > PAYLOAD_SIZE:
            return None
        mem = self.mem
        first = index * SLOTS_PER_CHILD
        for slot in range(first, first + SLOTS_PER_CHILD):
            head = slot * _HEAD.size
            seq, _pid, length, _crc = _HEAD.unpack_from(mem, head)
            if length:
                continue
            seq += 1 if seq % 2 else 2  # the next even number (a dead writer may leave it odd)
            _HEAD.pack_into(mem, head, seq - 1, pid, 0, 0)  # odd: writing
            at = self._payloads + slot * PAYLOAD_SIZE
            mem[at:at + len(payload)] = payload
            _HEAD.pack_into(mem, head, seq - 1, pid, len(payload), zlib.crc32(payload))
            _SEQ.pack_into(mem, head, seq)
            return slot, seq
        return None

    def clear(self, slot: int, seq: int) -> int:
        """Empty the slot posted as ``seq``; the renewals the main process made meanwhile."""
        return self.clear_and_read(slot, seq)[0]

    def clear_and_read(self, slot: int, seq: int) -> tuple[int, bool]:
        """Empty the slot posted as ``seq``: (the main process's renewals of it, whether the
        main process found its lock lost and reported it)."""
        mem = self.mem
        renewed_seq, renewals = _MAIN.unpack_from(mem, self._mains + slot * _MAIN.size)
        head = slot * _HEAD.size
        _SEQ.pack_into(mem, head, seq + 1)
        struct.pack_into("<I", mem, head + _LENGTH_AT, 0)
        _SEQ.pack_into(mem, head, seq + 2)
        if renewed_seq != seq:
            return 0, False
        return renewals & ~LOST_FLAG, bool(renewals & LOST_FLAG)

    # -- the main process's side -------------------------------------------------------------

    def headers(self) -> bytes:
        """Every slot's header, as one string of bytes (compare it to see what changed)."""
        return self.mem[:self._mains]

    def read(self, slot: int, attempts: int = 3) -> tuple[int, int, dict[str, Any] | None] | None:
        """``(seq, pid, msg or None if empty)``, or None while a write is in progress or torn."""
        mem = self.mem
        head = slot * _HEAD.size
        at = self._payloads + slot * PAYLOAD_SIZE
        for _ in range(attempts):
            seq, pid, length, crc = _HEAD.unpack_from(mem, head)
            if seq % 2 or length > PAYLOAD_SIZE:
                continue
            payload = mem[at:at + length] if length else b""
            if _SEQ.unpack_from(mem, head)[0] != seq:
                continue
            if not length:
                return seq, pid, None
            if zlib.crc32(payload) != crc:
                continue
            try:
                return seq, pid, marshal.loads(payload)
            except (ValueError, EOFError, TypeError):
                return None
        return None

    def pid_of(self, slot: int) -> int:
        return int(_HEAD.unpack_from(self.mem, slot * _HEAD.size)[1])

    def renewed(self, slot: int, seq: int, renewals: int, *, lost: bool = False) -> None:
        """Record, for the child, how often the main process renewed post ``seq`` (and
        whether it found the lock lost, so that the child does not report it again)."""
        value = (renewals & ~LOST_FLAG) | (LOST_FLAG if lost else 0)
        _MAIN.pack_into(self.mem, self._mains + slot * _MAIN.size, seq, value)

    def free(self, slot: int) -> None:
        """Empty a slot read whole whose child is gone (a child only writes empty slots)."""
        head = slot * _HEAD.size
        struct.pack_into("<I", self.mem, head + _LENGTH_AT, 0)

