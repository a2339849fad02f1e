"""Tasks for ``tests/test_task_release.py``: bodies that end in every way a task can end.

Each body records, under its ``tag``, when it started (with its pid and task id) and when it
ended, so the test can measure the release of the lock from the moment of the ending.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from celery_singleton_lock import LockedTask
from tests.apps.common import make_app, now, records

app = make_app("csl_release")

#: Short enough that a killed worker's lock expires quickly, long enough (renewed every ttl/3)
#: that a release within 1 s is never an expiry in disguise.
LOCK_TTL_S = 2.0


def _started(task: Any, tag: str) -> None:
    lock = task.lock
    info = {"time": now(), "pid": os.getpid(), "id": task.request.id,
            "held": lock is not None and lock.is_held()}
    records().set(f"{tag}:start", json.dumps(info))


def _ended(tag: str, what: str = "end") -> None:
    records().set(f"{tag}:{what}", repr(now()))


@app.task(base=LockedTask, bind=True, shared=False, name="release.ok", lock_ttl=LOCK_TTL_S)
def ok(self: Any, tag: str) -> str:
    _started(self, tag)
    _ended(tag)
    return "ok"


@app.task(base=LockedTask, bind=True, shared=False, name="release.boom", lock_ttl=LOCK_TTL_S)
def boom(self: Any, tag: str) -> None:
    _started(self, tag)
    _ended(tag)
    raise ValueError(f"boom {tag}")


@app.task(base=LockedTask, bind=True, shared=False, name="release.retrying", lock_ttl=LOCK_TTL_S,
          max_retries=1)
def retrying(self: Any, tag: str, countdown: float) -> int:
    _started(self, tag)
    if self.request.retries == 0:
        _ended(tag, "retry")
        raise self.retry(countdown=countdown)
    _ended(tag)
    return int(self.request.retries)


@app.task(base=LockedTask, bind=True, shared=False, name="release.sleeper", lock_ttl=LOCK_TTL_S)
def sleeper(self: Any, tag: str, seconds: float) -> str:
    _started(self, tag)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.02)
    _ended(tag)
    return "slept"


@app.task(base=LockedTask, bind=True, shared=False, name="release.limited", lock_ttl=LOCK_TTL_S,
          time_limit=1.0)
def limited(self: Any, tag: str) -> str:
    _started(self, tag)
    time.sleep(30)
    _ended(tag)
    return "not reached"


@app.task(base=LockedTask, bind=True, shared=False, name="release.cleanup", lock_ttl=LOCK_TTL_S)
def cleanup(self: Any, tag: str, cleanup_s: float) -> str:
    """Runs until a soft time limit (or ``revoke(terminate=True, signal="SIGUSR1")``), then
    cleans up for ``cleanup_s`` seconds: the lock must stay held until the cleanup ends."""
    _started(self, tag)
    try:
        time.sleep(30)
    except SoftTimeLimitExceeded:
        _ended(tag, "interrupted")
        deadline = time.monotonic() + cleanup_s
        while time.monotonic() < deadline:
            time.sleep(0.02)
    _ended(tag)
    return "cleaned up"
