"""One renewal thread per process, serving every held lock.

Each lease is renewed ttl/3 after its last renewal, so two renewals can fail before it
expires. Leases that fall due within the next ttl/6 are renewed with it, so locks taken at
different moments coalesce into batches: a batch is one pipelined round trip per master
(``LockBackend.extend_many``), never one per lock.

A renewal that finds the lock gone (a quorum of masters answered "not yours") marks the lease
lost at once; one that cannot reach a quorum retries quickly and marks the lease lost when its
validity runs out. Either way the owner learns of it through the lease's ``on_lost``
callbacks: the thread never dies silently (every error is logged and the loop goes on) and
never extends a lock it does not own (the Lua compare-and-pexpire checks the token).

The thread also retries releases that failed on some master (``LockBackend.maintain``), so a
master that was down during a release does not keep the key until its ttl, and reads the
replies of releases that were posted without waiting (``LockBackend.maintain``) when no later batch
read them within a second, so a release that finds the lock taken by another is reported.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .lease import Lease
    from .backends.base import LockBackend

__all__ = ["Renewer", "get_renewer"]

logger = logging.getLogger("celery_singleton_lock.renewer")

#: Longest the thread sleeps, in seconds; adding a lease due later wakes nothing.
IDLE_WAKE_S = 1.0
#: Retry interval after a renewal that could not reach a quorum, in seconds.
RETRY_INTERVAL_S = 0.25


class Renewer:
    """Renews registered leases in batches from one daemon thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._leases: dict[int, Lease] = {}
        self._cleanup_stores: dict[int, LockBackend] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        #: Monotonic time the thread will wake next (to skip needless notifications).
        self._wake_at = 0.0
        #: Batches sent, by store (for tests and metrics).
        self.batches = 0
        self.renewals = 0

    # -- registration ---------------------------------------------------------------------

    def add(self, lease: Lease) -> None:
        with self._cond:
            self._leases[id(lease)] = lease
            lease.registered = True
            self._cleanup_stores[id(lease.store)] = lease.store
            self._ensure_thread()
            # Wake the thread only if this lease falls due before its current wake-up.
            if lease.next_renewal - lease.ttl_s / 6.0 < self._wake_at:
                self._cond.notify()

    def remove(self, lease: Lease) -> None:
        """Stop renewing ``lease``. Never wakes the thread: a removal delays no renewal."""
        if not lease.registered:
            return
        with self._cond:
            self._leases.pop(id(lease), None)
            lease.registered = False

    def watch_cleanup(self, store: LockBackend) -> None:
        """Retry ``store``'s failed releases from this thread (started if need be), from now."""
        with self._cond:
            self._cleanup_stores[id(store)] = store
            self._ensure_thread()
            self._cond.notify()

    def watch_settle(self, store: LockBackend) -> None:
        """Have this thread read ``store``'s posted replies at its next wake-up (within
        :data:`IDLE_WAKE_S`), if no batch on those connections reads them first. Wakes
        nothing: a release must not cost a thread switch."""
        if id(store) in self._cleanup_stores and self._thread is not None \
                and self._thread.is_alive():
            return
        with self._cond:
            self._cleanup_stores[id(store)] = store
            self._ensure_thread()

    def leases(self) -> list[Lease]:
        with self._cond:
            return list(self._leases.values())

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(
                target=self._run, name="celery-singleton-lock-renewer", daemon=True
            )
            self._thread.start()

    # -- the loop -------------------------------------------------------------------------

    def _next_wake(self, now: float) -> float:
        times = [lease.next_renewal for lease in self._leases.values()]
        if any(s.needs_maintenance() for s in self._cleanup_stores.values()):
            times.append(now + RETRY_INTERVAL_S)
        # Idle, wake every second: a new lease due later than that needs no notification.
        return min(min(times) - now, IDLE_WAKE_S) if times else IDLE_WAKE_S

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                clock = _any_clock(self._leases, self._cleanup_stores)
                now = clock()
                wait = self._next_wake(now)
                if wait > 0:
                    self._wake_at = now + wait
                    self._cond.wait(timeout=wait)
                    self._wake_at = 0.0
                    if self._stopping:
                        return
                    now = clock()
                due = [
                    lease
                    for lease in self._leases.values()
                    if lease.next_renewal - lease.ttl_s / 6.0 <= now
                ]
                stores = list(self._cleanup_stores.values())
            try:
                self.renew(due)
                for store in stores:
                    if store.needs_maintenance():
                        store.maintain()
            except Exception:  # never die: log and go on with the next round
                logger.exception("lock renewal round failed")

    def renew(self, leases: list[Lease]) -> None:
        """Renew ``leases`` now: one batch per store, one round trip per master."""
        by_store: dict[int, list[Lease]] = defaultdict(list)
        for lease in leases:
            if not lease.released and not lease.lost:
                by_store[id(lease.store)].append(lease)
        for batch in by_store.values():
            store = batch[0].store
            started = store.clock()
            verdicts = store.extend_many([le.renewal() for le in batch])
            self.batches += 1
            for lease, verdict in zip(batch, verdicts, strict=True):
                if lease.released:
                    continue
                if verdict is True:
                    lease.renewed(started)
                    self.renewals += 1
                elif verdict is False:
                    self._lost(lease, "renewal found the lock gone or held by another")
                elif store.clock() >= lease.valid_until:
                    self._lost(lease, "no quorum of masters answered before the lock expired")
                else:
                    lease.next_renewal = store.clock() + RETRY_INTERVAL_S

    def _lost(self, lease: Lease, reason: str) -> None:
        with self._cond:
            self._leases.pop(id(lease), None)
            lease.registered = False
        if lease.before_lost is not None:
            lease.before_lost()
        if lease.released:
            return
        logger.warning("lock %s lost: %s", lease.key, reason)
        lease.mark_lost(reason)


def _any_clock(leases: dict[int, Lease], stores: dict[int, LockBackend]) -> Callable[[], float]:
    for lease in leases.values():
        return lease.store.clock
    for store in stores.values():
        return store.clock
    import time

    return time.monotonic


_renewer: Renewer | None = None
_renewer_pid = 0
_renewer_lock = threading.Lock()


def get_renewer() -> Renewer:
    """The renewer of this process (a fresh one after a fork: threads do not survive it)."""
    global _renewer, _renewer_pid
    with _renewer_lock:
        if _renewer is None or _renewer_pid != os.getpid():
            _renewer = Renewer()
            _renewer_pid = os.getpid()
        return _renewer
