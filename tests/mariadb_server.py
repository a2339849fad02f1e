"""A MariaDB server of a test's own, so a test can crash and restart the database.

The machine's MariaDB (tests/kinds_sql.py) is shared by the whole run and must never be
stopped; a restart test needs a server nobody else uses. :class:`PrivateMariaDB` makes one
from the machine's binaries (``mariadbd``, ``mariadb-install-db``): a fresh data directory in
a temporary directory, a free port on 127.0.0.1 only, its socket and pid file beside the data,
no configuration file of the machine read (``--defaults-file`` of its own, so nothing of
``/etc/mysql`` and never port 3306).

It is set up to be quick and to behave as a real server under a crash: no binary log, a
small buffer pool and redo log, and ``innodb_flush_log_at_trx_commit=1``, so a committed row
is in the redo log before the commit returns and :meth:`PrivateMariaDB.crash` (SIGKILL) loses
nothing committed: InnoDB's crash recovery brings it back on the next :meth:`~PrivateMariaDB.
start`. Root logs in without a password over TCP from 127.0.0.1.

What it starts it stops: :meth:`~PrivateMariaDB.close` (idempotent) kills the server and
removes the directory; an :mod:`atexit` hook closes whatever a test left running, and the
server gets SIGTERM from the kernel if the test run itself dies (``PR_SET_PDEATHSIG``, kept
because the server does not change its user id: as root it runs with ``--user=root``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.servers import LOOPBACK, LeftAtExit, _die_with_parent, _prctl, free_port, wait_until

__all__ = ["PrivateMariaDB"]

#: Where the server binaries are looked for besides ``PATH`` (``mariadbd`` is in sbin).
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin",
                                "/usr/bin", "/usr/local/bin"])
#: Bound, in seconds, for a started server to accept a login (crash recovery included).
START_TIMEOUT_S = 30.0
#: Bound, in seconds, for ``mariadb-install-db`` (a new data directory).
INSTALL_TIMEOUT_S = 60.0
#: Bound, in seconds, for a killed server to be reaped.
EXIT_TIMEOUT_S = 10.0

_LIVE: LeftAtExit[PrivateMariaDB] = LeftAtExit(lambda server: server.close())


def _binary(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


class PrivateMariaDB:
    """One ``mariadbd`` child process on a free port of 127.0.0.1, with a data directory of its
    own that survives :meth:`crash` and :meth:`start` (so rows do) and goes with :meth:`close`.

    :meth:`start` makes the data directory and, on the first start, a database with a random
    name (:attr:`database`); :attr:`url` is the ``mysql://`` URL of that database for the
    lock store. Skips the test (``pytest.skip``) where the binaries or PyMySQL are missing.
    """

    def __init__(self, *, start_timeout_s: float = START_TIMEOUT_S) -> None:
        pytest.importorskip("pymysql", reason="the MariaDB tests talk to it through PyMySQL")
        mariadbd, install_db = _binary("mariadbd"), _binary("mariadb-install-db")
        if mariadbd is None or install_db is None:
            missing = [n for n, p in (("mariadbd", mariadbd), ("mariadb-install-db", install_db))
                       if p is None]
            pytest.skip(f"no MariaDB server binaries here ({', '.join(missing)} not found)")
        self.mariadbd: str = mariadbd
        self.install_db: str = install_db
        self.start_timeout_s = start_timeout_s
        #: The database :attr:`url` names (created on the first start).
        self.database = "csl_test_" + secrets.token_hex(6)
        self.dir = Path(tempfile.mkdtemp(prefix="csl-mariadb-"))
        self.port = free_port()
        self._installed = False
        self._created = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._closed = False
        _LIVE.add(self)

    # -- addresses -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``mysql://root@127.0.0.1:PORT/DATABASE``: the lock store URL of :attr:`database`."""
        return f"mysql://root@{LOOPBACK}:{self.port}/{self.database}"

    @property
    def socket_path(self) -> Path:
        return self.dir / "mysqld.sock"

    @property
    def log_path(self) -> Path:
        return self.dir / "mariadbd.log"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs, else None."""
        return self._proc.pid if self.is_running() and self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -----------------------------------------------------------------------------

    def _user_args(self) -> list[str]:
        # As root, mariadbd refuses to start unless told which user to be. Staying root keeps
        # the parent-death signal (a change of user id clears it); the data directory is ours.
        return ["--user=root"] if os.geteuid() == 0 else []

    def _write_config(self) -> Path:
        cnf = self.dir / "my.cnf"
        cnf.write_text(
            "[mariadbd]\n"
            f"datadir={self.dir / 'data'}\n"
            f"socket={self.socket_path}\n"
            f"pid-file={self.dir / 'mariadbd.pid'}\n"
            f"port={self.port}\n"
            f"bind-address={LOOPBACK}\n"
            "skip-networking=0\n"
            "skip-name-resolve\n"
            "skip-log-bin\n"
            "innodb_buffer_pool_size=16M\n"
            "innodb_log_file_size=8M\n"
            "innodb_flush_log_at_trx_commit=1\n"
            # Linux AIO contexts are a machine-wide limit that parallel runs may exhaust.
            "innodb_use_native_aio=0\n"
            "performance_schema=0\n"
            "max_connections=200\n"
        )
        return cnf

    def _install(self) -> None:
        """A new data directory whose root logs in without a password (no unix_socket-only
        root, which would refuse a TCP login)."""
        cnf = self._write_config()
        done = subprocess.run(
            [self.install_db, f"--defaults-file={cnf}", *self._user_args(),
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed:\n{done.stdout}{done.stderr}")
        self._installed = True

    def _spawn(self) -> None:
        self._log = open(self.log_path, "ab")  # closed once the process is reaped
        main = threading.current_thread() is threading.main_thread()
        self._proc = subprocess.Popen(
            [self.mariadbd, f"--defaults-file={self.dir / 'my.cnf'}", *self._user_args()],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            # PR_SET_PDEATHSIG fires when the spawning *thread* ends: main thread only.
            preexec_fn=_die_with_parent if main and _prctl is not None else None,
        )

    def _connect(self, *, tcp: bool, database: str | None = None, timeout_s: int = 2) -> Any:
        import pymysql

        where: dict[str, Any] = ({"host": LOOPBACK, "port": self.port} if tcp
                                 else {"unix_socket": str(self.socket_path)})
        return pymysql.connect(user="root", password="", database=database, autocommit=True,
                               connect_timeout=timeout_s, read_timeout=10, write_timeout=10,
                               **where)

    def _login_works(self, *, tcp: bool, database: str | None = None) -> bool:
        import pymysql

        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"mariadbd exited with {self._proc.returncode}:\n"
                               f"{self.log_tail()}")
        try:
            conn = self._connect(tcp=tcp, database=database, timeout_s=1)
        except pymysql.err.MySQLError:
            return False
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                return cur.fetchone() == (1,)
        finally:
            conn.close()

    def _set_up(self) -> None:
        """First start: root from 127.0.0.1 without a password (made here if this version's
        install did not make it) and the test's database."""
        conn = self._connect(tcp=False)
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE USER IF NOT EXISTS 'root'@'{LOOPBACK}'")
                cur.execute(f"GRANT ALL PRIVILEGES ON *.* TO 'root'@'{LOOPBACK}' "
                            "WITH GRANT OPTION")
                cur.execute(f"CREATE DATABASE IF NOT EXISTS `{self.database}` "
                            "CHARACTER SET utf8mb4")
        finally:
            conn.close()
        self._created = True

    def start(self) -> PrivateMariaDB:
        """Start the server (after a :meth:`crash`: on the same port, with its rows) and return
        once root logs in to :attr:`database` over TCP; raises with the log tail otherwise."""
        if self._closed:
            raise RuntimeError("this server was closed")
        if self.is_running():
            return self
        if not self._installed:
            self._install()
        for attempt in range(3):
            self._spawn()
            try:
                wait_until(lambda: self._login_works(tcp=False), self.start_timeout_s,
                           interval_s=0.02, message="mariadbd to accept a login")
                break
            except RuntimeError:
                # The free port was taken between free_port() and the bind: before the first
                # start nobody knows the port yet, so another one will do.
                lost_race = not self._created and attempt < 2 and "Bind on TCP/IP port" in (
                    self.log_tail())
                self._kill()
                if not lost_race:
                    raise RuntimeError(f"mariadbd did not start:\n{self.log_tail()}") from None
                self.port = free_port()
                self._write_config()
            except TimeoutError as exc:
                self._kill()
                raise RuntimeError(f"{exc}\n{self.log_tail()}") from None
        try:
            if not self._created:
                self._set_up()
            wait_until(lambda: self._login_works(tcp=True, database=self.database), 5.0,
                       interval_s=0.02, message=f"a TCP login on {LOOPBACK}:{self.port}")
        except (TimeoutError, RuntimeError) as exc:
            self._kill()
            raise RuntimeError(f"{exc}\n{self.log_tail()}") from None
        return self

    def _kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
        try:
            proc.wait(EXIT_TIMEOUT_S)
        finally:
            self._proc = None
            if self._log is not None:
                self._log.close()
                self._log = None

    def crash(self) -> None:
        """SIGKILL the server and wait until it is gone: what a crash does. Clients see their
        connections end; committed rows come back through crash recovery on :meth:`start`."""
        if not self.is_running():
            raise RuntimeError("the server is not running")
        self._kill()

    def close(self) -> None:
        """Kill the server if it runs and delete its directory (safe to call again)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._kill()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            _LIVE.discard(self)

    # -- diagnostics ---------------------------------------------------------------------------

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> PrivateMariaDB:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PrivateMariaDB {LOOPBACK}:{self.port} pid={self.pid}>"
