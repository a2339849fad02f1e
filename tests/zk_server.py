"""A real ZooKeeper server for the test suite: one standalone ``java`` process on loopback.

The server runs from the jars of Debian's ``zookeeper`` package (``/usr/share/java``), or from
``$ZOOKEEPER_CLASSPATH``, or from an upstream tarball whose directory ``$ZOOKEEPER_HOME``
names. Its ``zoo.cfg`` and data live in a temporary directory of its own; the client port is a
free port on 127.0.0.1; the admin server is off. ``tickTime`` is short (100 ms), so a session
timeout can be as short as 0.2 s and the session-expiry tests stay fast. The data directory
survives :meth:`ZooKeeperServer.restart`, as it does for a real server: sessions and nodes come
back with it.

What a test starts, it stops: the process also gets SIGTERM from the kernel if the test run
dies (``PR_SET_PDEATHSIG``), and an :mod:`atexit` hook stops whatever is still running.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from tests.servers import free_port, wait_until

__all__ = ["ZooKeeperServer", "ZooKeeperServerError", "find_classpath", "four_letter"]

#: Bound for a server to answer ``srvr`` after it is spawned, seconds (a JVM starts slowly).
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
TICK_MS = 100


class ZooKeeperServerError(RuntimeError):
    """The test server failed to start; carries its log tail."""


def find_classpath() -> str | None:
    """The server's class path, or None when no ZooKeeper is installed."""
    explicit = os.environ.get("ZOOKEEPER_CLASSPATH")
    if explicit:
        return explicit
    home = os.environ.get("ZOOKEEPER_HOME")
    if home:
        jars = sorted(glob.glob(os.path.join(home, "lib", "*.jar")))
        if jars:
            return os.pathsep.join(jars)
    debian = "/usr/share/java/zookeeper.jar"  # its manifest names the other jars
    if os.path.exists(debian):
        return debian
    jars = sorted(glob.glob("/usr/share/zookeeper/lib/*.jar"))
    return os.pathsep.join(jars) if jars else None


def four_letter(port: int, word: str, timeout_s: float = 1.0) -> str:
    """Send a four-letter command (``ruok``, ``srvr``, ``cons``) and return the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(word.encode())
        chunks = []
        while True:
            data = sock.recv(4096)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode("utf-8", "replace")


try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _prctl = _libc.prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    if _prctl is not None:
        _prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


_LIVE: set[ZooKeeperServer] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.close()


class ZooKeeperServer:
    """One standalone ZooKeeper on ``127.0.0.1:<free port>``, for tests."""

    def __init__(self, max_session_timeout_ms: int = 60000) -> None:
        self.max_session_timeout_ms = max_session_timeout_ms
        self.port: int | None = None
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: object | None = None

    # -- where ---------------------------------------------------------------------------

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, chroot: str | None = None) -> str:
        """``zookeeper://127.0.0.1:<port>/<chroot>`` (a fresh random chroot by default)."""
        chroot = chroot if chroot is not None else f"csl-test-{secrets.token_hex(4)}"
        return f"zookeeper://{self.hosts}/{chroot.strip('/')}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _workdir(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="csl-zookeeper-"))
        return self._dir

    @property
    def log_path(self) -> Path:
        return self._workdir() / "zookeeper.log"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- life ------------------------------------------------------------------------------

    def _write_config(self) -> Path:
        work = self._workdir()
        (work / "data").mkdir(exist_ok=True)
        cfg = work / "zoo.cfg"
        cfg.write_text(
            f"tickTime={TICK_MS}\n"
            f"dataDir={work / 'data'}\n"
            f"clientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\n"
            "admin.enableServer=false\n"
            "4lw.commands.whitelist=ruok,srvr,cons,stat\n"
            "forceSync=no\n"
            f"minSessionTimeout={2 * TICK_MS}\n"
            f"maxSessionTimeout={self.max_session_timeout_ms}\n"
            "maxClientCnxns=0\n"
        )
        return cfg

    def _spawn(self) -> None:
        classpath = find_classpath()
        if classpath is None:
            raise ZooKeeperServerError("no ZooKeeper installed (apt-get install zookeeper)")
        java = os.environ.get("JAVA") or shutil.which("java")
        if java is None:
            raise ZooKeeperServerError("no java on PATH")
        cfg = self._write_config()
        argv = [java, "-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                "-Dzookeeper.admin.enableServer=false", "-Dzookeeper.jmx.log4j.disable=true",
                "-cp", classpath, "org.apache.zookeeper.server.ZooKeeperServerMain", str(cfg)]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap()
        main = threading.current_thread() is threading.main_thread()
        self._proc = subprocess.Popen(
            argv, cwd=self._workdir(), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent if main and _prctl is not None else None,
        )
        _LIVE.add(self)

    def _serving(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            raise ZooKeeperServerError("exited")
        assert self.port is not None
        try:
            return "Mode:" in four_letter(self.port, "srvr", 0.5)
        except OSError:
            return False

    def start(self) -> ZooKeeperServer:
        """Start the server; return once it serves (``srvr`` answers with its mode)."""
        if self.is_running():
            return self
        keep_port = self.port is not None
        for attempt in range(1 if keep_port else 3):
            if not keep_port:
                self.port = free_port()
            self._spawn()
            try:
                wait_until(self._serving, START_TIMEOUT_S, interval_s=0.05,
                           message=f"ZooKeeper on {self.hosts}")
                return self
            except (ZooKeeperServerError, TimeoutError) as exc:
                log = self.log_tail()
                self._reap()
                if "Address already in use" in log and attempt < 2 and not keep_port:
                    continue
                raise ZooKeeperServerError(f"ZooKeeper failed to start ({exc}):\n{log}") from None
        raise AssertionError("unreachable")

    def _reap(self) -> None:
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
                    proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(STOP_TIMEOUT_S)
            self._proc = None
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None

    def stop(self) -> None:
        """Stop the process; keep the port and the data for :meth:`start`."""
        self._reap()

    def restart(self) -> ZooKeeperServer:
        """Stop and start again on the same port with the same data (sessions survive)."""
        self._reap()
        return self.start()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing is answered."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """Stop the process and delete its directory. Safe to call twice."""
        self._reap()
        _LIVE.discard(self)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> ZooKeeperServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ZooKeeperServer {self.hosts} {'running' if self.is_running() else 'stopped'}>"


def wait_serving(server: ZooKeeperServer, timeout_s: float = START_TIMEOUT_S) -> None:
    """Wait until ``server`` serves clients again (after :meth:`~ZooKeeperServer.resume`)."""
    deadline = time.monotonic() + timeout_s
    while not server._serving():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{server} does not serve")
        time.sleep(0.05)
