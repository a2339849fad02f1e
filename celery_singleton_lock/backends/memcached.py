"""memcached as a quorum member (``memcached://host:11211``, pymemcache, extra ``[memcached]``).

memcached runs no scripts, so each typed operation is a few plain commands whose
check-then-act steps are made safe by ``cas`` (compare-and-swap on the item's version):

* a lock is one item, ``add``-ed with its ttl: ``add`` stores only where the key is free, so
  two acquirers never both succeed. Its value is JSON: the token (``t``), the expiry the
  holder asked for (``e``, unix ms) and the holder's metadata (``f``).
* renewal and release read the item with ``gets``, compare the token, and write with ``cas``
  on the version read: a renewal writes the same value with a new expiry, a release writes
  it with a negative expiry (memcached drops an item stored with one at once), so a
  compare-and-delete. A holder whose lock expired and was taken by another never extends or
  deletes its successor's: the successor's item has another token, and another version.
  (``touch`` is never used on a lock: it checks no owner.)
* the fencing token is an ``incr`` counter beside the key; a missing counter starts at the
  server's time in microseconds (:func:`_start_value`), ``add``-ed so two creators agree.
  Every acquisition gives it ``fence_ttl_ms`` more to live (``touch``).

memcached counts expiry in whole seconds on a clock that ticks once a second, so a lock is
stored for ``ceil(ttl) + 1`` seconds: it never lapses before its ttl, and lapses at most two
seconds after it. memcached gives no remaining ttl either: :class:`~.base.Read` computes it
from the expiry written in the value (the writer's clock), so ``celery locks`` shows it.

memcached has no notifications (:meth:`MemcachedMember.subscribe` returns None: waiters
poll) and no portable way to list keys: :meth:`MemcachedMember.scan` reads
``lru_crawler metadump`` where the server has the LRU crawler (memcached >= 1.4.31, on by
default since 1.5), over a socket of its own.

memcached has no pipelining in pymemcache and no scripts, so a batch is several round trips;
the members of a quorum run theirs on a small pool of threads at once (:class:`_Batch`).

memcached may evict any item under memory pressure, a held lock too: the holder's next
renewal finds it gone and the lock is reported lost (``lock_on_lost``).

Key names: a lock key is stored as is when it is printable ASCII without ``%`` (every task
key is); other bytes, and ``%``, are written ``%XX``. The counter, the follow-up and beat's
run times live at the stored name plus ``%:fence``, ``%:next`` and ``%:runs``, names no
encoded lock key can have, so listing tells them apart without reading values.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import LockBackendError, LockConfigError
from ..keys import glob_regex, slot_base
from ..urls import redact_url
from .base import (
    EXTENDED,
    GONE,
    NOT_OWNED,
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
)

__all__ = ["MemcachedMember", "DEFAULT_PORT"]

#: memcached's port when the URL names none.
DEFAULT_PORT = 11211
#: Longest key memcached stores, in bytes.
MAX_KEY_BYTES = 250
#: An expiry above this many seconds is read by memcached as a unix time.
MAX_RELATIVE_EXPIRE_S = 30 * 24 * 3600
#: Times a check-then-``cas`` step is tried again when the item changed in between.
CAS_RETRIES = 8
#: Idle connections kept per member.
MAX_IDLE = 8
#: Threads (per process) that run batches sent to several members at once.
MAX_WORKERS = 8
#: A member whose round trips take longer (a moving average), or that failed within
#: :data:`SLOW_AFTER_FAULT_S`, is asked in parallel with the others, seconds.
PARALLEL_RTT_S = 0.0003
SLOW_AFTER_FAULT_S = 30.0
#: Longest wait for one read of a ``metadump`` (a big cache streams for a while), seconds.
METADUMP_READ_TIMEOUT_S = 5.0
#: Silence that ends a ``metadump`` of memcached before 1.6 (it sends no END line), seconds.
METADUMP_IDLE_S = 1.0
#: Times a ``metadump`` is tried while the crawler is busy with another request.
METADUMP_BUSY_RETRIES = 20

_CAPABILITIES = frozenset({
    Capability.QUORUM_MEMBER, Capability.TTL, Capability.ADOPTABLE, Capability.LIMIT,
    Capability.FOLLOW, Capability.HANDOVER, Capability.BEAT, Capability.LIST,
})

_FENCE_SUFFIX = "%:fence"
_FOLLOW_SUFFIX = "%:next"
_RUNS_SUFFIX = "%:runs"
_AUX_MARK = "%:"
_LONGEST_SUFFIX = max(len(_FENCE_SUFFIX), len(_FOLLOW_SUFFIX), len(_RUNS_SUFFIX))

_NO_CAS = ("memcached runs with CAS disabled (-C): renewal and release cannot check the "
           "owner; start it without -C")

_UNSAFE_KEY_BYTES = re.compile(rb"[^\x21-\x24\x26-\x7e]")


# ------------------------------------------------------------------------------------------
# Keys, values, expiry


def stored_key(key: str) -> str:
    """The name ``key`` is stored under (``%XX`` for bytes memcached keys cannot hold)."""
    if key.isascii() and key.isprintable() and " " not in key and "%" not in key:
        stored = key
    else:
        raw = key.encode("utf-8")
        stored = _UNSAFE_KEY_BYTES.sub(lambda m: b"%%%02X" % m.group()[0], raw).decode("ascii")
    if len(stored) + _LONGEST_SUFFIX > MAX_KEY_BYTES:
        raise LockBackendError(
            f"lock key too long for memcached ({len(stored)} bytes stored; at most "
            f"{MAX_KEY_BYTES - _LONGEST_SUFFIX}): {key[:60]!r}...", lock_key=key)
    return stored


def original_key(stored: str) -> str:
    """The lock key a stored name stands for (:func:`stored_key` undone)."""
    return unquote(stored) if "%" in stored else stored


def _fence_name(key: str) -> str:
    return stored_key(slot_base(key)) + _FENCE_SUFFIX


def exptime(ttl_ms: int) -> int:
    """memcached's expiry for an item that must live at least ``ttl_ms``: whole seconds,
    one more than the ttl rounded up (memcached's clock ticks once a second, so an item
    stored for n seconds lives between n - 1 and n); a unix time beyond 30 days."""
    seconds = max(1, math.ceil(ttl_ms / 1000.0)) + 1
    if seconds > MAX_RELATIVE_EXPIRE_S:
        return int(time.time()) + seconds
    return seconds


def _start_value(server_s: int) -> int:
    """Where a new fencing counter starts: the server's time in microseconds.

    memcached tells its time in whole seconds (``stats``), on a clock that may lag the wall
    clock by up to two seconds; the fraction comes from this host's clock, bounded to that
    window, so a counter recreated within a second (the server restarted, or a short
    ``fence_ttl``) still starts above the last one while the clocks agree.
    """
    low = server_s * 1_000_000
    return min(max(time.time_ns() // 1000, low), low + 3_000_000 - 1)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class _Lock:
    """A lock item's value: token, expiry asked for (unix ms), holder metadata."""

    __slots__ = ("token", "expires_ms", "fields")

    def __init__(self, token: str, expires_ms: int, fields: dict[str, str]) -> None:
        self.token, self.expires_ms, self.fields = token, expires_ms, fields

    def encode(self) -> bytes:
        return json.dumps({"t": self.token, "e": self.expires_ms, "f": self.fields},
                          separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @classmethod
    def decode(cls, raw: bytes | None) -> _Lock | None:
        """The lock in ``raw``, or None for a value that is not one."""
        if not raw:
            return None
        try:
            doc = json.loads(raw)
            token = doc["t"]
            if not isinstance(token, str) or not token:
                return None
            fields = doc.get("f") or {}
            return cls(token, int(doc.get("e", 0)),
                       {str(k): _text(v) for k, v in fields.items()})
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def pttl_ms(self, now_ms: int) -> int:
        return max(0, self.expires_ms - now_ms)

    @property
    def owner(self) -> str:
        return self.fields.get("owner", "")


def _fields(metadata: Sequence[tuple[str, Any]], fixed: Any = None) -> dict[str, str]:
    out = {str(k): _text(v) for k, v in metadata}
    if fixed is not None:
        cached = fixed.cache.get("memcached")
        if cached is None:
            cached = fixed.cache["memcached"] = {str(k): _text(v) for k, v in fixed.pairs}
        out.update(cached)
    return out


def _int(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw.strip() or b"0")
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------
# Connections


def _driver() -> Any:
    try:
        from pymemcache.client.base import Client  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - the extra is installed in the tests
        raise LockConfigError(
            "the memcached:// lock store needs pymemcache: "
            "pip install 'celery-singleton-lock[memcached]'",
            setting="singleton_lock_url",
        ) from exc
    return Client


@functools.cache
def _faults() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """Driver errors after which a connection is in an unknown state (closed, timed out),
    and among them those of a pooled connection the server closed (it restarted): nothing
    was run."""
    from pymemcache.exceptions import (  # type: ignore[import-untyped]
        MemcacheUnexpectedCloseError,
        MemcacheUnknownError,
    )

    return ((OSError, MemcacheUnexpectedCloseError, MemcacheUnknownError),
            (ConnectionResetError, BrokenPipeError, MemcacheUnexpectedCloseError))


class _Conn:
    """One pymemcache connection, counting the commands answered on it (a command that
    fails on a pooled connection before any was answered may be sent again on a new one)."""

    __slots__ = ("client", "answered", "pooled")

    def __init__(self, client: Any, pooled: bool) -> None:
        self.client = client
        self.answered = 0
        self.pooled = pooled

    def cas(self, key: str, value: bytes, cas: Any, expire: int) -> bool | None:
        """``cas`` on the version ``gets`` read; a server without CAS (``memcached -C``)
        gives every item version 0, on which no owner check can hold."""
        if cas in (b"0", 0, None):
            raise LockBackendError(_NO_CAS)
        result: bool | None = self.client.cas(key, value, cas, expire)
        self.answered += 1
        return result

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            self.answered += 1
            return result

        return call


class _Pool:
    """Idle connections of one server, for this process only (a forked child opens its own)."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.server = (host, port)
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._idle: list[Any] = []
        self._pid = os.getpid()

    def get(self) -> _Conn:
        with self._lock:
            if self._pid != os.getpid():
                self._idle = []  # the parent's sockets: dropped, never used or closed here
                self._pid = os.getpid()
            if self._idle:
                return _Conn(self._idle.pop(), True)
        return self.new()

    def new(self) -> _Conn:
        client = _driver()(self.server, connect_timeout=self.timeout_s,
                           timeout=self.timeout_s, no_delay=True, default_noreply=False)
        return _Conn(client, False)

    def put(self, conn: _Conn) -> None:
        with self._lock:
            if self._pid == os.getpid() and len(self._idle) < MAX_IDLE:
                self._idle.append(conn.client)
                return
        conn.client.close()

    def discard(self, conn: _Conn) -> None:
        """Close ``conn`` after a fault, and the idle ones (a restart broke them all)."""
        conn.client.close()
        with self._lock:
            idle, self._idle = (self._idle, []) if self._pid == os.getpid() else ([], [])
        for client in idle:
            client.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = (self._idle, []) if self._pid == os.getpid() else ([], [])
        for client in idle:
            client.close()


_executor: ThreadPoolExecutor | None = None
_executor_pid = 0
_executor_lock = threading.Lock()


def _pool_executor() -> ThreadPoolExecutor:
    """The process's threads for batches sent to several members at once."""
    global _executor, _executor_pid
    with _executor_lock:
        if _executor is None or _executor_pid != os.getpid():
            _executor = ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="csl-memcached")
            _executor_pid = os.getpid()
        return _executor


#: Batches this thread submitted whose results nobody has asked for yet.
_unsent = threading.local()


class _Batch:
    """A batch submitted to one member (a :class:`~.base.Pending`).

    memcached runs no scripts, so a batch is several round trips. A batch runs where its
    results are first wanted: ``receive()`` runs it in the calling thread. When any of the
    members this thread submitted to is slow (round trips above :data:`PARALLEL_RTT_S`, or a
    recent fault), ``receive()`` first hands the other batches to the pool's threads, so the
    members work in parallel; with fast members a thread switch costs more than the round
    trips it would overlap, and each batch runs in turn. Whoever comes first runs a batch
    (the caller or a pool thread), so a full pool never deadlocks a caller.
    """

    __slots__ = ("member", "ops", "results", "_claimed", "_done")

    def __init__(self, member: MemcachedMember, ops: Sequence[Op]) -> None:
        self.member, self.ops = member, ops
        self.results: list[Any] = []
        self._claimed = threading.Lock()
        self._done = threading.Event()

    def run_here(self) -> None:
        """Run the batch in this thread unless another has taken it."""
        if not self._claimed.acquire(blocking=False):
            return
        try:
            self.results = self.member._run_batch(self.ops)
        finally:
            self._done.set()

    def wait(self) -> list[Any]:
        self.run_here()
        self._done.wait()
        return self.results

    def receive(self) -> list[Any]:
        others: list[_Batch] = getattr(_unsent, "batches", [])
        if others:
            _unsent.batches = []
            if getattr(_unsent, "pid", None) != os.getpid():
                others = []  # submitted by the parent before a fork: not this process's
            others = [b for b in others if b is not self and not b._claimed.locked()]
            # Fast servers (loopback, one rack) are cheaper one after the other than through
            # threads; slow or failing ones are asked at once.
            if others and (self.member.slow() or any(b.member.slow() for b in others)):
                executor = _pool_executor()
                for batch in others:
                    executor.submit(batch.run_here)
        return self.wait()


# ------------------------------------------------------------------------------------------
# URLs


def _parse(url: str, setting: str) -> tuple[str, int]:
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise LockConfigError(f"{setting}: cannot parse memcached URL {redact_url(url)!r}: "
                              f"{exc}", setting=setting) from None
    if parts.scheme.lower() != "memcached":
        raise LockConfigError(f"{setting}: not a memcached:// URL: {redact_url(url)!r}",
                              setting=setting)
    if not parts.hostname:
        raise LockConfigError(f"{setting}: memcached URL {redact_url(url)!r} names no host",
                              setting=setting)
    if parts.username or parts.password:
        raise LockConfigError(
            f"{setting}: memcached URL {redact_url(url)!r} has credentials; the memcached "
            "store speaks the plain text protocol, which has no authentication (restrict "
            "who can reach the server instead)", setting=setting)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise LockConfigError(
            f"{setting}: memcached URL {redact_url(url)!r}: expected memcached://host[:port] "
            "with no path or options", setting=setting)
    return parts.hostname, port or DEFAULT_PORT


def _display(host: str, port: int) -> str:
    return f"memcached://[{host}]:{port}" if ":" in host else f"memcached://{host}:{port}"


# ------------------------------------------------------------------------------------------
# The member


class MemcachedMember(QuorumMember):
    """One memcached server. Thread-safe and fork-safe: connections come from a small pool
    of this process's own (a forked child opens new ones)."""

    capabilities = _CAPABILITIES

    def __init__(self, host: str, port: int, *, socket_timeout: float = 0.2) -> None:
        self.host, self.port = host, port
        self.name = _display(host, port)
        self.socket_timeout = socket_timeout
        self._pool = _Pool(host, port, socket_timeout)
        #: Whether the server has ``lru_crawler metadump`` (None: not known yet).
        self.can_list: bool | None = None
        #: The server's version (None: not known yet).
        self.version: tuple[int, ...] | None = None
        self._dump_mode = "hash"
        self._refusal = ""
        #: Moving average of this server's round trip, seconds; when it last failed.
        self.rtt_s = 0.0
        self._faulted_at = -math.inf

    @classmethod
    def from_url(cls, url: str, *, socket_timeout: float, setting: str) -> MemcachedMember:
        _driver()
        host, port = _parse(url, setting)
        member = cls(host, port, socket_timeout=socket_timeout)
        member.probe(setting)
        return member

    @classmethod
    def check_urls(cls, urls: Sequence[str], setting: str) -> None:
        seen: dict[tuple[str, int], str] = {}
        for url in urls:
            server = _parse(url, setting)
            if server in seen:
                raise LockConfigError(
                    f"{setting}: the same memcached server is listed twice: "
                    f"{redact_url(seen[server])}, {redact_url(url)}", setting=setting)
            seen[server] = url

    def probe(self, setting: str = "singleton_lock_url") -> None:
        """Learn whether the server can list keys; without it, drop :attr:`Capability.LIST`.
        A server without CAS is refused (LockConfigError naming ``setting``). An unreachable
        server is assumed able (listing then fails with the reason, an operation without
        CAS with :data:`_NO_CAS`)."""
        conn = self._pool.get()
        try:
            settings = conn.stats("settings")
            self.version = _version(conn.version())
        except Exception:  # noqa: BLE001 - unreachable now: decided on first listing
            self._pool.discard(conn)
            return
        self._pool.put(conn)
        if settings.get(b"cas_enabled") in (False, 0, b"no", "no"):
            raise LockConfigError(f"{setting}: {self.name}: {_NO_CAS}", setting=setting)
        crawler = settings.get(b"lru_crawler")
        self.can_list = crawler in (True, 1, b"yes", "yes")
        if not self.can_list:
            self.capabilities = _CAPABILITIES - {Capability.LIST}  # type: ignore[misc]

    # -- batches ----------------------------------------------------------------------------

    def submit(self, ops: Sequence[Op]) -> _Batch:
        """Queue ``ops``; they run when a result is asked for (see :class:`_Batch`)."""
        batch = _Batch(self, ops)
        pid = os.getpid()
        if getattr(_unsent, "pid", None) != pid:
            _unsent.batches, _unsent.pid = [], pid
        _unsent.batches.append(batch)
        return batch

    def run(self, ops: Sequence[Op]) -> list[Any]:
        return _Batch(self, ops).receive()

    # post() is the default: run at once. Handing a release to a thread would let a pool
    # child that exits (os._exit) right after its task drop a release never sent.

    def slow(self) -> bool:
        """Whether batches sent with this member's should run in parallel (see
        :class:`_Batch`)."""
        return self.rtt_s > PARALLEL_RTT_S or \
            time.monotonic() - self._faulted_at < SLOW_AFTER_FAULT_S

    def _run_batch(self, ops: Sequence[Op]) -> list[Any]:
        """Run ``ops`` on one connection. A fault fails the op it hit and every op after it
        (with the same error: no second timeout); a pooled connection the server closed
        (it restarted) is replaced once, if nothing had been answered on it yet."""
        started = time.monotonic()
        conn = self._pool.get()
        try:
            return self._run_on(conn, ops)
        finally:
            if conn.answered:
                rtt = (time.monotonic() - started) / conn.answered
                self.rtt_s += (rtt - self.rtt_s) * 0.2

    def _run_on(self, conn: _Conn, ops: Sequence[Op]) -> list[Any]:
        faults, stale = _faults()
        results: list[Any] = []
        failed: BaseException | None = None
        for op in ops:
            if failed is not None:
                results.append(failed)
                continue
            try:
                results.append(self._one(conn, op))
            except faults as exc:
                if conn.pooled and conn.answered == 0 and isinstance(exc, stale):
                    self._pool.discard(conn)
                    conn = self._pool.new()
                    try:
                        results.append(self._one(conn, op))
                        continue
                    except faults as again:
                        exc = again
                    except Exception as again:  # noqa: BLE001 - stands for this op only
                        results.append(self._error(again))
                        continue
                failed = self._error(exc)
                results.append(failed)
                self._faulted_at = time.monotonic()
                self._pool.discard(conn)
            except Exception as exc:  # noqa: BLE001 - a server's refusal of this op only
                results.append(self._error(exc))
        if failed is None:
            self._pool.put(conn)
        return results

    def _error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, LockBackendError):
            return exc
        text = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            text = f"timed out after {self.socket_timeout:g} s"
        err = LockBackendError(f"memcached: {redact_url(text)}")
        err.__cause__ = exc
        return err

    def _one(self, conn: _Conn, op: Op) -> Any:
        handler = _HANDLERS.get(type(op))
        if handler is None:
            raise TypeError(f"not a lock-store operation: {op!r}")
        return handler(self, conn, op)

    # -- operations (each mirrors one of the Redis store's scripts) ------------------------

    def _next_fence(self, conn: _Conn, counter: str, fence_ttl_ms: int) -> int:
        """``incr`` the counter, creating it at the server's time in microseconds."""
        expire = exptime(fence_ttl_ms)
        for _ in range(CAS_RETRIES):
            fence = conn.incr(counter, 1)
            if fence is not None:
                conn.touch(counter, expire, noreply=True)
                return int(fence)
            start = _start_value(int(conn.stats()[b"time"]))
            if conn.add(counter, str(start).encode(), expire):
                return start
        raise LockBackendError("memcached: the fencing counter kept vanishing")

    @staticmethod
    def _fence_now(conn: _Conn, counter: str) -> int:
        return _int(conn.get(counter)) or 0

    def _acquire(self, conn: _Conn, op: Acquire) -> Grant:
        key = stored_key(op.key)
        expire = exptime(op.ttl_ms)
        now = _now_ms()
        value = _Lock(op.token, now + op.ttl_ms, _fields(op.metadata, op.fixed)).encode()
        for _ in range(CAS_RETRIES):
            if conn.add(key, value, expire):
                return Grant(True, fence=self._next_fence(conn, _fence_name(op.key),
                                                          op.fence_ttl_ms))
            raw, cas = conn.gets(key)
            if raw is None:
                continue  # expired or released since the add: try again
            held = _Lock.decode(raw)
            if held is None:
                return Grant(False, holder="", holder_pttl_ms=-1)
            if held.token != op.token:
                return Grant(False, holder=held.owner, holder_pttl_ms=held.pttl_ms(now))
            held.expires_ms = now + op.ttl_ms  # ours already: the ttl is refreshed
            if conn.cas(key, held.encode(), cas, expire):
                return Grant(True, fence=self._fence_now(conn, _fence_name(op.key)))
        return Grant(False, holder="", holder_pttl_ms=-1)

    def _acquire_slot(self, conn: _Conn, op: AcquireSlot) -> Grant:
        names = [stored_key(f"{op.key}:slot:{i}") for i in range(op.limit)]
        expire = exptime(op.ttl_ms)
        now = _now_ms()
        value = _Lock(op.token, now + op.ttl_ms, _fields(op.metadata, op.fixed)).encode()
        owner, least = "", -1
        for _ in range(CAS_RETRIES):
            found = conn.gets_many(names)
            free: list[int] = []
            owner, least = "", -1
            mine: tuple[int, _Lock, Any] | None = None
            for i, name in enumerate(names):
                entry = found.get(name)
                held = _Lock.decode(entry[0]) if entry is not None else None
                if entry is None:
                    free.append(i)
                elif held is not None and held.token == op.token:
                    mine = (i, held, entry[1])
                    break
                else:
                    pttl = held.pttl_ms(now) if held is not None else -1
                    if least < 0 or 0 <= pttl < least:
                        least, owner = pttl, held.owner if held is not None else ""
            if mine is not None:
                i, held, cas = mine
                held.expires_ms = now + op.ttl_ms
                if conn.cas(names[i], held.encode(), cas, expire):
                    return Grant(True, fence=self._fence_now(conn, _fence_name(op.key)),
                                 slot=i)
                continue
            for i in free:
                if conn.add(names[i], value, expire):
                    return Grant(True, fence=self._next_fence(conn, _fence_name(op.key),
                                                              op.fence_ttl_ms), slot=i)
            if not free:
                break
        return Grant(False, holder=owner, holder_pttl_ms=least)

    def _compare_and_delete(self, conn: _Conn, key: str, token: str) -> bool:
        name = stored_key(key)
        for _ in range(CAS_RETRIES):
            raw, cas = conn.gets(name)
            held = _Lock.decode(raw)
            if held is None or held.token != token:
                return False
            deleted = conn.cas(name, b"", cas, -1)  # a negative expiry: dropped at once
            if deleted is not None:
                if deleted:
                    return True
                continue  # changed since read (renewed meanwhile): look again
            return False
        raise LockBackendError(f"memcached: {key} kept changing during its release",
                               lock_key=key)

    def _release(self, conn: _Conn, op: Release) -> bool:
        return self._compare_and_delete(conn, op.key, op.token)

    def _extend(self, conn: _Conn, op: Extend) -> int:
        name = stored_key(op.key)
        expire = exptime(op.ttl_ms)
        for _ in range(CAS_RETRIES):
            raw, cas = conn.gets(name)
            if raw is None:
                return GONE
            held = _Lock.decode(raw)
            if held is None or held.token != op.token:
                return NOT_OWNED
            held.expires_ms = _now_ms() + op.ttl_ms
            if op.count:
                try:
                    held.fields["renewals"] = str(int(held.fields.get("renewals") or 0) + 1)
                except ValueError:
                    held.fields["renewals"] = "1"
            stored = conn.cas(name, held.encode(), cas, expire)
            if stored:
                return EXTENDED
            if stored is None:
                return GONE
        raise LockBackendError(f"memcached: {op.key} kept changing during its renewal",
                               lock_key=op.key)

    def _restore(self, conn: _Conn, op: Restore) -> bool:
        name = stored_key(op.key)
        value = _Lock(op.token, _now_ms() + op.ttl_ms, _fields(op.metadata)).encode()
        if not conn.add(name, value, exptime(op.ttl_ms)):
            return False
        self._raise(conn, _fence_name(op.key), op.fence, op.fence_ttl_ms)
        return True

    def _raise(self, conn: _Conn, counter: str, fence: int, fence_ttl_ms: int) -> None:
        expire = exptime(fence_ttl_ms)
        for _ in range(CAS_RETRIES):
            raw, cas = conn.gets(counter)
            if raw is None:
                if conn.add(counter, str(fence).encode(), expire):
                    return
                continue
            current = _int(raw)
            if current is not None and current >= fence:
                return
            if conn.cas(counter, str(fence).encode(), cas, expire):
                return
        raise LockBackendError("memcached: a fencing counter kept changing while raised")

    def _raise_fence(self, conn: _Conn, op: RaiseFence) -> bool:
        self._raise(conn, _fence_name(op.key), op.fence, op.fence_ttl_ms)
        return True

    def _handover(self, conn: _Conn, op: Handover) -> int | None:
        name = stored_key(op.key)
        expire = exptime(op.ttl_ms)
        for _ in range(CAS_RETRIES):
            raw, cas = conn.gets(name)
            held = _Lock.decode(raw)
            if held is None or held.token != op.token:
                return None
            held.token = op.new_token
            held.expires_ms = _now_ms() + op.ttl_ms
            held.fields.update(_fields(op.metadata))
            stored = conn.cas(name, held.encode(), cas, expire)
            if stored:
                return self._fence_now(conn, _fence_name(op.key))
            if stored is None:
                return None
        raise LockBackendError(f"memcached: {op.key} kept changing during its handover",
                               lock_key=op.key)

    def _read(self, conn: _Conn, op: Read) -> LockView:
        name, counter = stored_key(op.key), _fence_name(op.key)
        found = conn.get_many([name, counter])
        fence = _int(found.get(counter))
        held = _Lock.decode(found.get(name))
        if held is None:
            view = LockView(self.name, held=False)
        else:
            view = LockView(self.name, held=True, token=held.token,
                            ttl_s=held.pttl_ms(_now_ms()) / 1000.0, fields=dict(held.fields))
        view.fence = fence
        return view

    def _follow(self, conn: _Conn, op: Follow) -> tuple[bool, str]:
        follow = stored_key(op.key) + _FOLLOW_SUFFIX
        for _ in range(CAS_RETRIES):
            if not op.take:
                raw, cas = conn.gets(follow)
                current = _text(raw)
                if raw is None or current != op.task_id:
                    return False, current
                if conn.cas(follow, b"", cas, -1) is False:
                    continue
                return True, op.task_id
            name = stored_key(op.key)
            found = conn.gets_many([follow, name])
            entry = found.get(follow)
            value = op.task_id.encode()
            expire = exptime(max(1, op.ttl_ms))
            if entry is None:
                if conn.add(follow, value, expire):
                    return True, op.task_id
                continue
            current = _text(entry[0])
            lock = found.get(name)
            owner = _Lock.decode(lock[0]) if lock is not None else None
            if current != op.task_id and (owner is None or current != owner.owner):
                return False, current
            if conn.cas(follow, value, entry[1], expire):
                return True, op.task_id
        raise LockBackendError(f"memcached: the follow-up of {op.key} kept changing",
                               lock_key=op.key)

    def _claim_run(self, conn: _Conn, op: ClaimRun) -> int:
        name = stored_key(op.lock_key)
        runs = stored_key(op.state_key) + _RUNS_SUFFIX
        for _ in range(CAS_RETRIES):
            found = conn.gets_many([name, runs])
            lock = found.get(name)
            held = _Lock.decode(lock[0]) if lock is not None else None
            if held is None or held.token != op.token:
                return -1
            entry = found.get(runs)
            state = _runs(entry[0]) if entry is not None else {}
            last = state.get(op.entry)
            if last is not None and last > op.previous + 0.0005:
                return 0
            state[op.entry] = op.now
            value = json.dumps(state, separators=(",", ":")).encode()
            if entry is None:
                if conn.add(runs, value, 0):
                    return 1
            elif conn.cas(runs, value, entry[1], 0):
                return 1
        raise LockBackendError("memcached: beat's schedule state kept changing")

    def _read_runs(self, conn: _Conn, op: ReadRuns) -> dict[str, float]:
        return _runs(conn.get(stored_key(op.state_key) + _RUNS_SUFFIX))

    def _force_release(self, conn: _Conn, op: ForceRelease) -> bool:
        if op.token:
            return self._compare_and_delete(conn, op.key, op.token)
        return bool(conn.delete(stored_key(op.key)))

    def _ping(self, conn: _Conn, op: Ping) -> bool:
        conn.version()
        return True

    # -- listing ------------------------------------------------------------------------------

    def scan(self, prefix: str, pattern: str | None, limit: int | None) -> list[str]:
        """Lock keys under ``prefix`` (matching the glob ``pattern``), from the server's
        ``lru_crawler metadump``, read as it streams and cut at ``limit``. Keys that expired
        but are not reclaimed yet may be among them (reading them shows them free)."""
        match = glob_regex(pattern) if pattern else None
        head = prefix + ":"
        found: list[str] = []
        for stored in self._metadump():
            if _AUX_MARK in stored:
                continue
            key = original_key(stored)
            if (match.fullmatch(key) is None) if match is not None else \
                    not key.startswith(head):
                continue
            found.append(key)
            if limit is not None and len(found) >= limit:
                break
        return found

    def _metadump(self) -> Iterator[str]:
        """The stored name of every item, streamed: ``metadump hash`` (the hash table, which
        items do not move around in), else ``metadump all`` (every LRU) on servers before
        the hash walk. The crawler serves one dump at a time: a busy one is asked again."""
        for _ in range(METADUMP_BUSY_RETRIES):
            answer = yield from self._dump_once(self._dump_mode)
            if answer == "refused" and self._dump_mode == "hash":
                self._dump_mode = "all"
                answer = yield from self._dump_once("all")
            if answer == "done":
                return
            if answer == "refused":
                raise LockBackendError(
                    f"cannot list the locks on {self.name}: it has no lru_crawler metadump "
                    f"({self._refusal}; memcached >= 1.4.31 with its LRU crawler on lists "
                    "keys)")
            time.sleep(0.05)  # "busy": another dump is being served
        raise LockBackendError(f"cannot read locks from {self.name}: its LRU crawler stayed "
                               "busy with another dump")

    def _dump_once(self, mode: str) -> Generator[str, None, str]:
        """One ``metadump``: yields names; returns "done", "busy" or "refused"."""
        try:
            sock = socket.create_connection((self.host, self.port),
                                            timeout=max(self.socket_timeout, 0.5))
        except OSError as exc:
            raise LockBackendError(
                f"cannot read locks from {self.name}: {redact_url(str(exc))}") from exc
        # memcached before 1.6 ends a dump with no END line: silence ends it there.
        endless = self.version is not None and self.version < (1, 6, 0)
        try:
            sock.settimeout(METADUMP_IDLE_S if endless else
                            max(self.socket_timeout, METADUMP_READ_TIMEOUT_S))
            sock.sendall(b"lru_crawler metadump %s\r\n" % mode.encode())
            buffer = b""
            while True:
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    if endless:
                        return "done"
                    raise
                if not chunk:
                    raise LockBackendError(
                        f"cannot read locks from {self.name}: the connection closed during "
                        "lru_crawler metadump")
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    line = line.rstrip(b"\r")
                    if line.startswith(b"key="):
                        yield _metadump_key(line)
                    elif line == b"END":
                        return "done"
                    elif line.startswith(b"BUSY"):
                        return "busy"
                    elif line and line != b"OK":
                        self._refusal = f"it answered {_text(line)[:80]!r}"
                        return "refused"
        except OSError as exc:
            raise LockBackendError(
                f"cannot read locks from {self.name}: {redact_url(str(exc))}") from exc
        finally:
            sock.close()

    # -- the rest -----------------------------------------------------------------------------

    def client(self) -> Any:
        """A new pymemcache client of this server (for operators' tools and tests)."""
        return self._pool.new().client

    def close(self) -> None:
        self._pool.close()


def _metadump_key(line: bytes) -> str:
    """The stored name in a ``metadump`` line (``key=<url-encoded> exp=... ...``)."""
    return unquote(line[4:].split(b" ", 1)[0].decode("ascii", "replace"))


def _version(raw: bytes) -> tuple[int, ...] | None:
    numbers = re.findall(rb"\d+", raw or b"")[:3]
    return tuple(int(n) for n in numbers) or None


def _runs(raw: bytes | None) -> dict[str, float]:
    if not raw:
        return {}
    try:
        return {str(k): float(v) for k, v in json.loads(raw).items()}
    except (ValueError, TypeError, AttributeError):
        return {}


_HANDLERS: dict[type, Callable[[MemcachedMember, _Conn, Any], Any]] = {
    Acquire: MemcachedMember._acquire,
    AcquireSlot: MemcachedMember._acquire_slot,
    Release: MemcachedMember._release,
    Extend: MemcachedMember._extend,
    Restore: MemcachedMember._restore,
    RaiseFence: MemcachedMember._raise_fence,
    Handover: MemcachedMember._handover,
    Read: MemcachedMember._read,
    Follow: MemcachedMember._follow,
    ClaimRun: MemcachedMember._claim_run,
    ReadRuns: MemcachedMember._read_runs,
    ForceRelease: MemcachedMember._force_release,
    Ping: MemcachedMember._ping,
}
