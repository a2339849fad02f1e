"""One chaos run: ``python -m chaos [--duration S] [--seed N] [--store redlock|single|cluster]``.

What it starts (and stops at the end, also on Ctrl-C or an error): the lock store's
``redis-server`` processes (three Redlock masters by default), a TCP proxy in front of them, a
``redis-server`` for the broker, and three ``celery worker`` processes with two prefork children
each. For ``--duration`` seconds it sends tasks of every duplicate policy over a few hundred keys
and injects faults (:mod:`chaos.faults`) drawn from the seed it prints. Then it heals everything,
waits for the queue to drain, waits for leftover locks to expire, and checks what the bodies
recorded (:mod:`chaos.checker`). The exit code is 1 if the contract was broken, 2 if the run
itself failed.

A seed replays the same task mix and the same fault schedule; the interleaving with the
workers differs from run to run, as timing does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import redis

from chaos.checker import Fault, Sent, check
from chaos.faults import FaultEngine, available_kinds
from chaos.proxy import ProxyProcess
from chaos.records import RECORDS_ENV, RecordReader
from chaos.stores import KINDS as STORE_KINDS
from chaos.stores import LockStore, open_store
from tests.servers import RedisServer, _die_with_parent, wait_until
from tests.workers import CeleryWorker

__all__ = ["main", "run"]

#: Task name per policy (see :mod:`chaos.app`).
TASKS = {"reject": "chaos.reject", "requeue": "chaos.requeue", "wait": "chaos.wait"}
#: Share of the tasks sent with each policy.
POLICY_WEIGHTS = {"reject": 0.4, "requeue": 0.35, "wait": 0.25}
#: Broker keys of unacknowledged messages (named here, so the run may read them).
UNACKED_KEY = "chaos.unacked"
UNACKED_INDEX_KEY = "chaos.unacked_index"
#: Redis transport visibility timeout: a killed worker's unacknowledged messages are
#: delivered again after this long. It must exceed the longest time a live worker keeps a
#: message unacknowledged (a pause, a long body and a countdown).
VISIBILITY_TIMEOUT_S = 30
#: Seconds between two samples of where the locks are.
SAMPLE_INTERVAL_S = 0.25


def _log(message: str) -> None:
    sys.stderr.write(f"[chaos {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m chaos",
        description="A bounded chaos run: real workers, faults from a seed, an external checker."
                    " Exit code 1 on a violation of the contract, 2 if the run failed.")
    parser.add_argument("--duration", type=float, default=120.0,
                        help="seconds of tasks and faults (default 120)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run's seed")
    parser.add_argument("--store", choices=STORE_KINDS, default="redlock",
                        help="lock store: redlock over 3 masters (default), single, cluster")
    parser.add_argument("--lock-ttl", type=float, default=3.0, help="lock_ttl (default 3 s)")
    parser.add_argument("--keys", type=int, default=300,
                        help="distinct lock keys, split over the three policies (default 300)")
    parser.add_argument("--rate", type=float, default=15.0,
                        help="tasks sent per second while the queue is short (default 15)")
    parser.add_argument("--backlog", type=int, default=40,
                        help="pause sending while more messages than this wait (default 40)")
    parser.add_argument("--faults", default="all",
                        help="comma-separated fault kinds, 'all' or 'none' (default all)")
    parser.add_argument("--workers", type=int, default=3, help="celery workers (default 3)")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="prefork children per worker (default 2)")
    parser.add_argument("--json", action="store_true",
                        help="print the report as JSON on stdout (the text goes to stderr)")
    parser.add_argument("--out", default=None,
                        help="keep records, worker logs and the report in this directory")
    parser.add_argument("--recheck", metavar="DIR", default=None,
                        help="start nothing: check again a run kept with --out DIR")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.lock_ttl <= 0 or args.keys < 3 or args.rate <= 0:
        parser.error("--duration, --lock-ttl and --rate must be > 0, --keys at least 3")
    kinds = available_kinds(args.store)
    if args.faults == "all":
        args.fault_kinds = kinds
    elif args.faults == "none":
        args.fault_kinds = []
    else:
        args.fault_kinds = [k.strip() for k in args.faults.split(",") if k.strip()]
        unusable = sorted(set(args.fault_kinds) - set(kinds))
        if unusable:
            parser.error(f"--faults: {', '.join(unusable)} not available with --store "
                         f"{args.store} (choose from {', '.join(kinds)})")
    return args


class Monitor(threading.Thread):
    """Samples, every :data:`SAMPLE_INTERVAL_S`, which lock keys a quorum of masters holds
    (read directly, not through the proxy), keeping only the changes."""

    def __init__(self, store: LockStore, keys: list[str]) -> None:
        super().__init__(name="chaos-monitor", daemon=True)
        self.store = store
        self.keys = keys
        #: key -> [(time, held)] at each change of state (held None: the masters could not tell).
        self.transitions: dict[str, list[tuple[float, bool | None]]] = defaultdict(list)
        self.samples = 0
        self._halt = threading.Event()
        self._last: dict[str, bool | None] = {}

    def run(self) -> None:
        while not self._halt.wait(SAMPLE_INTERVAL_S):
            states = self.store.presence(self.keys)
            seen = time.time()  # after the sample: a key seen free was free by then
            self.samples += 1
            for key, state in states.items():
                if state != self._last.get(key, False):
                    self.transitions[key].append((seen, state))
                    self._last[key] = state

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


class Body:
    """Draws one task's body: mostly short sleeps, some longer than lock_ttl, a few holding
    the GIL in one long C call."""

    def __init__(self, rng: random.Random, ttl_s: float) -> None:
        self.rng = rng
        self.ttl_s = ttl_s

    def draw(self) -> tuple[str, float]:
        roll = self.rng.random()
        if roll < 0.60:
            return "sleep", round(self.rng.uniform(0.005, 0.2), 4)
        if roll < 0.82:
            return "sleep", round(self.rng.uniform(0.2, self.ttl_s / 2), 3)
        if roll < 0.97:
            return "sleep", round(self.rng.uniform(1.1, 2.2) * self.ttl_s, 3)
        # pow(7, n): about 1.5 s for n = 3.5e6 and 4 s for 5.5e6 on one free core here.
        return "gil", float(self.rng.randrange(3_500_000, 5_500_000))


class ChaosRun:
    """Everything one run owns; :meth:`execute` returns the report."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
        self.rng = random.Random(self.seed)
        self.ttl_s = float(args.lock_ttl)
        self.sent: list[Sent] = []
        self.running: dict[str, dict[str, Any]] = {}  # run id -> start record, not yet ended
        self.finished_tids: set[str] = set()
        self.records: list[dict[str, Any]] = []

    # -- records ---------------------------------------------------------------------------

    def _poll_records(self, reader: RecordReader) -> None:
        for rec in reader.read_new():
            self.records.append(rec)
            if rec.get("ev") == "start":
                self.running[rec["run"]] = rec
            elif rec.get("ev") == "end":
                self.running.pop(rec["run"], None)
                self.finished_tids.add(rec["tid"])

    def _key_index(self, n: int) -> int:
        """A third of the tasks go to a policy's four hottest keys (so duplicates meet);
        the rest spread over all its keys, skewed towards the low numbers."""
        if self.rng.random() < 1 / 3:
            return self.rng.randrange(min(4, n))
        return int(n * self.rng.random() ** 2)

    def _busy_pids(self) -> set[int]:
        return {int(rec["pid"]) for rec in self.running.values()}

    def _forget_killed(self, faults: list[Fault]) -> None:
        """Runs whose process was killed will never end: stop waiting for them."""
        killed = {(pid, f.start) for f in faults for pid in f.pids}
        for run_id, rec in list(self.running.items()):
            if any(pid == rec["pid"] and t >= rec["t"] for pid, t in killed):
                del self.running[run_id]

    # -- the run ---------------------------------------------------------------------------

    def conf(self) -> dict[str, Any]:
        """Settings for the workers' app (and the app the run sends with)."""
        return {
            "singleton_lock_ttl": self.ttl_s,
            "singleton_lock_requeue_delay": 0.25,
            "singleton_lock_requeue_max": 1_000_000,
            "singleton_lock_wait_timeout": 2 * self.ttl_s,
            "worker_prefetch_multiplier": 1,
            "task_ignore_result": True,
            "broker_transport_options": {
                "visibility_timeout": VISIBILITY_TIMEOUT_S,
                "unacked_restore_interval": 1,
                "unacked_restore_throttle": 1,
                "unacked_key": UNACKED_KEY,
                "unacked_index_key": UNACKED_INDEX_KEY,
            },
        }

    def execute(self, stack: contextlib.ExitStack) -> dict[str, Any]:
        args = self.args
        _log(f"seed {self.seed} (replay with --seed {self.seed}); store {args.store}, "
             f"{args.workers} workers x {args.concurrency}, lock_ttl {self.ttl_s} s, "
             f"{args.duration:.0f} s")
        workdir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="csl-chaos-"))
        workdir.mkdir(parents=True, exist_ok=True)
        if not args.out:
            stack.callback(shutil.rmtree, workdir, True)
        records_dir = workdir / "records"
        if records_dir.exists() and any(records_dir.iterdir()):
            raise ValueError(f"{workdir} holds the records of another run: give a new --out")
        records_dir.mkdir(exist_ok=True)
        reader = RecordReader(records_dir)

        proxy = None
        if args.store != "cluster":
            proxy = ProxyProcess(preexec_fn=_die_with_parent)
            stack.callback(proxy.close)
        store: LockStore = stack.enter_context(open_store(args.store, proxy))
        broker_server = stack.enter_context(RedisServer())
        base = broker_server.url.rsplit("/", 1)[0]
        broker_url, backend_url = f"{base}/0", f"{base}/1"
        broker = redis.Redis.from_url(broker_url, decode_responses=True)
        stack.callback(broker.close)

        from chaos import app as chaos_app
        from tests.apps.common import configure

        conf = self.conf()
        app = configure(chaos_app.app, broker_url, backend_url, store.url, **conf)
        key_names = {policy: [f"{policy}-{i:03d}" for i in range(args.keys // 3)]
                     for policy in TASKS}
        lock_keys = {(policy, name): app.tasks[TASKS[policy]].lock_key_for(name, "sleep", 0.0)
                     for policy, names in key_names.items() for name in names}

        host = socket.gethostname()
        env = {"CSL_TEST_CONF": json.dumps(conf), RECORDS_ENV: str(records_dir)}
        workers = [
            CeleryWorker("chaos.app", broker_url, backend_url, store.url, pool="prefork",
                         concurrency=args.concurrency, hostname=f"chaos{i}@{host}", env=env,
                         loglevel="WARNING")
            for i in range(args.workers)
        ]
        for worker in workers:
            stack.callback(worker.close)
            if args.out:  # keep the worker logs beside the records
                stack.callback(_copy_log, worker, workdir)
        started = time.monotonic()
        for worker in workers:
            worker.start()
        _log(f"{len(workers)} workers ready in {time.monotonic() - started:.1f} s")

        monitor = Monitor(store, sorted(lock_keys.values()))
        monitor.start()
        stack.callback(monitor.stop)

        engine = FaultEngine(self.rng, self.ttl_s, workers, store, proxy, args.fault_kinds,
                             busy_pids=self._busy_pids, log=_log)
        stack.callback(engine.finish)

        body = Body(self.rng, self.ttl_s)
        policies = list(POLICY_WEIGHTS)
        weights = [POLICY_WEIGHTS[p] for p in policies]
        chaos_started = time.monotonic()
        deadline = chaos_started + args.duration
        credit = 0.0
        last_tick = last_poll = last_progress = chaos_started
        with app.producer_or_acquire() as producer:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    break
                credit = min(credit + (now - last_tick) * args.rate, args.rate)
                last_tick = now
                if credit >= 1 and broker.llen("celery") <= args.backlog:
                    while credit >= 1:
                        credit -= 1
                        policy = self.rng.choices(policies, weights)[0]
                        names = key_names[policy]
                        name = names[self._key_index(len(names))]
                        shape, size = body.draw()
                        tid = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
                        app.send_task(TASKS[policy], args=[name, shape, size], task_id=tid,
                                      ignore_result=True, producer=producer)
                        self.sent.append(Sent(tid=tid, task=TASKS[policy], policy=policy,
                                              key=lock_keys[(policy, name)], t=time.time()))
                elif credit >= 1:
                    credit = 0.0  # the queue is long: do not send a burst later
                engine.tick()
                if now - last_poll >= 0.5:
                    self._poll_records(reader)
                    last_poll = now
                if now - last_progress >= 15:
                    last_progress = now
                    _log(f"{now - chaos_started:.0f} s: {len(self.sent)} sent, "
                         f"{len(self.finished_tids)} tasks finished, {len(engine.faults)} faults,"
                         f" queue {broker.llen('celery')}")
                time.sleep(0.02)

        _log(f"faults over after {len(engine.faults)}; healing and draining")
        engine.finish()
        self._heal(workers, store, proxy)
        drained = self._drain(reader, broker, engine.faults)
        leftovers = self._grace(store, lock_keys.values(), app)
        monitor.stop()
        watched_until = time.time()
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.stop()
        self._poll_records(reader)

        meta = {
            "seed": self.seed, "store": args.store, "duration_s": args.duration,
            "lock_ttl_s": self.ttl_s, "workers": args.workers, "concurrency": args.concurrency,
            "keys": len(lock_keys), "drained": drained, "samples": monitor.samples,
        }
        observed = {"presence": monitor.transitions, "locks_left": leftovers,
                    "watched_until": watched_until}
        if args.out:  # everything --recheck needs to check the run again
            (workdir / "sent.jsonl").write_text(
                "".join(json.dumps(asdict(s)) + "\n" for s in self.sent))
            (workdir / "faults.json").write_text(
                json.dumps([asdict(f) for f in engine.faults], indent=1))
            (workdir / "observed.json").write_text(json.dumps({"meta": meta, **observed}))
        report = assemble(meta, self.records, self.sent, engine.faults, observed)
        if args.out:
            (workdir / "report.json").write_text(json.dumps(report, indent=1))
        return report

    def _heal(self, workers: list[CeleryWorker], store: LockStore,
              proxy: ProxyProcess | None) -> None:
        if proxy is not None:
            for index in range(len(store.servers)):
                proxy.heal(f"m{index}")
        store.heal()
        for worker in workers:
            worker.resume()
            if not worker.is_running():
                worker.start()

    def _drain(self, reader: RecordReader, broker: redis.Redis, faults: list[Fault]) -> bool:
        """Wait until nothing is queued or unacknowledged, every requeue task has run to its
        end, and no body runs; bounded by a killed worker's redelivery delay and a margin."""
        requeue = {s.tid for s in self.sent if s.policy == "requeue"}
        bound_s = VISIBILITY_TIMEOUT_S + 30 + 4 * self.ttl_s
        calm: list[bool] = []

        def drained() -> bool:
            self._poll_records(reader)
            self._forget_killed(faults)
            waiting = broker.llen("celery") + broker.hlen(UNACKED_KEY)
            calm.append(not self.running and waiting == 0 and requeue <= self.finished_tids)
            return calm[-2:] == [True, True]  # idle at two polls in a row

        started = time.monotonic()
        try:
            wait_until(drained, bound_s, interval_s=0.5, message="the queue to drain")
        except TimeoutError:
            missing = len(requeue - self.finished_tids)
            _log(f"not drained after {bound_s:.0f} s: {len(self.running)} bodies running, "
                 f"{missing} requeue tasks never finished")
            return False
        _log(f"drained in {time.monotonic() - started:.1f} s")
        return True

    def _grace(self, store: LockStore, lock_keys: Any, app: Any) -> dict[str, int]:
        """Poll until no lock key is left on any master, or lock_ttl (plus a margin) passed."""
        keys = list(lock_keys)
        prefix = app.conf.get("singleton_lock_key_prefix") or "csl"
        match = f"{prefix}:chaos.*"
        left: dict[str, int] = {}

        def clear() -> bool:
            left.clear()
            left.update(store.leftovers(keys, match))
            return not left

        with contextlib.suppress(TimeoutError):
            wait_until(clear, self.ttl_s + 1.0, interval_s=0.25, message="locks to expire")
        if left:
            _log(f"{len(left)} locks still held {self.ttl_s + 1.0:.1f} s after the run")
        return dict(left)


def assemble(meta: dict[str, Any], records: list[dict[str, Any]], sent: list[Sent],
             faults: list[Fault], observed: dict[str, Any]) -> dict[str, Any]:
    """The report: the run's figures, then the checker's findings, then the fault log."""
    presence = {key: [(float(t), None if held is None else bool(held)) for t, held in changes]
                for key, changes in observed["presence"].items()}
    findings = check(records=records, sent=sent, faults=faults, ttl_s=meta["lock_ttl_s"],
                     presence=presence, locks_left=observed["locks_left"],
                     watched_until=observed["watched_until"])
    return {**meta, **findings, "fault_log": [asdict(f) for f in faults]}


def recheck(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a run kept with ``--out`` again, from its files alone (no process is started)."""
    workdir = Path(directory)
    observed = json.loads((workdir / "observed.json").read_text())
    sent = [Sent(**json.loads(line))
            for line in (workdir / "sent.jsonl").read_text().splitlines() if line]
    faults = [Fault(**f) for f in json.loads((workdir / "faults.json").read_text())]
    records = RecordReader(workdir / "records").read_new()
    return assemble(observed.pop("meta"), records, sent, faults, observed)


def _copy_log(worker: CeleryWorker, workdir: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.copy(worker.log_path, workdir / f"{worker.hostname.split('@')[0]}.log")


def format_report(report: dict[str, Any]) -> str:
    """The report as text: seed, tasks, faults, every check and its figures."""
    v = report["violations"]
    ov, fe, rq, out = report["overlaps"], report["fencing"], report["requeue"], report["outlive"]
    lines = [
        f"seed {report['seed']}  store {report['store']}  {report['duration_s']:.0f} s  "
        f"lock_ttl {report['lock_ttl_s']} s  {report['keys']} keys  "
        f"{report['workers']} workers x {report['concurrency']}",
        f"tasks sent {report['tasks_sent']}, bodies run {report['runs']}"
        + ("" if report["drained"] else "  (the queue did not drain)"),
    ]
    for policy, counts in report["tasks"].items():
        lines.append(f"  {policy:8} " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    lines.append("duplicates: " + (", ".join(f"{k} {n}" for k, n in report["duplicates"].items())
                                   or "none") + f"; lock_lost reports {report['lost_reports']}")
    lines.append("faults: " + (", ".join(f"{k} {n}" for k, n in report["faults"].items())
                               or "none") + f" ({sum(report['faults'].values())} in all)")
    lines += [
        f"overlapping bodies: {ov['allowed']} allowed (holder's lock lost and reported), "
        f"{ov['violations']} not allowed",
        f"  allowed during: {_counts(ov['allowed_during'])}; "
        f"not allowed during: {_counts(ov.get('violations_during', {}))}",
        f"fencing tokens: {fe['pairs_checked']} successive pairs, {fe['allowed']} lower after a "
        f"reported loss, {fe['violations']} did not grow",
        f"requeue + acks_late: {rq['sent']} sent, {rq['ran_once']} ran to the end once "
        f"({rq['cut_short_by_kill']} runs cut short by SIGKILL and delivered again, "
        f"{rq['redelivered_after_kill']} repeated after a kill before the ack), "
        f"{rq['lost']} lost, {rq['ran_twice']} ran twice",
        f"bodies never finished: {len(report['unfinished'])}; "
        f"bodies without a lock: {len(report['unlocked_runs'])}",
        f"locks still held after the run: {len(report['locks_left'])}",
        f"longest a lock outlived its holder: {out['max_s']:.2f} s ({out['measured']} "
        f"measured, {out.get('unobserved', 0)} unobserved; bound {out['bound_s']} s, "
        f"{out['violations']} over)",
    ]
    lines += _violation_lines(report)
    if report["ok"]:
        lines.append("OK: no violation")
    else:
        broken = ", ".join(f"{k} {n}" for k, n in v.items() if n)
        lines.append(f"VIOLATIONS: {report['violation_count']} ({broken})")
    return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in counts.items()) or "-"


def _clock(t: float) -> str:
    """``HH:MM:SS.mmm`` UTC of a unix time."""
    return time.strftime("%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}"


def _body_line(run: dict[str, Any]) -> str:
    end = _clock(run["end"]) if "end" in run else f"killed {_clock(run.get('killed_at', 0))}"
    return (f"{run['tid']} on {run['host']} pid {run['pid']} fence {run['fence']} "
            f"{_clock(run['start'])}-{end} UTC ({run['shape']} {run['size']})")


def _violation_lines(report: dict[str, Any], limit: int = 5) -> list[str]:
    """A few lines per kind of violation; the JSON report has them all."""
    lines: list[str] = []
    for d in report["overlaps"]["violation_details"][:limit]:
        lines += [f"  overlap {d['overlap_s']} s on {d['key']} during "
                  f"{', '.join(d['faults']) or 'no fault'}:",
                  f"    first  {_body_line(d['first'])}", f"    second {_body_line(d['second'])}"]
        paused = d.get("first_paused")
        if paused and "body_ended_after_resume_s" in paused:
            lines.append(f"    the first holder's worker was stopped {paused['seconds']} s from "
                         f"{_clock(paused['from'])}; its body ended "
                         f"{paused['body_ended_after_resume_s']} s after SIGCONT, no lock_lost")
    for d in report["fencing"]["violation_details"][:limit]:
        lines += [f"  fencing token did not grow on {d['key']}:",
                  f"    {_body_line(d['previous'])}", f"    {_body_line(d['next'])}"]
    for name in ("lost_details", "ran_twice_details"):
        for d in report["requeue"][name][:limit]:
            lines.append(f"  requeue task {d['tid']} {name.split('_details')[0]}: "
                         f"{len(d['runs'])} runs")
    for run in report["unfinished"][:limit]:
        lines.append(f"  never finished: {_body_line(run)}")
    for key, masters in list(report["locks_left"].items())[:limit]:
        lines.append(f"  still held on {masters} master(s): {key}")
    for d in report["outlive"]["violation_details"][:limit]:
        lines.append(f"  outlived its holder by {d['outlived_s']} s: {_body_line(d['run'])}")
    return lines


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Execute one run; every process it started is stopped before this returns."""
    chaos = ChaosRun(args)
    with contextlib.ExitStack() as stack:
        return chaos.execute(stack)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = recheck(args.recheck) if args.recheck else run(args)
    except KeyboardInterrupt:
        _log("interrupted; everything it started is stopped")
        return 130
    except Exception as exc:
        _log(f"the run failed: {type(exc).__name__}: {exc}")
        return 2
    text = format_report(report)
    if args.json:
        sys.stderr.write(text + "\n")
        sys.stdout.write(json.dumps(report, indent=1) + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0 if report["ok"] else 1

