#!/usr/bin/env python
"""The PostgreSQL and MySQL/MariaDB lock stores: lock cycles per second beside the simplest
correct hand-written SQL lock and the Redis store, and ``LockedTask`` tasks per second.

**Lock cycles.** A *cycle* is one non-blocking acquire followed by one release of the same key;
each contender has a key of its own and reuses it for every cycle. A cycle that does not really
take and give back the lock raises, so a contender cannot look fast by failing. Contenders:

* ``celery_singleton_lock.Redlock(name, url=..., ttl=10)`` on PostgreSQL, on MariaDB, and on a
  ``redis-server`` this script starts (``tests.servers.RedisServer``, persistence off);
* on each database, the reference: the simplest correct hand-written SQL lock on a two-column
  table (key primary key, token), ``INSERT ... ON CONFLICT DO NOTHING`` (MariaDB: ``INSERT
  IGNORE``), then ``DELETE ... WHERE lock_key = ... AND token = ...``, each in autocommit. Its
  connection comes from the store's own ``connect()``, so driver (psycopg 3 / PyMySQL),
  connection parameters and session settings are the same as ours. It has no expiry, no
  fencing token and no holder metadata: it is the least a database lock does.

Method: as ``bench_locks.py``. Every contender is warmed up, then timed over ``--rounds``
rounds of ``--cycles`` cycles; each round is cut into ``--slices`` short runs and the
contenders take turns run by run, so every round of every contender covers the same stretch
of time. The median round is reported (µs per cycle, cycles per second) with the ratio of
our time per cycle to the hand-written lock's on the same database, both as the ratio of the
medians and as the median of the per-round ratios, and the CPU time per cycle of the thread
that ran the cycles. Then an untimed pass counts, on MariaDB, the statements each cycle sends
(``SHOW SESSION STATUS`` of the connection that ran them, before and after).

**Tasks.** One ``celery worker -P prefork -c 2`` of this module per lock store (Redis broker and
result backend on a second ``redis-server``), each with ``singleton_lock_url`` set to its
store; a no-op ``LockedTask`` (``while_executing``) with distinct arguments. Per round and
store: ``--tasks`` messages are published to the store's queue while its worker does not
consume it, then the worker is told to consume (``add_consumer``) and the script waits for
every result. The rate is ``(N - 1) / (last date_done - first date_done)`` from the result
backend's timestamps; beside it, the CPU time per task of the worker's whole process tree
(``/proc/<pid>/stat`` of the main process and its pool children, before and after). Rounds
are interleaved (the first store rotates) and the median is shown, with the per-round ratio
to the Redis store.

The script creates a database with a random name (``csl_bench_<hex>``) on each server and
drops it at the end, also on an error, Ctrl-C or SIGTERM; it never touches another database.
Servers: ``--postgres`` (default ``postgresql://postgres@127.0.0.1:5432``) and ``--mysql``
(default ``mysql://root@127.0.0.1:3306``), server URLs without a database.

Usage::

    pip install -e '.[test,postgres,mysql]'
    python benchmarks/bench_sql.py [--cycles 2000] [--rounds 5] [--slices 10]
                                   [--tasks 1000] [--task-rounds 5] [--task-stores redis,postgres]
                                   [--only NAME,...] [--json out.json]

The Markdown tables go to stdout, progress to stderr. No target is asserted (the issue's is
printed): the exit status is 0 whatever the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
for _path in (str(REPO_ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from celery import Celery  # noqa: E402
from procstat import commit, die_with_parent, tree_cpu, version  # noqa: E402

from celery_singleton_lock import LockedTask, Redlock  # noqa: E402
from celery_singleton_lock.urls import redact_url  # noqa: E402

DEFAULT_CYCLES = 2000
DEFAULT_ROUNDS = 5
DEFAULT_WARMUP = 200
DEFAULT_SLICES = 10
DEFAULT_TASKS = 1000
DEFAULT_TASK_ROUNDS = 5
#: Cycles of the untimed pass that counts statements per cycle (MariaDB).
DEFAULT_COUNT = 200
TTL_S = 10.0
#: The issue's target, printed only: ours at most this times the hand-written lock's time.
TARGET_VS_HAND = 1.3

POSTGRES_SERVER = os.environ.get("CSL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
MYSQL_SERVER = os.environ.get("CSL_TEST_MYSQL", "mysql://root@127.0.0.1:3306")

#: Environment the worker reads its URLs from (set by this script).
ENV_BROKER, ENV_BACKEND, ENV_LOCKS = "CSL_BENCH_BROKER", "CSL_BENCH_BACKEND", "CSL_BENCH_LOCKS"
HAND_TABLE = "csl_bench_hand_locks"


class CycleFailed(RuntimeError):
    """A cycle did not take or did not give back the lock."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The Celery app (imported by the workers as the module ``bench_sql``)


def make_app() -> Celery:
    app = Celery("csl_bench_sql")
    app.conf.update(
        broker_url=os.environ.get(ENV_BROKER),
        result_backend=os.environ.get(ENV_BACKEND),
        singleton_lock_url=os.environ.get(ENV_LOCKS),
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=None,
        worker_redirect_stdouts=False,
        broker_connection_retry_on_startup=True,
    )
    return app


app = make_app()


@app.task(name="bench.locked", base=LockedTask)
def locked(i: int) -> int:
    return i


# --------------------------------------------------------------------------------------------
# Databases of our own


def _with_db(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _pg_admin(base: str) -> Any:
    import psycopg

    return psycopg.connect(_with_db(base, "postgres"), autocommit=True, connect_timeout=5)


def _mysql_admin(base: str) -> Any:
    import pymysql

    parts = urlsplit(base)
    return pymysql.connect(host=parts.hostname or "127.0.0.1", port=parts.port or 3306,
                           user=parts.username or "root", password=parts.password or "",
                           autocommit=True, connect_timeout=5)


@contextlib.contextmanager
def postgres_database(base: str) -> Iterator[str]:
    """A new database with a random name; yields its URL and drops it afterwards."""
    name = "csl_bench_" + secrets.token_hex(6)
    with _pg_admin(base) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_db(base, name)
    finally:
        with _pg_admin(base) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        say(f"dropped PostgreSQL database {name}")


@contextlib.contextmanager
def mysql_database(base: str) -> Iterator[str]:
    name = "csl_bench_" + secrets.token_hex(6)
    admin = _mysql_admin(base)
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}`")
    finally:
        admin.close()
    try:
        yield _with_db(base, name)
    finally:
        admin = _mysql_admin(base)
        try:
            with admin.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        finally:
            admin.close()
        say(f"dropped MariaDB database {name}")


# --------------------------------------------------------------------------------------------
# Contenders


@dataclass
class Cycle:
    """One contender, set up: ``run()`` is one acquire + release, ``close()`` frees it."""

    run: Callable[[], None]
    close: Callable[[], None] = lambda: None
    #: ``session_status()``: the MariaDB session counters of the connection that runs the
    #: cycles (for the statement count), or None.
    session_status: Callable[[], dict[str, int]] | None = None


@dataclass
class Contender:
    name: str
    label: str
    #: ``"postgres"``, ``"mysql"`` or ``"redis"``: which URL it takes, and its hand-written row.
    db: str
    make: Callable[[str, str], Cycle]
    hand: bool = False


def _ours(url: str, key: str) -> Cycle:
    """This package: ``Redlock(key, url=..., ttl=10)``, ``acquire(blocking=False)``,
    ``release()`` (no renewal registered)."""
    lock = Redlock(key, url=url, ttl=TTL_S)

    def run() -> None:
        if not lock.acquire(blocking=False):
            raise CycleFailed("acquire returned False")
        if not lock.release():
            raise CycleFailed("release returned False")

    store: Any = lock.store

    def status() -> dict[str, int]:
        # On the connection the cycles use: one thread, so the pool hands back the same one.
        return store.run(None, _mysql_session_status)

    is_mysql = type(store).__name__ == "MySQLBackend"
    return Cycle(run, store.close, status if is_mysql else None)


def _store_connection(url: str) -> tuple[Any, Any]:
    """A connection made by the store's own ``connect()`` (same driver, parameters, session
    settings and autocommit as ours), and the store."""
    store = Redlock("csl:{bench-hand-connect}", url=url, ttl=TTL_S).store
    return store.connect(), store


def _hand_pg(url: str, key: str) -> Cycle:
    """``INSERT ... ON CONFLICT DO NOTHING`` then ``DELETE ... WHERE key AND token``."""
    conn, store = _store_connection(url)
    conn.execute(f'CREATE TABLE IF NOT EXISTS {HAND_TABLE} '
                 '(lock_key text COLLATE "C" PRIMARY KEY, token text NOT NULL)')
    insert = (f"INSERT INTO {HAND_TABLE} (lock_key, token) VALUES (%s, %s) "
              "ON CONFLICT DO NOTHING")
    delete = f"DELETE FROM {HAND_TABLE} WHERE lock_key = %s AND token = %s"
    execute, token_hex = conn.execute, secrets.token_hex

    def run() -> None:
        token = token_hex(16)
        if execute(insert, (key, token)).rowcount != 1:
            raise CycleFailed("INSERT found the key taken")
        if execute(delete, (key, token)).rowcount != 1:
            raise CycleFailed("DELETE found the key gone")

    def close() -> None:
        conn.close()
        store.close()

    return Cycle(run, close)


def _hand_mysql(url: str, key: str) -> Cycle:
    """``INSERT IGNORE`` then ``DELETE ... WHERE key AND token``."""
    conn, store = _store_connection(url)
    cur = conn.cursor()
    cur.execute(f"CREATE TABLE IF NOT EXISTS {HAND_TABLE} (lock_key VARCHAR(512) NOT NULL "
                "PRIMARY KEY, token VARCHAR(255) NOT NULL) ENGINE=InnoDB "
                "DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin")
    insert = f"INSERT IGNORE INTO {HAND_TABLE} (lock_key, token) VALUES (%s, %s)"
    delete = f"DELETE FROM {HAND_TABLE} WHERE lock_key = %s AND token = %s"
    execute, token_hex = cur.execute, secrets.token_hex

    def run() -> None:
        token = token_hex(16)
        if execute(insert, (key, token)) != 1:
            raise CycleFailed("INSERT IGNORE found the key taken")
        if execute(delete, (key, token)) != 1:
            raise CycleFailed("DELETE found the key gone")

    def close() -> None:
        cur.close()
        conn.close()
        store.close()

    return Cycle(run, close, lambda: _mysql_session_status(conn))


#: Session counters read for the statement count (``Questions``: statements sent by the
#: client, each statement of a multi-statement query counted).
_STATUS = ("Questions", "Com_select", "Com_insert", "Com_update", "Com_delete",
           "Com_insert_select", "Com_set_option", "Handler_commit", "Handler_write",
           "Handler_update", "Handler_delete", "Handler_read_key")


def _mysql_session_status(conn: Any) -> dict[str, int]:
    with conn.cursor() as cur:
        cur.execute("SHOW SESSION STATUS WHERE Variable_name IN %s", (list(_STATUS),))
        return {str(k): int(v) for k, v in cur.fetchall()}


CONTENDERS: list[Contender] = [
    Contender("pg-hand", "PostgreSQL, hand-written: INSERT ON CONFLICT DO NOTHING + DELETE",
              "postgres", _hand_pg, hand=True),
    Contender("pg-ours", "PostgreSQL, celery-singleton-lock `Redlock`", "postgres", _ours),
    Contender("mysql-hand", "MariaDB, hand-written: INSERT IGNORE + DELETE", "mysql",
              _hand_mysql, hand=True),
    Contender("mysql-ours", "MariaDB, celery-singleton-lock `Redlock`", "mysql", _ours),
    Contender("redis-ours", "Redis, celery-singleton-lock `Redlock`", "redis", _ours),
]


# --------------------------------------------------------------------------------------------
# Timing


@dataclass
class Result:
    contender: Contender
    #: (wall seconds, thread CPU seconds) per round, for ``cycles`` cycles.
    rounds: list[tuple[float, float]] = field(default_factory=list)
    #: Statements per cycle on MariaDB (counting pass), by counter.
    statements: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def us(self, cycles: int) -> list[float]:
        return [wall / cycles * 1e6 for wall, _ in self.rounds]

    def cpu_us(self, cycles: int) -> list[float]:
        return [cpu / cycles * 1e6 for _, cpu in self.rounds]


def _timed(run: Callable[[], None], n: int) -> tuple[float, float]:
    perf, cpu = time.perf_counter, time.thread_time
    gc_was = gc.isenabled()
    gc.disable()
    try:
        c0, t0 = cpu(), perf()
        for _ in range(n):
            run()
        return perf() - t0, cpu() - c0
    finally:
        if gc_was:
            gc.enable()


def measure_cycles(urls: dict[str, str], names: Sequence[str], *, cycles: int, rounds: int,
                   slices: int, warmup: int, count: int) -> dict[str, Result]:
    results: dict[str, Result] = {}
    cycles_of: dict[str, Cycle] = {}
    for contender in CONTENDERS:
        if contender.name not in names:
            continue
        result = results[contender.name] = Result(contender)
        url = urls.get(contender.db)
        if url is None:
            result.error = f"no {contender.db} server"
            continue
        try:
            cycle = contender.make(url, f"csl:{{bench-{contender.name}}}")
            say(f"warm-up: {contender.name}")
            _timed(cycle.run, warmup)
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            continue
        cycles_of[contender.name] = cycle
    per_slice = [cycles // slices + (1 if i < cycles % slices else 0) for i in range(slices)]
    try:
        for r in range(rounds):
            live = list(cycles_of)
            shift = r % len(live) if live else 0
            order = live[shift:] + live[:shift]
            spent = {name: [0.0, 0.0] for name in order}
            for n in per_slice:
                for name in order:
                    if name not in cycles_of:
                        continue
                    try:
                        wall, cpu = _timed(cycles_of[name].run, n)
                    except Exception as exc:
                        results[name].error = f"{type(exc).__name__}: {exc}"
                        cycles_of.pop(name).close()
                        continue
                    spent[name][0] += wall
                    spent[name][1] += cpu
            for name in order:
                if name in cycles_of:
                    results[name].rounds.append((spent[name][0], spent[name][1]))
            say(f"round {r + 1}/{rounds}: " + ", ".join(
                f"{name} {spent[name][0] / cycles * 1e6:.0f} us" for name in order
                if name in cycles_of))
        if count:
            for name, cycle in cycles_of.items():
                if cycle.session_status is None:
                    continue
                before = cycle.session_status()
                _timed(cycle.run, count)
                after = cycle.session_status()
                # The SHOW itself is one question of the second reading.
                diff = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                diff["Questions"] -= 1
                results[name].statements = {k: v / count for k, v in diff.items()}
    finally:
        for cycle in cycles_of.values():
            with contextlib.suppress(Exception):
                cycle.close()
    return results


# --------------------------------------------------------------------------------------------
# Tasks through real workers

class Worker:
    """``celery -A bench_sql worker -P prefork -c N`` with ``singleton_lock_url`` = ``lock_url``,
    idling on a queue of its own until told to consume ``queue``."""

    def __init__(self, store: str, lock_url: str, concurrency: int) -> None:
        self.store = store
        self.lock_url = lock_url
        self.hostname = f"bench-sql-{store}-{os.getpid()}@localhost"
        self.queue = f"bench-sql-{store}"
        self.idle_queue = f"bench-sql-idle-{store}"
        self.concurrency = concurrency
        self._dir = tempfile.mkdtemp(prefix="csl-bench-sql-")
        self.log_path = Path(self._dir) / "worker.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> Worker:
        env = dict(os.environ, **{ENV_LOCKS: self.lock_url})
        env["PYTHONPATH"] = os.pathsep.join(
            [str(HERE), str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        argv = [sys.executable, "-m", "celery", "-A", "bench_sql", "worker", "-P", "prefork",
                "-c", str(self.concurrency), "-n", self.hostname, "-Q", self.idle_queue,
                "--loglevel=WARNING", "--without-gossip", "--without-mingle",
                "--without-heartbeat"]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(argv, cwd=str(HERE), env=env, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout_s
        while not app.control.ping(destination=[self.hostname], timeout=0.5):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {self.store} worker did not start:\n{self.log_tail()}")
        return self

    def cpu_s(self) -> float:
        return sum(tree_cpu(self._proc.pid).values()) if self._proc is not None else 0.0

    def consume(self) -> None:
        if not app.control.add_consumer(self.queue, destination=[self.hostname], reply=True,
                                        timeout=5):
            raise RuntimeError(f"the {self.store} worker did not start consuming")

    def stop_consuming(self) -> None:
        app.control.cancel_consumer(self.queue, destination=[self.hostname], reply=True,
                                    timeout=5)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self._proc = None
        shutil.rmtree(self._dir, ignore_errors=True)  # the worker's log, read before this


@dataclass
class TaskResult:
    store: str
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    error: str | None = None


def run_tasks(worker: Worker, backend: Any, n: int, first_arg: int,
              timeout_s: float = 300.0) -> tuple[float, float]:
    """Publish ``n`` tasks to the worker's queue, let it drain them: (tasks/s, CPU µs/task)."""
    backend.flushdb()
    ids = [locked.apply_async((first_arg + i,), queue=worker.queue).id for i in range(n)]
    before = worker.cpu_s()
    worker.consume()
    try:
        deadline = time.monotonic() + timeout_s
        while backend.dbsize() < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{worker.store}: only {backend.dbsize()} of {n} results\n"
                                   f"{worker.log_tail()}")
            time.sleep(0.005)
        cpu = worker.cpu_s() - before
    finally:
        worker.stop_consuming()
    done = []
    for start in range(0, n, 500):
        keys = [f"celery-task-meta-{tid}" for tid in ids[start:start + 500]]
        for raw in backend.mget(keys):
            meta = json.loads(raw)
            if meta["status"] != "SUCCESS":
                raise RuntimeError(f"{worker.store}: a task ended {meta['status']}: {meta}")
            done.append(datetime.fromisoformat(meta["date_done"]).timestamp())
    span = max(done) - min(done)
    return (n - 1) / span if span > 0 else float("inf"), cpu / n * 1e6


def measure_tasks(workers: dict[str, Worker], backend: Any, *, tasks: int, rounds: int,
                  warmup: int) -> dict[str, TaskResult]:
    results = {store: TaskResult(store) for store in workers}
    live = list(workers)
    arg = 0
    for store in list(live):
        say(f"tasks warm-up: {store}")
        try:
            run_tasks(workers[store], backend, warmup, arg)
        except Exception as exc:
            results[store].error = f"{type(exc).__name__}: {exc}"
            live.remove(store)
        arg += warmup
    for r in range(rounds):
        shift = r % len(live) if live else 0
        for store in live[shift:] + live[:shift]:
            try:
                rate, cpu = run_tasks(workers[store], backend, tasks, arg)
            except Exception as exc:
                results[store].error = f"{type(exc).__name__}: {exc}"
                live.remove(store)
                continue
            arg += tasks
            results[store].rates.append(rate)
            results[store].cpu_us.append(cpu)
            say(f"tasks round {r + 1}/{rounds} {store}: {rate:,.0f} tasks/s, "
                f"{cpu:,.0f} us CPU/task (worker tree)")
    return results


# --------------------------------------------------------------------------------------------
# Output


def _pg_environment(url: str) -> str:
    import psycopg

    with psycopg.connect(url, connect_timeout=5) as conn:
        ver, sync, fsync = conn.execute(
            "SELECT current_setting('server_version'), current_setting('synchronous_commit'), "
            "current_setting('fsync')").fetchone()
    return f"PostgreSQL {ver} (synchronous_commit {sync}, fsync {fsync})"


def _mysql_environment(base: str) -> str:
    conn = _mysql_admin(base)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT @@version, @@innodb_flush_log_at_trx_commit, @@log_bin, "
                        "@@sync_binlog")
            ver, flush, log_bin, sync_binlog = cur.fetchone()
    finally:
        conn.close()
    return (f"MariaDB {ver} (innodb_flush_log_at_trx_commit {flush}, log_bin {log_bin}, "
            f"sync_binlog {sync_binlog})")


def cycles_table(results: dict[str, Result], cycles: int) -> str:
    hands = {r.contender.db: r for r in results.values() if r.contender.hand and r.rounds}
    lines = ["| contender | cycles/s | µs/cycle | vs hand-written (ratio of medians) "
             "| per-round ratio (median) | client CPU µs/cycle | µs/cycle per round |",
             "| --- | ---: | ---: | ---: | --- | ---: | --- |"]
    for result in results.values():
        c = result.contender
        us = result.us(cycles)
        if not us:
            lines.append(f"| {c.label} | n/a ({result.error}) | | | | | |")
            continue
        med = statistics.median(us)
        hand = hands.get(c.db)
        ratio = paired = ""
        if hand is not None and hand is not result:
            hand_us = hand.us(cycles)
            ratio = f"{med / statistics.median(hand_us):.2f}x"
            pairs = [a / b for a, b in zip(us, hand_us, strict=False)]
            paired = (", ".join(f"{x:.2f}" for x in pairs)
                      + f" (median **{statistics.median(pairs):.2f}**)")
        elif hand is result:
            ratio = "1.00x"
        lines.append(f"| {c.label} | {1e6 / med:,.0f} | {med:.1f} | {ratio} | {paired} "
                     f"| {statistics.median(result.cpu_us(cycles)):.1f} "
                     f"| {', '.join(f'{x:.0f}' for x in us)} |")
    return "\n".join(lines)


def statements_table(results: dict[str, Result]) -> str | None:
    counted = [r for r in results.values() if r.statements]
    if not counted:
        return None
    keys = [k for k in _STATUS if any(r.statements.get(k) for r in counted)]
    lines = ["| MariaDB, per cycle | " + " | ".join(keys) + " |",
             "| --- |" + " ---: |" * len(keys)]
    for r in counted:
        lines.append(f"| {r.contender.label} | "
                     + " | ".join(f"{r.statements.get(k, 0):.2f}" for k in keys) + " |")
    return "\n".join(lines)


def tasks_table(results: dict[str, TaskResult]) -> str:
    base = results.get("redis")
    lines = ["| LockedTask lock store | tasks/s (median) | vs Redis store (ratio of medians) "
             "| per-round ratio to Redis (median) | worker CPU µs/task | tasks/s per round |",
             "| --- | ---: | ---: | --- | ---: | --- |"]
    for store, r in results.items():
        if not r.rates:
            lines.append(f"| {store} | n/a ({r.error}) | | | | |")
            continue
        med = statistics.median(r.rates)
        ratio = paired = ""
        if base is not None and base.rates:
            ratio = f"{med / statistics.median(base.rates):.2f}x"
            if base is not r:
                pairs = [a / b for a, b in zip(r.rates, base.rates, strict=False)]
                paired = (", ".join(f"{x:.2f}" for x in pairs)
                          + f" (median **{statistics.median(pairs):.2f}**)")
        lines.append(f"| {store} | {med:,.0f} | {ratio} | {paired} "
                     f"| {statistics.median(r.cpu_us):,.0f} "
                     f"| {', '.join(f'{x:,.0f}' for x in r.rates)} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=DEFAULT_CYCLES,
                        help="timed cycles per contender and round (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--slices", type=int, default=DEFAULT_SLICES)
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP)
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT,
                        help="cycles of the statement-counting pass (0: skip)")
    parser.add_argument("--tasks", type=int, default=DEFAULT_TASKS,
                        help="tasks per store and round (0: no task benchmark)")
    parser.add_argument("--task-rounds", type=int, default=DEFAULT_TASK_ROUNDS)
    parser.add_argument("--task-stores", default="redis,postgres",
                        help="lock stores of the task benchmark: redis, postgres, mysql")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--only", help="comma-separated cycle contenders: "
                        + ", ".join(c.name for c in CONTENDERS) + " (none: skip the cycles)")
    parser.add_argument("--postgres", default=POSTGRES_SERVER,
                        help="PostgreSQL server URL, no database (default %(default)s)")
    parser.add_argument("--mysql", default=MYSQL_SERVER,
                        help="MariaDB/MySQL server URL, no database (default %(default)s)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    names = [c.name for c in CONTENDERS]
    if args.only is not None:
        names = [n.strip() for n in args.only.split(",") if n.strip() and n.strip() != "none"]
    task_stores = [s.strip() for s in args.task_stores.split(",") if s.strip()]
    # SIGTERM unwinds like Ctrl-C: the databases are dropped, the servers stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from tests.servers import RedisServer

    environment = [f"Python {platform.python_version()}", f"psycopg {version('psycopg')}",
                   f"PyMySQL {version('PyMySQL')}", f"redis-py {version('redis')}",
                   f"celery {version('celery')}"]
    with contextlib.ExitStack() as stack:
        urls: dict[str, str] = {}
        try:
            urls["postgres"] = stack.enter_context(postgres_database(args.postgres))
            environment.append(_pg_environment(urls["postgres"]))
        except Exception as exc:
            say(f"PostgreSQL unavailable at {redact_url(args.postgres)}: {redact_url(str(exc))}")
        try:
            urls["mysql"] = stack.enter_context(mysql_database(args.mysql))
            environment.append(_mysql_environment(args.mysql))
        except Exception as exc:
            say(f"MariaDB unavailable at {redact_url(args.mysql)}: {redact_url(str(exc))}")
        lock_server = RedisServer().start()
        stack.callback(lock_server.close)
        urls["redis"] = lock_server.url
        import redis

        with redis.Redis.from_url(lock_server.url) as conn:
            environment.append(f"redis-server {conn.info('server')['redis_version']}")
        results: dict[str, Result] = {}
        if names:
            say(f"lock cycles: {args.cycles} x {args.rounds} rounds in {args.slices} slices")
            results = measure_cycles(urls, names, cycles=args.cycles, rounds=args.rounds,
                                     slices=args.slices, warmup=args.warmup, count=args.count)
        task_results: dict[str, TaskResult] = {}
        if args.tasks and task_stores:
            broker = RedisServer().start()
            stack.callback(broker.close)
            base = broker.url.rsplit("/", 1)[0]
            os.environ.update({ENV_BROKER: f"{base}/0", ENV_BACKEND: f"{base}/1",
                               ENV_LOCKS: urls["redis"]})
            app.conf.update(broker_url=f"{base}/0", result_backend=f"{base}/1",
                            singleton_lock_url=urls["redis"])
            backend = redis.Redis.from_url(f"{base}/1")
            stack.callback(backend.close)
            workers: dict[str, Worker] = {}
            for store in task_stores:
                if store not in urls:
                    task_results[store] = TaskResult(store, error=f"no {store} server")
                    continue
                worker = Worker(store, urls[store], args.concurrency)
                stack.callback(worker.close)
                say(f"starting the {store} worker")
                workers[store] = worker.start()
            say(f"tasks: {args.tasks} x {args.task_rounds} rounds")
            task_results.update(measure_tasks(workers, backend, tasks=args.tasks,
                                              rounds=args.task_rounds, warmup=args.warmup))

    env_line = (", ".join(environment) + f", {os.cpu_count()} CPUs, 1-min load average "
                f"{os.getloadavg()[0]:.2f} at the end; checkout {commit(REPO_ROOT) or '?'}.")
    if results:
        print(f"### Lock cycles (acquire + release): {args.cycles} cycles x {args.rounds} "
              f"rounds in {args.slices} slices, median round\n")
        print(cycles_table(results, args.cycles))
        print(f"\nTarget: ours at most {TARGET_VS_HAND}x the hand-written lock's time per cycle.")
        stmts = statements_table(results)
        if stmts:
            print(f"\nStatements per cycle, from SHOW SESSION STATUS over {args.count} cycles:\n")
            print(stmts)
    if task_results:
        print(f"\n### LockedTask through one prefork worker (-c {args.concurrency}) per lock "
              f"store: {args.tasks} distinct no-op tasks x {args.task_rounds} rounds\n")
        print(tasks_table(task_results))
    print(f"\n{env_line}")
    if args.json:
        payload: dict[str, Any] = {
            "cycles": {name: {"label": r.contender.label, "error": r.error,
                              "us_per_cycle": r.us(args.cycles),
                              "cpu_us_per_cycle": r.cpu_us(args.cycles),
                              "statements_per_cycle": r.statements}
                       for name, r in results.items()},
            "tasks": {store: {"error": r.error, "rates": r.rates, "cpu_us_per_task": r.cpu_us}
                      for store, r in task_results.items()},
            "environment": env_line,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
