"""Tasks for ``tests/test_semantics.py``: throttle windows (``until_expired``) and per-key
concurrency limits (``lock_limit``).

Every body enters by INCR of ``<slot>:inside`` (keeping the maximum in ``<slot>:max``), records
its run in ``<slot>:runs`` (task id, start, end, pid, the lock key it held) and leaves by DECR.
The lock key is the slot alone. A body holds until the test sets ``<slot>:go`` or ``hold_s``
passes, so a test can keep holders running while it looks at them.
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


def _body(task: Any, slot: str, hold_s: float) -> str:
    r = records()
    start = now()
    r.eval(ENTER_SCRIPT, 2, f"{slot}:inside", f"{slot}:max")
    lock = task.lock
    try:
        deadline = time.monotonic() + hold_s
        while time.monotonic() < deadline and not r.exists(f"{slot}:go"):
            time.sleep(0.01)
    finally:
        r.decr(f"{slot}:inside")
        run = {"id": task.request.id, "start": start, "end": now(), "pid": os.getpid(),
               "key": lock.key if lock is not None else None,
               "fence": lock.fencing_token if lock is not None else None}
        r.rpush(f"{slot}:runs", json.dumps(run))
    return str(task.request.id)


@app.task(base=LockedTask, bind=True, shared=False, name="semantics.window", lock_key=["slot"],
          lock_mode="until_expired", lock_ttl=WINDOW_S)
def window(self: Any, slot: str, hold_s: float = 0.0) -> str:
    return _body(self, slot, hold_s)

