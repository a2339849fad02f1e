"""The Celery app the chaos run's workers load (``celery -A chaos.app worker``).

Three ``LockedTask`` tasks, one per duplicate policy, all locked on their ``key`` argument:

* ``chaos.reject``: duplicates rejected; ``lock_on_lost="abort"``;
* ``chaos.requeue``: duplicates requeued, ``acks_late`` and ``reject_on_worker_lost``, so a
  body cut short by SIGKILL is delivered again and every task must run to its end once;
* ``chaos.wait``: duplicates wait for the release.

A body sleeps (``shape="sleep"``, ``size`` seconds) or holds the GIL in one long C call
(``shape="gil"``: ``pow(7, size)``). It records its start (with the fencing token) and its end
through :class:`chaos.records.Recorder`, outside the lock store. The worker processes also
record the ``lock_lost`` and ``lock_duplicate`` signals. URLs and settings come from the
environment the run sets (see :mod:`tests.apps.common`).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from celery_singleton_lock import LockedTask, signals
from chaos.records import Recorder
from tests.apps.common import make_app

app = make_app("csl_chaos")
recorder = Recorder.from_env()

#: Task name -> duplicate policy, as the checker groups them.
POLICIES = {"chaos.reject": "reject", "chaos.requeue": "requeue", "chaos.wait": "wait"}


def _body(task: Any, shape: str, size: float) -> str:
    start = time.time()
    lock = task.lock
    run = secrets.token_hex(8)
    req = task.request
    recorder.write(
        "start", t=start, run=run, tid=req.id, task=task.name, policy=POLICIES[task.name],
        key=lock.key if lock is not None else None,
        fence=lock.fencing_token if lock is not None else None,
        host=req.hostname, shape=shape, size=size,
    )
    error = None
    try:
        if shape == "gil":
            pow(7, int(size))  # one C call that never releases the GIL
        else:
            time.sleep(size)
    except BaseException as exc:  # LockLostError from lock_on_lost="abort", SoftTimeLimit...
        error = type(exc).__name__
        raise
    finally:
        recorder.write("end", run=run, tid=req.id, error=error)
    return run


@app.task(base=LockedTask, bind=True, name="chaos.reject", lock_key=["key"],
          lock_on_duplicate="reject", lock_on_lost="abort")
def reject(self: Any, key: str, shape: str, size: float) -> str:
    return _body(self, shape, size)


@app.task(base=LockedTask, bind=True, name="chaos.requeue", lock_key=["key"],
          lock_on_duplicate="requeue", acks_late=True, reject_on_worker_lost=True)
def requeue(self: Any, key: str, shape: str, size: float) -> str:
    return _body(self, shape, size)


@app.task(base=LockedTask, bind=True, name="chaos.wait", lock_key=["key"],
          lock_on_duplicate="wait")
def wait(self: Any, key: str, shape: str, size: float) -> str:
    return _body(self, shape, size)


def _on_lost(sender: Any = None, lock_key: str = "", task_id: str = "", reason: str = "",
             **kwargs: Any) -> None:
    recorder.write("lost", key=lock_key, tid=task_id, reason=reason)


def _on_duplicate(sender: Any = None, lock_key: str = "", task_id: str = "",
                  holder_id: str = "", policy: str = "", **kwargs: Any) -> None:
    recorder.write("dup", key=lock_key, tid=task_id, holder=holder_id, policy=policy)


signals.lock_lost.connect(_on_lost, weak=False)
signals.lock_duplicate.connect(_on_duplicate, weak=False)
