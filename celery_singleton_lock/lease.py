"""The handle of a held lock: key, token, fencing token, validity, renewal state.

A :class:`Lease` is what ``self.lock`` is inside a running task and what :class:`Redlock`
holds while acquired. It can also be *adopted* from a key and token alone, which is how a
Celery worker's main process renews and releases a lock that one of its pool children took.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .redlock import drift_s

if TYPE_CHECKING:
    from .backends.base import LockBackend, Renewal

__all__ = ["Lease"]

logger = logging.getLogger("celery_singleton_lock.lease")


class Lease:
    """A lock held (or believed held) by this process."""

    def __init__(
        self,
        store: LockBackend,
        key: str,
        token: str,
        ttl_s: float,
        *,
        fencing_token: int = 0,
        started: float | None = None,
        validity_s: float | None = None,
        acquired_at: float | None = None,
        owner: str = "",
        task_name: str = "",
        info: dict[str, Any] | None = None,
    ) -> None:
        #: The lock's full Redis key.
        self.key = key
        #: The token that proves ownership: 32 hex digits, unique per acquisition.
        self.token = token
        #: An integer that grows with every acquisition of this key.
        self.fencing_token = fencing_token
        #: The id of the holder (a task id), if any.
        self.owner = owner
        self.task_name = task_name
        #: More holder fields (hostname, pid, mode) for a copy put back by renewal.
        self.info = info or {}
        self.store = store
        self.ttl_s = float(ttl_s)
        started = store.clock() if started is None else started
        #: Monotonic time at which the acquisition began.
        self.started = started
        validity = self.ttl_s - drift_s(self.ttl_s) if validity_s is None else validity_s
        #: Monotonic time until which the lock is known valid.
        self.valid_until = started + validity
        #: Monotonic time of the next renewal (ttl/3 after the last one).
        self.next_renewal = started + self.ttl_s / 3.0
        #: Wall clock time of the acquisition (unix seconds).
        self.acquired_at = time.time() if acquired_at is None else acquired_at
        #: Successful renewals so far.
        self.renewals = 0
        #: Set once a renewal found the lock gone, or quorum could not be had before it expired.
        self.lost = False
        self.lost_reason = ""
        self.released = False
        #: True while the process's renewer holds this lease.
        self.registered = False
        self._on_lost: list[Callable[[Lease], None]] = []
        #: Called before the lease is declared lost, to let a late "released" report land.
        self.before_lost: Callable[[], None] | None = None
        self._lock = threading.Lock()

    @property
    def ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))

    def renewal(self, ttl_ms: int | None = None) -> Renewal:
        """This lock as :meth:`Store.extend_many` renews it (and puts it back where gone)."""
        from .backends.base import Renewal

        ttl_ms = self.ttl_ms if ttl_ms is None else ttl_ms
        metadata = (("owner", self.owner), ("task", self.task_name), ("ttl", self.ttl_s),
                    ("acquired_at", f"{self.acquired_at:.6f}"), ("renewals", self.renewals),
                    *self.info.items())
        return Renewal(self.key, self.token, ttl_ms, self.fencing_token, metadata)

    def on_lost(self, callback: Callable[[Lease], None]) -> None:
        """Call ``callback(lease)`` (from the renewer thread) if the lock is lost."""
        self._on_lost.append(callback)

    def ttl_left_s(self) -> float:
        """Seconds the lock is still known valid, from this process's point of view."""
        return max(0.0, self.valid_until - self.store.clock())

    # -- state changes, called by the renewer or the owner -------------------------------

    def renewed(self, started: float) -> None:
        with self._lock:
            self.valid_until = started + self.ttl_s - drift_s(self.ttl_s)
            self.next_renewal = started + self.ttl_s / 3.0
            self.renewals += 1

    def mark_lost(self, reason: str) -> None:
        with self._lock:
            if self.lost or self.released:
                return
            self.lost = True
            self.lost_reason = reason
        for callback in list(self._on_lost):
            try:
                callback(self)
            except Exception:
                logger.exception("lock-lost callback failed for %s", self.key)

    # -- the public handle (self.lock) ----------------------------------------------------

    def is_held(self) -> bool:
        """Ask the store whether a quorum still holds this lock with our token."""
        if self.lost or self.released:
            return False
        return self.store.owned(self.key, self.token)

    def extend(self, ttl: float | None = None) -> bool:
        """Reset the lock's lifetime to ``ttl`` seconds (default: its ttl). False if not ours."""
        if self.released:
            return False
        ttl_s = self.ttl_s if ttl is None else float(ttl)
        started = self.store.clock()
        verdict = self.store.extend_many([self.renewal(max(1, int(ttl_s * 1000)))])[0]
        if verdict is True:
            with self._lock:
                self.valid_until = max(self.valid_until, started + ttl_s - drift_s(ttl_s))
                self.renewals += 1
            return True
        if verdict is False:
            self.mark_lost("extend found the lock gone or held by another")
        return False

    def release(self, *, wait: bool = True,
                on_lost: Callable[[], None] | None = None) -> bool:
        """Compare-and-delete on every master. False if the lock was no longer ours.

        With ``wait=False`` the release is sent without waiting for the masters' replies
        (:meth:`LockBackend.release_later`), and the answer is whether the lock was believed held;
        ``on_lost()`` is called when the replies show it had been taken by another.
        """
        with self._lock:
            if self.released:
                return False
            self.released = True
        if self.registered:
            from .renewer import get_renewer

            get_renewer().remove(self)
        if not wait:
            self.store.release_later(self.key, self.token, deadline=self.valid_until + 1.0,
                                     on_lost=on_lost)
            return not self.lost
        released = self.store.release(self.key, self.token, deadline=self.valid_until + 1.0)
        return released and not self.lost

    def __repr__(self) -> str:
        state = "lost" if self.lost else "released" if self.released else "held"
        return f"<Lease {self.key} fence={self.fencing_token} {state}>"
