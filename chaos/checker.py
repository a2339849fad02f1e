"""The external checker: records in, findings out. Pure (no I/O), so it can be tested by hand.

It trusts nothing the package under test says about itself except what the bodies saw
(``self.lock.key`` and ``.fencing_token``) and the ``lock_lost`` reports, and classifies with
the contract (SPEC sections 5-7):

* **Overlaps**: two bodies of one lock key running at once. Allowed only when the holder that
  acquired first (lower fencing token; earlier start if the tokens do not tell) had its lock
  lost *and reported lost* (``lock_lost``) while it ran, as when two of three masters were
  restarted at once or the holder was paused past its ttl. Every other overlap is a violation.
* **Fencing**: per key, in start order, each token must be greater than the one before. A
  token lower than its predecessor is allowed only when its holder reported the lock lost (it
  was taken while the holder was stopped before its body began); an equal token never is.
* **Requeue + acks_late**: every task id sent with that policy must run to its end exactly
  once. A run cut short by SIGKILL and delivered again is fine; so is a second run after the
  process that finished the first was killed before the message could be acknowledged (Celery's
  at-least-once delivery). A task that never ran to its end is lost; any other repeat is a
  violation.
* **Unfinished**: a body that started, never ended, and whose process was never killed.
* **Locks left**: lock keys still on a master after the run and a grace of ``lock_ttl``.
* **Outlive**: how long each lock stayed held (on a quorum, as sampled from the masters) after
  its holder's body ended or its process was killed, until it was seen free or the next holder
  started. More than ``lock_ttl`` plus a tolerance is a violation: a dead holder's lock must
  expire within ``lock_ttl`` (SPEC 6). A lock whose masters stopped answering before it was
  seen free (a paused or restarting master) gives no figure: it is counted as unobserved.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Run", "Sent", "Fault", "build_runs", "check"]

#: Overlaps shorter than this (seconds) are clock noise between processes, not overlaps.
EPSILON_S = 0.0005
#: How many detailed examples of allowed findings the report keeps.
EXAMPLES = 10


@dataclass
class Run:
    """One execution of a body, joined from its ``start`` and ``end`` records."""

    run: str
    tid: str
    task: str
    policy: str
    key: str | None
    fence: int | None
    start: float
    pid: int
    host: str = ""
    end: float | None = None
    error: str | None = None
    #: When the run's process was SIGKILLed, for a run that never ended.
    killed_at: float | None = None
    shape: str = ""
    size: float = 0.0

    @property
    def stop(self) -> float | None:
        """When the body stopped running: its end, or the kill of its process."""
        return self.end if self.end is not None else self.killed_at

    def brief(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Sent:
    """A task the run published."""

    tid: str
    task: str
    policy: str
    key: str
    t: float


@dataclass
class Fault:
    """A fault the run injected: ``kind``, ``target``, ``start``/``end`` and the pids it killed."""

    kind: str
    target: str
    start: float
    end: float
    pids: list[int] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)


def kill_times(faults: Iterable[Fault]) -> dict[int, list[float]]:
    """pid -> sorted times it was SIGKILLed."""
    kills: dict[int, list[float]] = defaultdict(list)
    for fault in faults:
        for pid in fault.pids:
            kills[pid].append(fault.start)
    for times in kills.values():
        times.sort()
    return kills


def _kill_after(kills: Mapping[int, list[float]], pid: int, t: float) -> float | None:
    times = kills.get(pid, [])
    i = bisect.bisect_left(times, t)
    return times[i] if i < len(times) else None


def build_runs(records: Iterable[Mapping[str, Any]], faults: Sequence[Fault]) -> list[Run]:
    """Join ``start`` and ``end`` records into runs; mark unfinished runs whose pid was killed."""
    runs: dict[str, Run] = {}
    ends: dict[str, Mapping[str, Any]] = {}
    for rec in records:
        if rec.get("ev") == "start":
            runs[rec["run"]] = Run(
                run=rec["run"], tid=rec["tid"], task=rec["task"], policy=rec["policy"],
                key=rec.get("key"), fence=rec.get("fence"), start=float(rec["t"]),
                pid=int(rec["pid"]), host=rec.get("host") or "", shape=rec.get("shape", ""),
                size=float(rec.get("size") or 0.0),
            )
        elif rec.get("ev") == "end":
            ends[rec["run"]] = rec
    kills = kill_times(faults)
    for run_id, run in runs.items():
        end = ends.get(run_id)
        if end is not None:
            run.end = float(end["t"])
            run.error = end.get("error")
        else:
            run.killed_at = _kill_after(kills, run.pid, run.start)
    return sorted(runs.values(), key=lambda r: r.start)


def _lost_index(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], list[float]]:
    lost: dict[tuple[str, str], list[float]] = defaultdict(list)
    for rec in records:
        if rec.get("ev") == "lost":
            lost[(rec.get("key") or "", rec.get("tid") or "")].append(float(rec["t"]))
    for times in lost.values():
        times.sort()
    return lost


def _reported_lost(
    lost: Mapping[tuple[str, str], list[float]], run: Run, until: float, slack_s: float
) -> float | None:
    """The time ``run``'s lock was reported lost, if it was, between its start and ``until``."""
    times = lost.get((run.key or "", run.tid), [])
    i = bisect.bisect_left(times, run.start - slack_s)
    if i < len(times) and times[i] <= until + slack_s:
        return times[i]
    return None


def _first_acquired(a: Run, b: Run) -> tuple[Run, Run]:
    """(the run that took the lock first, the other), by fencing token, else by start."""
    if a.fence is not None and b.fence is not None and a.fence != b.fence:
        return (a, b) if a.fence < b.fence else (b, a)
    return (a, b) if a.start <= b.start else (b, a)


def _faults_during(faults: Sequence[Fault], start: float, end: float, ttl_s: float) -> list[str]:
    """Faults active in [start, end], a fault counting until ``ttl_s`` after it ended."""
    return sorted({f"{f.kind}:{f.target}" for f in faults
                   if f.start <= end and f.end + ttl_s >= start})


def _paused_during(faults: Sequence[Fault], run: Run) -> dict[str, float] | None:
    """The pause of ``run``'s worker during the run, if there was one: when it began, how
    long it lasted, and how soon after SIGCONT the body ended."""
    stop = run.stop
    for fault in faults:
        if (fault.kind == "pause_worker" and fault.target == run.host and stop is not None
                and fault.start < stop and fault.end > run.start):
            paused = {"from": fault.start, "seconds": round(fault.end - fault.start, 3)}
            if run.end is not None and run.end >= fault.end - 0.05:  # SIGCONT, then the time
                paused["body_ended_after_resume_s"] = round(max(0.0, run.end - fault.end), 4)
            return paused
    return None


def _overlaps(
    runs: Sequence[Run], lost: Mapping[tuple[str, str], list[float]],
    faults: Sequence[Fault], ttl_s: float,
) -> dict[str, Any]:
    by_key: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if run.key is not None and run.stop is not None:
            by_key[run.key].append(run)
    allowed: list[dict[str, Any]] = []
    violations: list[dict[str, Any]] = []
    by_fault: Counter[str] = Counter()
    bad_by_fault: Counter[str] = Counter()
    for key_runs in by_key.values():
        key_runs.sort(key=lambda r: r.start)
        for i, a in enumerate(key_runs):
            a_stop = a.stop
            assert a_stop is not None
            for b in key_runs[i + 1:]:
                if b.start >= a_stop - EPSILON_S:
                    break
                b_stop = b.stop
                assert b_stop is not None
                both_until = min(a_stop, b_stop)
                if both_until - b.start <= EPSILON_S:
                    continue
                first, second = _first_acquired(a, b)
                first_stop = first.stop
                assert first_stop is not None
                reported = _reported_lost(lost, first, first_stop, ttl_s)
                faults_seen = _faults_during(faults, first.start, both_until, ttl_s)
                finding = {
                    "key": a.key, "overlap_s": round(both_until - b.start, 4),
                    "first": first.brief(), "second": second.brief(),
                    "lost_reported_at": reported, "faults": faults_seen,
                }
                paused = _paused_during(faults, first)
                if paused is not None:
                    finding["first_paused"] = paused
                kinds = sorted({f.split(":", 1)[0] for f in faults_seen}) or ["none"]
                if reported is not None:
                    allowed.append(finding)
                    by_fault.update(kinds)
                else:
                    violations.append(finding)
                    bad_by_fault.update(kinds)
    return {
        "allowed": len(allowed), "violations": len(violations),
        "allowed_during": dict(sorted(by_fault.items())),
        "violations_during": dict(sorted(bad_by_fault.items())),
        "allowed_examples": allowed[:EXAMPLES], "violation_details": violations,
    }


def _fencing(
    runs: Sequence[Run], lost: Mapping[tuple[str, str], list[float]], ttl_s: float
) -> dict[str, Any]:
    by_key: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if run.key is not None:
            by_key[run.key].append(run)
    missing = [r.brief() for r in runs if r.key is not None and r.fence is None]
    allowed: list[dict[str, Any]] = []
    violations: list[dict[str, Any]] = []
    pairs = 0
    for key, key_runs in by_key.items():
        ordered = sorted((r for r in key_runs if r.fence is not None), key=lambda r: r.start)
        for prev, cur in zip(ordered, ordered[1:], strict=False):
            pairs += 1
            assert prev.fence is not None and cur.fence is not None
            if cur.fence > prev.fence:
                continue
            finding = {"key": key, "previous": prev.brief(), "next": cur.brief()}
            cur_stop = cur.stop if cur.stop is not None else cur.start
            if cur.fence < prev.fence and _reported_lost(lost, cur, cur_stop, ttl_s) is not None:
                allowed.append(finding)
            else:
                violations.append(finding)
    return {
        "pairs_checked": pairs, "allowed": len(allowed), "violations": len(violations),
        "allowed_examples": allowed[:EXAMPLES], "violation_details": violations,
        "runs_without_token": missing,
    }


def _requeue(
    runs: Sequence[Run], sent: Sequence[Sent], faults: Sequence[Fault]
) -> dict[str, Any]:
    kills = kill_times(faults)
    by_tid: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_tid[run.tid].append(run)
    wanted = [s for s in sent if s.policy == "requeue"]
    lost: list[dict[str, Any]] = []
    twice: list[dict[str, Any]] = []
    once = cut_short = redelivered_after_kill = 0
    for task in wanted:
        task_runs = sorted(by_tid.get(task.tid, []), key=lambda r: r.start)
        completed = [r for r in task_runs if r.end is not None]
        cut_short += sum(1 for r in task_runs if r.end is None and r.killed_at is not None)
        if not completed:
            lost.append({"tid": task.tid, "key": task.key, "sent_at": task.t,
                         "runs": [r.brief() for r in task_runs]})
            continue
        if len(completed) == 1:
            once += 1
            continue
        # A second run is Celery's at-least-once delivery when the process that finished the
        # first was killed before the next began (its acknowledgement never went out).
        explained = True
        for done, again in zip(completed, completed[1:], strict=False):
            kill = _kill_after(kills, done.pid, done.end or done.start)
            if kill is None or kill > again.start:
                explained = False
        if explained:
            redelivered_after_kill += 1
            once += 1
        else:
            twice.append({"tid": task.tid, "key": task.key,
                          "runs": [r.brief() for r in task_runs]})
    return {
        "sent": len(wanted), "ran_once": once, "cut_short_by_kill": cut_short,
        "redelivered_after_kill": redelivered_after_kill,
        "lost": len(lost), "ran_twice": len(twice),
        "lost_details": lost, "ran_twice_details": twice,
    }


def _first_change(
    transitions: Sequence[tuple[float, bool | None]], t: float
) -> tuple[float | None, bool | None]:
    """The first time at or after ``t`` the key was not seen held, and what was seen then
    (False: free; None: the masters could not tell). ``(t, False)`` if it was not held at ``t``;
    ``(None, None)`` if it stayed held to the end of the samples."""
    times = [tt for tt, _ in transitions]
    i = bisect.bisect_right(times, t)
    held = transitions[i - 1][1] if i else False
    if held is not True:
        return t, held
    for tt, state in transitions[i:]:
        if state is not True:
            return tt, state
    return None, None


def _outlive(
    runs: Sequence[Run], presence: Mapping[str, Sequence[tuple[float, bool | None]]],
    ttl_s: float, tolerance_s: float, watched_until: float | None,
) -> dict[str, Any]:
    starts: dict[str, list[float]] = defaultdict(list)
    by_key: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if run.key is not None:
            starts[run.key].append(run.start)
            by_key[run.key].append(run)
    for times in starts.values():
        times.sort()
    longest: dict[str, Any] | None = None
    over: list[dict[str, Any]] = []
    measured = unobserved = 0
    for run in runs:
        stop = run.stop
        if run.key is None or stop is None or run.key not in presence:
            continue
        if any(other is not run and other.start <= stop and (other.stop or float("inf")) > stop
               for other in by_key[run.key]):
            continue  # another body of this key still ran: the lock seen then was not only ours
        changed_at, seen = _first_change(presence[run.key], stop)
        key_starts = starts[run.key]
        i = bisect.bisect_right(key_starts, stop)
        next_start = key_starts[i] if i < len(key_starts) else None
        if changed_at is not None and seen is None and (next_start is None
                                                        or changed_at < next_start):
            unobserved += 1  # its masters stopped answering (paused, restarting): no figure
            continue
        ends = [t for t in (changed_at, next_start) if t is not None]
        if not ends:
            if watched_until is None:
                continue
            ends = [watched_until]
        outlived = max(0.0, min(ends) - stop)
        measured += 1
        entry = {"outlived_s": round(outlived, 3), "ended": "killed" if run.end is None
                 else "finished", "run": run.brief()}
        if longest is None or outlived > longest["outlived_s"]:
            longest = entry
        if outlived > ttl_s + tolerance_s:
            over.append(entry)
    return {
        "measured": measured, "unobserved": unobserved,
        "max_s": longest["outlived_s"] if longest else 0.0,
        "longest": longest, "bound_s": round(ttl_s + tolerance_s, 3),
        "violations": len(over), "violation_details": over,
    }


def check(
    *,
    records: Sequence[Mapping[str, Any]],
    sent: Sequence[Sent],
    faults: Sequence[Fault],
    ttl_s: float,
    presence: Mapping[str, Sequence[tuple[float, bool | None]]] | None = None,
    locks_left: Mapping[str, int] | None = None,
    outlive_tolerance_s: float = 2.0,
    watched_until: float | None = None,
) -> dict[str, Any]:
    """Every finding of one run, as a JSON-ready dict; ``violations`` counts what breaks the
    contract (the run fails when it is not 0).

    ``presence`` is, per lock key, the sampled ``(time, held)`` transitions (held: on a
    quorum; None: the masters that answered could not tell); ``locks_left`` maps each lock
    key still found after the run to how many masters hold it.
    """
    runs = build_runs(records, faults)
    lost = _lost_index(records)
    overlaps = _overlaps(runs, lost, faults, ttl_s)
    fencing = _fencing(runs, lost, ttl_s)
    requeue = _requeue(runs, sent, faults)
    unfinished = [r.brief() for r in runs if r.end is None and r.killed_at is None]
    unlocked = [r.brief() for r in runs if r.key is None]
    outlive = _outlive(runs, presence or {}, ttl_s, outlive_tolerance_s, watched_until)
    left = dict(sorted((locks_left or {}).items()))

    per_policy: dict[str, Counter[str]] = defaultdict(Counter)
    for task in sent:
        per_policy[task.policy]["sent"] += 1
    for run in runs:
        counts = per_policy[run.policy]
        counts["started"] += 1
        if run.end is not None:
            counts["finished"] += 1
            if run.error:
                counts["raised " + run.error] += 1
        elif run.killed_at is not None:
            counts["killed"] += 1
    duplicates = Counter(rec.get("policy", "") for rec in records if rec.get("ev") == "dup")
    lost_reports = sum(1 for rec in records if rec.get("ev") == "lost")

    violations = {
        "overlaps": overlaps["violations"],
        "fencing": fencing["violations"] + len(fencing["runs_without_token"]),
        "requeue_lost": requeue["lost"],
        "requeue_ran_twice": requeue["ran_twice"],
        "unfinished": len(unfinished),
        "unlocked_runs": len(unlocked),
        "locks_left": len(left),
        "outlived_ttl": outlive["violations"],
    }
    return {
        "tasks": {policy: dict(counts) for policy, counts in sorted(per_policy.items())},
        "tasks_sent": len(sent),
        "runs": len(runs),
        "duplicates": dict(sorted(duplicates.items())),
        "lost_reports": lost_reports,
        "faults": dict(sorted(Counter(f.kind for f in faults).items())),
        "overlaps": overlaps,
        "fencing": fencing,
        "requeue": requeue,
        "unfinished": unfinished,
        "unlocked_runs": unlocked,
        "locks_left": left,
        "outlive": outlive,
        "violations": violations,
        "violation_count": sum(violations.values()),
        "ok": sum(violations.values()) == 0,
    }
