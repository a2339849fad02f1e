"""Redis as a quorum member: each typed operation is one Lua script (or plain command).

:class:`RedisMember` is one Redis server (``redis://``, ``rediss://``, ``unix://``), or the
current master behind Sentinel (:class:`SentinelMember`, ``redis+sentinel://``).
:class:`ClusterMember` is a whole Redis Cluster (``redis+cluster://``), seen as one member:
every key of one lock shares a hash tag, so each script runs on one node.

A lock is a hash (``token``, ``owner``, ``task``, ``hostname``, ``pid``, ``mode``,
``acquired_at``, ``ttl``, ``renewals``) whose ``PTTL`` is the time it has left; beside it
``<key>:fence`` is its fencing counter and ``<key>:next`` its follow-up. Releases are published
on ``<key>:released`` so waiters wake at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import RedisError

from ...errors import LockBackendError, LockConfigError
from ...keys import channel_for, fence_key_for, follow_key_for, slot_key
from ...urls import check_redis_url, parse_sentinel_url, redact_url
from ..base import (
    Acquire,
    AcquireSlot,
    Capability,
    ClaimRun,
    Extend,
    Follow,
    ForceRelease,
    Grant,
    Handover,
    LockView,
    Op,
    Ping,
    QuorumMember,
    RaiseFence,
    Read,
    ReadRuns,
    Release,
    Restore,
    Subscription,
)
from .wire import (
    SCRIPTS,
    Call,
    ClusterNode,
    RedisNode,
    _as_int,
    _pack_args,
    _text,
    pack_resp,
)

__all__ = ["RedisMember", "SentinelMember", "ClusterMember"]

#: Keys asked for per ``SCAN`` call.
SCAN_COUNT = 1000

_ACQUIRE_HEAD = _pack_args(("EVALSHA", SCRIPTS["acquire"].sha, 2))
#: ``*6 EVAL <release source> 1``, packed: a posted release sends the whole script (no
#: ``NOSCRIPT`` to handle in a reply read later).
_RELEASE_EVAL_HEAD = b"*6\r\n" + _pack_args(("EVAL", SCRIPTS["release"].source, 1))

_CAPABILITIES = frozenset({
    Capability.QUORUM_MEMBER, Capability.TTL, Capability.NOTIFY, Capability.ADOPTABLE,
    Capability.LIMIT, Capability.FOLLOW, Capability.HANDOVER, Capability.BEAT, Capability.LIST,
})


def _flat(pairs: Sequence[tuple[str, Any]]) -> list[Any]:
    return [item for pair in pairs for item in pair]


def _fixed_resp(fixed: Any) -> tuple[list[Any], bytes]:
    """``fixed``'s pairs flattened, and packed as RESP: made once per FixedMetadata."""
    cached = fixed.cache.get("resp")
    if cached is None:
        flat = _flat(fixed.pairs)
        cached = fixed.cache["resp"] = (flat, _pack_args(flat))
    return cached


# -- operation -> calls --------------------------------------------------------------------


def _calls(op: Op) -> list[Call]:
    """The Redis calls that run ``op`` (one, except :class:`Read`)."""
    kind = type(op)
    if kind is Acquire:
        args = [op.token, op.ttl_ms, op.fence_ttl_ms, *_flat(op.metadata)]
        if op.fixed is not None:
            args.extend(_flat(op.fixed.pairs))
        return [Call("acquire", (op.key, fence_key_for(op.key)), tuple(args))]
    if kind is Release:
        return [Call.run("release", (op.key,),
                         (op.token, channel_for(op.key) if op.notify else ""))]
    if kind is Extend:
        return [Call.run("extend", (op.key,), (op.token, op.ttl_ms, "1" if op.count else "0"))]
    if kind is AcquireSlot:
        keys = (fence_key_for(op.key), *(slot_key(op.key, i) for i in range(op.limit)))
        args = [op.token, op.ttl_ms, op.fence_ttl_ms, *_flat(op.metadata)]
        if op.fixed is not None:
            args.extend(_flat(op.fixed.pairs))
        return [Call("acquire_slot", keys, tuple(args))]
    if kind is Read:
        return [Call.plain("HGETALL", op.key), Call.plain("PTTL", op.key),
                Call.plain("GET", fence_key_for(op.key))]
    if kind is Restore:
        return [Call.run("restore", (op.key, fence_key_for(op.key)),
                         (op.token, op.ttl_ms, op.fence, op.fence_ttl_ms, *_flat(op.metadata)))]
    if kind is RaiseFence:
        return [Call.run("raise_fence", (fence_key_for(op.key),), (op.fence, op.fence_ttl_ms))]
    if kind is Handover:
        return [Call.run("handover", (op.key, fence_key_for(op.key)),
                         (op.token, op.new_token, op.ttl_ms, *_flat(op.metadata)))]
    if kind is Follow:
        return [Call.run("follow", (op.key, follow_key_for(op.key)),
                         (op.task_id, "take" if op.take else "drop", op.ttl_ms))]
    if kind is ClaimRun:
        return [Call.run("beat_claim", (op.lock_key, op.state_key),
                         (op.token, op.entry, f"{op.previous:.6f}", f"{op.now:.6f}"))]
    if kind is ReadRuns:
        return [Call.plain("HGETALL", op.state_key)]
    if kind is ForceRelease:
        if op.token:
            return [Call.run("release", (op.key,), (op.token, channel_for(op.key)))]
        return [Call.plain("DEL", op.key)]
    if kind is Ping:
        return [Call.plain("PING")]
    raise TypeError(f"not a lock-store operation: {op!r}")


def _acquire_batch(op: Acquire) -> tuple[list[Call], bytes]:
    """An acquire's call, and the acquire packed, its fixed metadata already packed by an
    earlier acquire."""
    keys = (op.key, fence_key_for(op.key))
    args = [op.token, op.ttl_ms, op.fence_ttl_ms]
    for pair in op.metadata:
        args.extend(pair)
    head = _pack_args((*keys, *args))
    n = len(args) + 5
    if op.fixed is not None:
        flat, packed = _fixed_resp(op.fixed)
        head += packed
        n += len(flat)
        args.extend(flat)
    return [Call("acquire", keys, tuple(args))], b"*%d\r\n%b%b" % (n, _ACQUIRE_HEAD, head)


# -- replies -> results --------------------------------------------------------------------


def _grant(reply: Any) -> Grant:
    if int(reply[0]) == 1:
        slot = _as_int(reply[2]) if len(reply) > 2 else -1
        return Grant(True, fence=_as_int(reply[1]), slot=slot)
    return Grant(False, holder=_text(reply[1]), holder_pttl_ms=_as_int(reply[2]))


def _pairs(raw: Any) -> dict[str, str]:
    if not raw:
        return {}
    if isinstance(raw, dict):
        return {_text(k): _text(v) for k, v in raw.items()}
    return {_text(k): _text(v) for k, v in zip(raw[::2], raw[1::2], strict=True)}


def _view(name: str, raw: Any, pttl: Any, fence: Any) -> LockView:
    fields = _pairs(raw)
    token = fields.pop("token", "")
    ttl_ms = int(pttl) if pttl is not None else -2
    counter = _text(fence)
    return LockView(name, held=bool(token) and ttl_ms != -2, token=token,
                    ttl_s=None if ttl_ms < 0 else ttl_ms / 1000.0, fields=fields,
                    fence=int(counter) if counter.isdigit() else None)


def _result(op: Op, name: str, replies: list[Any]) -> Any:
    """The typed result of ``op`` from its calls' replies (an exception stands for a failure)."""
    for reply in replies:
        if isinstance(reply, BaseException):
            return reply
    reply = replies[0]
    try:
        kind = type(op)
        if kind is Acquire or kind is AcquireSlot:
            return _grant(reply)
        if kind is Release or kind is Restore:
            return _as_int(reply) == 1
        if kind is Extend or kind is ClaimRun:
            return _as_int(reply)
        if kind is Read:
            return _view(name, reply, replies[1], replies[2])
        if kind is Handover:
            return _as_int(reply[1]) if _as_int(reply[0]) == 1 else None
        if kind is Follow:
            return _as_int(reply[0]) == 1, _text(reply[1])
        if kind is ReadRuns:
            return {k: float(v) for k, v in _pairs(reply).items()}
        if kind is ForceRelease:
            return _as_int(reply) >= 1
        return True  # RaiseFence, Ping
    except (TypeError, ValueError, IndexError) as exc:
        return exc


def _one_grant(reply: Any) -> Any:
    if isinstance(reply, BaseException):
        return reply
    try:
        if reply[0] == 1:  # an int from either parser
            return Grant(True, fence=int(reply[1]), slot=int(reply[2]) if len(reply) > 2 else -1)
        return Grant(False, holder=_text(reply[1]), holder_pttl_ms=_as_int(reply[2]))
    except (TypeError, ValueError, IndexError) as exc:
        return exc


def _one_flag(reply: Any) -> Any:
    return reply if isinstance(reply, BaseException) else reply == 1


def _one_int(reply: Any) -> Any:
    return reply if isinstance(reply, BaseException) or type(reply) is int else _as_int(reply)


#: The result of a one-call operation from its reply, for the operations of the hot path.
_ONE: dict[type, Callable[[Any], Any]] = {
    Acquire: _one_grant, AcquireSlot: _one_grant, Release: _one_flag, Extend: _one_int,
}


class _Results:
    """A batch's replies, turned into one result per operation on ``receive()``."""

    __slots__ = ("member", "ops", "sizes", "pending")

    def __init__(self, member: Any, ops: Sequence[Op], sizes: list[int], pending: Any) -> None:
        self.member, self.ops, self.sizes, self.pending = member, ops, sizes, pending

    def receive(self) -> list[Any]:
        replies = self.pending.receive()
        ops = self.ops
        name = self.member.name
        out: list[Any] = []
        i = 0
        for op, n in zip(ops, self.sizes, strict=True):
            out.append(_result(op, name, replies[i:i + n]))
            i += n
        return out


#: The last batch prepared, by identity: a quorum sends one batch object to every member, so
#: its calls are made and packed once for all of them (``(ops, calls, sizes, packed,
#: convert)``).
_last_batch: tuple[Any, list[Call], list[int], bytes, Any] = (None, [], [], b"", None)
#: The same for the last batch of releases posted (``(ops, packed)``).
_last_post: tuple[Any, bytes] = (None, b"")


def _single(one: Callable[[Any], Any]) -> Callable[[list[Any]], list[Any]]:
    return lambda replies: [one(replies[0])]


#: The converters of one-operation batches, made once.
_SINGLE = {kind: _single(one) for kind, one in _ONE.items()}


def _converter(ops: Sequence[Op]) -> Callable[[list[Any]], list[Any]] | None:
    """Replies -> results for a batch of one kind of one-call operation (the hot path), which
    needs nothing of the member; None for any other batch."""
    kind = type(ops[0])
    if len(ops) == 1:
        return _SINGLE.get(kind)
    one = _ONE.get(kind)
    if one is None or any(type(op) is not kind for op in ops):
        return None
    return lambda replies: [one(r) for r in replies]


def _prepared(ops: Sequence[Op]) -> tuple[list[Call], list[int], bytes, Any]:
    """The calls of ``ops``, how many each op has, the batch packed as RESP, and its
    converter (:func:`_converter`)."""
    global _last_batch
    last = _last_batch
    if last[0] is ops:
        return last[1], last[2], last[3], last[4]
    if len(ops) == 1:
        op = ops[0]
        if type(op) is Acquire:
            calls, packed = _acquire_batch(op)
        else:
            calls = _calls(op)
            packed = pack_resp([c.packed() for c in calls])
        sizes = [len(calls)]
    else:
        calls = []
        sizes = []
        for op in ops:
            c = _calls(op)
            calls.extend(c)
            sizes.append(len(c))
        packed = pack_resp([c.packed() for c in calls])
    convert = _converter(ops) if len(calls) == len(ops) else None
    _last_batch = (ops, calls, sizes, packed, convert)
    return calls, sizes, packed, convert


class RedisMember(QuorumMember):
    """One Redis server (or the master behind Sentinel)."""

    capabilities = _CAPABILITIES

    def __init__(self, node: RedisNode) -> None:
        self.node = node
        self.name = node.name

    @classmethod
    def from_url(cls, url: str, *, socket_timeout: float, setting: str) -> RedisMember:
        check_redis_url(url, setting)
        return cls(RedisNode(url, socket_timeout=socket_timeout))

    @classmethod
    def check_urls(cls, urls: Sequence[str], setting: str) -> None:
        for url in urls:
            check_redis_url(url, setting)

    def submit(self, ops: Sequence[Op]) -> Any:
        calls, sizes, packed, convert = _prepared(ops)
        if convert is not None:
            return self.node.send(calls, packed, convert)
        return _Results(self, ops, sizes, self.node.send(calls, packed))

    @classmethod
    def submit_all(cls, members: Sequence[QuorumMember], ops: Sequence[Op]) -> list[Any]:
        """The batch made and packed once, then written to every member's server."""
        calls, sizes, packed, convert = _prepared(ops)
        if convert is not None:
            return [m.node.send(calls, packed, convert)  # type: ignore[attr-defined]
                    for m in members]
        return [_Results(m, ops, sizes, m.node.send(calls, packed))  # type: ignore[attr-defined]
                for m in members]

    def post(self, ops: Sequence[Op], done: Callable[[list[Any]], None]) -> None:
        """Releases are posted as whole scripts (``EVAL``) and read with the connection's next
        batch; anything else runs at once."""
        if not all(type(op) is Release for op in ops):
            done(self.run(ops))
            return
        global _last_post
        last, packed = _last_post
        if last is not ops:
            packed = b"".join(
                _RELEASE_EVAL_HEAD + _pack_args(
                    (op.key, op.token, channel_for(op.key) if op.notify else ""))
                for op in ops)
            _last_post = (ops, packed)

        def answered(replies: list[Any]) -> None:
            done([r if isinstance(r, BaseException) else _as_int(r) == 1 for r in replies])

        self.node.post(packed, len(ops), answered)

    def owes_replies(self) -> bool:
        return self.node.owes_replies()

    def settle(self) -> None:
        self.node.settle()

    def subscribe(self, key: str) -> Subscription:
        return self.node.subscribe(channel_for(key))

    def client(self) -> Any:
        """A redis-py client of this server (for operators' tools and tests)."""
        return self.node.client()

    def _scan_clients(self) -> list[tuple[str, Any]]:
        return [(self.name, self.node.client())]

    def scan(self, prefix: str, pattern: str | None, limit: int | None) -> list[str]:
        """Lock hashes matching ``pattern`` (``SCAN ... TYPE hash``, paged; never ``KEYS``)."""
        from ...inventory import key_pattern

        match = pattern or key_pattern(prefix)
        found: list[str] = []
        for where, client in self._scan_clients():
            cursor = 0
            try:
                while True:
                    cursor, keys = client.scan(cursor=cursor, match=match, count=SCAN_COUNT,
                                               _type="hash")
                    for key in keys:
                        found.append(_text(key))
                        if limit is not None and len(found) >= limit:
                            return found
                    if int(cursor) == 0:
                        break
            except (RedisError, OSError) as exc:
                raise LockBackendError(
                    f"cannot read locks from {where}: {redact_url(str(exc))}") from None
        return found

    def close(self) -> None:
        self.node.close()


class SentinelMember(RedisMember):
    """The current master behind Sentinel, found again after a failover."""

    #: The commas of ``redis+sentinel://h1:26379,h2:26379/name`` separate Sentinels.
    comma_separates_urls = False

    @classmethod
    def from_url(cls, url: str, *, socket_timeout: float, setting: str) -> SentinelMember:
        parse_sentinel_url(url, setting)
        return cls(RedisNode(url, socket_timeout=socket_timeout))

    @classmethod
    def check_urls(cls, urls: Sequence[str], setting: str) -> None:
        if len(urls) > 1:
            raise LockConfigError(
                f"{setting}: give one redis+sentinel:// URL (its commas list the Sentinels); "
                "a list of Sentinel URLs is not a Redlock", setting=setting)
        parse_sentinel_url(urls[0], setting)


class ClusterMember(QuorumMember):
    """A Redis Cluster, seen as one member."""

    capabilities = _CAPABILITIES

    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        self.name = node.name
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, *, socket_timeout: float, setting: str) -> ClusterMember:
        check_redis_url(url, setting, cluster=True)
        return cls(ClusterNode(url, socket_timeout=socket_timeout))

    @classmethod
    def check_urls(cls, urls: Sequence[str], setting: str) -> None:
        if len(urls) > 1:
            raise LockConfigError(
                f"{setting}: give one redis+cluster:// URL; a cluster is one lock store, "
                "not a Redlock master", setting=setting)
        check_redis_url(urls[0], setting, cluster=True)

    def submit(self, ops: Sequence[Op]) -> _Results:
        calls, sizes, _, _ = _prepared(ops)
        return _Results(self, ops, sizes, self.node.send(calls))

    def subscribe(self, key: str) -> Subscription:
        return self.node.subscribe(channel_for(key))

    def client(self) -> Any:
        return self.node.client()

    def _scan_clients(self) -> list[tuple[str, Any]]:
        cluster = self.node.client()
        try:
            primaries = cluster.get_primaries()
        except (RedisError, OSError) as exc:
            raise LockBackendError(
                f"cannot read locks from {self.name}: {redact_url(str(exc))}") from None
        return [(f"{self.name} ({p.name})", cluster.get_redis_connection(p)) for p in primaries]

    scan = RedisMember.scan

    def close(self) -> None:
        self.node.close()

