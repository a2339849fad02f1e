"""Tasks for ``tests/test_semantics.py``: throttle windows (``until_expired``) and per-key
concurrency limits (``lock_limit``, a duplicate requeued until a slot is free).

Every body enters by INCR of ``<slot>:inside`` (keeping the maximum in ``<slot>:max``), records
its run in ``<slot>:runs`` (task id, start, end, pid, worker, the lock key and fencing token it
held) and leaves by DECR; a body that holds a lock also records it in ``<slot>:started`` on
entry.
The lock key is the slot alone. A body holds until the test sets ``<slot>:go`` (or
``<slot>:go:<task id>``) or ``hold_s`` passes, so a test can keep holders running while it
looks at them.

With ``CSL_TEST_EARLY_ACK=1`` the ``coalesce`` task acknowledges its message on receipt, for a
worker whose holder must not be restored by another worker's short visibility timeout.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery_singleton_lock import LockedTask
from tests.apps.common import ENTER_SCRIPT, make_app, now, records

app = make_app("csl_semantics")

#: The window of the ``until_expired`` task, seconds.
WINDOW_S = 4.0
#: Holders of one key at once for the ``lock_limit`` task.
LIMIT = 3


def _body(task: Any, slot: str, hold_s: float) -> str:
    r = records()
    start = now()
    r.eval(ENTER_SCRIPT, 2, f"{slot}:inside", f"{slot}:max")
    lock = task.lock
    if lock is not None:
        r.rpush(f"{slot}:started", json.dumps({"id": task.request.id, "pid": os.getpid(),
                                               "key": lock.key, "token": lock.token,
                                               "start": start}))
    go = (f"{slot}:go", f"{slot}:go:{task.request.id}")
    try:
        deadline = time.monotonic() + hold_s
        while time.monotonic() < deadline and not r.exists(*go):
            time.sleep(0.01)
    finally:
        r.decr(f"{slot}:inside")
        run = {"id": task.request.id, "start": start, "end": now(), "pid": os.getpid(),
               "host": task.request.hostname,
               "key": lock.key if lock is not None else None,
               "fence": lock.fencing_token if lock is not None else None}
        r.rpush(f"{slot}:runs", json.dumps(run))
    return str(task.request.id)


@app.task(base=LockedTask, bind=True, shared=False, name="semantics.window", lock_key=["slot"],
          lock_mode="until_expired", lock_ttl=WINDOW_S)
def window(self: Any, slot: str, hold_s: float = 0.0) -> str:
    return _body(self, slot, hold_s)



@app.task(base=LockedTask, bind=True, shared=False, name="semantics.limited", lock_key=["slot"],
          lock_limit=LIMIT, lock_ttl=3.0, lock_on_duplicate="requeue", lock_requeue_delay=0.05,
          lock_requeue_max=100_000)
def limited(self: Any, slot: str, hold_s: float = 0.0) -> str:
    return _body(self, slot, hold_s)


@app.task(base=LockedTask, bind=True, shared=False, name="semantics.coalesced",
          lock_key=["slot"], lock_on_duplicate="coalesce", lock_ttl=2.0,
          acks_late=os.environ.get("CSL_TEST_EARLY_ACK") != "1")
def coalesced(self: Any, slot: str, hold_s: float = 0.0) -> str:
    return _body(self, slot, hold_s)
