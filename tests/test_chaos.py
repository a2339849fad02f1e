"""The chaos run (``python -m chaos``): its checker, its proxy, and a short run with a fixed seed.

The checker tests feed hand-made records, so a checker that never reports anything fails them.
The slow tests run the real thing: servers, proxy, three prefork workers, faults.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from chaos.checker import Fault, Sent, check
from chaos.proxy import ProxyProcess
from chaos.records import Recorder, RecordReader
from chaos.run import recheck
from tests.servers import RedisServer, no_retry, wait_until
from tests.workers import REPO_ROOT, CeleryWorker

KEY = "csl:chaos.reject:{abc}"
TTL_S = 3.0


def start(run: str, t: float, fence: int, *, tid: str | None = None, key: str = KEY,
          pid: int = 100, policy: str = "reject") -> dict[str, Any]:
    return {"ev": "start", "run": run, "tid": tid or f"task-{run}", "task": f"chaos.{policy}",
            "policy": policy, "key": key, "fence": fence, "t": t, "pid": pid, "host": "w@h"}


def end(run: str, t: float, *, tid: str | None = None, pid: int = 100) -> dict[str, Any]:
    return {"ev": "end", "run": run, "tid": tid or f"task-{run}", "t": t, "pid": pid}


def lost(tid: str, t: float, key: str = KEY) -> dict[str, Any]:
    return {"ev": "lost", "key": key, "tid": tid, "reason": "gone", "t": t, "pid": 1}


def run_check(records: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("sent", [])
    kwargs.setdefault("faults", [])
    return check(records=records, ttl_s=TTL_S, **kwargs)


# -- the checker ----------------------------------------------------------------------------


def test_checker_reports_an_unreported_overlap_as_a_violation() -> None:
    report = run_check([start("a", 10.0, 1), start("b", 11.0, 2, pid=200),
                        end("b", 12.0, pid=200), end("a", 13.0)])
    assert report["overlaps"]["violations"] == 1
    detail = report["overlaps"]["violation_details"][0]
    assert (detail["first"]["run"], detail["second"]["run"]) == ("a", "b")
    assert detail["overlap_s"] == pytest.approx(1.0)
    assert report["ok"] is False and report["violation_count"] == 1


def test_checker_allows_an_overlap_whose_first_holder_reported_its_lock_lost() -> None:
    records = [start("a", 10.0, 1), start("b", 11.0, 2, pid=200), end("b", 12.0, pid=200),
               end("a", 13.0), lost("task-a", 12.5)]
    report = run_check(records)
    assert report["overlaps"]["allowed"] == 1
    assert report["overlaps"]["violations"] == 0
    assert report["ok"] is True


def test_checker_does_not_let_the_second_holders_loss_excuse_an_overlap() -> None:
    records = [start("a", 10.0, 1), start("b", 11.0, 2, pid=200), end("b", 12.0, pid=200),
               end("a", 13.0), lost("task-b", 11.5)]
    assert run_check(records)["overlaps"]["violations"] == 1


def test_checker_sees_back_to_back_bodies_as_no_overlap() -> None:
    report = run_check([start("a", 10.0, 1), end("a", 11.0), start("b", 11.0, 2), end("b", 12.0)])
    assert report["overlaps"] == {**report["overlaps"], "allowed": 0, "violations": 0}
    assert report["fencing"]["pairs_checked"] == 1 and report["ok"] is True


def test_checker_orders_an_overlap_by_fencing_token() -> None:
    # b acquired first (token 1) but was stopped before its body started; a then took the lock.
    records = [start("a", 10.0, 2), start("b", 10.5, 1, pid=200), end("a", 11.0),
               end("b", 12.0, pid=200), lost("task-b", 10.6)]
    report = run_check(records)
    assert report["overlaps"]["allowed"] == 1
    assert report["fencing"]["allowed"] == 1 and report["ok"] is True


def test_checker_flags_fencing_tokens_that_do_not_grow() -> None:
    equal = run_check([start("a", 10.0, 5), end("a", 11.0), start("b", 12.0, 5), end("b", 13.0)])
    assert equal["fencing"]["violations"] == 1 and equal["ok"] is False
    lower = run_check([start("a", 10.0, 5), end("a", 11.0), start("b", 12.0, 3), end("b", 13.0)])
    assert lower["fencing"]["violations"] == 1
    excused = run_check([start("a", 10.0, 5), end("a", 11.0), start("b", 12.0, 3),
                         end("b", 13.0), lost("task-b", 12.5)])
    assert excused["fencing"] == {**excused["fencing"], "violations": 0, "allowed": 1}


def test_checker_counts_requeue_tasks_lost_or_run_twice() -> None:
    sent = [Sent(tid=t, task="chaos.requeue", policy="requeue", key=KEY, t=1.0)
            for t in ("never", "twice", "killed", "acked-late")]
    records = [
        start("t1", 10.0, 1, tid="twice", policy="requeue"), end("t1", 11.0, tid="twice"),
        start("t2", 12.0, 2, tid="twice", policy="requeue"), end("t2", 13.0, tid="twice"),
        # cut short by a kill of pid 300, then delivered again: fine
        start("k1", 14.0, 3, tid="killed", policy="requeue", pid=300),
        start("k2", 16.0, 4, tid="killed", policy="requeue"), end("k2", 17.0, tid="killed"),
        # finished, then its process was killed before the ack: delivered again, fine
        start("a1", 18.0, 5, tid="acked-late", policy="requeue", pid=400),
        end("a1", 19.0, tid="acked-late", pid=400),
        start("a2", 21.0, 6, tid="acked-late", policy="requeue"),
        end("a2", 22.0, tid="acked-late"),
    ]
    faults = [Fault("kill_child", "w", 15.0, 15.0, pids=[300]),
              Fault("kill_worker", "w", 19.5, 20.0, pids=[400])]
    report = run_check(records, sent=sent, faults=faults)
    requeue = report["requeue"]
    assert (requeue["lost"], requeue["ran_twice"]) == (1, 1)
    assert requeue["lost_details"][0]["tid"] == "never"
    assert requeue["ran_twice_details"][0]["tid"] == "twice"
    assert requeue["cut_short_by_kill"] == 1 and requeue["redelivered_after_kill"] == 1
    assert requeue["ran_once"] == 2
    assert report["unfinished"] == [] and report["violations"]["requeue_lost"] == 1


def test_checker_reports_bodies_that_never_ended_unless_killed() -> None:
    report = run_check([start("a", 10.0, 1, pid=300), start("b", 20.0, 2, pid=301)],
                       faults=[Fault("kill_child", "w", 15.0, 15.0, pids=[300])])
    assert [r["run"] for r in report["unfinished"]] == ["b"]
    assert report["violations"]["unfinished"] == 1


def test_checker_reports_locks_left_and_locks_outliving_their_holder() -> None:
    records = [start("a", 10.0, 1), end("a", 11.0)]
    left = run_check(records, locks_left={KEY: 2})
    assert left["violations"]["locks_left"] == 1 and left["ok"] is False
    # Held from 10.1 s and seen free at 20 s: 9 s after its body ended, past ttl + tolerance.
    stuck = run_check(records, presence={KEY: [(10.1, True), (20.0, False)]})
    assert stuck["outlive"]["max_s"] == pytest.approx(9.0)
    assert stuck["outlive"]["violations"] == 1 and stuck["ok"] is False
    prompt = run_check(records, presence={KEY: [(10.1, True), (11.2, False)]})
    assert prompt["outlive"]["max_s"] == pytest.approx(0.2)
    assert prompt["ok"] is True
    # The next holder starting at 11.5 s accounts for the key being held after that.
    taken = run_check([*records, start("b", 11.5, 2), end("b", 19.0)],
                      presence={KEY: [(10.1, True), (19.2, False)]})
    assert taken["outlive"]["max_s"] == pytest.approx(0.5)


def test_checker_gives_no_outlive_figure_while_the_masters_cannot_tell() -> None:
    records = [start("a", 10.0, 1), end("a", 11.0)]
    # The only master was paused from 11.1 s to 19 s: no one could see the lock go.
    report = run_check(records, presence={KEY: [(10.1, True), (11.1, None), (19.0, False)]})
    assert report["outlive"]["unobserved"] == 1 and report["outlive"]["measured"] == 0
    assert report["ok"] is True


def test_checker_does_not_blame_a_holder_for_a_lock_another_body_still_holds() -> None:
    # a overlapped b (reported); when a ended at 11 s, the key seen until 19 s was b's.
    records = [start("b", 9.0, 1, pid=200), start("a", 10.0, 2), end("a", 11.0),
               end("b", 19.0, pid=200), lost("task-b", 9.5)]
    report = run_check(records, presence={KEY: [(9.1, True), (19.2, False)]})
    assert report["outlive"]["violations"] == 0 and report["ok"] is True
    assert report["outlive"]["max_s"] == pytest.approx(0.2)


# -- records and proxy ----------------------------------------------------------------------


def test_records_are_read_incrementally_and_a_cut_line_is_skipped(tmp_path: Path) -> None:
    Recorder(tmp_path).write("start", run="a")
    reader = RecordReader(tmp_path)
    assert [r["run"] for r in reader.read_new()] == ["a"]
    with open(tmp_path / "999.jsonl", "ab") as fh:
        fh.write(b'{"ev": "end", "ru')  # a process killed mid-write
    Recorder(tmp_path).write("end", run="a")
    assert [r["ev"] for r in reader.read_new()] == ["end"]
    assert reader.read_new() == []


def test_proxy_delays_partitions_and_heals_one_link() -> None:
    with RedisServer() as server:
        proxy = ProxyProcess()
        try:
            assert server.port is not None
            port = proxy.listen("m0", server.port)
            client = redis.Redis(port=port, socket_timeout=1.0, retry=no_retry())
            client.set("k", "v")
            proxy.delay("m0", 0.2)
            began = time.monotonic()
            assert client.get("k") == b"v"
            assert time.monotonic() - began >= 0.4  # 0.2 s each way
            proxy.partition("m0")
            with pytest.raises(redis.TimeoutError):
                client.get("k")
            proxy.heal("m0")
            fresh = redis.Redis(port=port, socket_timeout=1.0, retry=no_retry())
            began = time.monotonic()
            assert fresh.get("k") == b"v"
            assert time.monotonic() - began < 0.2
            client.close()
            fresh.close()
        finally:
            proxy.close()


# -- the run itself -------------------------------------------------------------------------


def _run_processes(records_dir: Path) -> list[psutil.Process]:
    """Live processes started for the run whose records go to ``records_dir``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("CHAOS_RECORDS_DIR") == str(records_dir):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _chaos(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-m", "chaos", *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_short_chaos_run_with_a_fixed_seed_completes_its_checks(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _chaos("--duration", "60", "--seed", "20261201", "--json", "--out", str(out))
    stdout, stderr = proc.communicate(timeout=360)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stderr[-6000:]}"
    report = json.loads(stdout)
    assert report["seed"] == 20261201 and report["store"] == "redlock"
    assert report["ok"] is True and report["violation_count"] == 0, report["violations"]
    assert report["drained"] is True
    assert report["tasks_sent"] >= 100 and report["runs"] >= 100
    assert set(report["tasks"]) == {"reject", "requeue", "wait"}
    requeue = report["requeue"]
    assert requeue["sent"] > 0 and requeue["ran_once"] == requeue["sent"]
    assert len(report["faults"]) >= 5, report["faults"]
    assert report["samples"] > 100 and report["outlive"]["measured"] > 0
    assert report["locks_left"] == {}
    assert json.loads((out / "report.json").read_text())["seed"] == 20261201
    again = recheck(out)  # the kept files alone give the same findings
    assert again["violations"] == report["violations"] and again["runs"] == report["runs"]
    assert "seed 20261201" in stderr
    assert _run_processes(out / "records") == []


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_interrupted_chaos_run_stops_everything_it_started(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _chaos("--duration", "600", "--seed", "7", "--out", str(out))
    try:
        # Workers report ready once their app is loaded: then every kind of process is up.
        wait_until(lambda: len(_run_processes(out / "records")) >= 9, 60, interval_s=0.2,
                   message="the run's workers")
        started = psutil.Process(proc.pid).children(recursive=True)
        names = sorted(" ".join(p.cmdline()[:4]) for p in started)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130
    # redis-server x 4 (three masters, the broker), the proxy, 3 workers x (main + 2 children)
    assert len(started) >= 14, names
    assert [p for p in started if _alive(p)] == []
    assert _run_processes(out / "records") == []


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- what the chaos run found ---------------------------------------------------------------


class Scenario:
    """Two one-child workers of the chaos app on their own queues, a sender, and the records."""

    def __init__(self, tmp_path: Path, lock_url: str | list[str], broker: RedisServer,
                 ttl_s: float) -> None:
        from celery import Celery

        records_dir = tmp_path / "records"
        records_dir.mkdir()
        self.reader = RecordReader(records_dir)
        self.seen: list[dict[str, Any]] = []
        self.ttl_s = ttl_s
        base = broker.url.rsplit("/", 1)[0]
        conf = {"singleton_lock_ttl": ttl_s, "task_ignore_result": True,
                "worker_prefetch_multiplier": 1}
        env = {"CSL_TEST_CONF": json.dumps(conf), "CHAOS_RECORDS_DIR": str(records_dir)}
        self.holder, self.other = (
            CeleryWorker("chaos.app", f"{base}/0", f"{base}/1", lock_url, concurrency=1,
                         queues=[queue], env=env)
            for queue in ("first", "second"))
        self.sender = Celery("sender", broker=f"{base}/0")

    def __enter__(self) -> Scenario:
        self.holder.start()
        self.other.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sender.close()
        self.holder.close()
        self.other.close()

    def send(self, queue: str, size: float) -> str:
        """A ``chaos.reject`` task on key ``k`` sleeping ``size`` seconds; its id."""
        return str(self.sender.send_task("chaos.reject", args=["k", "sleep", size], queue=queue,
                                          ignore_result=True).id)

    def record(self, ev: str, tid: str) -> dict[str, Any] | None:
        self.seen.extend(self.reader.read_new())
        return next((r for r in self.seen if r["ev"] == ev and r["tid"] == tid), None)

    def need(self, predicate: Any, timeout_s: float, message: str) -> Any:
        """Steps of the scenario itself fail the test outright, not as the expected failure."""
        try:
            return wait_until(predicate, timeout_s, message=message)
        except TimeoutError as exc:
            raise AssertionError(str(exc)) from None

    def check(self, faults: list[Fault]) -> dict[str, Any]:
        return check(records=self.seen, sent=[], faults=faults, ttl_s=self.ttl_s)

    def wait_reported(self, tid: str, faults: list[Fault]) -> None:
        """The contract: an overlap is only allowed once the first holder (``tid``) was told
        its lock was lost; its body has ended, so that comes with its release, within 3 s.
        TimeoutError if not."""
        wait_until(lambda: self.record("lost", tid), 3.0, message="lock_lost of the holder")
        report = self.check(faults)
        assert report["ok"], report["violations"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_holder_stopped_past_its_ttl_reports_its_lock_lost(tmp_path: Path) -> None:
    with RedisServer() as lock_server, RedisServer() as broker, \
            Scenario(tmp_path, lock_server.url, broker, ttl_s=1.0) as sc, \
            lock_server.client(decode_responses=True) as locks:
        first = sc.send("first", 0.4)
        started = sc.need(lambda: sc.record("start", first), 30, "first body")
        sc.holder.pause()  # its 0.4 s sleep ends while it is stopped
        paused_at = time.time()
        try:
            sc.need(lambda: not locks.exists(started["key"]), 5, "lock expiry")
            second = sc.send("second", 0.2)
            sc.need(lambda: sc.record("end", second), 30, "duplicate's body")
        finally:
            resumed_at = time.time()
            sc.holder.resume()
        ended = sc.need(lambda: sc.record("end", first), 10, "first body's end")
        assert ended["t"] < resumed_at + 1.0, "the first body should end on SIGCONT"
        faults = [Fault("pause_worker", sc.holder.hostname, paused_at, resumed_at)]
        overlaps = sc.check(faults)["overlaps"]
        assert overlaps["allowed"] + overlaps["violations"] == 1, overlaps
        sc.wait_reported(first, faults)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_holder_short_of_a_quorum_after_two_restarts_reports_its_lock_lost(
    tmp_path: Path, redis_masters: Any
) -> None:
    masters = redis_masters(3)
    # Renewals every ttl/3 = 10 s: none falls between the restarts and the end of the 3 s body.
    ttl_s = 30.0
    with RedisServer() as broker, \
            Scenario(tmp_path, [m.url for m in masters], broker, ttl_s=ttl_s) as sc:
        first = sc.send("first", 3.0)
        started = sc.need(lambda: sc.record("start", first), 30, "first body")
        clients = [m.client(decode_responses=True) for m in masters]
        try:
            sc.need(lambda: all(c.exists(started["key"]) for c in clients), 5, "the lock")
        finally:
            for client in clients:
                client.close()
        restarted_at = time.time()
        for master in masters[:2]:  # both down before either comes back, empty
            master.stop()
        for master in masters[:2]:
            master.restart()
        second = sc.send("second", 0.2)
        ran = sc.need(lambda: sc.record("end", second), 30, "the duplicate's body")
        ended = sc.need(lambda: sc.record("end", first), 10, "first body's end")
        assert ran["t"] < ended["t"], "the duplicate should run while the holder runs"
        faults = [Fault("restart_two", "m0,m1", restarted_at, time.time())]
        overlaps = sc.check(faults)["overlaps"]
        assert overlaps["allowed"] + overlaps["violations"] == 1, overlaps
        sc.wait_reported(first, faults)
