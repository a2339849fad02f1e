"""Redis behind Sentinel (SPEC 12): URL forms, and locks that follow a real failover.

The failover test starts a master, a replica and three real Sentinels
(``redis-server sentinel.conf --sentinel``) on loopback, kills the master, and shows lock
operations resuming on the promoted replica.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_singleton_lock import LockConfigError, Redlock
from celery_singleton_lock.settings import resolve_store_url
from celery_singleton_lock.backends.registry import open_backend
from celery_singleton_lock.urls import parse_sentinel_url, parse_store_url
from tests.servers import LOOPBACK, RedisServer, find_redis_server, wait_until

MASTER = "locks-master"


class RedisSentinel(RedisServer):
    """A ``redis-server --sentinel`` process monitoring ``master_port`` (quorum 2)."""

    def __init__(self, master_port: int, **options: Any) -> None:
        super().__init__(**options)
        self.master_port = master_port

    def _argv(self) -> list[str]:
        conf = Path(self._workdir()) / "sentinel.conf"
        if not conf.exists():  # Sentinel rewrites its own config: write it once
            conf.write_text("\n".join([
                f"port {self._port}",
                f"bind {LOOPBACK}",
                f"dir {self._workdir()}",
                "protected-mode no",
                f"sentinel monitor {MASTER} {LOOPBACK} {self.master_port} 2",
                f"sentinel down-after-milliseconds {MASTER} 500",
                f"sentinel failover-timeout {MASTER} 3000",
                f"sentinel parallel-syncs {MASTER} 1",
                "",
            ]))
        return [find_redis_server(), str(conf), "--sentinel"]


@pytest.fixture
def sentinel_setup() -> Iterator[tuple[RedisServer, RedisServer, list[RedisSentinel]]]:
    started: list[RedisServer] = []
    try:
        master = RedisServer().start()
        started.append(master)
        replica = RedisServer(extra_args=["--replicaof", LOOPBACK, str(master.port)]).start()
        started.append(replica)
        client = replica.client(decode_responses=True)
        wait_until(lambda: client.info("replication").get("master_link_status") == "up", 10,
                   message="the replica in sync")
        client.close()
        sentinels = []
        for _ in range(3):
            sentinel = RedisSentinel(master.port).start()
            started.append(sentinel)
            sentinels.append(sentinel)
        yield master, replica, sentinels
    finally:
        for server in reversed(started):
            server.close()


def _url(sentinels: list[RedisSentinel]) -> str:
    hosts = ",".join(f"{LOOPBACK}:{s.port}" for s in sentinels)
    return f"redis+sentinel://{hosts}/{MASTER}/0"


def test_sentinel_url_forms_and_errors_name_the_setting() -> None:
    target = parse_sentinel_url(
        "redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26380/mymaster/3?sentinel_password=sp")
    assert target.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380))
    assert (target.master_name, target.db, target.password) == ("mymaster", 3, "pw")
    assert target.sentinel_password == "sp" and target.ssl is False
    assert parse_sentinel_url("rediss+sentinel://h/m").sentinels == (("h", 26379),)
    parsed = parse_store_url("redis+sentinel://:pw@h1:26379,h2:26379/m")
    assert parsed.kind == "sentinel"  # its commas separate Sentinels, not Redlock masters
    assert "pw" not in repr(parsed) and "pw" not in repr(target)
    for bad in ("redis+sentinel://h1:26379", "redis+sentinel://h1:x/m",
                "redis+sentinel://h1:26379/m/notadb"):
        with pytest.raises(LockConfigError) as info:
            parse_store_url(f"{bad}?sentinel_password=secret", setting="singleton_lock_url")
        assert info.value.setting == "singleton_lock_url"
        assert "secret" not in str(info.value)


def test_a_kombu_sentinel_broker_url_is_the_default_lock_store() -> None:
    app = Celery("sentinel-default", set_as_current=False,
                 broker="sentinel://:pw@h1:26379/2;sentinel://h2:26379")
    app.conf.broker_transport_options = {"master_name": "brokermaster"}
    url = resolve_store_url(app)
    assert url.kind == "sentinel"
    target = parse_sentinel_url(url.urls[0])
    assert target.sentinels == (("h1", 26379), ("h2", 26379))
    assert (target.master_name, target.db, target.password) == ("brokermaster", 2, "pw")
    app.conf.broker_transport_options = {}
    with pytest.raises(LockConfigError, match="master_name"):
        resolve_store_url(app)
    app.close()


@pytest.mark.slow
def test_locks_follow_a_sentinel_failover_to_the_promoted_replica(
    sentinel_setup: tuple[RedisServer, RedisServer, list[RedisSentinel]],
) -> None:
    master, replica, sentinels = sentinel_setup
    store = open_backend(_url(sentinels), socket_timeout=0.5)
    try:
        before = Redlock("sentinel:before", store=store, ttl=30.0, owner="before")
        assert before.acquire(blocking=False)
        on_master = master.client(decode_responses=True)
        assert on_master.hget(before.key, "owner") == "before"  # the lock is on the master
        on_master.close()
        fence = before.fencing_token

        master.close()  # the master dies; the Sentinels promote the replica
        watcher = sentinels[0].client(decode_responses=True)
        wait_until(
            lambda: int(watcher.execute_command(
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)[1]) == replica.port,
            30, message="the Sentinels promoting the replica")
        watcher.close()

        # Lock operations resume on the new master: the replicated lock is still held...
        def taken_again() -> bool:
            try:
                return Redlock("sentinel:before", store=store, ttl=5.0).acquire(
                    blocking=False) is False
            except Exception:
                return False  # connections to the dead master are still failing over

        wait_until(taken_again, 10, message="a lock operation on the promoted master")
        assert before.extend() is True and before.release() is True
        # ... and new locks are taken there, with fencing tokens that still grow.
        after = Redlock("sentinel:before", store=store, ttl=5.0)
        assert after.acquire(blocking=False)
        assert after.fencing_token > fence
        promoted = replica.client(decode_responses=True)
        assert promoted.hget(after.key, "token") == after.token
        promoted.close()
        assert after.release() is True
    finally:
        store.close()
