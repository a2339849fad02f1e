"""The MySQL / MariaDB lock store (``mysql://``, ``mariadb://``), on PyMySQL.

A lock is a row of a lease table (:mod:`.sql` describes the tables). MySQL has no
``RETURNING`` on ``UPDATE`` and no ``ON CONFLICT ... WHERE``, so where an operation must read
what it wrote, the statement and the read of its row go together in one round trip (a
multi-statement query):

* acquire: ``UPDATE ... WHERE lock_key = ? AND expires_us <= now`` of a free row, its new
  fencing token returned through ``LAST_INSERT_ID(expr)`` (one round trip, the common case).
  Where that changed no row, a plain read of the row names the holder; for a key without a
  row (or a refresh of our own lock), ``INSERT ... ON DUPLICATE KEY UPDATE`` whose assignments
  take the row only when the lease expired or is ours (the ``token`` assignment comes first
  and the ``expires_us`` one last, since MySQL evaluates them in order, each seeing the ones
  before it), then ``SELECT`` of the row: the lock is ours if the row shows our token;
* release: an owner-checked ``UPDATE`` marking the row free;
* renewal: one ``UPDATE ... WHERE lock_key IN (...) AND token = CASE lock_key ...`` per batch,
  and the rows read back.

Expiry is on the server's clock (``NOW(6)``, with the session's time zone at UTC). The session
uses READ COMMITTED; ``lock_limit`` slots and beat's claims take a short transaction that
locks the base key's row (slots) or the leader's lock row (beat) first.

MySQL has no notification a waiter could sleep on across connections (``GET_LOCK`` would tie
the lock to one connection, and a prefork worker's main process must renew its children's
locks from another), so ``wait`` polls: one primary-key read every 50-100 ms (jittered) per
waiting task, and an acquire attempt when the row is free.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import LockConfigError
from ..urls import redact_url
from .base import Renewal
from .sql import (
    PAGE_ROWS,
    READ_COLUMNS,
    Columns,
    SQLBackend,
    TableNames,
    slot_key,
)

__all__ = ["MySQLBackend"]

#: The server's clock in microseconds, fixed for the statement (session time zone UTC).
NOW = "CAST(UNIX_TIMESTAMP(NOW(6)) * 1000000 AS SIGNED)"
_META = ("owner", "task", "hostname", "pid", "mode", "acquired_at", "lock_ttl", "renewals",
         "extra")
_COLS = ", ".join(READ_COLUMNS)
#: Query parameters of a mysql:// URL.
_OPTIONS = ("unix_socket", "ssl", "ssl_ca", "ssl_cert", "ssl_key", "connect_timeout")
#: A connection idle longer than this is pinged before use (PyMySQL cannot tell otherwise
#: that the server ended it).
PING_AFTER_IDLE_S = 1.0


def _q(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


_INSERT = """
INSERT INTO {locks} (lock_key, token, expires_us, fence, last_fence, acquired_us,
    owner, task, hostname, pid, mode, acquired_at, lock_ttl, renewals, extra)
VALUES (%(key)s, %(token)s, {now} + %(ttl_ms)s * 1000, {fence}, {fence}, {now},
    %(owner)s, %(task)s, %(hostname)s, %(pid)s, %(mode)s,
    COALESCE(%(acquired_at)s, {now} / 1000000), %(lock_ttl)s, %(renewals)s, %(extra)s)
ON DUPLICATE KEY UPDATE
    token = IF(expires_us <= VALUES(acquired_us) {mine}, VALUES(token), token),
    fence = IF({took}, {new_fence}, fence),
    last_fence = IF({took}, fence, last_fence),
    acquired_us = IF({took}, VALUES(acquired_us), acquired_us),
    {keep},
    expires_us = IF(token = VALUES(token) AND ({took} OR expires_us > VALUES(acquired_us)),
                    VALUES(expires_us), expires_us)"""


class _Statements:
    def __init__(self, t: TableNames) -> None:
        locks, nxt, runs = _q(t.locks), _q(t.next), _q(t.runs)
        # Evaluated after ``token`` is assigned: the row was free (or expired) and is ours.
        took = "(expires_us <= VALUES(acquired_us) AND token = VALUES(token))"
        keep = ",\n    ".join(f"{c} = IF({took}, VALUES({c}), {c})" for c in _META)
        # The common case, a row that exists and is free: one plain UPDATE (cheaper for
        # InnoDB than INSERT ... ON DUPLICATE KEY UPDATE), whose new fencing token comes
        # back in the reply's insert id (LAST_INSERT_ID(expr)), so nothing is read after.
        sets = ", ".join(f"{c} = %({c})s" for c in _META if c != "acquired_at")
        self.take = f"""
UPDATE {locks} SET token = %(token)s,
    fence = LAST_INSERT_ID(GREATEST(last_fence + 1, {NOW})),
    last_fence = fence, acquired_us = {NOW}, {sets},
    acquired_at = COALESCE(%(acquired_at)s, {NOW} / 1000000),
    expires_us = {NOW} + %(ttl_ms)s * 1000
WHERE lock_key = %(key)s AND expires_us <= {NOW}"""
        self.acquire = _INSERT.format(
            locks=locks, now=NOW, fence=NOW, mine="OR token = VALUES(token)", took=took,
            new_fence="GREATEST(last_fence + 1, VALUES(fence))", keep=keep,
        ) + f""";
SELECT token = %(token)s, fence, owner, (expires_us - {NOW}) DIV 1000 FROM {locks}
WHERE lock_key = %(key)s"""
        # lock_limit: the base row's counter, raised (under the base row's lock) first.
        self.take_slot = _INSERT.format(
            locks=locks, now=NOW, fence="%(fence)s", mine="", took=took,
            new_fence="VALUES(fence)", keep=keep,
        ) + f""";
SELECT token = %(token)s, fence FROM {locks} WHERE lock_key = %(key)s"""
        self.lock_base = f"""
INSERT INTO {locks} (lock_key, acquired_us) VALUES (%(key)s, {NOW})
ON DUPLICATE KEY UPDATE last_fence = last_fence"""
        self.bump_base = f"""
UPDATE {locks} SET last_fence = GREATEST(last_fence + 1, {NOW}), acquired_us = {NOW}
WHERE lock_key = %(key)s;
SELECT last_fence FROM {locks} WHERE lock_key = %(key)s"""
        self.slots = f"""
SELECT lock_key, token, owner, (expires_us - {NOW}) DIV 1000 FROM {locks}
WHERE lock_key IN %(keys)s"""
        self.refresh = f"""
UPDATE {locks} SET expires_us = {NOW} + %(ttl_ms)s * 1000
WHERE lock_key = %(key)s AND token = %(token)s AND expires_us > {NOW};
SELECT fence FROM {locks} WHERE lock_key = %(key)s AND token = %(token)s
  AND expires_us > {NOW}"""
        self.peek = f"""
SELECT token = %(token)s, fence, owner, (expires_us - {NOW}) DIV 1000 FROM {locks}
WHERE lock_key = %(key)s"""
        self.holder = f"""
SELECT owner, (expires_us - {NOW}) DIV 1000 FROM {locks}
WHERE lock_key = %(key)s AND expires_us > {NOW}"""
        self.release = f"""
UPDATE {locks} SET token = NULL, expires_us = 0
WHERE lock_key = %(key)s AND token = %(token)s AND expires_us > {NOW}"""
        self.release_any = f"""
UPDATE {locks} SET token = NULL, expires_us = 0
WHERE lock_key = %(key)s AND expires_us > {NOW}"""
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
INSERT INTO {nxt} (lock_key, task_id, expires_us)
VALUES (%(key)s, %(task_id)s, {NOW} + %(ttl_ms)s * 1000)
ON DUPLICATE KEY UPDATE
    task_id = IF(task_id = VALUES(task_id) OR expires_us <= {NOW}
                 OR task_id = (SELECT owner FROM {locks}
                               WHERE lock_key = %(key)s AND expires_us > {NOW}),
                 VALUES(task_id), task_id),
    expires_us = IF(task_id = VALUES(task_id), VALUES(expires_us), expires_us);
SELECT task_id FROM {nxt} WHERE lock_key = %(key)s"""
        self.unfollow = f"DELETE FROM {nxt} WHERE lock_key = %(key)s AND task_id = %(task_id)s"
        self.leader = f"""
SELECT 1 FROM {locks} WHERE lock_key = %(lock_key)s AND token = %(token)s
  AND expires_us > {NOW} FOR UPDATE"""
        self.last_run = f"""
SELECT last_run FROM {runs} WHERE state_key = %(state_key)s AND entry = %(entry)s FOR UPDATE"""
        self.write_run = f"""
INSERT INTO {runs} (state_key, entry, last_run) VALUES (%(state_key)s, %(entry)s, %(now)s)
ON DUPLICATE KEY UPDATE last_run = VALUES(last_run)"""
        self.runs = f"SELECT entry, last_run FROM {runs} WHERE state_key = %(state_key)s"
        self.sweep_page = f"""
SELECT MAX(lock_key), COUNT(*) FROM (SELECT lock_key FROM {locks} WHERE lock_key > %(after)s
                                     ORDER BY lock_key LIMIT %(rows)s) p"""
        self.sweep = f"""
DELETE FROM {locks} WHERE lock_key > %(after)s AND lock_key <= %(last)s
  AND expires_us <= {NOW} AND acquired_us < {NOW} - %(fence_ttl_ms)s * 1000;
DELETE FROM {nxt} WHERE expires_us <= {NOW} LIMIT {PAGE_ROWS}"""


def ddl(t: TableNames) -> list[str]:
    """The tables of one key prefix (also printed in the README)."""
    table = "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
    return [
        f"""CREATE TABLE IF NOT EXISTS {_q(t.locks)} (
    lock_key    VARCHAR(512) NOT NULL PRIMARY KEY,  -- binary collation: prefix ranges
    token       VARCHAR(255) NULL,                  -- the holder's token; NULL when free
    expires_us  BIGINT NOT NULL DEFAULT 0,          -- lease end, server clock, µs (UTC)
    fence       BIGINT NOT NULL DEFAULT 0,          -- fencing token of the current holding
    last_fence  BIGINT NOT NULL DEFAULT 0,          -- the key's counter (slots: base row)
    acquired_us BIGINT NOT NULL DEFAULT 0,          -- last acquisition (sweep)
    owner       VARCHAR(255) NOT NULL DEFAULT '',   -- holder's task id
    task        VARCHAR(1024) NOT NULL DEFAULT '',
    hostname    VARCHAR(255) NOT NULL DEFAULT '',
    pid         BIGINT NULL,
    mode        VARCHAR(64) NOT NULL DEFAULT '',
    acquired_at DOUBLE NULL,                        -- unix seconds
    lock_ttl    DOUBLE NULL,                        -- seconds
    renewals    INT NOT NULL DEFAULT 0,
    extra       TEXT NULL                           -- other metadata fields, JSON
) {table}""",
        f"""CREATE TABLE IF NOT EXISTS {_q(t.next)} (
    lock_key    VARCHAR(512) NOT NULL PRIMARY KEY,
    task_id     VARCHAR(255) NOT NULL,
    expires_us  BIGINT NOT NULL
) {table}""",
        f"""CREATE TABLE IF NOT EXISTS {_q(t.runs)} (
    state_key   VARCHAR(250) NOT NULL,
    entry       VARCHAR(500) NOT NULL,
    last_run    DOUBLE NOT NULL,                    -- unix seconds
    PRIMARY KEY (state_key, entry)
) {table}""",
    ]


class MySQLBackend(SQLBackend):
    """Locks in a MySQL or MariaDB database (one URL)."""

    schemes = ("mysql", "mariadb")
    extra = "mysql"

    def __init__(self, url: str, params: dict[str, Any], *, socket_timeout: float,
                 fence_ttl_ms: int) -> None:
        import pymysql  # type: ignore[import-untyped]

        super().__init__(url, socket_timeout=socket_timeout, fence_ttl_ms=fence_ttl_ms)
        self._pymysql = pymysql
        self.driver_errors = (pymysql.err.Error, OSError)
        self._params = params
        self._statements: dict[str, _Statements] = {}

    @classmethod
    def from_urls(cls, urls: Sequence[str], *, socket_timeout: float, fence_ttl_ms: int,
                  setting: str) -> MySQLBackend:
        url = cls.check_single(urls, setting)
        try:
            import pymysql  # noqa: F401
        except ImportError as exc:
            raise cls.missing_driver(setting, exc, url) from exc
        params = cls.parse_url(url, setting, socket_timeout)
        return cls(url, params, socket_timeout=socket_timeout, fence_ttl_ms=fence_ttl_ms)

    @classmethod
    def parse_url(cls, url: str, setting: str, socket_timeout: float) -> dict[str, Any]:
        def bad(why: str) -> LockConfigError:
            return LockConfigError(f"{setting}: {why}: {redact_url(url)}", setting=setting)

        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise bad("cannot parse the MySQL URL") from None
        if parts.scheme.lower() not in cls.schemes:
            raise bad("not a mysql:// or mariadb:// URL")
        database = unquote(parts.path.lstrip("/"))
        if not database or "/" in database:
            raise bad("the URL must name one database (mysql://user:password@host:3306/db)")
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(query) - set(_OPTIONS))
        if unknown:
            raise bad(f"unknown URL parameter(s) {', '.join(unknown)} (known: "
                      f"{', '.join(_OPTIONS)})")
        timeout_s = max(1.0, 5.0 * socket_timeout)
        params: dict[str, Any] = {
            "host": unquote(parts.hostname or "localhost"),
            "port": port or 3306,
            "user": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password is not None else "",
            "database": database,
            "connect_timeout": max(2, int(timeout_s) + 1),
            "read_timeout": timeout_s,
            "write_timeout": timeout_s,
            "lock_wait_s": max(1, int(timeout_s)),
        }
        one = {k: v[-1] for k, v in query.items()}
        if "unix_socket" in one:
            params["unix_socket"] = one["unix_socket"]
        if "connect_timeout" in one:
            try:
                params["connect_timeout"] = max(1, int(float(one["connect_timeout"])))
            except ValueError:
                raise bad("connect_timeout must be a number of seconds") from None
        ssl = {k[4:]: v for k, v in one.items() if k.startswith("ssl_") and v}
        if ssl or one.get("ssl", "").lower() in ("1", "true", "yes", "required"):
            params["ssl"] = ssl or {"check_hostname": True}
        return params

    # -- driver hooks ----------------------------------------------------------------------

    def connect(self) -> Any:
        pymysql = self._pymysql
        p = dict(self._params)
        lock_wait = p.pop("lock_wait_s")
        conn = pymysql.connect(autocommit=True, charset="utf8mb4",
                               client_flag=pymysql.constants.CLIENT.MULTI_STATEMENTS, **p)
        try:
            self._multi(conn, "SET time_zone = '+00:00', innodb_lock_wait_timeout = %(w)s;"
                        " SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED", {"w": lock_wait})
        except BaseException:
            self.discard(conn)
            raise
        return conn

    def usable(self, conn: Any, idle_s: float) -> bool:
        if not conn.open:
            return False
        if idle_s > PING_AFTER_IDLE_S:
            try:
                conn.ping(reconnect=False)
            except self.driver_errors:
                return False
        return True

    def discard(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            conn.close()

    def connection_lost(self, conn: Any, exc: BaseException) -> bool:
        err = self._pymysql.err
        if isinstance(exc, err.InterfaceError) or not conn.open:
            return True
        # 2006 server has gone away, 2013 lost connection, 4031 disconnected for inactivity.
        return (isinstance(exc, err.OperationalError) and bool(exc.args)
                and exc.args[0] in (2006, 2013, 4031))

    def missing_table(self, exc: BaseException) -> bool:
        return (isinstance(exc, self._pymysql.err.ProgrammingError) and bool(exc.args)
                and exc.args[0] == 1146)

    @classmethod
    def ddl(cls, names: TableNames) -> list[str]:
        return ddl(names)

    def create_tables(self, conn: Any, names: TableNames) -> None:
        wanted = [names.locks, names.next, names.runs]
        rows = self._one_set(conn, "SELECT table_name FROM information_schema.tables "
                             "WHERE table_schema = DATABASE() AND table_name IN %(names)s",
                             {"names": wanted})
        if len(rows) >= len(wanted):
            return  # made before (or by a migration): no CREATE privilege needed
        for statement in ddl(names):
            self._one_set(conn, statement, None)

    def st(self, t: TableNames) -> _Statements:
        s = self._statements.get(t.base)
        if s is None:
            s = self._statements[t.base] = _Statements(t)
        return s

    # -- running -----------------------------------------------------------------------------

    @staticmethod
    def _multi(conn: Any, sql: str, params: Any) -> list[tuple[int, list[tuple[Any, ...]]]]:
        """Every result of a multi-statement query: (rows affected, rows) per statement."""
        cur = conn.cursor()
        try:
            cur.execute(sql, params)
            results = [(cur.rowcount, list(cur.fetchall() or ()))]
            while cur.nextset():
                results.append((cur.rowcount, list(cur.fetchall() or ())))
            return results
        finally:
            cur.close()

    def _one_set(self, conn: Any, sql: str, params: Any) -> list[tuple[Any, ...]]:
        return self._multi(conn, sql, params)[-1][1]

    @staticmethod
    def _args(key: str, token: str, ttl_ms: int, cols: Columns) -> dict[str, Any]:
        return {"key": key, "token": token, "ttl_ms": ttl_ms, "owner": cols.owner,
                "task": cols.task, "hostname": cols.hostname, "pid": cols.pid,
                "mode": cols.mode, "acquired_at": cols.acquired_at, "lock_ttl": cols.lock_ttl,
                "renewals": cols.renewals, "extra": cols.extra}

    # -- operations --------------------------------------------------------------------------

    def op_acquire(self, conn: Any, t: TableNames, key: str, token: str, ttl_ms: int,
                   cols: Columns) -> tuple[bool, int, str | None, int]:
        s = self.st(t)
        args = self._args(key, token, ttl_ms, cols)
        cur = conn.cursor()
        try:
            cur.execute(s.take, args)
            if cur.rowcount == 1 and cur.lastrowid:
                return True, int(cur.lastrowid), None, -1
        finally:
            cur.close()
        # Not free: held by another (a plain read says by whom, and writes nothing), or no
        # row yet, or ours already: the statement that inserts or refreshes atomically.
        rows = self._one_set(conn, s.peek, {"key": key, "token": token})
        if rows and not rows[0][0] and int(rows[0][3]) > 0:
            return False, 0, rows[0][2] or "", int(rows[0][3])
        rows = self._one_set(conn, s.acquire, args)
        if not rows:  # swept between the two statements: it was not taken
            return False, 0, None, -1
        mine, fence, owner, pttl = rows[0]
        if mine and int(pttl) > 0:
            return True, int(fence), None, -1
        if int(pttl) <= 0:
            return False, 0, None, -1
        return False, 0, owner or "", int(pttl)

    def op_acquire_slot(self, conn: Any, t: TableNames, key: str, token: str, ttl_ms: int,
                        limit: int, cols: Columns) -> tuple[bool, int, str | None, int, int]:
        s = self.st(t)
        keys = [slot_key(key, i) for i in range(limit)]
        conn.begin()
        try:
            self._multi(conn, s.lock_base, {"key": key})
            rows = {r[0]: r for r in self._one_set(conn, s.slots, {"keys": keys})}
            free = None
            owner, least = "", -1
            for i, k in enumerate(keys):
                row = rows.get(k)
                if row is None or int(row[3]) <= 0:
                    free = i if free is None else free
                    continue
                if row[1] == token:
                    got = self._one_set(conn, s.refresh, {"key": k, "token": token,
                                                          "ttl_ms": ttl_ms})
                    if got:
                        conn.commit()
                        return True, int(got[0][0]), None, -1, i
                if least < 0 or int(row[3]) < least:
                    owner, least = row[2] or "", int(row[3])
            if free is None:
                conn.commit()
                return False, 0, owner, least, -1
            fence = int(self._one_set(conn, s.bump_base, {"key": key})[0][0])
            args = self._args(keys[free], token, ttl_ms, cols)
            args["fence"] = fence
            got = self._one_set(conn, s.take_slot, args)
            conn.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                conn.rollback()
            raise
        if got and got[0][0]:
            return True, int(got[0][1]), None, -1, free
        return False, 0, owner, least, -1

    def op_release(self, conn: Any, t: TableNames, key: str, token: str | None) -> bool:
        s = self.st(t)
        if token is None:
            return self._multi(conn, s.release_any, {"key": key})[0][0] > 0
        return self._multi(conn, s.release, {"key": key, "token": token})[0][0] > 0

    def op_extend(self, conn: Any, t: TableNames, items: Sequence[Renewal],
                  count: bool) -> list[bool]:
        locks = _q(t.locks)
        ttl_case = " ".join("WHEN %s THEN %s" for _ in items)
        token_case = " ".join("WHEN %s THEN %s" for _ in items)
        marks = ", ".join("%s" for _ in items)
        sql = (f"UPDATE {locks} SET expires_us = {NOW} + 1000 * CASE lock_key {ttl_case} END, "
               f"renewals = renewals + %s WHERE lock_key IN ({marks}) "
               f"AND token = CASE lock_key {token_case} END AND expires_us > {NOW}; "
               f"SELECT lock_key, token, expires_us - {NOW} FROM {locks} "
               f"WHERE lock_key IN ({marks})")
        args: list[Any] = []
        for item in items:
            args += [item.key, max(1, int(item.ttl_ms))]
        args.append(1 if count else 0)
        args += [item.key for item in items]
        for item in items:
            args += [item.key, item.token]
        args += [item.key for item in items]
        rows = {r[0]: r for r in self._one_set(conn, sql, args)}
        out = []
        for item in items:
            row = rows.get(item.key)
            out.append(row is not None and row[1] == item.token and int(row[2]) > 0)
        return out

    def op_handover(self, conn: Any, t: TableNames, key: str, token: str, new_token: str,
                    ttl_ms: int, cols: Columns, given: list[str]) -> int | None:
        locks = _q(t.locks)
        sets = [f"{c} = %({c})s" for c in given]
        if cols.extra is not None:
            sets.append("extra = JSON_MERGE_PATCH(COALESCE(extra, '{}'), %(extra)s)")
        sql = (f"UPDATE {locks} SET token = %(new)s, expires_us = {NOW} + %(ttl_ms)s * 1000"
               + "".join(", " + x for x in sets)
               + f" WHERE lock_key = %(key)s AND token = %(token)s AND expires_us > {NOW}; "
               f"SELECT fence FROM {locks} WHERE lock_key = %(key)s AND token = %(new)s "
               f"AND expires_us > {NOW}")
        args = self._args(key, token, ttl_ms, cols)
        args["new"] = new_token
        results = self._multi(conn, sql, args)
        if results[0][0] <= 0 or not results[-1][1]:
            return None
        return int(results[-1][1][0][0])

    def op_read(self, conn: Any, t: TableNames, key: str) -> tuple[Any, ...] | None:
        rows = self._one_set(conn, self.st(t).read, {"key": key})
        return tuple(rows[0]) if rows else None

    def op_held(self, conn: Any, t: TableNames, key: str) -> bool:
        return bool(self._one_set(conn, self.st(t).held, {"key": key}))

    def op_page(self, conn: Any, t: TableNames, low: str, high: str | None,
                after: str | None) -> list[tuple[Any, ...]]:
        s = self.st(t)
        return [tuple(r) for r in self._one_set(
            conn, s.page if high is not None else s.page_open,
            {"low": low, "high": high, "after": after or "", "rows": self.page_rows})]

    def op_follow(self, conn: Any, t: TableNames, key: str, task_id: str,
                  ttl_ms: int) -> str | None:
        rows = self._one_set(conn, self.st(t).follow, {"key": key, "task_id": task_id,
                                                        "ttl_ms": ttl_ms})
        if not rows or rows[0][0] == task_id:
            return None
        return str(rows[0][0])

    def op_unfollow(self, conn: Any, t: TableNames, key: str, task_id: str) -> None:
        self._multi(conn, self.st(t).unfollow, {"key": key, "task_id": task_id})

    def op_claim_run(self, conn: Any, t: TableNames, lock_key: str, token: str,
                     state_key: str, entry: str, previous: float, now: float) -> int:
        s = self.st(t)
        args = {"lock_key": lock_key, "token": token, "state_key": state_key,
                "entry": entry, "now": float(now)}
        conn.begin()
        try:
            if not self._one_set(conn, s.leader, args):
                conn.rollback()
                return -1
            last = self._one_set(conn, s.last_run, args)
            if last and float(last[0][0]) > float(previous) + 0.0005:
                conn.commit()
                return 0
            self._multi(conn, s.write_run, args)
            conn.commit()
            return 1
        except BaseException:
            with contextlib.suppress(Exception):
                conn.rollback()
            raise

    def op_last_runs(self, conn: Any, t: TableNames, state_key: str) -> dict[str, float]:
        return {str(e): float(v) for e, v in
                self._one_set(conn, self.st(t).runs, {"state_key": state_key})}

    def op_sweep(self, conn: Any, t: TableNames, after: str) -> tuple[str | None, int]:
        s = self.st(t)
        last, n_page = self._one_set(conn, s.sweep_page,
                                     {"after": after, "rows": self.page_rows})[0]
        deleted = 0
        results = self._multi(conn, s.sweep, {"after": after, "last": last or after,
                                              "fence_ttl_ms": self.fence_ttl_ms})
        deleted = sum(max(0, n) for n, _ in results)
        return (last if int(n_page) >= self.page_rows else None), deleted
