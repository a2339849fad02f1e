"""A fencing token guards a database write, so a paused, stale holder's write is refused.

    python examples/fencing.py

A lock alone cannot stop a holder that was paused (a long GC pause, a frozen VM, SIGSTOP)
past its ttl: when it wakes up it still believes it holds the lock, while another worker took
the lock and wrote. ``self.lock.fencing_token`` grows with every acquisition of a key, so the
storage can refuse writes from an older holder. Here the write is one conditional statement:

    UPDATE accounts SET balance = :balance, fence = :token WHERE id = :id AND fence < :token

What runs: two real ``celery worker`` processes (solo pool, queues ``a`` and ``b``) and an
sqlite database in a temporary directory.

1. Worker A takes the lock for account 1 (token T1) and starts working.
2. Worker A is paused with SIGSTOP, so nothing renews its lock (ttl 1 s): the lock lapses.
3. Worker B takes the lock (token T2 > T1; it was waiting with ``lock_on_duplicate="wait"``)
   and writes: 1 row updated.
4. Worker A is resumed and writes with T1: 0 rows updated. The stale write is refused.

Uses $REDIS_URL (broker, results) and $SINGLETON_LOCK_URL (locks) when set; otherwise it starts
private redis-server processes (a broker and three Redlock masters) and stops them at the end.
Exits non-zero if the stale write was not refused.

This file is also the Celery app the workers import (``celery -A fencing worker``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from celery import Celery

from celery_singleton_lock import LockedTask

app = Celery("fencing")
app.conf.update(
    broker_url=os.environ.get("REDIS_URL", "redis://localhost:6379/0"),
    result_backend=os.environ.get("REDIS_URL", "redis://localhost:6379/0"),
    singleton_lock_url=os.environ.get("SINGLETON_LOCK_URL") or None,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

#: The sqlite file the tasks write to.
DB_PATH = os.environ.get("FENCING_DB", "fencing.sqlite3")


def connect() -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(DB_PATH, timeout=10, isolation_level=None))


@app.task(base=LockedTask, bind=True, name="fencing.set_balance", lock_key=["account_id"],
          lock_ttl=1.0, lock_on_duplicate="wait", lock_wait_timeout=20)
def set_balance(self: Any, account_id: int, balance: int, work_s: float) -> dict[str, Any]:
    """Set the balance, unless a holder with a newer fencing token wrote first."""
    token = self.lock.fencing_token
    with connect() as db:
        db.execute("INSERT INTO attempts (task_id, token) VALUES (?, ?)", (self.request.id, token))
    time.sleep(work_s)  # the work; a process paused here resumes after its lock lapsed
    with connect() as db:
        rows = db.execute(
            "UPDATE accounts SET balance = :balance, fence = :token"
            " WHERE id = :id AND fence < :token",
            {"balance": balance, "token": token, "id": account_id},
        ).rowcount
    return {"token": token, "rows": rows}


def _create_db() -> None:
    with connect() as db:
        db.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER,"
                   " fence INTEGER NOT NULL)")
        db.execute("CREATE TABLE attempts (task_id TEXT, token INTEGER)")
        db.execute("INSERT INTO accounts VALUES (1, 0, 0)")


def _started(task_id: str) -> bool:
    with connect() as db:
        return db.execute("SELECT 1 FROM attempts WHERE task_id = ?", (task_id,)).fetchone() \
            is not None


def main() -> int:
    from harness import Checks, Children, redis_topology, wait_until

    checks = Checks()
    with tempfile.TemporaryDirectory(prefix="csl-fencing-") as tmp, \
            redis_topology(masters=3) as topology:
        workdir = Path(tmp)
        db_path = workdir / "bank.sqlite3"
        os.environ.update(topology.environ(), FENCING_DB=str(db_path))
        import fencing  # this file again, configured from the environment just set

        fencing._create_db()
        print(f"servers: {topology.describe()}\ndatabase: {db_path}\n")
        children = Children(workdir, {**topology.environ(), "FENCING_DB": str(db_path)})
        try:
            workers = {}
            for queue in ("a", "b"):
                workers[queue] = children.start(
                    f"worker-{queue}", "-A", "fencing", "worker", "--pool", "solo", "-Q", queue,
                    "-n", f"fencing-{queue}@%h", "--without-mingle", "--without-gossip",
                    "--loglevel", "WARNING")
            names = [f"fencing-{queue}@{socket.gethostname()}" for queue in workers]
            wait_until(lambda: len(fencing.app.control.ping(names, timeout=0.5)) == 2, 60,
                       "both workers to answer")
            print("two workers up: A consumes queue a, B consumes queue b\n")

            first = fencing.set_balance.apply_async((1, 100, 3.0), queue="a")
            wait_until(lambda: fencing._started(first.id), 30, "worker A to take the lock")
            workers["a"].pause()
            paused_at = time.monotonic()
            with fencing.connect() as db:
                if db.execute("SELECT fence FROM accounts WHERE id = 1").fetchone()[0] != 0:
                    raise RuntimeError("worker A wrote before it was paused: machine too busy?")
            print("1. worker A holds the lock for account 1 and works; 2. worker A is paused"
                  " (SIGSTOP), so nothing renews its 1 s lock")

            second = fencing.set_balance.apply_async((1, 200, 0.0), queue="b")
            b = second.get(timeout=30)
            waited = time.monotonic() - paused_at
            print(f"3. worker B took the lock {waited:.1f} s after the pause and wrote:"
                  f" token {b['token']}, {b['rows']} row updated")
            workers["a"].resume()
            a = first.get(timeout=30)
            print(f"4. worker A resumed and wrote with its old token {a['token']}:"
                  f" {a['rows']} rows updated\n")
            with fencing.connect() as db:
                balance, fence = db.execute(
                    "SELECT balance, fence FROM accounts WHERE id = 1").fetchone()

            checks.check(b["rows"] == 1, "the new holder's write is applied",
                         f"token {b['token']}, {b['rows']} row")
            checks.check(a["token"] < b["token"], "the fencing token grew with the new holder",
                         f"{a['token']} < {b['token']}")
            checks.check(a["rows"] == 0, "the paused, stale holder's write is refused",
                         f"token {a['token']}, {a['rows']} rows")
            checks.check((balance, fence) == (200, b["token"]),
                         "the row keeps the new holder's value",
                         f"balance {balance}, fence {fence}")
        except Exception:
            print(children.logs())
            raise
        finally:
            children.stop_all()
    return checks.exit_code


if __name__ == "__main__":
    from harness import run

    run(main)
