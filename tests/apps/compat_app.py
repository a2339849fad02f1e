"""Tasks of ``tests/test_compat.py``: the README examples of celery-singleton and celery-once,
on :mod:`celery_singleton_lock.compat`; also a plain task and an ``until_and_while_executing``
task for ``celery locks key`` in ``tests/test_cli.py``.

The bodies that "sleep" in the peers' READMEs hold instead (:func:`hold`): they record
``entered:<task id>`` and the task id in ``runs:<task name>``, then return once
``go:<task id>`` is set in the records database (or after ``seconds``), so a test decides
when a task ends.

Where the locks live comes from the peers' own settings: ``singleton_backend_url`` (and
``singleton_key_prefix``) for celery-singleton, ``app.conf.ONCE['settings']['url']`` for
celery-once, read from ``CSL_TEST_SINGLETON_URL`` and ``CSL_TEST_ONCE_URL``. The plain
``LockedTask`` keeps ``singleton_lock_url`` (``CSL_TEST_LOCK_URL``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

from celery import Celery, current_task

from celery_singleton_lock import LockedTask
from celery_singleton_lock.compat import QueueOnce, Singleton
from tests.apps.common import configure, make_app, records

#: celery-singleton's documented default key prefix, set here to show it is honoured.
SINGLETON_PREFIX = "SINGLETONLOCK_"
#: The longest a held body waits for its ``go`` key, seconds.
HOLD_S = 30.0


def hold(seconds: float = HOLD_S) -> None:
    """Record the start of the current task, then wait for ``go:<task id>`` (or ``seconds``)."""
    task_id = current_task.request.id
    rec = records()
    rec.rpush(f"runs:{current_task.name}", task_id)
    rec.set(f"entered:{task_id}", "1")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not rec.exists(f"go:{task_id}"):
        time.sleep(0.02)


def peer_settings(singleton_url: str | None, once_url: str | None) -> dict[str, Any]:
    """The peers' settings of this app, as their READMEs spell them."""
    return {
        "singleton_backend_url": singleton_url,
        "singleton_key_prefix": SINGLETON_PREFIX,
        "ONCE": {
            "backend": "celery_once.backends.Redis",
            "settings": {"url": once_url, "default_timeout": 60 * 60},
        },
    }


def define_tasks(app: Celery) -> None:
    # ---- celery-singleton's README

    @app.task(base=Singleton, name="singleton.do_stuff", shared=False)
    def do_stuff(*args: Any, **kwargs: Any) -> str:
        hold()
        return "I just woke up"

    @app.task(base=Singleton, unique_on=["username"], name="singleton.do_something",
              shared=False)
    def do_something(username: str, otherarg: Any = None) -> str:
        hold()
        return username

    @app.task(base=Singleton, raise_on_duplicate=True, name="singleton.do_something_raise",
              shared=False)
    def do_something_raise(username: str) -> str:
        hold()
        return username

    @app.task(base=Singleton, raise_on_duplicate=False, name="singleton.never_raise",
              shared=False)
    def never_raise(username: str) -> str:
        return username

    @app.task(base=Singleton, lock_expiry=2, name="singleton.runs_for_12_seconds",
              shared=False)
    def runs_for_12_seconds(label: str = "") -> str:
        hold()
        return label

    # ---- celery-once's README

    @app.task(base=QueueOnce, name="once.slow_task", shared=False)
    def slow_task() -> str:
        hold()
        return "Done!"

    @app.task(base=QueueOnce, name="once.example", shared=False)
    def example(value: int) -> int:
        hold()
        return value

    @app.task(base=QueueOnce, once={"graceful": True}, name="once.graceful_task", shared=False)
    def graceful_task(value: int) -> int:
        hold()
        return value

    @app.task(base=QueueOnce, name="once.failing", shared=False)
    def failing(value: int) -> int:
        raise ValueError(f"failing({value})")

    @app.task(base=QueueOnce, once={"keys": ["a"]}, name="once.slow_add_a", shared=False)
    def slow_add_a(a: int, b: int) -> int:
        hold()
        return a + b

    @app.task(base=QueueOnce, once={"keys": []}, name="once.slow_add_none", shared=False)
    def slow_add_none(a: int, b: int) -> int:
        hold()
        return a + b

    @app.task(base=QueueOnce, once={"timeout": 60 * 60 * 10}, name="once.long_running_task",
              shared=False)
    def long_running_task() -> None:
        hold()

    @app.task(base=QueueOnce, once={"unlock_before_run": True}, name="once.unlock_first",
              shared=False)
    def unlock_first(name: str) -> str:
        hold()
        return name

    # ---- for ``celery locks key``

    @app.task(name="plain.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(base=LockedTask, lock_key=["slot"], lock_mode="until_and_while_executing",
              name="locked.both", shared=False)
    def both(slot: str, note: str = "") -> str:
        hold()
        return slot


app = make_app("compat_app")
app.conf.update(peer_settings(os.environ.get("CSL_TEST_SINGLETON_URL"),
                              os.environ.get("CSL_TEST_ONCE_URL")),
                **json.loads(os.environ.get("CSL_TEST_CONF") or "{}"))
define_tasks(app)


def client(broker_url: str, backend_url: str, lock_url: str | Sequence[str],
           singleton_url: str, once_url: str, **settings: Any) -> Celery:
    """A new app with this module's tasks for a test process; ``settings`` go on top."""
    fresh = Celery("compat_client", set_as_current=False)
    configure(fresh, broker_url, backend_url, lock_url,
              **{**peer_settings(singleton_url, once_url), **settings})
    define_tasks(fresh)
    return fresh
