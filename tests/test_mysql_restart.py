"""The MySQL/MariaDB lock store across a crash and restart of its database server.

The machine's MariaDB is shared and must never be stopped, so these tests run a MariaDB of
their own (:class:`tests.mariadb_server.PrivateMariaDB`) and crash it with SIGKILL: clients see
their connections end, and committed rows come back through InnoDB's crash recovery, as they
would after a real crash. What must hold (issue 14, SPEC 2 and 12):

* while the server is down every operation says so (an acquire is ``backend_down``, a
  renewal undecided, a read raises ``LockBackendError``) and none claims an answer;
* once it is back, the locks are where they were: the holder renews its lock, nobody else
  takes it, the fencing token still grows, and a waiter is woken by the next release;
* a worker under ``lock_on_backend_error="requeue"`` runs nothing while the store is down,
  then runs every task once, under its lock, and a body that was running throughout keeps
  its lock, with no duplicate beside it.

Only the store's public API is used (no table or column is read), so the tests hold whatever
the lease table looks like.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from celery_singleton_lock.backends.base import AcquireResult, LockBackend, Renewal
from celery_singleton_lock.backends.registry import open_backend
from celery_singleton_lock.errors import LockBackendError
from tests.mariadb_server import PrivateMariaDB
from tests.servers import wait_until
from tests.workers import READY_STATES

#: A waiter polls the row every 50-100 ms (the store has no release notification).
WAKE_BOUND_S = 0.5
#: The worker's log line for a task requeued because the lock store did not answer.
_REQUEUED = re.compile(r"requeueing sql\.guarded\[([0-9a-f-]+)\]: lock store unavailable")


@pytest.fixture
def mariadb() -> Iterator[PrivateMariaDB]:
    server = PrivateMariaDB()
    try:
        began = time.monotonic()
        server.start()
        print(f"private MariaDB up in {time.monotonic() - began:.2f} s ({server.url})")
        yield server
    finally:
        server.close()


@pytest.fixture
def key() -> str:
    return f"csl:test.task:{{{secrets.token_hex(8)}}}"


def _restart(server: PrivateMariaDB) -> float:
    """Start the crashed server again; returns the seconds it took to take logins."""
    began = time.monotonic()
    server.start()
    took = time.monotonic() - began
    print(f"restarted (crash recovery included) in {took:.2f} s")
    return took


# ------------------------------------------------------------------------------------------
# The store


def test_a_crashed_mariadb_keeps_its_locks_and_the_store_carries_on(
        mariadb: PrivateMariaDB, key: str) -> None:
    store = open_backend(mariadb.url)
    other = open_backend(mariadb.url)
    try:
        got = store.acquire(key, "a", 30.0, [("owner", "t1")])
        assert got.acquired and got.fence > 0
        # A lease that runs out while the server is down: the server's clock goes on.
        short = store.acquire(key + "-short", "s", 0.6)
        assert short.acquired

        # A waiter, blocked on a lock someone else holds, across the whole outage.
        waited = key + "-w"
        assert other.acquire(waited, "h", 30.0).acquired
        tries: list[AcquireResult] = []
        woke: list[float] = []

        def tried() -> bool:
            result = store.acquire(waited, "w", 5.0)
            tries.append(result)
            if result.acquired:
                woke.append(time.monotonic())
            return result.acquired

        outcome: list[bool] = []
        waiter = threading.Thread(
            target=lambda: outcome.append(store.wait_released(waited, 30.0, tried)),
            daemon=True)
        waiter.start()
        wait_until(lambda: tries, 5, message="the waiter's first try")
        assert not tries[0].acquired and not tries[0].backend_down

        mariadb.crash()
        crashed = time.monotonic()

        # Down: every operation says so; none claims an answer.
        down = store.acquire(key + "-2", "b", 5.0)
        assert down.backend_down and not down.acquired and down.errors
        assert store.extend_many([Renewal(key, "a", 30000)]) == [None]
        with pytest.raises(LockBackendError):
            store.holder(key)
        with pytest.raises(LockBackendError):
            other.lock_info(key)
        taken = other.acquire(key, "c", 5.0)
        assert taken.backend_down and not taken.acquired
        assert other.ping()[0] == 0
        # The waiter goes on trying through the outage, and no try of it takes the lock.
        before = len(tries)
        wait_until(lambda: any(r.backend_down for r in tries[before:]), 5,
                   message="a try of the waiter while the server is down")
        assert not any(r.acquired for r in tries)
        assert waiter.is_alive()
        # Long enough down for the short lease to run out (by the server's clock).
        wait_until(lambda: time.monotonic() - crashed > 0.7, 2, message="the short lease's end")

        _restart(mariadb)
        # Back: the lock survived the crash, the holder renews it on its next call, and
        # nobody else can take it.
        assert store.extend_many([Renewal(key, "a", 30000)]) == [True]
        assert other.holder(key) == "t1"
        refused = other.acquire(key, "c", 5.0)
        assert not refused.acquired and not refused.backend_down and refused.holder == "t1"
        record = other.lock_info(key)
        assert record is not None and record.token == "a" and record.fence == got.fence
        assert store.release(key, "a")
        again = other.acquire(key, "c", 5.0)
        assert again.acquired and again.fence > got.fence
        assert other.release(key, "c")
        # The lease that ended meanwhile is free, and its next fencing token is larger.
        assert store.holder(key + "-short") is None
        after = other.acquire(key + "-short", "s2", 5.0)
        assert after.acquired and after.fence > short.fence
        # The waiter is still waiting (its lock's holder never let go) and a release wakes it.
        assert waiter.is_alive() and not woke
        released = time.monotonic()
        assert other.release(waited, "h")
        waiter.join(10)
        assert outcome == [True] and woke
        print(f"waiter woken {woke[0] - released:.3f} s after the release")
        assert woke[0] - released < WAKE_BOUND_S
        assert store.holder(waited) == ""
    finally:
        store.close()
        other.close()


# ------------------------------------------------------------------------------------------
# A real `celery worker` (prefork) of tests/apps/sql_app.py locking in the private MariaDB


def test_a_release_right_after_a_restart_releases(mariadb: PrivateMariaDB, key: str) -> None:
    """The first call after a quick restart is a release, on a pooled connection that was idle
    through the crash (used well under a second before, so not pinged): it must release, not
    report the store down and leave the lock held until its ttl."""
    store = open_backend(mariadb.url)
    other = open_backend(mariadb.url)
    try:
        assert store.acquire(key, "a", 30.0, [("owner", "t1")]).acquired
        mariadb.crash()
        _restart(mariadb)
        assert store.release(key, "a")
        assert other.holder(key) is None
        assert other.acquire(key, "b", 5.0).acquired
    finally:
        store.close()
        other.close()


def _runs(env: Any, slot: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in env.records.lrange(f"{slot}:runs", 0, -1)]


def _entered(env: Any, slot: str) -> bool:
    """Whether a body of ``slot`` ever started (guarded counts its entries)."""
    return bool(env.records.exists(f"{slot}:max"))


def _renewals(store: LockBackend, lock_key: str) -> int:
    record = store.lock_info(lock_key)
    return -1 if record is None else record.renewals


@pytest.mark.slow
def test_a_worker_runs_nothing_unlocked_while_mariadb_is_down_and_everything_after(
        mariadb: PrivateMariaDB) -> None:
    """The database crashes while one body runs and more tasks wait: under
    ``lock_on_backend_error="requeue"`` the waiting tasks are tried and requeued, none runs
    while the server is down; once it is back every task runs once, under its lock, and the
    body that ran throughout kept its lock (renewed after the restart), with its duplicates
    never running beside it."""
    from tests.apps import sql_app
    from tests.servers import RedisServer
    from tests.test_sql_store import SqlTaskEnv

    previous_url = sql_app.app.conf.singleton_lock_url
    queue = f"mdb-restart-{secrets.token_hex(3)}"
    with RedisServer() as redis_server:
        env = SqlTaskEnv(redis_server, mariadb.url)
        try:
            worker = env.worker(queues=[queue], pool="prefork", concurrency=2,
                                conf={"singleton_lock_on_backend_error": "requeue",
                                      "singleton_lock_requeue_delay": 0.2,
                                      "singleton_lock_requeue_max": 1000}).start()
            # The body that runs through the outage: long enough to outlast the lock's ttl
            # after the restart, so its lock is only still there if a renewal got through.
            long_slot, long_s = f"slot-{secrets.token_hex(4)}", 3.5
            long_key = sql_app.guarded.lock_key_for(long_slot, long_s)
            long_run = env.send("sql.guarded", (long_slot, long_s), queue)
            env.wait(lambda: _entered(env, long_slot), 15, "the long body started")
            assert env.store.holder(long_key) == long_run.id
            renewed_before = _renewals(env.store, long_key)

            mariadb.crash()
            crashed = time.monotonic()
            slots = [f"slot-{secrets.token_hex(4)}" for _ in range(4)]
            results = [env.send("sql.guarded", (slot, 0.05), queue) for slot in slots]
            duplicates = [env.send("sql.guarded", (long_slot, long_s), queue)
                          for _ in range(2)]
            waiting = {r.id for r in results + duplicates}

            # While the server is down the free pool child tries each waiting task and
            # requeues it (the worker logs each requeue); no body starts, the long one stays
            # alone.
            def down_checks() -> bool:
                assert not any(_entered(env, slot) for slot in slots), env.describe()
                assert int(env.records.get(f"{long_slot}:max") or 0) == 1
                assert not _runs(env, long_slot)
                return waiting <= set(_REQUEUED.findall(worker.log_text()))

            env.wait(down_checks, 5, "every waiting task tried and requeued while down")
            assert set(env.states([r.id for r in results])) <= {"PENDING", "RETRY", "STARTED"}
            _restart(mariadb)
            outage_s = time.monotonic() - crashed
            print(f"server down {outage_s:.2f} s in all")

            # Back: every waiting task runs once, under its lock.
            assert [r.get(timeout=20) for r in results]
            for slot in slots:
                runs = _runs(env, slot)
                assert len(runs) == 1 and runs[0]["held"] is True, runs
                assert int(env.records.get(f"{slot}:max") or 0) == 1

            # The long body's lock is still its own: renewed after the restart, and held past
            # the end of the lease it had when the server went down.
            env.wait(lambda: _renewals(env.store, long_key) > renewed_before, 5,
                     "a renewal of the long body's lock after the restart")
            lapse_at = crashed + sql_app.LOCK_TTL_S + 0.2
            while True:
                now = time.monotonic()
                assert env.store.holder(long_key) == long_run.id, (
                    f"the long body lost its lock (the server was down {outage_s:.2f} s; "
                    f"its lease outlasts an outage of {sql_app.LOCK_TTL_S * 2 / 3:.2f} s at "
                    f"least); its runs: {_runs(env, long_slot)}")
                if now >= lapse_at:
                    break
                time.sleep(0.05)
            assert long_run.get(timeout=15)
            ids = [r.id for r in duplicates]
            env.wait(lambda: all(s in READY_STATES for s in env.states(ids)), 20,
                     "the duplicates ready")
            runs = _runs(env, long_slot)
            assert runs[0]["id"] == long_run.id and all(r["held"] is True for r in runs), runs
            # A duplicate may run after the long body (its requeue came back late), never
            # beside it.
            assert int(env.records.get(f"{long_slot}:max") or 0) == 1
            states = env.states(ids)
            assert set(states) <= {"REVOKED", "SUCCESS"}, states
            assert len(runs) == 1 + states.count("SUCCESS")
            fences = [r["fence"] for r in runs]
            assert fences == sorted(set(fences))
            env.wait(lambda: env.store.holder(long_key) is None, 5, "the last release")
            print(f"duplicates of the long body: {states}")
        finally:
            env.close()
            sql_app.app.conf.singleton_lock_url = previous_url
