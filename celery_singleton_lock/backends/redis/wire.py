"""The Redis wire: Lua scripts, RESP packing, and the connections of one Redis or a cluster.

A batch is packed once (RESP, with :func:`pack_resp`), written with redis-py's public
``send_packed_command`` and read back reply by reply with ``read_response`` (redis-py's parser:
hiredis when it is installed; RESP2 or RESP3 as the URL asks), the way redis-py's own pipeline
does it. Node kinds:

* :class:`RedisNode`: one Redis server (or the master behind Sentinel) through a redis-py
  connection pool, scripts sent as ``EVALSHA`` with an ``EVAL`` fallback on ``NOSCRIPT`` (a
  restarted or failed-over Redis has an empty script cache). The SHA is computed locally;
  nothing is cached in a module global tied to one client.
* :class:`ClusterNode`: a Redis Cluster through redis-py's ``RedisCluster``; every key of one
  lock shares a hash tag, so each script runs on one node.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple, Protocol

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..._process import current_pid
from ...errors import LockBackendError, LockConfigError
from ...urls import parse_sentinel_url, redact_url

logger = logging.getLogger("celery_singleton_lock.backends.redis")


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
    def fileno(self) -> int: ...
    def drain(self) -> bool: ...  # True if a message arrived since the last drain
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
    __slots__ = ("node", "conn", "calls", "packed", "reused", "convert")

    def __init__(
        self, node: RedisNode, conn: _Wire, calls: Sequence[Call], packed: bytes, reused: bool,
        convert: Callable[[Replies], Any] | None = None,
    ) -> None:
        self.node, self.conn, self.calls = node, conn, calls
        self.packed, self.reused = packed, reused
        #: Turns the replies into what ``receive`` returns (None: the replies themselves).
        self.convert = convert

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
        return replies if self.convert is None else self.convert(replies)


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

    def send(self, calls: Sequence[Call], packed: bytes | None = None,
             convert: Callable[[Replies], Any] | None = None) -> Pending:
        """Write the batch now; its ``receive()`` reads the replies (``convert``-ed)."""
        conn = self.get()
        if packed is None:
            packed = pack_resp([c.packed() for c in calls])
        try:
            reused = self._send(conn, packed)
        except (RedisError, OSError) as exc:
            conn.disconnect()
            self.put(conn)
            failed = [exc] * len(calls)
            return _Done(failed if convert is None else convert(failed))
        return _RedisPending(self, conn, calls, packed, reused, convert)

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
        self.url = url
        self.name = redact_url(url)
        self._socket_timeout = socket_timeout
        self._lock = threading.Lock()
        self._cluster: Any = None
        self._open()  # a bad URL or an unreachable cluster fails here, at once

    def _open(self) -> Any:
        """redis-py's cluster client, made again after :meth:`close` on next use."""
        from redis.cluster import RedisCluster

        with self._lock:
            if self._cluster is not None:
                return self._cluster
            try:
                self._cluster = RedisCluster.from_url(
                    self.url.replace("+cluster", "", 1),
                    socket_timeout=self._socket_timeout,
                    socket_connect_timeout=self._socket_timeout,
                    **_QUIET_CONNECT,
                )
            except (RedisError, RedisClusterException, OSError) as exc:
                raise LockBackendError(
                    f"cannot reach Redis Cluster {self.name}: {redact_url(str(exc))}"
                ) from None
            except (ValueError, TypeError) as exc:
                raise LockConfigError(
                    f"cannot use lock store URL {self.name!r}: {redact_url(str(exc))}",
                    setting="singleton_lock_url",
                ) from None
            return self._cluster

    @property
    def cluster(self) -> Any:
        return self._cluster if self._cluster is not None else self._open()

    def send(self, calls: Sequence[Call], packed: bytes | None = None) -> Pending:
        try:
            cluster = self.cluster
        except LockBackendError as exc:
            return _failed(calls, exc)
        return _ClusterPending(cluster, calls)

    def client(self) -> Any:
        return self.cluster

    def subscribe(self, channel: str) -> Subscription:
        # Classic PUBLISH reaches every node of a cluster; any node serves the subscription.
        return _ThreadSubscription(self.cluster.pubsub(), channel)

    def close(self) -> None:
        with self._lock:
            cluster, self._cluster = self._cluster, None
        if cluster is not None:
            cluster.close()

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
        except (RedisError, RedisClusterException, OSError) as exc:
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
        except (RedisError, RedisClusterException, OSError) as exc:
            return exc



def _as_int(value: Any) -> int:
    return int(value) if value is not None else 0


def _text(value: Any) -> str:
    """A reply as text (``""`` for nil)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)




