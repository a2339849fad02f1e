"""Lock-store kinds for the contract suite: in-memory and Redis (a pytest plugin loaded by
tests/conftest.py).

``KINDS`` lists the kind ids; for each id a session fixture ``_store_<id>`` yields the value to
open the store with (a URL, a list of URLs, or a :class:`~tests.servers.StoreTarget` whose
``url`` is that value). The Redis kinds ``single``, ``redlock3``, ``redlock5`` and ``cluster``
are tests/conftest.py's own session fixtures; this module adds:

* ``memory``: ``memory://<name>``, one named in-process member;
* ``memory3``: three named in-process members, a Redlock quorum of three;
* ``sentinel``: a master (with a password), its replica and three real Sentinels
  (``redis-server --sentinel``), as ``redis+sentinel://:<password>@s1,s2,s3/<master>/0``.

A kind whose URLs can carry a password may also have a ``_store_<id>_password`` fixture: a
store behind a password, for the suite's check that no description shows it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import (
    LOOPBACK,
    RedisCluster,
    RedisServer,
    StoreTarget,
    find_redis_server,
    wait_until,
)

KINDS: list[str] = ["memory", "memory3", "single", "redlock3", "redlock5", "cluster",
                    "sentinel"]

#: The password of the Sentinel kind's master and of the ``*_password`` stores.
PASSWORD = "contract-s3cret-pw"
#: The master name the Sentinels monitor.
SENTINEL_MASTER = "contract-master"


@pytest.fixture(scope="session")
def _store_memory() -> str:
    return f"memory://contract-{uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def _store_memory3() -> list[str]:
    name = f"contract-{uuid.uuid4().hex}"
    return [f"memory://{name}-{i}" for i in range(3)]


# -- Sentinel ---------------------------------------------------------------------------------


class RedisSentinel(RedisServer):
    """A ``redis-server --sentinel`` process monitoring one master (quorum 2)."""

    def __init__(self, master_port: int, master_password: str | None = None,
                 **options: Any) -> None:
        super().__init__(**options)
        self.master_port = master_port
        self.master_password = master_password

    def _argv(self) -> list[str]:
        conf = Path(self._workdir()) / "sentinel.conf"
        if not conf.exists():  # Sentinel rewrites its own config: write it once
            lines = [
                f"port {self._port}",
                f"bind {LOOPBACK}",
                f"dir {self._workdir()}",
                "protected-mode no",
                f"sentinel monitor {SENTINEL_MASTER} {LOOPBACK} {self.master_port} 2",
                f"sentinel down-after-milliseconds {SENTINEL_MASTER} 1000",
                f"sentinel failover-timeout {SENTINEL_MASTER} 5000",
                f"sentinel parallel-syncs {SENTINEL_MASTER} 1",
            ]
            if self.master_password is not None:
                lines.append(f"sentinel auth-pass {SENTINEL_MASTER} {self.master_password}")
            conf.write_text("\n".join(lines) + "\n")
        return [find_redis_server(), str(conf), "--sentinel"]


def _sees_master(sentinel: RedisSentinel, port: int) -> bool:
    with sentinel.client(decode_responses=True, socket_timeout=1) as client:
        addr = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER)
    return bool(addr) and int(addr[1]) == port


@pytest.fixture(scope="session")
def _store_sentinel() -> Iterator[StoreTarget]:
    started: list[RedisServer] = []
    try:
        master = RedisServer(password=PASSWORD).start()
        started.append(master)
        replica = RedisServer(password=PASSWORD, extra_args=[
            "--replicaof", LOOPBACK, str(master.port), "--masterauth", PASSWORD]).start()
        started.append(replica)
        with replica.client(decode_responses=True) as client:
            wait_until(lambda: client.info("replication").get("master_link_status") == "up",
                       15, message="the replica in sync")
        sentinels = []
        for _ in range(3):
            sentinel = RedisSentinel(master.port, PASSWORD).start()
            started.append(sentinel)
            sentinels.append(sentinel)
        for sentinel in sentinels:
            wait_until(lambda s=sentinel: _sees_master(s, master.port), 15,
                       message="a Sentinel naming the master")
        hosts = ",".join(f"{LOOPBACK}:{s.port}" for s in sentinels)
        url = f"redis+sentinel://:{PASSWORD}@{hosts}/{SENTINEL_MASTER}/0"
        yield StoreTarget("sentinel", "sentinel", url, [master])
    finally:
        for server in reversed(started):
            server.close()


# -- stores behind a password (only for the description check) --------------------------------


@pytest.fixture(scope="session")
def _store_single_password() -> Iterator[str]:
    with RedisServer(password=PASSWORD) as server:
        yield server.url


def _masters_with_password(n: int) -> Iterator[list[str]]:
    servers = [RedisServer(password=PASSWORD) for _ in range(n)]
    try:
        for server in servers:
            server.start()
        yield [s.url for s in servers]
    finally:
        for server in servers:
            server.close()


@pytest.fixture(scope="session")
def _store_redlock3_password() -> Iterator[list[str]]:
    yield from _masters_with_password(3)


@pytest.fixture(scope="session")
def _store_redlock5_password() -> Iterator[list[str]]:
    yield from _masters_with_password(5)


@pytest.fixture(scope="session")
def _store_cluster_password() -> Iterator[str]:
    with RedisCluster(3, password=PASSWORD) as cluster:
        yield cluster.url


@pytest.fixture(scope="session")
def _store_sentinel_password(_store_sentinel: StoreTarget) -> str:
    return str(_store_sentinel.url)
