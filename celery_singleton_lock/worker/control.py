"""Two of Celery's remote control commands, as a worker with ``LockedTask`` answers them.

* ``conf`` (``celery inspect conf``, and so Flower's ``/api/workers``): Celery's own answer
  with every password in a URL replaced by ``***``, whatever the setting is called. Celery
  censors only setting names it knows, in lowercase: a Django-style
  ``CELERY_SINGLETON_LOCK_URL`` or ``CELERY_BROKER_URL`` (which the lock store may default to)
  would be shown in clear.
* ``revoke``: Celery's own command, then the enqueue-time lock of every revoked task this worker
  holds but has not started (a countdown or ETA task waits in the worker's timer) is released at
  once. Celery discards such a task only when its ETA comes, and until then its lock would turn
  every new ``apply_async`` of that signature into the revoked task's ``AsyncResult``.

Both are registered through Celery's documented way to add control commands
(``control_command``/``inspect_command``), calling Celery's functions for the work itself.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.utils.serialization import strtobool
from celery.worker import control as celery_control
from celery.worker import state as worker_state
from celery.worker.request import Request

from ..urls import redact_url

__all__ = ["install", "redact_passwords"]

logger = logging.getLogger("celery_singleton_lock.control")

_celery_conf = celery_control.conf
_celery_revoke = celery_control.revoke
_installed = False


def redact_passwords(value: Any) -> Any:
    """``value`` with every password in a URL (in any string, list or dict) replaced."""
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, dict):
        return {k: redact_passwords(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_passwords(v) for v in value]
    return value


def conf(state: Any, with_defaults: bool = False, **kwargs: Any) -> Any:
    """List configuration (passwords in URLs replaced by ***)."""
    return redact_passwords(_celery_conf(state, with_defaults=with_defaults, **kwargs))


def revoke(state: Any, task_id: Any, terminate: bool = False, signal: Any = None,
           **kwargs: Any) -> Any:
    """Revoke task by task id (or list of ids), freeing the locks of those not started."""
    reply = _celery_revoke(state, task_id, terminate=terminate, signal=signal, **kwargs)
    ids = {task_id} if isinstance(task_id, str) else set(task_id or ())
    try:
        release_unstarted(state, ids)
    except Exception:  # never let a release error break the worker's revoke handling
        logger.exception("cannot release the locks of revoked tasks %s", ", ".join(ids))
    return reply


def _unstarted(state: Any) -> list[Any]:
    """Requests this worker holds but has not started: in its ETA timer, or prefetched.

    The timer is read as Celery's own ``inspect scheduled`` reads it (each entry's first
    argument is the request it will apply).
    """
    found = list(worker_state.reserved_requests)
    timer = getattr(getattr(state, "consumer", None), "timer", None)
    schedule = getattr(timer, "schedule", None)
    for waiting in list(getattr(schedule, "queue", None) or ()):
        args = getattr(getattr(waiting, "entry", None), "args", None) or ()
        if args and isinstance(args[0], Request):
            found.append(args[0])
    active = {req.id for req in list(worker_state.active_requests)}
    return [req for req in found if req.id not in active]


def release_unstarted(state: Any, task_ids: set[str]) -> None:
    """Release the enqueue-time locks of the revoked requests this worker has not started."""
    from .receivers import release_enqueue_lock

    done: set[str] = set()
    for req in _unstarted(state):
        if req.id in task_ids and req.id not in done:
            done.add(req.id)
            release_enqueue_lock(req, getattr(req, "task", None))


def install() -> None:
    """Register both commands (idempotent); the worker's control panel then answers with them."""
    global _installed
    if _installed:
        return
    _installed = True
    celery_control.inspect_command(
        name="conf", alias="dump_conf", signature="[include_defaults=False]",
        args=[("with_defaults", strtobool)],
    )(conf)
    celery_control.control_command(
        name="revoke", variadic="task_id", signature="[id1 [id2 [... [idN]]]]",
    )(revoke)
