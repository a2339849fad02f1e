"""Highly available beat: several beat processes, one leader, no entry sent twice.

``celery -A proj beat -S celery_singleton_lock.beat:LockedScheduler``

Every beat process runs the schedule, but only the one holding the leader lock (a renewed
:class:`~celery_singleton_lock.Redlock`, ttl ``singleton_lock_beat_ttl``) sends anything. The
others try to take the lock when the leader's would expire (they read its remaining ttl), so
a killed leader is replaced within the leader lock's ttl.

Each firing is *claimed* before it is sent: a Lua script checks, atomically, that the caller
still holds the leader lock and that nobody sent the entry after the run time the caller
knows of, then records the new run time in a shared hash. So a deposed leader (paused past
its ttl) sends nothing, and the new leader neither repeats a firing nor skips one that came
due while it took over: on becoming leader it loads every entry's last run time from the
shared hash. Claim-then-send means a leader killed between the two loses that one firing
(at most once), never sends it twice.

``SingletonSchedulerMixin`` gives the same to any scheduler class, e.g. django-celery-beat's::

    from django_celery_beat.schedulers import DatabaseScheduler
    from celery_singleton_lock.beat import SingletonSchedulerMixin

    class HADatabaseScheduler(SingletonSchedulerMixin, DatabaseScheduler):
        pass

    # celery -A proj beat -S myproject.schedulers:HADatabaseScheduler
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone
from typing import Any

from celery.beat import PersistentScheduler

from .keys import name_key, validate_key_prefix
from .lease import Lease
from .lock import Redlock, check_ttl
from .settings import DEFAULTS, check_renewable_ttl, register_defaults, resolve_store_url
from .backends.base import Capability, LockBackend, require
from .backends.registry import get_backend as get_store

__all__ = ["SingletonSchedulerMixin", "LockedScheduler"]

logger = logging.getLogger("celery_singleton_lock.beat")


def _timestamp(value: datetime | None) -> float:
    if value is None:
        return 0.0
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


class SingletonSchedulerMixin:
    """Makes a Celery beat scheduler send only while it holds the beat leader lock."""

    #: Name of the leader lock and shared schedule state (default: the app's main name).
    singleton_lock_name: str | None = None

    app: Any
    schedule: Any
    max_interval: float

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._leader: Redlock | None = None
        self._leader_mutex = threading.Lock()
        self._standby_delay = 0.5
        #: The entry each name was last advanced to by reserve(), for its claim.
        self._reserved: dict[str, Any] = {}
        super().__init__(*args, **kwargs)
        self._beat_setup()  # a bad beat setting fails when beat starts, naming the setting

    # -- configuration --------------------------------------------------------------------

    def _beat_setup(self) -> None:
        if getattr(self, "_beat_store", None) is not None:
            return
        app = self.app
        register_defaults(app)
        conf = app.conf
        ttl = conf.get("singleton_lock_beat_ttl") or DEFAULTS["singleton_lock_beat_ttl"]
        self._beat_ttl = check_ttl(ttl, "singleton_lock_beat_ttl")
        timeout = check_ttl(conf.get("singleton_lock_socket_timeout") or 0.2,
                            "singleton_lock_socket_timeout")
        check_renewable_ttl(self._beat_ttl, "singleton_lock_beat_ttl", timeout)
        prefix = validate_key_prefix(conf.get("singleton_lock_key_prefix") or "csl")
        self._beat_store: LockBackend = get_store(resolve_store_url(app), socket_timeout=timeout,
                                                  setting="singleton_lock_url")
        require(self._beat_store, Capability.BEAT, "LockedScheduler (beat's leader lock and "
                "once-per-due-time claims)", "singleton_lock_url")
        name = self.singleton_lock_name or app.main or "celery"
        self._beat_key = name_key(prefix, f"beat:{name}")
        self._state_key = f"{self._beat_key}:schedule"

    # -- leadership -----------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        leader = self._leader
        return leader is not None and leader.lease is not None and not leader.lease.lost

    def _try_lead(self) -> bool:
        self._beat_setup()
        lock = Redlock(
            "beat", store=self._beat_store, key=self._beat_key, ttl=self._beat_ttl, renew=True,
            metadata={"task": "celery.beat", "mode": "beat"}, on_lost=self._lost_leadership,
        )
        try:
            got = lock.acquire(blocking=False)
        except Exception as exc:  # the store is down: stay standby and retry soon
            logger.warning("beat: cannot reach the lock store: %s", exc)
            self._standby_delay = min(1.0, self._beat_ttl / 3)
            return False
        if not got:
            attempt = lock.last_attempt
            if attempt is not None and attempt.holder_pttl_ms > 0:
                pttl_s = attempt.holder_pttl_ms / 1000.0
            else:
                pttl_s = self._beat_ttl / 3
            # Wake just after the leader's lock would expire (a killed leader renews no more).
            self._standby_delay = max(0.01, min(pttl_s + 0.01, self._beat_ttl / 3))
            return False
        self._leader = lock
        logger.info("beat: this process leads (lock %s)", self._beat_key)
        self._load_shared_state()
        return True

    def _lost_leadership(self, lease: Lease) -> None:
        logger.warning("beat: leader lock lost (%s); standing by", lease.lost_reason)

    def _load_shared_state(self) -> None:
        """Take every entry's last run time from the shared state (the newest of all masters)."""
        newest = self._beat_store.last_runs(self._state_key)
        for name, entry in list(self.schedule.items()):
            shared = newest.get(name)
            if shared is not None and shared > _timestamp(entry.last_run_at) + 0.0005:
                entry.last_run_at = datetime.fromtimestamp(shared, tz=timezone.utc)
        self._heap = None  # rebuild the heap from the updated entries

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if not self.is_leader:
            if self._leader is not None:
                self._leader = None
            if not self._try_lead():
                return min(self._standby_delay, self.max_interval)
        return super().tick(*args, **kwargs)  # type: ignore[misc]

    def _claim(self, entry: Any) -> bool:
        leader = self._leader
        if leader is None or leader.token is None:
            return False
        previous = _timestamp(entry.last_run_at)
        # The advanced entry records this run's time, which the next tick sees as "previous".
        # A scheduler whose reserve() leaves self.schedule alone (django-celery-beat's
        # DatabaseScheduler) has it only from reserve() itself.
        current = self._reserved.pop(entry.name, None) or self.schedule.get(entry.name, entry)
        now = _timestamp(getattr(current, "last_run_at", None)) or datetime.now(
            timezone.utc).timestamp()
        if now <= previous:
            now = datetime.now(timezone.utc).timestamp()
        vote = self._beat_store.claim_run(self._beat_key, leader.token, self._state_key,
                                          entry.name, previous, now)
        if vote == 1:
            return True
        if vote == -1:
            logger.warning("beat: not the leader any more; %s not sent", entry.name)
            self._leader = None
        else:
            logger.info("beat: %s was already sent for this due time; syncing", entry.name)
            self._load_shared_state()
        return False

    def reserve(self, entry: Any) -> Any:
        new_entry = super().reserve(entry)  # type: ignore[misc]
        self._reserved[entry.name] = new_entry
        return new_entry

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True,
                    **kwargs: Any) -> Any:
        # ``entry`` still carries the previous run time (tick() reserves a new entry first).
        if not self._claim(entry):
            return None
        return super().apply_async(entry, producer=producer, advance=advance,  # type: ignore
                                   **kwargs)

    def close(self) -> None:
        leader, self._leader = self._leader, None
        if leader is not None and leader.lease is not None:
            try:
                leader.release()
            except Exception:
                logger.debug("beat: releasing the leader lock failed", exc_info=True)
        super().close()  # type: ignore[misc]


class LockedScheduler(SingletonSchedulerMixin, PersistentScheduler):
    """Celery's PersistentScheduler with a leader lock: run several for high availability."""
