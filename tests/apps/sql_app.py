"""Tasks for the real-worker tests of ``tests/test_sql_store.py``, locked in the PostgreSQL or
MySQL/MariaDB store that ``CSL_TEST_STORE_URL`` names (JSON).

Bodies record, under their ``tag``, when they started (with pid, task id, whether the lock was
held and its fencing token) and when they ended, as ``tests/apps/release.py`` does, so a test
can measure the release from the moment of the ending. ``guarded`` proves mutual exclusion with
an atomic counter; ``hog`` holds the GIL in one C call (``sum`` over a range), which starves
every thread of its pool child, its renewal thread included.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery

from celery_singleton_lock import LockedTask
from tests.apps.common import ENTER_SCRIPT, configure, now, records

app = Celery("csl_sql_app")
configure(app, os.environ.get("CSL_TEST_BROKER"), os.environ.get("CSL_TEST_BACKEND"), None,
          **json.loads(os.environ.get("CSL_TEST_CONF") or "{}"))
app.conf.singleton_lock_url = json.loads(os.environ.get("CSL_TEST_STORE_URL") or "null")

#: Renewed every ttl/3: a release within 1 s is never a lapse in disguise.
LOCK_TTL_S = 2.0


def _started(task: Any, tag: str) -> None:
    lock = task.lock
    info = {"time": now(), "pid": os.getpid(), "id": task.request.id,
            "held": lock is not None and lock.is_held(),
            "fence": lock.fencing_token if lock is not None else None,
            "token": lock.token if lock is not None else None}
    records().set(f"{tag}:start", json.dumps(info))


def _ended(tag: str, what: str = "end", **extra: Any) -> None:
    records().set(f"{tag}:{what}", json.dumps({"time": now(), **extra}))


@app.task(base=LockedTask, bind=True, shared=False, name="sql.ok", lock_ttl=LOCK_TTL_S)
def ok(self: Any, tag: str) -> str:
    _started(self, tag)
    _ended(tag)
    return "ok"


@app.task(base=LockedTask, bind=True, shared=False, name="sql.boom", lock_ttl=LOCK_TTL_S)
def boom(self: Any, tag: str) -> None:
    _started(self, tag)
    _ended(tag)
    raise ValueError(f"boom {tag}")


@app.task(base=LockedTask, bind=True, shared=False, name="sql.sleeper", lock_ttl=LOCK_TTL_S)
def sleeper(self: Any, tag: str, seconds: float) -> str:
    _started(self, tag)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.02)
    _ended(tag, held=self.lock.is_held())
    return "slept"


@app.task(base=LockedTask, bind=True, shared=False, name="sql.limited", lock_ttl=LOCK_TTL_S,
          time_limit=1.0)
def limited(self: Any, tag: str) -> str:
    _started(self, tag)
    time.sleep(30)
    _ended(tag)
    return "not reached"


@app.task(base=LockedTask, bind=True, shared=False, name="sql.guarded", lock_ttl=LOCK_TTL_S)
def guarded(self: Any, slot: str, hold_s: float) -> int:
    r = records()
    r.eval(ENTER_SCRIPT, 2, f"{slot}:inside", f"{slot}:max")
    try:
        time.sleep(hold_s)
    finally:
        r.decr(f"{slot}:inside")
        r.rpush(f"{slot}:runs", json.dumps({"id": self.request.id,
                                            "held": self.lock.is_held(),
                                            "fence": self.lock.fencing_token}))
    return os.getpid()


@app.task(base=LockedTask, bind=True, shared=False, name="sql.hog", lock_ttl=LOCK_TTL_S)
def hog(self: Any, tag: str, n: int) -> int:
    _started(self, tag)
    started = time.monotonic()
    total = sum(range(n))  # one C call: no other thread of this process runs meanwhile
    _ended(tag, held=self.lock.is_held(), took=time.monotonic() - started)
    return total % 1000
