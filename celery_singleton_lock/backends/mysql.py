"""The MySQL / MariaDB lock store (``mysql://``, ``mariadb://``), on PyMySQL.

A lock is a row of a lease table (:mod:`.sql` describes the tables), each operation a
statement in autocommit mode:

* acquire: one ``INSERT`` of the row, its fencing token the table's ``AUTO_INCREMENT`` value
  (the reply's insert id, so nothing is read after). Where the key has a row, a read of it
  says whose: another holder's (not taken), ours (the lease is refreshed and keeps its fence),
  or a lapsed lease, which is deleted (``DELETE ... WHERE expires_us <= now``) before the
  ``INSERT`` is tried again;
* release: an owner-checked ``DELETE``;
* renewal: one ``UPDATE ... WHERE lock_key IN (...) AND token = CASE lock_key ...`` per batch,
  and the rows read back in the same round trip (a multi-statement query).

``AUTO_INCREMENT`` is persistent in InnoDB from MariaDB 10.2.4 and MySQL 8.0 on, so a token is
never given twice, also across server restarts; the store starts the counter at the server's
time in microseconds when it creates the table. Expiry is on the server's clock (``NOW(6)``,
with the session's time zone at UTC). The session uses READ COMMITTED; ``lock_limit`` slots
and beat's claims take a short transaction that locks the base key's row (slots) or the
leader's lock row (beat) first.

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
    choose_slot,
    slot_key,
)

__all__ = ["MySQLBackend"]

#: The server's clock in microseconds, fixed for the statement (session time zone UTC).
NOW = "CAST(UNIX_TIMESTAMP(NOW(6)) * 1000000 AS SIGNED)"
_COLS = ", ".join(READ_COLUMNS)
#: Query parameters of a mysql:// URL.
_OPTIONS = ("unix_socket", "ssl", "ssl_ca", "ssl_cert", "ssl_key", "connect_timeout")
#: A connection idle longer than this is pinged before use (PyMySQL cannot tell otherwise
#: that the server ended it).
PING_AFTER_IDLE_S = 1.0
#: Tries of an acquire that finds a lapsed row (deleted, then inserted again) or loses a race.
ACQUIRE_TRIES = 5
#: ER_DUP_ENTRY: the key has a row.
DUP_ENTRY = 1062
#: ER_LOCK_DEADLOCK: the statement was rolled back to break a deadlock.
DEADLOCK = 1213


def _q(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


class _Statements:
    def __init__(self, t: TableNames) -> None:
        locks, nxt, runs = _q(t.locks), _q(t.next), _q(t.runs)
        self.insert = f"""
INSERT INTO {locks} (lock_key, token, expires_us, acquired_us, owner, renewals, meta)
VALUES (%s, %s, {NOW} + %s, {NOW}, %s, %s, %s)"""
        self.peek = f"""
SELECT token = %s, fence, owner, (expires_us - {NOW}) DIV 1000 FROM {locks}
WHERE lock_key = %s"""
        self.refresh = f"""
UPDATE {locks} SET expires_us = {NOW} + %s
WHERE lock_key = %s AND token = %s AND expires_us > {NOW}"""
        self.drop_lapsed = f"DELETE FROM {locks} WHERE lock_key = %s AND expires_us <= {NOW}"
        # lock_limit: the base key's row (never a lock itself) serialises its slots.
        self.lock_base = f"""
INSERT INTO {locks} (lock_key, token, expires_us, acquired_us) VALUES (%s, '', 0, {NOW})
ON DUPLICATE KEY UPDATE expires_us = expires_us"""
        self.slots = f"""
SELECT lock_key, token, owner, (expires_us - {NOW}) DIV 1000, fence FROM {locks}
WHERE lock_key IN %s"""
        self.holder = f"""
SELECT owner, (expires_us - {NOW}) DIV 1000 FROM {locks}
WHERE lock_key = %(key)s AND expires_us > {NOW}"""
        self.release = f"""
DELETE FROM {locks} WHERE lock_key = %s AND token = %s AND expires_us > {NOW}"""
        self.release_any = f"DELETE FROM {locks} WHERE lock_key = %s AND expires_us > {NOW}"
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
    task_id = IF(task_id = %(task_id)s OR expires_us <= {NOW}
                 OR task_id = (SELECT owner FROM {locks}
                               WHERE lock_key = %(key)s AND expires_us > {NOW}),
                 %(task_id)s, task_id),
    expires_us = IF(task_id = %(task_id)s, {NOW} + %(ttl_ms)s * 1000, expires_us);
SELECT task_id FROM {nxt} WHERE lock_key = %(key)s"""
        self.unfollow = f"DELETE FROM {nxt} WHERE lock_key = %(key)s AND task_id = %(task_id)s"
        self.leader = f"""
SELECT 1 FROM {locks} WHERE lock_key = %(lock_key)s AND token = %(token)s
  AND expires_us > {NOW} FOR UPDATE"""
        self.last_run = f"""
SELECT last_run FROM {runs} WHERE state_key = %(state_key)s AND entry = %(entry)s FOR UPDATE"""
        self.write_run = f"""
INSERT INTO {runs} (state_key, entry, last_run) VALUES (%(state_key)s, %(entry)s, %(now)s)
ON DUPLICATE KEY UPDATE last_run = %(now)s"""
        self.runs = f"SELECT entry, last_run FROM {runs} WHERE state_key = %(state_key)s"
        self.sweep_page = f"""
SELECT MAX(lock_key), COUNT(*) FROM (SELECT lock_key FROM {locks} WHERE lock_key > %(after)s
                                     ORDER BY lock_key LIMIT %(rows)s) p"""
        self.sweep = f"""
DELETE FROM {locks} WHERE lock_key > %(after)s AND lock_key <= %(last)s
  AND expires_us <= {NOW};
DELETE FROM {nxt} WHERE expires_us <= {NOW} LIMIT {PAGE_ROWS}"""


def ddl(t: TableNames) -> list[str]:
    """The tables of one key prefix, and the start of its fencing counter (also printed in
    the README)."""
    table = "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
    locks = _q(t.locks)
    return [
        f"""CREATE TABLE IF NOT EXISTS {locks} (
    lock_key    VARCHAR(512) NOT NULL PRIMARY KEY,  -- binary collation: prefix ranges
    token       VARCHAR(255) NOT NULL,              -- the holder's token
    expires_us  BIGINT NOT NULL,                    -- lease end, server clock, µs (UTC)
    fence       BIGINT NOT NULL AUTO_INCREMENT,     -- fencing token: the table's counter
    acquired_us BIGINT NOT NULL,                    -- acquisition, server clock, µs
    owner       VARCHAR(255) NOT NULL DEFAULT '',   -- holder's task id
    renewals    INT NOT NULL DEFAULT 0,
    meta        TEXT NULL,                          -- task, hostname, pid, mode, ...: JSON
    KEY (fence)
) {table}""",
        # Start the counter at the server's time in µs (never lowers it: InnoDB keeps the
        # larger of the two), so a table made again gives tokens above the old table's.
        f"""SET @csl_fence = CONCAT('ALTER TABLE {locks.replace("'", "''")} AUTO_INCREMENT = ',
    CAST(UNIX_TIMESTAMP(NOW(6)) * 1000000 AS SIGNED));
PREPARE csl_fence FROM @csl_fence; EXECUTE csl_fence; DEALLOCATE PREPARE csl_fence""",
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
        rows = self._one_set(conn, "SELECT table_name, column_name FROM information_schema.columns"
                             " WHERE table_schema = DATABASE() AND table_name IN %(names)s"
                             " AND column_name IN ('lock_key', 'meta', 'state_key')",
                             {"names": wanted})
        found = {(str(t), str(c)) for t, c in rows}
        if (names.locks, "lock_key") in found and (names.locks, "meta") not in found:
            raise self.old_table(names)
        if {(names.locks, "meta"), (names.next, "lock_key"), (names.runs, "state_key")} <= found:
            return  # made before (or by a migration): no CREATE privilege needed
        for statement in ddl(names):
            self._multi(conn, statement, None)

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

    # -- operations --------------------------------------------------------------------------

    def op_acquire(self, conn: Any, t: TableNames, key: str, token: str, ttl_ms: int,
                   cols: Columns) -> tuple[bool, int, str | None, int]:
        s = self.st(t)
        cur = conn.cursor()
        try:
            for _ in range(ACQUIRE_TRIES):
                try:
                    if self._insert(cur, s, key, token, ttl_ms, cols):
                        return True, int(cur.lastrowid), None, -1
                    # The key has a row: whose, and is its lease still running?
                    cur.execute(s.peek, (token, key))
                    row = cur.fetchone()
                    if row is None:
                        continue  # released (or swept) since: insert again
                    mine, fence, owner, pttl = row
                    if int(pttl) > 0 and not mine:
                        return False, 0, owner or "", int(pttl)
                    if int(pttl) > 0:  # ours already: a refresh keeps the fence
                        if cur.execute(s.refresh, (ttl_ms * 1000, key, token)) == 1:
                            return True, int(fence), None, -1
                        continue
                    cur.execute(s.drop_lapsed, (key,))  # a lapsed lease: anyone may take it
                except self._pymysql.err.OperationalError as exc:
                    # InnoDB chose this statement as a deadlock victim: INSERTs of one key
                    # racing its DELETE wait for each other's locks on the deleted record.
                    # The key is contended, the database well: look again.
                    if not exc.args or exc.args[0] != DEADLOCK:
                        raise
            return False, 0, None, -1
        finally:
            cur.close()

    def _insert(self, cur: Any, s: _Statements, key: str, token: str, ttl_ms: int,
                cols: Columns) -> bool:
        """The row inserted (True), or the key has one already (False)."""
        try:
            cur.execute(s.insert, (key, token, ttl_ms * 1000, cols.owner, cols.renewals,
                                   cols.meta))
        except self._pymysql.err.IntegrityError as exc:
            if exc.args and exc.args[0] == DUP_ENTRY:
                return False
            raise
        return True

    def op_acquire_slot(self, conn: Any, t: TableNames, key: str, token: str, ttl_ms: int,
                        limit: int, cols: Columns) -> tuple[bool, int, str | None, int, int]:
        s = self.st(t)
        keys = [slot_key(key, i) for i in range(limit)]
        conn.begin()
        cur = conn.cursor()
        try:
            cur.execute(s.lock_base, (key,))
            cur.execute(s.slots, (keys,))
            rows = {r[0]: r for r in cur.fetchall()}
            free, mine, owner, least = choose_slot(keys, rows, token)
            if mine is not None and cur.execute(s.refresh, (ttl_ms * 1000, keys[mine],
                                                            token)) == 1:
                conn.commit()
                return True, int(rows[keys[mine]][4]), None, -1, mine
            if free is None:
                conn.commit()
                return False, 0, owner, least, -1
            if keys[free] in rows:
                cur.execute(s.drop_lapsed, (keys[free],))
            got = self._insert(cur, s, keys[free], token, ttl_ms, cols)
            fence = int(cur.lastrowid) if got else 0
            conn.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                conn.rollback()
            raise
        finally:
            cur.close()
        if got:
            return True, fence, None, -1, free
        return False, 0, owner, least, -1

    def op_release(self, conn: Any, t: TableNames, key: str, token: str | None) -> bool:
        s = self.st(t)
        cur = conn.cursor()
        try:
            if token is None:
                return bool(cur.execute(s.release_any, (key,)))
            return bool(cur.execute(s.release, (key, token)))
        finally:
            cur.close()

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
                    ttl_ms: int, cols: Columns) -> int | None:
        locks = _q(t.locks)
        sets = ""
        if cols.given_owner:
            sets += ", owner = %(owner)s"
        if cols.given_renewals:
            sets += ", renewals = %(renewals)s"
        if cols.meta != "{}":
            sets += ", meta = JSON_MERGE_PATCH(COALESCE(meta, '{}'), %(meta)s)"
        sql = (f"UPDATE {locks} SET token = %(new)s, expires_us = {NOW} + %(ttl_ms)s * 1000"
               + sets
               + f" WHERE lock_key = %(key)s AND token = %(token)s AND expires_us > {NOW}; "
               f"SELECT fence FROM {locks} WHERE lock_key = %(key)s AND token = %(new)s "
               f"AND expires_us > {NOW}")
        args = {"key": key, "token": token, "new": new_token, "ttl_ms": ttl_ms,
                "owner": cols.owner, "renewals": cols.renewals, "meta": cols.meta}
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
        results = self._multi(conn, s.sweep, {"after": after, "last": last or after})
        deleted = sum(max(0, n) for n, _ in results)
        return (last if int(n_page) >= self.page_rows else None), deleted
