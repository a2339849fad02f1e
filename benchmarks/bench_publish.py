#!/usr/bin/env python
"""Publish rate of ``delay()``: ``LockedTask(lock_mode="until_executed")`` beside peers.

Contenders, each called with distinct arguments, so every call takes a free lock and publishes
one message: plain Celery ``Task`` (no lock), celery-singleton's ``Singleton`` and celery-once's
``QueueOnce`` (both lock at enqueue), and this package's ``LockedTask`` with
``lock_mode="until_executed"`` (the enqueue-time lock of SPEC 4). No worker runs: the messages
stay in the broker queue, which is emptied (and the lock server flushed) between rounds.

The script starts its own ``redis-server`` processes (one broker, one lock server shared by
every contender) and stops them at the end. Each contender is warmed up, then timed over
``--calls`` calls per round with :func:`time.perf_counter`; rounds are interleaved across
contenders (the starting one rotates) and the median round is reported, as calls per second,
CPU microseconds per call in this process, and the ratios to plain ``Task`` and of
``LockedTask`` to each peer. Round trips to the lock server per call are counted with
``MONITOR`` in a separate pass. The tasks are those of ``bench_tasks.py``.

Usage::

    pip install -r benchmarks/requirements.txt
    python benchmarks/bench_publish.py [--calls 2000] [--rounds 7] [--json out.json]

The Markdown table goes to stdout, progress to stderr. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_tasks  # noqa: E402
import redis  # noqa: E402
from bench_tasks import RoundTrips, app, configure, say, servers, version  # noqa: E402

QUEUE = "bench-publish"
DEFAULT_CALLS = 2000
DEFAULT_ROUNDS = 7
DEFAULT_WARMUP = 200
DEFAULT_COUNT = 200

#: Contender -> task name (bench_tasks registers them all).
CONTENDERS = {
    "plain Task": "bench.plain",
    "celery-singleton": "bench.singleton",
    "celery-once": "bench.once",
    "LockedTask until_executed": "bench.locked_until_executed",
}
LOCKED = "LockedTask until_executed"
PEERS = ("celery-singleton", "celery-once")


@dataclass
class Result:
    name: str
    #: (calls per second, CPU microseconds per call) of each round.
    rounds: list[tuple[float, float]] = field(default_factory=list)
    trips: dict[str, int] = field(default_factory=dict)
    trips_calls: int = 0
    error: str | None = None

    def median(self) -> tuple[float, float] | None:
        if not self.rounds:
            return None
        ordered = sorted(self.rounds)
        return ordered[len(ordered) // 2]


class Publisher:
    def __init__(self, broker: redis.Redis, locks: redis.Redis) -> None:
        self.broker = broker
        self.locks = locks
        self._next_arg = 0

    def reset(self) -> None:
        self.broker.delete(QUEUE)
        self.locks.flushdb()

    def run(self, task_name: str, n: int) -> tuple[float, float]:
        """Publish ``n`` calls with fresh arguments; returns (calls/s, CPU us per call)."""
        task = app.tasks[task_name]
        self.reset()
        first = self._next_arg
        self._next_arg += n
        ids = set()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for i in range(first, first + n):
            ids.add(task.apply_async((i,), queue=QUEUE).id)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        queued = self.broker.llen(QUEUE)
        if len(ids) != n or queued != n:
            raise RuntimeError(f"{task_name}: {len(ids)} task ids and {queued} messages for "
                               f"{n} calls")
        return n / wall, cpu / n * 1e6


def measure(publisher: Publisher, lock_url: str, *, calls: int, rounds: int, warmup: int,
            count: int) -> dict[str, Result]:
    results = {name: Result(name) for name in CONTENDERS}
    for name in CONTENDERS:
        reason = bench_tasks.UNAVAILABLE.get(name)
        if reason:
            results[name].error = reason
    live = [name for name in CONTENDERS if results[name].error is None]
    for name in list(live):
        try:
            publisher.run(CONTENDERS[name], warmup)
        except Exception as exc:
            results[name].error = f"{type(exc).__name__}: {exc}"
            live.remove(name)
    for r in range(rounds):
        shift = r % len(live) if live else 0
        for name in live[shift:] + live[:shift]:
            try:
                rate, cpu_us = publisher.run(CONTENDERS[name], calls)
            except Exception as exc:
                results[name].error = f"{type(exc).__name__}: {exc}"
                live.remove(name)
                continue
            results[name].rounds.append((rate, cpu_us))
            say(f"round {r + 1}/{rounds} {name}: {rate:,.0f} calls/s, {cpu_us:.0f} us CPU/call")
    if count:
        with RoundTrips(lock_url) as trips:
            for name in live:
                trips.take()
                publisher.run(CONTENDERS[name], count)
                results[name].trips, results[name].trips_calls = trips.take(), count
    publisher.reset()
    return results


def table(results: dict[str, Result]) -> str:
    plain = results["plain Task"].median()
    locked = results[LOCKED].median()
    lines = [
        "| task base class | delay() calls/s | CPU us/call | vs plain Task | LockedTask vs this "
        "| lock round trips/call |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, result in results.items():
        best = result.median()
        if best is None:
            lines.append(f"| {name} | n/a ({result.error}) | n/a | n/a | n/a | n/a |")
            continue
        rate, cpu_us = best
        vs_plain = f"{rate / plain[0]:.2f}x" if plain else "n/a"
        vs_this = f"{locked[0] / rate:.2f}x" if locked and name in PEERS else ""
        per = max(1, result.trips_calls)
        trips = ", ".join(f"{c} {n / per:.2f}" for c, n in sorted(result.trips.items()))
        lines.append(f"| {name} | {rate:,.0f} | {cpu_us:.0f} | {vs_plain} | {vs_this} "
                     f"| {trips or ('none' if result.trips_calls else 'n/a')} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=DEFAULT_CALLS,
                        help="delay() calls per contender and round (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP)
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT,
                        help="calls of the MONITOR pass counting round trips (0: skip)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the servers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with servers(2) as (broker_server, lock_server):
        configure(broker_server.url, broker_server.url.rsplit("/", 1)[0] + "/1", lock_server.url)
        broker = redis.Redis.from_url(broker_server.url)
        locks = redis.Redis.from_url(lock_server.url)
        server_version = locks.info("server")["redis_version"]
        try:
            results = measure(Publisher(broker, locks), lock_server.url, calls=args.calls,
                              rounds=args.rounds, warmup=args.warmup, count=args.count)
        finally:
            broker.close()
            locks.close()

    print(f"### delay() publish rate: {args.calls} calls with distinct arguments per round, "
          f"median of {args.rounds} rounds, no worker\n")
    print(table(results))
    locked = results[LOCKED].median()
    peers = [results[p].median() for p in PEERS]
    if locked is not None and all(p is not None for p in peers):
        fastest_peer = max(p[0] for p in peers if p is not None)
        verdict = "meets" if locked[0] >= fastest_peer else "misses"
        print(f"\nLockedTask until_executed {verdict} the target of at least the peers' rate "
              f"({locked[0]:,.0f} vs {fastest_peer:,.0f} calls/s for the faster peer).")
    print(f"\nPython {platform.python_version()}, celery {version('celery')}, redis-py "
          f"{version('redis')}, redis-server {server_version}, celery-singleton "
          f"{version('celery-singleton')}, celery_once {version('celery_once')}, "
          f"{os.cpu_count()} CPUs.")
    if args.json:
        args.json.write_text(json.dumps(
            {name: {"error": r.error, "rounds": r.rounds, "trips": r.trips,
                    "trips_calls": r.trips_calls} for name, r in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
