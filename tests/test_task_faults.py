"""Faults with real workers: a frozen holder, a GIL-bound body, a killed worker with requeued
messages, Redlock masters going down, a lock deleted under a running body.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from celery_singleton_lock import LockLostError
from tests.apps import faults
from tests.servers import RedisServer
from tests.workers import CeleryWorker, TaskEnv, conf_env, open_task_env

pytestmark = pytest.mark.slow

QUEUE = "faults"


@pytest.fixture(scope="module")
def env() -> Iterator[TaskEnv]:
    with open_task_env("tests.apps.faults", faults.app) as task_env:
        yield task_env


@pytest.fixture(autouse=True)
def _worker_logs_on_failure(request: pytest.FixtureRequest, env: TaskEnv) -> Iterator[None]:
    yield from env.logs_on_failure(request)


@pytest.fixture(scope="module")
def worker(env: TaskEnv) -> Iterator[CeleryWorker]:
    """The module's prefork worker (2 children), consuming ``QUEUE``."""
    worker = env.worker(pool="prefork", concurrency=2, queues=[QUEUE])
    try:
        yield worker.start()
    finally:
        env.stop_workers([worker])


def _tag() -> str:
    return f"t-{uuid.uuid4().hex}"


def _runs(env: TaskEnv, tag: str) -> list[dict[str, Any]]:
    return [json.loads(r) for r in env.records.lrange(f"{tag}:runs", 0, -1)]


def _lost(env: TaskEnv) -> list[dict[str, Any]]:
    return [json.loads(r) for r in env.records.lrange("lost", 0, -1)]


def _owner(env: TaskEnv, key: str) -> str | None:
    return env.lock_client.hget(key, "owner")


def test_frozen_holder_never_touches_the_next_holders_lock_and_learns_it_was_lost(
    env: TaskEnv, worker: CeleryWorker
) -> None:
    tag = _tag()
    key = faults.hold.lock_key_for(tag)
    queue_a = f"frozen-{uuid.uuid4().hex[:8]}"
    frozen = env.worker(pool="prefork", concurrency=2, queues=[queue_a])
    try:
        frozen.start()
        first = faults.hold.apply_async((tag,), queue=queue_a)
        env.wait(lambda: _owner(env, key) == first.id, 10, "the first holder's lock")
        first_token = env.lock_client.hget(key, "token")

        frozen.pause()  # main process and children: no renewal, no release
        env.wait(lambda: not env.lock_client.exists(key), 5, "the frozen holder's lock expiring")
        second = faults.hold.apply_async((tag,), queue=QUEUE)
        env.wait(lambda: _owner(env, key) == second.id, 10, "the second holder's lock")
        before = env.lock_client.hgetall(key)
        assert before["token"] != first_token

        frozen.resume()
        lost = env.wait(
            lambda: [x for x in _lost(env) if x["task_id"] == first.id], 10, "lock_lost"
        )
        assert lost[0]["lock_key"] == key
        assert lost[0]["pid"] == frozen.pid  # renewed (and found lost) by the main process
        env.records.set(f"{tag}:go:{first.id}", 1)
        assert first.get(timeout=10) == frozen.hostname

        # The first holder's release and renewals never touched the second holder's lock.
        after = env.lock_client.hgetall(key)
        assert after.pop("renewals") >= before.pop("renewals")
        assert after == before
        assert env.lock_client.pttl(key) > 0
        assert not [x for x in _lost(env) if x["task_id"] == second.id]

        env.records.set(f"{tag}:go:{second.id}", 1)
        assert second.get(timeout=10) == worker.hostname
        env.wait(lambda: not env.lock_client.exists(key), 2, "the second holder's release")
    finally:
        env.stop_workers([frozen])


def test_gil_holding_body_keeps_its_lock_for_3x_ttl_on_prefork(
    env: TaskEnv, worker: CeleryWorker, record_property: Callable[[str, object], None]
) -> None:
    tag = _tag()
    run_s = 3 * 1.0  # lock_ttl=1.0; one pow(7, 5_000_000) alone takes longer than that here
    result = faults.gil.apply_async((tag, run_s), queue=QUEUE)
    key = faults.gil.lock_key_for(tag, run_s)
    start = json.loads(env.wait(lambda: env.records.get(f"{tag}:start"), 10, "gil start"))
    token = start["token"]
    seen = 0
    while True:  # a second client watches the lock during the whole run
        current = env.lock_client.hget(key, "token")
        # The body marks its end before it returns and releases: a token gone while the mark
        # is still missing was lost, not released.
        if env.records.exists(f"{tag}:end"):
            break
        assert current == token, "the lock changed hands while the body held the GIL"
        seen += 1
        time.sleep(0.02)
        assert time.time() - start["time"] < run_s + 20, "the body never ended"
    value = result.get(timeout=5)
    assert (value["held"], value["token"]) == (True, token)
    assert value["elapsed_s"] >= run_s and seen > 10
    assert not [x for x in _lost(env) if x["task_id"] == result.id]
    assert "lost its lock" not in worker.log_text()
    record_property("gil_longest_call_s", round(value["longest_s"], 2))
    print(f"GIL held in {value['calls']} calls, longest {value['longest_s']:.2f}s")


def _not_in_broker(env: TaskEnv, queue: str, task_ids: list[str]) -> list[str]:
    """Ids of unfinished tasks whose message is neither queued nor unacked (kombu's Redis
    transport keeps unacked messages in the ``unacked`` hash until acked or restored)."""
    broker = redis.Redis.from_url(env.broker_url, decode_responses=True)
    try:
        messages = list(broker.hvals("unacked"))
        for key in broker.scan_iter(match=f"{queue}*"):
            if broker.type(key) == "list":
                messages.extend(broker.lrange(key, 0, -1))
    finally:
        broker.close()
    done = {tid for tid, state in zip(task_ids, env.states(task_ids), strict=True)
            if state == "SUCCESS"}
    return [tid for tid in task_ids if tid not in done and not any(tid in m for m in messages)]


def _kill_between_deliveries(env: TaskEnv, worker: CeleryWorker, queue: str,
                             task_ids: list[str]) -> None:
    """SIGKILL ``worker`` at an instant when every unfinished task's message is in Redis.

    kombu's Redis transport pops a message (BRPOP) before it records it as unacked: a worker
    killed in between loses that message, whatever the task (Celery's own ``self.retry()``
    loses tasks the same way). That window is the transport's; this kills the worker (frozen
    first, so nothing moves while the broker is read) outside it, so that what the test
    measures is the lock's requeue: publish the new message, then ack the old one.
    """
    for _ in range(100):
        worker.pause()
        if not _not_in_broker(env, queue, task_ids):
            worker.kill()
            return
        worker.resume()
        time.sleep(0.01)
    raise AssertionError(f"never found every message in the broker\n{env.describe()}")


def test_requeue_with_acks_late_loses_no_task_when_the_worker_is_killed(
    env: TaskEnv,
) -> None:
    tag = _tag()
    queue = f"acks-{uuid.uuid4().hex[:8]}"
    # A short visibility timeout and quick restore sweeps, so the killed worker's unacked
    # messages come back within seconds.
    conf = conf_env(
        broker_transport_options={
            "visibility_timeout": 3, "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        },
        worker_prefetch_multiplier=1,
    )
    doomed = env.worker(pool="prefork", concurrency=2, queues=[queue], env=conf)
    rescuer = env.worker(pool="prefork", concurrency=2, queues=[queue], env=conf)
    sent = 16
    try:
        doomed.start()
        results = [faults.requeue_acks.apply_async((tag, n, 0.25), queue=queue)
                   for n in range(sent)]
        env.wait(lambda: len(_runs(env, tag)) >= 4, 30, "a few runs before the kill")
        # Mid-run: a body holds the lock, requeued copies wait for their countdown.
        _kill_between_deliveries(env, doomed, queue, [r.id for r in results])
        killed_runs = len(_runs(env, tag))
        assert killed_runs < sent
        rescuer.start()
        states = env.wait_ready([r.id for r in results], 60)
        assert states == ["SUCCESS"] * sent
        assert sorted(r.get(timeout=5) for r in results) == list(range(sent))
        runs = _runs(env, tag)
        assert {run["n"] for run in runs} == set(range(sent))
        print(f"{len(runs)} runs of {sent} tasks, {killed_runs} before the kill")
    finally:
        env.stop_workers([doomed, rescuer])


def test_redlock_one_master_down_changes_nothing_two_down_never_runs_unlocked(
    env: TaskEnv, redis_masters: Callable[..., list[RedisServer]]
) -> None:
    masters = redis_masters(3)
    queue = f"redlock-{uuid.uuid4().hex[:8]}"
    worker = env.worker(pool="prefork", concurrency=2, queues=[queue],
                        lock_url=[m.url for m in masters])
    try:
        worker.start()
        # One master stopped mid-run: every task runs, running locks are kept.
        tag = _tag()
        results = [faults.counted.apply_async((tag, n, 0.3), queue=queue) for n in range(8)]
        env.wait(lambda: _runs(env, tag), 10, "the first run")
        masters[0].pause()
        states = env.wait_ready([r.id for r in results], 30)
        assert states == ["SUCCESS"] * 8
        assert sorted(run["n"] for run in _runs(env, tag)) == list(range(8))
        ids = {r.id for r in results}
        assert not [x for x in _lost(env) if x["task_id"] in ids]

        # Two of three down: no quorum, so nothing runs (requeued), until they are back.
        masters[1].pause()
        tag = _tag()
        results = [faults.counted.apply_async((tag, n, 0.05), queue=queue) for n in range(6)]
        watch_until = time.monotonic() + 3.0
        while time.monotonic() < watch_until:  # a window in which nothing may happen
            assert env.records.llen(f"{tag}:runs") == 0, "a task ran without its lock"
            assert "SUCCESS" not in env.states([r.id for r in results])
            time.sleep(0.1)
        back_at = time.time()
        masters[0].resume()
        masters[1].resume()
        states = env.wait_ready([r.id for r in results], 30)
        assert states == ["SUCCESS"] * 6
        runs = _runs(env, tag)
        assert sorted(run["n"] for run in runs) == list(range(6))  # each ran exactly once
        assert min(run["time"] for run in runs) >= back_at
        done = max(run["time"] for run in runs) - back_at
        print(f"two masters down: no run for 3 s; all {len(runs)} ran {done:.2f}s after the return")
    finally:
        env.stop_workers([worker])


def test_lock_on_lost_abort_raises_lock_lost_error_inside_the_running_body(
    env: TaskEnv, worker: CeleryWorker, record_property: Callable[[str, object], None]
) -> None:
    tag = _tag()
    result = faults.abortable.apply_async((tag,), queue=QUEUE)
    key = faults.abortable.lock_key_for(tag)
    env.wait(lambda: _runs(env, tag), 10, "the body running")
    assert _owner(env, key) == result.id
    deleted_at = time.time()
    env.lock_client.delete(key)  # taken away from outside while the body runs
    env.wait_ready([result.id], 10)
    aborted_s = time.time() - deleted_at
    assert result.state == "FAILURE"
    assert isinstance(result.result, LockLostError)
    assert key in str(result.result)
    assert [x for x in _lost(env) if x["task_id"] == result.id]
    record_property("aborted_s", round(aborted_s, 3))
    print(f"LockLostError ended the body {aborted_s:.2f}s after the key was deleted")
    # Renewal runs every ttl/3 (0.5 s): the body learns it well before its ttl would matter.
    assert aborted_s < 2.0
