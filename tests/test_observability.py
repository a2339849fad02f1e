"""The worker bootstep (``celery inspect stats``) and the ``task-lock-*`` events, with real workers.

The main worker of this module runs the threads pool, so its locks are renewed by the worker's
own renewer (the prefork path, where the worker's main process renews its children's locks, is
covered by the CLI and Flower tests). A second, prefork worker starts with task events off to
show that lock events follow Celery's switch, including when it is turned on remotely.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_singleton_lock import events
from tests.apps import obs_app
from tests.servers import RedisServer, wait_until
from tests.workers import CeleryWorker, TaskEnv

LOCK_EVENTS = ("task-lock-acquired", "task-lock-duplicate", "task-lock-released",
               "task-lock-lost", "task-lock-error")


class EventCapture:
    """Every Celery event published while the block runs, captured by a real receiver."""

    #: Routed as ``task.lock.capture.probe``: seen with either routing key used here.
    PROBE = "task-lock-capture-probe"

    def __init__(self, app: Celery, routing_key: str = "#") -> None:
        self.app = app
        self.routing_key = routing_key
        self.events: list[dict[str, Any]] = []
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._probe = uuid.uuid4().hex

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self._receiver = self.app.events.Receiver(conn, handlers={"*": self._on},
                                                      routing_key=self.routing_key)
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def _on(self, event: dict[str, Any]) -> None:
        if event.get("type") == self.PROBE:
            if event.get("probe") == self._probe:
                self._seen_probe = True
            return
        self.events.append(event)

    def __enter__(self) -> EventCapture:
        self._seen_probe = False
        self._thread.start()

        def probed() -> bool:
            with self.app.events.default_dispatcher(hostname="probe@test") as dispatcher:
                dispatcher.send(self.PROBE, probe=self._probe)
            return self._seen_probe

        wait_until(probed, 10, interval_s=0.05, message="the event receiver to listen")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(timeout=5)

    def of(self, *types: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] in types]


class ChattyWorker(CeleryWorker):
    """A worker with heartbeats and gossip on (its event dispatcher is enabled), so that task
    events can be switched on remotely (``celery control enable_events``), as Flower does."""

    def argv(self) -> list[str]:
        return [a for a in super().argv() if a not in ("--without-gossip", "--without-heartbeat")]


@pytest.fixture(scope="module")
def lock_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def env(lock_server: RedisServer) -> Iterator[TaskEnv]:
    task_env = TaskEnv("tests.apps.obs_app", lock_server.url)
    try:
        yield task_env
    finally:
        task_env.close()


@pytest.fixture(scope="module")
def app(env: TaskEnv) -> Celery:
    return obs_app.client(env.broker_url, env.backend_url, env.lock_url)


@pytest.fixture(scope="module")
def worker(env: TaskEnv) -> Iterator[CeleryWorker]:
    w = env.worker(pool="threads", concurrency=3, events=True)
    try:
        yield w.start()
    finally:
        env.stop_workers([w])


def hold(env: TaskEnv, app: Celery, name: str, seconds: float = 30.0, **options: Any) -> Any:
    result = app.tasks["obs.hold"].apply_async((name, seconds), **options)
    env.wait(lambda: env.records.exists(f"entered:{result.id}"), 15, f"hold {name} entered")
    return result


def wait_renewed(env: TaskEnv, key: str, times: int = 2) -> None:
    """Wait until the store counted ``times`` renewals of the lock (ttl 3 s: one a second).

    Two, so that the worker has surely counted the first: it counts a renewal on the reply.
    """
    env.wait(lambda: int(env.lock_client.hget(key, "renewals") or 0) >= times, 10,
             f"renewals of {key}")


def finish(env: TaskEnv, name: str, result: Any) -> None:
    env.records.set(f"stop:{name}", "1")
    result.get(timeout=15, propagate=False)


def stats(app: Celery, worker: CeleryWorker, timeout_s: float = 5.0) -> dict[str, Any]:
    replies = app.control.inspect(timeout=timeout_s, destination=[worker.hostname]
                                  ).stats() or {}
    return replies[worker.hostname]["singleton_locks"]  # type: ignore[no-any-return]


@pytest.mark.slow
def test_stats_list_the_locks_the_worker_holds(env: TaskEnv, app: Celery, worker: CeleryWorker
                                               ) -> None:
    name = f"s-{uuid.uuid4().hex[:6]}"
    result = hold(env, app, name)
    wait_renewed(env, app.tasks["obs.hold"].lock_key_for(name))
    info = stats(app, worker)
    assert info["held"] == 1 and info["lost"] == 0
    (row,) = info["locks"]
    assert row["key"] == app.tasks["obs.hold"].lock_key_for(name)
    assert row["task"] == "obs.hold"
    assert row["task_id"] == result.id
    assert 0 < row["ttl"] <= 3.0
    assert row["renewals"] >= 1
    assert row["lost"] is False
    finish(env, name, result)
    assert stats(app, worker)["held"] == 0


@pytest.mark.slow
def test_stats_answer_at_once_while_the_lock_store_hangs(
    env: TaskEnv, app: Celery, worker: CeleryWorker, lock_server: RedisServer
) -> None:
    name = f"h-{uuid.uuid4().hex[:6]}"
    result = hold(env, app, name)
    lock_server.pause()
    try:
        started = time.monotonic()
        info = stats(app, worker)
        elapsed = time.monotonic() - started
    finally:
        lock_server.resume()
    assert info["held"] == 1
    assert elapsed < 1.5, f"stats took {elapsed:.2f}s with the lock store hung"
    finish(env, name, result)


@pytest.mark.slow
def test_a_lost_lock_shows_in_stats_and_sends_one_lost_event(
    env: TaskEnv, app: Celery, worker: CeleryWorker
) -> None:
    name = f"l-{uuid.uuid4().hex[:6]}"
    key = app.tasks["obs.hold"].lock_key_for(name)
    with EventCapture(app, routing_key="task.lock.#") as capture:
        result = hold(env, app, name)
        env.lock_client.delete(key)  # someone removed it behind the holder's back
        lost = env.wait(lambda: [r for r in stats(app, worker)["locks"] if r["lost"]], 10,
                        "the lock reported lost in stats")
        assert lost[0]["key"] == key and lost[0]["task_id"] == result.id
        assert "gone" in lost[0]["reason"]
        wait_until(lambda: capture.of("task-lock-lost"), 5, message="task-lock-lost event")
        finish(env, name, result)
        time.sleep(0.3)  # a window for any further (unwanted) lock event
    (event,) = capture.of("task-lock-lost")
    assert event["uuid"] == key and event["task_id"] == result.id
    assert event["hostname"] == worker.hostname
    # The holder's own release found the lock gone: no "released" transition.
    assert capture.of("task-lock-released") == []


@pytest.mark.slow
def test_one_event_per_lock_transition(env: TaskEnv, app: Celery, worker: CeleryWorker) -> None:
    name = f"e-{uuid.uuid4().hex[:6]}"
    key = app.tasks["obs.hold"].lock_key_for(name)
    with EventCapture(app) as capture:
        result = hold(env, app, name)
        dup = app.tasks["obs.hold"].delay(name, 1)
        env.wait_ready([dup.id], 15)
        wait_renewed(env, key)
        finish(env, name, result)
        wait_until(lambda: capture.of("task-lock-released"), 5, message="released event")
        time.sleep(0.3)  # a window for any further (unwanted) lock event
    lock_events = capture.of(*LOCK_EVENTS)
    assert [e["type"] for e in lock_events] == [
        "task-lock-acquired", "task-lock-duplicate", "task-lock-released"]
    acquired, duplicate, released = lock_events
    for event in lock_events:
        assert event["uuid"] == key == event["lock_key"]
        assert event["name"] == "obs.hold"
        assert event["hostname"] == worker.hostname
    assert acquired["task_id"] == result.id
    assert acquired["mode"] == "while_executing" and acquired["ttl"] == 3.0
    assert acquired["fence"] > 0
    assert duplicate["task_id"] == dup.id and duplicate["holder_id"] == result.id
    assert duplicate["policy"] == "reject"
    assert released["task_id"] == result.id and released["reason"] == "success"
    assert released["renewals"] >= 1
    # The duplicate's own task-revoked event carries the reason.
    (revoked,) = [e for e in capture.of("task-revoked") if e["uuid"] == dup.id]
    assert "is a duplicate" in revoked["reason"] and result.id in revoked["reason"]
    assert revoked["exception"].startswith("DuplicateTaskError(")
    # The real task's events are Celery's own: nothing of ours is keyed by its id.
    assert not [e for e in lock_events if e["uuid"] in (result.id, dup.id)]


@pytest.mark.slow
@contextlib.contextmanager
def quiet_worker(env: TaskEnv, queue: str,
                 kind: type[CeleryWorker] = CeleryWorker) -> Iterator[CeleryWorker]:
    """A prefork worker of one child with task events off, serving only ``queue``."""
    worker = kind(env.app_module, env.broker_url, env.backend_url, env.lock_url,
                  record_url=env.record_url, pool="prefork", concurrency=1, queues=[queue],
                  events=False)
    env.workers.append(worker)
    try:
        yield worker.start()
    finally:
        env.stop_workers([worker])


def test_lock_events_follow_the_workers_task_event_switch(env: TaskEnv, app: Celery) -> None:
    with quiet_worker(env, "quiet", ChattyWorker) as quiet:
        with EventCapture(app, routing_key="task.lock.#") as capture:
            name = f"q-{uuid.uuid4().hex[:6]}"
            assert stats(app, quiet)["events"] is False
            finish(env, name, hold(env, app, name, 0.2, queue="quiet"))
            time.sleep(1.0)  # a window for the (unwanted) lock events
            assert capture.events == []  # task events are off: no lock events either
            app.control.enable_events(destination=[quiet.hostname])
            env.wait(lambda: stats(app, quiet)["events"], 10, "lock events switched on")
            name = f"q-{uuid.uuid4().hex[:6]}"
            result = hold(env, app, name, 0.2, queue="quiet")
            finish(env, name, result)
            wait_until(lambda: capture.of("task-lock-released"), 5, message="lock events")
        assert [e["type"] for e in capture.events] == ["task-lock-acquired",
                                                       "task-lock-released"]
        assert {e["task_id"] for e in capture.events} == {result.id}


def test_user_receivers_get_the_lock_signals_with_lock_events_off(
    env: TaskEnv, app: Celery
) -> None:
    """With task events off, the hot path skips signals only this package listens to, never a
    user's receiver: ``lock_acquired`` and ``lock_released`` reach one in a pool child."""
    with quiet_worker(env, "signals") as quiet:
        assert stats(app, quiet)["events"] is False
        task = app.tasks["obs.signalled"]
        result = task.apply_async((7,), queue="signals")
        assert result.get(timeout=15) == 7
        key = task.lock_key_for(7)
        env.wait(lambda: env.records.llen(f"signal:{result.id}") >= 2, 10, "lock signals")
        acquired, released = env.records.lrange(f"signal:{result.id}", 0, -1)
    name, got_key, fence = acquired.split()
    assert (name, got_key) == ("lock_acquired", key) and int(fence) > 0
    assert released.split() == ["lock_released", key, "success"]


def test_signals_are_skipped_only_when_nobody_but_the_event_sender_listens() -> None:
    """``events.wanted``: the hot path's test before ``Signal.send``."""
    from celery.utils.dispatch import Signal

    signal = Signal(name="probe", providing_args={"lock_key"})
    previous = events._gate_value()
    try:
        events._set_gate(events._OFF)
        assert not events.wanted(signal)  # nobody listens
        signal.connect(events._on_acquired, weak=False, dispatch_uid=events._UID)
        assert not events.wanted(signal)  # only the event sender, and events are off
        events._set_gate(events._ON)
        assert events.wanted(signal)  # events on: the sender has work to do

        def user(**kwargs: Any) -> None:
            pass

        events._set_gate(events._OFF)
        signal.connect(user, weak=False)
        assert events.wanted(signal)  # a user's receiver always gets it
    finally:
        events._set_gate(previous)


def test_backend_error_event_redacts_passwords(env: TaskEnv, app: Celery) -> None:
    """``task-lock-error`` (sent from the task's process) never carries a password."""
    task = app.tasks["obs.hold"]
    key = task.lock_key_for("x")
    previous = events._gate_value()
    task.push_request(id="tid-1", hostname="w1@test")
    try:
        events._set_gate(events._ON)
        with EventCapture(app, routing_key="task.lock.#") as capture:
            events.backend_error(task, key, "tid-1", "requeue",
                                 "cannot reach redis://:hunter2@10.0.0.1:6379/0")
            wait_until(lambda: capture.events, 5, message="task-lock-error event")
    finally:
        task.pop_request()
        events._set_gate(previous)
    (event,) = capture.events
    assert event["type"] == "task-lock-error" and event["policy"] == "requeue"
    assert event["uuid"] == key and event["task_id"] == "tid-1"
    assert event["hostname"] == "w1@test"
    assert "hunter2" not in json.dumps(event) and "redis://:***@10.0.0.1" in event["error"]


def test_no_event_without_a_worker_node_name(env: TaskEnv, app: Celery) -> None:
    """A client process (no worker, no request) never sends lock events."""
    previous = events._gate_value()
    try:
        events._set_gate(events._ON)
        assert events.send(app, events.ACQUIRED, "csl:x:{y}") is False
    finally:
        events._set_gate(previous)
    assert events.send(app, events.ACQUIRED, "csl:x:{y}", hostname="w@h") is False
