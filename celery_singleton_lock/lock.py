"""``Redlock``: the distributed lock on its own (SPEC section 10).

``LockedTask`` is built on this same class.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from ._process import current_pid, new_token
from .errors import LockBackendError, LockConfigError
from .keys import name_key, validate_key_prefix
from .lease import Lease
from .renewer import get_renewer
from .settings import check_renewable_ttl
from .backends.base import AcquireResult, FixedMetadata, LockBackend
from .backends.registry import get_backend as get_store

__all__ = ["Redlock", "check_ttl", "try_acquire"]

logger = logging.getLogger("celery_singleton_lock.lock")

_HOSTNAME = socket.gethostname()


def try_acquire(
    store: LockBackend,
    key: str,
    ttl_s: float,
    fixed: FixedMetadata | None = None,
    *,
    owner: str = "",
    task_name: str = "",
    metadata: Sequence[tuple[str, Any]] = (),
    limit: int = 1,
) -> tuple[Lease | None, AcquireResult]:
    """One acquire round with a new token: ``(lease, result)``, the lease None if not taken.

    ``fixed`` and ``metadata`` go into the lock hash with the acquisition time. With
    ``limit`` > 1, one of that many slots is taken, and the lease's key is the slot's. Raises
    :class:`LockBackendError` when too few masters answered for a quorum.
    """
    token = new_token()
    now = time.time()
    meta = [*metadata, ("acquired_at", f"{now:.6f}")]
    if limit > 1:
        result = store.acquire_slot(key, token, ttl_s, limit, meta, fixed)
    else:
        result = store.acquire(key, token, ttl_s, meta, fixed)
    if result.acquired:
        lease = Lease(store, result.key or key, token, ttl_s, fencing_token=result.fence,
                      started=result.started, validity_s=result.validity_s, acquired_at=now,
                      owner=owner, task_name=task_name)
        return lease, result
    if result.backend_down:
        raise LockBackendError(f"cannot lock {key!r}: {store.no_quorum(result.errors)}",
                               lock_key=key)
    return None, result


def check_ttl(value: Any, setting: str) -> float:
    """A positive, finite number of seconds, or :class:`LockConfigError` naming ``setting``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LockConfigError(
            f"{setting} must be a number of seconds, got {type(value).__name__} {value!r}",
            setting=setting,
        )
    if not math.isfinite(value) or value <= 0:
        raise LockConfigError(f"{setting} must be > 0 seconds, got {value!r}", setting=setting)
    return float(value)


class Redlock:
    """A distributed lock over one Redis, several independent masters, or a Redis Cluster.

    ``with lock:`` blocks until the lock is held (``LockBackendError`` if the store is down)
    and renews it every ttl/3 while the block runs. ``acquire()`` takes it without renewal
    unless the lock was made with ``renew=True``: such a lock lapses after ``ttl`` unless
    extended.
    """

    def __init__(
        self,
        name: str,
        url: str | Sequence[str] | None = None,
        *,
        ttl: float = 30.0,
        key_prefix: str = "csl",
        renew: bool = False,
        socket_timeout: float = 0.2,
        store: LockBackend | None = None,
        key: str | None = None,
        owner: str = "",
        metadata: dict[str, Any] | None = None,
        on_lost: Callable[[Lease], None] | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise LockConfigError(f"name must be a non-empty string, got {name!r}", setting="name")
        self.ttl = check_ttl(ttl, "ttl")
        socket_timeout = check_ttl(socket_timeout, "socket_timeout")
        if renew:  # a renewed lock must outlast a renewal that takes a whole socket timeout
            check_renewable_ttl(self.ttl, "ttl", socket_timeout)
        prefix = validate_key_prefix(key_prefix, setting="key_prefix")
        if store is None:
            if url is None:
                raise LockConfigError(
                    "url is required: one Redis URL, a list of Redlock master URLs, or a "
                    "redis+cluster:// URL",
                    setting="url",
                )
            store = get_store(url, socket_timeout=socket_timeout, setting="url")
        self.store = store
        self.name = name
        #: The lock's full Redis key.
        self.key = key if key is not None else name_key(prefix, name)
        self.renew = bool(renew)
        self.owner = owner
        self._metadata = {
            "owner": owner,
            "task": "",
            "hostname": _HOSTNAME,
            "mode": "lock",
            **(metadata or {}),
        }
        # Fields that do not change between attempts, flattened once.
        self._static_meta = [*self._metadata.items(), ("ttl", self.ttl), ("renewals", 0)]
        self._on_lost = on_lost
        #: (pid, the fixed metadata packed for that process), made at the first attempt.
        self._fixed: tuple[int, FixedMetadata] | None = None
        self._lease: Lease | None = None
        #: The outcome of the last failed attempt (holder id, ttl left), if any.
        self.last_attempt: AcquireResult | None = None

    # -- state ----------------------------------------------------------------------------

    @property
    def lease(self) -> Lease | None:
        return self._lease

    @property
    def token(self) -> str | None:
        """The current holder token (None when not held by this object)."""
        return self._lease.token if self._lease is not None else None

    @property
    def fencing_token(self) -> int | None:
        """An integer that grows with every acquisition of this key (None when not held)."""
        return self._lease.fencing_token if self._lease is not None else None

    def __repr__(self) -> str:
        state = "held" if self._lease is not None else "free"
        return f"<Redlock {self.key!r} ttl={self.ttl} {state} store={self.store.description!r}>"

    # -- acquire --------------------------------------------------------------------------

    def _attempt(self) -> bool:
        fixed = self._fixed
        if fixed is None or fixed[0] != current_pid():
            pid = current_pid()
            fixed = self._fixed = (pid, FixedMetadata([*self._static_meta, ("pid", pid)]))
        task_name = str(self._metadata.get("task", ""))
        lease, result = try_acquire(self.store, self.key, self.ttl, fixed[1], owner=self.owner,
                                    task_name=task_name)
        if lease is not None:
            self.last_attempt = None
            if self._on_lost is not None:
                lease.on_lost(self._on_lost)
            self._lease = lease
            return True
        self.last_attempt = result
        return False

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take the lock. Returns True once held, False if not (non-blocking or timed out).

        A blocking wait sleeps until the holder releases (a pub/sub notification wakes it
        within milliseconds) or its lock expires. Raises :class:`LockBackendError` when too
        few masters answer.
        """
        if self._lease is not None and not self._lease.released:
            raise RuntimeError(f"lock {self.key!r} is already held by this object")
        if timeout is not None:
            if not blocking:
                raise ValueError("timeout cannot be used with blocking=False")
            timeout = float(timeout)
            if timeout < 0:
                raise ValueError("timeout must be >= 0")
        got = self._attempt()
        if not got and blocking:
            got = self.store.wait_released(
                self.key, math.inf if timeout is None else timeout, self._attempt
            )
        if got and self.renew:
            self._start_renewal()
        return got

    def _start_renewal(self) -> None:
        assert self._lease is not None
        get_renewer().add(self._lease)

    # -- the rest -------------------------------------------------------------------------

    def owned(self) -> bool:
        """True when a quorum of masters still hold the lock with this object's token."""
        return self._lease is not None and self._lease.is_held()

    def extend(self, ttl: float | None = None) -> bool:
        """Reset the lock's lifetime to ``ttl`` (default: the lock's ttl). False if not ours."""
        if self._lease is None:
            return False
        if ttl is not None:
            ttl = check_ttl(ttl, "ttl")
        return self._lease.extend(ttl)

    def release(self) -> bool:
        """Release the lock on every master. False if it was no longer ours."""
        lease, self._lease = self._lease, None
        if lease is None:
            return False
        return lease.release()

    def locked(self) -> bool:
        """True when anyone holds this key on a quorum of masters."""
        return self.store.lock_info(self.key) is not None

    def __enter__(self) -> Redlock:
        self.acquire(blocking=True)
        self._start_renewal()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.release() and exc_type is None:
            logger.warning("lock %s was lost before the end of its with block", self.key)
