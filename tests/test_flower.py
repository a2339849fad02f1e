"""A real Flower (``celery -A ... flower --conf=examples/flowerconfig.py``) beside a real worker.

Flower listens on a loopback port with ``FLOWER_UNAUTHENTICATED_API=1`` (tests only). What it
must show without being patched: the worker's held locks in ``/api/workers`` and on the worker
page, the lock collector's series and the ``task-lock-*`` event counts in ``/metrics``, and a
rejected duplicate as REVOKED with its reason in ``/api/task/info``. The lock store has a
password, which no Flower output may show (Celery's own ``inspect conf`` shows the setting in
its parsed, redacted form).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from tests.apps import obs_app
from tests.servers import free_port, wait_until
from tests.test_observability import ChattyWorker, finish, hold, wait_renewed
from tests.workers import REPO_ROOT, TaskEnv, open_task_env

pytestmark = pytest.mark.slow

PASSWORD = "flower-lock-pw-7Hk2"


class Flower:
    """``celery -A tests.apps.obs_app flower`` on a free loopback port."""

    def __init__(self, env: TaskEnv, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        environ = dict(os.environ)
        environ.update(
            PYTHONPATH=str(REPO_ROOT),
            CSL_TEST_BROKER=env.broker_url,
            CSL_TEST_BACKEND=env.backend_url,
            CSL_TEST_LOCK_URL=env.lock_url if isinstance(env.lock_url, str)
            else ",".join(env.lock_url),
            FLOWER_UNAUTHENTICATED_API="1",
        )
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.apps.obs_app", "flower",
             "--conf=examples/flowerconfig.py", f"--port={self.port}", "--address=127.0.0.1"],
            cwd=REPO_ROOT, env=environ, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_until(self._up, 30, interval_s=0.1, message="flower listening")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"flower exited: {self.log()}")
        try:
            return self.get("/healthcheck") == "OK"
        except OSError:
            return False

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return r.read().decode()  # type: ignore[no-any-return]

    def json(self, path: str) -> Any:
        return json.loads(self.get(path))

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(self.get("/metrics"))
            for s in family.samples
        }

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def sample(metrics: dict[Any, float], name: str, **labels: str) -> float | None:
    return metrics.get((name, tuple(sorted(labels.items()))))


@pytest.fixture(scope="module")
def env() -> Iterator[TaskEnv]:
    with open_task_env("tests.apps.obs_app", password=PASSWORD) as task_env:
        yield task_env


@pytest.fixture(scope="module")
def app(env: TaskEnv) -> Celery:
    return obs_app.client(env.broker_url, env.backend_url, env.lock_url)


@pytest.fixture(scope="module")
def worker(env: TaskEnv) -> Iterator[ChattyWorker]:
    # Heartbeats on: Flower sees the worker online; -E: task (and lock) events on.
    w = ChattyWorker(env.app_module, env.broker_url, env.backend_url, env.lock_url,
                     record_url=env.record_url, pool="prefork", concurrency=2, events=True)
    env.workers.append(w)
    try:
        yield w.start()
    finally:
        env.stop_workers([w])


@pytest.fixture(scope="module")
def flower(env: TaskEnv, app: Celery, worker: ChattyWorker,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    f = Flower(env, tmp_path_factory.mktemp("flower") / "flower.log")
    try:
        # Flower's receiver and the collector's both listen once a lock event is counted
        # by each (events sent before a subscription are not delivered).
        def listening() -> bool:
            app.tasks["obs.quick"].delay(1).get(timeout=10)
            m = f.metrics()
            return bool(
                sample(m, "celery_singleton_lock_acquisitions_total", task="obs.quick")
                and sample(m, "flower_events_total", task="obs.quick",
                           type="task-lock-acquired", worker=worker.hostname)
            )

        wait_until(listening, 30, interval_s=0.3, message="flower and the collector listening")
        yield f
    finally:
        f.stop()


def test_api_workers_shows_the_locks_the_worker_holds(
    env: TaskEnv, app: Celery, worker: ChattyWorker, flower: Flower
) -> None:
    name = f"f-{uuid.uuid4().hex[:6]}"
    result = hold(env, app, name)
    try:
        wait_renewed(env, app.tasks["obs.hold"].lock_key_for(name))
        workers = flower.json("/api/workers?refresh=1")
        locks = workers[worker.hostname]["stats"]["singleton_locks"]
        print("\n/api/workers excerpt:", json.dumps(
            {worker.hostname: {"stats": {"singleton_locks": locks}}}, indent=2))
        assert locks["held"] == 1 and locks["lost"] == 0
        (row,) = locks["locks"]
        assert row["key"] == app.tasks["obs.hold"].lock_key_for(name)
        assert row["task"] == "obs.hold" and row["task_id"] == result.id
        assert row["pid"] in worker.child_pids()
        assert row["renewals"] >= 1 and row["lost"] is False
        page = flower.get(f"/worker/{worker.hostname}")
        assert 'id="tab-other"' in page
        assert "singleton_locks" in page and row["key"] in page
    finally:
        finish(env, name, result)


def test_metrics_carry_the_collector_series_and_lock_event_counts(
    env: TaskEnv, app: Celery, worker: ChattyWorker, flower: Flower
) -> None:
    name = f"m-{uuid.uuid4().hex[:6]}"
    result = hold(env, app, name)
    try:
        # The store read is cached for 5 s: poll until this lock is counted.
        wait_until(lambda: sample(flower.metrics(), "celery_singleton_lock_locks_held",
                                  task="obs.hold") == 1, 10, interval_s=0.5,
                   message="locks_held counting the held lock")
        wait_renewed(env, app.tasks["obs.hold"].lock_key_for(name))
    finally:
        finish(env, name, result)

    def counted() -> Any:
        m = flower.metrics()
        return (sample(m, "celery_singleton_lock_releases_total", task="obs.hold",
                       reason="success") and m)

    m = wait_until(counted, 10, interval_s=0.3, message="the release counted")
    assert sample(m, "celery_singleton_lock_acquisitions_total", task="obs.hold") >= 1
    assert sample(m, "celery_singleton_lock_renewals_total", task="obs.hold") >= 1
    assert sample(m, "celery_singleton_lock_store_up") == 1
    for type_ in ("task-lock-acquired", "task-lock-released"):
        assert sample(m, "flower_events_total", task="obs.hold", type=type_,
                      worker=worker.hostname) >= 1
    text = flower.get("/metrics")
    print("\n/metrics excerpt:\n" + "\n".join(
        line for line in text.splitlines()
        if line.startswith("celery_singleton_lock_") or "task-lock" in line))


def test_rejected_duplicate_is_revoked_with_its_reason(
    env: TaskEnv, app: Celery, worker: ChattyWorker, flower: Flower
) -> None:
    name = f"d-{uuid.uuid4().hex[:6]}"
    result = hold(env, app, name)
    try:
        dup = app.tasks["obs.hold"].delay(name, 1)
        assert env.wait_ready([dup.id], 15) == ["REVOKED"]
        info = wait_until(lambda: _task_info(flower, dup.id, "REVOKED"), 10,
                          message="the duplicate REVOKED in flower")
    finally:
        finish(env, name, result)
    assert info["name"] == "obs.hold" and info["worker"] == worker.hostname
    assert info["exception"].startswith("DuplicateTaskError(")
    assert result.id in info["exception"] and "is a duplicate" in info["exception"]
    # The holder's own state is untouched by the lock events.
    wait_until(lambda: _task_info(flower, result.id, "SUCCESS"), 10,
               message="the holder SUCCESS in flower")

    def counted() -> Any:
        m = flower.metrics()
        return sample(m, "celery_singleton_lock_duplicates_total", task="obs.hold",
                      policy="reject") and m

    m = wait_until(counted, 10, interval_s=0.3, message="the duplicate counted")
    assert sample(m, "flower_events_total", task="obs.hold", type="task-lock-duplicate",
                  worker=worker.hostname) >= 1


def test_flower_lists_one_row_per_lock_keyed_by_the_lock(
    env: TaskEnv, app: Celery, worker: ChattyWorker, flower: Flower
) -> None:
    """Lock events are keyed by the lock, so Flower shows each lock's last transition."""
    name = f"r-{uuid.uuid4().hex[:6]}"
    key = app.tasks["obs.hold"].lock_key_for(name)
    finish(env, name, hold(env, app, name))
    row = wait_until(lambda: _task_info(flower, key, "LOCK-RELEASED"), 10,
                     message="the lock's row in flower")
    assert row["name"] == "obs.hold" and row["worker"] == worker.hostname
    assert key in flower.json("/api/tasks?limit=1000")
    for page in ("/tasks", "/workers", f"/task/{key}"):
        assert flower.get(page)  # the pages render with lock rows in the state
    for column in ("name", "state", "received", "started", "runtime", "worker"):
        for direction in ("asc", "desc"):
            table = flower.json(
                f"/tasks/datatable?draw=1&start=0&length=100&search%5Bvalue%5D="
                f"&order%5B0%5D%5Bcolumn%5D=0&columns%5B0%5D%5Bdata%5D={column}"
                f"&order%5B0%5D%5Bdir%5D={direction}")
            assert key in {row["uuid"] for row in table["data"]}


def _task_info(flower: Flower, task_id: str, state: str) -> dict[str, Any] | None:
    try:
        info = flower.json(f"/api/task/info/{task_id}")
    except OSError:
        return None
    return info if info.get("state") == state else None  # type: ignore[no-any-return]


def test_flower_outputs_never_show_the_lock_store_password(
    env: TaskEnv, app: Celery, worker: ChattyWorker, flower: Flower
) -> None:
    name = f"p-{uuid.uuid4().hex[:6]}"
    finish(env, name, hold(env, app, name))
    workers = flower.json("/api/workers?refresh=1")
    assert PASSWORD not in json.dumps(workers[worker.hostname]["stats"])
    assert PASSWORD not in flower.get("/metrics")
    assert PASSWORD not in flower.get("/api/tasks")
    assert PASSWORD not in flower.log()
    assert PASSWORD not in worker.log_text()
