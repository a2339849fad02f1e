"""Tasks for ``tests/test_edge_faults.py``: the faults found at the edges (issue 11).

With ``CSL_TEST_NAMESPACED=1`` the app is configured the Django way,
``config_from_object(obj, namespace="CELERY")`` with ``CELERY_*`` names, and
``CELERY_SINGLETON_LOCK_URL`` only when ``CSL_TEST_LOCK_URL`` is not empty (else the lock store
defaults to the broker).
"""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace
from typing import Any

from celery import Celery

from celery_singleton_lock import LockedTask, signals
from tests.apps.common import make_app, now, records


def _namespaced_app() -> Celery:
    app = Celery("csl_edges")
    config = {
        "CELERY_BROKER_URL": os.environ["CSL_TEST_BROKER"],
        "CELERY_RESULT_BACKEND": os.environ["CSL_TEST_BACKEND"],
        "CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP": True,
        "CELERY_WORKER_REDIRECT_STDOUTS": False,
        "CELERY_TASK_SERIALIZER": "json",
        "CELERY_RESULT_EXPIRES": None,
    }
    if os.environ.get("CSL_TEST_LOCK_URL"):
        config["CELERY_SINGLETON_LOCK_URL"] = os.environ["CSL_TEST_LOCK_URL"]
    app.config_from_object(SimpleNamespace(**config), namespace="CELERY")
    return app


app = _namespaced_app() if os.environ.get("CSL_TEST_NAMESPACED") else make_app("csl_edges")


def _record_lost(sender: Any = None, lock_key: str = "", task_id: str = "", reason: str = "",
                 **kwargs: Any) -> None:
    records().rpush("lost", json.dumps({"lock_key": lock_key, "task_id": task_id,
                                        "reason": reason, "time": now()}))


if os.environ.get("CSL_TEST_RECORD_URL"):
    signals.lock_lost.connect(_record_lost, weak=False)


@app.task(base=LockedTask, bind=True, shared=False, name="edges.hold", lock_key=["tag"],
          lock_ttl=1.0)
def hold(self: Any, tag: str, limit_s: float = 30.0) -> str:
    """Holds its lock until the test sets ``<tag>:go:<task id>`` (or ``limit_s`` passes)."""
    records().rpush(f"{tag}:runs", json.dumps({"id": self.request.id, "time": now()}))
    go = f"{tag}:go:{self.request.id}"
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and not records().exists(go):
        time.sleep(0.02)
    return str(self.request.id)


@app.task(shared=False, name="edges.link")
def link(tag: str, n: int) -> int:
    """A plain chain link: records that it ran."""
    records().rpush(f"{tag}:links", n)
    return n


@app.task(base=LockedTask, bind=True, shared=False, name="edges.later", lock_key=["tag"],
          lock_mode="until_executed", lock_ttl=5.0)
def later(self: Any, tag: str) -> str:
    records().rpush(f"{tag}:runs", json.dumps({"id": self.request.id, "time": now()}))
    return str(self.request.id)
