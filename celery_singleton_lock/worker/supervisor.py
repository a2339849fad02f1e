"""The worker main process's view of the locks its pool children hold.

With the prefork pool a task body runs in a child process, but several endings are only seen
in the worker's main process: ``revoke(terminate=True)``, a hard time limit, a child killed by
a signal. And a body that holds the GIL in one long C call starves any renewal thread inside
its own child. So each child posts the lock it takes on a :class:`~.board.LeaseBoard` (shared
memory made before the pool forks) and clears it before it releases the lock, and the main
process, reading the board:

* renews the locks that stay, with its own renewer (one thread, batched, for every child);
* releases a task's locks on ``task_revoked`` (terminate), ``task_failure`` with
  ``WorkerLostError`` or ``TimeLimitExceeded``, and when it sees the child's pid gone;
* on a lost lock: logs, sends ``lock_lost``, and with ``lock_on_lost="abort"`` signals the
  child (``SIGUSR2``), whose handler raises :class:`LockLostError` inside the running body.

A child clears its slot *before* it deletes the lock, so the main process never mistakes a
normal release for a lost lock: it reads the board again before it declares one lost. A lock
taken and released between two readings of the board costs the main process nothing.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .._process import current_pid
from .board import LeaseBoard
from ..lease import Lease
from ..renewer import get_renewer
from ..backends.base import LockBackend

__all__ = [
    "Supervisor", "ChildPoster", "child_started", "current_supervisor", "current_poster",
]

logger = logging.getLogger("celery_singleton_lock.supervisor")

#: How often the main process reads the board (new locks to renew, locks let go), seconds.
SCAN_INTERVAL_S = 0.05
#: How often the main process checks that the children holding locks are alive, seconds.
REAP_INTERVAL_S = 0.2
#: Child indexes the board has room for at least (billiard numbers children from 0).
MIN_CHILD_INDEXES = 16

Ident = tuple[str, str]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


class Supervisor:
    """Runs in the worker main process; adopts, renews and releases the children's locks."""

    def __init__(
        self,
        store_for: Callable[[str], LockBackend | None],
        on_lost: Callable[[Lease, dict[str, Any]], None],
        on_released: Callable[[Lease, dict[str, Any], str], None],
        n_indexes: int = MIN_CHILD_INDEXES,
    ) -> None:
        self.store_for = store_for
        self._on_lost = on_lost
        self._on_released = on_released
        self.board = LeaseBoard(max(n_indexes, MIN_CHILD_INDEXES))
        self.pid = os.getpid()
        self._mutex = threading.RLock()
        #: (key, token) -> (lease, the child's post)
        self.held: dict[Ident, tuple[Lease, dict[str, Any]]] = {}
        #: slot -> (seq, lock) of the post last read there
        self._slots: dict[int, tuple[int, Ident]] = {}
        #: Every slot's header as last read whole (an all-zero header: never posted).
        self._headers = bytearray(len(self.board.headers()))
        self._stopped = False
        self._wake = threading.Event()
        self._scan_mutex = threading.Lock()
        self._thread = threading.Thread(
            target=self._loop, name="celery-singleton-lock-supervisor", daemon=True
        )
        self._thread.start()

    # -- reading the board ------------------------------------------------------------------

    def _loop(self) -> None:
        next_reap = time.monotonic() + REAP_INTERVAL_S
        while not self._stopped:
            self._wake.wait(SCAN_INTERVAL_S)
            if self._stopped:
                return
            try:
                self.scan()
                if time.monotonic() >= next_reap:
                    self.reap()
                    next_reap = time.monotonic() + REAP_INTERVAL_S
            except Exception:
                logger.exception("lock supervisor failed reading the board")

    def scan(self) -> None:
        """Adopt the locks posted since the last reading, forget those the children let go.

        One thread at a time, so a lock is never adopted after its child cleared it. A slot
        is read again only when its header changed since it was last read whole.
        """
        board = self.board
        size = board.header_size
        with self._scan_mutex:
            headers = board.headers()
            seen = self._headers
            if headers != seen:
                for at in range(0, len(headers), size):
                    now = headers[at:at + size]
                    if now != seen[at:at + size] and self._read_slot(at // size):
                        seen[at:at + size] = now
            self._publish_renewals()

    def _read_slot(self, slot: int) -> bool:
        got = self.board.read(slot)
        if got is None:
            return False  # a post in progress (or a child killed mid-post: never readable)
        seq, pid, msg = got
        before = self._slots.get(slot)
        ident = (msg["key"], msg["token"]) if msg is not None else None
        if before is not None and before[1] != ident:
            self._let_go(before[1])
        if msg is None or ident is None:
            self._slots.pop(slot, None)
            return True
        if before is None or before[1] != ident:
            msg["pid"] = pid
            self._adopt(msg, slot, seq)
        self._slots[slot] = (seq, ident)
        return True

    def _adopt(self, msg: dict[str, Any], slot: int, seq: int) -> None:
        store = self.store_for(msg.get("task", ""))
        if store is None:
            logger.warning("no lock store for task %s; cannot renew %s", msg.get("task"),
                           msg["key"])
            return
        lease = Lease(store, msg["key"], msg["token"], float(msg["ttl"]),
                      fencing_token=int(msg.get("fence", 0)), owner=msg.get("task_id", ""),
                      task_name=msg.get("task", ""), started=msg.get("started"),
                      validity_s=msg.get("validity"), acquired_at=msg.get("acquired_at"),
                      info={f: msg[f] for f in ("hostname", "pid", "mode") if f in msg})
        lease.before_lost = self.scan
        lease.on_lost(functools.partial(self._lost, msg=msg))
        msg["slot"], msg["seq"] = slot, seq
        with self._mutex:
            self.held[(lease.key, lease.token)] = (lease, msg)
        get_renewer().add(lease)

    def _let_go(self, ident: Ident) -> None:
        """The child cleared its post: it releases the lock itself."""
        with self._mutex:
            item = self.held.pop(ident, None)
        if item is not None:
            item[0].released = True
            get_renewer().remove(item[0])

    def _publish_renewals(self) -> None:
        with self._mutex:
            items = list(self.held.values())
        for lease, msg in items:
            if lease.renewals != msg.get("posted_renewals", 0):
                msg["posted_renewals"] = lease.renewals
                self.board.renewed(msg["slot"], msg["seq"], lease.renewals)

    def _lost(self, lease: Lease, msg: dict[str, Any]) -> None:
        with self._mutex:
            self.held.pop((lease.key, lease.token), None)
        self.board.renewed(msg["slot"], msg["seq"], lease.renewals, lost=True)
        self._on_lost(lease, msg)

    # -- endings seen only here ------------------------------------------------------------

    def release_task(self, task_id: str, reason: str, *, if_exited: bool = False) -> int:
        """Release every lock held for ``task_id`` (revoke, time limit, lost child).

        With ``if_exited``, the locks of a child that is still alive are left alone: its body
        may still run (``revoke(terminate=True, signal="SIGUSR1")`` raises
        SoftTimeLimitExceeded in it; a hard time limit kills the child only after this
        call), so they go when the child clears its post or :meth:`reap` sees it gone.
        """
        self.scan()
        with self._mutex:
            items = [
                (k, v) for k, v in self.held.items()
                if v[1].get("task_id") == task_id
                and not (if_exited and _pid_alive(int(v[1].get("pid", 0))))
            ]
            for k, _ in items:
                self.held.pop(k, None)
        for _, (lease, msg) in items:
            lease.release()
            self._on_released(lease, msg, reason)
        return len(items)

    def reap(self) -> None:
        """Release the locks of children that are gone (killed, crashed), and free their slots."""
        board = self.board
        with self._scan_mutex:
            gone = [(slot, seq, ident) for slot, (seq, ident) in self._slots.items()
                    if not _pid_alive(board.pid_of(slot))]
        for slot, seq, ident in gone:
            with self._mutex:
                item = self.held.pop(ident, None)
            if item is not None:
                lease, msg = item
                lease.release()
                self._on_released(lease, msg, "worker_lost")
            with self._scan_mutex:
                if self._slots.get(slot) == (seq, ident):
                    board.free(slot)
                    del self._slots[slot]

    def leases(self) -> list[tuple[Lease, dict[str, Any]]]:
        self.scan()
        with self._mutex:
            return list(self.held.values())

    def stop(self, release: bool = True) -> None:
        self._stopped = True
        self._wake.set()
        self.scan()
        if release:
            with self._mutex:
                items = list(self.held.values())
                self.held.clear()
            for lease, msg in items:
                lease.release()
                self._on_released(lease, msg, "shutdown")


class ChildPoster:
    """Runs in a pool child: posts the locks this child takes on the board."""

    def __init__(self, board: LeaseBoard, index: int) -> None:
        self.board = board
        self.index = index

    def post(self, msg: dict[str, Any]) -> tuple[int, int] | None:
        """Post a lock; a handle for :meth:`clear`, or None if there is no room for it."""
        return self.board.post(self.index, current_pid(), msg)

    def clear(self, handle: tuple[int, int]) -> tuple[int, bool]:
        """Take the post down (before the release): the main process's renewals of it, and
        whether the main process found the lock lost (and reported it)."""
        return self.board.clear_and_read(*handle)


_supervisor: Supervisor | None = None
_poster: ChildPoster | None = None
_poster_pid = 0
#: The board, inherited by forked children, and the process that made it.
_board: LeaseBoard | None = None
_main_pid: int | None = None


def start_supervisor(
    store_for: Callable[[str], LockBackend | None],
    on_lost: Callable[[Lease, dict[str, Any]], None],
    on_released: Callable[[Lease, dict[str, Any], str], None],
    n_indexes: int = MIN_CHILD_INDEXES,
) -> Supervisor:
    """Start the main process's supervisor (before the pool forks: children need the board)."""
    global _supervisor, _board, _main_pid
    if _supervisor is None or _supervisor.pid != os.getpid():
        _supervisor = Supervisor(store_for, on_lost, on_released, n_indexes)
        _board = _supervisor.board
        _main_pid = os.getpid()
    return _supervisor


def stop_supervisor() -> None:
    global _supervisor
    if _supervisor is not None and _supervisor.pid == os.getpid():
        _supervisor.stop()
    _supervisor = None


def current_supervisor() -> Supervisor | None:
    """The supervisor, in the worker main process only."""
    if _supervisor is not None and _supervisor.pid == os.getpid():
        return _supervisor
    return None


def child_started() -> None:
    """In a pool child, just after the fork (``worker_process_init``): claim its board row.

    The row is billiard's index of this child. Only this very process posts there: a process
    the task body forks itself inherits the index but not the right to use it.
    """
    global _poster, _poster_pid
    _poster, _poster_pid = None, current_pid()
    if _board is None or _main_pid == _poster_pid:
        return
    try:
        from billiard.process import current_process

        index = getattr(current_process(), "index", None)
    except Exception:  # not a billiard process
        index = None
    if isinstance(index, int):
        _poster = ChildPoster(_board, index)


def current_poster() -> ChildPoster | None:
    """The poster, in a pool child of a supervised worker only."""
    return _poster if _poster_pid == current_pid() else None
