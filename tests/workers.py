"""Real ``celery worker`` subprocesses for the task tests.

Revoke, time limits, killed pool children and warm shutdown only happen in a real worker, so the
task tests start ``celery -A tests.apps.<module> worker`` as subprocesses:

* :class:`CeleryWorker` is one worker: its own process group (``start_new_session=True``), its
  log in a file, a unique node name, readiness seen through a file the app module touches on
  ``worker_ready`` (``CSL_TEST_READY_FILE``). Fault injection: :meth:`~CeleryWorker.kill`
  (SIGKILL the whole group), :meth:`~CeleryWorker.pause`/:meth:`~CeleryWorker.resume`
  (SIGSTOP/SIGCONT the whole group), :meth:`~CeleryWorker.terminate` (SIGTERM: warm shutdown);
  :meth:`~CeleryWorker.child_pids` lists the pool children.
* :class:`TaskEnv` is what a test module needs around its workers: a dedicated ``redis-server``
  for broker (db 0), results (db 1) and the records test apps write (db 2), the lock store URL,
  and :meth:`~TaskEnv.wait` (bounded polling whose timeout message carries every worker's log).

The app modules under :mod:`tests.apps` read their URLs from the environment the harness sets:
``CSL_TEST_BROKER``, ``CSL_TEST_BACKEND``, ``CSL_TEST_LOCK_URL``, ``CSL_TEST_RECORD_URL`` and
``CSL_TEST_CONF`` (JSON of extra ``app.conf`` settings).

Nothing outlives the test run: every worker a test starts is stopped by its fixture, and an
:mod:`atexit` hook SIGKILLs the process group of any worker still registered.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import redis

from tests.servers import _PR_SET_PDEATHSIG, LeftAtExit, RedisServer, _prctl, wait_until

__all__ = [
    "CeleryWorker",
    "READY_STATES",
    "REPO_ROOT",
    "TaskEnv",
    "WorkerError",
    "conf_env",
    "first_seen",
    "pid_gone",
    "poll_gone",
]

#: The repository root: workers run there so ``tests.apps.*`` imports.
REPO_ROOT = Path(__file__).resolve().parent.parent
#: Bound, in seconds, for a worker to report ready.
START_TIMEOUT_S = 30.0
#: Celery's ready states, as stored by the result backend.
READY_STATES = ("SUCCESS", "FAILURE", "REVOKED")
#: Seconds a warm shutdown may take before the worker is killed.
STOP_TIMEOUT_S = 15.0


class WorkerError(RuntimeError):
    """A worker failed to start or exited unexpectedly; the message carries its log tail."""


_LIVE: LeftAtExit[CeleryWorker] = LeftAtExit(lambda worker: worker.kill())


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """SIGKILL the worker if the test run dies (its prefork children follow it: Celery sets
    their PDEATHSIG), so an aborted run leaves no worker behind."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _signal_group(pgid: int, signum: int) -> bool:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


class CeleryWorker:
    """One ``celery worker`` subprocess in its own process group.

    ``app_module`` is a module path (``tests.apps.dedup``); ``pool`` is ``prefork``,
    ``threads`` or ``solo``; ``queues`` restricts what it consumes (``-Q``), which lets a test
    send a task to one chosen worker. ``env`` adds environment variables (``CSL_TEST_CONF``
    ...). ``extra_args`` are appended to the command line.
    """

    def __init__(
        self,
        app_module: str,
        broker_url: str,
        backend_url: str,
        lock_url: str | Sequence[str],
        *,
        record_url: str | None = None,
        pool: str = "prefork",
        concurrency: int = 2,
        hostname: str | None = None,
        queues: Sequence[str] = (),
        events: bool = False,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        loglevel: str = "INFO",
    ) -> None:
        if pool not in ("prefork", "threads", "solo"):
            raise ValueError(f"unknown pool {pool!r}")
        self.app_module = app_module
        self.broker_url = broker_url
        self.backend_url = backend_url
        self.lock_url = lock_url if isinstance(lock_url, str) else ",".join(lock_url)
        self.record_url = record_url
        self.pool = pool
        self.concurrency = 1 if pool == "solo" else concurrency
        short = uuid.uuid4().hex[:8]
        #: The worker's node name (``-n``), unique per worker.
        self.hostname = hostname or f"w{short}@csl-test"
        self.queues = list(queues)
        self.events = events
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.loglevel = loglevel
        self._dir = Path(tempfile.mkdtemp(prefix="csl-worker-"))
        self.log_path = self._dir / "worker.log"
        self.ready_path = self._dir / "ready"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._paused = False
        self._done = False

    # -- lifecycle ---------------------------------------------------------------------------

    def argv(self) -> list[str]:
        argv = [
            sys.executable, "-m", "celery", "-A", self.app_module, "worker",
            "-P", self.pool, "-n", self.hostname, f"--loglevel={self.loglevel}",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        if self.pool != "solo":
            argv += ["-c", str(self.concurrency)]
        if self.queues:
            argv += ["-Q", ",".join(self.queues)]
        if self.events:
            argv.append("-E")
        return argv + self.extra_args

    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
        env.update(
            CSL_TEST_BROKER=self.broker_url,
            CSL_TEST_BACKEND=self.backend_url,
            CSL_TEST_LOCK_URL=self.lock_url,
            CSL_TEST_READY_FILE=str(self.ready_path),
        )
        if self.record_url:
            env["CSL_TEST_RECORD_URL"] = self.record_url
        env.update(self.env)
        return env

    def start(self, timeout_s: float = START_TIMEOUT_S) -> CeleryWorker:
        """Spawn the worker and return once it consumes (``worker_ready``), or raise."""
        if self.is_running():
            return self
        with contextlib.suppress(FileNotFoundError):
            self.ready_path.unlink()
        self._log = open(self.log_path, "ab")  # closed in _reaped()
        # PR_SET_PDEATHSIG fires when the spawning *thread* ends: main thread only.
        main = threading.current_thread() is threading.main_thread()
        self._proc = subprocess.Popen(
            self.argv(),
            cwd=REPO_ROOT,
            env=self.environ(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if main and _prctl is not None else None,
        )
        self._paused = False
        #: Set once the group is reaped: its pid may be reused, never signal it again.
        self._done = False
        _LIVE.add(self)

        def ready() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise WorkerError(f"worker {self.hostname} exited with {self._proc.returncode}")
            return self.ready_path.exists()

        try:
            wait_until(ready, timeout_s, interval_s=0.05, message=f"worker {self.hostname} ready")
        except (WorkerError, TimeoutError) as exc:
            self.kill()
            raise WorkerError(f"{exc}\n{self.describe()}") from None
        return self

    @property
    def pid(self) -> int | None:
        """The worker's main process id (None when not running)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def child_pids(self) -> list[int]:
        """Pids of the pool children (empty for the solo and threads pools)."""
        pid = self.pid
        if pid is None:
            return []
        try:
            return [p.pid for p in psutil.Process(pid).children()]
        except psutil.NoSuchProcess:
            return []

    def wait_exit(self, timeout_s: float) -> int | None:
        """Wait for the main process to exit; returns its exit code (None on timeout)."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self) -> None:
        """SIGTERM the main process: a warm shutdown (running tasks finish first)."""
        if self._paused:
            self.resume()
        if self.is_running() and self._proc is not None:
            self._proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Warm shutdown, bounded; then SIGKILL whatever is left of the process group."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self.terminate()
            if self.wait_exit(timeout_s) is None:
                self.kill()
                return
        self._reaped()

    def kill(self) -> None:
        """SIGKILL the main process and its pool children (the whole process group)."""
        proc = self._proc
        if proc is None or self._done:
            return
        _signal_group(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        self._reaped()

    def _reaped(self) -> None:
        proc = self._proc
        if proc is not None and not self._done:
            self._done = True
            # Children of a worker that died first may still be in the group.
            _signal_group(proc.pid, signal.SIGKILL)
            if proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        self._paused = False
        _LIVE.discard(self)
        if self._log is not None:
            self._log.close()
            self._log = None

    def pause(self) -> None:
        """SIGSTOP the whole process group (main process and children)."""
        if self._proc is None or self._proc.poll() is not None:
            raise WorkerError(f"cannot pause worker {self.hostname}: not running")
        _signal_group(self._proc.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT the whole process group."""
        if self._proc is not None and not self._done:
            _signal_group(self._proc.pid, signal.SIGCONT)
        self._paused = False

    def close(self) -> None:
        """Stop and remove the temporary directory (the log goes with it)."""
        self.stop()
        with contextlib.suppress(OSError):
            for path in self._dir.iterdir():
                path.unlink()
            self._dir.rmdir()

    # -- diagnostics -------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def describe(self, lines: int = 40) -> str:
        state = "paused" if self._paused else "running" if self.is_running() else "stopped"
        head = f"--- worker {self.hostname} ({self.pool}, {state}) log tail:"
        return f"{head}\n{self.log_tail(lines)}"

    def __enter__(self) -> CeleryWorker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<CeleryWorker {self.hostname} {self.pool}x{self.concurrency} pid={self.pid}>"


class TaskEnv:
    """A broker/backend/records ``redis-server``, a lock store URL and the workers of a module.

    ``lock_url`` is one URL or a list of Redlock masters. :meth:`worker` makes (and tracks) a
    :class:`CeleryWorker` of ``app_module``; :meth:`close` stops them all and the server.
    """

    def __init__(self, app_module: str, lock_url: str | Sequence[str]) -> None:
        self.app_module = app_module
        self.lock_url = lock_url
        self.server = RedisServer().start()
        base = self.server.url.rsplit("/", 1)[0]
        self.broker_url = f"{base}/0"
        self.backend_url = f"{base}/1"
        self.record_url = f"{base}/2"
        #: Client of the records database (what the test apps write).
        self.records = redis.Redis.from_url(self.record_url, decode_responses=True)
        #: Client of the result backend database (raw task meta, read in bulk).
        self.results = redis.Redis.from_url(self.backend_url, decode_responses=True)
        self.workers: list[CeleryWorker] = []
        urls = [lock_url] if isinstance(lock_url, str) else list(lock_url)
        #: A client per lock master (to read and delete lock keys from outside).
        self.lock_clients = [redis.Redis.from_url(u, decode_responses=True) for u in urls]
        #: The client of the first (or only) lock master.
        self.lock_client = self.lock_clients[0]

    def worker(self, **options: Any) -> CeleryWorker:
        """A new (not started) worker of this module's app; ``options`` as for CeleryWorker."""
        options.setdefault("record_url", self.record_url)
        lock_url = options.pop("lock_url", self.lock_url)
        worker = CeleryWorker(
            self.app_module, self.broker_url, self.backend_url, lock_url, **options
        )
        self.workers.append(worker)
        return worker

    def describe(self, since: int = 0) -> str:
        """Log tails of the running workers and of every worker made since index ``since``."""
        shown = [w for i, w in enumerate(self.workers) if i >= since or w.is_running()]
        return "\n".join(w.describe() for w in shown)

    def logs_on_failure(self, request: Any) -> Iterator[None]:
        """Body of an autouse fixture: after a failed test, write the log tails of the workers
        it used to stderr (pytest shows it under the failure)."""
        failed = request.session.testsfailed
        first = len(self.workers)
        yield
        if request.session.testsfailed > failed:
            sys.stderr.write(self.describe(since=first) + "\n")

    def wait(
        self,
        predicate: Callable[[], Any],
        timeout_s: float,
        message: str = "condition",
        interval_s: float = 0.02,
    ) -> Any:
        """:func:`wait_until`, failing with every worker's log tail."""
        try:
            return wait_until(predicate, timeout_s, interval_s=interval_s, message=message)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.describe()}") from None

    def states(self, task_ids: Sequence[str]) -> list[str]:
        """The stored state of each task id, read in one round trip (``PENDING`` if none)."""
        if not task_ids:
            return []
        raw = self.results.mget([f"celery-task-meta-{tid}" for tid in task_ids])
        return [json.loads(r)["status"] if r else "PENDING" for r in raw]

    def wait_ready(
        self, task_ids: Sequence[str], timeout_s: float, ready: Iterable[str] = READY_STATES
    ) -> list[str]:
        """Wait until every task id is in a ready state; returns the states."""
        wanted = set(ready)
        last: list[str] = []

        def done() -> bool:
            last[:] = self.states(task_ids)
            return all(s in wanted for s in last)

        try:
            self.wait(done, timeout_s, f"{len(task_ids)} tasks ready", interval_s=0.05)
        except AssertionError as exc:
            counts = {s: last.count(s) for s in set(last)}
            raise AssertionError(f"states {counts}\n{exc}") from None
        return last

    def stop_workers(self, workers: Iterable[CeleryWorker] | None = None) -> None:
        """Warm-shut down ``workers`` (default: all) in parallel, bounded, then SIGKILL what is
        left. Their logs stay readable until :meth:`close`."""
        chosen = list(workers if workers is not None else self.workers)
        for worker in chosen:
            worker.terminate()
        for worker in chosen:
            worker.stop()

    def close(self) -> None:
        # AsyncResults left unreferenced unsubscribe from the backend when collected: let that
        # happen while the server still runs.
        gc.collect()
        try:
            self.stop_workers()
            for worker in self.workers:
                worker.close()
        finally:
            self.records.close()
            self.results.close()
            for client in self.lock_clients:
                client.close()
            self.server.close()


@contextlib.contextmanager
def open_task_env(app_module: str, app: Any = None, **server_options: Any) -> Iterator[TaskEnv]:
    """A :class:`TaskEnv` for ``app_module`` with a lock server of its own (``server_options``
    as for :class:`RedisServer`); ``app``, if given, is pointed at the test servers."""
    from tests.apps.common import configure

    with RedisServer(**server_options) as lock_server:
        task_env = TaskEnv(app_module, lock_server.url)
        if app is not None:
            configure(app, task_env.broker_url, task_env.backend_url, lock_server.url)
        try:
            yield task_env
        finally:
            task_env.close()


def conf_env(**settings: Any) -> dict[str, str]:
    """``env=`` for a worker whose app gets ``settings`` on top of the app module's own."""
    return {"CSL_TEST_CONF": json.dumps(settings)}


def first_seen(
    conditions: Mapping[str, Callable[[], Any]], timeout_s: float, interval_s: float = 0.005
) -> dict[str, float]:
    """Poll every condition until each has been true once; the wall-clock time each first was.

    Raises :class:`TimeoutError` naming the conditions never seen within ``timeout_s``.
    """
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for name, condition in conditions.items():
            if name not in seen and condition():
                seen[name] = time.time()
        if len(seen) == len(conditions):
            return seen
        if time.monotonic() >= deadline:
            missing = sorted(set(conditions) - set(seen))
            raise TimeoutError(f"never saw {missing} within {timeout_s:.1f}s (saw {seen})")
        time.sleep(interval_s)


def pid_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def poll_gone(client: redis.Redis, key: str, timeout_s: float, interval_s: float = 0.005) -> float:
    """Poll until ``key`` no longer exists; returns the wall-clock time it was first seen gone.

    Raises :class:`TimeoutError` if it still exists after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while client.exists(key):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"lock {key} still exists after {timeout_s:.1f}s")
        time.sleep(interval_s)
    return time.time()
