"""The lock stores a chaos run can target, each built from real ``redis-server`` processes.

* ``redlock``: three independent masters (quorum 2), each reached through its own link of the
  run's TCP proxy, so latency and partitions can be put on one master's traffic;
* ``single``: one Redis, also behind the proxy;
* ``cluster``: a three-master Redis Cluster. Its clients follow the addresses the nodes announce,
  so it is reached directly: the latency and partition faults do not apply.

The run reads the masters directly (never through the proxy) to see where a lock really is:
:meth:`LockStore.presence` samples which lock keys a quorum holds, :meth:`LockStore.leftovers`
scans for lock keys after the run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import redis

from chaos.proxy import ProxyProcess
from tests.servers import RedisCluster, RedisServer, no_retry

__all__ = ["KINDS", "LockStore", "open_store"]

#: The ``--store`` choices.
KINDS = ("redlock", "single", "cluster")
#: Seconds the run waits for a master it reads directly.
READ_TIMEOUT_S = 0.5


class LockStore:
    """The servers behind one lock store, the URL the workers use, and direct readers."""

    def __init__(
        self, kind: str, servers: list[RedisServer], url: str | list[str],
        cluster: RedisCluster | None = None, proxied: bool = False,
    ) -> None:
        #: ``redlock``, ``single`` or ``cluster``.
        self.kind = kind
        #: The masters (or cluster nodes): fault targets.
        self.servers = servers
        #: ``singleton_lock_url`` for the workers (through the proxy when ``proxied``).
        self.url = url
        self.cluster = cluster
        #: Whether each server has a proxy link named ``m<index>``.
        self.proxied = proxied
        self._clients: list[redis.Redis] = [
            s.client(socket_timeout=READ_TIMEOUT_S, socket_connect_timeout=READ_TIMEOUT_S,
                     retry=no_retry(), decode_responses=True)
            for s in servers
        ]

    @property
    def quorum(self) -> int:
        """Masters that must hold a key for the lock to be held."""
        return len(self.servers) // 2 + 1 if self.kind == "redlock" else 1

    def placement(self, key: str) -> list[int]:
        """Indices of the servers a lock key lives on."""
        if self.cluster is not None:
            return [self.servers.index(self.cluster.node_for_key(key))]
        return list(range(len(self.servers)))

    def presence(self, keys: Sequence[str]) -> dict[str, bool | None]:
        """Per key: True if a quorum holds it, False if it cannot, None if unknown (a server
        did not answer and could tip the count)."""
        wanted: list[list[str]] = [[] for _ in self.servers]
        for key in keys:
            for index in self.placement(key):
                wanted[index].append(key)
        answers: list[dict[str, bool] | None] = []
        for client, server_keys in zip(self._clients, wanted, strict=True):
            if not server_keys:
                answers.append({})
                continue
            try:
                pipe = client.pipeline(transaction=False)
                for key in server_keys:
                    pipe.exists(key)
                replies = pipe.execute()
                answers.append({k: bool(v) for k, v in zip(server_keys, replies, strict=True)})
            except redis.RedisError:
                answers.append(None)
        out: dict[str, bool | None] = {}
        for key in keys:
            places = self.placement(key)
            present = sum(1 for i in places if (answers[i] or {}).get(key))
            unknown = sum(1 for i in places if answers[i] is None)
            if present >= self.quorum:
                out[key] = True
            elif present + unknown < self.quorum:
                out[key] = False
            else:
                out[key] = None
        return out

    def leftovers(self, lock_keys: Iterable[str], match: str) -> dict[str, int]:
        """Lock keys (of ``lock_keys``) found with SCAN on any server -> how many hold each."""
        known = set(lock_keys)
        found: dict[str, int] = {}
        for client in self._clients:
            for key in client.scan_iter(match=match, count=1000):
                if key in known:
                    found[key] = found.get(key, 0) + 1
        return found

    def heal(self) -> None:
        """Every server running and unpaused (and the cluster ok again)."""
        if self.cluster is not None:
            self.cluster.heal()
        else:
            for server in self.servers:
                server.heal()

    def close(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        if self.cluster is not None:
            self.cluster.close()
        else:
            for server in self.servers:
                server.close()


@contextlib.contextmanager
def open_store(kind: str, proxy: ProxyProcess | None) -> Any:
    """Start the servers of ``kind`` (and their proxy links); close them all on exit."""
    if kind not in KINDS:
        raise ValueError(f"unknown store {kind!r}; choose from {', '.join(KINDS)}")
    servers: list[RedisServer] = []
    cluster: RedisCluster | None = None
    store: LockStore | None = None
    try:
        if kind == "cluster":
            cluster = RedisCluster(3)
            cluster.start()
            servers = list(cluster.nodes)
            store = LockStore(kind, servers, cluster.url, cluster=cluster)
        else:
            for _ in range(3 if kind == "redlock" else 1):
                servers.append(RedisServer())
                servers[-1].start()
            if proxy is None:
                raise ValueError(f"the {kind} store is reached through the proxy")
            urls = []
            for index, server in enumerate(servers):
                assert server.port is not None
                port = proxy.listen(f"m{index}", server.port)
                urls.append(f"redis://127.0.0.1:{port}/0")
            store = LockStore(kind, servers, urls if kind == "redlock" else urls[0],
                              proxied=True)
        yield store
    finally:
        if store is not None:
            store.close()
        elif cluster is not None:
            cluster.close()
        else:
            for server in servers:
                server.close()
