"""Append-only record files: what the task bodies and workers saw, kept outside the lock store.

Every process writes JSON lines to its own file (``<dir>/<pid>.jsonl``) with one ``write(2)``
per line on a descriptor opened with ``O_APPEND``, so a process killed mid-run leaves at most one
partial last line, which :class:`RecordReader` skips. Nothing here imports the package under
test: the checker must not trust the code it checks.

Record kinds (field ``ev``):

* ``start``: a body began. ``run`` (unique per execution), ``tid``, ``task``, ``policy``,
  ``key`` (the lock key), ``fence`` (the fencing token), ``host``, ``pid``, ``t``;
* ``end``: that body ended (``run``, ``tid``, ``pid``, ``t``, ``error`` if it raised);
* ``lost``: ``lock_lost`` was sent (``key``, ``tid``, ``reason``, ``pid``, ``t``);
* ``dup``: ``lock_duplicate`` was sent (``key``, ``tid``, ``policy``, ``pid``, ``t``).

Times are ``time.time()``: every process runs on this one host, so they compare.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["RECORDS_ENV", "RecordReader", "Recorder"]

#: Environment variable naming the records directory (set by the run for every worker).
RECORDS_ENV = "CHAOS_RECORDS_DIR"


class Recorder:
    """Writes records of the current process; reopens its file after a fork."""

    def __init__(self, directory: str | os.PathLike[str] | None) -> None:
        self.directory = Path(directory) if directory else None
        self._fd: int | None = None
        self._pid = 0
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> Recorder:
        return cls(os.environ.get(RECORDS_ENV))

    def write(self, ev: str, **fields: Any) -> None:
        """Append one record; a recorder without a directory writes nothing."""
        if self.directory is None:
            return
        fields.setdefault("t", time.time())
        fields.setdefault("pid", os.getpid())
        line = (json.dumps({"ev": ev, **fields}, separators=(",", ":")) + "\n").encode()
        with self._lock:
            pid = os.getpid()
            if self._fd is None or self._pid != pid:  # a forked pool child gets its own file
                self._fd = os.open(self.directory / f"{pid}.jsonl",
                                   os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                self._pid = pid
            os.write(self._fd, line)


class RecordReader:
    """Reads the records of a directory incrementally: each call returns only new lines."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._offsets: dict[str, int] = {}

    def read_new(self) -> list[dict[str, Any]]:
        return list(self._iter_new())

    def _iter_new(self) -> Iterator[dict[str, Any]]:
        for path in sorted(self.directory.glob("*.jsonl")):
            offset = self._offsets.get(path.name, 0)
            with open(path, "rb") as fh:
                fh.seek(offset)
                data = fh.read()
            end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
            self._offsets[path.name] = offset + end
            for raw in data[:end].splitlines():
                try:
                    yield json.loads(raw)
                except ValueError:  # a line cut short by SIGKILL
                    continue
