"""Helpers the benchmark scripts share, free of side effects on import (the workers of
``bench_sql.py`` import it too): the CPU of a process tree from ``/proc``, a worker that dies
with its script, versions, the checkout's commit, a median."""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["commit", "cpu_since", "die_with_parent", "median", "tree_cpu", "version"]

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> tuple[int, float] | None:
    """``(ppid, CPU seconds)`` of ``pid`` from ``/proc/<pid>/stat``: utime + stime of all its
    threads, plus cutime + cstime, the CPU of children it has reaped (a pool child that exits
    in a round still counts), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2:].split()  # after "pid (comm) ": state is field 3
    ppid = int(fields[1])
    ticks = sum(int(x) for x in fields[11:15])  # fields 14-17: utime stime cutime cstime
    return ppid, ticks / _CLK_TCK


def tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds of ``root`` and every process below it, by pid (Linux ``/proc``)."""
    parents: dict[int, int] = {}
    seconds: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            got = _stat(int(entry.name))
            if got is not None:
                parents[int(entry.name)], seconds[int(entry.name)] = got
    if root not in seconds:
        return {}
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return {pid: seconds[pid] for pid in tree}


def cpu_since(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds the tree spent between two :func:`tree_cpu` readings. A process that
    appeared in between counts in full; one that exited and was reaped by the worker's main
    process is in the main's cutime + cstime, so its earlier reading is taken off."""
    return sum(after.values()) - sum(before.values())


try:  # looked up here, not in the forked child
    _prctl: Any = ctypes.CDLL(None).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def die_with_parent() -> None:  # runs in the forked child, before exec
    """Linux: SIGTERM the worker if the script dies, even by SIGKILL (PR_SET_PDEATHSIG)."""
    if _prctl is not None:
        _prctl(1, 15, 0, 0, 0)


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def commit(path: Path) -> str | None:
    """The short commit of the git checkout at ``path`` (None if it is not one)."""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None
