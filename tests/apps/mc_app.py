"""Tasks for the real-worker tests of ``tests/test_memcached_store.py``, run with
``singleton_lock_url`` naming memcached (``CSL_TEST_LOCK_URL``).

Each body records under its ``tag`` when it started (with its pid, task id and whether it held
its lock) and when it ended, so a test measures the release from the moment of the ending.
``guarded`` proves mutual exclusion: it enters by an atomic INCR in the records database and
keeps the maximum seen, which two bodies of one signature at once would push to 2.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery_singleton_lock import LockedTask
from tests.apps.common import ENTER_SCRIPT, make_app, now, records

app = make_app("csl_mc")

#: Renewed every ttl/3 while a body runs; memcached keeps it ``ceil(ttl) + 1`` = 3 s.
LOCK_TTL_S = 2.0


def _started(task: Any, tag: str) -> None:
    lock = task.lock
    info = {"time": now(), "pid": os.getpid(), "id": task.request.id,
            "held": lock is not None and lock.is_held()}
    records().set(f"{tag}:start", json.dumps(info))


def _ended(tag: str, what: str = "end") -> None:
    records().set(f"{tag}:{what}", repr(now()))


def _options(**extra: Any) -> dict[str, Any]:
    return {"base": LockedTask, "bind": True, "shared": False, "lock_ttl": LOCK_TTL_S, **extra}


@app.task(name="mc.ok", **_options())
def ok(self: Any, tag: str) -> str:
    _started(self, tag)
    _ended(tag)
    return "ok"


@app.task(name="mc.boom", **_options())
def boom(self: Any, tag: str) -> None:
    _started(self, tag)
    _ended(tag)
    raise ValueError(f"boom {tag}")


@app.task(name="mc.retrying", **_options(max_retries=1))
def retrying(self: Any, tag: str, countdown: float) -> int:
    _started(self, tag)
    if self.request.retries == 0:
        _ended(tag, "retry")
        raise self.retry(countdown=countdown)
    _ended(tag)
    return int(self.request.retries)


@app.task(name="mc.sleeper", **_options())
def sleeper(self: Any, tag: str, seconds: float) -> str:
    _started(self, tag)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.02)
    _ended(tag)
    return "slept"


@app.task(name="mc.fragile", **_options(lock_on_lost="abort"))
def fragile(self: Any, tag: str, seconds: float) -> str:
    """A sleeper whose lost lock raises LockLostError inside it."""
    _started(self, tag)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.02)
    _ended(tag)
    return "slept"


@app.task(name="mc.limited", **_options(time_limit=1.0))
def limited(self: Any, tag: str) -> str:
    _started(self, tag)
    time.sleep(30)
    _ended(tag)
    return "not reached"


@app.task(name="mc.queued", **_options(lock_mode="until_executed", lock_key=["tag"]))
def queued(self: Any, tag: str) -> str:
    _started(self, tag)
    _ended(tag)
    return "ran"


@app.task(name="mc.waiting", **_options(lock_on_duplicate="wait", lock_wait_timeout=20.0,
                                        lock_key=["slot"]))
def waiting(self: Any, slot: str, tag: str, hold_s: float) -> str:
    """A duplicate of a running ``waiting`` blocks for the lock (memcached: by polling)."""
    _started(self, tag)
    time.sleep(hold_s)
    _ended(tag)
    return tag


@app.task(name="mc.guarded", **_options())
def guarded(self: Any, slot: str, hold_s: float) -> int:
    r = records()
    r.eval(ENTER_SCRIPT, 2, f"{slot}:inside", f"{slot}:max")
    try:
        time.sleep(hold_s)
    finally:
        r.decr(f"{slot}:inside")
        r.rpush(f"{slot}:runs", self.request.id)
    return os.getpid()
