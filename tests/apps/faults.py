"""Tasks for ``tests/test_task_faults.py``: lost locks, GIL-bound bodies, killed workers,
Redlock masters going down.

``lock_lost`` is recorded (list ``lost``) by whichever process renews the lock: for the prefork
pool, the worker's main process.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery_singleton_lock import LockedTask, signals
from tests.apps.common import make_app, now, records

app = make_app("csl_faults")


def _record_lost(sender: Any = None, lock_key: str = "", task_id: str = "", reason: str = "",
                 **kwargs: Any) -> None:
    lost = {"lock_key": lock_key, "task_id": task_id, "reason": reason, "pid": os.getpid(),
            "time": now()}
    records().rpush("lost", json.dumps(lost))


signals.lock_lost.connect(_record_lost, weak=False)


def _run_record(task: Any, tag: str, **extra: Any) -> None:
    lock = task.lock
    run = {"id": task.request.id, "pid": os.getpid(), "time": now(),
           "token": lock.token if lock is not None else None, **extra}
    records().rpush(f"{tag}:runs", json.dumps(run))


@app.task(base=LockedTask, bind=True, shared=False, name="faults.hold", lock_key=["tag"],
          lock_ttl=1.0)
def hold(self: Any, tag: str, limit_s: float = 30.0) -> str:
    """Holds its lock until the test sets ``<tag>:go:<task id>`` (or ``limit_s`` of sleeping:
    counted in steps, so time spent stopped does not count)."""
    _run_record(self, tag)
    go = f"{tag}:go:{self.request.id}"
    for _ in range(int(limit_s / 0.05)):
        if records().exists(go):
            break
        time.sleep(0.05)
    records().set(f"{tag}:end:{self.request.id}", repr(now()))
    return str(self.request.hostname)


@app.task(base=LockedTask, bind=True, shared=False, name="faults.gil", lock_ttl=1.0)
def gil(self: Any, tag: str, run_s: float) -> dict[str, Any]:
    """Holds the GIL in one C call (~2 s here, longer than lock_ttl) again and again."""
    lock = self.lock
    records().set(f"{tag}:start", json.dumps({"token": lock.token, "time": now()}))
    started = time.monotonic()
    calls, longest = 0, 0.0
    while time.monotonic() - started < run_s:
        before = time.monotonic()
        pow(7, 5_000_000)
        longest = max(longest, time.monotonic() - before)
        calls += 1
    held = lock.is_held()
    records().set(f"{tag}:end", repr(now()))  # before the release that follows the return
    return {"held": held, "token": lock.token, "calls": calls, "longest_s": longest,
            "elapsed_s": time.monotonic() - started}


@app.task(
    base=LockedTask, bind=True, shared=False, name="faults.requeue_acks", acks_late=True,
    lock_key=["tag"], lock_ttl=2.0, lock_on_duplicate="requeue", lock_requeue_delay=0.05,
    lock_requeue_max=100_000,
)
def requeue_acks(self: Any, tag: str, n: int, hold_s: float) -> int:
    _run_record(self, tag, n=n)
    time.sleep(hold_s)
    return n


@app.task(
    base=LockedTask, bind=True, shared=False, name="faults.counted", lock_ttl=2.0,
    lock_on_backend_error="requeue", lock_requeue_delay=0.05, lock_requeue_max=100_000,
)
def counted(self: Any, tag: str, n: int, hold_s: float) -> int:
    _run_record(self, tag, n=n)
    time.sleep(hold_s)
    return n


@app.task(base=LockedTask, bind=True, shared=False, name="faults.abortable", lock_ttl=1.5,
          lock_on_lost="abort")
def abortable(self: Any, tag: str) -> str:
    _run_record(self, tag)
    for _ in range(400):
        time.sleep(0.05)
    return "finished without noticing"
