"""Tasks for the real-worker tests of ``tests/test_zookeeper_store.py``, locked in the ZooKeeper
store that ``CSL_TEST_STORE_URL`` names (JSON).

Bodies record, under their ``tag``, when they started (with pid, task id and whether the lock
was held) and when they ended, as ``tests/apps/release.py`` does, so a test can measure the
release from the moment of the ending. ``guarded`` proves mutual exclusion with an atomic
counter; ``hog`` holds the GIL in one C call (``sum`` over a range), which starves every thread
of its pool child, the ZooKeeper client's heartbeats included.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery

from celery_singleton_lock import LockedTask
from tests.apps.common import ENTER_SCRIPT, configure, now, records

app = Celery("csl_zk_app")
configure(app, os.environ.get("CSL_TEST_BROKER"), os.environ.get("CSL_TEST_BACKEND"), None,
          singleton_lock_socket_timeout=0.5)
app.conf.singleton_lock_url = json.loads(os.environ.get("CSL_TEST_STORE_URL") or "null")

#: Renewed every ttl/3; a release within 1 s is never a lapse in disguise (nothing lapses here).
LOCK_TTL_S = 2.0


def _started(task: Any, tag: str) -> None:
    lock = task.lock
    info = {"time": now(), "pid": os.getpid(), "id": task.request.id,
            "held": lock is not None and lock.is_held(),
            "fence": lock.fencing_token if lock is not None else None}
    records().set(f"{tag}:start", json.dumps(info))


def _ended(tag: str, what: str = "end", **extra: Any) -> None:
    records().set(f"{tag}:{what}", json.dumps({"time": now(), **extra}))


@app.task(base=LockedTask, bind=True, shared=False, name="zk.ok", lock_ttl=LOCK_TTL_S)
def ok(self: Any, tag: str) -> str:
    _started(self, tag)
    _ended(tag)
    return "ok"


@app.task(base=LockedTask, bind=True, shared=False, name="zk.boom", lock_ttl=LOCK_TTL_S)
def boom(self: Any, tag: str) -> None:
    _started(self, tag)
    _ended(tag)
    raise ValueError(f"boom {tag}")


@app.task(base=LockedTask, bind=True, shared=False, name="zk.retrying", lock_ttl=LOCK_TTL_S,
          max_retries=1)
def retrying(self: Any, tag: str, countdown: float) -> int:
    _started(self, tag)
    if self.request.retries == 0:
        _ended(tag, "retry")
        raise self.retry(countdown=countdown)
    _ended(tag)
    return int(self.request.retries)


@app.task(base=LockedTask, bind=True, shared=False, name="zk.sleeper", lock_ttl=LOCK_TTL_S)
def sleeper(self: Any, tag: str, seconds: float) -> str:
    _started(self, tag)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.02)
    _ended(tag)
    return "slept"


@app.task(base=LockedTask, bind=True, shared=False, name="zk.limited", lock_ttl=LOCK_TTL_S,
          time_limit=1.0)
def limited(self: Any, tag: str) -> str:
    _started(self, tag)
    time.sleep(30)
    _ended(tag)
    return "not reached"


@app.task(base=LockedTask, bind=True, shared=False, name="zk.guarded")
def guarded(self: Any, slot: str, hold_s: float) -> int:
    r = records()
    r.eval(ENTER_SCRIPT, 2, f"{slot}:inside", f"{slot}:max")
    try:
        time.sleep(hold_s)
    finally:
        r.decr(f"{slot}:inside")
        r.rpush(f"{slot}:runs", self.request.id)
    return os.getpid()


@app.task(base=LockedTask, bind=True, shared=False, name="zk.hog", lock_ttl=LOCK_TTL_S)
def hog(self: Any, tag: str, seconds: float) -> int:
    t0 = time.monotonic()
    sum(range(10**6))
    n = int(10**6 * seconds / max(time.monotonic() - t0, 1e-4))  # this process's own pace
    _started(self, tag)
    started = time.monotonic()
    total = sum(range(n))  # one C call: no other thread of this process runs meanwhile
    _ended(tag, held=self.lock.is_held(), took=time.monotonic() - started)
    return total % 1000


@app.task(base=LockedTask, bind=True, shared=False, name="zk.abortable", lock_ttl=LOCK_TTL_S,
          lock_on_lost="abort")
def abortable(self: Any, tag: str, seconds: float) -> str:
    _started(self, tag)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.02)
    _ended(tag)
    return "slept"
