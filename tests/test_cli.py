"""``celery locks``: real ``celery -A tests.apps.obs_app locks ...`` subprocesses.

The locks are real: taken by a real prefork worker running ``obs.hold`` (a body that sleeps
holding its lock), or by :class:`~celery_singleton_lock.Redlock` on one Redis, three Redlock
masters or a Redis Cluster. The lock store of the worker module has a password, and the last
test greps every output for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from celery import Celery

from celery_singleton_lock.inventory import list_locks, read_lock, release_lock
from celery_singleton_lock.keys import format_key
from celery_singleton_lock.lock import Redlock
from celery_singleton_lock.backends.registry import open_backend
from tests.apps import obs_app
from tests.servers import RedisCluster, RedisServer, free_port, wait_until
from tests.workers import REPO_ROOT, CeleryWorker, TaskEnv, open_task_env

PASSWORD = "lock-pw-Zq8sJ2"
JSON_FIELDS = {"key", "task", "task_id", "hostname", "pid", "mode", "acquired_at", "ttl",
               "renewals", "masters"}


def run_cli(lock_url: str | list[str], *args: str, broker: str = "", backend: str = "",
            timeout_s: float = 60.0, app_module: str = "tests.apps.obs_app",
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``celery -A tests.apps.obs_app locks ARGS`` against ``lock_url`` (or another app module,
    with ``extra_env`` on top of the environment)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"]
                                          if env.get("PYTHONPATH") else "")
    env.update(
        CSL_TEST_LOCK_URL=lock_url if isinstance(lock_url, str) else ",".join(lock_url),
        CSL_TEST_BROKER=broker or "redis://127.0.0.1:1/0",
        CSL_TEST_BACKEND=backend or "redis://127.0.0.1:1/1",
    )
    env.pop("CSL_TEST_CONF", None)
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", app_module, "locks", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )


def task_lock(url: Any, task: str, payload: str, *, owner: str = "", hostname: str = "",
              ttl: float = 60.0, mode: str = "while_executing") -> Redlock:
    """A held lock with a task lock's key and metadata, taken through the library."""
    lock = Redlock(task, url=url, key=format_key("csl", task, payload), ttl=ttl,
                   owner=owner or str(uuid.uuid4()),
                   metadata={"task": task, "mode": mode, "hostname": hostname or "w@host"})
    assert lock.acquire(blocking=False)
    return lock


# ------------------------------------------------------------------------------------------------
# A real worker holding real locks (lock store with a password)


class Outputs:
    """Every text a test produced, for the password check."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []

    def add(self, what: str, text: str) -> str:
        self.texts.append((what, text))
        return text


@pytest.fixture(scope="module")
def outputs() -> Outputs:
    return Outputs()


@pytest.fixture(scope="module")
def env() -> Iterator[TaskEnv]:
    with open_task_env("tests.apps.obs_app", password=PASSWORD) as task_env:
        yield task_env


@pytest.fixture(scope="module")
def app(env: TaskEnv) -> Celery:
    return obs_app.client(env.broker_url, env.backend_url, env.lock_url)


@pytest.fixture(scope="module")
def worker(env: TaskEnv) -> Iterator[CeleryWorker]:
    w = env.worker(pool="prefork", concurrency=3, events=True)
    try:
        yield w.start()
    finally:
        env.stop_workers([w])


@pytest.fixture
def cli(env: TaskEnv, outputs: Outputs
        ) -> Callable[..., subprocess.CompletedProcess[str]]:
    def call(*args: str) -> subprocess.CompletedProcess[str]:
        proc = run_cli(env.lock_url, *args, broker=env.broker_url, backend=env.backend_url)
        outputs.add(f"locks {' '.join(args)} (stdout)", proc.stdout)
        outputs.add(f"locks {' '.join(args)} (stderr)", proc.stderr)
        return proc

    return call


class Holds:
    """``obs.hold`` tasks started by one test, stopped and awaited at its end."""

    def __init__(self, env: TaskEnv, app: Celery) -> None:
        self.env = env
        self.task = app.tasks["obs.hold"]
        self.running: list[tuple[str, Any]] = []

    def start(self, name: str | None = None, seconds: float = 60.0) -> tuple[str, Any]:
        name = name or f"n-{uuid.uuid4().hex[:8]}"
        result = self.task.delay(name, seconds)
        self.env.wait(lambda: self.env.records.exists(f"entered:{result.id}"), 15,
                      f"hold {name} entered")
        self.running.append((name, result))
        return name, result

    def wait_renewed(self, *names: str) -> None:
        """Wait until each lock was renewed once (ttl 3 s: every second)."""
        for name in names:
            self.env.wait(lambda n=name: int(self.env.lock_client.hget(self.key(n), "renewals")
                                            or 0) >= 1, 10, f"a renewal of {name}")

    def key(self, name: str) -> str:
        return self.task.lock_key_for(name)  # type: ignore[no-any-return]

    def stop(self) -> None:
        for name, _ in self.running:
            self.env.records.set(f"stop:{name}", "1")
        for _, result in self.running:
            result.get(timeout=15, propagate=False)
        self.running.clear()


@pytest.fixture
def holds(env: TaskEnv, app: Celery, worker: CeleryWorker) -> Iterator[Holds]:
    h = Holds(env, app)
    try:
        yield h
    finally:
        h.stop()
        env.lock_client.flushdb()


@pytest.mark.slow
def test_list_table_shows_each_held_lock(cli: Any, holds: Holds, worker: CeleryWorker) -> None:
    (a, ra), (b, rb) = holds.start(), holds.start()
    holds.wait_renewed(a, b)
    proc = cli("list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["KEY", "TASK", "TASK"]
    assert lines[-1] == "2 locks"
    for name, result in ((a, ra), (b, rb)):
        row = next(line for line in lines if line.startswith(holds.key(name)))
        cells = row.split()
        assert cells[1] == "obs.hold"
        assert cells[2] == result.id
        assert cells[3] == worker.hostname
        assert int(cells[4]) in worker.child_pids()
        assert cells[5] == "while_executing"
        assert cells[6].endswith("Z")
        assert cells[7].endswith("s") and 0 < float(cells[7][:-1]) <= 3.0
        assert int(cells[8]) >= 1


@pytest.mark.slow
def test_list_json_has_the_documented_fields(cli: Any, holds: Holds, worker: CeleryWorker
                                             ) -> None:
    name, result = holds.start()
    proc = cli("list", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 1
    row = rows[0]
    assert set(row) == JSON_FIELDS
    assert row["key"] == holds.key(name)
    assert row["task"] == "obs.hold"
    assert row["task_id"] == result.id
    assert row["hostname"] == worker.hostname
    assert row["pid"] in worker.child_pids()
    assert row["mode"] == "while_executing"
    acquired = datetime.fromisoformat(row["acquired_at"])
    assert abs(acquired.timestamp() - time.time()) < 60
    assert 0 < row["ttl"] <= 3.0
    assert row["masters"] == 1


@pytest.mark.slow
def test_list_task_filter_returns_only_that_tasks_locks(
    cli: Any, holds: Holds, env: TaskEnv
) -> None:
    name, _ = holds.start()
    others = [
        task_lock(env.lock_url, "obs.hold2", "x"),  # a longer name with the same start
        task_lock(env.lock_url, "other.task", "y"),
        Redlock("reports:daily", url=env.lock_url, ttl=60),  # a standalone lock
    ]
    assert others[2].acquire(blocking=False)
    proc = cli("list", "--task", "obs.hold", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [r["key"] for r in json.loads(proc.stdout)] == [holds.key(name)]
    everything = json.loads(cli("list", "--json").stdout)
    assert len(everything) == 4
    assert {r["task"] for r in everything} == {"obs.hold", "obs.hold2", "other.task", ""}


@pytest.mark.slow
def test_show_prints_one_lock_and_fails_on_an_unknown_key(cli: Any, holds: Holds) -> None:
    name, result = holds.start()
    proc = cli("show", holds.key(name))
    assert proc.returncode == 0, proc.stderr
    assert result.id in proc.stdout and "fencing token" in proc.stdout
    data = json.loads(cli("show", holds.key(name), "--json").stdout)
    assert data["task_id"] == result.id and data["fencing_token"] > 0
    missing = cli("show", "csl:obs.hold:{" + "0" * 64 + "}")
    assert missing.returncode == 1
    assert "no lock" in missing.stderr


@pytest.mark.slow
def test_release_refuses_a_live_holder_without_force_and_releases_with_it(
    cli: Any, holds: Holds, env: TaskEnv, worker: CeleryWorker
) -> None:
    name, result = holds.start()
    key = holds.key(name)
    refused = cli("release", key, "--yes")
    assert refused.returncode == 1
    assert f"its holder task {result.id} is active on worker {worker.hostname}" in refused.stderr
    assert "--force" in refused.stderr
    assert env.lock_client.exists(key)
    forced = cli("release", key, "--yes", "--force")
    assert forced.returncode == 0, forced.stderr
    assert f"released {key} on 1/1 master" in forced.stdout
    assert not env.lock_client.exists(key)


@pytest.mark.slow
def test_release_without_force_takes_a_lock_whose_holder_is_gone(
    cli: Any, env: TaskEnv, worker: CeleryWorker
) -> None:
    # The worker named in the lock answers, but runs no such task: the holder is gone.
    stale = task_lock(env.lock_url, "obs.hold", "stale", hostname=worker.hostname)
    proc = cli("release", stale.key, "--yes")
    assert proc.returncode == 0, proc.stderr
    assert not env.lock_client.exists(stale.key)
    # A lock naming a worker that does not answer may be held by a busy worker: refused.
    silent = task_lock(env.lock_url, "obs.hold", "silent", hostname="gone@nowhere")
    proc = cli("release", silent.key, "--yes", "--timeout", "0.5")
    assert proc.returncode == 1
    assert "gone@nowhere did not answer" in proc.stderr
    # A standalone lock has no holder task to ask about: only --force releases it.
    standalone = Redlock("standalone-job", url=env.lock_url, ttl=60)
    assert standalone.acquire(blocking=False)
    proc = cli("release", standalone.key, "--yes")
    assert proc.returncode == 1 and "standalone lock" in proc.stderr
    assert cli("release", standalone.key, "--yes", "--force").returncode == 0
    env.lock_client.flushdb()


@pytest.mark.slow
def test_release_asks_for_confirmation_without_yes(cli: Any, env: TaskEnv) -> None:
    lock = task_lock(env.lock_url, "obs.hold", "confirm")
    proc = cli("release", lock.key, "--force")  # stdin is closed: no answer, so abort
    assert proc.returncode == 1
    assert "Release lock" in proc.stdout and "Abort" in proc.stderr
    assert env.lock_client.exists(lock.key)
    env.lock_client.flushdb()


@pytest.mark.slow
def test_purge_needs_yes_and_honours_task(cli: Any, env: TaskEnv) -> None:
    for i in range(3):
        task_lock(env.lock_url, "obs.hold", f"p{i}")
    task_lock(env.lock_url, "other.task", "p")
    refused = cli("purge")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert env.lock_client.dbsize() >= 4
    proc = cli("purge", "--task", "obs.hold", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert "purged 3 of 3 locks of task obs.hold" in proc.stdout
    assert [r["task"] for r in json.loads(cli("list", "--json").stdout)] == ["other.task"]
    assert "purged 1 of 1 lock" in cli("purge", "--yes").stdout
    assert json.loads(cli("list", "--json").stdout) == []


@pytest.mark.slow
def test_key_names_the_holder_of_a_running_call_and_then_says_it_is_free(
    cli: Any, holds: Holds, env: TaskEnv, worker: CeleryWorker
) -> None:
    name, result = holds.start()
    key = holds.key(name)
    proc = cli("key", "obs.hold", json.dumps([name, 60]))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "task  obs.hold (lock_mode while_executing)"
    assert lines[1].startswith("lock (taken by the worker just before the body runs")
    assert lines[2] == f"  key     {key}"
    holder = lines[3]
    assert holder.startswith(f"  holder  task {result.id} on worker {worker.hostname} (pid ")
    assert int(holder.split("(pid ")[1].split(")")[0]) in worker.child_pids()
    # lock_key=["name"]: the keyword spelling and other arguments give the same key.
    data = json.loads(cli("key", "obs.hold", "[]", json.dumps({"name": name, "seconds": 1}),
                          "--json").stdout)
    assert (data["task"], data["mode"]) == ("obs.hold", "while_executing")
    (lock,) = data["locks"]
    assert (lock["role"], lock["key"], lock["held"]) == ("lock", key, True)
    assert set(lock["holder"]) == JSON_FIELDS
    assert lock["holder"]["task_id"] == result.id
    assert lock["holder"]["hostname"] == worker.hostname
    assert lock["holder"]["pid"] in worker.child_pids()
    assert 0 < lock["holder"]["ttl"] <= 3.0
    holds.stop()
    env.wait(lambda: not env.lock_client.exists(key), 5, f"{key} released")
    free = cli("key", "obs.hold", json.dumps([name]))
    assert free.returncode == 0, free.stderr
    assert "  holder  none: the lock is free" in free.stdout.splitlines()
    data = json.loads(cli("key", "obs.hold", json.dumps([name]), "--json").stdout)
    assert data["locks"] == [{"role": "lock", "key": key, "held": False, "holder": None}]


def test_key_of_until_and_while_executing_shows_the_enqueue_and_execution_locks() -> None:
    from tests.apps import compat_app

    with open_task_env("tests.apps.compat_app") as task_env:
        client = compat_app.client(task_env.broker_url, task_env.backend_url,
                                   task_env.lock_url, task_env.lock_url, task_env.lock_url)
        both = client.tasks["locked.both"]
        queued = both.apply_async(("s1",), queue="parked")  # no worker: it stays queued
        key = both.lock_key_for("s1", note="ignored")
        proc = run_cli(task_env.lock_url, "key", "locked.both", '["s1"]', "--json",
                       app_module="tests.apps.compat_app", broker=task_env.broker_url,
                       backend=task_env.backend_url)
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        assert data["mode"] == "until_and_while_executing"
        enqueue, execution = data["locks"]
        assert (enqueue["role"], enqueue["key"], enqueue["held"]) == ("enqueue", key, True)
        assert enqueue["holder"]["task_id"] == queued.id
        assert enqueue["holder"]["hostname"] == ""  # no worker has it yet
        assert enqueue["holder"]["mode"] == "until_and_while_executing"
        assert execution == {"role": "execution", "key": key + ":run", "held": False,
                             "holder": None}
        text = run_cli(task_env.lock_url, "key", "locked.both", '["s1"]',
                       app_module="tests.apps.compat_app", broker=task_env.broker_url,
                       backend=task_env.backend_url).stdout.splitlines()
        assert text[1] == ("enqueue lock (taken at enqueue, released when a worker starts "
                           "the task)")
        assert text[3].startswith(f"  holder  task {queued.id}, queued (no worker has taken")
        assert text[4].startswith("execution lock (taken when a worker starts the task")
        assert text[5:] == [f"  key     {key}:run", "  holder  none: the lock is free"]


def test_key_reads_arguments_as_the_message_carries_them(redis_server: RedisServer) -> None:
    # kombu's JSON: a typed value travels as {"__type__": ..., "__value__": ...}.
    when = datetime.fromisoformat("2024-03-10T02:30:00-05:00")
    expected = obs_app.client("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/1",
                              redis_server.url).tasks["obs.signalled"].lock_key_for(when)
    arg = json.dumps([{"__type__": "datetime", "__value__": when.isoformat()}])
    proc = run_cli(redis_server.url, "key", "obs.signalled", arg, "--json")
    assert proc.returncode == 0, proc.stderr
    assert [lock["key"] for lock in json.loads(proc.stdout)["locks"]] == [expected]


@pytest.mark.parametrize("args, argument, fragment", [
    (("obs.hold", "[x"), "ARGS_JSON", "not valid JSON"),
    (("obs.hold", "[]", '["n"]'), "KWARGS_JSON", "must be a JSON object, not list"),
    (("obs.hodl", '["n"]'), "TASK", "no task 'obs.hodl' in app 'obs_app'; did you mean obs.hold"),
    (("obs.hold", '["n"]', '{"nom": 1}'), "'ARGS_JSON' / 'KWARGS_JSON'",
     "unexpected keyword argument 'nom'"),
], ids=["bad_json", "kwargs_not_an_object", "unknown_task", "arguments_not_the_signature"])
def test_key_refuses_bad_input_naming_the_argument(args: tuple[str, ...], argument: str,
                                                    fragment: str) -> None:
    proc = run_cli("redis://127.0.0.1:1/0", "key", *args)
    assert proc.returncode == 2
    assert f"Invalid value for {argument}: " in proc.stderr
    assert fragment in proc.stderr
    assert proc.stdout == ""


def test_key_refuses_a_task_that_is_not_locked() -> None:
    proc = run_cli("redis://127.0.0.1:1/0", "key", "plain.add", "[1, 2]",
                   app_module="tests.apps.compat_app")
    assert proc.returncode == 2
    assert "Invalid value for TASK: task 'plain.add' is not a LockedTask" in proc.stderr


def test_key_with_the_store_down_is_a_clear_error_without_the_password() -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    proc = run_cli(url, "key", "obs.hold", '["n"]')
    assert proc.returncode == 69
    assert "lock store unavailable" in proc.stderr and "127.0.0.1" in proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr


def test_task_pattern_is_the_keys_own_spelling_escaped() -> None:
    from fnmatch import fnmatchcase

    from celery_singleton_lock.inventory import key_pattern, task_of_key

    key = format_key("csl", "app.tasks:sync", "x")
    assert key_pattern("csl", "app.tasks:sync") == "csl:app.tasks:sync:{*"
    assert fnmatchcase(key, key_pattern("csl", "app.tasks:sync"))
    assert not fnmatchcase(format_key("csl", "app.tasks:sync2", "x"),
                           key_pattern("csl", "app.tasks:sync"))
    assert not fnmatchcase(format_key("csl", "app.tasks", "x"), key_pattern("csl", "app"))
    assert key_pattern("csl", "odd name*") == "csl:odd_name_:{*"  # shown as in keys
    assert key_pattern("p*[?", None) == "p\\*\\[\\?:*"
    assert task_of_key("csl", key) == "app.tasks:sync"
    assert task_of_key("csl", "csl:{reports:daily}") == ""


def test_release_is_a_compare_and_delete(redis_server: RedisServer) -> None:
    """A lock taken again after it was read is left to its new holder."""
    store = open_backend(redis_server.url)
    old = task_lock(redis_server.url, "t.cad", "x", ttl=60)
    record = read_lock(store, old.key)
    assert record is not None
    assert old.release()
    new = task_lock(redis_server.url, "t.cad", "x", ttl=60)
    assert release_lock(store, record) == 0
    assert new.owned()
    assert release_lock(store, read_lock(store, new.key)) == 1  # type: ignore[arg-type]
    assert not new.locked()


# ------------------------------------------------------------------------------------------------
# Redlock and Cluster


def test_redlock_list_reads_every_master_and_counts_them(
    redis_masters: Callable[..., list[RedisServer]]
) -> None:
    masters = redis_masters(3)
    urls = [m.url for m in masters]
    full = task_lock(urls, "t.red", "full")
    partial = task_lock(urls, "t.red", "partial")
    masters[2].client().hset(partial.key, "token", "someone-else")  # another holder's copy
    minority = format_key("csl", "t.red", "minority")
    masters[0].client().hset(minority, mapping={"token": "t0", "owner": "x", "task": "t.red"})
    masters[0].client().pexpire(minority, 60_000)
    proc = run_cli(urls, "list", "--json")
    assert proc.returncode == 0, proc.stderr
    by_key = {r["key"]: r for r in json.loads(proc.stdout)}
    assert by_key[full.key]["masters"] == 3
    assert by_key[partial.key]["masters"] == 2
    assert by_key[minority]["masters"] == 1
    table = run_cli(urls, "list").stdout
    assert "MASTERS" in table.splitlines()[0]
    assert any(line.startswith(partial.key) and line.rstrip().endswith("2/3")
               for line in table.splitlines())
    shown = run_cli(urls, "show", partial.key).stdout
    assert "another holder's token" in shown
    released = run_cli(urls, "release", partial.key, "--yes", "--force")
    assert "on 2/3 masters" in released.stdout
    assert [m.client().exists(partial.key) for m in masters] == [0, 0, 1]  # not ours to take
    assert all(m.client().exists(full.key) for m in masters)


def test_redlock_list_skips_a_minority_of_down_masters(
    redis_masters: Callable[..., list[RedisServer]]
) -> None:
    masters = redis_masters(3)
    urls = [m.url for m in masters]
    lock = task_lock(urls, "t.down", "x")
    masters[1].stop()
    proc = run_cli(urls, "list", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "warning: a master was skipped" in proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["key"] == lock.key and row["masters"] == 2
    masters[2].stop()
    proc = run_cli(urls, "list")
    assert proc.returncode == 69
    assert "lock store unavailable" in proc.stderr


@pytest.mark.cluster
def test_cluster_list_scans_every_primary(redis_cluster: RedisCluster) -> None:
    held = [task_lock(redis_cluster.url, "t.clu", f"k{i}") for i in range(30)]
    owners = {redis_cluster.node_for_key(lock.key).port for lock in held}
    assert len(owners) == 3  # the keys are spread over every primary
    proc = run_cli(redis_cluster.url, "list", "--task", "t.clu", "--json")
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["key"] for r in json.loads(proc.stdout)) == sorted(lk.key for lk in held)
    store = open_backend(redis_cluster.url)
    record = read_lock(store, held[0].key)
    assert record is not None and record.task == "t.clu"
    proc = run_cli(redis_cluster.url, "purge", "--yes")
    assert "purged 30 of 30 locks" in proc.stdout
    assert list_locks(store, "csl") == []


# ------------------------------------------------------------------------------------------------
# Scale: 100,000 locks


@pytest.mark.slow
def test_list_task_among_100000_locks_reads_only_its_rows_and_never_uses_keys(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    wanted = 50
    pipe = client.pipeline(transaction=False)
    for i in range(100_000):
        task = "obs.target" if i < wanted else f"bulk.t{i % 20}"
        key = format_key("csl", task, str(i))
        pipe.hset(key, mapping={"token": "tok", "owner": f"id-{i}", "task": task,
                                "hostname": "w@h", "pid": 1, "mode": "while_executing",
                                "acquired_at": f"{time.time():.6f}", "ttl": 600,
                                "renewals": 0})
        pipe.pexpire(key, 600_000)
        pipe.set(key + ":fence", i)  # fencing counters: not locks, never listed
        if len(pipe) >= 30_000:
            pipe.execute()
    pipe.execute()
    assert client.dbsize() == 200_000
    client.config_resetstat()
    started = time.monotonic()
    proc = run_cli(redis_server.url, "list", "--task", "obs.target", "--json")
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == wanted and {r["task"] for r in rows} == {"obs.target"}
    stats = client.info("commandstats")
    assert "cmdstat_keys" not in stats
    assert stats["cmdstat_scan"]["calls"] >= 100  # paged: 200,000 keys, COUNT 1000
    # The work is bounded by the task's rows, not the keyspace: SCAN's MATCH filters on the
    # server, and no command but SCAN runs more often than once per listed lock. (Time is
    # printed, not asserted: it depends on the machine's load.)
    others = {name: v["calls"] for name, v in stats.items()
              if name not in ("cmdstat_scan", "cmdstat_config|resetstat")}
    assert others and max(others.values()) <= wanted, others
    print(f"\nlocks list --task among 100,000 locks: {elapsed:.2f}s "
          f"({stats['cmdstat_scan']['calls']} SCAN calls, {others})")


# ------------------------------------------------------------------------------------------------
# Errors and passwords


def test_unreachable_store_is_a_clear_error_without_the_password() -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    proc = run_cli(url, "list")
    assert proc.returncode == 69
    assert "lock store unavailable" in proc.stderr
    assert "127.0.0.1" in proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr


def test_bad_url_is_a_configuration_error() -> None:
    proc = run_cli("http://example.com/0", "list")
    assert proc.returncode == 78
    assert "singleton_lock_url" in proc.stderr


@pytest.mark.slow
def test_password_absent_from_cli_stats_events_and_logs(
    cli: Any, holds: Holds, env: TaskEnv, app: Celery, worker: CeleryWorker, outputs: Outputs
) -> None:
    from tests.test_observability import EventCapture

    with EventCapture(app) as capture:
        name, result = holds.start()
        key = holds.key(name)
        dup = holds.task.delay(name, 1)
        env.wait_ready([dup.id], 15)
        for args in (("list",), ("list", "--json"), ("show", key), ("show", key, "--json"),
                     ("release", key, "--yes"), ("purge",)):
            cli(*args)
        stats = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tests.apps.obs_app", "inspect", "stats",
             "-j", "-d", worker.hostname],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "CSL_TEST_BROKER": env.broker_url,
                 "CSL_TEST_BACKEND": env.backend_url, "CSL_TEST_LOCK_URL": env.lock_url},
        )
        assert stats.returncode == 0, stats.stderr
        assert key in stats.stdout  # the bootstep's entry is there
        outputs.add("inspect stats", stats.stdout + stats.stderr)
        holds.stop()
        wait_until(lambda: any(e["type"] == "task-lock-released" for e in capture.events), 10,
                   message="task-lock-released event")
    types = {e["type"] for e in capture.events}
    assert {"task-lock-acquired", "task-lock-duplicate", "task-lock-released"} <= types
    outputs.add("events", json.dumps(capture.events))
    outputs.add("worker log", worker.log_text())
    assert len(outputs.texts) >= 15  # 6 CLI calls x (stdout, stderr), stats, events, log
    leaks = [what for what, text in outputs.texts if PASSWORD in text]
    assert leaks == []


@pytest.mark.slow
def test_inspect_conf_hides_the_lock_url_password(app: Celery, worker: CeleryWorker) -> None:
    replies = app.control.inspect(timeout=2.0, destination=[worker.hostname]).conf()
    assert PASSWORD not in json.dumps(replies)


def test_cli_help_lists_the_commands() -> None:
    proc = run_cli("redis://127.0.0.1:1/0", "--help")
    assert proc.returncode == 0
    for command in ("list", "show", "release", "purge", "key"):
        assert command in proc.stdout
