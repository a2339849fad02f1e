"""Fault injection: one fault at a time, drawn from a seeded random generator.

Each fault is a generator that acts, yields how many seconds to wait before its next step, and
undoes what it did in ``finally`` (so closing it early, at the end of the run or on Ctrl-C,
heals at once). The kinds are drawn from a shuffled bag holding each kind once, so even a
short run sees every kind. Durations scale with ``lock_ttl`` so that faults matter:

* ``kill_child``: SIGKILL of one pool child (mostly one that is running a body);
* ``kill_worker``: SIGKILL of a whole worker (main process and children), restarted after a
  moment;
* ``pause_worker``: SIGSTOP of a whole worker for 1.3-2.2 x ttl, then SIGCONT;
* ``restart_master``: one master restarted without persistence (it comes back empty);
* ``rolling_restart``: every master restarted, one at a time, each back for ttl/3 before the
  next goes (SPEC 7: no duplicate may run);
* ``restart_two``: two masters down and restarted empty at the same time;
* ``pause_master``: SIGSTOP of one ``redis-server`` for 0.5-2 x ttl;
* ``latency``: 50-400 ms added to each chunk of one master's traffic, for 1-3 x ttl;
* ``partition``: one master's traffic held back entirely, for 1-3 x ttl.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Generator, Sequence

from chaos.checker import Fault
from chaos.proxy import ProxyProcess
from chaos.stores import LockStore
from tests.workers import CeleryWorker

__all__ = ["KINDS", "FaultEngine", "available_kinds"]

KINDS = (
    "kill_child", "kill_worker", "pause_worker", "restart_master", "rolling_restart",
    "restart_two", "pause_master", "latency", "partition",
)

Steps = Generator[float, None, None]


def available_kinds(store_kind: str) -> list[str]:
    """The kinds that apply to a store kind: a cluster is not behind the proxy, one Redis
    has no second master to restart."""
    if store_kind == "cluster":
        return [k for k in KINDS if k not in ("latency", "partition")]
    if store_kind == "single":
        return [k for k in KINDS if k not in ("rolling_restart", "restart_two")]
    return list(KINDS)


class FaultEngine:
    """Starts a fault when the last one is over and a random gap has passed; call
    :meth:`tick` often from the run's main thread (which owns every process it starts)."""

    def __init__(
        self,
        rng: random.Random,
        ttl_s: float,
        workers: Sequence[CeleryWorker],
        store: LockStore,
        proxy: ProxyProcess | None,
        kinds: Sequence[str],
        busy_pids: Callable[[], set[int]] = set,
        log: Callable[[str], None] = print,
    ) -> None:
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown fault kinds: {', '.join(unknown)}")
        self.rng = rng
        self.ttl_s = ttl_s
        self.workers = list(workers)
        self.store = store
        self.proxy = proxy
        self.kinds = list(kinds)
        self.busy_pids = busy_pids
        self.log = log
        #: Every fault injected so far (``end`` is set when it is over).
        self.faults: list[Fault] = []
        self._bag: list[str] = []
        self._active: Steps | None = None
        self._due = time.monotonic() + self._gap()

    def _gap(self) -> float:
        return self.rng.uniform(0.5, 1.5) * self.ttl_s

    def _draw(self) -> str:
        if not self._bag:
            self._bag = list(self.kinds)
            self.rng.shuffle(self._bag)
        return self._bag.pop()

    def tick(self) -> None:
        """Start the next fault, or take the active fault's next step, if it is due."""
        if not self.kinds or time.monotonic() < self._due:
            return
        if self._active is None:
            kind = self._draw()
            self._active = getattr(self, f"_{kind}")()
        try:
            wait = next(self._active)
        except StopIteration:
            self._active = None
            wait = self._gap()
        self._due = time.monotonic() + wait

    def finish(self) -> None:
        """Stop the active fault now (its ``finally`` heals)."""
        if self._active is not None:
            self._active.close()
            self._active = None
        self.kinds = []

    # -- helpers ---------------------------------------------------------------------------

    def _record(self, kind: str, target: str, **detail: object) -> Fault:
        now = time.time()
        fault = Fault(kind=kind, target=target, start=now, end=now, detail=dict(detail))
        self.faults.append(fault)
        self.log(f"fault {kind} {target} {detail if detail else ''}".rstrip())
        return fault

    def _live_workers(self) -> list[CeleryWorker]:
        return [w for w in self.workers if w.is_running()]

    def _server_name(self, index: int) -> str:
        return f"m{index}"

    # -- the faults ------------------------------------------------------------------------

    def _kill_child(self) -> Steps:
        workers = self._live_workers()
        if not workers:
            return
        worker = self.rng.choice(workers)
        children = worker.child_pids()
        if not children:
            return
        busy = sorted(set(children) & self.busy_pids())
        pid = self.rng.choice(busy if busy and self.rng.random() < 0.75 else children)
        fault = self._record("kill_child", worker.hostname, pid=pid, busy=pid in busy)
        fault.pids = [pid]
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            fault.pids = []
        fault.end = time.time()
        yield 0.0

    def _kill_worker(self) -> Steps:
        workers = self._live_workers()
        if not workers:
            return
        worker = self.rng.choice(workers)
        pids = [p for p in [worker.pid, *worker.child_pids()] if p is not None]
        down_s = self.rng.uniform(0.2, 1.5)
        fault = self._record("kill_worker", worker.hostname, down_s=round(down_s, 2))
        fault.pids = pids
        try:
            worker.kill()
            yield down_s
        finally:
            worker.start()
            fault.end = time.time()

    def _pause_worker(self) -> Steps:
        workers = self._live_workers()
        if not workers:
            return
        worker = self.rng.choice(workers)
        pause_s = self.rng.uniform(1.3, 2.2) * self.ttl_s
        fault = self._record("pause_worker", worker.hostname, seconds=round(pause_s, 2))
        try:
            worker.pause()
            yield pause_s
        finally:
            worker.resume()
            fault.end = time.time()

    def _restart_master(self) -> Steps:
        index = self.rng.randrange(len(self.store.servers))
        fault = self._record("restart_master", self._server_name(index))
        try:
            self.store.servers[index].restart()
        finally:
            fault.end = time.time()
        yield 0.0

    def _rolling_restart(self) -> Steps:
        order = list(range(len(self.store.servers)))
        self.rng.shuffle(order)
        back_s = self.ttl_s / 3 + 0.5
        fault = self._record("rolling_restart", ",".join(self._server_name(i) for i in order),
                             back_s=round(back_s, 2))
        try:
            for index in order:
                self.store.servers[index].restart()
                yield back_s
        finally:
            for index in order:
                self.store.servers[index].heal()
            fault.end = time.time()

    def _restart_two(self) -> Steps:
        chosen = self.rng.sample(range(len(self.store.servers)), 2)
        fault = self._record("restart_two", ",".join(self._server_name(i) for i in chosen))
        servers = [self.store.servers[i] for i in chosen]
        try:
            for server in servers:  # both down before either comes back
                server.stop()
            for server in servers:
                server.restart()
        finally:
            for server in servers:
                server.heal()
            fault.end = time.time()
        yield 0.0

    def _pause_master(self) -> Steps:
        index = self.rng.randrange(len(self.store.servers))
        pause_s = self.rng.uniform(0.5, 2.0) * self.ttl_s
        fault = self._record("pause_master", self._server_name(index), seconds=round(pause_s, 2))
        server = self.store.servers[index]
        try:
            server.pause()
            yield pause_s
        finally:
            server.resume()
            fault.end = time.time()

    def _latency(self) -> Steps:
        assert self.proxy is not None
        index = self.rng.randrange(len(self.store.servers))
        delay_s = self.rng.uniform(0.05, 0.4)
        hold_s = self.rng.uniform(1.0, 3.0) * self.ttl_s
        fault = self._record("latency", self._server_name(index), delay_s=round(delay_s, 3),
                             seconds=round(hold_s, 2))
        name = self._server_name(index)
        try:
            self.proxy.delay(name, delay_s)
            yield hold_s
        finally:
            self.proxy.heal(name)
            fault.end = time.time()

    def _partition(self) -> Steps:
        assert self.proxy is not None
        index = self.rng.randrange(len(self.store.servers))
        hold_s = self.rng.uniform(1.0, 3.0) * self.ttl_s
        fault = self._record("partition", self._server_name(index), seconds=round(hold_s, 2))
        name = self._server_name(index)
        try:
            self.proxy.partition(name)
            yield hold_s
        finally:
            self.proxy.heal(name)
            fault.end = time.time()
