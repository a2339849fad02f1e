"""Tasks and a publish hook for ``tests/test_beat.py`` (run by ``celery beat`` and ``worker``).

The schedule comes from the test, as ``beat_schedule`` in ``CSL_TEST_CONF``. Every message of
this app's tasks carries two extra headers, ``csl_sent_at`` (wall clock) and ``csl_sent_by``
(process id), so a test can tell which beat process sent a message and when; with
``CSL_TEST_RECORD_URL`` set the publisher also appends both, with the task id, to ``sent``.
A beat process touches ``CSL_TEST_READY_FILE`` on ``beat_init``, as a worker does when ready.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from celery import signals as celery_signals

from celery_singleton_lock import LockedTask
from tests.apps.common import ENTER_SCRIPT, make_app, now, records

app = make_app("csl_beat")

#: Records list of every message published by this app's processes.
SENT = "sent"
#: The tasks whose messages are stamped.
TASK_NAMES = ("beat.long_job", "beat.plain")


def _stamp(sender: Any = None, headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    if headers is None or sender not in TASK_NAMES:  # another app's task in the same process
        return
    headers["csl_sent_at"] = now()
    headers["csl_sent_by"] = os.getpid()
    if os.environ.get("CSL_TEST_RECORD_URL"):
        sent = {"id": headers.get("id"), "task": headers.get("task"),
                "at": headers["csl_sent_at"], "pid": headers["csl_sent_by"]}
        records().rpush(SENT, json.dumps(sent))


def _beat_ready(**kwargs: Any) -> None:
    path = os.environ.get("CSL_TEST_READY_FILE")
    if path:
        Path(path).write_text(str(os.getpid()))


celery_signals.before_task_publish.connect(_stamp, weak=False)
celery_signals.beat_init.connect(_beat_ready, weak=False)


@app.task(base=LockedTask, bind=True, name="beat.long_job", shared=False)
def long_job(self: Any, slot: str, hold_s: float) -> str:
    """Holds for ``hold_s`` inside an external overlap counter (``<slot>:inside``/``:max``)."""
    r = records()
    start = now()
    r.eval(ENTER_SCRIPT, 2, f"{slot}:inside", f"{slot}:max")
    try:
        time.sleep(hold_s)
    finally:
        r.decr(f"{slot}:inside")
        r.rpush(f"{slot}:runs", json.dumps({"id": self.request.id, "start": start,
                                            "end": now(), "pid": os.getpid()}))
    return slot


@app.task(name="beat.plain", shared=False)
def plain() -> None:
    """A plain task for the failover test (no worker consumes it)."""
