"""Shared pytest fixtures: real ``redis-server`` processes on loopback (see :mod:`tests.servers`).

Fixtures, from cheapest to most isolated:

* ``redis_server_module``: one server shared by a test module, healed (resumed or restarted if a
  previous test broke it) and flushed before every test that uses it.
* ``redis_server``: a fresh server for this test alone.
* ``redis_masters(n, **options)``: a factory of ``n`` fresh independent servers (Redlock masters).
* ``redis_cluster``: a 3-master Redis Cluster shared by a test module, healed and flushed before
  every test that uses it.
* ``store_url``: parametrized over ``single``, ``redlock3``, ``redlock5`` and ``cluster``; yields a
  :class:`~tests.servers.StoreTarget` whose ``url`` the library accepts. The servers behind each
  kind are started once per session, on first use, and healed and flushed before every test, so
  the contract suite does not start servers per test.

None of these touch the shared Redis on 127.0.0.1:6379.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.servers import RedisCluster, RedisServer, StoreTarget

#: Lock-store kinds of the stores beyond Redis, for the contract suite (each a plugin module
#: with ``KINDS`` and a ``_store_<kind>`` session fixture per kind).
pytest_plugins = ["tests.kinds_redis", "tests.kinds_sql", "tests.kinds_zookeeper",
                  "tests.kinds_memcached"]

#: Fixtures shared across tests that must be healed and flushed before each test using them.
_SHARED_FIXTURES = ("redis_server_module", "redis_cluster")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh ``redis-server`` for this test alone, closed at teardown."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def redis_server_module() -> Iterator[RedisServer]:
    """A ``redis-server`` shared by the test module; healed and flushed before each test."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisCluster]:
    """A 3-master Redis Cluster shared by the test module; healed and flushed before each test."""
    with RedisCluster(3) as cluster:
        yield cluster


@pytest.fixture(autouse=True)
def _clean_shared_servers(request: pytest.FixtureRequest) -> None:
    """Before each test, heal and flush the module-scoped servers that test asks for.

    Module scope keeps the suite fast; this keeps tests independent: a key, a cached script or
    a paused process left by one test never reaches the next.
    """
    for name in _SHARED_FIXTURES:
        if name in request.fixturenames:
            shared = request.getfixturevalue(name)
            shared.heal()
            shared.flush()


@pytest.fixture
def redis_masters() -> Iterator[Callable[..., list[RedisServer]]]:
    """Factory: ``redis_masters(n, **options)`` starts ``n`` independent servers.

    ``options`` go to :class:`~tests.servers.RedisServer` (``password=...``, ``unix=True``...).
    Every server the factory started is closed at teardown.
    """
    started: list[RedisServer] = []

    def make(n: int, **options: Any) -> list[RedisServer]:
        servers = []
        for _ in range(n):
            server = RedisServer(**options)
            started.append(server)
            servers.append(server.start())
        return servers

    yield make
    for server in started:
        server.close()


# ------------------------------------------------------------------------------------------------
# store_url: one contract suite, every kind of store.


@pytest.fixture(scope="session")
def _store_single() -> Iterator[StoreTarget]:
    with RedisServer() as server:
        yield StoreTarget("single", "single", server.url, [server])


def _redlock_target(n: int) -> Iterator[StoreTarget]:
    servers: list[RedisServer] = []
    try:
        for _ in range(n):
            server = RedisServer()
            servers.append(server)
            server.start()
        yield StoreTarget(f"redlock{n}", "redlock", [s.url for s in servers], servers)
    finally:
        for server in servers:
            server.close()


@pytest.fixture(scope="session")
def _store_redlock3() -> Iterator[StoreTarget]:
    yield from _redlock_target(3)


@pytest.fixture(scope="session")
def _store_redlock5() -> Iterator[StoreTarget]:
    yield from _redlock_target(5)


@pytest.fixture(scope="session")
def _store_cluster() -> Iterator[StoreTarget]:
    with RedisCluster(3) as cluster:
        yield StoreTarget("cluster", "cluster", cluster.url, list(cluster.nodes), cluster)


@pytest.fixture(params=["single", "redlock3", "redlock5", "cluster"])
def store_url(request: pytest.FixtureRequest) -> StoreTarget:
    """Each kind of lock store in turn, healed and flushed; ``.url``, ``.servers``, ``.flush()``.

    Test ids end in ``[single]``, ``[redlock3]``, ``[redlock5]`` or ``[cluster]``; the cluster
    kind also carries the ``cluster`` marker, so ``-m "not cluster"`` skips it.
    """
    target: StoreTarget = request.getfixturevalue(f"_store_{request.param}")
    target.heal()
    target.flush()
    return target


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests that use a cluster with ``cluster``, so ``-m "not cluster"`` can skip them."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_cluster = callspec is not None and callspec.params.get("store_url") == "cluster"
        if on_cluster or "redis_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
