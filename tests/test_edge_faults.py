"""Faults found at the edges (issue 11), each with real workers and real ``redis-server``s:

* Redlock masters restarted one at a time, without persistence, under a running holder;
* the lock password in ``celery inspect conf``/``stats`` and the logs with Django-style settings;
* revoke of a countdown task that a worker holds in its timer;
* a rejected duplicate in the middle of a chain;
* a lock store that is down when the worker starts.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery, chain

from celery_singleton_lock import DuplicateTaskError
from tests.apps import edges
from tests.servers import RedisServer, free_port
from tests.workers import CeleryWorker, TaskEnv, open_task_env

pytestmark = pytest.mark.slow

PASSWORD = "edge-s3cret-pw"


@pytest.fixture(scope="module")
def env() -> Iterator[TaskEnv]:
    with open_task_env("tests.apps.edges", edges.app) as task_env:
        yield task_env


@pytest.fixture(autouse=True)
def _worker_logs_on_failure(request: pytest.FixtureRequest, env: TaskEnv) -> Iterator[None]:
    yield from env.logs_on_failure(request)


@pytest.fixture(scope="module")
def worker(env: TaskEnv) -> Iterator[CeleryWorker]:
    worker = env.worker(pool="prefork", concurrency=2)
    try:
        yield worker.start()
    finally:
        env.stop_workers([worker])


def _tag() -> str:
    return f"t-{uuid.uuid4().hex}"


def _runs(env: TaskEnv, tag: str) -> list[dict[str, Any]]:
    return [json.loads(r) for r in env.records.lrange(f"{tag}:runs", 0, -1)]


# -- Redlock masters restarted one at a time ----------------------------------------------------


def test_rolling_restart_of_redlock_masters_runs_no_duplicate_and_keeps_a_quorum(
    env: TaskEnv, redis_masters: Callable[..., list[RedisServer]]
) -> None:
    masters = redis_masters(3)
    clients = [m.client(decode_responses=True) for m in masters]
    worker = env.worker(pool="prefork", concurrency=2, lock_url=[m.url for m in masters])
    try:
        worker.start()
        tag = _tag()
        key = edges.hold.lock_key_for(tag)
        holder = edges.hold.apply_async((tag,))

        def copies() -> int:
            count = 0
            for client in clients:
                try:
                    count += client.hget(key, "owner") == holder.id
                except Exception:  # a master being restarted
                    continue
            return count

        env.wait(lambda: copies() == 3, 10, "the holder's lock on all three masters")
        fewest = [3]
        watching = threading.Event()
        watching.set()

        def watch() -> None:
            while watching.is_set():
                fewest[0] = min(fewest[0], copies())
                time.sleep(0.01)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            for index in (0, 1):  # one at a time, each back before the next goes
                masters[index].restart()
                env.wait(lambda i=index: clients[i].hget(key, "owner") == holder.id, 5,
                         f"renewal putting the lock back on restarted master {index}")
        finally:
            watching.clear()
            watcher.join(5)
        assert fewest[0] >= 2, "the holder was short of a quorum during the rolling restart"

        duplicate = edges.hold.apply_async((tag,))
        env.wait_ready([duplicate.id], 10)
        assert duplicate.state == "REVOKED"
        assert isinstance(duplicate.result, DuplicateTaskError)
        assert duplicate.result.holder_id == holder.id
        assert [run["id"] for run in _runs(env, tag)] == [holder.id]
        lost = [json.loads(r) for r in env.records.lrange("lost", 0, -1)]
        assert not [x for x in lost if x["task_id"] == holder.id]

        env.records.set(f"{tag}:go:{holder.id}", 1)
        assert holder.get(timeout=10) == holder.id
        env.wait(lambda: copies() == 0, 2, "the release on every master")
    finally:
        env.stop_workers([worker])


# -- passwords ----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["singleton_lock_url", "broker_url"])
def test_lock_password_never_shown_by_inspect_conf_stats_or_logs_with_django_settings(
    env: TaskEnv, where: str
) -> None:
    with RedisServer(password=PASSWORD) as protected:
        secret_url = protected.url  # redis://:PASSWORD@127.0.0.1:PORT/0
        assert PASSWORD in secret_url
        if where == "singleton_lock_url":  # CELERY_SINGLETON_LOCK_URL
            broker, lock_url = env.broker_url, secret_url
        else:  # no lock URL: the lock store defaults to CELERY_BROKER_URL
            broker, lock_url = secret_url, ""
        worker = CeleryWorker("tests.apps.edges", broker, env.backend_url, lock_url,
                              record_url=env.record_url, env={"CSL_TEST_NAMESPACED": "1"})
        env.workers.append(worker)
        client = Celery("csl_edges_inspect", broker=broker, set_as_current=False)
        try:
            worker.start()
            inspect = client.control.inspect(destination=[worker.hostname], timeout=5)
            replies = {
                "conf": inspect.conf(with_defaults=False),
                "conf_defaults": inspect.conf(with_defaults=True),
                "stats": inspect.stats(),
            }
            for name, reply in replies.items():
                assert reply and worker.hostname in reply, f"no {name} reply from the worker"
            text = json.dumps(replies, default=str)
            assert PASSWORD not in text
            shown = replies["conf"][worker.hostname]
            name = "CELERY_SINGLETON_LOCK_URL" if lock_url else "CELERY_BROKER_URL"
            assert name in shown and "***" in str(shown[name])  # there, but redacted
            assert "singleton_locks" in replies["stats"][worker.hostname]
            env.stop_workers([worker])
            assert "lock store" in worker.log_text()  # the start-up check logged the store
            assert PASSWORD not in worker.log_text()
        finally:
            client.close()
            env.stop_workers([worker])


# -- revoke of a task waiting for its countdown -------------------------------------------------


def test_revoke_of_a_countdown_task_held_by_a_worker_frees_its_lock_within_1s(
    env: TaskEnv, worker: CeleryWorker
) -> None:
    tag = _tag()
    key = edges.later.lock_key_for(tag)
    waiting = edges.later.apply_async((tag,), countdown=30)
    inspect = edges.app.control.inspect(destination=[worker.hostname], timeout=2)

    def scheduled() -> bool:
        reply = inspect.scheduled() or {}
        return any(item["request"]["id"] == waiting.id for item in reply.get(worker.hostname, []))

    env.wait(scheduled, 10, "the worker holding the countdown task in its timer")
    assert env.lock_client.hget(key, "owner") == waiting.id
    # While it waits, a new call of the same signature is a duplicate.
    assert edges.later.apply_async((tag,)).id == waiting.id

    waiting.revoke()
    revoked_at = time.monotonic()
    env.wait(lambda: not env.lock_client.exists(key), 1.0, "the revoked task's lock released")
    freed_s = time.monotonic() - revoked_at
    print(f"the revoked countdown task's lock was gone {freed_s:.3f}s after the revoke")

    after = edges.later.apply_async((tag,))
    assert after.id != waiting.id  # published, not the revoked task's AsyncResult
    assert after.get(timeout=10) == after.id
    assert [run["id"] for run in _runs(env, tag)] == [after.id]


# -- a rejected duplicate in a chain ------------------------------------------------------------


def test_links_after_a_rejected_duplicate_in_a_chain_end_revoked_with_its_error(
    env: TaskEnv, worker: CeleryWorker
) -> None:
    tag = _tag()
    holder = edges.hold.apply_async((tag,))
    env.wait(lambda: _runs(env, tag), 10, "the holder running")
    last = chain(edges.hold.si(tag), edges.link.si(tag, 1), edges.link.si(tag, 2)).apply_async()
    ids = [last.parent.parent.id, last.parent.id, last.id]
    states = env.wait_ready(ids, 10)
    assert states == ["REVOKED"] * 3
    for task_id in ids:
        result = edges.app.AsyncResult(task_id)
        assert isinstance(result.result, DuplicateTaskError), result.result
        assert result.result.holder_id == holder.id
    assert env.records.llen(f"{tag}:links") == 0  # the links never ran
    env.records.set(f"{tag}:go:{holder.id}", 1)
    assert holder.get(timeout=10) == holder.id


# -- a lock store down at worker start ----------------------------------------------------------

READY = re.compile(r"celery@\S+ ready\.|\S+@\S+ ready\.")


def _error_before_ready(worker: CeleryWorker, env: TaskEnv) -> str:
    def lines() -> tuple[int, int, str] | None:
        text = worker.log_text().splitlines()
        error = next((i for i, line in enumerate(text)
                      if "ERROR" in line and "lock store" in line), None)
        ready = next((i for i, line in enumerate(text) if READY.search(line)), None)
        if error is None or ready is None:
            return None
        return error, ready, text[error]

    error, ready, line = env.wait(lines, 10, "the store error and the ready line in the log")
    assert error < ready, "the store error was logged after the worker took tasks"
    return line


def test_worker_start_logs_an_error_naming_an_unreachable_store_before_any_task(
    env: TaskEnv,
) -> None:
    port = free_port()  # nothing listens there
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    worker = env.worker(pool="prefork", concurrency=1, lock_url=url)
    try:
        worker.start()
        line = _error_before_ready(worker, env)
        assert f"redis://:***@127.0.0.1:{port}/0" in line
        assert "is unreachable" in line and "requeued" in line and "hours" in line
        assert PASSWORD not in worker.log_text()
    finally:
        env.stop_workers([worker])


@pytest.mark.parametrize("pool, concurrency, refused", [
    ("prefork", 2, True), ("prefork", 1, False), ("threads", 2, False)])
def test_worker_start_logs_an_error_for_an_in_process_store_under_prefork(
    env: TaskEnv, pool: str, concurrency: int, refused: bool,
) -> None:
    """memory:// lives in one process: prefork children would each have their own store, so
    their locks would not exclude each other. The worker says so before it takes a task."""
    worker = env.worker(pool=pool, concurrency=concurrency, lock_url="memory://edge")
    try:
        worker.start()
        env.wait(lambda: READY.search(worker.log_text()), 10, "the ready line in the log")
        errors = [line for line in worker.log_text().splitlines()
                  if "ERROR" in line and "in-process store" in line]
        if refused:
            line = _error_before_ready(worker, env)
            assert "memory://edge" in line and "2 prefork child processes" in line
            assert "-P solo" in line
        else:
            assert errors == []
    finally:
        env.stop_workers([worker])


def test_worker_start_logs_an_error_when_the_store_has_no_quorum(
    env: TaskEnv, redis_masters: Callable[..., list[RedisServer]]
) -> None:
    masters = redis_masters(3)
    urls = [m.url for m in masters]
    masters[1].stop()
    masters[2].stop()
    worker = env.worker(pool="prefork", concurrency=1, lock_url=urls)
    try:
        worker.start()
        line = _error_before_ready(worker, env)
        assert "fewer than 2 of 3 masters answered" in line
        assert urls[0].rsplit("/", 1)[0] in line  # the store is named
    finally:
        env.stop_workers([worker])
