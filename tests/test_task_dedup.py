"""Duplicates at execution, with real workers: never two bodies of one signature at once.

Every body enters through an atomic INCR of an external counter that keeps its maximum, so a
single overlap anywhere in a run is seen. Workers are started once per pool kind and module.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery.result import AsyncResult

from celery_singleton_lock import DuplicateTaskError
from tests.apps import dedup
from tests.workers import CeleryWorker, TaskEnv, open_task_env

pytestmark = pytest.mark.slow

SENT = 200


@pytest.fixture(scope="module")
def env() -> Iterator[TaskEnv]:
    with open_task_env("tests.apps.dedup", dedup.app) as task_env:
        yield task_env


@pytest.fixture(autouse=True)
def _worker_logs_on_failure(request: pytest.FixtureRequest, env: TaskEnv) -> Iterator[None]:
    yield from env.logs_on_failure(request)


@pytest.fixture(scope="module")
def prefork_workers(env: TaskEnv) -> Iterator[list[CeleryWorker]]:
    """Two prefork workers with two children each, consuming the default queue."""
    workers = [env.worker(pool="prefork", concurrency=2) for _ in range(2)]
    try:
        for worker in workers:
            worker.start()
        yield workers
    finally:
        env.stop_workers(workers)


def _slot() -> str:
    return f"slot-{uuid.uuid4().hex}"


def _max_inside(env: TaskEnv, slot: str) -> int:
    return int(env.records.get(f"{slot}:max") or 0)


def _runs(env: TaskEnv, slot: str) -> list[dict]:
    return [json.loads(r) for r in env.records.lrange(f"{slot}:runs", 0, -1)]


def _lock_owner(env: TaskEnv, key: str) -> str | None:
    return env.lock_client.hget(key, "owner")


def _check_rejected(results: list[AsyncResult], states: list[str], key: str) -> list[str]:
    """Every REVOKED result is a DuplicateTaskError naming the key and a holder that ran."""
    ids = {r.id for r in results}
    holders = []
    for result, state in zip(results, states, strict=True):
        if state != "REVOKED":
            continue
        exc = result.result
        assert isinstance(exc, DuplicateTaskError), (result.id, exc)
        assert exc.lock_key == key
        assert exc.holder_id in ids and exc.holder_id != result.id
        holders.append(exc.holder_id)
    return holders


def _send(task: Any, args: tuple[Any, ...], sent: int, queue: str | None) -> list[AsyncResult]:
    if queue is None:
        return [task.delay(*args) for _ in range(sent)]
    return [task.apply_async(args, queue=queue) for _ in range(sent)]


def _run_reject(env: TaskEnv, sent: int, hold_s: float, timeout_s: float,
                queue: str | None = None) -> tuple[str, list[AsyncResult], list[str]]:
    slot = _slot()
    results = _send(dedup.guarded_reject, (slot, hold_s), sent, queue)
    states = env.wait_ready([r.id for r in results], timeout_s)
    assert _max_inside(env, slot) == 1
    ran, rejected = states.count("SUCCESS"), states.count("REVOKED")
    assert ran + rejected == sent, {s: states.count(s) for s in set(states)}
    assert ran >= 1 and rejected >= 1
    assert len(_runs(env, slot)) == ran
    key = dedup.guarded_reject.lock_key_for(slot, hold_s)
    holders = _check_rejected(results, states, key)
    succeeded = {r.id for r, s in zip(results, states, strict=True) if s == "SUCCESS"}
    assert set(holders) <= succeeded
    print(f"reject: {ran} ran + {rejected} rejected == {sent} sent, at most 1 inside")
    env.wait(lambda: not env.lock_client.exists(key), 5, "the last holder's release")
    return slot, results, states


def _run_requeue(env: TaskEnv, sent: int, hold_s: float, timeout_s: float,
                 queue: str | None = None) -> None:
    slot = _slot()
    results = _send(dedup.guarded_requeue, (slot, hold_s), sent, queue)
    states = env.wait_ready([r.id for r in results], timeout_s)
    assert states == ["SUCCESS"] * sent, {s: states.count(s) for s in set(states)}
    # The body returns request.retries: requeues are counted apart from the user's retries.
    assert [r.get(timeout=5) for r in results] == [0] * sent
    assert _max_inside(env, slot) == 1
    assert sorted(run["id"] for run in _runs(env, slot)) == sorted(r.id for r in results)


# -- prefork: 2 workers x 2 children ------------------------------------------------------------


def test_reject_200_duplicates_never_overlap_and_ran_plus_rejected_equals_sent(
    env: TaskEnv, prefork_workers: list[CeleryWorker]
) -> None:
    slot, _, _ = _run_reject(env, SENT, hold_s=0.05, timeout_s=60)
    hosts = {run["host"] for run in _runs(env, slot)}
    assert hosts <= {w.hostname for w in prefork_workers}


def test_rejected_duplicate_get_raises_duplicate_task_error_at_once(
    env: TaskEnv, prefork_workers: list[CeleryWorker]
) -> None:
    a = f"a-{uuid.uuid4().hex}"
    holder = dedup.pair.delay(a, 2, hold_s=2.0)
    key = dedup.pair.lock_key_for(a, 2, hold_s=2.0)
    env.wait(lambda: _lock_owner(env, key) == holder.id, 10, "holder takes the lock")
    duplicate = dedup.pair.delay(a, 2, hold_s=2.0)
    env.wait_ready([duplicate.id], 10)
    started = time.monotonic()
    with pytest.raises(DuplicateTaskError) as info:
        duplicate.get(timeout=10)
    assert time.monotonic() - started < 1.0
    assert info.value.lock_key == key
    assert info.value.holder_id == holder.id
    assert duplicate.state == "REVOKED"
    assert holder.get(timeout=10) == [a, 2]


def test_keyword_and_positional_calls_deduplicate_together(
    env: TaskEnv, prefork_workers: list[CeleryWorker]
) -> None:
    a = f"a-{uuid.uuid4().hex}"
    key = dedup.pair.lock_key_for(a, 2)
    assert {
        dedup.pair.lock_key_for(a),
        dedup.pair.lock_key_for(a, b=2),
        dedup.pair.lock_key_for(a=a, b=2),
        dedup.pair.lock_key_for(b=2, a=a),
        dedup.pair.lock_key_for(a, 2, 1.5),
    } == {key}
    holder = dedup.pair.delay(a, 2)
    env.wait(lambda: _lock_owner(env, key) == holder.id, 10, "holder takes the lock")
    duplicates = [
        dedup.pair.delay(a),
        dedup.pair.delay(a, b=2),
        dedup.pair.delay(a=a, b=2),
        dedup.pair.apply_async(kwargs={"b": 2, "a": a}),
        dedup.pair.apply_async((a, 2, 1.5)),
    ]
    other = dedup.pair.delay(a, 3)  # another value of b: another lock
    states = env.wait_ready([d.id for d in duplicates], 10)
    assert states == ["REVOKED"] * len(duplicates)
    for duplicate in duplicates:
        exc = duplicate.result
        assert isinstance(exc, DuplicateTaskError)
        assert (exc.lock_key, exc.holder_id) == (key, holder.id)
    assert holder.get(timeout=10) == [a, 2]
    assert other.get(timeout=10) == [a, 3]


def test_requeue_200_duplicates_all_succeed_with_retries_untouched(
    env: TaskEnv, prefork_workers: list[CeleryWorker]
) -> None:
    _run_requeue(env, SENT, hold_s=0.005, timeout_s=120)


def test_wait_duplicates_run_one_after_another_woken_by_the_release(
    env: TaskEnv, prefork_workers: list[CeleryWorker]
) -> None:
    slot = _slot()
    sent = 8
    results = [dedup.guarded_wait.delay(slot, 0.3) for _ in range(sent)]
    states = env.wait_ready([r.id for r in results], 60)
    assert states == ["SUCCESS"] * sent
    assert _max_inside(env, slot) == 1
    runs = sorted(_runs(env, slot), key=lambda run: run["start"])
    assert len(runs) == sent
    gaps = [nxt["start"] - prev["end"] for prev, nxt in zip(runs, runs[1:], strict=False)]
    assert min(gaps) >= 0
    # A notification wakes the next waiter: far below the 1 s safety poll of an expired lock.
    print(f"wait: gaps between runs {[round(g * 1000) for g in gaps]} ms")
    assert max(gaps) < 0.5, gaps
    assert statistics.median(gaps) < 0.1, gaps


# -- threads and solo pools ---------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_other_pools_never_overlap_with_reject_and_requeue(env: TaskEnv, pool: str) -> None:
    queue = f"dedup-{pool}"
    if pool == "threads":
        workers = [env.worker(pool="threads", concurrency=4, queues=[queue])]
    else:
        workers = [env.worker(pool="solo", queues=[queue]) for _ in range(2)]
    try:
        for worker in workers:
            worker.start()
        _run_reject(env, 60, hold_s=0.05, timeout_s=60, queue=queue)
        _run_requeue(env, 20, hold_s=0.01, timeout_s=60, queue=queue)
    finally:
        env.stop_workers(workers)
