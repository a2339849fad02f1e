"""Throttle windows (``lock_mode="until_expired"``, SPEC 4) and per-key concurrency limits
(``lock_limit``, SPEC 5) with real prefork workers and a real lock ``redis-server``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery.signals import after_task_publish

from celery_singleton_lock import DuplicateTaskError
from celery_singleton_lock.keys import slot_key
from tests.apps import semantics
from tests.test_cli import run_cli
from tests.workers import CeleryWorker, TaskEnv, open_task_env, poll_gone

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env() -> Iterator[TaskEnv]:
    with open_task_env("tests.apps.semantics", semantics.app) as task_env:
        yield task_env


@pytest.fixture(autouse=True)
def _worker_logs_on_failure(request: pytest.FixtureRequest, env: TaskEnv) -> Iterator[None]:
    yield from env.logs_on_failure(request)


#: A worker takes a message only for a free child (acks_late tasks stay unacknowledged while
#: they run or wait), so no trigger sits in the prefetch of a worker whose children are busy.
ONE_AT_A_TIME = {"CSL_TEST_CONF": json.dumps({"worker_prefetch_multiplier": 1})}


@pytest.fixture(scope="module")
def worker(env: TaskEnv) -> Iterator[CeleryWorker]:
    worker = env.worker(pool="prefork", concurrency=2, env=ONE_AT_A_TIME)
    try:
        yield worker.start()
    finally:
        env.stop_workers([worker])


@pytest.fixture(scope="module")
def second_worker(env: TaskEnv, worker: CeleryWorker) -> Iterator[CeleryWorker]:
    second = env.worker(pool="prefork", concurrency=2, env=ONE_AT_A_TIME)
    try:
        yield second.start()
    finally:
        env.stop_workers([second])


@pytest.fixture
def published() -> Iterator[list[str]]:
    """The ids of the messages this process publishes during the test."""
    ids: list[str] = []
    guard = threading.Lock()

    def count(headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
        with guard:
            ids.append(str((headers or {}).get("id")))

    after_task_publish.connect(count, weak=False)
    try:
        yield ids
    finally:
        after_task_publish.disconnect(count)


def _slot() -> str:
    return f"s-{uuid.uuid4().hex}"


def _runs(env: TaskEnv, slot: str) -> list[dict[str, Any]]:
    return [json.loads(r) for r in env.records.lrange(f"{slot}:runs", 0, -1)]


# -- until_expired: a throttle window ---------------------------------------------------------


def test_until_expired_publishes_one_task_per_window_and_the_next_after_it(
    env: TaskEnv, worker: CeleryWorker, published: list[str]
) -> None:
    slot = _slot()
    key = semantics.window.lock_key_for(slot)
    opened = time.monotonic()
    results = [semantics.window.delay(slot) for _ in range(5)]
    first = results[0]
    assert {r.id for r in results} == {first.id}
    assert published == [first.id]
    ttl_ms = env.lock_client.pttl(key)
    assert semantics.WINDOW_S * 1000 - 1000 < ttl_ms <= semantics.WINDOW_S * 1000

    assert first.get(timeout=10) == first.id
    ended = time.monotonic() - opened
    assert ended < semantics.WINDOW_S - 1, "the task did not end well inside its window"
    # The task ended early: the window stays, and so does its holder.
    assert env.lock_client.hget(key, "owner") == first.id
    assert semantics.window.delay(slot).id == first.id
    assert published == [first.id]

    env.wait(lambda: not env.lock_client.exists(key), semantics.WINDOW_S + 2,
             "the window to lapse")
    lapsed = time.monotonic() - opened
    assert lapsed >= semantics.WINDOW_S - 0.1, "the window lapsed before its lock_ttl"
    after = semantics.window.delay(slot)
    assert after.id != first.id
    assert published == [first.id, after.id]
    assert after.get(timeout=10) == after.id
    assert [run["id"] for run in _runs(env, slot)] == [first.id, after.id]
    assert all(run["key"] is None for run in _runs(env, slot)), "no lock handle in the body"


def test_until_expired_window_survives_the_revoke_of_its_waiting_task(
    env: TaskEnv, worker: CeleryWorker
) -> None:
    slot = _slot()
    key = semantics.window.lock_key_for(slot)
    waiting = semantics.window.apply_async((slot,), countdown=60)
    inspect = semantics.app.control.inspect(destination=[worker.hostname], timeout=1.0)

    def scheduled() -> bool:
        answer = inspect.scheduled() or {}
        return any(entry["request"]["id"] == waiting.id
                   for entries in answer.values() for entry in entries)

    env.wait(scheduled, 10, "the countdown task in the worker's timer", interval_s=0.2)
    replies = semantics.app.control.revoke(waiting.id, destination=[worker.hostname],
                                           reply=True, timeout=5.0)
    assert replies, "the worker did not answer the revoke"
    assert env.lock_client.hget(key, "owner") == waiting.id
    assert semantics.window.delay(slot).id == waiting.id
    assert _runs(env, slot) == []


def test_until_expired_task_sent_without_its_lock_opens_a_window_or_is_a_duplicate(
    env: TaskEnv, worker: CeleryWorker
) -> None:
    slot = _slot()
    key = semantics.window.lock_key_for(slot)
    sent = [semantics.app.send_task("semantics.window", args=(slot, 0.3)) for _ in range(2)]
    states = env.wait_ready([r.id for r in sent], 15)
    assert sorted(states) == ["REVOKED", "SUCCESS"]
    ran, duplicate = sent if states[0] == "SUCCESS" else sent[::-1]
    assert isinstance(duplicate.result, DuplicateTaskError)
    assert duplicate.result.holder_id == ran.id
    assert [run["id"] for run in _runs(env, slot)] == [ran.id]
    assert env.lock_client.hget(key, "owner") == ran.id
    assert env.lock_client.pttl(key) > 0



# -- lock_limit: up to N holders of one key ----------------------------------------------------


def _locks_cli(env: TaskEnv, *args: str) -> str:
    """``celery -A tests.apps.semantics locks ARGS``; its stdout."""
    proc = run_cli(env.lock_url, *args, broker=env.broker_url, backend=env.backend_url,
                   app_module="tests.apps.semantics")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _slot_keys(key: str) -> list[str]:
    return [slot_key(key, i) for i in range(semantics.LIMIT)]


def test_lock_limit_runs_at_most_n_bodies_of_one_key_at_once_over_two_workers(
    env: TaskEnv, worker: CeleryWorker, second_worker: CeleryWorker
) -> None:
    slot = _slot()
    key = semantics.limited.lock_key_for(slot)
    results = [semantics.limited.delay(slot, 0.3) for _ in range(40)]
    states = env.wait_ready([r.id for r in results], 60)
    assert states == ["SUCCESS"] * 40
    top_inside = int(env.records.get(f"{slot}:max") or 0)
    assert top_inside == semantics.LIMIT, f"at most {top_inside} bodies at once"
    runs = _runs(env, slot)
    assert sorted(run["id"] for run in runs) == sorted(r.id for r in results)
    assert {run["key"] for run in runs} <= set(_slot_keys(key))
    fences = [run["fence"] for run in runs]
    assert len(set(fences)) == 40, "each holder has its own fencing token"
    assert {run["host"] for run in runs} == {worker.hostname, second_worker.hostname}
    # At no instant did more than LIMIT runs overlap (the counter said so; the times agree).
    edges = sorted([(run["start"], 1) for run in runs] + [(run["end"], -1) for run in runs],
                   key=lambda edge: (edge[0], edge[1]))
    inside = top = 0
    for _, step in edges:
        inside += step
        top = max(top, inside)
    assert top <= semantics.LIMIT
    env.wait(lambda: not any(env.lock_client.exists(k) for k in _slot_keys(key)), 2,
             "every holder's slot released")


def test_lock_limit_killed_child_frees_only_its_own_slot(
    env: TaskEnv, worker: CeleryWorker, second_worker: CeleryWorker
) -> None:
    slot = _slot()
    key = semantics.limited.lock_key_for(slot)
    holders = [semantics.limited.delay(slot, 30.0) for _ in range(semantics.LIMIT)]
    env.wait(lambda: env.records.llen(f"{slot}:started") == semantics.LIMIT, 15,
             "three holders inside")
    started = [json.loads(r) for r in env.records.lrange(f"{slot}:started", 0, -1)]
    assert sorted(s["key"] for s in started) == _slot_keys(key)
    # celery locks: a row per holder, and a slot per holder in `locks key`.
    listed = json.loads(_locks_cli(env, "list", "--task", "semantics.limited", "--json"))
    assert sorted(row["task_id"] for row in listed if row["key"].startswith(key)) == sorted(
        r.id for r in holders)
    shown = json.loads(_locks_cli(env, "key", "semantics.limited", json.dumps([slot]), "--json"))
    assert [(lock["role"], lock["key"], lock["held"]) for lock in shown["locks"]] == [
        (f"slot {i}", slot_key(key, i), True) for i in range(semantics.LIMIT)]
    assert {lock["holder"]["task_id"] for lock in shown["locks"]} == {r.id for r in holders}
    victim, *others = started
    os.kill(victim["pid"], signal.SIGKILL)
    gone = poll_gone(env.lock_client, victim["key"], 2.0)
    for other in others:
        assert env.lock_client.hget(other["key"], "token") == other["token"]
    killed = next(r for r in holders if r.id == victim["id"])
    env.wait_ready([killed.id], 10)
    assert killed.state == "FAILURE"
    assert time.time() - gone < 10
    env.records.set(f"{slot}:go", 1)
    rest = [r for r in holders if r.id != victim["id"]]
    assert env.wait_ready([r.id for r in rest], 15) == ["SUCCESS"] * len(rest)
    env.wait(lambda: not any(env.lock_client.exists(k) for k in _slot_keys(key)), 2,
             "the other holders' slots released")


def test_lock_limit_terminate_and_hard_time_limit_free_only_their_own_slots_within_1s(
    env: TaskEnv, worker: CeleryWorker, second_worker: CeleryWorker
) -> None:
    slot = _slot()
    key = semantics.limited.lock_key_for(slot)
    terminated = semantics.limited.delay(slot, 30.0)
    timed = semantics.limited.apply_async((slot, 30.0), time_limit=3)
    kept = semantics.limited.delay(slot, 30.0)
    env.wait(lambda: env.records.llen(f"{slot}:started") == semantics.LIMIT, 15,
             "three holders inside")
    started = {s["id"]: s for s in map(json.loads, env.records.lrange(f"{slot}:started", 0, -1))}
    assert sorted(s["key"] for s in started.values()) == _slot_keys(key)

    terminated.revoke(terminate=True)
    revoked_at = time.time()
    assert poll_gone(env.lock_client, started[terminated.id]["key"], 5.0) - revoked_at < 1.0
    timed_start = started[timed.id]["start"]
    gone = poll_gone(env.lock_client, started[timed.id]["key"], 10.0)
    assert 3.0 <= gone - timed_start < 3.0 + 1.0 + 0.5  # the hard limit, then within 1 s
    # The third holder's slot was never touched.
    assert env.lock_client.hget(started[kept.id]["key"], "token") == started[kept.id]["token"]
    env.records.set(f"{slot}:go", 1)
    assert env.wait_ready([kept.id], 15) == ["SUCCESS"]
    assert env.states([terminated.id, timed.id]) == ["REVOKED", "FAILURE"]
    env.wait(lambda: not any(env.lock_client.exists(k) for k in _slot_keys(key)), 2,
             "every slot released")


# -- coalesce: one follow-up after the running holder ------------------------------------------


def _started(env: TaskEnv, slot: str) -> list[dict[str, Any]]:
    return [json.loads(r) for r in env.records.lrange(f"{slot}:started", 0, -1)]


def _go(env: TaskEnv, slot: str, task_id: str) -> None:
    env.records.set(f"{slot}:go:{task_id}", 1)


def _one_follow_up(
    env: TaskEnv, triggers: list[Any], timeout_s: float = 15
) -> tuple[Any, list[Any]]:
    """Wait until all triggers but one are rejected; (the follow-up, the rejected)."""
    ids = [r.id for r in triggers]
    env.wait(lambda: env.states(ids).count("REVOKED") == len(ids) - 1, timeout_s,
             f"{len(ids) - 1} of {len(ids)} triggers rejected")
    states = env.states(ids)
    follow = [r for r, state in zip(triggers, states, strict=True) if state != "REVOKED"]
    rejected = [r for r, state in zip(triggers, states, strict=True) if state == "REVOKED"]
    assert len(follow) == 1 and env.states([follow[0].id]) == ["PENDING"]
    for r in rejected:
        assert isinstance(r.result, DuplicateTaskError)
        assert r.result.holder_id == follow[0].id, "a rejection names the follow-up"
    return follow[0], rejected


def test_coalesce_triggers_during_a_run_give_exactly_one_more_run_after_it(
    env: TaskEnv, worker: CeleryWorker, second_worker: CeleryWorker
) -> None:
    slot = _slot()
    key = semantics.coalesced.lock_key_for(slot)
    holder = semantics.coalesced.delay(slot, 30.0)
    env.wait(lambda: len(_started(env, slot)) == 1, 10, "the holder running")
    follow, _ = _one_follow_up(env, [semantics.coalesced.delay(slot, 30.0) for _ in range(10)])
    assert env.lock_client.get(f"{key}:next") == follow.id
    assert len(_started(env, slot)) == 1, "the follow-up ran beside the holder"

    _go(env, slot, holder.id)
    env.wait(lambda: len(_started(env, slot)) == 2, 10, "the follow-up running")
    assert holder.get(timeout=5) == holder.id
    holder_run = _runs(env, slot)[0]
    assert _started(env, slot)[1]["id"] == follow.id
    assert _started(env, slot)[1]["start"] >= holder_run["end"]

    # Triggers during the follow-up's run give one more run, after it.
    again, _ = _one_follow_up(env, [semantics.coalesced.delay(slot, 30.0) for _ in range(3)])
    _go(env, slot, follow.id)
    env.wait(lambda: len(_started(env, slot)) == 3, 10, "the second follow-up running")
    _go(env, slot, again.id)
    assert env.wait_ready([follow.id, again.id], 10) == ["SUCCESS", "SUCCESS"]
    assert [run["id"] for run in _runs(env, slot)] == [holder.id, follow.id, again.id]
    env.wait(lambda: not env.lock_client.exists(key), 2, "the last run's release")
    assert not env.lock_client.exists(f"{key}:next")


def test_coalesce_follow_up_survives_a_killed_acks_late_worker_and_runs_once(
    env: TaskEnv,
) -> None:
    slot = _slot()
    held_queue, follow_queue = (f"{name}-{uuid.uuid4().hex[:8]}" for name in ("held", "next"))
    quick_restore = {  # the killed worker's unacked message comes back within seconds
        "broker_transport_options": {"visibility_timeout": 3, "unacked_restore_interval": 1,
                                     "unacked_restore_throttle": 1},
        "worker_prefetch_multiplier": 1,
    }
    # The holder's worker acks on receipt: a short visibility timeout must not restore it.
    holding = env.worker(pool="prefork", concurrency=1, queues=[held_queue],
                         env={"CSL_TEST_EARLY_ACK": "1"})
    doomed = env.worker(pool="prefork", concurrency=2, queues=[follow_queue],
                        env={"CSL_TEST_CONF": json.dumps(quick_restore)})
    rescuer = env.worker(pool="prefork", concurrency=2, queues=[follow_queue],
                         env={"CSL_TEST_CONF": json.dumps(quick_restore)})
    try:
        holding.start()
        doomed.start()
        holder = semantics.coalesced.apply_async((slot, 30.0), queue=held_queue)
        env.wait(lambda: len(_started(env, slot)) == 1, 10, "the holder running")
        triggers = [semantics.coalesced.apply_async((slot, 30.0), queue=follow_queue)
                    for _ in range(2)]
        follow, _ = _one_follow_up(env, triggers)
        doomed.kill()  # while the follow-up waits for the holder, unacknowledged
        rescuer.start()
        env.wait(lambda: f"[{follow.id}] received" in rescuer.log_text(), 20,
                 "the follow-up delivered again to the rescuer")
        assert len(_started(env, slot)) == 1
        _go(env, slot, holder.id)
        env.wait(lambda: len(_started(env, slot)) == 2, 10, "the follow-up running")
        _go(env, slot, follow.id)
        assert env.wait_ready([holder.id, follow.id], 10) == ["SUCCESS", "SUCCESS"]
        runs = _runs(env, slot)
        assert [run["id"] for run in runs] == [holder.id, follow.id], "the follow-up ran once"
        assert runs[1]["start"] >= runs[0]["end"]
    finally:
        env.stop_workers([holding, doomed, rescuer])
