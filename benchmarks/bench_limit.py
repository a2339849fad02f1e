#!/usr/bin/env python
"""Acquire+release cycles per second with ``lock_limit=3`` beside ``lock_limit=1``.

One run, its own ``redis-server`` processes (three, from ``tests/servers.py``), stopped at the
end. A cycle is one acquire (``try_acquire``, the call ``LockedTask`` makes) and one release of
the same key; with ``lock_limit=3`` it takes a slot, and in the ``busy`` rows two other holders
keep slots 0 and 1, so the script reads them before it takes slot 2. Contenders take turns
slice by slice, as in ``bench_locks.py``, and the median of ``--rounds`` rounds is reported,
with each row's time per cycle divided by that of ``lock_limit=1`` on as many masters.

Usage::

    python benchmarks/bench_limit.py [--cycles 2000] [--rounds 3] [--slices 10]

Nothing is asserted; the exit status is 0 whatever the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from celery_singleton_lock.lock import try_acquire  # noqa: E402
from celery_singleton_lock.backends.base import FixedMetadata, LockBackend  # noqa: E402
from celery_singleton_lock.backends.registry import open_backend  # noqa: E402
from tests.servers import RedisServer  # noqa: E402

TTL_S = 10.0
#: The lock hash fields a LockedTask writes with every acquire, packed once as it packs them.
FIXED = FixedMetadata([("task", "bench.limit"), ("hostname", "bench"), ("mode", "while_executing"),
                       ("ttl", TTL_S), ("renewals", 0), ("pid", 1)])


def cycle_of(store: LockBackend, key: str, limit: int, busy: int) -> Callable[[], None]:
    """One acquire and one release; ``busy`` other holders keep their slots meanwhile."""
    for i in range(busy):
        lease, _ = try_acquire(store, key, 600.0, owner=f"busy{i}", limit=limit)
        assert lease is not None, "cannot take the busy slots"

    def run() -> None:
        lease, _ = try_acquire(store, key, TTL_S, FIXED, owner="bench", limit=limit,
                               metadata=(("owner", "bench"),))
        if lease is None:
            raise RuntimeError(f"acquire of {key} failed")
        if not lease.release():
            raise RuntimeError(f"release of {key} failed")

    return run


def _timed_s(run: Callable[[], None], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        run()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=2000, help="timed cycles per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=10)
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(RedisServer()) for _ in range(3)]
        stores = {n: open_backend(servers[0].url if n == 1 else [s.url for s in servers])
                  for n in (1, 3)}
        for store in stores.values():
            stack.callback(store.close)
        rows = [(f"lock_limit={limit}{' busy' if busy else ''}, {n} master{'s' * (n > 1)}",
                 n, limit, cycle_of(stores[n], f"csl:bench.limit:{{{n}-{limit}-{busy}}}",
                                    limit, busy))
                for n in (1, 3) for limit, busy in ((1, 0), (3, 0), (3, 2))]
        for _, _, _, run in rows:
            _timed_s(run, 200)  # warm-up
        rounds: dict[str, list[float]] = {name: [] for name, *_ in rows}
        per_slice = max(1, args.cycles // args.slices)
        for _ in range(args.rounds):
            spent = dict.fromkeys(rounds, 0.0)
            for turn in range(args.slices):
                gc.collect()
                shift = turn % len(rows)
                for name, _, _, run in rows[shift:] + rows[:shift]:
                    spent[name] += _timed_s(run, per_slice)
            for name in rounds:
                rounds[name].append(spent[name] / (per_slice * args.slices) * 1e6)
        print("| contender | µs/cycle | cycles/s | vs lock_limit=1 |")
        print("|---|---:|---:|---:|")
        for name, n, _, _ in rows:
            us = statistics.median(rounds[name])
            base = statistics.median(rounds[f"lock_limit=1, {n} master{'s' * (n > 1)}"])
            print(f"| {name} | {us:.1f} | {1e6 / us:,.0f} | {us / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
