"""What the PostgreSQL and MySQL/MariaDB lock stores share: tables, metadata, connections.

A lock is one row of a *lease table* (``<prefix>_locks``), keyed by the lock key, that lives
while the lock is held:

* ``token`` and ``expires_us``: the holder's token and the end of its lease, in microseconds
  of the **database server's** clock (``expires_us <= now``: the lease lapsed, and anyone may
  take the row over);
* ``fence``: the fencing token of this holding, drawn from one counter per table (a
  PostgreSQL sequence, a MySQL ``AUTO_INCREMENT`` column) that starts at the server's time in
  microseconds when the store creates the table. Every acquisition draws a new value, so a
  key's tokens grow with every acquisition and never repeat, whatever rows are deleted, and a
  table dropped and made again starts above every token it gave before;
* holder metadata: ``owner`` (the holder's task id), ``renewals``, ``acquired_us`` (server
  clock), and ``meta``, a JSON object of the other fields (``task``, ``hostname``, ``pid``,
  ``mode``, ``acquired_at``, ``ttl``, and any other).

A release deletes the row (owner-checked), as the simplest hand-written SQL lock does; the
row of a holder that died without releasing is taken over by the next acquire once its lease
lapsed, or deleted by a bounded sweep (one page of the primary key at a time), so the table
holds about one row per held lock. Follow-ups (``coalesce``) live in ``<prefix>_lock_next``,
beat's state in ``<prefix>_lock_runs``, and PostgreSQL's waiters mark the keys they wait for
in ``<prefix>_lock_wait``.

The *prefix* is the part of the key before its first ``:`` (``csl`` for ``csl:task:{...}``;
a key without ``:`` uses ``csl``), lowered and with any character other than ``[a-z0-9_]``
replaced by ``_`` (plus a short digest when that changed the prefix, so two prefixes never
share a table). Tables are created on first use; the README gives their DDL.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import re
import select
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

from ..errors import LockBackendError, LockConfigError
from ..keys import glob_regex, slot_base, slot_key
from ..urls import redact_url
from .base import (
    AcquireResult,
    Capability,
    FixedMetadata,
    LockBackend,
    LockRecord,
    LockView,
    Renewal,
)

__all__ = ["SQLBackend", "TableNames", "choose_slot", "table_names", "slot_base",
           "slot_key"]

logger = logging.getLogger(__name__)

#: Prefix of a key that has no ``:``.
DEFAULT_PREFIX = "csl"
#: Rows read per page by listings and by the sweep.
PAGE_ROWS = 500
#: Seconds between two sweeps of one table (each sweeps one page).
SWEEP_INTERVAL_S = 10.0
#: Locks renewed per statement by ``extend_many``.
RENEW_BATCH = 500
#: Longest wait between two tries of ``wait_released`` (an expiry sends no notification).
WAIT_RECHECK_S = 1.0
#: Connections kept idle per store.
MAX_IDLE = 8

_UNSAFE = re.compile(r"[^a-z0-9_]")


class TableNames:
    """The tables (and PostgreSQL notification channel) of one key prefix."""

    __slots__ = ("prefix", "base", "locks", "next", "runs", "wait", "fence", "channel")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        base = _UNSAFE.sub("_", prefix.lower())[:32] or DEFAULT_PREFIX
        if base != prefix:
            base += "_" + hashlib.sha256(prefix.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        self.base = base
        self.locks = f"{base}_locks"
        self.next = f"{base}_lock_next"
        self.runs = f"{base}_lock_runs"
        self.wait = f"{base}_lock_wait"
        #: PostgreSQL's fencing-token sequence.
        self.fence = f"{base}_lock_fence"
        self.channel = f"{base}_locks_released"

    def __repr__(self) -> str:
        return f"TableNames({self.prefix!r} -> {self.locks!r})"


_names_cache: dict[str, TableNames] = {}


def prefix_of(key: str) -> str:
    """The key prefix whose tables hold ``key``: the part before the first ``:``."""
    head, sep, _ = key.partition(":")
    return head if sep and head else DEFAULT_PREFIX


def table_names(key_or_prefix: str, *, is_prefix: bool = False) -> TableNames:
    prefix = (key_or_prefix.partition(":")[0] or DEFAULT_PREFIX) if is_prefix \
        else prefix_of(key_or_prefix)
    names = _names_cache.get(prefix)
    if names is None:
        names = _names_cache[prefix] = TableNames(prefix)
    return names


# ------------------------------------------------------------------------------------------
# Metadata <-> columns


#: Longest text kept per metadata value (``owner`` is a VARCHAR(255) column on MySQL).
OWNER_LIMIT = 255
VALUE_LIMIT = 1024
#: Metadata kept in columns of their own, or that are the row's own.
_OWN = frozenset({"owner", "renewals", "fence", "token"})
_json_str = json.encoder.encode_basestring


def _text(value: Any) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    if not text.isascii():  # lone surrogates cannot be stored: replaced
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text[:VALUE_LIMIT]


def _meta_items(pairs: Sequence[tuple[str, Any]]) -> dict[str, str]:
    return {str(name): _text(value) for name, value in pairs if name not in _OWN}


def _meta_json(items: dict[str, str]) -> str:
    return "{" + ", ".join(f"{_json_str(k)}: {_json_str(v)}" for k, v in items.items()) + "}"


class Columns:
    """Holder metadata as the row's values: ``owner`` and ``renewals`` columns, the rest in
    ``meta`` (a JSON object of strings). A :class:`FixedMetadata`'s part is encoded once and
    kept in its cache."""

    __slots__ = ("owner", "renewals", "meta", "given_owner", "given_renewals")

    def __init__(self, metadata: Sequence[tuple[str, Any]], fixed: FixedMetadata | None,
                 ttl_s: float | None) -> None:
        owner: str | None = None
        renewals: int | None = None
        if fixed is not None:
            cached = fixed.cache.get("sql")
            if cached is None:
                cached = fixed.cache["sql"] = _fixed_part(fixed)
            f_owner, f_renewals, f_items, f_json = cached
        else:
            f_owner, f_renewals, f_items, f_json = None, None, {}, ""
        items: dict[str, str] = {}
        for name, value in metadata:
            if name == "owner":
                owner = _text(value)[:OWNER_LIMIT]
            elif name == "renewals":
                renewals = _int_or_none(_text(value)) or 0
            elif name not in _OWN:
                items[str(name)] = _text(value)
        # The fixed pairs come last, so they win (as they would in a hash written in order).
        self.given_owner = owner is not None or f_owner is not None
        self.given_renewals = renewals is not None or f_renewals is not None
        self.owner = f_owner if f_owner is not None else (owner or "")
        self.renewals = f_renewals if f_renewals is not None else (renewals or 0)
        if ttl_s is not None and "ttl" not in items and "ttl" not in f_items:
            items["ttl"] = repr(float(ttl_s))
        if f_items and not items.keys() & f_items.keys():
            self.meta = (f_json[:-1] + ", " + _meta_json(items)[1:]) if items else f_json
        else:
            items.update(f_items)
            self.meta = _meta_json(items)


def _fixed_part(fixed: FixedMetadata) -> tuple[str | None, int | None, dict[str, str], str]:
    owner = renewals = None
    for name, value in fixed.pairs:
        if name == "owner":
            owner = _text(value)[:OWNER_LIMIT]
        elif name == "renewals":
            renewals = _int_or_none(_text(value)) or 0
    items = _meta_items(fixed.pairs)
    return owner, renewals, items, _meta_json(items)


def _int_or_none(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        try:
            return int(float(text))
        except (ValueError, OverflowError):
            return None


#: The columns a lock row is read with, in this order (:func:`view_of`).
READ_COLUMNS = ("lock_key", "token", "fence", "owner", "renewals", "acquired_us", "meta")


def _number(text: str, fmt: Callable[[float], str]) -> str:
    try:
        return fmt(float(text))
    except (ValueError, OverflowError):
        return text


def view_of(name: str, row: Sequence[Any]) -> tuple[str, LockView]:
    """(key, view) of a row read as :data:`READ_COLUMNS` followed by the µs left."""
    key, token, fence, owner, renewals, acquired_us, meta, left_us = row
    fields: dict[str, str] = {}
    if meta:
        try:
            loaded = json.loads(meta) if isinstance(meta, (str, bytes)) else meta
            fields.update({str(k): str(v) for k, v in dict(loaded).items()})
        except (ValueError, TypeError):
            pass
    for name_, default in (("task", ""), ("hostname", ""), ("mode", ""), ("pid", "")):
        fields.setdefault(name_, default)
    fields["acquired_at"] = _number(fields.get("acquired_at") or str(int(acquired_us) / 1e6),
                                    lambda v: f"{v:.6f}")
    if fields.get("ttl"):
        fields["ttl"] = _number(fields["ttl"], repr)
    else:
        fields["ttl"] = ""
    if fields["pid"]:
        pid = _int_or_none(fields["pid"])
        fields["pid"] = "" if pid is None else str(pid)
    fields.update({"owner": owner or "", "renewals": str(renewals or 0), "fence": str(fence)})
    view = LockView(name=name, held=True, token=token or "",
                    ttl_s=max(0.0, int(left_us) / 1e6), fields=fields)
    return key, view


def choose_slot(keys: Sequence[str], rows: dict[str, Sequence[Any]],
                token: str) -> tuple[int | None, int | None, str, int]:
    """For ``lock_limit``: ``(first free slot, first slot ``token`` holds, the owner and ms
    left of the held slot that lapses first)``, from ``rows`` read as (key, token, owner, ms
    left) by slot key; indexes are None where there is none, ms left -1 where nothing is
    held."""
    free = mine = None
    owner, least = "", -1
    for i, k in enumerate(keys):
        row = rows.get(k)
        if row is None or int(row[3]) <= 0:
            free = i if free is None else free
            continue
        if row[1] == token and mine is None:
            mine = i
        if least < 0 or int(row[3]) < least:
            owner, least = row[2] or "", int(row[3])
    return free, mine, owner, least


# ------------------------------------------------------------------------------------------
# Connections: a small pool per store, per process


_live_pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()


def _detach_after_fork() -> None:
    for pool in list(_live_pools):
        pool.forget_inherited()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_detach_after_fork)


class ConnectionPool:
    """Idle connections of one store, shared by the threads of one process.

    A connection is used by one thread at a time (checked out by :meth:`connection`). A
    forked child never uses its parent's connections (the pool compares ``os.getpid()``): it
    keeps them unused and unclosed, since closing would end the parent's session (psycopg and
    PyMySQL themselves never close a connection made by another process when it is
    garbage-collected).
    """

    def __init__(self, backend: SQLBackend) -> None:
        self._backend = weakref.proxy(backend)
        self._lock = threading.Lock()
        self._idle: list[tuple[Any, float]] = []
        self._pid = os.getpid()
        self._inherited: list[Any] = []
        _live_pools.add(self)

    def forget_inherited(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            try:
                self._backend.detach(conn)
            except ReferenceError:
                pass
            self._inherited.append(conn)  # never finalised in this process

    def get(self, fresh: bool = False) -> tuple[Any, bool]:
        """A connection, and whether it was used before (an idle one) or is new."""
        if self._pid != os.getpid():
            self.forget_inherited()
        while not fresh:
            with self._lock:
                conn, since = self._idle.pop() if self._idle else (None, 0.0)
            if conn is None:
                break
            if self._backend.usable(conn, time.monotonic() - since):
                return conn, True
            self._backend.discard(conn)
        return self._backend.connect(), False

    def put(self, conn: Any) -> None:
        if self._pid != os.getpid():
            self._inherited.append(conn)
            return
        with self._lock:
            if len(self._idle) < MAX_IDLE:
                self._idle.append((conn, time.monotonic()))
                return
        self._backend.discard(conn)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        if self._pid != os.getpid():
            self._inherited.extend(c for c, _ in idle)
            return
        for conn, _ in idle:
            self._backend.discard(conn)


def socket_readable(fd: int) -> bool:
    """True if ``fd`` has something to read now: an idle connection's server has spoken
    (a termination notice, or end of file), so the connection must not be reused."""
    try:
        readable, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


# ------------------------------------------------------------------------------------------
# The store


class SQLBackend(LockBackend):
    """A lock store in one SQL database (PostgreSQL or MySQL/MariaDB): see the module doc.

    Subclasses give the driver calls and the dialect's statements; this class gives the
    connection handling, error mapping, tables, paging, sweeping and waiting.
    """

    capabilities: ClassVar[frozenset[str]] = frozenset({
        Capability.TTL, Capability.ADOPTABLE, Capability.LIMIT, Capability.FOLLOW,
        Capability.HANDOVER, Capability.BEAT, Capability.LIST,
    })
    #: URL schemes of this store (for messages).
    schemes: ClassVar[tuple[str, ...]] = ()
    #: The extra that brings the driver.
    extra: ClassVar[str] = ""
    #: Driver exceptions that mean "the database did not answer or refused" (set by each
    #: store once its driver is imported).
    driver_errors: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, url: str, *, socket_timeout: float, fence_ttl_ms: int) -> None:
        self.url = url
        self.description = redact_url(url)
        self.clock = time.monotonic
        self.socket_timeout = socket_timeout
        #: Bound on one statement: a database commits slower than Redis answers.
        self.statement_timeout_s = max(1.0, 5.0 * socket_timeout)
        self.fence_ttl_ms = int(fence_ttl_ms)
        #: Rows read per listing page and per sweep (one bounded query each).
        self.page_rows = PAGE_ROWS
        self._pool = ConnectionPool(self)
        self._ready: set[str] = set()
        self._ready_lock = threading.Lock()
        self._next_sweep: dict[str, float] = {}
        self._sweep_cursor: dict[str, str] = {}
        self._sweep_lock = threading.Lock()
        #: Releases that failed, to try again until their deadline: (key, token, deadline).
        self._retry: list[tuple[str, str, float]] = []
        self._retry_lock = threading.Lock()

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def check_single(cls, urls: Sequence[str], setting: str) -> str:
        urls = list(urls)
        if not urls:
            raise LockConfigError(f"{setting}: no {cls.schemes[0]}:// URL given", setting=setting)
        if len(urls) > 1:
            raise LockConfigError(
                f"{setting}: quorum over databases is not supported: a "
                f"{'/'.join(s + '://' for s in cls.schemes)} URL is one lock store, and "
                f"{len(urls)} were given ({', '.join(redact_url(u) for u in urls)}); give one "
                "database URL", setting=setting,
            )
        url = urls[0]
        if not isinstance(url, str):
            raise LockConfigError(f"{setting}: a lock store URL must be a str, not "
                                  f"{type(url).__name__}", setting=setting)
        return url.strip()

    @classmethod
    def missing_driver(cls, setting: str, exc: ImportError, url: str = "") -> LockConfigError:
        scheme = url.split("://", 1)[0].lower() if "://" in url else cls.schemes[0]
        return LockConfigError(
            f"{setting}: the {scheme}:// lock store needs a driver that is not "
            f"installed ({exc}); pip install 'celery-singleton-lock[{cls.extra}]'",
            setting=setting,
        )

    # -- driver hooks ----------------------------------------------------------------------

    @abc.abstractmethod
    def connect(self) -> Any:
        """A new connection in autocommit mode, its session set up."""

    @abc.abstractmethod
    def usable(self, conn: Any, idle_s: float) -> bool:
        """Whether an idle connection can be reused."""

    @abc.abstractmethod
    def discard(self, conn: Any) -> None:
        """Close a connection, ignoring errors."""

    def detach(self, conn: Any) -> None:
        """Make an inherited connection safe to drop in a forked child (default: nothing)."""

    @abc.abstractmethod
    def missing_table(self, exc: BaseException) -> bool:
        """Whether ``exc`` says a table does not exist."""

    @abc.abstractmethod
    def create_tables(self, conn: Any, names: TableNames) -> None:
        """Create ``names``' tables if they do not exist."""

    def old_table(self, names: TableNames) -> LockConfigError:
        """The error for a lease table of an earlier, incompatible layout (no ``meta``)."""
        return LockConfigError(
            f"singleton_lock_url: the lease table {names.locks} in {self.description} has the "
            "layout of an earlier development version of celery-singleton-lock (it has no "
            f"meta column); drop {names.locks}, {names.next} and {names.runs} (they are made "
            "again on first use, or by the DDL in the README)", setting="singleton_lock_url")

    @classmethod
    @abc.abstractmethod
    def ddl(cls, names: TableNames) -> list[str]:
        """The CREATE statements of one prefix's tables."""

    # -- running statements ----------------------------------------------------------------

    def failure(self, what: str, exc: BaseException, key: str | None = None) -> LockBackendError:
        return LockBackendError(
            f"{what}: the lock store {self.description} did not answer "
            f"({redact_url(type(exc).__name__ + ': ' + str(exc).strip())})",
            lock_key=key,
        )

    def reason(self, exc: BaseException) -> str:
        return f"{self.description}: {redact_url(type(exc).__name__ + ': ' + str(exc).strip())}"

    @contextmanager
    def connection(self, names: TableNames | None = None) -> Iterator[Any]:
        """A connection for one operation, returned to the pool if it went well. Driver
        errors are raised as they are."""
        conn, _ = self._pool.get()
        try:
            if names is not None and names.base not in self._ready:
                self._ensure(conn, names)
            yield conn
        except BaseException:
            self.discard(conn)
            raise
        else:
            self._pool.put(conn)

    def _ensure(self, conn: Any, names: TableNames) -> None:
        with self._ready_lock:
            if names.base in self._ready:
                return
        self.create_tables(conn, names)
        with self._ready_lock:
            self._ready.add(names.base)

    def run(self, names: TableNames | None, fn: Callable[[Any], Any], *,
            idempotent: bool = True) -> Any:
        """``fn(conn)`` on a pooled connection. Driver errors propagate, but for two cases
        that are run again once: a table was missing (dropped since it was made: it is made
        again), and, for an ``idempotent`` operation, an idle connection turned out dead (the
        server ended it unseen) and is replaced."""
        fresh = table_again = conn_again = False
        while True:
            conn, reused = self._pool.get(fresh=fresh)
            try:
                if names is not None and names.base not in self._ready:
                    self._ensure(conn, names)
                result = fn(conn)
            except self.driver_errors as exc:
                lost = self.connection_lost(conn, exc)
                self.discard(conn)
                if not table_again and names is not None and self.missing_table(exc):
                    with self._ready_lock:
                        self._ready.discard(names.base)
                    table_again = True
                    continue
                if idempotent and reused and lost and not conn_again:
                    conn_again = fresh = True
                    continue
                raise
            except BaseException:
                self.discard(conn)
                raise
            self._pool.put(conn)
            return result

    def call(self, what: str, key: str | None, names: TableNames | None,
             fn: Callable[[Any], Any], *, idempotent: bool = True) -> Any:
        """:meth:`run`, a driver error raised as :class:`LockBackendError`."""
        try:
            return self.run(names, fn, idempotent=idempotent)
        except self.driver_errors as exc:
            raise self.failure(what, exc, key) from exc

    @abc.abstractmethod
    def connection_lost(self, conn: Any, exc: BaseException) -> bool:
        """Whether ``exc`` (raised using ``conn``) means the connection itself is gone."""

    # -- dialect operations (one connection each) --------------------------------------------

    @abc.abstractmethod
    def op_acquire(self, conn: Any, t: TableNames, key: str, token: str, ttl_ms: int,
                   cols: Columns) -> tuple[bool, int, str | None, int]:
        """(acquired, fence, holder owner, holder pttl ms)."""

    @abc.abstractmethod
    def op_acquire_slot(self, conn: Any, t: TableNames, key: str, token: str, ttl_ms: int,
                        limit: int, cols: Columns) -> tuple[bool, int, str | None, int, int]:
        """(acquired, fence, holder owner, holder pttl ms, slot index)."""

    @abc.abstractmethod
    def op_release(self, conn: Any, t: TableNames, key: str, token: str | None) -> bool:
        """Mark ``key`` free if ``token`` holds it (any holder for None); notify waiters."""

    @abc.abstractmethod
    def op_extend(self, conn: Any, t: TableNames, items: Sequence[Renewal],
                  count: bool) -> list[bool]:
        """Renew the unexpired locks of ``items`` (keys distinct) that their tokens hold."""

    @abc.abstractmethod
    def op_handover(self, conn: Any, t: TableNames, key: str, token: str, new_token: str,
                    ttl_ms: int, cols: Columns) -> int | None:
        """Give ``key`` to ``new_token`` if ``token`` holds it, keeping its fence; overwrite
        only the metadata ``cols`` was given (``meta`` merged). The fence, or None."""

    @abc.abstractmethod
    def op_read(self, conn: Any, t: TableNames, key: str) -> tuple[Any, ...] | None:
        """The held row of ``key`` as :data:`READ_COLUMNS` + µs left, or None."""

    @abc.abstractmethod
    def op_page(self, conn: Any, t: TableNames, low: str, high: str | None,
                after: str | None) -> list[tuple[Any, ...]]:
        """Up to :attr:`page_rows` rows with ``low <= key < high`` (and ``key > after``) in
        key order, as :data:`READ_COLUMNS` + µs left (<= 0: not held)."""

    @abc.abstractmethod
    def op_follow(self, conn: Any, t: TableNames, key: str, task_id: str,
                  ttl_ms: int) -> str | None: ...

    @abc.abstractmethod
    def op_unfollow(self, conn: Any, t: TableNames, key: str, task_id: str) -> None: ...

    @abc.abstractmethod
    def op_claim_run(self, conn: Any, t: TableNames, lock_key: str, token: str,
                     state_key: str, entry: str, previous: float, now: float) -> int: ...

    @abc.abstractmethod
    def op_last_runs(self, conn: Any, t: TableNames, state_key: str) -> dict[str, float]: ...

    @abc.abstractmethod
    def op_sweep(self, conn: Any, t: TableNames, after: str) -> tuple[str | None, int]:
        """Delete, among the next :attr:`page_rows` keys after ``after``, the rows whose lease
        lapsed, and expired follow-ups (and waiter marks). Returns (the last key of the page or
        None at the end of the table, rows deleted)."""

    @abc.abstractmethod
    def op_held(self, conn: Any, t: TableNames, key: str) -> bool:
        """Whether ``key`` is held now (one primary-key read)."""

    # -- LockBackend -----------------------------------------------------------------------

    def acquire(self, key: str, token: str, ttl_s: float,
                metadata: Sequence[tuple[str, Any]] = (),
                fixed: FixedMetadata | None = None) -> AcquireResult:
        t = table_names(key)
        cols = Columns(metadata, fixed, ttl_s)
        ttl_ms = max(1, int(ttl_s * 1000))
        started = self.clock()
        try:
            got, fence, holder, pttl = self.run(
                t, lambda c: self.op_acquire(c, t, key, token, ttl_ms, cols))
        except self.driver_errors as exc:
            return AcquireResult(False, 0, 0.0, started, None, -1, True, (self.reason(exc),))
        return self._result(key, ttl_s, started, got, fence, holder, pttl)

    def acquire_slot(self, key: str, token: str, ttl_s: float, limit: int,
                     metadata: Sequence[tuple[str, Any]] = (),
                     fixed: FixedMetadata | None = None) -> AcquireResult:
        if limit <= 1:
            return self.acquire(key, token, ttl_s, metadata, fixed)
        t = table_names(key)
        cols = Columns(metadata, fixed, ttl_s)
        ttl_ms = max(1, int(ttl_s * 1000))
        started = self.clock()
        try:
            got, fence, holder, pttl, slot = self.run(
                t, lambda c: self.op_acquire_slot(c, t, key, token, ttl_ms, limit, cols))
        except self.driver_errors as exc:
            return AcquireResult(False, 0, 0.0, started, None, -1, True, (self.reason(exc),))
        return self._result(slot_key(key, slot) if got else key, ttl_s, started, got, fence,
                            holder, pttl)

    def _result(self, key: str, ttl_s: float, started: float, got: bool, fence: int,
                holder: str | None, pttl: int) -> AcquireResult:
        if got:
            validity = ttl_s - (self.clock() - started)
            if validity > 0:
                self._maybe_sweep(key)
                return AcquireResult(True, int(fence), validity, started, None, -1, False, (),
                                     key)
            # Taken but already spent (a statement slower than the ttl): not usable.
            return AcquireResult(False, 0, 0.0, started, None, -1, False, ())
        return AcquireResult(False, 0, 0.0, started, holder, pttl, False, ())

    def release(self, key: str, token: str, *, deadline: float | None = None) -> bool:
        t = table_names(key)
        try:
            # Run again on a new connection when the pooled one turns out dead (a server
            # restarted under an idle connection): the DELETE compares the token, so a second
            # run never touches another holder's row. At worst, where the first run did commit
            # before the connection died, the second finds nothing and reports False.
            return bool(self.run(t, lambda c: self.op_release(c, t, key, token)))
        except self.driver_errors as exc:
            if deadline is not None and deadline > self.clock():
                with self._retry_lock:
                    self._retry.append((key, token, deadline))
            raise self.failure(f"cannot release lock {key!r}", exc, key) from exc

    def _release_on(self, key: str, token: str, conn: Any) -> bool:
        return self.op_release(conn, table_names(key), key, token)

    def _extend_on(self, t: TableNames, batch: list[Renewal], count: bool,
                   conn: Any) -> list[bool]:
        return self.op_extend(conn, t, batch, count)

    def _page_on(self, t: TableNames, low: str, high: str | None, after: str | None,
                 conn: Any) -> list[tuple[Any, ...]]:
        return self.op_page(conn, t, low, high, after)

    def _sweep_on(self, t: TableNames, after: str, conn: Any) -> tuple[str | None, int]:
        return self.op_sweep(conn, t, after)

    def retry_releases(self) -> int:
        """Try again the releases that failed and are still before their deadline; returns
        how many are still pending."""
        with self._retry_lock:
            pending, self._retry = self._retry, []
        keep = []
        for key, token, deadline in pending:
            if deadline <= self.clock():
                continue
            try:
                self.run(table_names(key), functools.partial(self._release_on, key, token))
            except self.driver_errors:
                keep.append((key, token, deadline))
        with self._retry_lock:
            self._retry.extend(keep)
            return len(self._retry)

    def extend_many(self, items: Sequence[Renewal], *,
                    count_renewal: bool = True) -> list[bool | None]:
        results: list[bool | None] = [None] * len(items)
        # One statement per table and batch; a key twice (never the case for one renewer)
        # goes in a later batch.
        batches: list[tuple[TableNames, list[int]]] = []
        open_batch: dict[str, tuple[list[int], set[str]]] = {}
        for i, item in enumerate(items):
            t = table_names(item.key)
            current = open_batch.get(t.base)
            if current is None or item.key in current[1] or len(current[0]) >= RENEW_BATCH:
                current = ([], set())
                open_batch[t.base] = current
                batches.append((t, current[0]))
            current[0].append(i)
            current[1].add(item.key)
        for t, idx in batches:
            batch = [items[i] for i in idx]
            try:
                answers = self.run(t, functools.partial(self._extend_on, t, batch,
                                                        count_renewal))
            except self.driver_errors as exc:
                logger.debug("renewal batch failed on %s: %s", self.description,
                             self.reason(exc))
                continue  # undecided: the renewer retries
            for i, ok in zip(idx, answers, strict=True):
                results[i] = ok
        return results

    def handover(self, key: str, token: str, new_token: str, ttl_s: float,
                 metadata: Sequence[tuple[str, Any]] = ()) -> int | None:
        t = table_names(key)
        cols = Columns(metadata, None, None)
        ttl_ms = max(1, int(ttl_s * 1000))
        return self.call(f"cannot hand lock {key!r} over", key, t,
                         lambda c: self.op_handover(c, t, key, token, new_token, ttl_ms, cols),
                         idempotent=False)

    def owned(self, key: str, token: str) -> bool:
        row = self._read(key, "cannot read lock")
        return row is not None and row[1] == token

    def holder(self, key: str) -> str | None:
        row = self._read(key, "cannot read lock")
        return None if row is None else (row[3] or "")

    def _read(self, key: str, what: str) -> tuple[Any, ...] | None:
        t = table_names(key)
        return self.call(f"{what} {key!r}", key, t, lambda c: self.op_read(c, t, key))

    def follow(self, key: str, task_id: str, ttl_s: float) -> str | None:
        t = table_names(key)
        ttl_ms = max(1, int(ttl_s * 1000))
        return self.call(f"cannot queue a follow-up of {key!r}", key, t,
                         lambda c: self.op_follow(c, t, key, task_id, ttl_ms))

    def unfollow(self, key: str, task_id: str) -> None:
        t = table_names(key)
        self.call(f"cannot drop the follow-up of {key!r}", key, t,
                  lambda c: self.op_unfollow(c, t, key, task_id))

    def claim_run(self, lock_key: str, token: str, state_key: str, entry: str,
                  previous: float, now: float) -> int:
        t = table_names(lock_key)
        return int(self.call(f"cannot claim beat entry {entry!r}", lock_key, t,
                             lambda c: self.op_claim_run(c, t, lock_key, token, state_key,
                                                         entry, previous, now),
                             idempotent=False))

    def last_runs(self, state_key: str) -> dict[str, float]:
        t = table_names(state_key)
        return self.call("cannot read beat's state", state_key, t,
                         lambda c: self.op_last_runs(c, t, state_key))

    # -- seeing and clearing -----------------------------------------------------------------

    def _pages(self, prefix: str, pattern: str | None, limit: int | None,
               ) -> Iterator[tuple[str, LockView]]:
        t = table_names(prefix, is_prefix=True)
        # The keys "<prefix>:...", as SCAN MATCH "<prefix>:*" reads them.
        low = prefix if prefix.endswith(":") else prefix + ":"
        high = _after_prefix(low)
        after: str | None = None
        seen = 0
        match = glob_regex(pattern).match if pattern is not None else None
        while True:
            rows = self.run(t, functools.partial(self._page_on, t, low, high, after))
            for row in rows:
                if int(row[-1]) <= 0:
                    continue
                if match is not None and not match(row[0]):
                    continue
                yield view_of(self.description, row)
                seen += 1
                if limit is not None and seen >= limit:
                    return
            if len(rows) < self.page_rows:
                return
            after = rows[-1][0]

    def list_locks(self, prefix: str, *, pattern: str | None = None, limit: int | None = None,
                   errors: list[str] | None = None) -> list[LockRecord]:
        try:
            return [LockRecord.from_view(key, view)
                    for key, view in self._pages(prefix, pattern, limit)]
        except self.driver_errors as exc:
            raise self.failure(f"cannot list locks under {prefix!r}", exc) from exc

    def lock_keys(self, prefix: str, *, pattern: str | None = None,
                  limit: int | None = None) -> list[str]:
        """Keys of the locks held under ``prefix`` (for the metrics), read in pages."""
        try:
            return [key for key, _ in self._pages(prefix, pattern, limit)]
        except self.driver_errors as exc:
            raise self.failure(f"cannot list locks under {prefix!r}", exc) from exc

    def lock_info(self, key: str) -> LockRecord | None:
        row = self._read(key, "cannot read lock")
        if row is None:
            return None
        _, view = view_of(self.description, row)
        return LockRecord.from_view(key, view)

    def force_release(self, record: LockRecord) -> int:
        token = record.token or next((v.token for v in record.views if v is not None
                                      and v.token), "")
        t = table_names(record.key)
        done = self.call(f"cannot release lock {record.key!r}", record.key, t,
                         lambda c: self.op_release(c, t, record.key, token or None),
                         idempotent=False)
        return 1 if done else 0

    def force_release_many(self, records: Sequence[LockRecord]) -> int:
        """:meth:`force_release` of each record; how many were released."""
        return sum(self.force_release(r) for r in records)

    def ping(self) -> tuple[int, list[str]]:
        try:
            self.run(None, self.op_ping)
        except self.driver_errors as exc:
            return 0, [self.reason(exc)]
        return 1, []

    def op_ping(self, conn: Any) -> None:
        cur = conn.cursor()
        try:
            cur.execute("SELECT 1")
            cur.fetchall()
        finally:
            cur.close()

    # -- waiting ---------------------------------------------------------------------------

    def wait_released(self, key: str, timeout_s: float, tried: Callable[[], bool]) -> bool:
        deadline = self.clock() + timeout_s
        watch = self.watch(key, timeout_s)
        try:
            while True:
                if watch is not None:
                    watch.clear()
                if tried():
                    return True
                remaining = deadline - self.clock()
                if remaining <= 0:
                    return False
                self.sleep_until_released(key, watch, remaining)
        finally:
            if watch is not None:
                self.unwatch(key, watch)

    def watch(self, key: str, timeout_s: float) -> threading.Event | None:
        """An event set when ``key`` is released in the next ``timeout_s`` (registered before
        the first try); None where the store has no notification."""
        return None

    def unwatch(self, key: str, event: threading.Event) -> None:
        """Stop :meth:`watch`."""

    #: Longest interval between two polls where there is no notification (seconds); each
    #: interval is drawn between half of it and all of it (jitter).
    poll_interval_s: float = 0.1

    def sleep_until_released(self, key: str, watch: threading.Event | None,
                             remaining: float) -> None:
        """Polling: read the row (one primary-key read) every 50-100 ms until it is free or
        :data:`WAIT_RECHECK_S` passed, then let the caller try again."""
        until = self.clock() + min(remaining, WAIT_RECHECK_S)
        t = table_names(key)
        while True:
            left = until - self.clock()
            if left <= 0:
                return
            time.sleep(min(left, random.uniform(self.poll_interval_s / 2, self.poll_interval_s)))
            try:
                if not self.run(t, lambda c: self.op_held(c, t, key)):
                    return
            except self.driver_errors:
                return

    # -- housekeeping ------------------------------------------------------------------------

    def _maybe_sweep(self, key: str) -> None:
        """After an acquisition: schedule the sweep of its table (:meth:`maintain` runs it in
        the renewal thread), or sweep one page at once where nothing ran it for long."""
        t = table_names(key)
        due = self._next_sweep.get(t.base)
        now = self.clock()
        if due is None:
            self._next_sweep[t.base] = now + SWEEP_INTERVAL_S * random.uniform(0.5, 1.5)
        elif due + 2 * SWEEP_INTERVAL_S <= now:
            # Long overdue: no renewal thread calls maintain() here (a process that only
            # enqueues). Sweep one page in line.
            self.sweep(t.prefix)

    def needs_maintenance(self) -> bool:
        now = self.clock()
        return bool(self._retry) or any(due <= now for due in self._next_sweep.values())

    def maintain(self) -> None:
        if self._retry:
            self.retry_releases()
        now = self.clock()
        for base, due in list(self._next_sweep.items()):
            if due <= now:
                prefix = next((n.prefix for n in _names_cache.values() if n.base == base),
                              None)
                if prefix is not None:
                    self.sweep(prefix)

    def sweep(self, prefix: str = DEFAULT_PREFIX, *, pages: int = 1) -> int:
        """Delete up to ``pages`` pages' worth of dead rows of ``prefix``'s tables (locks whose
        lease lapsed, expired follow-ups and waiter marks). Returns rows deleted. Never
        raises: a sweep that fails is retried later."""
        t = table_names(prefix, is_prefix=True)
        if not self._sweep_lock.acquire(blocking=False):
            return 0
        deleted = 0
        try:
            self._next_sweep[t.base] = self.clock() + SWEEP_INTERVAL_S * random.uniform(0.8,
                                                                                        1.2)
            for _ in range(pages):
                after = self._sweep_cursor.get(t.base, "")
                try:
                    last, n = self.run(t, functools.partial(self._sweep_on, t, after))
                except self.driver_errors as exc:
                    logger.debug("sweep of %s failed: %s", t.locks, self.reason(exc))
                    break
                deleted += n
                self._sweep_cursor[t.base] = last or ""
                if last is None:
                    break
        finally:
            self._sweep_lock.release()
        return deleted

    def close(self) -> None:
        self._pool.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self._pool.close()


def _after_prefix(prefix: str) -> str | None:
    """The smallest string above every string that starts with ``prefix`` (byte order)."""
    chars = list(prefix)
    while chars:
        last = ord(chars[-1])
        if last < 0x10FFFF and not (0xD7FF <= last < 0xE000):
            chars[-1] = chr(last + 1)
            return "".join(chars)
        chars.pop()
    return None
