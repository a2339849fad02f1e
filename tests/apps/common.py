"""What every test app shares: configuration from the environment, readiness, records.

Environment (set by :class:`tests.workers.CeleryWorker`):

* ``CSL_TEST_BROKER``, ``CSL_TEST_BACKEND``: broker and result backend URLs (a dedicated test
  ``redis-server``, never a lock master);
* ``CSL_TEST_LOCK_URL``: ``singleton_lock_url`` (comma-separated for Redlock masters);
* ``CSL_TEST_RECORD_URL``: the Redis database the task bodies write their records to;
* ``CSL_TEST_READY_FILE``: touched on ``worker_ready``, so the harness knows the worker consumes;
* ``CSL_TEST_CONF``: JSON of extra ``app.conf`` settings for this worker.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from celery import signals as celery_signals

__all__ = ["make_app", "configure", "records", "now", "ENTER_SCRIPT"]

#: INCR the "inside" counter and keep its maximum in a second key: one atomic step.
ENTER_SCRIPT = """
local inside = redis.call('incr', KEYS[1])
local top = tonumber(redis.call('get', KEYS[2]) or '0')
if inside > top then redis.call('set', KEYS[2], inside) end
return inside
"""


def configure(
    app: Celery,
    broker_url: str | None,
    backend_url: str | None,
    lock_url: str | Sequence[str] | None,
    **settings: Any,
) -> Celery:
    """Point ``app`` at the test servers; ``settings`` go to ``app.conf`` last."""
    if isinstance(lock_url, str) and "," in lock_url:
        lock_url = [u for u in lock_url.split(",") if u]
    app.conf.update(
        broker_url=broker_url,
        result_backend=backend_url,
        singleton_lock_url=lock_url,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_redirect_stdouts=False,
        result_expires=None,
        **settings,
    )
    return app


def make_app(main: str) -> Celery:
    """A Celery app configured from the ``CSL_TEST_*`` environment (if set)."""
    app = Celery(main)
    extra = json.loads(os.environ.get("CSL_TEST_CONF") or "{}")
    configure(
        app,
        os.environ.get("CSL_TEST_BROKER"),
        os.environ.get("CSL_TEST_BACKEND"),
        os.environ.get("CSL_TEST_LOCK_URL"),
        **extra,
    )
    return app


def _touch_ready(**kwargs: Any) -> None:
    path = os.environ.get("CSL_TEST_READY_FILE")
    if path:
        Path(path).write_text(str(os.getpid()))


celery_signals.worker_ready.connect(_touch_ready, weak=False)

_records: dict[int, redis.Redis] = {}
_records_lock = threading.Lock()


def records() -> redis.Redis:
    """A client of the records database, one per process (pool children fork)."""
    pid = os.getpid()
    with _records_lock:
        client = _records.get(pid)
        if client is None:
            url = os.environ.get("CSL_TEST_RECORD_URL")
            if not url:
                raise RuntimeError("CSL_TEST_RECORD_URL is not set")
            client = _records[pid] = redis.Redis.from_url(url, decode_responses=True)
        return client


def now() -> float:
    """Wall-clock time, comparable between the worker and the test process (one host)."""
    return time.time()
