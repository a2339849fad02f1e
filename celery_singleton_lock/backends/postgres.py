"""The PostgreSQL lock store (``postgresql://``, ``postgres://``), on psycopg 3.

A lock is a row of a lease table (:mod:`.sql` describes the tables). Every operation on a
lock is one statement in autocommit mode, so one round trip (a rejected acquire: two):

* acquire: ``INSERT ... ON CONFLICT (lock_key) DO UPDATE ... WHERE the lease lapsed or is
  ours RETURNING fence``, the fencing token drawn from the table's sequence (a lapsed lease
  taken over draws a new one, a refresh of ours keeps it); where it takes nothing, a read of
  the row gives the holder's owner and remaining ttl;
* release: an owner-checked ``DELETE`` that calls ``pg_notify`` where someone waits;
* renewal: one ``UPDATE ... FROM unnest(keys, tokens, ttls)`` per batch, locking rows in key
  order (two renewers of overlapping batches never deadlock).

Expiry is measured on the server's clock (``statement_timestamp()``). Waiters ``LISTEN`` on
the table's channel through one connection per process (a thread reads it) and mark the key
in ``<prefix>_lock_wait`` for as long as they wait; a release of a marked key calls
``pg_notify`` in its statement, so it wakes them at once, and a release nobody waits for sends
nothing (a ``NOTIFY`` serialises the commits of every notifying transaction of the server).
``lock_limit`` slots take a short transaction that holds an advisory lock on the base key
first, and beat's claims lock the leader's lock row.

A comma-separated host list (``postgresql://h1,h2/db?target_session_attrs=read-write``) is
one store: libpq connects to whichever host is the primary.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any, ClassVar

from ..errors import LockConfigError
from ..urls import redact_url
from .base import Capability, Renewal
from .sql import (
    PAGE_ROWS,
    READ_COLUMNS,
    WAIT_RECHECK_S,
    Columns,
    SQLBackend,
    TableNames,
    choose_slot,
    slot_base,
    slot_key,
    socket_readable,
    table_names,
)

__all__ = ["PostgresBackend"]

logger = logging.getLogger(__name__)

#: The server's clock in microseconds, fixed for the statement.
NOW = "(extract(epoch from statement_timestamp()) * 1000000)::bigint"
_COLS = ", ".join(READ_COLUMNS[:-1]) + ", meta::text"
_HOSTS_CAP = 8


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _regclass(name: str) -> str:
    """``name`` (quoted) as a string literal, for ``nextval('...')``."""
    return "'" + _q(name).replace("'", "''") + "'"


class _Statements:
    """The statements of one prefix's tables, built once."""

    def __init__(self, t: TableNames) -> None:
        locks, nxt, runs, wait = _q(t.locks), _q(t.next), _q(t.runs), _q(t.wait)
        took = "l.expires_us <= EXCLUDED.acquired_us"
        keep = ",\n    ".join(f"{c} = CASE WHEN {took} THEN EXCLUDED.{c} ELSE l.{c} END"
                              for c in ("acquired_us", "owner", "renewals", "meta"))
        # One statement; where it takes nothing (held by another), a read of the holder
        # follows (a second round trip on contention only: folding it into the statement
        # as a UNION costs every acquisition more than the read costs a rejected one).
        self.acquire = f"""
INSERT INTO {locks} AS l (lock_key, token, expires_us, acquired_us, owner, renewals, meta)
SELECT %(key)s, %(token)s, n.us + %(ttl_ms)s::bigint * 1000, n.us, %(owner)s,
    %(renewals)s::integer, %(meta)s::jsonb
FROM (SELECT {NOW} AS us) n
ON CONFLICT (lock_key) DO UPDATE SET
    token = EXCLUDED.token,
    expires_us = EXCLUDED.expires_us,
    fence = CASE WHEN {took} THEN nextval({_regclass(t.fence)}) ELSE l.fence END,
    {keep}
WHERE {took} OR l.token = EXCLUDED.token
RETURNING l.fence"""
        self.holder = f"""
SELECT owner, (expires_us - {NOW}) / 1000 FROM {locks}
WHERE lock_key = %(key)s AND expires_us > {NOW}"""
        # lock_limit: an advisory lock on the base key serialises the choice of a slot.
        self.lock_base = "SELECT pg_advisory_xact_lock(hashtextextended(%(name)s, 0))"
        self.slots = f"""
SELECT lock_key, token, owner, (expires_us - {NOW}) / 1000 FROM {locks}
WHERE lock_key = ANY(%(keys)s::text[])"""
        self.refresh = f"""
UPDATE {locks} SET expires_us = {NOW} + %(ttl_ms)s::bigint * 1000
WHERE lock_key = %(key)s AND token = %(token)s AND expires_us > {NOW} RETURNING fence"""
        # Notify only where a waiter said it listens (its mark in the wait table): a
        # NOTIFY serialises the commits of every notifying transaction of the server.
        notify = f"""
SELECT 1, (SELECT pg_notify(%(channel)s, %(base)s) FROM {wait} w
           WHERE w.lock_key = %(base)s AND w.wait_until_us > {NOW}) FROM d"""
        self.release = f"""
WITH d AS (DELETE FROM {locks}
           WHERE lock_key = %(key)s AND token = %(token)s AND expires_us > {NOW}
           RETURNING 1){notify}"""
        self.release_any = f"""
WITH d AS (DELETE FROM {locks} WHERE lock_key = %(key)s AND expires_us > {NOW}
           RETURNING 1){notify}"""
        self.want = f"""
INSERT INTO {wait} AS w (lock_key, wait_until_us)
VALUES (%(key)s, {NOW} + %(wait_ms)s::bigint * 1000)
ON CONFLICT (lock_key) DO UPDATE
SET wait_until_us = GREATEST(w.wait_until_us, EXCLUDED.wait_until_us)"""
        self.extend = f"""
WITH v AS (SELECT * FROM unnest(%(keys)s::text[], %(tokens)s::text[], %(ttls)s::bigint[])
           AS v(k, tok, ttl_ms)),
c AS (SELECT l.lock_key FROM {locks} l JOIN v ON l.lock_key = v.k AND l.token = v.tok
      WHERE l.expires_us > {NOW} ORDER BY l.lock_key FOR UPDATE OF l)
UPDATE {locks} l SET expires_us = {NOW} + v.ttl_ms * 1000, renewals = l.renewals + %(count)s
FROM v WHERE l.lock_key = v.k AND l.token = v.tok AND l.expires_us > {NOW}
  AND l.lock_key IN (SELECT lock_key FROM c)
RETURNING l.lock_key"""
        self.read = f"""
SELECT {_COLS}, expires_us - {NOW} FROM {locks}
WHERE lock_key = %(key)s AND expires_us > {NOW}"""
        self.held = f"SELECT 1 FROM {locks} WHERE lock_key = %(key)s AND expires_us > {NOW}"
        page = f"""
SELECT {_COLS}, expires_us - {NOW} FROM {locks}
WHERE lock_key >= %(low)s AND lock_key > %(after)s {{high}}
ORDER BY lock_key LIMIT %(rows)s"""
        self.page = page.format(high="AND lock_key < %(high)s")
        self.page_open = page.format(high="")
        self.follow = f"""
WITH o AS (SELECT owner FROM {locks} WHERE lock_key = %(key)s AND expires_us > {NOW}),
t AS (INSERT INTO {nxt} AS n (lock_key, task_id, expires_us)
      VALUES (%(key)s, %(task_id)s, {NOW} + %(ttl_ms)s::bigint * 1000)
      ON CONFLICT (lock_key) DO UPDATE SET task_id = EXCLUDED.task_id,
                                           expires_us = EXCLUDED.expires_us
      WHERE n.task_id = EXCLUDED.task_id OR n.expires_us <= {NOW}
         OR n.task_id IN (SELECT owner FROM o)
      RETURNING task_id)
SELECT true, task_id FROM t
UNION ALL
SELECT false, task_id FROM {nxt}
WHERE lock_key = %(key)s AND expires_us > {NOW} AND NOT EXISTS (SELECT 1 FROM t)"""
        self.unfollow = f"DELETE FROM {nxt} WHERE lock_key = %(key)s AND task_id = %(task_id)s"
        self.claim = f"""
WITH leader AS (SELECT lock_key FROM {locks}
                WHERE lock_key = %(lock_key)s AND token = %(token)s AND expires_us > {NOW}
                FOR UPDATE),
w AS (INSERT INTO {runs} AS r (state_key, entry, last_run)
      SELECT %(state_key)s, %(entry)s, %(now)s::float8 FROM leader
      ON CONFLICT (state_key, entry) DO UPDATE SET last_run = EXCLUDED.last_run
      WHERE r.last_run <= %(previous)s::float8 + 0.0005
      RETURNING 1)
SELECT (SELECT count(*) FROM leader), (SELECT count(*) FROM w)"""
        self.runs = f"SELECT entry, last_run FROM {runs} WHERE state_key = %(state_key)s"
        self.sweep = f"""
WITH page AS (SELECT lock_key FROM {locks} WHERE lock_key > %(after)s
              ORDER BY lock_key LIMIT %(rows)s),
d AS (DELETE FROM {locks} l USING page p
      WHERE l.lock_key = p.lock_key AND l.expires_us <= {NOW}
      RETURNING 1),
f AS (DELETE FROM {nxt} WHERE lock_key IN (
          SELECT lock_key FROM {nxt} WHERE expires_us <= {NOW} LIMIT {PAGE_ROWS}
          FOR UPDATE SKIP LOCKED)
      RETURNING 1),
w AS (DELETE FROM {wait} WHERE lock_key IN (
          SELECT lock_key FROM {wait} WHERE wait_until_us <= {NOW} LIMIT {PAGE_ROWS}
          FOR UPDATE SKIP LOCKED)
      RETURNING 1)
SELECT (SELECT max(lock_key) FROM page), (SELECT count(*) FROM page),
       (SELECT count(*) FROM d) + (SELECT count(*) FROM f) + (SELECT count(*) FROM w)"""


def ddl(t: TableNames) -> list[str]:
    """The tables of one key prefix, and the start of its fencing-token sequence (also
    printed in the README)."""
    fence = _q(t.fence)
    return [
        f"CREATE SEQUENCE IF NOT EXISTS {fence}",
        # Start at the server's time in µs (never lowered), so a table made again gives
        # tokens above the old table's.
        f"""SELECT setval({_regclass(t.fence)}, GREATEST((SELECT last_value FROM {fence}),
    (extract(epoch from clock_timestamp()) * 1000000)::bigint))""",
        f"""CREATE TABLE IF NOT EXISTS {_q(t.locks)} (
    lock_key    text COLLATE "C" PRIMARY KEY,   -- byte order: prefix ranges use the index
    token       text NOT NULL,                  -- the holder's token
    expires_us  bigint NOT NULL,                -- lease end, server clock, µs since 1970
    fence       bigint NOT NULL DEFAULT nextval({_regclass(t.fence)}),  -- fencing token
    acquired_us bigint NOT NULL,                -- acquisition, server clock, µs
    owner       text NOT NULL DEFAULT '',       -- holder's task id
    renewals    integer NOT NULL DEFAULT 0,
    meta        jsonb                           -- task, hostname, pid, mode, ...
) WITH (fillfactor = 70)""",
        f"""CREATE TABLE IF NOT EXISTS {_q(t.wait)} (
    lock_key      text COLLATE "C" PRIMARY KEY, -- a key someone waits for
    wait_until_us bigint NOT NULL               -- until then: its releases notify
)""",
        f"""CREATE TABLE IF NOT EXISTS {_q(t.next)} (
    lock_key    text COLLATE "C" PRIMARY KEY,
    task_id     text NOT NULL,
    expires_us  bigint NOT NULL
)""",
        f"""CREATE TABLE IF NOT EXISTS {_q(t.runs)} (
    state_key   text COLLATE "C" NOT NULL,
    entry       text NOT NULL,
    last_run    double precision NOT NULL,      -- unix seconds
    PRIMARY KEY (state_key, entry)
)""",
    ]


class PostgresBackend(SQLBackend):
    """Locks in a PostgreSQL database (one URL; a libpq host list is one store)."""

    capabilities: ClassVar[frozenset[str]] = SQLBackend.capabilities | {Capability.NOTIFY}
    schemes = ("postgresql", "postgres")
    extra = "postgres"
    #: Commas in a postgresql:// URL separate libpq's hosts of one database.
    comma_separates_urls = False

    def __init__(self, url: str, conninfo: dict[str, Any], *, socket_timeout: float,
                 fence_ttl_ms: int) -> None:
        import psycopg

        super().__init__(url, socket_timeout=socket_timeout, fence_ttl_ms=fence_ttl_ms)
        self._psycopg = psycopg
        self.driver_errors = (psycopg.Error, OSError)
        self._conninfo = conninfo
        self._statements: dict[str, _Statements] = {}
        self._listener: _Listener | None = None
        self._listener_lock = threading.Lock()

    @classmethod
    def from_urls(cls, urls: Sequence[str], *, socket_timeout: float, fence_ttl_ms: int,
                  setting: str) -> PostgresBackend:
        url = cls.check_single(urls, setting)
        try:
            import psycopg  # noqa: F401
            from psycopg.conninfo import conninfo_to_dict
        except ImportError as exc:
            raise cls.missing_driver(setting, exc, url) from exc
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme not in cls.schemes:
            raise LockConfigError(f"{setting}: not a postgresql:// URL: {redact_url(url)}",
                                  setting=setting)
        try:
            params = conninfo_to_dict(url)
        except Exception as exc:
            raise LockConfigError(
                f"{setting}: cannot parse the PostgreSQL URL {redact_url(url)} "
                f"({redact_url(str(exc))})", setting=setting) from None
        port = str(params.get("port", "5432"))
        if not all(p.strip().isdigit() and 0 < int(p) < 65536 for p in port.split(",")):
            raise LockConfigError(f"{setting}: bad port in {redact_url(url)}", setting=setting)
        if not params.get("dbname"):
            raise LockConfigError(
                f"{setting}: the PostgreSQL URL {redact_url(url)} names no database "
                "(postgresql://user@host:5432/dbname)", setting=setting)
        timeout_ms = int(max(1.0, 5.0 * socket_timeout) * 1000)
        options = str(params.get("options", "") or "")
        params["options"] = (f"{options} -c statement_timeout={timeout_ms} "
                             f"-c lock_timeout={timeout_ms} "
                             f"-c idle_in_transaction_session_timeout={timeout_ms * 10}").strip()
        params.setdefault("connect_timeout", str(max(2, int(timeout_ms / 1000) + 1)))
        params.setdefault("application_name", "celery-singleton-lock")
        params.setdefault("keepalives", "1")
        params.setdefault("keepalives_idle", "5")
        params.setdefault("keepalives_interval", "2")
        params.setdefault("keepalives_count", "3")
        params.setdefault("tcp_user_timeout", str(timeout_ms))
        return cls(url, params, socket_timeout=socket_timeout, fence_ttl_ms=fence_ttl_ms)

    # -- driver hooks ----------------------------------------------------------------------

    def connect(self) -> Any:
        return self._psycopg.connect(autocommit=True, **self._conninfo)

    def usable(self, conn: Any, idle_s: float) -> bool:
        if conn.closed or conn.broken:
            return False
        if conn.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE:
            return False
        # An idle connection has nothing to read unless the server ended it.
        return not socket_readable(conn.fileno())

    def discard(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            conn.close()

    def connection_lost(self, conn: Any, exc: BaseException) -> bool:
        return bool(conn.closed or conn.broken)

    def missing_table(self, exc: BaseException) -> bool:
        return isinstance(exc, self._psycopg.errors.UndefinedTable)

    @classmethod
    def ddl(cls, names: TableNames) -> list[str]:
        return ddl(names)

    def _tables_state(self, conn: Any, names: TableNames) -> tuple[bool, bool, bool]:
        """(all tables there, the lease table there, it has the ``meta`` column)."""
        wanted = [names.fence, names.locks, names.wait, names.next, names.runs]
        found, locks, has_meta = conn.execute(
            "SELECT (SELECT count(*) FROM unnest(%s::text[]) n WHERE to_regclass(n) IS NOT NULL),"
            " to_regclass(%s) IS NOT NULL,"
            " EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s)"
            " AND attname = 'meta' AND NOT attisdropped)",
            ([_q(n) for n in wanted], _q(names.locks), _q(names.locks))).fetchone()
        return int(found) == len(wanted), bool(locks), bool(has_meta)

    def create_tables(self, conn: Any, names: TableNames) -> None:
        complete, locks, has_meta = self._tables_state(conn, names)
        if locks and not has_meta:
            raise self.old_table(names)
        if complete:
            return  # made before (or by a migration): no CREATE privilege needed
        with conn.transaction():
            # Concurrent CREATE TABLE IF NOT EXISTS can collide in the catalog: serialise,
            # and look again once serialised (another process may have made them).
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                         ("celery_singleton_lock:" + names.locks,))
            complete, locks, has_meta = self._tables_state(conn, names)
            if locks and not has_meta:
                raise self.old_table(names)
            if complete:
                return
            for statement in ddl(names):
                conn.execute(statement)

    def st(self, t: TableNames) -> _Statements:
        s = self._statements.get(t.base)
        if s is None:
            s = self._statements[t.base] = _Statements(t)
        return s

    # -- operations --------------------------------------------------------------------------

    @staticmethod
    def _params(key: str, token: str, ttl_ms: int, cols: Columns) -> dict[str, Any]:
        return {"key": key, "token": token, "ttl_ms": ttl_ms, "owner": cols.owner,
                "renewals": cols.renewals, "meta": cols.meta}

    def op_acquire(self, conn: Any, t: TableNames, key: str, token: str, ttl_ms: int,
                   cols: Columns) -> tuple[bool, int, str | None, int]:
        s = self.st(t)
        row = conn.execute(s.acquire, self._params(key, token, ttl_ms, cols)).fetchone()
        if row is not None:
            return True, int(row[0]), None, -1
        row = conn.execute(s.holder, {"key": key}).fetchone()
        return (False, 0, row[0] or "", int(row[1])) if row else (False, 0, None, -1)

    def op_acquire_slot(self, conn: Any, t: TableNames, key: str, token: str, ttl_ms: int,
                        limit: int, cols: Columns) -> tuple[bool, int, str | None, int, int]:
        s = self.st(t)
        keys = [slot_key(key, i) for i in range(limit)]
        with conn.transaction():
            conn.execute(s.lock_base, {"name": f"celery_singleton_lock:{t.locks}:{key}"})
            rows = {r[0]: r for r in conn.execute(s.slots, {"keys": keys}).fetchall()}
            free, mine, owner, least = choose_slot(keys, rows, token)
            if mine is not None:
                got = conn.execute(s.refresh, {"key": keys[mine], "token": token,
                                               "ttl_ms": ttl_ms}).fetchone()
                if got is not None:
                    return True, int(got[0]), None, -1, mine
            if free is None:
                return False, 0, owner, least, -1
            taken = conn.execute(s.acquire, self._params(keys[free], token, ttl_ms,
                                                         cols)).fetchone()
            if taken is None:
                return False, 0, owner, least, -1
            return True, int(taken[0]), None, -1, free

    def op_release(self, conn: Any, t: TableNames, key: str, token: str | None) -> bool:
        s = self.st(t)
        params = {"key": key, "token": token, "channel": t.channel, "base": slot_base(key)}
        return conn.execute(s.release if token is not None else s.release_any,
                            params).fetchone() is not None

    def op_extend(self, conn: Any, t: TableNames, items: Sequence[Renewal],
                  count: bool) -> list[bool]:
        order = sorted(range(len(items)), key=lambda i: items[i].key)
        params = {"keys": [items[i].key for i in order],
                  "tokens": [items[i].token for i in order],
                  "ttls": [max(1, int(items[i].ttl_ms)) for i in order],
                  "count": 1 if count else 0}
        done = {r[0] for r in conn.execute(self.st(t).extend, params).fetchall()}
        return [item.key in done for item in items]

    def op_handover(self, conn: Any, t: TableNames, key: str, token: str, new_token: str,
                    ttl_ms: int, cols: Columns) -> int | None:
        sets = ""
        if cols.given_owner:
            sets += ", owner = %(owner)s"
        if cols.given_renewals:
            sets += ", renewals = %(renewals)s"
        if cols.meta != "{}":
            sets += ", meta = coalesce(meta, '{}'::jsonb) || %(meta)s::jsonb"
        sql = (f"UPDATE {_q(t.locks)} SET token = %(new)s, "
               f"expires_us = {NOW} + %(ttl_ms)s::bigint * 1000" + sets
               + f" WHERE lock_key = %(key)s AND token = %(token)s AND expires_us > {NOW}"
               " RETURNING fence")
        params = self._params(key, token, ttl_ms, cols)
        params["new"] = new_token
        row = conn.execute(sql, params).fetchone()
        return None if row is None else int(row[0])

    def op_read(self, conn: Any, t: TableNames, key: str) -> tuple[Any, ...] | None:
        row = conn.execute(self.st(t).read, {"key": key}).fetchone()
        return None if row is None else tuple(row)

    def op_held(self, conn: Any, t: TableNames, key: str) -> bool:
        return conn.execute(self.st(t).held, {"key": key}).fetchone() is not None

    def op_page(self, conn: Any, t: TableNames, low: str, high: str | None,
                after: str | None) -> list[tuple[Any, ...]]:
        s = self.st(t)
        params = {"low": low, "high": high, "after": after or "", "rows": self.page_rows}
        return [tuple(r) for r in conn.execute(s.page if high is not None else s.page_open,
                                               params).fetchall()]

    def op_follow(self, conn: Any, t: TableNames, key: str, task_id: str,
                  ttl_ms: int) -> str | None:
        s = self.st(t)
        for _ in range(3):
            row = conn.execute(s.follow, {"key": key, "task_id": task_id,
                                          "ttl_ms": ttl_ms}).fetchone()
            if row is not None:
                return None if row[0] else str(row[1])
        return None

    def op_unfollow(self, conn: Any, t: TableNames, key: str, task_id: str) -> None:
        conn.execute(self.st(t).unfollow, {"key": key, "task_id": task_id})

    def op_claim_run(self, conn: Any, t: TableNames, lock_key: str, token: str,
                     state_key: str, entry: str, previous: float, now: float) -> int:
        leader, written = conn.execute(self.st(t).claim, {
            "lock_key": lock_key, "token": token, "state_key": state_key, "entry": entry,
            "previous": float(previous), "now": float(now)}).fetchone()
        if not leader:
            return -1
        return 1 if written else 0

    def op_last_runs(self, conn: Any, t: TableNames, state_key: str) -> dict[str, float]:
        return {str(e): float(v) for e, v in
                conn.execute(self.st(t).runs, {"state_key": state_key}).fetchall()}

    def op_sweep(self, conn: Any, t: TableNames, after: str) -> tuple[str | None, int]:
        last, n_page, deleted = conn.execute(self.st(t).sweep, {
            "after": after, "rows": self.page_rows}).fetchone()
        return (last if n_page >= self.page_rows else None), int(deleted)

    # -- waiting ---------------------------------------------------------------------------

    def _get_listener(self) -> _Listener:
        with self._listener_lock:
            if self._listener is None or self._listener.pid != os.getpid():
                self._listener = _Listener(self)
            return self._listener

    def watch(self, key: str, timeout_s: float) -> threading.Event | None:
        t = table_names(key)
        base = slot_base(key)
        event = self._get_listener().watch(t.channel, base)
        try:  # releases of this key notify until the wait ends
            self.run(t, lambda c: c.execute(self.st(t).want, {
                "key": base, "wait_ms": int((timeout_s + 1.0) * 1000)}))
        except self.driver_errors:
            pass  # not told: the waiter still wakes when the lease ends, or each second
        return event

    def unwatch(self, key: str, event: threading.Event) -> None:
        listener = self._listener
        if listener is not None:
            listener.unwatch(slot_base(key), event)

    def sleep_until_released(self, key: str, watch: threading.Event | None,
                             remaining: float) -> None:
        listener = self._listener
        channel = table_names(key).channel
        if watch is None or listener is None or not listener.listening(channel):
            # No notification (the listening connection is down): poll.
            super().sleep_until_released(key, None, remaining)
            return
        # A lapse sends no notification: wake when the holder's lease ends, if sooner.
        wait = min(remaining, WAIT_RECHECK_S)
        t = table_names(key)
        try:
            row = self.run(t, lambda c: c.execute(self.st(t).holder, {"key": key}).fetchone())
        except self.driver_errors:
            row = None
        if row is not None and int(row[1]) >= 0:
            wait = min(wait, int(row[1]) / 1000.0 + 0.005)
        watch.wait(wait)

    def close(self) -> None:
        with self._listener_lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()
        super().close()


class _Listener:
    """One ``LISTEN`` connection per store and process, read by a daemon thread that wakes
    the waiters of each released key."""

    def __init__(self, backend: PostgresBackend) -> None:
        self.pid = os.getpid()
        self._backend = weakref.proxy(backend)
        self._lock = threading.Condition()
        self._waiters: dict[str, set[threading.Event]] = {}
        self._wanted: set[str] = set()
        self._on: set[str] = set()
        self._stop = False
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._thread = threading.Thread(target=self._run, name="celery-singleton-lock-listen",
                                        daemon=True)
        self._thread.start()

    def listening(self, channel: str) -> bool:
        return channel in self._on

    def watch(self, channel: str, key: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._waiters.setdefault(key, set()).add(event)
            if channel not in self._wanted:
                self._wanted.add(channel)
                self._poke()
            # LISTEN must be in force before the first try, or a release between the try
            # and the wait would go unseen.
            deadline = time.monotonic() + 2.0
            while channel not in self._on and not self._stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    break  # the caller polls meanwhile
                self._lock.wait(left)
        return event

    def unwatch(self, key: str, event: threading.Event) -> None:
        with self._lock:
            events = self._waiters.get(key)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiters[key]

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._w, b"x")
        except OSError:
            pass

    def _wake(self, key: str | None) -> None:
        with self._lock:
            if key is None:
                events = [e for es in self._waiters.values() for e in es]
            else:
                events = list(self._waiters.get(key, ()))
        for event in events:
            event.set()

    def _listen(self, conn: Any) -> None:
        with self._lock:
            todo = self._wanted - self._on
        for channel in todo:
            conn.execute(f"LISTEN {_q(channel)}")
        with self._lock:
            self._on |= todo
            self._lock.notify_all()

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop:
            conn = None
            try:
                conn = self._backend.connect()
                self._listen(conn)
                backoff = 0.05
                self._wake(None)  # releases while no connection listened went unseen
                while not self._stop:
                    ready, _, _ = select.select([conn.fileno(), self._r], [], [], 5.0)
                    if self._r in ready:
                        try:
                            os.read(self._r, 4096)
                        except OSError:
                            pass
                        self._listen(conn)
                    if conn.fileno() in ready:
                        got = False
                        for note in conn.notifies(timeout=0.0):
                            got = True
                            self._wake(note.payload)
                        if not got:  # readable but no notification: is it still there?
                            conn.execute("SELECT 1")
            except ReferenceError:
                return
            except Exception as exc:
                logger.debug("lock release listener: %s", redact_url(str(exc)))
                with self._lock:
                    self._on.clear()
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
