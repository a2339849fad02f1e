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
compare-and-delete on one master). A contender whose library is missing or fails shows
``n/a`` and the reason.

Usage::

    pip install -r benchmarks/requirements.txt
    python benchmarks/bench_locks.py [--cycles N] [--rounds 3] [--json out.json] [--only NAME,...]

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
TARGET_OURS_1_VS_FLOOR = 1.15
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
# Measuring


@dataclass
class Result:
    contender: Contender
    cycle: Cycle | None = None
    #: Why the contender shows n/a (set up failed, or a cycle failed).
    error: str | None = None
    #: Microseconds per cycle, one value per round.
    rounds_us: list[float] = field(default_factory=list)

    @property
    def us(self) -> float | None:
        return statistics.median(self.rounds_us) if self.rounds_us and not self.error else None


def _timed_s(cycle: Cycle, n: int) -> float:
    """Seconds taken by ``n`` cycles."""
    run = cycle.run
    start = time.perf_counter()
    for _ in range(n):
        run()
    return time.perf_counter() - start


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
        for n in _split(cycles, slices):
            live = [r for r in results if r.cycle is not None and r.error is None]
            if not live:
                break
            shift = turn % len(live)
            turn += 1
            gc.collect()
            for res in live[shift:] + live[:shift]:
                try:
                    spent[id(res)] += _timed_s(res.cycle, n)  # type: ignore[arg-type]
                except Exception as exc:
                    res.error = f"round {round_no + 1} failed: {type(exc).__name__}: {exc}"
                    _say(f"  round {round_no + 1}  {res.contender.name:<18} n/a ({res.error})")
        for res in results:
            if res.cycle is not None and res.error is None:
                us = spent[id(res)] / cycles * 1e6
                res.rounds_us.append(us)
                _say(f"  round {round_no + 1}  {res.contender.name:<18} {us:9.1f} us/cycle")


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
    return {
        "ours_1_vs_floor": _ratio(us("ours-1"), floor),
        # cycles/s ratio = inverse ratio of us/cycle
        "ours_5_vs_pottery_5_cycles_per_s": _ratio(pottery_5, ours_5),
        "ours_5_vs_floor": _ratio(ours_5, floor),
    }


def markdown(results: list[Result], ratios: dict[str, float | None]) -> str:
    floor = _by_name(results).get("raw-floor")
    floor_us = floor.us if floor else None
    lines = [
        "| contender | masters | us/cycle | cycles/s | x floor | rounds (us/cycle) |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for res in results:
        c = res.contender
        if res.us is None:
            reason = (res.error or "not measured").replace("|", "/").replace("\n", " ")
            lines.append(f"| {c.label} | {c.masters} | n/a | n/a | n/a | {reason} |")
            continue
        rounds = ", ".join(f"{u:.0f}" for u in res.rounds_us)
        lines.append(
            f"| {c.label} | {c.masters} | {res.us:.1f} | {1e6 / res.us:,.0f} | "
            f"{_fmt(_ratio(res.us, floor_us), '.2f', 'x')} | {rounds} |"
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
    args = parser.parse_args(argv)
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


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops the servers


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    contenders = _selected(args.only)
    signal.signal(signal.SIGTERM, _on_sigterm)
    factory, binary = _server_factory()
    n_servers = max(c.masters for c in contenders)
    servers: list[Any] = []
    results = [Result(c) for c in contenders]
    try:
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
        load = env["load_average_1m_at_end"]
        print(
            f"{args.cycles} cycles x {args.rounds} rounds (median), ttl {args.ttl:g} s; "
            f"redis-server {server_version}, Python {env['python']}, "
            f"redis-py {env['versions']['redis']} (hiredis: {'yes' if env['hiredis'] else 'no'}), "
            f"{env['cpus']} CPUs, 1-min load average {'n/a' if load is None else load} "
            "(this run included)\n"
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
