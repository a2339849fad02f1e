"""Highly available beat: two ``LockedScheduler`` beats, one leads, the other takes over.

    python examples/ha_beat.py

Starts two real beat processes of this app, each with its own schedule file::

    celery -A ha_beat beat -S celery_singleton_lock.beat:LockedScheduler

The schedule sends ``ha_beat.tick`` every second. One beat holds the leader lock
(``csl:{beat:ha_beat}``, ttl ``singleton_lock_beat_ttl`` = 2 s here) and sends; the other
stands by. The example then kills the leader with SIGKILL (no cleanup, as a crashed host) and
checks that:

* only one beat sent while both ran;
* the standby led within ``singleton_lock_beat_ttl`` of the kill, and sent from then on;
* no tick was sent twice for one due time (no two sends closer than half the interval).

Each send is recorded by a ``before_task_publish`` receiver in the beat process (its pid and
time), in the list ``ha_beat:sent`` on the broker's Redis.

Uses $REDIS_URL (broker) and $SINGLETON_LOCK_URL (locks; one URL or comma-separated masters)
when set; otherwise it starts private redis-server processes (a broker and three Redlock
masters) and stops them at the end. Exits non-zero if a check fails.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import redis
from celery import Celery, signals

BROKER = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
#: Seconds between two ticks.
INTERVAL_S = 1.0
#: The leader lock's ttl: a killed leader is replaced within this.
BEAT_TTL_S = 2.0
#: Where the beats record what they send, and that they started.
SENT, READY = "ha_beat:sent", "ha_beat:ready"
#: The beat leader lock (``csl:{beat:<app main name>}``).
LEADER_KEY = "csl:{beat:ha_beat}"

app = Celery("ha_beat")
app.conf.update(
    broker_url=BROKER,
    singleton_lock_url=os.environ.get("SINGLETON_LOCK_URL") or None,
    singleton_lock_beat_ttl=BEAT_TTL_S,
    broker_connection_retry_on_startup=True,
    task_default_queue="ha_beat",
    beat_schedule={"tick": {"task": "ha_beat.tick", "schedule": INTERVAL_S,
                            "options": {"expires": 60}}},
)


@app.task(name="ha_beat.tick")
def tick() -> None:
    """The scheduled job (this example runs no worker: the sends are what it checks)."""


_records: redis.Redis | None = None


def records() -> redis.Redis:
    global _records
    if _records is None:
        _records = redis.Redis.from_url(BROKER, decode_responses=True)
    return _records


@signals.before_task_publish.connect(weak=False)
def _record_send(sender: str | None = None, headers: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
    if sender == tick.name:
        records().rpush(SENT, json.dumps({"pid": os.getpid(), "at": time.time()}))


@signals.beat_init.connect(weak=False)
def _record_ready(**kwargs: Any) -> None:
    records().sadd(READY, os.getpid())


def sends() -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in records().lrange(SENT, 0, -1)]


def main() -> int:
    from harness import Checks, Children, eventually, holder_pid, redis_topology, wait_until

    checks = Checks()
    with tempfile.TemporaryDirectory(prefix="csl-ha-beat-") as tmp, \
            redis_topology(masters=3) as topology:
        workdir = Path(tmp)
        os.environ.update(topology.environ())
        import ha_beat  # this file again, configured from the environment just set

        r = ha_beat.records()
        r.delete(SENT, READY)
        print(f"servers: {topology.describe()}\n")
        children = Children(workdir, topology.environ())

        def beat(name: str) -> Any:
            return children.start(
                name, "-A", "ha_beat", "beat", "-S", "celery_singleton_lock.beat:LockedScheduler",
                "-s", str(workdir / f"{name}-schedule"), "--loglevel", "INFO")

        def sent_by(pid: int) -> int:
            return sum(1 for s in ha_beat.sends() if s["pid"] == pid)

        try:
            first = beat("beat-1")
            wait_until(lambda: holder_pid(topology.lock_urls, LEADER_KEY) == first.pid, 30,
                       "beat-1 to lead")
            second = beat("beat-2")
            wait_until(lambda: r.sismember(READY, second.pid), 30, "beat-2 to start")
            print(f"beat-1 (pid {first.pid}) leads; beat-2 (pid {second.pid}) stands by")
            start = sent_by(first.pid)
            wait_until(lambda: sent_by(first.pid) >= start + 3, 15, "3 ticks from beat-1")
            both = sent_by(second.pid)
            checks.check(both == 0 and second.alive(), "only the leader sends while both run",
                         f"{sent_by(first.pid)} ticks from beat-1, {both} from beat-2")

            first.kill()
            print(f"beat-1 killed (SIGKILL); leader lock ttl {BEAT_TTL_S} s")
            took = eventually(lambda: holder_pid(topology.lock_urls, LEADER_KEY) == second.pid,
                              BEAT_TTL_S + 10)
            checks.check(took is not None and took <= BEAT_TTL_S + 0.5,
                         "beat-2 leads within singleton_lock_beat_ttl of the kill",
                         f"after {took:.2f} s (ttl {BEAT_TTL_S} s; the check allows 0.5 s more"
                         " for a busy machine)" if took is not None else "never")
            wait_until(lambda: sent_by(second.pid) >= 2, 15, "2 ticks from beat-2")
            second.stop()

            times = sorted(s["at"] for s in ha_beat.sends())
            gaps = [round(b - a, 2) for a, b in pairwise(times)]
            twice = [g for g in gaps if g < INTERVAL_S / 2]
            checks.check(sent_by(second.pid) >= 2, "beat-2 sends from then on",
                         f"{sent_by(second.pid)} ticks")
            checks.check(not twice, "no tick sent twice for one due time",
                         f"{len(times)} sends, gaps {gaps}")
        except Exception:
            print(children.logs())
            raise
        finally:
            children.stop_all()
            if not topology.private:  # leave nothing behind in a Redis that is not ours
                r.delete(SENT, READY)
                ha_beat.app.control.purge()
    return checks.exit_code


if __name__ == "__main__":
    from harness import run

    run(main)
