"""Enqueue-time locks (SPEC 4): ``until_executing``, ``until_executed``,
``until_and_while_executing``.

The lock is taken in ``apply_async``, so duplicates are stopped before anything is queued: the
tests count the messages in the Redis broker list and read the lock keys in a real lock
``redis-server``. The lifecycle tests run a real prefork worker consuming ``RUN_QUEUE`` only;
the ``celery`` queue is never consumed, so what the enqueue tests publish stays countable.
"""

from __future__ import annotations

import json
import multiprocessing
import re
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import TaskRevokedError
from celery.signals import before_task_publish
from kombu import Connection

from celery_singleton_lock import (
    DuplicateTaskError,
    LockBackendError,
    LockConfigError,
    LockedTask,
)
from celery_singleton_lock import task as task_module
from celery_singleton_lock.task import TOKEN_HEADER, execution_key
from tests.apps import modes_app
from tests.apps.common import configure
from tests.servers import RedisServer, free_port, wait_until
from tests.workers import CeleryWorker, TaskEnv, poll_gone

#: The queue the lifecycle worker consumes.
RUN_QUEUE = "modes-run"
#: The broker list of Celery's default queue (never consumed in this module).
DEFAULT_QUEUE = "celery"
MODES = list(modes_app.BY_MODE)
#: The timestamp opening a worker log line (local time, milliseconds).
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}):")
#: Concurrent callers: processes x delay() calls each.
PROCESSES, CALLS = 4, 25


@pytest.fixture(scope="module")
def env() -> Iterator[TaskEnv]:
    with RedisServer() as lock_server:
        task_env = TaskEnv("tests.apps.modes_app", lock_server.url)
        configure(modes_app.app, task_env.broker_url, task_env.backend_url, lock_server.url)
        try:
            yield task_env
        finally:
            task_env.close()


@pytest.fixture
def broker(env: TaskEnv) -> Iterator[redis.Redis]:
    """The broker database, with the default queue emptied before the test."""
    client = redis.Redis.from_url(env.broker_url)
    client.delete(DEFAULT_QUEUE)
    try:
        yield client
    finally:
        client.delete(DEFAULT_QUEUE)
        client.close()


@pytest.fixture(scope="module")
def worker(env: TaskEnv) -> Iterator[CeleryWorker]:
    """One prefork worker (2 children) consuming ``RUN_QUEUE`` only."""
    celery_worker = env.worker(pool="prefork", concurrency=2, queues=[RUN_QUEUE])
    try:
        celery_worker.start()
        yield celery_worker
    finally:
        env.stop_workers([celery_worker])


def _slot() -> str:
    return f"slot-{uuid.uuid4().hex}"


def _owner(env: TaskEnv, key: str) -> str | None:
    return env.lock_client.hget(key, "owner")


def _runs(env: TaskEnv, slot: str) -> list[dict[str, Any]]:
    return [json.loads(r) for r in env.records.lrange(f"{slot}:runs", 0, -1)]


def _started(env: TaskEnv, slot: str, task_id: str, retries: int = 0) -> bool:
    return bool(env.records.exists(f"{slot}:started:{task_id}:{retries}"))


def _queued_ids(client: redis.Redis, queue: str = DEFAULT_QUEUE) -> list[str]:
    """The task id in the headers of every message waiting in ``queue``."""
    ids = []
    for raw in client.lrange(queue, 0, -1):
        message = json.loads(raw)
        ids.append(message["headers"]["id"])
    return ids


def _wait_state(env: TaskEnv, task_id: str, state: str, timeout_s: float) -> float:
    """Wait for ``task_id`` to reach ``state``; returns the time it was first seen there."""
    env.wait(lambda: env.states([task_id]) == [state], timeout_s, f"{task_id} {state}",
             interval_s=0.005)
    return time.time()


def _released_within(env: TaskEnv, key: str, since: float, bound_s: float = 1.0) -> float:
    """Seconds from ``since`` (wall clock) until ``key`` is seen gone; fails past ``bound_s``."""
    try:
        gone = poll_gone(env.lock_client, key, max(0.0, since + bound_s - time.time()))
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {env.lock_client.hgetall(key)}\n{env.describe()}") from None
    return gone - since


def _log_time(env: TaskEnv, worker: CeleryWorker, text: str, timeout_s: float = 10) -> float:
    """Wait for a worker log line holding ``text``; returns its timestamp (epoch seconds)."""

    def find() -> float | None:
        for line in worker.log_text().splitlines():
            if text in line:
                stamp = LOG_TIME.match(line)
                assert stamp, line
                return datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        return None

    return float(env.wait(find, timeout_s, f"log line {text!r}"))


# -- enqueue: one message for 100 concurrent callers ---------------------------------------------


def _delay_many(task_name: str, slot: str, calls: int, barrier: Any, out: Any) -> None:
    """Child process: wait for the others, then call ``delay()`` ``calls`` times."""
    task = modes_app.app.tasks[task_name]
    try:
        barrier.wait(10)
        out.put([task.delay(slot).id for _ in range(calls)])
    except BaseException as exc:  # report to the parent rather than hang it
        out.put(f"{type(exc).__name__}: {exc}")
        raise


@pytest.mark.parametrize("mode", MODES)
def test_100_concurrent_delays_queue_one_message_and_all_return_its_id(
    env: TaskEnv, broker: redis.Redis, mode: str
) -> None:
    task = modes_app.BY_MODE[mode]
    slot = _slot()
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [ctx.Process(target=_delay_many, args=(task.name, slot, CALLS, barrier, out))
             for _ in range(PROCESSES)]
    for proc in procs:
        proc.start()
    try:
        batches = [out.get(timeout=30) for _ in procs]
    finally:
        for proc in procs:
            proc.join(10)
    errors = [b for b in batches if isinstance(b, str)]
    assert not errors, errors
    ids = [task_id for batch in batches for task_id in batch]

    assert len(ids) == PROCESSES * CALLS
    assert len(set(ids)) == 1, f"{len(set(ids))} distinct task ids"
    assert broker.llen(DEFAULT_QUEUE) == 1
    assert _queued_ids(broker) == ids[:1]
    assert _owner(env, task.lock_key_for(slot)) == ids[0]


def test_raise_policy_raises_duplicate_task_error_naming_key_and_holder(
    env: TaskEnv, broker: redis.Redis
) -> None:
    task = modes_app.raise_on_duplicate
    slot = _slot()
    first = task.delay(slot)
    with pytest.raises(DuplicateTaskError) as info:
        task.delay(slot)
    assert isinstance(info.value, TaskRevokedError)
    assert info.value.lock_key == task.lock_key_for(slot)
    assert info.value.holder_id == first.id
    assert _queued_ids(broker) == [first.id]
    assert task.delay(_slot()).id != first.id  # another signature is not a duplicate


def test_failed_publish_releases_the_enqueue_lock(env: TaskEnv, broker: redis.Redis) -> None:
    task = modes_app.until_executed
    slot = _slot()
    key = task.lock_key_for(slot)
    # A real publish to a broker that refuses connections (nothing listens on the port).
    closed = Connection(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.5)
    producer = task.app.amqp.Producer(closed, auto_declare=False)
    try:
        with pytest.raises(Exception) as info:
            task.apply_async((slot,), producer=producer, retry=False)
    finally:
        closed.release()
    assert not isinstance(info.value, DuplicateTaskError)
    assert not env.lock_client.exists(key)
    assert broker.llen(DEFAULT_QUEUE) == 0
    # The signature is free: the next publish takes the lock and queues its message.
    again = task.delay(slot)
    assert _owner(env, key) == again.id
    assert _queued_ids(broker) == [again.id]


def test_duplicate_publish_is_stopped_before_the_broker_and_unsubscribes(
    env: TaskEnv, broker: redis.Redis
) -> None:
    """The acquire overlaps Celery building the message; a duplicate's message never leaves,
    and the result subscription Celery made for it is undone."""
    task = modes_app.until_executed
    results = redis.Redis.from_url(env.backend_url)
    try:
        slot = _slot()
        first = task.apply_async((slot,), task_id=f"first-{slot}")
        wait_until(lambda: results.pubsub_channels(f"*first-{slot}"), 5,
                   message="Celery subscribes to a published task's result")
        again = task.apply_async((slot,), task_id=f"dup-{slot}")
        assert again.id == first.id
        assert _queued_ids(broker) == [first.id]
        wait_until(lambda: not results.pubsub_channels(f"*dup-{slot}"), 5,
                   message="the duplicate's result subscription is gone")
    finally:
        results.close()


def test_a_publish_that_skips_before_task_publish_still_judges_the_lock(
    env: TaskEnv, broker: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the signal (a custom publish path) the lock is read after the publish: the
    message went out, the caller is told it is a duplicate in the log, and the worker will
    turn it away on arrival (its token is not the lock's)."""
    task = modes_app.until_executed
    slot = _slot()
    first = task.delay(slot)
    uid = f"celery-singleton-lock:{task.name}"
    assert before_task_publish.disconnect(sender=task.name, dispatch_uid=uid)
    try:
        with caplog.at_level("WARNING", logger="celery_singleton_lock"):
            second = task.delay(slot)
    finally:
        before_task_publish.connect(task_module._before_publish, sender=task.name, weak=False,
                                    dispatch_uid=uid)
    assert second.id != first.id
    assert sorted(_queued_ids(broker)) == sorted([first.id, second.id])
    assert _owner(env, task.lock_key_for(slot)) == first.id
    assert any("was published although" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("policy", ["fail", "run"])
def test_store_down_at_enqueue_raises_or_publishes_unlocked(
    env: TaskEnv, broker: redis.Redis, policy: str
) -> None:
    app = configure(Celery(f"down-{policy}"), env.broker_url, env.backend_url,
                    f"redis://127.0.0.1:{free_port()}/0", singleton_lock_socket_timeout=0.5)

    @app.task(base=LockedTask, name=f"down.{policy}", lock_mode="until_executed",
              lock_on_backend_error=policy, shared=False)
    def down(slot: str) -> str:
        return slot

    slot = _slot()
    if policy == "fail":
        with pytest.raises(LockBackendError, match="the lock store did not answer"):
            down.delay(slot)
        assert _queued_ids(broker) == []
        return
    result = down.delay(slot)
    (raw,) = broker.lrange(DEFAULT_QUEUE, 0, -1)
    message = json.loads(raw)
    assert message["headers"]["id"] == result.id
    assert TOKEN_HEADER not in message["headers"]  # no lock to hand over: taken on arrival


def test_countdown_beyond_queued_ttl_is_still_protected(env: TaskEnv, broker: redis.Redis) -> None:
    task = modes_app.short_queued_ttl  # lock_queued_ttl=2.0
    slot = _slot()
    key = task.lock_key_for(slot)
    started = time.monotonic()
    first = task.apply_async((slot,), countdown=4)
    wait_until(lambda: time.monotonic() - started >= 3.0, 5, message="t=3 s")

    assert env.lock_client.pttl(key) > 0, "the enqueue lock expired before the countdown"
    second = task.delay(slot)
    assert second.id == first.id
    assert _queued_ids(broker) == [first.id]


# -- lifecycle with a real worker ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_lock_held_as_the_mode_says_and_released_after_success(
    env: TaskEnv, worker: CeleryWorker, mode: str
) -> None:
    task = modes_app.BY_MODE[mode]
    slot = _slot()
    key = task.lock_key_for(slot)
    result = task.apply_async((slot,), {"hold_s": 1.0}, queue=RUN_QUEUE)
    env.wait(lambda: _started(env, slot, result.id), 15, "the body starts")

    if mode == "until_executing":
        # Released when the worker starts the task: a new call queues a new task.
        env.wait(lambda: not env.lock_client.exists(key), 1.0, "release on start")
        assert task.apply_async((slot,), queue="modes-unconsumed").id != result.id
        env.lock_client.delete(key)
    elif mode == "until_executed":
        assert _owner(env, key) == result.id
        assert task.apply_async((slot,), queue=RUN_QUEUE).id == result.id
    else:  # until_and_while_executing: the enqueue lock became an execution lock
        env.wait(lambda: not env.lock_client.exists(key), 1.0, "enqueue lock released on start")
        assert _owner(env, execution_key(key)) == result.id

    succeeded = _wait_state(env, result.id, "SUCCESS", 15)
    for held in (key, execution_key(key)):
        assert _released_within(env, held, succeeded) < 1.0
    assert [run["id"] for run in _runs(env, slot)] == [result.id]


@pytest.mark.slow
def test_until_executed_lock_released_after_final_failure(
    env: TaskEnv, worker: CeleryWorker
) -> None:
    task = modes_app.until_executed
    slot = _slot()
    key = task.lock_key_for(slot)
    result = task.apply_async((slot, "fail"), {"hold_s": 0.5}, queue=RUN_QUEUE)
    env.wait(lambda: _started(env, slot, result.id), 15, "the body starts")
    assert _owner(env, key) == result.id
    failed = _wait_state(env, result.id, "FAILURE", 15)
    assert _released_within(env, key, failed) < 1.0


@pytest.mark.slow
def test_until_executed_lock_kept_across_retry_and_released_after_final_result(
    env: TaskEnv, worker: CeleryWorker
) -> None:
    task = modes_app.until_executed
    slot = _slot()
    key = task.lock_key_for(slot)
    result = task.apply_async((slot, "retry"), {"retries": 2}, queue=RUN_QUEUE)
    env.wait(lambda: _started(env, slot, result.id, 0), 15, "the first attempt starts")

    # Sample the key every 20 ms through both retry countdowns, until the last attempt runs.
    # (Not until the final result: the lock is released when the body ends, before the
    # result is stored, so a sample in between rightly finds it free.)
    samples: list[str | None] = []
    duplicate_ids: set[str] = set()
    deadline = time.monotonic() + 20
    while not _started(env, slot, result.id, 2):
        assert time.monotonic() < deadline, f"no last attempt\n{env.describe()}"
        owner = _owner(env, key)
        if owner is None and _started(env, slot, result.id, 2):
            break  # the last attempt ran (and released) since the loop's check
        samples.append(owner)
        if not _started(env, slot, result.id, 1):  # the first countdown
            duplicate_ids.add(task.apply_async((slot, "retry"), queue=RUN_QUEUE).id)
        time.sleep(0.02)
    _wait_state(env, result.id, "SUCCESS", 15)
    succeeded = time.time()
    attempts = [run["retries"] for run in _runs(env, slot)]
    assert attempts == [0, 1, 2]
    assert [run["id"] for run in _runs(env, slot)] == [result.id] * 3
    # About 2 x 1.5 s of countdown were sampled: the lock never left this task.
    assert len(samples) > 50
    assert set(samples) == {result.id}, {s for s in samples if s != result.id}
    assert duplicate_ids == {result.id}
    assert _released_within(env, key, succeeded) < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_revoke_before_start_releases_the_enqueue_lock_within_1s(
    env: TaskEnv, worker: CeleryWorker, mode: str
) -> None:
    task = modes_app.BY_MODE[mode]
    slot = _slot()
    key = task.lock_key_for(slot)
    held_queue = f"modes-held-{uuid.uuid4().hex[:8]}"
    result = task.apply_async((slot,), queue=held_queue)
    assert _owner(env, key) == result.id
    # Revoke first (the running worker records it), then let the worker consume the queue.
    control = modes_app.app.control
    assert control.revoke(result.id, destination=[worker.hostname], reply=True, timeout=5)
    assert control.add_consumer(held_queue, destination=[worker.hostname], reply=True,
                                timeout=5)
    try:
        discarded = _log_time(env, worker, f"Discarding revoked task: {task.name}[{result.id}]")
        assert _released_within(env, key, discarded) < 1.0
    finally:
        control.cancel_consumer(held_queue, destination=[worker.hostname], reply=True,
                                timeout=5)
    assert _runs(env, slot) == []


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["until_executed", "until_and_while_executing"])
def test_send_task_takes_the_lock_on_arrival(
    env: TaskEnv, worker: CeleryWorker, mode: str
) -> None:
    task = modes_app.BY_MODE[mode]
    slot = _slot()
    key = task.lock_key_for(slot)
    held = key if mode == "until_executed" else execution_key(key)
    # send_task bypasses LockedTask.apply_async: the message carries no enqueue lock.
    first = modes_app.app.send_task(task.name, (slot,), {"hold_s": 3.0}, queue=RUN_QUEUE)
    env.wait(lambda: _started(env, slot, first.id), 15, "the body starts")
    assert _owner(env, held) == first.id

    duplicate = modes_app.app.send_task(task.name, (slot,), {"hold_s": 3.0}, queue=RUN_QUEUE)
    _wait_state(env, duplicate.id, "REVOKED", 10)
    exc = duplicate.result
    assert isinstance(exc, DuplicateTaskError)
    assert (exc.lock_key, exc.holder_id) == (held, first.id)

    succeeded = _wait_state(env, first.id, "SUCCESS", 15)
    assert _released_within(env, held, succeeded) < 1.0
    assert [run["id"] for run in _runs(env, slot)] == [first.id]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_send_task_is_a_duplicate_while_a_queued_task_holds_the_enqueue_lock(
    env: TaskEnv, worker: CeleryWorker, mode: str
) -> None:
    task = modes_app.BY_MODE[mode]
    slot = _slot()
    key = task.lock_key_for(slot)
    holder = task.apply_async((slot,), queue=f"modes-unconsumed-{uuid.uuid4().hex[:8]}")
    assert _owner(env, key) == holder.id

    arrival = modes_app.app.send_task(task.name, (slot,), queue=RUN_QUEUE)
    _wait_state(env, arrival.id, "REVOKED", 15)
    exc = arrival.result
    assert isinstance(exc, DuplicateTaskError)
    assert (exc.lock_key, exc.holder_id) == (key, holder.id)
    assert _runs(env, slot) == []
    assert _owner(env, key) == holder.id  # the queued holder keeps its lock
    env.lock_client.delete(key)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["until_executed", "until_and_while_executing"])
def test_revoke_terminate_while_running_releases_the_lock_within_1s(
    env: TaskEnv, worker: CeleryWorker, mode: str
) -> None:
    task = modes_app.BY_MODE[mode]
    slot = _slot()
    key = task.lock_key_for(slot)
    held = key if mode == "until_executed" else execution_key(key)
    result = task.apply_async((slot,), {"hold_s": 30.0}, queue=RUN_QUEUE)
    env.wait(lambda: _started(env, slot, result.id), 15, "the body starts")
    assert _owner(env, held) == result.id

    revoked = time.time()
    result.revoke(terminate=True)
    assert _released_within(env, held, revoked) < 1.0
    assert not env.lock_client.exists(key)
    _wait_state(env, result.id, "REVOKED", 10)


# -- bad input -----------------------------------------------------------------------------------


def _body(a: int) -> int:
    return a


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"lock_mode": "until_done"}, "lock_mode"),
        ({"lock_mode": "UNTIL_EXECUTED"}, "lock_mode"),
        ({"lock_on_enqueue_duplicate": "ignore"}, "lock_on_enqueue_duplicate"),
        ({"lock_on_duplicate": "skip"}, "lock_on_duplicate"),
        ({"lock_on_backend_error": "retry"}, "lock_on_backend_error"),
    ],
)
def test_unknown_mode_or_policy_name_raises_lock_config_error_at_registration(
    options: dict[str, str], named: str
) -> None:
    app = Celery("csl_bad_options", set_as_current=False)
    with pytest.raises(LockConfigError) as info:
        app.task(base=LockedTask, shared=False, name="bad.options", **options)(_body)
        app.finalize()
    assert named in str(info.value)
    assert "bad.options" in str(info.value)
    assert repr(next(iter(options.values()))) in str(info.value)


@pytest.mark.parametrize(
    ("setting", "value"),
    [("singleton_lock_mode", "until_done"), ("singleton_lock_on_enqueue_duplicate", "ignore")],
)
def test_unknown_mode_or_policy_setting_raises_lock_config_error_at_registration(
    setting: str, value: str
) -> None:
    app = Celery("csl_bad_settings", set_as_current=False)
    app.conf[setting] = value
    with pytest.raises(LockConfigError) as info:
        app.task(base=LockedTask, shared=False, name="bad.setting")(_body)
        app.finalize()
    assert setting in str(info.value)
