"""Options of the throttle window and the per-key limit, without a worker: checked at
registration, and what an enqueue writes to the (in-memory) lock store."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_singleton_lock import DuplicateTaskError, LockConfigError, LockedTask, signals
from celery_singleton_lock.backends.registry import get_backend
from celery_singleton_lock.keys import slot_key
from tests.servers import wait_until

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
    record = get_backend(app.conf.singleton_lock_url).lock_info(task.lock_key_for("a"))
    assert record is not None and record.ttl_s is not None
    assert 6.0 < record.ttl_s <= 7.0


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"lock_limit": 0}, "integer >= 1"),
        ({"lock_limit": -2}, "integer >= 1"),
        ({"lock_limit": "3"}, "integer >= 1"),
        ({"lock_limit": 2.0}, "integer >= 1"),
        ({"lock_limit": True}, "integer >= 1"),
        ({"lock_limit": 3, "lock_mode": "until_expired"}, "while_executing"),
        ({"lock_limit": 3, "lock_mode": "until_executed"}, "while_executing"),
        ({"lock_limit": 2, "lock_mode": "until_and_while_executing"}, "while_executing"),
        ({"lock_limit": 2, "lock_on_duplicate": "coalesce"}, "coalesce"),
    ],
)
def test_bad_lock_limit_raises_lock_config_error_naming_it_at_registration(
    app: Celery, options: dict[str, Any], needle: str
) -> None:
    with pytest.raises(LockConfigError) as info:
        app.task(base=LockedTask, shared=False, name="semantics.cfg_bad_limit", **options)(_body)
    assert info.value.setting == "lock_limit"
    assert "lock_limit" in str(info.value) and needle in str(info.value)
    assert "semantics.cfg_bad_limit" in str(info.value)


def test_lock_limit_body_holds_a_slot_of_its_key(app: Celery) -> None:
    seen: list[tuple[str, int]] = []

    def body(self: Any, slot: str) -> str:
        seen.append((self.lock.key, self.lock.fencing_token))
        return slot

    task: Any = app.task(base=LockedTask, bind=True, shared=False, name="semantics.cfg_limit",
                         lock_limit=2)(body)
    assert task.lock_options.limit == 2
    assert task.apply(("a",)).get() == "a"
    assert task.apply(("a",)).get() == "a"
    key = task.lock_key_for("a")
    assert [k for k, _ in seen] == [slot_key(key, 0), slot_key(key, 0)]
    assert seen[0][1] < seen[1][1]
    assert get_backend(app.conf.singleton_lock_url).lock_info(slot_key(key, 0)) is None, \
        "released when the body ended"


@pytest.mark.parametrize("mode", ["until_expired", "until_executing", "until_executed",
                                  "until_and_while_executing"])
def test_coalesce_outside_while_executing_raises_naming_lock_on_duplicate(
    app: Celery, mode: str
) -> None:
    with pytest.raises(LockConfigError) as info:
        app.task(base=LockedTask, shared=False, name="semantics.cfg_bad_coalesce",
                 lock_on_duplicate="coalesce", lock_mode=mode)(_body)
    assert info.value.setting == "lock_on_duplicate"
    assert "coalesce" in str(info.value) and mode in str(info.value)


def test_coalesce_setting_with_an_enqueue_mode_names_the_setting(app: Celery) -> None:
    app.conf.singleton_lock_on_duplicate = "coalesce"
    with pytest.raises(LockConfigError) as info:
        app.task(base=LockedTask, shared=False, name="semantics.cfg_bad_coalesce_setting",
                 lock_mode="until_executed")(_body)
    assert info.value.setting == "singleton_lock_on_duplicate"


def test_coalesce_follow_up_runs_after_the_holder_and_later_duplicates_name_it(
    app: Celery,
) -> None:
    """In one process (threads, the in-memory store): the follow-up is told apart by the
    ``lock_duplicate`` signal, and a third run is rejected naming it."""
    go = threading.Event()
    order: list[str] = []

    def body(self: Any, slot: str) -> str:
        order.append(f"start {self.request.id}")
        if self.request.id == "holder":
            go.wait(10)
        order.append(f"end {self.request.id}")
        return str(self.request.id)

    task: Any = app.task(base=LockedTask, bind=True, shared=False, name="semantics.cfg_coalesce",
                         lock_on_duplicate="coalesce", lock_wait_timeout=10.0)(body)
    seen: list[dict[str, Any]] = []

    def record(sender: Any = None, **kwargs: Any) -> None:
        seen.append(kwargs)

    signals.lock_duplicate.connect(record, weak=False)
    try:
        holder = threading.Thread(target=lambda: task.apply(("a",), task_id="holder"))
        holder.start()
        wait_until(lambda: order == ["start holder"], 5)
        follow = threading.Thread(target=lambda: task.apply(("a",), task_id="follow"))
        follow.start()
        wait_until(lambda: [s["policy"] for s in seen] == ["coalesce"], 5)
        task.apply(("a",), task_id="third")
        third = task.AsyncResult("third")  # what the result backend stored
        assert third.state == "REVOKED"
        assert isinstance(third.result, DuplicateTaskError)
        assert third.result.holder_id == "follow"
        go.set()
        holder.join(10)
        follow.join(10)
    finally:
        signals.lock_duplicate.disconnect(record)
    assert order == ["start holder", "end holder", "start follow", "end follow"]
    assert seen[0]["task_id"] == "follow" and seen[0]["holder_id"] == "holder"
