"""The app of the observability tests (``celery locks``, Flower, Prometheus, events).

``obs.hold(name, seconds)`` holds the lock of ``name`` (``lock_key=["name"]``) while it runs, with
a short ttl so that it is renewed every second; it records ``entered:<task id>`` when the body
starts and returns early once ``stop:<name>`` is set in the records database.
``obs.quick(x)`` takes a lock per task name and returns at once.
``obs.signalled(x)`` is a locked no-op whose ``lock_acquired`` and ``lock_released`` signals a
receiver of this module records as ``signal:<task id>`` (a list of ``<signal> <key> <detail>``).

Test processes use :func:`client`: a fresh app with the same tasks per test module, because an
app keeps its broker and backend connections once made, and every module has its own servers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from celery import Celery

from celery_singleton_lock import signals
from celery_singleton_lock.task import LockedTask
from tests.apps.common import configure, make_app, records


def define_tasks(app: Celery) -> None:
    @app.task(name="obs.hold", base=LockedTask, bind=True, lock_key=["name"], lock_ttl=3.0,
              shared=False)
    def hold(self: Any, name: str, seconds: float = 30.0) -> str:
        rec = records()
        rec.set(f"entered:{self.request.id}", "1")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not rec.exists(f"stop:{name}"):
            time.sleep(0.05)
        return name

    @app.task(name="obs.quick", base=LockedTask, lock_key=[], shared=False)
    def quick(x: int) -> int:
        return x

    @app.task(name="obs.signalled", base=LockedTask, shared=False)
    def signalled(x: int) -> int:
        return x


def _record_signal(signal: Any = None, sender: Any = None, lock_key: str = "",
                   task_id: str | None = None, **kwargs: Any) -> None:
    if getattr(sender, "name", None) == "obs.signalled" and task_id:
        detail = kwargs.get("reason") or kwargs["lease"].fencing_token
        records().rpush(f"signal:{task_id}", f"{signal.name} {lock_key} {detail}")


signals.lock_acquired.connect(_record_signal, weak=False)
signals.lock_released.connect(_record_signal, weak=False)


app = make_app("obs_app")
define_tasks(app)


def client(broker_url: str, backend_url: str, lock_url: str | Sequence[str]) -> Celery:
    """A new app with this module's tasks, for a test process (not the current app)."""
    fresh = Celery("obs_client", set_as_current=False)
    configure(fresh, broker_url, backend_url, lock_url)
    define_tasks(fresh)
    return fresh
