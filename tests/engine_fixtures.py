"""Lock-engine test helpers: one :class:`Backend` interface over every kind of lock store.

The contract suite (``test_lock_contract.py``) and the fault tests (``test_lock_faults.py``)
make locks through a :class:`Backend` and read what the masters hold through it, so one test
body runs against the in-memory store (1 or 3 masters) and against real ``redis-server``
processes (one server, 3 or 5 Redlock masters, a 3-node cluster).

Redis-backed kinds reuse the session servers behind conftest's ``store_url`` fixture (the
``_store_<kind>`` fixtures), healed and flushed before each test exactly as ``store_url`` does.
Memory-backed kinds get a fresh store per test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_singleton_lock.lock import Redlock
from celery_singleton_lock.backends.base import LockBackend, LockView, Read
from celery_singleton_lock.backends.memory import MemoryMember, memory_store
from celery_singleton_lock.keys import fence_key_for
from tests.servers import StoreTarget

#: Every kind of store the contract suite runs against.
ALL_KINDS = ["memory1", "memory3", "single", "redlock3", "redlock5", "cluster"]
#: Kinds with several independent masters (Redlock).
MULTI_MASTER_KINDS = ["memory3", "redlock3", "redlock5"]
#: Kinds backed by real redis-server processes.
REDIS_KINDS = ["single", "redlock3", "redlock5", "cluster"]


def kind_params(kinds: list[str]) -> list[Any]:
    """``pytest.param`` per kind; the cluster kind carries the ``cluster`` marker."""
    return [
        pytest.param(kind, id=kind, marks=[pytest.mark.cluster] if kind == "cluster" else [])
        for kind in kinds
    ]


class Backend:
    """A lock store under test: makes :class:`Redlock` objects and inspects every master."""

    #: ``"memory1"``, ``"memory3"``, ``"single"``, ``"redlock3"``, ``"redlock5"``, ``"cluster"``.
    kind: str
    #: Independent masters (1 for one Redis, one cluster or one memory node).
    n_masters: int

    def lock(self, name: str, **kwargs: Any) -> Redlock:
        raise NotImplementedError

    def hashes(self, key: str) -> list[dict[str, str]]:
        """The lock hash on every master (``{}`` where the key does not exist)."""
        raise NotImplementedError

    def pttls(self, key: str) -> list[int]:
        """PTTL of ``key`` on every master (-2: no key; -1: no expiry)."""
        raise NotImplementedError

    def fences(self, key: str) -> list[int | None]:
        """The fencing counter of ``key`` on every master (None where it does not exist)."""
        raise NotImplementedError

    def subscribed_masters(self, channel: str) -> int:
        """How many masters have at least one subscriber on ``channel``."""
        raise NotImplementedError

    def take_down(self, index: int) -> None:
        raise NotImplementedError

    def bring_back(self, index: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def key_gone_everywhere(self, key: str) -> bool:
        return all(not h for h in self.hashes(key))

    def tokens(self, key: str) -> list[str | None]:
        return [h.get("token") for h in self.hashes(key)]

    def __repr__(self) -> str:
        return f"<Backend {self.kind}>"


class MemoryBackend(Backend):
    def __init__(self, masters: int) -> None:
        self.kind = f"memory{masters}"
        self.n_masters = masters
        self.store: LockBackend = memory_store(masters=masters)
        self.nodes: list[MemoryMember] = list(self.store.members)  # type: ignore[attr-defined]

    def lock(self, name: str, **kwargs: Any) -> Redlock:
        return Redlock(name, store=self.store, **kwargs)

    def _views(self, key: str) -> list[LockView]:
        views = []
        for node in self.nodes:
            down, node.down = node.down, False  # read what it holds, even while "down"
            try:
                views.append(node.run([Read(key)])[0])
            finally:
                node.down = down
        return views

    def hashes(self, key: str) -> list[dict[str, str]]:
        return [{**v.fields, "token": v.token} if v.held else {} for v in self._views(key)]

    def pttls(self, key: str) -> list[int]:
        if key.endswith(":next"):  # a follow-up claim (coalesce): white-box
            out = []
            for node in self.nodes:
                state = node._state  # noqa: SLF001
                item = state.follows.get(key.removesuffix(":next"))
                left = None if item is None else item[1] - state.clock()
                out.append(-2 if left is None or left <= 0 else int(left * 1000))
            return out
        return [-2 if not v.held else -1 if v.ttl_s is None else int(v.ttl_s * 1000)
                for v in self._views(key)]

    def fences(self, key: str) -> list[int | None]:
        return [v.fence for v in self._views(key)]

    def subscribed_masters(self, channel: str) -> int:
        base = channel.removesuffix(":released")
        return sum(1 for node in self.nodes
                   if node._state.subscribers.get(base))  # noqa: SLF001 - white-box test

    def take_down(self, index: int) -> None:
        self.nodes[index].down = True

    def bring_back(self, index: int) -> None:
        self.nodes[index].down = False


class RedisBackend(Backend):
    """Single server and Redlock masters: one decoded client per server."""

    def __init__(self, target: StoreTarget, socket_timeout: float = 0.2) -> None:
        self.kind = target.id
        self.target = target
        self.url = target.url
        self.socket_timeout = socket_timeout
        self.n_masters = len(target.servers)
        self._clients: dict[int, redis.Redis] = {}

    def lock(self, name: str, **kwargs: Any) -> Redlock:
        kwargs.setdefault("socket_timeout", self.socket_timeout)
        return Redlock(name, url=self.url, **kwargs)

    def client(self, index: int) -> redis.Redis:
        """A decoded client of master ``index`` (reconnects by itself after a restart)."""
        if index not in self._clients:
            self._clients[index] = self.target.servers[index].client(
                decode_responses=True, socket_timeout=5
            )
        return self._clients[index]

    def _each(self) -> Iterator[redis.Redis]:
        for i in range(self.n_masters):
            yield self.client(i)

    def hashes(self, key: str) -> list[dict[str, str]]:
        return [c.hgetall(key) for c in self._each()]

    def pttls(self, key: str) -> list[int]:
        return [int(c.pttl(key)) for c in self._each()]

    def fences(self, key: str) -> list[int | None]:
        values = [c.get(fence_key_for(key)) for c in self._each()]
        return [None if v is None else int(v) for v in values]

    def subscribed_masters(self, channel: str) -> int:
        counts = [dict(c.pubsub_numsub(channel)).get(channel, 0) for c in self._each()]
        return sum(1 for n in counts if n)

    def take_down(self, index: int) -> None:
        self.target.servers[index].stop()

    def bring_back(self, index: int) -> None:
        self.target.servers[index].heal()

    def close(self) -> None:
        for client in self._clients.values():
            with contextlib.suppress(redis.RedisError):
                client.close()


class ClusterBackend(RedisBackend):
    """A 3-node Redis Cluster: one logical master reached through the cluster client."""

    def __init__(self, target: StoreTarget, socket_timeout: float = 0.2) -> None:
        super().__init__(target, socket_timeout)
        self.n_masters = 1
        assert target.cluster is not None
        self.cluster = target.cluster
        self._cluster_client: Any = None

    @property
    def cluster_client(self) -> Any:
        if self._cluster_client is None:
            self._cluster_client = self.cluster.client(decode_responses=True)
        return self._cluster_client

    def node_client(self, index: int) -> redis.Redis:
        return RedisBackend.client(self, index)

    def hashes(self, key: str) -> list[dict[str, str]]:
        return [self.cluster_client.hgetall(key)]

    def pttls(self, key: str) -> list[int]:
        return [int(self.cluster_client.pttl(key))]

    def fences(self, key: str) -> list[int | None]:
        value = self.cluster_client.get(fence_key_for(key))
        return [None if value is None else int(value)]

    def subscribed_masters(self, channel: str) -> int:
        # Classic pub/sub in a cluster: the subscriber sits on one node, PUBLISH reaches all.
        total = 0
        for i in range(len(self.target.servers)):
            total += dict(self.node_client(i).pubsub_numsub(channel)).get(channel, 0)
        return 1 if total else 0

    def keyslot(self, key: str) -> int:
        return int(self.node_client(0).execute_command("CLUSTER", "KEYSLOT", key))

    def node_holding(self, key: str) -> list[int]:
        """Indexes of the cluster nodes on which ``key`` exists (read node by node)."""
        out = []
        for i in range(len(self.target.servers)):
            try:
                if self.node_client(i).exists(key):
                    out.append(i)
            except redis.ResponseError:  # MOVED: the key's slot is not on this node
                continue
        return out

    def close(self) -> None:
        super().close()
        if self._cluster_client is not None:
            with contextlib.suppress(redis.RedisError):
                self._cluster_client.close()


def make_backend(request: pytest.FixtureRequest, kind: str) -> Backend:
    """Build the :class:`Backend` of ``kind`` (redis kinds: healed and flushed session servers)."""
    if kind.startswith("memory"):
        return MemoryBackend(int(kind[len("memory") :]))
    target: StoreTarget = request.getfixturevalue(f"_store_{kind}")
    target.heal()
    target.flush()
    if kind == "cluster":
        return ClusterBackend(target)
    return RedisBackend(target)
