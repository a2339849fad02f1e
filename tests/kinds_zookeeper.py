"""Lock-store kinds for the contract suite (a pytest plugin loaded by tests/conftest.py).

``KINDS`` lists the kind ids this module adds; for each id a session fixture
``_store_<id>`` yields the URL value to open the store with.

``zookeeper``: one standalone ZooKeeper server started for the session (:mod:`tests.zk_server`),
and a random chroot, so nothing another run left behind is seen. Skipped where no ZooKeeper
or kazoo is installed.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
from collections.abc import Iterator

import pytest

from tests.zk_server import ZooKeeperServer, find_classpath

KINDS: list[str] = ["zookeeper"]


@pytest.fixture(scope="session")
def zookeeper_server() -> Iterator[ZooKeeperServer]:
    """One ZooKeeper server for the whole test session."""
    if importlib.util.find_spec("kazoo") is None:
        pytest.skip("kazoo is not installed (pip install 'celery-singleton-lock[zookeeper]')")
    if find_classpath() is None or not (os.environ.get("JAVA") or shutil.which("java")):
        pytest.skip("no ZooKeeper server installed (apt-get install zookeeper)")
    with ZooKeeperServer() as server:
        yield server


@pytest.fixture(scope="session")
def _store_zookeeper(zookeeper_server: ZooKeeperServer) -> Iterator[str]:
    """``zookeeper://127.0.0.1:<port>/<random chroot>``."""
    yield zookeeper_server.url()


@pytest.fixture(scope="session")
def _store_zookeeper_password(zookeeper_server: ZooKeeperServer) -> Iterator[str]:
    """The server again, in a chroot of its own behind digest credentials (its nodes carry
    the creator's ACL, so a wrong password is refused)."""
    url = zookeeper_server.url().replace(
        "zookeeper://", f"zookeeper://csl:Pw-{secrets.token_hex(8)}@")
    from celery_singleton_lock.backends.registry import open_backend

    store = open_backend(url, socket_timeout=5.0)  # makes the chroot, owned by this identity
    try:
        assert store.ping() == (1, [])
        key = "csl:zk.fixture:{0}"
        assert store.acquire(key, "t", 5.0).acquired and store.release(key, "t")
    finally:
        store.close()
    yield url
