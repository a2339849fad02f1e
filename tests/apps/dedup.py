"""Tasks for ``tests/test_task_dedup.py``: one body that proves mutual exclusion.

Every body enters by INCR of ``<slot>:inside`` (keeping the maximum in ``<slot>:max``), records
its run, holds for ``hold_s`` and leaves by DECR. Two bodies of one signature at once would
push ``<slot>:max`` to 2.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery_singleton_lock import LockedTask
from tests.apps.common import ENTER_SCRIPT, make_app, now, records

app = make_app("csl_dedup")


def _guarded(task: Any, slot: str, hold_s: float) -> int:
    r = records()
    start = now()
    r.eval(ENTER_SCRIPT, 2, f"{slot}:inside", f"{slot}:max")
    try:
        time.sleep(hold_s)
    finally:
        r.decr(f"{slot}:inside")
        run = {"id": task.request.id, "start": start, "end": now(), "pid": os.getpid(),
               "host": task.request.hostname}
        r.rpush(f"{slot}:runs", json.dumps(run))
    return int(task.request.retries)


@app.task(base=LockedTask, bind=True, shared=False, name="dedup.reject")
def guarded_reject(self: Any, slot: str, hold_s: float) -> int:
    return _guarded(self, slot, hold_s)


@app.task(
    base=LockedTask, bind=True, shared=False, name="dedup.requeue", lock_on_duplicate="requeue",
    lock_requeue_delay=0.05, lock_requeue_max=100_000,
)
def guarded_requeue(self: Any, slot: str, hold_s: float) -> int:
    return _guarded(self, slot, hold_s)


@app.task(base=LockedTask, bind=True, shared=False, name="dedup.wait", lock_on_duplicate="wait",
          lock_wait_timeout=60.0)
def guarded_wait(self: Any, slot: str, hold_s: float) -> int:
    return _guarded(self, slot, hold_s)


@app.task(base=LockedTask, bind=True, shared=False, name="dedup.pair")
def pair(self: Any, a: str, b: int = 2, hold_s: float = 1.5) -> list[Any]:
    _guarded(self, a, hold_s)
    return [a, b]
