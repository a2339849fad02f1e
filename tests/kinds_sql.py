"""Lock-store kinds for the contract suite (a pytest plugin loaded by tests/conftest.py).

``KINDS`` lists the kind ids this module adds; for each id a session fixture
``_store_<id>`` yields the URL value to open the store with.

The database stores run against the PostgreSQL and MariaDB servers of the machine
(``$CSL_TEST_POSTGRES`` / ``$CSL_TEST_MYSQL`` name them: a server URL without a database,
defaults ``postgresql://postgres@127.0.0.1:5432`` and ``mysql://root@127.0.0.1:3306``). Each
test session makes its own database with a random name and drops it at the end; no other
database is touched. A server that cannot be reached skips the tests that need it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from urllib.parse import urlsplit

import pytest

KINDS: list[str] = ["postgres", "mysql"]

POSTGRES_SERVER = os.environ.get("CSL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
MYSQL_SERVER = os.environ.get("CSL_TEST_MYSQL", "mysql://root@127.0.0.1:3306")


def random_db_name() -> str:
    return "csl_test_" + secrets.token_hex(6)


def _server_url(base: str, database: str) -> str:
    return base.rstrip("/") + "/" + database


def _pg_admin(base: str):  # type: ignore[no-untyped-def]
    import psycopg

    return psycopg.connect(_server_url(base, "postgres"), autocommit=True, connect_timeout=3)


def _mysql_admin(base: str):  # type: ignore[no-untyped-def]
    import pymysql

    parts = urlsplit(base)
    return pymysql.connect(host=parts.hostname or "127.0.0.1", port=parts.port or 3306,
                           user=parts.username or "root", password=parts.password or "",
                           autocommit=True, connect_timeout=3)


@contextmanager
def postgres_database(base: str = POSTGRES_SERVER) -> Iterator[str]:
    """A new PostgreSQL database with a random name; yields its URL, drops it after."""
    name = random_db_name()
    try:
        admin = _pg_admin(base)
    except Exception as exc:  # no server here
        pytest.skip(f"PostgreSQL is not reachable at {base}: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _server_url(base, name)
    finally:
        with _pg_admin(base) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def mysql_database(base: str = MYSQL_SERVER) -> Iterator[str]:
    """A new MariaDB/MySQL database with a random name; yields its URL, drops it after."""
    name = random_db_name()
    try:
        admin = _mysql_admin(base)
    except Exception as exc:
        pytest.skip(f"MySQL/MariaDB is not reachable at {base}: {exc}")
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    finally:
        admin.close()
    try:
        yield _server_url(base, name)
    finally:
        admin = _mysql_admin(base)
        try:
            with admin.cursor() as cur:
                # Sessions still open on it (a worker killed mid-test) would block the drop.
                cur.execute("SELECT id FROM information_schema.processlist WHERE db = %s",
                            (name,))
                for (pid,) in cur.fetchall():
                    with suppress(Exception):  # it may have gone meanwhile
                        cur.execute(f"KILL CONNECTION {int(pid)}")
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        finally:
            admin.close()


@pytest.fixture(scope="session")
def _store_postgres() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def _store_mysql() -> Iterator[str]:
    with mysql_database() as url:
        yield url


@pytest.fixture(scope="session")
def _store_mysql_password(_store_mysql: str) -> Iterator[str]:
    """The session's MySQL database through a user of its own with a password (dropped at
    the end). PostgreSQL has none: the machine's server trusts every local connection, so a
    wrong password could not be refused."""
    parts = urlsplit(_store_mysql)
    database = parts.path.lstrip("/")
    user, password = "csl_" + secrets.token_hex(4), "Pw-" + secrets.token_hex(8)
    admin = _mysql_admin(MYSQL_SERVER)
    try:
        with admin.cursor() as cur:
            cur.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (user, password))
            cur.execute(f"GRANT ALL PRIVILEGES ON `{database}`.* TO %s@'%%'", (user,))
    finally:
        admin.close()
    try:
        yield f"mysql://{user}:{password}@{parts.hostname}:{parts.port or 3306}/{database}"
    finally:
        admin = _mysql_admin(MYSQL_SERVER)
        try:
            with admin.cursor() as cur:
                cur.execute("DROP USER IF EXISTS %s@'%%'", (user,))
        finally:
            admin.close()
