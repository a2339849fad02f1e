"""Lock-store kinds for the contract suite (a pytest plugin loaded by tests/conftest.py).

``KINDS`` lists the kind ids this module adds; for each id a session fixture
``_store_<id>`` yields the URL value to open the store with.

* ``memcached``: one real ``memcached`` (a quorum of one);
* ``memcached3``: three independent ``memcached`` servers, a Redlock quorum of 2 of 3.

The servers are started on first use, on free loopback ports, and stopped at the end of the
session (see :mod:`tests.memcached_server`). Without a ``memcached`` binary the kinds skip.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.memcached_server import MemcachedServer, find_memcached

KINDS: list[str] = ["memcached", "memcached3"]


def _servers(n: int) -> Iterator[list[MemcachedServer]]:
    if find_memcached() is None:
        pytest.skip("no memcached binary (apt-get install memcached)")
    pytest.importorskip("pymemcache")
    servers: list[MemcachedServer] = []
    try:
        for _ in range(n):
            servers.append(MemcachedServer().start())
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def _store_memcached() -> Iterator[str]:
    for servers in _servers(1):
        yield servers[0].url


@pytest.fixture(scope="session")
def _store_memcached3() -> Iterator[list[str]]:
    for servers in _servers(3):
        yield [s.url for s in servers]
