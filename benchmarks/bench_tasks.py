#!/usr/bin/env python
"""End-to-end tasks per second through one real prefork worker: ``LockedTask`` beside peers.

Contenders, each a no-op task body (``return i``) with distinct arguments, so no lock is ever
contended: plain Celery ``Task``, celery-singleton's ``Singleton``, celery-once's ``QueueOnce``
and this package's ``LockedTask`` (``while_executing``, the default mode). Three reference
rows, not shipped locks, show what the lock commands alone cost here, sent from the pool child
over a raw socket: ``SET NX PX`` and a compare-and-delete (the least a correct lock does), a
packed string value with an ``INCR`` fence, and this package's own scripts.

The script starts its own ``redis-server`` processes (one for the broker and the result
backend, one for every contender's locks) and one ``celery worker -P prefork -c 2`` of this
very module, and stops them all at the end, also on an error or Ctrl-C.

Method, per contender and round:

1. the worker consumes nothing (it listens on an idle queue only); ``--tasks`` messages with
   distinct arguments are published to the ``bench`` queue (publishing is not timed here: see
   ``bench_publish.py``; the peers take their lock at this point);
2. ``add_consumer("bench")`` lets the worker drain the queue; the script waits until every
   result is stored, then ``cancel_consumer``;
3. the rate is ``(N - 1) / (last date_done - first date_done)``, from the result backend's own
   timestamps: the worker's steady-state throughput (fetch, lock, body, release, result
   store), without the consumer's start-up lag or the polling granularity. The wall time from
   ``add_consumer`` to the last result is printed beside it; it includes up to about a second
   before the worker's Redis consumer (a ``BRPOP`` with a one-second timeout) first polls the
   new queue, so it swings from round to round;
4. end to end (the issue's measure): with the worker already consuming (a first task's result
   proves it polls the queue), another ``--tasks`` messages are published one after the other
   while the worker runs them; the rate is ``N / (last date_done - first publish)``. This
   includes the peers' publish-time lock and competes for the same CPUs, as a real producer
   does. The table leads with this rate and lists the per-round ratios to plain ``Task``
   (rounds are interleaved, so each pair shares a stretch of time).

Beside each rate, the CPU time per task of the worker's whole process tree (its main process
and the pool children, utime + stime from ``/proc/<pid>/stat`` before and after the pass,
divided by the tasks): on a busy machine it moves much less than the rates do.

``--baseline PATH`` adds the contender ``LockedTask (baseline)``: the same task, run by a
second worker whose processes import ``celery_singleton_lock`` from PATH (another checkout),
taking turns with the others round by round. Both workers run the whole time; the one not
measured idles on its own queue.

Every contender is warmed up first (pool children import, connect and load scripts), then the
timed rounds are interleaved across contenders (the starting contender rotates each round) and
the median round is reported. Commands sent to the lock server per task (while publishing, and
from the worker) are counted in a separate, untimed pass with ``MONITOR``, which tells the
commands clients send from those a Lua script runs; ``INFO commandstats`` of the timed rounds
(reset before each publish) is printed beside them. A contender whose library is missing or
fails shows ``n/a`` with the reason.

Usage::

    pip install -r benchmarks/requirements.txt
    python benchmarks/bench_tasks.py [--tasks 2000] [--rounds 9] [--count 200]
                                     [--only LockedTask,celery-once] [--json out.json]
                                     [--baseline /tmp/before]

The Markdown table goes to stdout, progress to stderr. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
for _path in (str(REPO_ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
#: Set for the ``--baseline`` worker: the checkout whose ``celery_singleton_lock`` it imports,
#: ahead of every other path (this one included).
ENV_PACKAGE = "CSL_BENCH_PACKAGE"
if os.environ.get(ENV_PACKAGE):
    sys.path.insert(0, os.environ[ENV_PACKAGE])

import redis  # noqa: E402
from celery import Celery  # noqa: E402
from procstat import commit, cpu_since, die_with_parent, median, tree_cpu, version  # noqa: E402

import celery_singleton_lock  # noqa: E402
from celery_singleton_lock import LockedTask  # noqa: E402

try:
    from celery_singleton_lock.backends.base import FENCE_TTL_MS
    from celery_singleton_lock.backends.redis.wire import SCRIPTS
except ImportError:  # a checkout from before the lock-store interface (a --baseline worker)
    from celery_singleton_lock.store import FENCE_TTL_MS, SCRIPTS  # type: ignore[no-redef]

#: Environment the worker reads its URLs from (set by this script).
ENV_BROKER, ENV_BACKEND, ENV_LOCKS = "CSL_BENCH_BROKER", "CSL_BENCH_BACKEND", "CSL_BENCH_LOCKS"
#: The queue the measured tasks go to, and the one the worker idles on between rounds.
QUEUE, IDLE_QUEUE = "bench", "bench-idle"
DEFAULT_TASKS = 2000
DEFAULT_ROUNDS = 9  # single rounds swing by +-20 % on a busy 2-core machine
DEFAULT_WARMUP = 200
#: Tasks per contender in the MONITOR pass that counts round trips.
DEFAULT_COUNT = 200
#: Issue targets, printed for context only.
TARGET_LOCKED_VS_PLAIN = 0.90
PEERS_MEASURED_ELSEWHERE = {"celery-singleton": 0.74, "celery-once": 0.75}
#: Reference rows: the least a correct execution-time lock costs (raw socket, ``SET NX`` and a
#: compare-and-delete), a packed string value with an ``INCR`` fence, and this package's own
#: Lua scripts sent the same way.
FLOOR, FLOOR_PACKED = "floor: SET NX + compare-and-delete", "floor: packed value + INCR"
FLOOR_SCRIPTS = "floor: our scripts"
#: ``LockedTask`` run by a second worker that imports the package from ``--baseline``.
BASELINE = "LockedTask (baseline)"
#: Commands of the measuring script itself, left out of the lock command counts.
_OWN_COMMANDS = {"info", "config", "flushall", "flushdb", "ping", "client", "hello"}


# --------------------------------------------------------------------------------------------
# The Celery app (imported by the worker as the module ``bench_tasks``)


def make_app() -> Celery:
    app = Celery("csl_bench")
    locks = os.environ.get(ENV_LOCKS)
    app.conf.update(
        broker_url=os.environ.get(ENV_BROKER),
        result_backend=os.environ.get(ENV_BACKEND),
        singleton_lock_url=locks,
        # celery-singleton and celery-once keep their locks on the same lock server.
        singleton_backend_url=locks,
        ONCE={"backend": "celery_once.backends.Redis",
              "settings": {"url": locks or "redis://", "default_timeout": 3600}},
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=None,
        worker_redirect_stdouts=False,
        broker_connection_retry_on_startup=True,
    )
    return app


app = make_app()

#: Contender name -> registered task name (or the reason it is unavailable).
TASKS: dict[str, str] = {}
UNAVAILABLE: dict[str, str] = {}


def contender(label: str | None, name: str, base: type | None = None,
              **options: Any) -> None:
    """Register the no-op task ``name`` (``return i``), listed in the table as ``label``."""

    def noop(i: int) -> int:
        return i

    if base is not None:
        options["base"] = base
    app.task(name=name, **options)(noop)
    if label is not None:
        TASKS[label] = name


contender("plain Task", "bench.plain")
contender("LockedTask", "bench.locked", LockedTask)


@app.task(name="bench.whoami")
def whoami() -> dict[str, Any]:
    """Where the pool child that runs this imported ``celery_singleton_lock`` from."""
    return {"file": celery_singleton_lock.__file__, "pid": os.getpid()}

contender(None, "bench.locked_until_executed", LockedTask, lock_mode="until_executed")


def _resp(*words: bytes) -> bytes:
    """One command in RESP, packed by hand."""
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%b\r\n" % (len(w), w) for w in words)


def _sha(script: str) -> bytes:
    return hashlib.sha1(script.encode()).hexdigest().encode()


#: The usual compare-and-delete (redis-py's ``Lock`` releases with the same): a plain ``DEL``
#: could delete the lock of the next holder once this one had expired.
_COMPARE_AND_DELETE = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
                       "return redis.call('del', KEYS[1]) end return 0")
#: Compare-and-delete of a lock whose value starts with its 32-digit token.
_COMPARE_PREFIX_AND_DELETE = ("local v = redis.call('get', KEYS[1]) "
                              "if v and string.sub(v, 1, 32) == ARGV[1] then "
                              "return redis.call('del', KEYS[1]) end return 0")
_ACQUIRE_SHA, _RELEASE_SHA = SCRIPTS["acquire"].sha.encode(), SCRIPTS["release"].sha.encode()
_CAD_SHA, _PREFIX_CAD_SHA = _sha(_COMPARE_AND_DELETE), _sha(_COMPARE_PREFIX_AND_DELETE)
_FENCE_TTL = str(FENCE_TTL_MS).encode()


class _FloorLock(app.Task):  # type: ignore[name-defined]
    """The least a correct execution-time lock can cost: ``SET NX PX`` waited for before the
    body, a compare-and-delete written after it whose reply is read with the next acquire,
    over one raw socket per pool child with commands packed by hand.

    Not a usable lock (no renewal, no release of a killed child, no retry, no Redlock): a
    reference row, showing what the two lock commands themselves cost in this harness.
    ``acquire``/``release`` return the commands; ``acquired`` judges the acquire's reply.
    """

    abstract = True
    #: (pid, socket, replies owed by releases not read yet): one connection per task class
    #: and pool child.
    _conn: tuple[int, Any, int] | None = None

    def _socket(self) -> Any:
        import socket
        from urllib.parse import urlsplit

        conn = type(self)._conn
        if conn is not None and conn[0] == os.getpid():
            return conn[1]
        url = urlsplit(os.environ[ENV_LOCKS])
        sock = socket.create_connection((url.hostname, url.port or 6379))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        setup = [_resp(b"SELECT", ((url.path or "/0").strip("/") or "0").encode())]
        setup += [_resp(b"SCRIPT", b"LOAD", script.encode()) for script in self.scripts()]
        sock.sendall(b"".join(setup))
        self._read(sock, 1 + 2 * (len(setup) - 1))  # +OK, then $40 and the sha per script
        type(self)._conn = (os.getpid(), sock, 0)
        return sock

    @staticmethod
    def _read(sock: Any, lines: int) -> bytes:
        data = b""
        while data.count(b"\r\n") < lines:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("the lock server closed the connection")
            data += chunk
        return data

    def scripts(self) -> list[str]:
        return [_COMPARE_AND_DELETE]

    def acquire(self, key: bytes, token: bytes) -> tuple[bytes, int]:
        """The acquire command and the number of reply lines it gets."""
        return _resp(b"SET", key, token, b"NX", b"PX", b"60000"), 1

    def acquired(self, reply: bytes) -> bool:
        return reply.endswith(b"+OK\r\n")

    def release(self, key: bytes, token: bytes) -> bytes:
        return _resp(b"EVALSHA", _CAD_SHA, b"1", key, token)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sock = self._socket()
        cls = type(self)
        owed = cls._conn[2]  # type: ignore[index]
        key = f"floor:{self.name}:{args!r}".encode()
        token = uuid.uuid4().hex.encode()
        command, lines = self.acquire(key, token)
        sock.sendall(command)
        reply = self._read(sock, owed + lines)
        cls._conn = (os.getpid(), sock, 0)
        if not self.acquired(reply):
            raise RuntimeError(f"{self.name}: the lock was not taken: {reply!r}")
        try:
            return self.run(*args, **kwargs)
        finally:
            sock.sendall(self.release(key, token))
            cls._conn = (os.getpid(), sock, 1)


class _FloorScripts(_FloorLock):
    """:class:`_FloorLock` sending this package's own acquire and release scripts, with the
    same keys and lock-hash fields as ``LockedTask``: the server's share of its cost."""

    abstract = True

    def scripts(self) -> list[str]:
        return [SCRIPTS["acquire"].source, SCRIPTS["release"].source]

    def acquire(self, key: bytes, token: bytes) -> tuple[bytes, int]:
        meta = {"owner": self.request.id, "acquired_at": f"{time.time():.6f}",
                "task": self.name, "hostname": self.request.hostname or "", "mode":
                "while_executing", "ttl": "60.0", "renewals": "0", "pid": str(os.getpid())}
        words = [b"EVALSHA", _ACQUIRE_SHA, b"2", key, key + b":fence", token, b"60000",
                 _FENCE_TTL]
        for field_name, value in meta.items():
            words += [field_name.encode(), value.encode()]
        return _resp(*words), 3  # *2, :1, :<fence>

    def acquired(self, reply: bytes) -> bool:
        return reply.split(b"\r\n")[-4:-2] == [b"*2", b":1"]

    def release(self, key: bytes, token: bytes) -> bytes:
        return _resp(b"EVALSHA", _RELEASE_SHA, b"1", key, token, b"")


class _FloorPacked(_FloorLock):
    """A plain string lock whose value is the token followed by the holder's metadata, with
    the fencing counter's ``INCR`` in the same write: what a redesign of the lock's data
    model could cost (not this package's format)."""

    abstract = True

    def scripts(self) -> list[str]:
        return [_COMPARE_PREFIX_AND_DELETE]

    def acquire(self, key: bytes, token: bytes) -> tuple[bytes, int]:
        meta = "\x1f".join((self.request.id, f"{time.time():.6f}", self.name,
                            self.request.hostname or "", "while_executing", "60.0",
                            str(os.getpid()))).encode()
        return (_resp(b"SET", key, token + b"\x1f" + meta, b"NX", b"PX", b"60000")
                + _resp(b"INCR", key + b":fence")), 2

    def acquired(self, reply: bytes) -> bool:
        return reply.split(b"\r\n")[-3] == b"+OK"

    def release(self, key: bytes, token: bytes) -> bytes:
        return _resp(b"EVALSHA", _PREFIX_CAD_SHA, b"1", key, token)


contender(FLOOR, "bench.floor", _FloorLock)
contender(FLOOR_PACKED, "bench.floor_packed", _FloorPacked)
contender(FLOOR_SCRIPTS, "bench.floor_scripts", _FloorScripts)

try:
    from celery_singleton import Singleton

    contender("celery-singleton", "bench.singleton", Singleton)
except Exception as exc:  # the table shows why
    UNAVAILABLE["celery-singleton"] = f"{type(exc).__name__}: {exc}"

try:
    from celery_once import QueueOnce

    contender("celery-once", "bench.once", QueueOnce)
except Exception as exc:  # the table shows why
    UNAVAILABLE["celery-once"] = f"{type(exc).__name__}: {exc}"

#: Table order.
ORDER = ("plain Task", "celery-singleton", "celery-once", FLOOR, FLOOR_PACKED, FLOOR_SCRIPTS,
         "LockedTask", BASELINE)


# --------------------------------------------------------------------------------------------
# Servers and the worker


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def servers(count: int) -> Iterator[list[Any]]:
    """``count`` fresh ``redis-server`` processes (the test suite's launcher), closed at exit."""
    from tests.servers import RedisServer

    started: list[Any] = []
    try:
        for _ in range(count):
            started.append(RedisServer().start())
        yield started
    finally:
        for server in started:
            with contextlib.suppress(Exception):
                server.close()


def configure(broker_url: str, backend_url: str, lock_url: str) -> None:
    """Point this process's app at the servers and export the URLs for the worker."""
    os.environ.update({ENV_BROKER: broker_url, ENV_BACKEND: backend_url, ENV_LOCKS: lock_url})
    app.conf.update(broker_url=broker_url, result_backend=backend_url,
                    singleton_lock_url=lock_url, singleton_backend_url=lock_url,
                    ONCE={"backend": "celery_once.backends.Redis",
                          "settings": {"url": lock_url, "default_timeout": 3600}})


class Worker:
    """``celery -A bench_tasks worker -P prefork -c N`` in its own process group.

    With ``package``, the worker (its main process and its pool children) imports
    ``celery_singleton_lock`` from that directory: it comes first on its ``PYTHONPATH``, and
    this module puts it first on ``sys.path`` again (:data:`ENV_PACKAGE`). Each worker idles
    on a queue of its own, so :meth:`whoami` reaches the one asked.
    """

    def __init__(self, concurrency: int, app_module: str = "bench_tasks", *,
                 role: str = "", package: str | None = None) -> None:
        tag = f"{role}-" if role else ""
        self.hostname = f"bench-{tag}{os.getpid()}@localhost"
        self.idle_queue = f"{IDLE_QUEUE}-{role}" if role else IDLE_QUEUE
        self.concurrency = concurrency
        self.app_module = app_module
        self.package = package
        self._dir = tempfile.mkdtemp(prefix="csl-bench-worker-")
        self.log_path = Path(self._dir) / "worker.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> Worker:
        env = dict(os.environ)
        first = [self.package] if self.package else []
        env["PYTHONPATH"] = os.pathsep.join(
            first + [str(HERE), str(REPO_ROOT)]
            + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        env.pop(ENV_PACKAGE, None)
        if self.package:
            env[ENV_PACKAGE] = self.package
        argv = [sys.executable, "-m", "celery", "-A", self.app_module, "worker", "-P", "prefork",
                "-c", str(self.concurrency), "-n", self.hostname, "-Q", self.idle_queue,
                "--loglevel=WARNING", "--without-gossip", "--without-mingle",
                "--without-heartbeat"]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(argv, cwd=str(HERE), env=env, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout_s
        while not app.control.ping(destination=[self.hostname], timeout=0.5):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{self.log_tail()}")
        return self

    def whoami(self, timeout_s: float = 60.0) -> str:
        """The ``celery_singleton_lock`` file a pool child of this worker imported."""
        reply = whoami.apply_async(queue=self.idle_queue).get(timeout=timeout_s)
        return str(reply["file"])

    def main_cpu(self, before: dict[int, float], after: dict[int, float]) -> float:
        """The main process's own share of :func:`cpu_since` (its reaped children included)."""
        if self._proc is None:
            return 0.0
        pid = self._proc.pid
        return after.get(pid, 0.0) - before.get(pid, 0.0)

    def cpu_s(self) -> dict[int, float]:
        """CPU seconds used so far by each process of the worker's tree (see :func:`tree_cpu`)."""
        if self._proc is None:
            return {}
        return tree_cpu(self._proc.pid)

    def consume(self, queue: str) -> None:
        if not app.control.add_consumer(queue, destination=[self.hostname], reply=True,
                                        timeout=5):
            raise RuntimeError(f"the worker did not start consuming {queue}")

    def stop_consuming(self, queue: str) -> None:
        app.control.cancel_consumer(queue, destination=[self.hostname], reply=True, timeout=5)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                proc.wait(5)
        self._proc = None


# --------------------------------------------------------------------------------------------
# Measuring


def command_calls(client: redis.Redis) -> dict[str, int]:
    """``INFO commandstats`` as {command: calls}, without this script's own commands."""
    stats = client.info("commandstats")
    calls = {}
    for name, value in stats.items():
        command = name.removeprefix("cmdstat_")
        if command.split("|")[0] not in _OWN_COMMANDS:
            calls[command] = int(value["calls"])
    return calls


class RoundTrips:
    """Counts, with ``MONITOR``, the commands clients send to the lock server: round trips.

    ``INFO commandstats`` also counts the commands a Lua script runs, so it cannot tell one
    EVALSHA running six commands from six round trips; ``MONITOR`` marks those ``lua``. It
    slows the server down, so it only runs in a separate counting pass, never while timing.
    """

    MARK = "csl-bench-mark"

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url)
        self._marker = redis.Redis.from_url(url)
        self._monitor: Any = None
        self._direct: Counter[str] = Counter()
        self._seen: set[str] = set()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)

    def __enter__(self) -> RoundTrips:
        self._monitor = self._client.monitor().__enter__()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(Exception):
            self._monitor.connection.disconnect()
        self._thread.join(5)
        self._client.close()
        self._marker.close()

    def _run(self) -> None:
        while True:
            try:
                command = self._monitor.next_command()
            except Exception:  # the connection was closed: done
                return
            words = command["command"].split()
            name = words[0].lower() if words else ""
            with self._cond:
                if name == "echo" and len(words) == 3 and words[1] == self.MARK:
                    self._seen.add(words[2])
                    self._cond.notify_all()
                elif command["client_type"] != "lua" and name not in _OWN_COMMANDS:
                    self._direct[name] += 1

    def take(self, timeout_s: float = 30.0) -> dict[str, int]:
        """The commands sent since the last ``take()`` (waits until MONITOR has caught up)."""
        mark = uuid.uuid4().hex
        self._marker.echo(f"{self.MARK} {mark}")
        with self._cond:
            if not self._cond.wait_for(lambda: mark in self._seen, timeout_s):
                raise RuntimeError("MONITOR did not catch up")
            counts, self._direct = dict(self._direct), Counter()
        return counts


def _per_task(calls: dict[str, int], n: int) -> float:
    return sum(calls.values()) / n


@dataclass
class Round:
    """One timed pass of one contender."""

    #: Tasks per second from the result backend's ``date_done`` (first to last).
    rate: float
    #: Seconds from ``add_consumer`` to the last stored result.
    wall_s: float
    #: ``INFO commandstats`` calls on the lock server while publishing / while the worker ran
    #: (commands run inside Lua scripts included).
    publish_stats: dict[str, int]
    worker_stats: dict[str, int]
    #: CPU time per task, in microseconds, of the worker's whole process tree (main process
    #: and pool children) while it drained the queue, and of its main process alone.
    cpu_us: float = 0.0
    cpu_main_us: float = 0.0


@dataclass
class Result:
    name: str
    rounds: list[Round] = field(default_factory=list)
    #: End-to-end tasks per second (publish while the worker consumes), one per round.
    e2e: list[float] = field(default_factory=list)
    #: CPU microseconds per task of the worker's process tree in those end-to-end passes, and
    #: of its main process alone.
    e2e_cpu_us: list[float] = field(default_factory=list)
    e2e_cpu_main_us: list[float] = field(default_factory=list)
    #: Round trips to the lock server per phase, from the MONITOR counting pass.
    trips: dict[str, dict[str, int]] = field(default_factory=dict)
    trips_tasks: int = 0
    error: str | None = None

    def median(self) -> Round | None:
        if not self.rounds:
            return None
        ordered = sorted(self.rounds, key=lambda r: r.rate)
        return ordered[len(ordered) // 2]


class Bench:
    """Publishes, drains and measures batches of one contender's task through the worker."""

    def __init__(self, worker: Worker, backend: redis.Redis, locks: redis.Redis,
                 workers: dict[str, Worker] | None = None) -> None:
        #: The worker of every contender not in ``workers`` (contender name -> its worker).
        self.worker = worker
        self.workers = workers or {}
        self.backend = backend
        self.locks = locks
        self._next_arg = 0

    def worker_for(self, name: str) -> Worker:
        return self.workers.get(name, self.worker)

    def _args(self, n: int) -> range:
        start = self._next_arg
        self._next_arg += n
        return range(start, start + n)

    def run(self, name: str, n: int, trips: RoundTrips | None = None,
            timeout_s: float = 300.0) -> tuple[Round, dict[str, dict[str, int]]]:
        """Contender ``name``: publish ``n`` tasks, then let its worker drain them."""
        task_name, worker = TASKS[name], self.worker_for(name)
        task = app.tasks[task_name]
        self.backend.flushdb()
        self.locks.config_resetstat()
        if trips is not None:
            trips.take()
        ids = []
        for i in self._args(n):
            result = task.apply_async((i,), queue=QUEUE)
            if result is None or not getattr(result, "id", None):
                raise RuntimeError(f"{task_name} did not queue task {i}")
            ids.append(result.id)
        if len(set(ids)) != n:
            raise RuntimeError(f"{task_name}: {n - len(set(ids))} publishes were deduplicated")
        publish_stats = command_calls(self.locks)
        counted = {"publish": trips.take()} if trips is not None else {}
        self.locks.config_resetstat()
        cpu_before = worker.cpu_s()
        started = time.time()
        worker.consume(QUEUE)
        try:
            self._wait_results(task_name, n, timeout_s)
            wall_s = time.time() - started
        finally:
            worker.stop_consuming(QUEUE)
        cpu_after = worker.cpu_s()
        cpu_us = cpu_since(cpu_before, cpu_after) / n * 1e6
        main_us = worker.main_cpu(cpu_before, cpu_after) / n * 1e6
        worker_stats = command_calls(self.locks)
        if trips is not None:
            counted["worker"] = trips.take()
        return (Round(self._rate(ids, task_name), wall_s, publish_stats, worker_stats, cpu_us,
                      main_us), counted)

    def run_end_to_end(self, name: str, n: int,
                       timeout_s: float = 300.0) -> tuple[float, float, float]:
        """Tasks per second from the first publish to the last stored result.

        The worker already consumes the queue (a first task's result proves its consumer polls
        it), and this process publishes the ``n`` tasks one after the other while the worker
        runs them: the peers' publish-time lock and everything the worker does are both in the
        span, as they are for a real producer.

        Returns the rate and the CPU microseconds per task of the worker's process tree over
        the same span (from just before the first publish to the last result seen), and of its
        main process alone.
        """
        task_name, worker = TASKS[name], self.worker_for(name)
        task = app.tasks[task_name]
        self.backend.flushdb()
        worker.consume(QUEUE)
        try:
            (primer,) = self._args(1)
            task.apply_async((primer,), queue=QUEUE).get(timeout=60)
            self.backend.flushdb()
            ids = []
            cpu_before = worker.cpu_s()
            started = time.time()
            for i in self._args(n):
                ids.append(task.apply_async((i,), queue=QUEUE).id)
            self._wait_results(task_name, n, timeout_s)
            cpu_after = worker.cpu_s()
        finally:
            worker.stop_consuming(QUEUE)
        cpu_us = cpu_since(cpu_before, cpu_after) / n * 1e6
        main_us = worker.main_cpu(cpu_before, cpu_after) / n * 1e6
        return n / (max(self._done(ids, task_name)) - started), cpu_us, main_us

    def _wait_results(self, task_name: str, n: int, timeout_s: float) -> None:
        """Poll the result backend until ``n`` results are stored (or fail after the timeout)."""
        deadline = time.monotonic() + timeout_s
        while self.backend.dbsize() < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{task_name}: only {self.backend.dbsize()} of {n} results "
                                   f"after {timeout_s:.0f}s\n{self.worker.log_tail()}")
            time.sleep(0.005)

    def _rate(self, ids: Sequence[str], task_name: str) -> float:
        done = self._done(ids, task_name)
        span = max(done) - min(done)
        return (len(done) - 1) / span if span > 0 else float("inf")

    def _done(self, ids: Sequence[str], task_name: str) -> list[float]:
        done: list[float] = []
        for start in range(0, len(ids), 500):
            keys = [f"celery-task-meta-{tid}" for tid in ids[start:start + 500]]
            for raw in self.backend.mget(keys):
                meta = json.loads(raw)
                if meta["status"] != "SUCCESS":
                    raise RuntimeError(f"{task_name}: a task ended {meta['status']}: {meta}")
                done.append(datetime.fromisoformat(meta["date_done"]).timestamp())
        return done


def measure(bench: Bench, lock_url: str, names: Sequence[str], *, tasks: int, rounds: int,
            warmup: int, count_tasks: int) -> dict[str, Result]:
    results = {name: Result(name) for name in names}
    for name, reason in UNAVAILABLE.items():
        if name in results:
            results[name].error = reason
    live = [name for name in names if results[name].error is None]

    def attempt(name: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as exc:
            results[name].error = f"{type(exc).__name__}: {exc}"
            live.remove(name)

    for name in list(live):
        say(f"warm-up: {name}")
        attempt(name, lambda name=name: bench.run(name, warmup) and None)
    for r in range(rounds):
        shift = r % len(live) if live else 0
        for name in live[shift:] + live[:shift]:

            def timed(name: str = name, r: int = r) -> None:
                one, _ = bench.run(name, tasks)
                e2e, e2e_cpu, e2e_main = bench.run_end_to_end(name, tasks)
                results[name].rounds.append(one)
                results[name].e2e.append(e2e)
                results[name].e2e_cpu_us.append(e2e_cpu)
                results[name].e2e_cpu_main_us.append(e2e_main)
                say(f"round {r + 1}/{rounds} {name}: worker {one.rate:,.0f} tasks/s "
                    f"({one.cpu_us:,.0f} us CPU/task, main process {one.cpu_main_us:,.0f}), "
                    f"end to end {e2e:,.0f} tasks/s ({e2e_cpu:,.0f} us CPU/task, main process "
                    f"{e2e_main:,.0f})")

            attempt(name, timed)
    if count_tasks:
        with RoundTrips(lock_url) as trips:
            for name in list(live):
                say(f"counting round trips (MONITOR): {name}")

                def count(name: str = name) -> None:
                    _, counted = bench.run(name, count_tasks, trips=trips)
                    results[name].trips, results[name].trips_tasks = counted, count_tasks

                attempt(name, count)
    return results


# --------------------------------------------------------------------------------------------
# Output


def _hiredis() -> str:
    try:
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:
        return "no"
    return "yes" if HIREDIS_AVAILABLE else "no"


def _trips(result: Result, phase: str) -> str:
    if not result.trips_tasks:
        return "n/a"
    return f"{_per_task(result.trips.get(phase, {}), result.trips_tasks):.2f}"


def _paired(result: Result, base: Result, attr: str) -> list[float]:
    """Per-round ratios to plain Task (rounds are interleaved, so each pair shares a stretch)."""
    mine = [r.rate for r in result.rounds] if attr == "worker" else result.e2e
    theirs = [r.rate for r in base.rounds] if attr == "worker" else base.e2e
    return [a / b for a, b in zip(mine, theirs, strict=False)]


def _cpu(result: Result, attr: str) -> list[float]:
    """Worker CPU us per task, one per round: end-to-end passes or worker (drain) passes."""
    return result.e2e_cpu_us if attr == "e2e" else [r.cpu_us for r in result.rounds]


def table(results: dict[str, Result], tasks: int) -> str:
    plain = results["plain Task"]
    lines = [
        "| task base class | tasks/s (end to end) | vs plain Task | worker CPU us/task (end to "
        "end) | tasks/s (worker) | vs plain Task | worker CPU us/task (worker) "
        "| per-round end-to-end ratios (median) | lock commands/task: publish "
        "| lock commands/task: worker |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for name in ORDER:
        result = results.get(name)
        if result is None:
            continue
        best = result.median()
        if best is None:
            lines.append(f"| {name} | n/a ({result.error}) | n/a | n/a | n/a | n/a | n/a | n/a "
                         "| n/a | n/a |")
            continue
        e2e, base_e2e = median(result.e2e), median(plain.e2e)
        worker, base_worker = best.rate, plain.median()
        e2e_ratio = f"{e2e / base_e2e:.2f}x" if e2e and base_e2e else "n/a"
        worker_ratio = f"{worker / base_worker.rate:.2f}x" if base_worker is not None else "n/a"
        paired = _paired(result, plain, "e2e")
        rounds = ", ".join(f"{x:.2f}" for x in paired)
        if paired:
            rounds += f" (median {statistics.median(paired):.2f})"
        cpu_e2e, cpu_worker = median(_cpu(result, "e2e")), median(_cpu(result, "worker"))
        lines.append(
            f"| {name} | {e2e or 0:,.0f} | {e2e_ratio} | {cpu_e2e or 0:,.0f} | {worker:,.0f} "
            f"| {worker_ratio} | {cpu_worker or 0:,.0f} | {rounds} | {_trips(result, 'publish')} "
            f"| {_trips(result, 'worker')} |"
        )
    return "\n".join(lines)


def _pairs(mine: list[float], theirs: list[float]) -> str:
    ratios = [a / b for a, b in zip(mine, theirs, strict=False) if b]
    if not ratios:
        return "n/a"
    return (", ".join(f"{x:.2f}" for x in ratios)
            + f" (median **{statistics.median(ratios):.2f}**)")


def baseline_table(results: dict[str, Result]) -> str | None:
    """``LockedTask`` over ``LockedTask (baseline)``, round by round (the two take turns, so
    each pair shares a stretch of time): rates above 1 and CPU below 1 favour this checkout."""
    mine, theirs = results.get("LockedTask"), results.get(BASELINE)
    if mine is None or theirs is None or not mine.rounds or not theirs.rounds:
        return None
    rows = [
        ("tasks/s, end to end", mine.e2e, theirs.e2e),
        ("worker CPU us/task, end to end", _cpu(mine, "e2e"), _cpu(theirs, "e2e")),
        ("tasks/s, worker", [r.rate for r in mine.rounds], [r.rate for r in theirs.rounds]),
        ("worker CPU us/task, worker", _cpu(mine, "worker"), _cpu(theirs, "worker")),
    ]
    lines = ["| LockedTask / LockedTask (baseline) | per round (median) |", "| --- | --- |"]
    lines += [f"| {what} | {_pairs(a, b)} |" for what, a, b in rows]
    return "\n".join(lines)


def commands_detail(results: dict[str, Result], tasks: int) -> str:
    lines = ["| task base class | commands sent per task (MONITOR) | INFO commandstats per task "
             "(Lua-run commands included) |",
             "| --- | --- | --- |"]
    for name in ORDER:
        result = results.get(name)
        best = result.median() if result is not None else None
        if result is None or best is None:
            continue
        merged: Counter[str] = Counter()
        for calls in (best.publish_stats, best.worker_stats):
            merged.update(calls)
        stats = ", ".join(f"{c} {n / tasks:.2f}" for c, n in sorted(merged.items())) or "none"
        sent: Counter[str] = Counter()
        for calls in result.trips.values():
            sent.update(calls)
        per = max(1, result.trips_tasks)
        trips = ", ".join(f"{c} {n / per:.2f}" for c, n in sorted(sent.items())) or "none"
        lines.append(f"| {name} | {trips} | {stats} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=DEFAULT_TASKS,
                        help="tasks per contender and round (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP)
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT,
                        help="tasks of the MONITOR pass counting round trips (0: skip)")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--only", help="comma-separated contenders (plain Task is always kept)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--baseline", metavar="PATH",
                        help="also run LockedTask from the checkout at PATH (a directory "
                        "holding a celery_singleton_lock package) on a second worker that "
                        "imports it first: the contender 'LockedTask (baseline)', taking "
                        "turns with the others round by round")
    args = parser.parse_args(argv)
    baseline = None
    if args.baseline:
        baseline = str(Path(args.baseline).resolve())
        if not (Path(baseline) / "celery_singleton_lock").is_dir():
            parser.error(f"--baseline {args.baseline}: no celery_singleton_lock package there")
        # The same task, sent the same way (a while_executing LockedTask's publish takes no
        # lock), run by the baseline's worker.
        TASKS[BASELINE] = TASKS["LockedTask"]
    # SIGTERM unwinds like Ctrl-C, so the servers and the worker are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    names = [name for name in ORDER if name in TASKS or name in UNAVAILABLE]
    if args.only:
        wanted = {"plain Task", *(n.strip() for n in args.only.split(","))}
        if "LockedTask" in wanted:
            wanted.add(BASELINE)
        names = [name for name in names if name in wanted]
    with servers(2) as (main_server, lock_server):
        base = main_server.url.rsplit("/", 1)[0]
        configure(f"{base}/0", f"{base}/1", lock_server.url)
        backend = redis.Redis.from_url(f"{base}/1")
        locks = redis.Redis.from_url(lock_server.url)
        server_version = locks.info("server")["redis_version"]
        worker = Worker(args.concurrency)
        others: dict[str, Worker] = {}
        if baseline is not None and BASELINE in names:
            others[BASELINE] = Worker(args.concurrency, role="baseline", package=baseline)
        imported: dict[str, str] = {}
        try:
            for name, one in [("LockedTask", worker), *others.items()]:
                one.start()
                imported[name] = one.whoami()
                say(f"worker {one.hostname} ready, celery_singleton_lock from {imported[name]}")
            if baseline is not None and not imported.get(BASELINE, "").startswith(baseline):
                raise RuntimeError(f"the baseline worker imported {imported.get(BASELINE)}, "
                                   f"not the package under {baseline}")
            say(f"{args.tasks} tasks x {args.rounds} rounds")
            results = measure(Bench(worker, backend, locks, others), lock_server.url, names,
                              tasks=args.tasks, rounds=args.rounds, warmup=args.warmup,
                              count_tasks=args.count)
        finally:
            for one in [worker, *others.values()]:
                one.close()
            backend.close()
            locks.close()

    print(f"### Tasks through one prefork worker (-c {args.concurrency}): {args.tasks} distinct "
          f"no-op tasks per round, median of {args.rounds} rounds\n")
    print(table(results, args.tasks))
    compared = baseline_table(results)
    if compared is not None:
        print()
        print(compared)
    print()
    print(commands_detail(results, args.tasks))
    locked, plain = results.get("LockedTask"), results["plain Task"]
    best, base = (locked.median() if locked else None), plain.median()
    if locked is not None and best is not None and base is not None:
        scripts = sum(best.worker_stats.get(c, 0) + best.publish_stats.get(c, 0)
                      for c in ("evalsha", "eval"))
        e2e = median(locked.e2e) or 0.0
        print(f"\nLockedTask / plain Task: {e2e / (median(plain.e2e) or 1):.2f}x end to end "
              f"(target >= {TARGET_LOCKED_VS_PLAIN:.2f}x), {best.rate / base.rate:.2f}x "
              f"in the worker; lock scripts per task (INFO commandstats): "
              f"{scripts / args.tasks:.2f} (one acquire, waited for; one release, whose reply "
              f"is read with the next command). Peers measured elsewhere: "
              + ", ".join(f"{k} {v:.2f}x" for k, v in PEERS_MEASURED_ELSEWHERE.items()) + ".")
    head = commit(REPO_ROOT)
    trees = f"this checkout {head or REPO_ROOT} ({imported.get('LockedTask')})"
    if BASELINE in imported:
        trees += f", baseline {imported[BASELINE]}"
    print(f"\nPython {platform.python_version()}, celery {version('celery')}, redis-py "
          f"{version('redis')} (hiredis: {_hiredis()}), redis-server {server_version}, "
          f"celery-singleton {version('celery-singleton')}, celery_once "
          f"{version('celery_once')}, {os.cpu_count()} CPUs, 1-min load average "
          f"{os.getloadavg()[0]:.2f} at the end; {trees}.")
    if args.json:
        payload: dict[str, Any] = {
            name: {"error": r.error, "trips": r.trips, "trips_tasks": r.trips_tasks,
                   "rounds": [vars(x) for x in r.rounds], "e2e": r.e2e,
                   "e2e_cpu_us": r.e2e_cpu_us, "e2e_cpu_main_us": r.e2e_cpu_main_us}
            for name, r in results.items()}
        payload["_environment"] = {"commit": head, "imported": imported,
                                   "hiredis": _hiredis(), "tasks": args.tasks,
                                   "rounds": args.rounds}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
