"""Tasks for ``tests/test_enqueue_modes.py``: one task per enqueue-time lock mode.

Every body records its start in ``<slot>:runs`` (a JSON line with the task id, the retry count
and what the lock key held at that moment), so a test can see whether and how often it ran.
``action`` chooses the ending: ``ok``, ``fail`` (raises) or ``retry`` (``self.retry()`` until
``request.retries`` reaches ``retries``, then succeeds). The lock key is the slot alone, so the
other arguments never split one signature into two locks.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery_singleton_lock import LockedTask
from tests.apps.common import make_app, now, records

app = make_app("csl_modes")

#: Countdown of ``self.retry()`` in the ``retry`` action, seconds.
RETRY_COUNTDOWN_S = 1.5


class BodyFailed(Exception):
    """The ``fail`` action's exception."""


def _body(task: Any, slot: str, action: str, hold_s: float, retries: int) -> str:
    req = task.request
    r = records()
    run = {"id": req.id, "retries": int(req.retries or 0), "start": now(), "pid": os.getpid()}
    r.rpush(f"{slot}:runs", json.dumps(run))
    r.set(f"{slot}:started:{req.id}:{run['retries']}", "1")
    if hold_s:
        time.sleep(hold_s)
    if action == "fail":
        raise BodyFailed(slot)
    if action == "retry" and req.retries < retries:
        raise task.retry(countdown=RETRY_COUNTDOWN_S, max_retries=retries)
    return slot


def _locked(name: str, mode: str, **options: Any) -> Any:
    """Register a bound LockedTask ``name`` locking on ``slot`` alone, in ``mode``."""

    def body(self: Any, slot: str, action: str = "ok", hold_s: float = 0.0,
             retries: int = 0) -> str:
        return _body(self, slot, action, hold_s, retries)

    return app.task(base=LockedTask, bind=True, name=name, lock_key=["slot"], lock_mode=mode,
                    shared=False, **options)(body)


until_executing = _locked("modes.until_executing", "until_executing")
until_executed = _locked("modes.until_executed", "until_executed")
until_and_while_executing = _locked("modes.until_and_while_executing",
                                    "until_and_while_executing")
raise_on_duplicate = _locked("modes.raise_on_duplicate", "until_executed",
                             lock_on_enqueue_duplicate="raise")
short_queued_ttl = _locked("modes.short_queued_ttl", "until_executed", lock_queued_ttl=2.0)


#: The task of each enqueue-time mode.
BY_MODE = {
    "until_executing": until_executing,
    "until_executed": until_executed,
    "until_and_while_executing": until_and_while_executing,
}
