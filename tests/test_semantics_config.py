"""Options of the throttle window and the per-key limit, without a worker: checked at
registration, and what an enqueue writes to the (in-memory) lock store."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_singleton_lock import LockedTask
from celery_singleton_lock.memory import memory_store

# Every task here is made with shared=False: a shared task would be added to every app
# finalized later in the session.


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("csl_semantics_config", set_as_current=False)
    app.conf.update(broker_url="memory://", result_backend="cache+memory://",
                    singleton_lock_url=f"memory://semantics-{uuid.uuid4().hex}")
    app.finalize()
    yield app
    app.close()


def _body(slot: str) -> str:
    return slot


def test_until_expired_enqueue_lock_lives_lock_ttl_not_queued_ttl(app: Celery) -> None:
    task: Any = app.task(base=LockedTask, shared=False, name="semantics.cfg_window",
                         lock_mode="until_expired", lock_ttl=7.0, lock_queued_ttl=3600.0)(_body)
    first = task.delay("a")
    assert task.delay("a").id == first.id
    assert task.delay("b").id != first.id
    node = memory_store(app.conf.singleton_lock_url).nodes[0]
    ttl_ms = node.pttl_ms(task.lock_key_for("a"))
    assert 6000 < ttl_ms <= 7000
