#!/usr/bin/env python
"""Acquire+release cycles per second: this package's ``Redlock`` beside raw redis-py and peers.

Every contender runs in the same process, against the same ``redis-server`` processes, which
this script starts itself (five of them on free loopback ports, persistence off) and stops at
the end, even on error or Ctrl-C. A *cycle* is one non-blocking acquire followed by one release
of the same key; each contender has a key of its own (the libraries store different types under
their keys) and reuses it for every cycle. A cycle that does not really take and give back the
lock raises, so a contender cannot look fast by failing.

Method: every contender is warmed up, then timed with :func:`time.perf_counter` over
``--rounds`` rounds of ``--cycles`` cycles. Rounds are interleaved across contenders, and
finer still: each round is cut into ``--slices`` short runs and the contenders take turns run
by run, so every contender's round covers the same stretch of time and load from elsewhere
on the machine slows all of them alike. The median round is reported, as microseconds per
cycle, cycles per second, and the ratio to the raw floor (SET NX PX + EVALSHA
compare-and-delete on one master), with the CPU time per cycle of the thread that ran the
cycles (steadier than the wall time on a busy machine). A contender whose library is missing
or fails shows ``n/a`` and the reason.

``--baseline PATH`` repeats this package's contenders from another checkout: a subprocess that
imports ``celery_singleton_lock`` from PATH sets them up and, when asked, times a slice of
cycles with the same loop and reports wall and CPU time; its rows take their turns slice by
slice like every other. ``--control`` does the same from this checkout, to show what running
in a subprocess alone does to the numbers.

Usage::

    pip install -r benchmarks/requirements.txt
    python benchmarks/bench_locks.py [--cycles N] [--rounds 3] [--json out.json] [--only NAME,...]
                                     [--baseline /tmp/before] [--control]

The Markdown table goes to stdout, progress to stderr. No target is asserted: the exit status
is 0 whatever the numbers (1 only when the servers cannot be started).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
#: Set by ``--baseline`` for the subprocess that runs the baseline's contenders: the checkout
#: whose ``celery_singleton_lock`` that process imports, ahead of every other path.
ENV_PACKAGE = "CSL_BENCH_PACKAGE"
if os.environ.get(ENV_PACKAGE):
    sys.path.insert(0, os.environ[ENV_PACKAGE])

import redis  # noqa: E402  (after the sys.path insert, for tests.servers)

#: Default timed cycles per contender and round: the whole run stays under about two minutes
#: on a two-core machine (pottery's five-master Redlock is by far the slowest contender).
DEFAULT_CYCLES = 3000
DEFAULT_ROUNDS = 3
DEFAULT_WARMUP = 200
DEFAULT_SLICES = 10
#: Lock lifetime, in seconds: long enough never to expire inside a cycle.
DEFAULT_TTL_S = 10.0

#: The raw floor's release: compare-and-delete, loaded once with SCRIPT LOAD.
RELEASE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""

#: Targets from the issue, printed for context only (never asserted).
TARGET_OURS_1_VS_FLOOR = 1.0
TARGET_OURS_5_VS_POTTERY_5 = 5.0
TARGET_OURS_5_VS_FLOOR = 2.5


class Unavailable(Exception):
    """A contender that cannot run here; the table shows n/a with this reason."""


class CycleFailed(RuntimeError):
    """A cycle did not take or did not give back the lock."""


# --------------------------------------------------------------------------------------------
# Servers


class _PlainServer:
    """A bare ``redis-server`` on a free loopback port, used when ``tests/servers.py`` is absent."""

    def __init__(self) -> None:
        self.port: int | None = None
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> _PlainServer:
        binary = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
        if not binary:
            raise RuntimeError("no redis-server: put it on PATH or set REDIS_SERVER")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self._dir = tempfile.mkdtemp(prefix="csl-bench-")
        self._proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", self._dir, "--protected-mode", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10.0
        while True:
            try:
                with redis.Redis.from_url(self.url, socket_timeout=0.5) as conn:
                    conn.ping()
                return self
            except redis.ConnectionError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _server_factory() -> tuple[Callable[[], Any], str]:
    """The test suite's ``RedisServer`` (it picks the newest binary), else a bare launcher."""
    try:
        from tests.servers import RedisServer, find_redis_server
    except ImportError:
        return _PlainServer, os.environ.get("REDIS_SERVER") or shutil.which("redis-server") or "?"
    try:
        binary = find_redis_server()
    except Exception as exc:  # no binary: let start() report it
        binary = f"? ({exc})"
    return RedisServer, binary


def _redis_server_version(url: str) -> str:
    with redis.Redis.from_url(url, socket_timeout=2) as conn:
        return str(conn.info("server").get("redis_version", "?"))


# --------------------------------------------------------------------------------------------
# Contenders


@dataclass
class Cycle:
    """One contender, set up: ``run()`` is one acquire + release, ``close()`` frees clients."""

    run: Callable[[], None]
    close: Callable[[], None] = lambda: None
    #: ``timed(n)``: ``(wall, cpu)`` seconds taken by ``n`` cycles, when they run elsewhere (a
    #: baseline's contender in its own process times its cycles there); ``None``: run ``run``
    #: here.
    timed: Callable[[int], tuple[float, float]] | None = None


@dataclass
class Contender:
    #: Identifier for ``--only`` and the JSON output.
    name: str
    #: What the table shows.
    label: str
    masters: int
    #: ``make(urls, key, ttl_s)`` returns the :class:`Cycle` or raises :class:`Unavailable`.
    make: Callable[[Sequence[str], str, float], Cycle]


def _import(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Unavailable(
            f"{package} is not installed ({exc}); pip install -r benchmarks/requirements.txt"
        ) from None


def make_floor(urls: Sequence[str], key: str, ttl_s: float) -> Cycle:
    """``SET key token NX PX ttl`` then ``EVALSHA`` compare-and-delete: the least a lock can do."""
    client = redis.Redis.from_url(urls[0])
    sha = client.script_load(RELEASE_LUA)
    ttl_ms = int(ttl_s * 1000)
    set_, evalsha, token_hex = client.set, client.evalsha, secrets.token_hex

    def run() -> None:
        token = token_hex(16)
        if not set_(key, token, nx=True, px=ttl_ms):
            raise CycleFailed("SET NX found the key taken")
        if evalsha(sha, 1, key, token) != 1:
            raise CycleFailed("compare-and-delete found the key gone")

    return Cycle(run, client.close)


def make_redis_py(urls: Sequence[str], key: str, ttl_s: float) -> Cycle:
    """redis-py's own ``Lock``; ``thread_local=False`` as any renewing user must set it."""
    from redis.lock import Lock

    client = redis.Redis.from_url(urls[0])
    lock = Lock(client, key, timeout=ttl_s, thread_local=False)

    def run() -> None:
        if not lock.acquire(blocking=False):
            raise CycleFailed("acquire returned False")
        lock.release()

    return Cycle(run, client.close)


def make_python_redis_lock(urls: Sequence[str], key: str, ttl_s: float) -> Cycle:
    """python-redis-lock's ``Lock`` (SET NX EX, release by a Lua script that also signals)."""
    redis_lock = _import("redis_lock", "python-redis-lock")
    client = redis.Redis.from_url(urls[0])
    lock = redis_lock.Lock(client, key, expire=max(1, int(ttl_s)))

    def run() -> None:
        if not lock.acquire(blocking=False):
            raise CycleFailed("acquire returned False")
        lock.release()

    return Cycle(run, client.close)


def make_pottery(urls: Sequence[str], key: str, ttl_s: float) -> Cycle:
    """pottery's ``Redlock`` over ``masters``: one thread per master per call."""
    pottery = _import("pottery", "pottery")
    clients = [redis.Redis.from_url(u) for u in urls]
    lock = pottery.Redlock(
        key=key, masters=clients, auto_release_time=ttl_s, context_manager_blocking=False
    )

    def run() -> None:
        if not lock.acquire(blocking=False):
            raise CycleFailed("acquire returned False")
        lock.release()  # raises ReleaseUnlockedLock if a quorum did not release

    def close() -> None:
        for client in clients:
            client.close()

    return Cycle(run, close)


def _our_redlock() -> Any:
    try:
        module = importlib.import_module("celery_singleton_lock")
    except ImportError as exc:
        raise Unavailable(f"celery_singleton_lock cannot be imported ({exc})") from None
    redlock = getattr(module, "Redlock", None)
    if redlock is None:  # not exported yet: the class itself
        try:
            redlock = importlib.import_module("celery_singleton_lock.lock").Redlock
        except (ImportError, AttributeError) as exc:
            raise Unavailable(f"celery_singleton_lock has no Redlock ({exc})") from None
    return redlock


def _our_lock(urls: Sequence[str], key: str, ttl_s: float) -> Any:
    url: str | list[str] = urls[0] if len(urls) == 1 else list(urls)
    return _our_redlock()(key, url=url, ttl=ttl_s)


def make_ours(urls: Sequence[str], key: str, ttl_s: float) -> Cycle:
    """This package: ``acquire(blocking=False)`` then ``release()`` (no renewal registered)."""
    lock = _our_lock(urls, key, ttl_s)

    def run() -> None:
        if not lock.acquire(blocking=False):
            raise CycleFailed("acquire returned False")
        if not lock.release():
            raise CycleFailed("release returned False")

    return Cycle(run, lock.store.close)


def make_ours_with(urls: Sequence[str], key: str, ttl_s: float) -> Cycle:
    """This package: ``with lock:`` (blocking acquire, renewer registration, release)."""
    lock = _our_lock(urls, key, ttl_s)

    def run() -> None:
        with lock:
            if lock.token is None:
                raise CycleFailed("the with block runs without holding the lock")

    return Cycle(run, lock.store.close)


CONTENDERS: list[Contender] = [
    Contender("raw-floor", "raw floor: SET NX PX + EVALSHA del", 1, make_floor),
    Contender("redis-py", "redis-py `Lock`", 1, make_redis_py),
    Contender("python-redis-lock", "python-redis-lock `Lock`", 1, make_python_redis_lock),
    Contender("pottery-1", "pottery `Redlock`", 1, make_pottery),
    Contender("pottery-3", "pottery `Redlock`", 3, make_pottery),
    Contender("pottery-5", "pottery `Redlock`", 5, make_pottery),
    Contender("ours-1", "celery-singleton-lock `Redlock`", 1, make_ours),
    Contender("ours-with-1", "celery-singleton-lock `with Redlock`", 1, make_ours_with),
    Contender("ours-3", "celery-singleton-lock `Redlock`", 3, make_ours),
    Contender("ours-5", "celery-singleton-lock `Redlock`", 5, make_ours),
]


# --------------------------------------------------------------------------------------------
# Another checkout's contenders (--baseline), in a process of their own


#: This package's contenders that ``--baseline`` (and ``--control``) repeat from another
#: process, each right after its own row.
REPEATED = ("ours-1", "ours-with-1", "ours-3", "ours-5")
#: Name suffixes of those copies: from the ``--baseline`` checkout, and from this one
#: (``--control``).
BASELINE, CONTROL = "@baseline", "@subprocess"


class Remote:
    """One ``bench_locks.py --serve`` process, importing ``celery_singleton_lock`` from
    ``package_path`` ahead of everything else on ``sys.path``.

    It sets contenders up and times their cycles when asked, with the same
    :func:`_timed_s` loop as this process: one JSON line per request on its stdin, one per
    reply on its stdout. While it runs a slice this process only waits for the reply, and the
    time comes from the child's own ``perf_counter``, so the pipe is not in it.
    """

    def __init__(self, package_path: str) -> None:
        env = dict(os.environ, **{ENV_PACKAGE: package_path})
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1,
        )  # fmt: skip
        hello = self._ask({"op": "hello"})
        #: Where the child's ``celery_singleton_lock`` came from (shown in the table's header).
        self.package_file: str = hello["file"]

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc
        if proc.stdin is None or proc.stdout is None or proc.poll() is not None:
            raise RuntimeError("the contenders' subprocess is gone")
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("the contenders' subprocess exited")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise (Unavailable if reply.get("unavailable") else RuntimeError)(reply["error"])
        return reply

    def make(self, contender: str, name: str) -> Callable[[Sequence[str], str, float], Cycle]:
        """A ``make`` for :class:`Contender` that sets ``contender`` up in the child."""

        def make(urls: Sequence[str], key: str, ttl_s: float) -> Cycle:
            self._ask({"op": "make", "name": name, "contender": contender, "urls": list(urls),
                       "key": key, "ttl": ttl_s})

            def run() -> None:  # never called: timed() runs the cycles in the child
                raise CycleFailed("this contender's cycles run in its own process")

            def timed(n: int) -> tuple[float, float]:
                reply = self._ask({"op": "run", "name": name, "n": n})
                return float(reply["s"]), float(reply["cpu_s"])

            def close() -> None:
                self._ask({"op": "close", "name": name})

            return Cycle(run, close, timed)

        return make

    def close(self) -> None:
        proc = self._proc
        with contextlib.suppress(Exception):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def serve() -> int:
    """The child of :class:`Remote`: answer its requests until stdin closes."""
    replies = sys.stdout
    sys.stdout = sys.stderr  # stdout carries the replies only
    makers = {c.name: c.make for c in CONTENDERS}
    cycles: dict[str, Cycle] = {}
    for line in sys.stdin:
        request = json.loads(line)
        reply: dict[str, Any] = {}
        try:
            op = request["op"]
            if op == "hello":
                reply["file"] = importlib.import_module("celery_singleton_lock").__file__
            elif op == "make":
                cycles[request["name"]] = makers[request["contender"]](
                    request["urls"], request["key"], request["ttl"]
                )
            elif op == "run":
                gc.collect()  # as the parent does before each slice
                reply["s"], reply["cpu_s"] = _timed_s(cycles[request["name"]], int(request["n"]))
            elif op == "close":
                cycles.pop(request["name"]).close()
            else:
                raise ValueError(f"unknown request {op!r}")
        except Unavailable as exc:
            reply = {"error": str(exc), "unavailable": True}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
    for cycle in cycles.values():
        with contextlib.suppress(Exception):
            cycle.close()
    return 0


def _commit(path: str | Path) -> str | None:
    """The short commit of a git checkout at ``path`` (None if it is not one)."""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# --------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Result:
    contender: Contender
    cycle: Cycle | None = None
    #: Why the contender shows n/a (set up failed, or a cycle failed).
    error: str | None = None
    #: Microseconds per cycle, one value per round.
    rounds_us: list[float] = field(default_factory=list)
    #: CPU microseconds per cycle of the thread that ran the cycles, one value per round.
    rounds_cpu_us: list[float] = field(default_factory=list)

    @property
    def us(self) -> float | None:
        return statistics.median(self.rounds_us) if self.rounds_us and not self.error else None

    @property
    def cpu_us(self) -> float | None:
        if not self.rounds_cpu_us or self.error:
            return None
        return statistics.median(self.rounds_cpu_us)


def _timed_s(cycle: Cycle, n: int) -> tuple[float, float]:
    """Seconds taken by ``n`` cycles: wall time, and CPU time of the thread running them
    (:func:`time.thread_time`: the client's own work, user and kernel, without the waits for
    the servers and without other threads, such as the renewal thread)."""
    if cycle.timed is not None:
        return cycle.timed(n)
    run = cycle.run
    cpu = time.thread_time()
    start = time.perf_counter()
    for _ in range(n):
        run()
    wall = time.perf_counter() - start
    return wall, time.thread_time() - cpu


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _split(total: int, parts: int) -> list[int]:
    """``total`` cycles in ``parts`` nearly equal slices (none empty)."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def measure(results: list[Result], *, cycles: int, rounds: int, warmup: int, slices: int) -> None:
    """Warm every contender up, then time ``rounds`` rounds of ``cycles`` cycles each.

    A round is cut into ``slices`` short runs, and the contenders take turns slice by slice
    (the first one changes every slice), so each contender's round spans the same minutes
    as every other's: a burst of load elsewhere on the machine slows them all alike instead
    of falling on one.
    """
    for res in results:
        if res.cycle is not None:
            try:
                _timed_s(res.cycle, warmup)
            except Exception as exc:
                res.error = f"warm-up failed: {type(exc).__name__}: {exc}"
    turn = 0
    for round_no in range(rounds):
        spent = {id(r): 0.0 for r in results}
        spent_cpu = {id(r): 0.0 for r in results}
        for n in _split(cycles, slices):
            live = [r for r in results if r.cycle is not None and r.error is None]
            if not live:
                break
            shift = turn % len(live)
            turn += 1
            gc.collect()
            for res in live[shift:] + live[:shift]:
                try:
                    wall, cpu = _timed_s(res.cycle, n)  # type: ignore[arg-type]
                    spent[id(res)] += wall
                    spent_cpu[id(res)] += cpu
                except Exception as exc:
                    res.error = f"round {round_no + 1} failed: {type(exc).__name__}: {exc}"
                    _say(f"  round {round_no + 1}  {res.contender.name:<18} n/a ({res.error})")
        for res in results:
            if res.cycle is not None and res.error is None:
                us = spent[id(res)] / cycles * 1e6
                cpu_us = spent_cpu[id(res)] / cycles * 1e6
                res.rounds_us.append(us)
                res.rounds_cpu_us.append(cpu_us)
                _say(f"  round {round_no + 1}  {res.contender.name:<18} {us:9.1f} us/cycle "
                     f"({cpu_us:6.1f} us CPU)")


# --------------------------------------------------------------------------------------------
# Reporting


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _by_name(results: list[Result]) -> dict[str, Result]:
    return {r.contender.name: r for r in results}


def summary(results: list[Result]) -> dict[str, float | None]:
    """The three ratios the issue's targets speak of."""
    by = _by_name(results)

    def us(name: str) -> float | None:
        return by[name].us if name in by else None

    floor = us("raw-floor")
    ours_5, pottery_5 = us("ours-5"), us("pottery-5")
    ratios: dict[str, float | None] = {
        "ours_1_vs_floor": _ratio(us("ours-1"), floor),
        # cycles/s ratio = inverse ratio of us/cycle
        "ours_5_vs_pottery_5_cycles_per_s": _ratio(pottery_5, ours_5),
        "ours_5_vs_floor": _ratio(ours_5, floor),
    }
    for suffix in (BASELINE, CONTROL):
        if not any(name.endswith(suffix) for name in by):
            continue
        tag = suffix.lstrip("@")
        ratios[f"{tag}_ours_1_vs_floor"] = _ratio(us(f"ours-1{suffix}"), floor)
        ratios[f"{tag}_ours_5_vs_pottery_5_cycles_per_s"] = _ratio(
            pottery_5, us(f"ours-5{suffix}")
        )
        ratios[f"{tag}_ours_5_vs_floor"] = _ratio(us(f"ours-5{suffix}"), floor)
        for name in REPEATED:
            paired = _paired(by.get(name), by.get(f"{name}{suffix}"))
            ratios[f"{name.replace('-', '_')}_vs_{tag}"] = (
                statistics.median(paired) if paired else None
            )
    return ratios


def _paired(mine: Result | None, theirs: Result | None, cpu: bool = False) -> list[float]:
    """Round by round, ``mine``'s time per cycle over ``theirs``' (their rounds share a stretch
    of time, slice by slice); with ``cpu``, the client's CPU time per cycle."""
    if mine is None or theirs is None or mine.us is None or theirs.us is None:
        return []
    if cpu:
        return [a / b for a, b in zip(mine.rounds_cpu_us, theirs.rounds_cpu_us, strict=False)
                if b]
    return [a / b for a, b in zip(mine.rounds_us, theirs.rounds_us, strict=False)]


def markdown(results: list[Result], ratios: dict[str, float | None]) -> str:
    floor = _by_name(results).get("raw-floor")
    floor_us = floor.us if floor else None
    lines = [
        "| contender | masters | us/cycle | cycles/s | x floor | x floor, median of rounds "
        "| client CPU us/cycle | rounds (us/cycle) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for res in results:
        c = res.contender
        if res.us is None:
            reason = (res.error or "not measured").replace("|", "/").replace("\n", " ")
            lines.append(f"| {c.label} | {c.masters} | n/a | n/a | n/a | n/a | n/a | {reason} |")
            continue
        rounds = ", ".join(f"{u:.0f}" for u in res.rounds_us)
        paired = _paired(res, floor)
        lines.append(
            f"| {c.label} | {c.masters} | {res.us:.1f} | {1e6 / res.us:,.0f} | "
            f"{_fmt(_ratio(res.us, floor_us), '.2f', 'x')} | "
            f"{_fmt(statistics.median(paired) if paired else None, '.2f', 'x')} | "
            f"{_fmt(res.cpu_us, '.1f')} | {rounds} |"
        )
    lines += [
        "",
        f"- our single master / raw floor (us/cycle): "
        f"**{_fmt(ratios['ours_1_vs_floor'], '.2f', 'x')}** "
        f"(issue target: at most {TARGET_OURS_1_VS_FLOOR}x)",
        f"- our 5 masters / pottery 5 masters (cycles/s): "
        f"**{_fmt(ratios['ours_5_vs_pottery_5_cycles_per_s'], '.1f', 'x')}** "
        f"(issue target: at least {TARGET_OURS_5_VS_POTTERY_5:g}x)",
        f"- our 5 masters / raw single-master floor (us/cycle): "
        f"**{_fmt(ratios['ours_5_vs_floor'], '.2f', 'x')}** "
        f"(issue target: at most {TARGET_OURS_5_VS_FLOOR}x)",
    ]
    by = _by_name(results)
    for suffix, what in ((BASELINE, "baseline"), (CONTROL, "this checkout in a subprocess")):
        tag = suffix.lstrip("@")
        if f"{tag}_ours_1_vs_floor" not in ratios:
            continue
        lines += [
            f"- {what}: single master / raw floor "
            f"**{_fmt(ratios[f'{tag}_ours_1_vs_floor'], '.2f', 'x')}**, 5 masters / raw floor "
            f"**{_fmt(ratios[f'{tag}_ours_5_vs_floor'], '.2f', 'x')}**, 5 masters vs pottery "
            f"5 masters (cycles/s) "
            f"**{_fmt(ratios[f'{tag}_ours_5_vs_pottery_5_cycles_per_s'], '.1f', 'x')}**",
        ]
        for name in REPEATED:
            paired = _paired(by.get(name), by.get(f"{name}{suffix}"))
            paired_cpu = _paired(by.get(name), by.get(f"{name}{suffix}"), cpu=True)
            if paired:
                lines.append(
                    f"  - `{name}` / `{name}{suffix}`, round by round, us/cycle: "
                    + ", ".join(f"{x:.2f}" for x in paired)
                    + f" (median **{statistics.median(paired):.2f}**); client CPU/cycle: "
                    + ", ".join(f"{x:.2f}" for x in paired_cpu)
                    + (f" (median **{statistics.median(paired_cpu):.2f}**)" if paired_cpu
                       else "")
                )
        lines.append("  (below 1: this checkout takes less)")
    return "\n".join(lines)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(binary: str, server_version: str, args: argparse.Namespace) -> dict[str, Any]:
    try:
        from redis.utils import HIREDIS_AVAILABLE as hiredis
    except ImportError:
        hiredis = False
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2)
        if hasattr(os, "getloadavg")
        else None,
        "redis_server": binary,
        "redis_server_version": server_version,
        "hiredis": bool(hiredis),
        "versions": {
            d: _version(d)
            for d in ("celery-singleton-lock", "redis", "pottery", "python-redis-lock")
        },
        "cycles": args.cycles,
        "rounds": args.rounds,
        "slices": args.slices,
        "warmup": args.warmup,
        "ttl_s": args.ttl,
    }


# --------------------------------------------------------------------------------------------
# Main


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Acquire+release cycles per second: celery-singleton-lock vs redis-py, "
        "python-redis-lock and pottery, against redis-server processes it starts itself."
    )
    parser.add_argument(
        "--cycles",
        type=int,
        default=DEFAULT_CYCLES,
        help=f"timed cycles per contender and round (default {DEFAULT_CYCLES})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=DEFAULT_ROUNDS,
        help=f"interleaved rounds; the median is reported (default {DEFAULT_ROUNDS})",
    )
    parser.add_argument(
        "--slices",
        type=int,
        default=DEFAULT_SLICES,
        help="short runs per round, contenders taking turns between them "
        f"(default {DEFAULT_SLICES})",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=DEFAULT_WARMUP,
        help=f"untimed cycles per contender first (default {DEFAULT_WARMUP})",
    )
    parser.add_argument(
        "--ttl",
        type=float,
        default=DEFAULT_TTL_S,
        help=f"lock ttl in seconds (default {DEFAULT_TTL_S:g})",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated contender names to run (raw-floor is always "
        "kept for the ratios): " + ", ".join(c.name for c in CONTENDERS),
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--baseline",
        metavar="PATH",
        help="also run " + ", ".join(REPEATED) + " from the checkout at PATH (a directory "
        "holding a celery_singleton_lock package), in a subprocess that imports it first, "
        "taking turns slice by slice with everything else",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="also run those contenders from this checkout in a subprocess of the same kind, "
        "to show that running in a subprocess does not move the numbers",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return args
    if args.baseline and not (Path(args.baseline) / "celery_singleton_lock").is_dir():
        parser.error(f"--baseline {args.baseline}: no celery_singleton_lock package there")
    if min(args.cycles, args.rounds, args.slices) < 1 or args.warmup < 0 or args.ttl <= 0:
        parser.error("--cycles, --rounds and --slices must be >= 1, --warmup >= 0, --ttl > 0")
    return args


def _selected(only: str) -> list[Contender]:
    if not only:
        return list(CONTENDERS)
    names = {n.strip() for n in only.split(",") if n.strip()}
    unknown = names - {c.name for c in CONTENDERS}
    if unknown:
        raise SystemExit(f"unknown contender(s): {', '.join(sorted(unknown))}")
    names.add("raw-floor")
    return [c for c in CONTENDERS if c.name in names]


def _with_repeats(contenders: list[Contender], remotes: dict[str, Remote]) -> list[Contender]:
    """``contenders``, each of :data:`REPEATED` followed by its copy in every subprocess."""
    out: list[Contender] = []
    for c in contenders:
        out.append(c)
        if c.name not in REPEATED:
            continue
        for suffix, remote in remotes.items():
            name = f"{c.name}{suffix}"
            what = "baseline" if suffix == BASELINE else "this checkout, subprocess"
            out.append(Contender(name, f"{c.label} ({what})", c.masters,
                                 remote.make(c.name, name)))
    return out


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops the servers


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.serve:
        return serve()
    contenders = _selected(args.only)
    signal.signal(signal.SIGTERM, _on_sigterm)
    factory, binary = _server_factory()
    n_servers = max(c.masters for c in contenders)
    servers: list[Any] = []
    remotes: dict[str, Remote] = {}
    results: list[Result] = []
    try:
        if args.baseline:
            remotes[BASELINE] = Remote(str(Path(args.baseline).resolve()))
        if args.control:
            remotes[CONTROL] = Remote(str(REPO_ROOT))
        for suffix, remote in remotes.items():
            _say(f"contenders{suffix}: celery_singleton_lock from {remote.package_file}")
        contenders = _with_repeats(contenders, remotes)
        results = [Result(c) for c in contenders]
        _say(f"starting {n_servers} redis-server processes ({binary})")
        try:
            for _ in range(n_servers):
                server = factory()
                servers.append(server)  # before start(), so a half-started one is stopped too
                server.start()
        except Exception as exc:
            _say(f"cannot start redis-server: {exc}")
            return 1
        urls = [s.url for s in servers]
        server_version = _redis_server_version(urls[0])
        for res in results:
            c = res.contender
            try:
                res.cycle = c.make(urls[: c.masters], f"bench:{c.name}", args.ttl)
            except Unavailable as exc:
                res.error = str(exc)
            except Exception as exc:
                res.error = f"set-up failed: {type(exc).__name__}: {exc}"
            if res.error:
                _say(f"  {c.name}: n/a ({res.error})")
        _say(f"warm-up {args.warmup} cycles, then {args.rounds} rounds of {args.cycles} cycles")
        measure(
            results,
            cycles=args.cycles,
            rounds=args.rounds,
            warmup=args.warmup,
            slices=args.slices,
        )
        ratios = summary(results)
        env = environment(binary, server_version, args)
        env["package"] = {"path": str(REPO_ROOT), "commit": _commit(REPO_ROOT)}
        if BASELINE in remotes:
            env["baseline"] = {"path": str(Path(args.baseline).resolve()),
                               "commit": _commit(args.baseline),
                               "imported": remotes[BASELINE].package_file}
        load = env["load_average_1m_at_end"]
        trees = f"; this checkout at {env['package']['commit'] or REPO_ROOT}"
        if "baseline" in env:
            trees += f", baseline from {env['baseline']['imported']}"
        print(
            f"{args.cycles} cycles x {args.rounds} rounds (median), ttl {args.ttl:g} s; "
            f"redis-server {server_version}, Python {env['python']}, "
            f"redis-py {env['versions']['redis']} (hiredis: {'yes' if env['hiredis'] else 'no'}), "
            f"{env['cpus']} CPUs, 1-min load average {'n/a' if load is None else load} "
            f"(this run included){trees}\n"
        )
        print(markdown(results, ratios))
        if args.json:
            Path(args.json).write_text(json.dumps(_as_json(results, ratios, env), indent=2) + "\n")
            _say(f"wrote {args.json}")
        return 0
    finally:
        for res in results:
            if res.cycle is not None:
                with contextlib.suppress(Exception):
                    res.cycle.close()
        for remote in remotes.values():
            remote.close()
        for server in servers:
            with contextlib.suppress(Exception):
                server.close()


def _as_json(
    results: list[Result], ratios: dict[str, float | None], env: dict[str, Any]
) -> dict[str, Any]:
    floor = _by_name(results).get("raw-floor")
    floor_us = floor.us if floor else None
    return {
        "environment": env,
        "results": [
            {
                "name": r.contender.name,
                "label": r.contender.label,
                "masters": r.contender.masters,
                "us_per_cycle": r.us,
                "cycles_per_s": 1e6 / r.us if r.us else None,
                "ratio_to_floor": _ratio(r.us, floor_us),
                "rounds_us_per_cycle": r.rounds_us,
                "client_cpu_us_per_cycle": r.cpu_us,
                "rounds_client_cpu_us_per_cycle": r.rounds_cpu_us,
                "error": r.error,
            }
            for r in results
        ],
        "summary": ratios,
        "targets": {
            "ours_1_vs_floor_at_most": TARGET_OURS_1_VS_FLOOR,
            "ours_5_vs_pottery_5_cycles_per_s_at_least": TARGET_OURS_5_VS_POTTERY_5,
            "ours_5_vs_floor_at_most": TARGET_OURS_5_VS_FLOOR,
        },
    }


if __name__ == "__main__":
    sys.exit(main())
