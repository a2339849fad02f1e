"""Beat (SPEC 9): periodic LockedTasks are singletons, and several beats fail over safely.

Real ``celery beat`` and ``celery worker`` subprocesses against real ``redis-server``s. The test
app (:mod:`tests.apps.beat_app`) stamps every message it publishes with the sending process and
the wall-clock time (headers ``csl_sent_at``/``csl_sent_by``), which is what the failover test
reads back out of the broker queue.
"""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.result import AsyncResult

from celery_singleton_lock import DuplicateTaskError
from tests.apps import beat_app
from tests.apps.common import configure
from tests.servers import RedisServer
from tests.workers import CeleryWorker, TaskEnv, conf_env

pytestmark = pytest.mark.slow

LOCKED_SCHEDULER = "celery_singleton_lock.beat:LockedScheduler"
#: ``singleton_lock_beat_ttl`` of the failover test, seconds.
BEAT_TTL_S = 3.0
#: What a LockedScheduler logs when it becomes the leader.
LEADS = "beat: this process leads"
#: The timestamp opening a Celery log line (local time, milliseconds).
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}):")


class CeleryBeat(CeleryWorker):
    """A ``celery beat`` subprocess with the worker harness's lifecycle (own process group, log
    file, ``kill``/``stop``). Ready when the app module sees ``beat_init``."""

    def __init__(self, *args: Any, schedule_path: Path, scheduler: str | None = None,
                 **options: Any) -> None:
        super().__init__(*args, pool="solo", **options)
        self.schedule_path = schedule_path
        self.scheduler = scheduler

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "celery", "-A", self.app_module, "beat",
                "-s", str(self.schedule_path), f"--loglevel={self.loglevel}"]
        if self.scheduler:
            argv += ["-S", self.scheduler]
        return argv + self.extra_args


@pytest.fixture
def env() -> Iterator[TaskEnv]:
    with RedisServer() as lock_server:
        task_env = TaskEnv("tests.apps.beat_app", lock_server.url)
        configure(beat_app.app, task_env.broker_url, task_env.backend_url, lock_server.url)
        try:
            yield task_env
        finally:
            task_env.close()


def _beat(env: TaskEnv, directory: Path, name: str, scheduler: str | None = None,
          **settings: Any) -> CeleryBeat:
    """A beat process of the test app (not started), stopped with ``env``'s workers."""
    beat = CeleryBeat(
        env.app_module, env.broker_url, env.backend_url, env.lock_url,
        record_url=env.record_url, hostname=f"{name}@csl-beat",
        schedule_path=directory / f"{name}-schedule", scheduler=scheduler,
        env=conf_env(**settings),
    )
    env.workers.append(beat)
    return beat


def _log_time(env: TaskEnv, proc: CeleryWorker, text: str, timeout_s: float) -> float:
    """Wait for the first log line of ``proc`` holding ``text``; returns its time (epoch s)."""

    def find() -> float | None:
        for line in proc.log_text().splitlines():
            if text in line:
                stamp = LOG_TIME.match(line)
                assert stamp, line
                return datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        return None

    return float(env.wait(find, timeout_s, f"{proc.hostname} logs {text!r}"))


def _sent(env: TaskEnv, task: str) -> list[dict[str, Any]]:
    sent = [json.loads(r) for r in env.records.lrange(beat_app.SENT, 0, -1)]
    return [s for s in sent if s["task"] == task]


def _queued(client: redis.Redis, queue: str = "celery") -> list[dict[str, Any]]:
    """The headers of every message waiting in ``queue``, oldest first."""
    # LPUSH publishes, BRPOP consumes: the oldest message is at the tail.
    return [json.loads(raw)["headers"] for raw in reversed(client.lrange(queue, 0, -1))]


def _gaps(times: Sequence[float]) -> list[float]:
    return [b - a for a, b in pairwise(times)]


# -- (a) a LockedTask scheduled every second, running 3.5 s -------------------------------------


def test_beat_ticks_during_a_run_never_overlap_and_show_as_revoked_duplicates(
    env: TaskEnv, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    slot = f"slot-{uuid.uuid4().hex}"
    hold_s = 3.5
    env.worker(pool="prefork", concurrency=2).start()  # two children: runs could overlap
    schedule = {"long-job": {"task": "beat.long_job", "schedule": 1.0, "args": [slot, hold_s]}}
    beat = _beat(env, tmp_path, "single", beat_schedule=schedule)
    beat.start()
    env.wait(lambda: env.records.llen(f"{slot}:runs") >= 2, 25, "two runs of the job end")
    env.stop_workers([beat])

    sent = [s["id"] for s in _sent(env, beat_app.long_job.name)]
    states = env.wait_ready(sent, 15)
    ran = [tid for tid, state in zip(sent, states, strict=True) if state == "SUCCESS"]
    rejected = [tid for tid, state in zip(sent, states, strict=True) if state == "REVOKED"]
    runs = sorted((json.loads(r) for r in env.records.lrange(f"{slot}:runs", 0, -1)),
                  key=lambda run: run["start"])
    record_property("beat_sent", len(sent))
    record_property("beat_rejected", len(rejected))

    assert int(env.records.get(f"{slot}:max") or 0) == 1, "two runs overlapped"
    assert all(b["start"] >= a["end"] for a, b in pairwise(runs)), runs
    assert len(ran) + len(rejected) == len(sent), dict(zip(sent, states, strict=True))
    assert sorted(run["id"] for run in runs) == sorted(ran)
    assert len(ran) >= 2
    # About three ticks fall inside each 3.5 s run.
    assert len(rejected) >= 2, f"{len(sent)} sent, {len(ran)} ran"
    key = beat_app.long_job.lock_key_for(slot, hold_s)
    for task_id in rejected:
        exc = AsyncResult(task_id, app=beat_app.app).result
        assert isinstance(exc, DuplicateTaskError), (task_id, exc)
        assert exc.lock_key == key
        assert exc.holder_id in ran


# -- (b) two LockedScheduler beats, the leader SIGKILLed half-way -------------------------------


def test_locked_scheduler_failover_sends_every_due_time_once_and_takes_over_within_ttl(
    env: TaskEnv, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    broker = redis.Redis.from_url(env.broker_url)
    broker.delete("celery")
    settings = {
        "singleton_lock_beat_ttl": BEAT_TTL_S,
        "beat_schedule": {"tick": {"task": "beat.plain", "schedule": 1.0}},
    }
    first = _beat(env, tmp_path, "first", LOCKED_SCHEDULER, **settings)
    second = _beat(env, tmp_path, "second", LOCKED_SCHEDULER, **settings)
    first.start()
    _log_time(env, first, LEADS, 10)
    second.start()
    leader_key = "csl:{beat:csl_beat}"
    assert env.lock_client.hget(leader_key, "pid") == str(first.pid)
    leader_pid, standby_pid = first.pid, second.pid

    # The leader sends for about 7 s, the standby waits.
    env.wait(lambda: broker.llen("celery") >= 7, 15, "7 messages from the leader")
    assert LEADS not in second.log_text()
    killed = time.time()
    first.kill()
    led = _log_time(env, second, LEADS, BEAT_TTL_S + 5)
    sent_before = broker.llen("celery")
    env.wait(lambda: broker.llen("celery") >= sent_before + 6, 15, "6 messages after failover")
    env.stop_workers([second])

    headers = _queued(broker)
    assert len(headers) == broker.llen("celery")
    ids = [h["id"] for h in headers]
    times = sorted(float(h["csl_sent_at"]) for h in headers)
    by_leader = sorted(float(h["csl_sent_at"]) for h in headers if h["csl_sent_by"] == leader_pid)
    by_standby = sorted(float(h["csl_sent_at"]) for h in headers
                        if h["csl_sent_by"] == standby_pid)
    takeover_s = led - killed
    first_send_s = by_standby[0] - killed if by_standby else float("nan")
    gaps = _gaps(times)
    duplicates = sum(1 for gap in gaps if gap < 0.5)
    due_seconds = {round(t - times[0]) for t in times}
    figures = (f"takeover {takeover_s:.3f}s (lock ttl {BEAT_TTL_S}s), first message from the "
               f"standby {first_send_s:.3f}s after the kill; {len(headers)} messages "
               f"({len(by_leader)} leader, {len(by_standby)} standby), {len(due_seconds)} "
               f"distinct due seconds, {duplicates} sent twice; gaps "
               f"{[round(g, 2) for g in gaps]}")
    record_property("takeover_s", round(takeover_s, 3))
    record_property("first_standby_message_s", round(first_send_s, 3))
    record_property("duplicates_sent", duplicates)
    print(figures)

    assert all(h["task"] == "beat.plain" for h in headers)
    assert len(set(ids)) == len(ids), figures
    assert len(by_leader) + len(by_standby) == len(headers), figures
    # Only the leader sent while it lived; the standby sent only after the kill.
    assert by_leader and max(by_leader) < killed, figures
    assert len(by_standby) >= 6 and min(by_standby) > killed, figures
    # No due time sent twice: one message per due second, never two within 0.5 s.
    assert duplicates == 0, figures
    assert len(due_seconds) == len(headers), figures
    # None skipped while a leader lived: only the failover gap exceeds the 1 s interval.
    failover_gap = min(by_standby) - max(by_leader)
    assert [g for g in gaps if g > 1.5] in ([], [failover_gap]), figures
    # The standby led within the leader lock's ttl and sent the overdue tick at once.
    assert 0 < takeover_s <= BEAT_TTL_S + 0.25, figures
    assert by_standby[0] - led < 0.5, figures
