"""The lock store: one Redis, several independent Redlock masters, or a Redis Cluster.

A :class:`Store` talks to its masters only through :class:`Node` objects that run batches of
named Lua scripts. A batch is *sent* to every master first and the replies are *received*
afterwards, so N masters cost one round trip, concurrently, without a thread per call: the
masters work in parallel while this process waits on the first socket. A hung master costs
one socket timeout, not one per master.

Node kinds:

* :class:`RedisNode`: one Redis server through a redis-py connection pool, scripts sent as
  ``EVALSHA`` with an ``EVAL`` fallback on ``NOSCRIPT`` (a restarted or failed-over Redis has an
  empty script cache). The SHA is computed locally; nothing is cached in a module global tied
  to one client.
* :class:`ClusterNode`: a Redis Cluster through redis-py's ``RedisCluster``; every key of one
  lock shares a hash tag, so each script runs on one node.
* ``MemoryNode`` (in :mod:`celery_singleton_lock.memory`): an in-process stand-in for tests.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import select
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple, Protocol

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._process import current_pid
from .errors import LockBackendError, LockConfigError
from .redlock import MasterReply, RoundOutcome, judge_acquire, judge_owned, quorum, validity_s
from .renewer import get_renewer
from .urls import parse_sentinel_url, parse_store_url, redact_url

__all__ = [
    "Call",
    "PackedArgs",
    "Node",
    "RedisNode",
    "ClusterNode",
    "Store",
    "AcquireResult",
    "AcquireInFlight",
    "Renewal",
    "get_store",
    "SCRIPTS",
    "FENCE_TTL_MS",
]

logger = logging.getLogger("celery_singleton_lock.store")

#: Default lifetime of a fencing counter after its key's last acquisition
#: (``singleton_lock_fence_ttl``). A counter that expired restarts at the server's time in
#: microseconds, so tokens still grow (it would take more than one acquisition per microsecond,
#: on average, to overtake the clock).
FENCE_TTL_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True)
class Script:
    """A Lua script from ``lua/``; the SHA is computed locally, never cached per client."""

    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str) -> Script:
        source = (resources.files(__package__) / "lua" / f"{name}.lua").read_text("utf-8")
        return cls(name, source, hashlib.sha1(source.encode("utf-8")).hexdigest())


SCRIPTS: dict[str, Script] = {
    name: Script.load(name)
    for name in ("acquire", "release", "extend", "restore", "raise_fence", "handover",
                 "beat_claim", "acquire_slot", "follow")
}


class Call(NamedTuple):
    """One command of a batch: a named script (``script``) or a plain command (``command``).

    A named tuple, not a dataclass: a task makes one per lock operation, and this is cheaper.
    """

    script: str | None
    keys: tuple[str, ...] = ()
    args: tuple[Any, ...] = ()
    command: tuple[Any, ...] = ()

    @classmethod
    def run(cls, script: str, keys: Sequence[str], args: Sequence[Any]) -> Call:
        return cls(script, tuple(keys), tuple(args))

    @classmethod
    def plain(cls, *command: Any) -> Call:
        return cls(None, command=command)

    def evalsha(self) -> tuple[Any, ...]:
        assert self.script is not None
        return ("EVALSHA", SCRIPTS[self.script].sha, len(self.keys), *self.keys, *self.args)

    def eval(self) -> tuple[Any, ...]:
        assert self.script is not None
        return ("EVAL", SCRIPTS[self.script].source, len(self.keys), *self.keys, *self.args)

    def packed(self) -> tuple[Any, ...]:
        return self.evalsha() if self.script is not None else self.command


def _pack_args(args: Iterable[Any]) -> bytes:
    """RESP bulk strings of ``args``, without the array header."""
    out: list[bytes] = []
    append = out.append
    for arg in args:
        kind = type(arg)
        if kind is str:
            data = arg.encode()
        elif kind is bytes:
            data = arg
        elif kind is int:
            data = b"%d" % arg
        elif kind is float:
            data = repr(arg).encode()
        else:
            data = str(arg).encode()
        append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


def pack_resp(commands: Sequence[Sequence[Any]]) -> bytes:
    """Encode commands in RESP once, for every master (redis-py would pack per connection)."""
    return b"".join(b"*%d\r\n%b" % (len(args), _pack_args(args)) for args in commands)


class PackedArgs(NamedTuple):
    """Trailing arguments packed once and sent with many commands (an acquire's fixed metadata:
    task name, hostname, pid...), so a task's acquire packs only what changes."""

    flat: tuple[Any, ...]
    packed: bytes

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, Any]]) -> PackedArgs:
        flat = tuple(item for pair in pairs for item in pair)
        return cls(flat, _pack_args(flat))


#: ``EVALSHA <acquire sha> 2``, packed.
_ACQUIRE_HEAD = _pack_args(("EVALSHA", SCRIPTS["acquire"].sha, 2))
#: ``*6 EVAL <release source> 1``, packed: a posted release sends the whole script (no
#: ``NOSCRIPT`` to handle in a reply read later).
_RELEASE_EVAL_HEAD = b"*6\r\n" + _pack_args(("EVAL", SCRIPTS["release"].source, 1))


#: A reply per call, or the exception that stands for it.
Replies = list[Any]


class Pending(Protocol):
    def receive(self) -> Replies: ...


class Subscription(Protocol):
    """A subscription to one channel on one node; ``fileno()`` becomes readable on a message."""

    def fileno(self) -> int: ...
    def drain(self) -> bool: ...  # True if a message arrived since the last drain
    def close(self) -> None: ...


class Node(Protocol):
    """One master: runs a batch of calls in one round trip."""

    #: Printable, password-free name.
    name: str

    def send(self, calls: Sequence[Call], packed: bytes | None = None) -> Pending: ...
    def subscribe(self, channel: str) -> Subscription: ...
    def client(self) -> Any: ...
    def close(self) -> None: ...


class _Done:
    def __init__(self, replies: Replies) -> None:
        self.replies = replies

    def receive(self) -> Replies:
        return self.replies


def _failed(calls: Sequence[Call], exc: BaseException) -> _Done:
    return _Done([exc] * len(calls))


class _Wire:
    """One connection of a :class:`RedisNode`, driven through redis-py's public connection API.

    A batch is packed once for every master and written with ``send_packed_command``; its
    replies are read one by one with ``read_response`` (redis-py's parser: hiredis when it is
    installed, RESP2 or RESP3 as the URL asks), the way redis-py's own pipeline does it. An
    error reply is returned as its exception, not raised. A wire may owe replies to batches sent
    without waiting (:meth:`RedisNode.post`): they are read, and handed to their callbacks,
    before anything else is read from it.
    """

    __slots__ = ("conn", "live", "owed")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        #: True once a batch went out and until a failure or disconnect: the connection is open.
        self.live = False
        #: (number of replies, callback) of batches whose replies are not read yet
        self.owed: list[tuple[int, Callable[[Replies], None]]] = []

    @property
    def connected(self) -> bool:
        return self.live

    def send(self, data: bytes) -> None:
        try:
            if not self.live:
                # connect() first: a Sentinel-managed connection asks a Sentinel for the
                # master's address there, which send_packed_command's own connect skips.
                self.conn.connect()
            self.conn.send_packed_command([data], check_health=False)
        except (RedisError, OSError):
            self.disconnect()
            raise
        self.live = True

    def disconnect(self) -> None:
        self.live = False
        owed, self.owed = self.owed, []
        try:
            self.conn.disconnect()
        finally:
            for n, callback in owed:
                callback([RedisConnectionError("connection closed before the reply")] * n)

    def settle(self) -> None:
        """Read the replies owed to earlier batches (raises on a broken connection)."""
        while self.owed:
            n, callback = self.owed[0]
            replies = [self.read() for _ in range(n)]
            self.owed.pop(0)
            callback(replies)

    def read(self) -> Any:
        """One reply; an error reply is returned as its exception, not raised."""
        if not self.live:
            raise RedisConnectionError("not connected")
        try:
            return self.conn.read_response()
        except ResponseError as exc:
            return exc
        except (RedisError, OSError):
            self.live = False
            raise


class _RedisPending:
    def __init__(
        self, node: RedisNode, conn: _Wire, calls: Sequence[Call], packed: bytes, reused: bool
    ) -> None:
        self.node, self.conn, self.calls = node, conn, calls
        self.packed, self.reused = packed, reused

    def receive(self) -> Replies:
        conn, calls = self.conn, self.calls
        replies: Replies = []
        try:
            try:
                conn.settle()
                first = conn.read()
            except RedisConnectionError as exc:
                # An idle connection whose server restarted or closed it: the server never saw
                # the batch (a timeout is not retried: the server may have run it). Once more.
                if not self.reused or isinstance(exc, RedisTimeoutError):
                    raise
                conn.disconnect()
                conn.send(self.packed)
                first = conn.read()
            replies.append(first)
            for _ in calls[1:]:
                replies.append(conn.read())
            missing = [i for i, r in enumerate(replies)
                       if isinstance(r, NoScriptError) and calls[i].script is not None]
            if missing:  # empty script cache after a restart: send the bodies once
                conn.send(pack_resp([calls[i].eval() for i in missing]))
                for i in missing:
                    replies[i] = conn.read()
        except (RedisError, OSError) as exc:
            conn.disconnect()
            replies.extend([exc] * (len(calls) - len(replies)))
            replies[:] = [exc if isinstance(r, NoScriptError) else r for r in replies]
        finally:
            self.node.put(conn)
        return replies


class _ThreadSubscription:
    """A redis-py PubSub on one channel whose messages wake ``select`` through a pipe.

    A small daemon thread reads the subscription with redis-py's ``get_message`` and writes a
    byte to a pipe per message, so a waiter can ``select`` on several masters at once without
    touching a redis-py socket. The subscription is confirmed by the server before this returns,
    so a release published afterwards is never missed.
    """

    #: How long the reading thread blocks per read; it notices close() within this.
    READ_TIMEOUT_S = 0.1

    def __init__(self, pubsub: Any, channel: str) -> None:
        self.pubsub = pubsub
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self._stopped = threading.Event()
        try:
            pubsub.subscribe(channel)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                msg = pubsub.get_message(timeout=0.05)
                if msg and msg.get("type") == "subscribe":
                    break
        except BaseException:
            self._close_all()
            raise
        threading.Thread(target=self._read, name="celery-singleton-lock-wait",
                         daemon=True).start()

    def _read(self) -> None:
        try:
            while not self._stopped.is_set():
                try:
                    msg = self.pubsub.get_message(timeout=self.READ_TIMEOUT_S)
                except Exception:  # closed under us (a pool disconnect) or broken
                    break  # the waiter still wakes on its own timeout
                if msg is not None and msg.get("type") == "message":
                    try:
                        os.write(self._w, b"x")
                    except OSError:  # pipe full: the waiter is already due to wake
                        pass
        finally:
            self._close_all()

    def _close_all(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self.pubsub.close()
        except (RedisError, OSError):  # closing a broken subscription; nothing to recover
            logger.debug("closing a subscription failed", exc_info=True)

    def fileno(self) -> int:
        if self._stopped.is_set():
            raise OSError("subscription is closed")
        return self._r

    def drain(self) -> bool:
        try:
            return bool(os.read(self._r, 4096))
        except (BlockingIOError, OSError):
            return False

    def close(self) -> None:
        """Stop the reading thread; it closes the pipe and the subscription itself."""
        self._stopped.set()


# Options that keep a connect to a hung server from blocking on a handshake, and speak RESP2.
# No CLIENT SETINFO: ``driver_info=None`` where redis-py has it (it deprecates ``lib_name``).
try:
    import redis.driver_info  # noqa: F401 - redis-py >= 7.1

    _QUIET_CONNECT: dict[str, Any] = {"driver_info": None, "protocol": 2}
except ImportError:
    _QUIET_CONNECT = {"lib_name": None, "lib_version": None, "protocol": 2}


def _sentinel_pool(url: str, socket_timeout: float) -> Any:
    """redis-py's pool of connections to the current master behind Sentinel.

    Its connections ask a Sentinel for the master's address when they connect, and a master
    demoted by a failover (``READONLY``) makes them reconnect, so the store follows failovers.
    """
    from redis.sentinel import Sentinel, SentinelConnectionPool

    target = parse_sentinel_url(url)
    timeouts = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout}
    sentinel_kwargs: dict[str, Any] = dict(timeouts)
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs, **timeouts)
    return SentinelConnectionPool(
        target.master_name, sentinel, db=target.db, username=target.username,
        password=target.password, ssl=target.ssl, **timeouts, **_QUIET_CONNECT,
    )


class RedisNode:
    """One standalone Redis (a single store, one Redlock master, or the master behind
    Sentinel)."""

    def __init__(self, url: str, *, socket_timeout: float) -> None:
        self.url = url
        self.name = redact_url(url)
        try:
            if url.lower().startswith(("redis+sentinel://", "rediss+sentinel://")):
                self.pool = _sentinel_pool(url, socket_timeout)
            else:
                self.pool = redis.ConnectionPool.from_url(
                    url,
                    socket_timeout=socket_timeout,
                    socket_connect_timeout=socket_timeout,
                    **_QUIET_CONNECT,
                )
        except (ValueError, TypeError) as exc:
            raise LockConfigError(
                f"cannot use lock store URL {self.name!r}: {redact_url(str(exc))}",
                setting="singleton_lock_url",
            ) from None
        self._client: redis.Redis | None = None
        # Our own idle connections: redis-py's pool does bookkeeping on every checkout that
        # costs more than the round trip saves at N masters. A connection that failed is
        # disconnected before it comes back, and reconnects on its next use.
        self._new = lambda: _Wire(self.pool.connection_class(**self.pool.connection_kwargs))
        self._idle: list[_Wire] = []
        self._pid = current_pid()

    def get(self) -> _Wire:
        if self._pid != current_pid():  # forked: the parent's sockets are not ours
            self._idle, self._pid = [], current_pid()
        try:
            return self._idle.pop()
        except IndexError:
            return self._new()

    def put(self, conn: _Wire) -> None:
        if self._pid == current_pid():
            self._idle.append(conn)

    def _send(self, conn: _Wire, packed: bytes) -> bool:
        """Write ``packed``; True if it went over a connection that was already open."""
        reused = conn.connected
        try:
            conn.send(packed)
        except RedisConnectionError:
            if not reused:
                raise
            conn.disconnect()  # a stale idle connection: reconnect once
            reused = False
            conn.send(packed)
        return reused

    def send(self, calls: Sequence[Call], packed: bytes | None = None) -> Pending:
        conn = self.get()
        if packed is None:
            packed = pack_resp([c.packed() for c in calls])
        try:
            reused = self._send(conn, packed)
        except (RedisError, OSError) as exc:
            conn.disconnect()
            self.put(conn)
            return _failed(calls, exc)
        return _RedisPending(self, conn, calls, packed, reused)

    def post(self, packed: bytes, n_replies: int, done: Callable[[Replies], None]) -> None:
        """Send a packed batch without waiting: ``done(replies)`` runs when the connection is
        next read (its next batch), or at once if the batch cannot be sent. The batch must not
        need the ``NOSCRIPT`` fallback: send whole scripts (``EVAL``)."""
        conn = self.get()
        try:
            self._send(conn, packed)
        except (RedisError, OSError) as exc:
            conn.disconnect()
            self.put(conn)
            done([exc] * n_replies)
            return
        conn.owed.append((n_replies, done))
        self.put(conn)

    def owes_replies(self) -> bool:
        return any(c.owed for c in list(self._idle))

    def settle(self) -> None:
        """Read every reply owed to posted batches (each connection's are already there or
        on their way)."""
        if self._pid != current_pid():
            return
        for conn in [c for c in self._idle if c.owed]:
            try:
                self._idle.remove(conn)  # check it out: another thread may be using the node
            except ValueError:
                continue  # taken meanwhile: its next batch reads what it owes
            try:
                conn.settle()
            except (RedisError, OSError):
                conn.disconnect()
            finally:
                self.put(conn)

    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis(connection_pool=self.pool)
        return self._client

    def subscribe(self, channel: str) -> Subscription:
        return _ThreadSubscription(self.client().pubsub(ignore_subscribe_messages=False), channel)

    def close(self) -> None:
        self.settle()  # posted releases: read their replies (a failure is retried) first
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.disconnect()
        self.pool.disconnect()

    def __repr__(self) -> str:
        return f"RedisNode({self.name!r})"


class ClusterNode:
    """A Redis Cluster, seen as one master: every key of one lock lives in one slot."""

    def __init__(self, url: str, *, socket_timeout: float) -> None:
        from redis.cluster import RedisCluster

        self.url = url
        self.name = redact_url(url)
        plain = url.replace("+cluster", "", 1)
        self._socket_timeout = socket_timeout
        try:
            self.cluster = RedisCluster.from_url(
                plain,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                **_QUIET_CONNECT,
            )
        except (RedisError, OSError) as exc:
            raise LockBackendError(
                f"cannot reach Redis Cluster {self.name}: {redact_url(str(exc))}"
            ) from None
        except (ValueError, TypeError) as exc:
            raise LockConfigError(
                f"cannot use lock store URL {self.name!r}: {redact_url(str(exc))}",
                setting="singleton_lock_url",
            ) from None

    def send(self, calls: Sequence[Call], packed: bytes | None = None) -> Pending:
        return _ClusterPending(self.cluster, calls)

    def client(self) -> Any:
        return self.cluster

    def subscribe(self, channel: str) -> Subscription:
        # Classic PUBLISH reaches every node of a cluster; any node serves the subscription.
        return _ThreadSubscription(self.cluster.pubsub(), channel)

    def close(self) -> None:
        self.cluster.close()

    def __repr__(self) -> str:
        return f"ClusterNode({self.name!r})"


class _ClusterPending:
    """Cluster batches run on ``receive``: redis-py groups them by node, one round trip each."""

    def __init__(self, cluster: Any, calls: Sequence[Call]) -> None:
        self.cluster, self.calls = cluster, calls

    def receive(self) -> Replies:
        calls = self.calls
        try:
            if len(calls) == 1:
                return [self._one(calls[0])]
            pipe = self.cluster.pipeline(transaction=False)
            for call in calls:
                pipe.execute_command(*call.packed())
            replies: Replies = list(pipe.execute(raise_on_error=False))
        except (RedisError, OSError) as exc:
            return [exc] * len(calls)
        for i, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):
                replies[i] = self._safe(self.cluster.execute_command, *calls[i].eval())
        return replies

    def _one(self, call: Call) -> Any:
        try:
            return self.cluster.execute_command(*call.packed())
        except NoScriptError:
            return self._safe(self.cluster.execute_command, *call.eval())
        except ResponseError as exc:
            return exc

    @staticmethod
    def _safe(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except (RedisError, OSError) as exc:
            return exc


class AcquireResult(NamedTuple):
    """The outcome of :meth:`Store.acquire`."""

    acquired: bool
    fence: int
    #: Seconds the lock is known valid from ``started`` (monotonic).
    validity_s: float
    started: float
    holder: str | None
    holder_pttl_ms: int
    backend_down: bool
    errors: tuple[str, ...]
    #: The key the lock was taken under: the lock's own key, or the slot key a quorum granted
    #: (:meth:`Store.acquire_slot`); "" when not acquired.
    key: str = ""


class Renewal(NamedTuple):
    """One lock to renew with :meth:`Store.extend_many`, and what to restore it with."""

    key: str
    token: str
    ttl_ms: int
    #: The lock's fencing token, raised on a master where the lock is put back.
    fence: int = 0
    #: Hash fields (field, value) written when the lock is put back on a master.
    metadata: tuple[tuple[str, Any], ...] = ()


def _acquire_result(outcome: RoundOutcome, started: float, errors: tuple[str, ...],
                    key: str = "") -> AcquireResult:
    return AcquireResult(
        acquired=outcome.acquired,
        fence=outcome.fence,
        validity_s=outcome.validity_s,
        started=started,
        holder=outcome.holder or None,
        holder_pttl_ms=outcome.holder_pttl_ms,
        backend_down=outcome.backend_down,
        errors=errors,
        key=key,
    )


class AcquireInFlight:
    """An acquire sent to every master whose replies are not read yet (:meth:`finish`)."""

    __slots__ = ("store", "key", "token", "ttl_s", "started", "_pending", "_result")

    def __init__(self, store: Store, key: str, token: str, ttl_s: float, started: float,
                 pending: list[Pending]) -> None:
        self.store, self.key, self.token, self.ttl_s = store, key, token, ttl_s
        self.started = started
        self._pending: list[Pending] | None = pending
        self._result: AcquireResult | None = None

    def finish(self) -> AcquireResult:
        """Read every master's reply and judge the round (once; later calls return it)."""
        if self._result is None:
            pending, self._pending = self._pending, None
            assert pending is not None
            replies = [p.receive()[0] for p in pending]
            self._result = self.store._judge_acquire(self.key, self.token, self.ttl_s,
                                                     self.started, replies)
        return self._result


def _as_int(value: Any) -> int:
    return int(value) if value is not None else 0


def _text(value: Any) -> str:
    """A reply as text (``""`` for nil)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def channel_for(key: str) -> str:
    """The pub/sub channel on which a release of ``key`` is announced to waiters (a slot's
    release is announced on its lock's channel)."""
    return f"{slot_base(key)}:released"


def fence_key_for(key: str) -> str:
    """The fencing counter of ``key``; it shares the key's hash tag, so one cluster slot. The
    slots of one lock share the lock's counter."""
    return f"{slot_base(key)}:fence"


def follow_key_for(key: str) -> str:
    """Where the task id of ``key``'s one follow-up (``coalesce``) is kept (same hash tag)."""
    return f"{key}:next"


_SLOT_SUFFIX = re.compile(r"(?<=\}):slot:\d+$")


def slot_key(key: str, index: int) -> str:
    """Slot ``index`` of a lock that several holders may hold at once (``lock_limit``)."""
    return f"{key}:slot:{index}"


def slot_base(key: str) -> str:
    """The lock a slot key belongs to (``key`` itself when it is not a slot key)."""
    return _SLOT_SUFFIX.sub("", key) if key.endswith(tuple("0123456789")) else key


class _PostedRelease:
    """The replies of one posted release, judged when every master has answered."""

    __slots__ = ("store", "key", "token", "deadline", "on_lost", "waiting", "released",
                 "not_owned", "failed")

    def __init__(self, store: Store, key: str, token: str, deadline: float | None,
                 on_lost: Callable[[], None] | None) -> None:
        self.store, self.key, self.token, self.deadline = store, key, token, deadline
        self.on_lost = on_lost
        self.waiting = len(store.nodes)
        self.released = self.not_owned = 0
        #: Masters whose reply was an error (a connection broken by a restart, say).
        self.failed: list[int] = []

    def answer(self, index: int, replies: Replies) -> None:
        self._count(index, replies[0])
        self.waiting -= 1
        if not self.waiting:
            self._judge()

    def _count(self, index: int, reply: Any) -> None:
        if isinstance(reply, BaseException):
            self.failed.append(index)
        elif _as_int(reply) == 1:
            self.released += 1
        else:
            self.not_owned += 1

    def _judge(self) -> None:
        store = self.store
        if self.failed:
            # Once more at once, on fresh connections: a master restarted empty (whose old
            # connection broke) may hold another's lock now, which decides whether ours was lost.
            failed, self.failed = self.failed, []
            call = Call.run("release", (self.key,), (self.token, ""))
            replies = store.fanout([call], nodes=failed)
            for i in failed:
                self._count(i, replies[i][0])
            if self.failed:
                store._retry_later(self.key, self.token, self.deadline)
        if self.released < store.quorum and self.not_owned:
            logger.info("lock %s was no longer held when its task released it", self.key)
        if self.on_lost is not None and \
                judge_owned(self.released, self.not_owned, len(store.nodes)) is False:
            try:
                self.on_lost()
            except Exception:
                logger.exception("lock-lost callback failed for %s", self.key)


class Store:
    """N masters (N=1 for one Redis or a cluster) and the Redlock rules over them."""

    def __init__(
        self,
        nodes: Sequence[Node],
        *,
        clock: Callable[[], float] = time.monotonic,
        description: str | None = None,
        notify: bool = True,
        fence_ttl_ms: int = FENCE_TTL_MS,
    ) -> None:
        if not nodes:
            raise LockConfigError("a lock store needs at least one master", setting="url")
        self.nodes = list(nodes)
        self.quorum = quorum(len(self.nodes))
        self.clock = clock
        self.description = description or ",".join(n.name for n in self.nodes)
        #: Publish releases so waiters wake at once (disable only to measure the cost).
        self.notify = notify
        #: Lifetime of a fencing counter after its key's last acquisition, ms.
        self.fence_ttl_ms = max(1, int(fence_ttl_ms))
        self._cleanup_lock = threading.Lock()
        #: (key, token, deadline) releases that failed on some master, retried in the background.
        self._cleanup: list[tuple[str, str, float]] = []

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: object, *, socket_timeout: float = 0.2, setting: str = "url",
                 fence_ttl_ms: int = FENCE_TTL_MS) -> Store:
        parsed = parse_store_url(url, setting=setting)
        if parsed.kind == "memory":
            from .memory import memory_store

            return memory_store(parsed.urls[0])
        if parsed.kind == "cluster":
            nodes: list[Node] = [ClusterNode(parsed.urls[0], socket_timeout=socket_timeout)]
        else:
            nodes = [RedisNode(u, socket_timeout=socket_timeout) for u in parsed.urls]
        return cls(nodes, description=parsed.redacted, fence_ttl_ms=fence_ttl_ms)

    @property
    def n_masters(self) -> int:
        return len(self.nodes)

    def __repr__(self) -> str:
        return f"Store({self.description!r}, masters={len(self.nodes)})"

    # -- the round trip -------------------------------------------------------------------

    def fanout(
        self, calls: Sequence[Call], nodes: Iterable[int] | None = None
    ) -> list[Replies]:
        """Send ``calls`` to every master (or the indexes in ``nodes``), then read all replies."""
        packed = pack_resp([c.packed() for c in calls])
        if nodes is None and len(self.nodes) == 1:
            return [self.nodes[0].send(calls, packed).receive()]
        idx = range(len(self.nodes)) if nodes is None else list(nodes)
        pending = [(i, self.nodes[i].send(calls, packed)) for i in idx]
        out: list[Replies] = [[] for _ in self.nodes]
        for i, p in pending:
            out[i] = p.receive()
        return out

    def fanout_each(self, per_node: dict[int, list[Call]]) -> dict[int, Replies]:
        """Send each master its own batch, concurrently; one round trip per master."""
        pending = [(i, self.nodes[i].send(calls)) for i, calls in per_node.items() if calls]
        return {i: p.receive() for i, p in pending}

    # -- lock operations ------------------------------------------------------------------

    def acquire(
        self,
        key: str,
        token: str,
        ttl_s: float,
        metadata: Sequence[tuple[str, Any]] = (),
        fixed: PackedArgs | None = None,
    ) -> AcquireResult:
        """One Redlock round: take ``key`` on a quorum within the validity, or release it all."""
        return self.begin_acquire(key, token, ttl_s, metadata, fixed).finish()

    def acquire_slot(
        self,
        key: str,
        token: str,
        ttl_s: float,
        limit: int,
        metadata: Sequence[tuple[str, Any]] = (),
        fixed: PackedArgs | None = None,
    ) -> AcquireResult:
        """One Redlock round for one of ``limit`` slots of ``key`` (``lock_limit``).

        Each master takes its first free slot in the same round trip as a plain acquire. The
        lock is the slot that most masters granted, if that is a quorum; ``result.key`` names
        it, and renewal and release then treat it as any lock. Grants of other slots (masters
        that saw the holders come and go in another order) are released at once.
        """
        ttl_ms = max(1, int(ttl_s * 1000))
        slots = [slot_key(key, i) for i in range(limit)]
        keys = (fence_key_for(key), *slots)
        args: list[Any] = [token, ttl_ms, self.fence_ttl_ms]
        for field, value in metadata:
            args.extend((field, value))
        # Packed once for every master, the caller's fixed metadata already packed.
        body = _pack_args(("EVALSHA", SCRIPTS["acquire_slot"].sha, len(keys), *keys, *args))
        if fixed is not None:
            args.extend(fixed.flat)
            body += fixed.packed
        calls = [Call("acquire_slot", keys, tuple(args))]
        packed = b"*%d\r\n%b" % (len(args) + len(keys) + 3, body)
        started = self.clock()
        pending = [node.send(calls, packed) for node in self.nodes]
        replies = [p.receive()[0] for p in pending]
        parsed = [self._acquire_reply(r) for r in replies]
        granted = [_as_int(r[2]) if p.acquired else None for r, p in zip(replies, parsed,
                                                                          strict=True)]
        chosen = granted[0]
        if chosen is None or any(g != chosen for g in granted):  # not one slot everywhere
            counts = Counter(g for g in granted if g is not None)
            chosen = min(counts, key=lambda g: (-counts[g], g)) if counts else None
            # A master that granted another slot counts as one where the chosen slot is not
            # ours.
            parsed = [p if g == chosen else MasterReply() if g is not None else p
                      for p, g in zip(parsed, granted, strict=True)]
        outcome = judge_acquire(parsed, ttl_s, self.clock() - started)
        if outcome.acquired and outcome.fences_disagree:
            outcome = self._raise_fences(key, parsed, outcome, ttl_s, started)
        errors: tuple[str, ...] = ()
        if not outcome.acquired or outcome.granted < len(parsed):
            undo: dict[str, list[int]] = {}
            for i, g in enumerate(granted):
                if g is not None and (g != chosen or not outcome.acquired):
                    undo.setdefault(slots[g], []).append(i)
                elif g is None and parsed[i].error is not None and not outcome.acquired:
                    for slot in slots:  # no answer: it may have taken any slot, late
                        undo.setdefault(slot, []).append(i)
            for slot, nodes in undo.items():
                self.release(slot, token, nodes=nodes, deadline=started + ttl_s)
            errors = self._master_errors(parsed)
        key_taken = slots[chosen] if outcome.acquired and chosen is not None else ""
        return _acquire_result(outcome, started, errors, key_taken)

    def begin_acquire(
        self,
        key: str,
        token: str,
        ttl_s: float,
        metadata: Sequence[tuple[str, Any]] = (),
        fixed: PackedArgs | None = None,
    ) -> AcquireInFlight:
        """Send an acquire to every master; :meth:`AcquireInFlight.finish` reads and judges.

        ``metadata`` (field, value pairs) and ``fixed`` (more pairs, packed once by the caller)
        are written into the lock hash.

        Lets the caller do other work while the masters answer (``finish()`` must be called:
        until then each master's connection is taken).
        """
        ttl_ms = max(1, int(ttl_s * 1000))
        args: list[Any] = [token, ttl_ms, self.fence_ttl_ms]
        for field, value in metadata:
            args.extend((field, value))
        keys = (key, fence_key_for(key))
        head = _pack_args((*keys, *args))
        if fixed is not None:
            args.extend(fixed.flat)
            head += fixed.packed
        call = Call("acquire", keys, tuple(args))
        packed = b"*%d\r\n%b%b" % (len(args) + 5, _ACQUIRE_HEAD, head)
        started = self.clock()
        calls = [call]
        pending = [node.send(calls, packed) for node in self.nodes]
        return AcquireInFlight(self, key, token, ttl_s, started, pending)

    def _judge_acquire(
        self, key: str, token: str, ttl_s: float, started: float, replies: list[Any]
    ) -> AcquireResult:
        parsed = [self._acquire_reply(r) for r in replies]
        outcome = judge_acquire(parsed, ttl_s, self.clock() - started)
        if outcome.acquired and outcome.fences_disagree:
            outcome = self._raise_fences(key, parsed, outcome, ttl_s, started)
        errors: tuple[str, ...] = ()
        if outcome.granted < len(parsed):
            errors = self._master_errors(parsed)
        if not outcome.acquired:
            # Undo partial grants; masters that did not answer may have applied it late.
            touched = [i for i, r in enumerate(parsed) if r.acquired or r.error is not None]
            if touched:
                self.release(key, token, nodes=touched, deadline=started + ttl_s)
        return _acquire_result(outcome, started, errors)

    def _master_errors(self, parsed: Sequence[MasterReply]) -> tuple[str, ...]:
        """Why each master that failed did, named and redacted, for a LockBackendError."""
        return tuple(f"{n.name}: {redact_url(str(r.error))}"
                     for n, r in zip(self.nodes, parsed, strict=True) if r.error is not None)

    def _acquire_reply(self, reply: Any) -> MasterReply:
        if isinstance(reply, BaseException):
            return MasterReply(error=reply)
        try:
            if int(reply[0]) == 1:
                return MasterReply(acquired=True, fence=_as_int(reply[1]))
            return MasterReply(holder=_text(reply[1]), holder_pttl_ms=_as_int(reply[2]))
        except (TypeError, ValueError, IndexError) as exc:
            return MasterReply(error=exc)

    def _raise_fences(
        self,
        key: str,
        parsed: list[MasterReply],
        outcome: RoundOutcome,
        ttl_s: float,
        started: float,
    ) -> RoundOutcome:
        """Masters issued different fence values: raise a majority to the token handed out."""
        granted = [i for i, r in enumerate(parsed) if r.acquired]
        call = Call.run("raise_fence", (fence_key_for(key),), (outcome.fence, self.fence_ttl_ms))
        replies = self.fanout([call], nodes=granted)
        raised = sum(1 for i in granted if not isinstance(replies[i][0], BaseException))
        validity = validity_s(ttl_s, self.clock() - started)
        ok = raised >= self.quorum and validity > 0
        return RoundOutcome(
            acquired=ok,
            validity_s=validity,
            fence=outcome.fence,
            fences_disagree=False,
            holder=outcome.holder,
            holder_pttl_ms=outcome.holder_pttl_ms,
            backend_down=outcome.backend_down or raised < self.quorum,
            granted=outcome.granted,
        )

    def release(
        self,
        key: str,
        token: str,
        *,
        nodes: Iterable[int] | None = None,
        deadline: float | None = None,
    ) -> int:
        """Compare-and-delete on every master; returns how many masters deleted our lock.

        Masters that could not be reached are retried in the background (:meth:`retry_cleanup`)
        until ``deadline`` (monotonic), after which the lock has expired there anyway.
        """
        channel = channel_for(key) if self.notify else ""
        call = Call.run("release", (key,), (token, channel))
        idx = list(range(len(self.nodes))) if nodes is None else list(nodes)
        replies = self.fanout([call], nodes=idx)
        released = 0
        failed = False
        for i in idx:
            reply = replies[i][0]
            if isinstance(reply, BaseException):
                failed = True
            elif _as_int(reply) == 1:
                released += 1
        if failed:
            self._retry_later(key, token, deadline)
        return released

    def _retry_later(self, key: str, token: str, deadline: float | None) -> None:
        """Have the background cleanup retry a release that failed somewhere, until
        ``deadline`` (after which the lock has expired there anyway)."""
        if deadline is not None and deadline > self.clock():
            with self._cleanup_lock:
                self._cleanup.append((key, token, deadline))
            get_renewer().watch_cleanup(self)

    def release_later(self, key: str, token: str, *, deadline: float | None = None,
                      on_lost: Callable[[], None] | None = None) -> None:
        """Send the compare-and-delete to every master without waiting for the replies.

        The masters run it as soon as it arrives; the replies are read with the connection's
        next batch, or by the renewal thread within about a second (a task's release costs a
        write, not a round trip). A master that failed is retried in the background until
        ``deadline``, as with :meth:`release`. Nodes that cannot post (a cluster, the memory
        store) release at once. ``on_lost()`` runs once the replies show that the lock was no
        longer ours on enough masters for a quorum (another holder took it meanwhile).
        """
        channel = channel_for(key) if self.notify else ""
        packed = _RELEASE_EVAL_HEAD + _pack_args((key, token, channel))
        posted = _PostedRelease(self, key, token, deadline, on_lost)
        for i, node in enumerate(self.nodes):
            post = getattr(node, "post", None)
            if post is None:
                posted.answer(i, self.fanout([Call.run("release", (key,), (token, channel))],
                                             nodes=[i])[i])
                continue
            post(packed, 1, functools.partial(posted.answer, i))
        if posted.waiting:
            get_renewer().watch_settle(self)

    def owes_replies(self) -> bool:
        """Whether releases posted with :meth:`release_later` wait for their replies."""
        return any(owes() for owes in (getattr(n, "owes_replies", None) for n in self.nodes)
                   if owes is not None)

    def settle(self) -> None:
        """Read the replies of releases sent with :meth:`release_later`."""
        for node in self.nodes:
            settle = getattr(node, "settle", None)
            if settle is not None:
                settle()

    def extend_many(
        self, items: Sequence[Renewal], *, count_renewal: bool = True
    ) -> list[bool | None]:
        """Compare-and-pexpire many locks in one round trip per master.

        Returns, per item, True (a quorum extended it), False (lost: a quorum is impossible)
        or None (errors left it undecided). A lock that a quorum extended is put back on the
        masters where its key was gone and is free (a master restarted without persistence),
        in a second round trip that only such a renewal pays, so masters restarted one at a
        time never leave the holder short of a quorum (SPEC 7).
        """
        if not items:
            return []
        flag = "1" if count_renewal else "0"
        calls = [Call.run("extend", (it.key,), (it.token, it.ttl_ms, flag)) for it in items]
        replies = self.fanout(calls)
        verdicts: list[bool | None] = []
        restore: dict[int, list[Call]] = {}
        for j, item in enumerate(items):
            oks = not_owned = 0
            gone: list[int] = []
            for i, node_replies in enumerate(replies):
                r = node_replies[j]
                if isinstance(r, BaseException):
                    continue
                answer = _as_int(r)
                if answer == 1:
                    oks += 1
                else:
                    not_owned += 1
                    if answer == -1:
                        gone.append(i)
            verdict = judge_owned(oks, not_owned, len(self.nodes))
            verdicts.append(verdict)
            if verdict is True and gone:
                call = self._restore_call(item)
                for i in gone:
                    restore.setdefault(i, []).append(call)
        if restore:
            self._restore(restore)
        return verdicts

    def _restore_call(self, item: Renewal) -> Call:
        args: list[Any] = [item.token, item.ttl_ms, item.fence, self.fence_ttl_ms]
        for field, value in item.metadata:
            args.extend((field, value))
        return Call.run("restore", (item.key, fence_key_for(item.key)), args)

    def _restore(self, per_node: dict[int, list[Call]]) -> None:
        """Put locks back on the masters that lost them; failures wait for the next renewal."""
        for i, node_replies in self.fanout_each(per_node).items():
            for call, reply in zip(per_node[i], node_replies, strict=True):
                if isinstance(reply, BaseException):
                    logger.info("cannot put lock %s back on %s: %s", call.keys[0],
                                self.nodes[i].name, redact_url(str(reply)))
                elif _as_int(reply) == 1:
                    logger.info("put lock %s back on %s, which had lost it", call.keys[0],
                                self.nodes[i].name)

    def handover(
        self,
        key: str,
        token: str,
        new_token: str,
        ttl_s: float,
        metadata: Sequence[tuple[str, Any]] = (),
    ) -> int | None:
        """Give a held lock to ``new_token`` atomically on a quorum (never released between).

        Returns the lock's fencing token when a quorum handed it over, else None.
        """
        args: list[Any] = [token, new_token, max(1, int(ttl_s * 1000))]
        for field, value in metadata:
            args.extend((field, value))
        replies = self.fanout([Call.run("handover", (key, fence_key_for(key)), args)])
        fences = [_as_int(r[0][1]) for r in replies
                  if not isinstance(r[0], BaseException) and _as_int(r[0][0]) == 1]
        return max(fences) if len(fences) >= self.quorum else None

    def owned(self, key: str, token: str) -> bool:
        """True when a quorum of masters hold ``key`` with ``token``."""
        replies = self.fanout([Call.plain("HGET", key, "token")])
        oks = sum(1 for r in replies if not isinstance(r[0], BaseException) and r[0] is not None
                  and _text(r[0]) == token)
        return oks >= self.quorum

    def ping(self) -> tuple[int, list[str]]:
        """Ask every master to answer once: (how many answered, why the others did not)."""
        replies = self.fanout([Call.plain("PING")])
        errors = [f"{n.name}: {redact_url(str(r[0]))}"
                  for n, r in zip(self.nodes, replies, strict=True)
                  if isinstance(r[0], BaseException)]
        return len(self.nodes) - len(errors), errors

    def no_quorum(self, errors: Sequence[str] = ()) -> str:
        """Why an operation failed for want of a quorum, for a :class:`LockBackendError`."""
        if self.n_masters == 1:
            why = "the lock store did not answer"
        else:
            why = f"fewer than {self.quorum} of {self.n_masters} masters answered"
        return f"{why} ({'; '.join(errors)})" if errors else why

    def holder(self, key: str) -> str | None:
        """The owner id of the lock at ``key`` if a quorum holds it ("" for no owner), else None.

        Raises :class:`LockBackendError` when too few masters answer.
        """
        replies = self.fanout([Call.plain("HMGET", key, "token", "owner")])
        answered = [r[0] for r in replies if not isinstance(r[0], BaseException)]
        if len(answered) < self.quorum:
            raise LockBackendError(f"cannot read lock {key!r}: {self.no_quorum()}", lock_key=key)
        owners = Counter(_text(r[1] or b"") for r in answered if r and r[0] is not None)
        if not owners:
            return None
        owner, count = owners.most_common(1)[0]
        return owner if count >= self.quorum else None

    def retry_cleanup(self) -> int:
        """Retry releases that failed on some master; returns how many are still pending."""
        with self._cleanup_lock:
            pending, self._cleanup = self._cleanup, []
        if not pending:
            return 0
        now = self.clock()
        keep: list[tuple[str, str, float]] = []
        for key, token, deadline in pending:
            if deadline <= now:
                continue
            call = Call.run("release", (key,), (token, ""))
            replies = self.fanout([call])
            if any(isinstance(r[0], BaseException) for r in replies):
                keep.append((key, token, deadline))
        with self._cleanup_lock:
            self._cleanup.extend(keep)
            return len(self._cleanup)

    def follow(self, key: str, task_id: str, ttl_s: float) -> str | None:
        """Make ``task_id`` the one follow-up of the held lock ``key`` on a quorum (``coalesce``)
        for ``ttl_s``, or refresh it. Returns None if it is, else the task id of the follow-up
        that already waits. Raises :class:`LockBackendError` when too few masters answer.
        """
        call = Call.run("follow", (key, follow_key_for(key)),
                        (task_id, "take", max(1, int(ttl_s * 1000))))
        answered = [r[0] for r in self.fanout([call]) if not isinstance(r[0], BaseException)]
        if len(answered) < self.quorum:
            raise LockBackendError(f"cannot queue a follow-up of {key!r}: {self.no_quorum()}",
                                   lock_key=key)
        if sum(1 for r in answered if _as_int(r[0]) == 1) >= self.quorum:
            return None
        waiting = Counter(_text(r[1]) for r in answered if _as_int(r[0]) != 1)
        self.unfollow(key, task_id)
        return waiting.most_common(1)[0][0]

    def unfollow(self, key: str, task_id: str) -> None:
        """``task_id`` is no longer ``key``'s follow-up (it holds the lock now, or lost)."""
        self.fanout([Call.run("follow", (key, follow_key_for(key)), (task_id, "drop", 0))])

    def wait_released(self, key: str, timeout_s: float, tried: Callable[[], bool]) -> bool:
        """Call ``tried()`` until it returns True, sleeping on release notifications between.

        Subscribes to the key's release channel on every master *before* each attempt, so a
        release between an attempt and the wait still wakes it. Returns False on timeout.
        """
        deadline = self.clock() + timeout_s
        subs: list[Subscription] = []
        try:
            for node in self.nodes:
                try:
                    subs.append(node.subscribe(channel_for(key)))
                except (RedisError, OSError):
                    logger.debug("cannot subscribe on %s", node.name, exc_info=True)
            while True:
                for s in subs:
                    s.drain()
                if tried():
                    return True
                remaining = deadline - self.clock()
                if remaining <= 0:
                    return False
                # Wake on a release, or at the latest after 1 s to notice an expired lock
                # (expiry publishes nothing).
                wait = min(remaining, 1.0)
                fds = []
                for s in subs:
                    try:
                        fds.append(s.fileno())
                    except OSError:
                        continue
                if fds:
                    select.select(fds, [], [], wait)
                else:
                    time.sleep(wait)
        finally:
            for s in subs:
                s.close()

    def close(self) -> None:
        for node in self.nodes:
            node.close()


_stores: dict[tuple[Any, ...], Store] = {}
_stores_lock = threading.Lock()
_stores_pid = os.getpid()


def get_store(url: object, *, socket_timeout: float = 0.2, setting: str = "url",
              fence_ttl_s: float = FENCE_TTL_MS / 1000.0) -> Store:
    """A process-wide :class:`Store` for ``url`` (connection pools are shared, per process)."""
    global _stores_pid
    parsed = parse_store_url(url, setting=setting)
    fence_ttl_ms = max(1, int(fence_ttl_s * 1000))
    cache_key = (parsed, socket_timeout, fence_ttl_ms)
    with _stores_lock:
        if _stores_pid != os.getpid():  # forked: the parent's sockets are not ours
            _stores.clear()
            _stores_pid = os.getpid()
        store = _stores.get(cache_key)
        if store is None:
            store = Store.from_url(parsed, socket_timeout=socket_timeout, setting=setting,
                                   fence_ttl_ms=fence_ttl_ms)
            _stores[cache_key] = store
        return store

