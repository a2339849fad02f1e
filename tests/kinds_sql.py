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
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.servers import free_port

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
    the end)."""
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


class PrivatePostgres:
    """A PostgreSQL server of this test's own (initdb in a temporary directory, a free port,
    fsync off), so it can really be restarted. Run as the ``postgres`` user when the tests
    run as root (PostgreSQL refuses root)."""

    def __init__(self, password: str | None = None) -> None:
        import shutil
        import tempfile

        self.bindir = self._bindir()
        if self.bindir is None:
            pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) here")
        self.dir = Path(tempfile.mkdtemp(prefix="csl-pg-"))
        self.port = free_port()
        self.user: list[str] = []
        if os.geteuid() == 0:
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.dir, ignore_errors=True)
                pytest.skip("running as root without a postgres user")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.user = ["runuser", "-u", "postgres", "--"]
        self.password = password
        auth = ["-A", "trust"]
        if password is not None:
            pwfile = self.dir / "pw"
            pwfile.write_text(password + "\n")
            if self.user:
                os.chown(pwfile, pw.pw_uid, pw.pw_gid)
            auth = ["-A", "scram-sha-256", f"--pwfile={pwfile}"]
        self._run("initdb", "-D", str(self.dir / "data"), *auth, "-U", "postgres",
                  "--no-sync", "-E", "UTF8")
        self.start()

    @staticmethod
    def _bindir() -> Path | None:
        import shutil
        import subprocess

        found = shutil.which("pg_config")
        if found:
            out = subprocess.run([found, "--bindir"], capture_output=True, text=True)
            if out.returncode == 0 and (Path(out.stdout.strip()) / "initdb").exists():
                return Path(out.stdout.strip())
        for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
            if (candidate / "initdb").exists():
                return candidate
        return None

    def _run(self, tool: str, *args: str) -> None:
        import subprocess

        assert self.bindir is not None
        done = subprocess.run([*self.user, str(self.bindir / tool), *args],
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stdout}{done.stderr}")

    @property
    def url(self) -> str:
        auth = "postgres" if self.password is None else f"postgres:{self.password}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-w", "-l", str(self.dir / "log"),
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                        "-c fsync=off", "start")

    def crash(self) -> None:
        """Stop at once, as a crash does (committed rows come back from the WAL)."""
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")

    def close(self) -> None:
        import shutil

        with suppress(Exception):  # already stopped
            self.crash()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def _store_postgres_password() -> Iterator[str]:
    """A PostgreSQL of the session's own that asks for a password (scram-sha-256): the
    machine's server trusts local connections, so a wrong password would not be refused."""
    server = PrivatePostgres(password="Pw-" + secrets.token_hex(8))
    try:
        yield server.url
    finally:
        server.close()
