"""A worker bootstep that reports the locks this worker holds in its stats.

``celery inspect stats`` (and Flower's ``/api/workers`` and its worker page, "Other" tab) shows
a ``singleton_locks`` entry (``events``: whether this worker sends ``task-lock-*`` events)::

    "singleton_locks": {
        "held": 1, "lost": 0, "events": true,
        "locks": [{"key": "csl:tasks.sync:{...}", "task": "tasks.sync", "task_id": "...",
                   "pid": 4242, "mode": "while_executing", "acquired_at": "2025-...+00:00",
                   "ttl": 27.4, "renewals": 3, "lost": false}]
    }

``info()`` reads only this process's memory (the supervisor's view of its pool children's
locks and the renewer's leases), never Redis: it takes a few microseconds and cannot stall the
worker's event loop on a slow lock store. ``ttl`` is the time the lock is known valid from this
worker's point of view (its last successful renewal), not a server read. Locks lost in the last
five minutes are listed with ``"lost": true`` and the reason.

The step also starts the small thread that tells pool children whether task events are on
(see :mod:`celery_singleton_lock.events`).
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from celery import bootsteps

from .. import events

__all__ = ["LockStats", "install", "held_locks", "STATS_KEY"]

logger = logging.getLogger("celery_singleton_lock.bootstep")

#: The key under which the worker's stats carry the locks.
STATS_KEY = "singleton_locks"
#: At most this many locks are listed (the counts are always exact).
MAX_LISTED = 100


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(float(ts), timezone.utc).isoformat()
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def held_locks() -> dict[str, Any]:
    """The locks held by this worker process and its pool children, from memory."""
    from ..renewer import get_renewer
    from .supervisor import current_supervisor

    rows: list[dict[str, Any]] = []
    seen: set[int] = set()
    sup = current_supervisor()
    if sup is not None:
        for lease, msg in sup.leases():
            seen.add(id(lease))
            rows.append(_row(lease, msg.get("task", ""), msg.get("task_id", ""),
                             msg.get("pid"), msg.get("mode"), msg.get("acquired_at")))
    for lease in get_renewer().leases():
        if id(lease) not in seen:
            rows.append(_row(lease, lease.task_name, lease.owner, None, None, lease.acquired_at))
    held = len(rows)
    for item in events.recently_lost():
        rows.append({
            "key": item["key"], "task": item["task"], "task_id": item["task_id"],
            "lost": True, "reason": item["reason"], "lost_at": _iso(item["at"]),
        })
    rows.sort(key=lambda r: (r["lost"], r["key"]))
    return {
        "held": held,
        "lost": len(rows) - held,
        "events": events.enabled(),
        "locks": rows[:MAX_LISTED],
    }


def _row(lease: Any, task: str, task_id: str, pid: Any, mode: Any, acquired_at: Any
         ) -> dict[str, Any]:
    row: dict[str, Any] = {
        "key": lease.key,
        "task": task or "",
        "task_id": task_id or "",
        "ttl": round(lease.ttl_left_s(), 3),
        "renewals": lease.renewals,
        "lost": bool(lease.lost),
    }
    if pid is not None:
        row["pid"] = pid
    if mode:
        row["mode"] = mode
    if acquired_at is not None:
        row["acquired_at"] = _iso(acquired_at)
    if lease.lost:
        row["reason"] = lease.lost_reason
    return row


class LockStats(bootsteps.StartStopStep):
    """Worker step: the locks this worker holds, in ``celery inspect stats``."""

    label = "singleton locks"

    def start(self, worker: Any) -> None:
        events.worker_started(worker)

    def stop(self, worker: Any) -> None:
        events.worker_stopped()

    def shutdown(self, worker: Any) -> None:
        events.worker_stopped()

    def info(self, worker: Any) -> dict[str, Any]:
        try:
            return {STATS_KEY: held_locks()}
        except Exception:  # stats must answer even if something here is broken
            logger.exception("cannot list the worker's locks")
            return {STATS_KEY: {"error": "cannot list locks"}}


def install(app: Any) -> None:
    """Add the step to ``app``'s worker and connect the event senders (idempotent)."""
    events.install()
    steps = app.steps["worker"]
    if LockStats not in steps:
        steps.add(LockStats)
