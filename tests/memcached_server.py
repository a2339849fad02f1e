"""Real ``memcached`` processes for the test suite, on free loopback ports.

:class:`MemcachedServer` is one server (``memcached -l 127.0.0.1 -p PORT -U 0``: TCP only),
with fault injection: :meth:`~MemcachedServer.pause` (SIGSTOP), :meth:`~MemcachedServer.resume`
(SIGCONT), :meth:`~MemcachedServer.kill` (SIGKILL, the port stays reserved) and
:meth:`~MemcachedServer.restart` (the same port, empty: memcached keeps nothing on disk).
Children get ``PR_SET_PDEATHSIG`` (when started from the main thread) and an :mod:`atexit`
hook stops whatever is left, so an aborted run leaves no processes behind. Waiting is bounded
polling (:func:`tests.servers.wait_until`), never a bare sleep.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
from typing import Any

from tests.servers import LOOPBACK, LeftAtExit, _die_with_parent, free_port, wait_until

__all__ = ["MemcachedServer", "find_memcached"]

#: Bound, in seconds, for a server to answer ``version`` after it is spawned.
START_TIMEOUT_S = 10.0
#: Seconds to wait for a server to exit after SIGKILL.
STOP_TIMEOUT_S = 5.0

_LIVE: LeftAtExit[MemcachedServer] = LeftAtExit(lambda server: server.stop())


def find_memcached() -> str | None:
    """The ``memcached`` binary: ``$MEMCACHED``, else ``PATH``, else Debian's path."""
    env = os.environ.get("MEMCACHED")
    if env:
        return shutil.which(env) or env
    found = shutil.which("memcached")
    if found:
        return found
    return "/usr/bin/memcached" if os.access("/usr/bin/memcached", os.X_OK) else None


class MemcachedServer:
    """One ``memcached`` child process on 127.0.0.1 (64 MB, TCP only)."""

    def __init__(self, *, memory_mb: int = 64, extra_args: tuple[str, ...] = ()) -> None:
        self.memory_mb = memory_mb
        self.extra_args = extra_args
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return f"memcached://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _argv(self) -> list[str]:
        binary = find_memcached()
        if binary is None:
            raise RuntimeError("no memcached binary (apt-get install memcached)")
        argv = [binary, "-l", LOOPBACK, "-p", str(self.port), "-U", "0",
                "-m", str(self.memory_mb), "-c", "256"]
        if os.geteuid() == 0:
            argv += ["-u", "root"]  # memcached refuses to run as root without -u
        return argv + list(self.extra_args)

    def start(self) -> MemcachedServer:
        """Spawn the server and wait until it answers; a port taken meanwhile is replaced."""
        for _ in range(5):
            in_main = threading.current_thread() is threading.main_thread()
            self._proc = subprocess.Popen(
                self._argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, preexec_fn=_die_with_parent if in_main else None,
            )
            self._paused = False
            _LIVE.add(self)
            try:
                wait_until(lambda: self._proc is not None and
                           (self._proc.poll() is not None or self.answers()),
                           START_TIMEOUT_S, message=f"memcached on port {self.port}")
            except TimeoutError:
                self.stop()
                raise
            if self._proc.poll() is None:
                return self
            err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
            self._proc = None
            if "Address already in use" not in err and "bind" not in err.lower():
                raise RuntimeError(f"memcached did not start: {err.strip()}")
            self.port = free_port()
        raise RuntimeError("memcached: no free port after 5 tries")

    def answers(self, timeout_s: float = 0.5) -> bool:
        """True when the server answers ``version``."""
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=timeout_s) as sock:
                sock.sendall(b"version\r\n")
                return sock.recv(64).startswith(b"VERSION")
        except OSError:
            return False

    def command(self, line: str, timeout_s: float = 2.0) -> bytes:
        """Send one text-protocol command; return the raw reply up to its end marker."""
        with socket.create_connection((LOOPBACK, self.port), timeout=timeout_s) as sock:
            sock.sendall(line.encode() + b"\r\n")
            reply = b""
            while not reply.endswith((b"END\r\n", b"OK\r\n", b"ERROR\r\n", b"STORED\r\n",
                                      b"DELETED\r\n", b"NOT_FOUND\r\n", b"NOT_STORED\r\n",
                                      b"TOUCHED\r\n")):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
            return reply

    def client(self, **kwargs: Any) -> Any:
        """A pymemcache client of this server (for assertions)."""
        from pymemcache.client.base import Client

        kwargs.setdefault("connect_timeout", 2.0)
        kwargs.setdefault("timeout", 2.0)
        return Client((LOOPBACK, self.port), default_noreply=False, **kwargs)

    def flush(self) -> None:
        """Drop every item (``flush_all``)."""
        if self._proc is not None and not self._paused:
            self.command("flush_all")

    def pause(self) -> None:
        """SIGSTOP: the server stops answering but keeps its connections (a hung master)."""
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        if self._proc is not None and self._paused:
            os.kill(self._proc.pid, signal.SIGCONT)
            self._paused = False

    def kill(self) -> None:
        """SIGKILL: the server is gone at once (connections refused)."""
        if self._proc is not None:
            self.resume()
            self._proc.kill()
            self._proc.wait(STOP_TIMEOUT_S)
            self._proc = None

    def restart(self) -> None:
        """Stop and start again on the same port: it comes back empty."""
        self.stop()
        self.start()

    def heal(self) -> None:
        """Resume a paused server, start a stopped one (between tests)."""
        self.resume()
        if self._proc is None or self._proc.poll() is not None:
            self.start()

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        _LIVE.discard(self)
        if proc is None:
            return
        if self._paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            self._paused = False
        # SIGKILL: memcached keeps nothing on disk, and on SIGTERM it waits a second for
        # its threads, which a suite that starts many servers pays every time.
        proc.kill()
        proc.wait(STOP_TIMEOUT_S)
        if proc.stderr is not None:
            proc.stderr.close()

    close = stop

    def __enter__(self) -> MemcachedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
