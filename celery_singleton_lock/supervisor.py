"""The worker main process's view of the locks its pool children hold.

With the prefork pool a task body runs in a child process, but several endings are only seen
in the worker's main process: ``revoke(terminate=True)``, a hard time limit, a child killed by
a signal. And a body that holds the GIL in one long C call starves any renewal thread inside
its own child. So the child reports every lock it takes and releases to the main process over
a unix datagram socket, and the main process:

* renews those locks with its own renewer (one thread, batched, for every child);
* releases a task's locks on ``task_revoked`` (terminate), ``task_failure`` with
  ``WorkerLostError`` or ``TimeLimitExceeded``, and when it sees the child's pid gone;
* on a lost lock: logs, sends ``lock_lost``, and with ``lock_on_lost="abort"`` signals the
  child (``SIGUSR2``), whose handler raises :class:`LockLostError` inside the running body.

A child reports "releasing" *before* it deletes the lock, so the main process never mistakes
a normal release for a lost lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from . import events
from .lease import Lease
from .renewer import get_renewer
from .store import Store

__all__ = ["Supervisor", "ChildReporter", "current_supervisor", "current_reporter"]

logger = logging.getLogger("celery_singleton_lock.supervisor")

#: How often the main process checks that the children holding locks are alive, seconds.
REAP_INTERVAL_S = 0.2


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


class Supervisor:
    """Runs in the worker main process; adopts, renews and releases the children's locks."""

    def __init__(
        self,
        store_for: Callable[[str], Store | None],
        on_lost: Callable[[Lease, dict[str, Any]], None],
        on_released: Callable[[Lease, dict[str, Any], str], None],
    ) -> None:
        self.store_for = store_for
        self._on_lost = on_lost
        self._on_released = on_released
        self.dir = tempfile.mkdtemp(prefix="csl-")
        self.path = os.path.join(self.dir, "locks.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(REAP_INTERVAL_S)
        self.pid = os.getpid()
        self._mutex = threading.RLock()
        #: (key, token) -> (lease, the child's report)
        self.held: dict[tuple[str, str], tuple[Lease, dict[str, Any]]] = {}
        self._stopped = False
        self._thread = threading.Thread(
            target=self._loop, name="celery-singleton-lock-supervisor", daemon=True
        )
        self._thread.start()

    # -- messages -------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopped:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                data = b""
            except OSError:
                if self._stopped:
                    return
                logger.exception("lock supervisor socket failed")
                continue
            try:
                if data:
                    self.handle(json.loads(data))
                self.reap()
            except Exception:
                logger.exception("lock supervisor failed on a message")

    def drain(self) -> None:
        """Handle every message already queued (before declaring a lock lost)."""
        while True:
            try:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                self.handle(json.loads(data))
            except Exception:
                logger.exception("lock supervisor failed on a message")

    def handle(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        ident = (msg["key"], msg["token"])
        if op == "acquired":
            store = self.store_for(msg.get("task", ""))
            if store is None:
                logger.warning("no lock store for task %s; cannot renew %s", msg.get("task"),
                               msg["key"])
                return
            lease = Lease(store, msg["key"], msg["token"], float(msg["ttl"]),
                          fencing_token=int(msg.get("fence", 0)), owner=msg.get("task_id", ""),
                          task_name=msg.get("task", ""))
            lease.renewals = int(msg.get("renewals", 0))
            lease.before_lost = self.drain  # type: ignore[attr-defined]
            lease.on_lost(lambda le, m=msg: self._lost(le, m))
            with self._mutex:
                self.held[ident] = (lease, msg)
            get_renewer().add(lease)
        elif op == "releasing":
            with self._mutex:
                item = self.held.pop(ident, None)
            if item is not None:
                item[0].released = True
                get_renewer().remove(item[0])
                events.child_released(item[0], {**item[1], **msg})

    def _lost(self, lease: Lease, msg: dict[str, Any]) -> None:
        with self._mutex:
            self.held.pop((lease.key, lease.token), None)
        self._on_lost(lease, msg)

    # -- endings seen only here ------------------------------------------------------------

    def release_task(self, task_id: str, reason: str, *, if_exited: bool = False) -> int:
        """Release every lock held for ``task_id`` (revoke, time limit, lost child).

        With ``if_exited``, the locks of a child that is still alive are left alone: its body
        may still run (``revoke(terminate=True, signal="SIGUSR1")`` raises
        SoftTimeLimitExceeded in it; a hard time limit kills the child only after this
        call), so they go when the child reports its release or :meth:`reap` sees it gone.
        """
        with self._mutex:
            items = [
                (k, v) for k, v in self.held.items()
                if v[1].get("task_id") == task_id
                and not (if_exited and _pid_alive(int(v[1].get("pid", 0))))
            ]
            for k, _ in items:
                self.held.pop(k, None)
        for _, (lease, msg) in items:
            lease.release()
            self._on_released(lease, msg, reason)
        return len(items)

    def reap(self) -> None:
        """Release the locks of children that are gone (killed, crashed)."""
        with self._mutex:
            pids = {int(m.get("pid", 0)) for _, m in self.held.values()}
        for pid in pids:
            if pid and not _pid_alive(pid):
                with self._mutex:
                    items = [(k, v) for k, v in self.held.items() if int(v[1].get("pid", 0)) == pid]
                    for k, _ in items:
                        self.held.pop(k, None)
                for _, (lease, msg) in items:
                    lease.release()
                    self._on_released(lease, msg, "worker_lost")

    def leases(self) -> list[tuple[Lease, dict[str, Any]]]:
        with self._mutex:
            return list(self.held.values())

    def stop(self, release: bool = True) -> None:
        self._stopped = True
        if release:
            with self._mutex:
                items = list(self.held.values())
                self.held.clear()
            for lease, msg in items:
                lease.release()
                self._on_released(lease, msg, "shutdown")
        try:
            self.sock.close()
            os.unlink(self.path)
            os.rmdir(self.dir)
        except OSError:
            logger.debug("supervisor socket cleanup failed", exc_info=True)


class ChildReporter:
    """Runs in a pool child: tells the main process about the locks this child takes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def send(self, **msg: Any) -> bool:
        try:
            self.sock.sendto(json.dumps(msg).encode("utf-8"), self.path)
            return True
        except OSError:
            logger.warning("cannot reach the worker main process at %s", self.path, exc_info=True)
            return False


_supervisor: Supervisor | None = None
_reporter: ChildReporter | None = None
#: Path of the main process's socket, inherited by forked children.
_channel_path: str | None = None
_main_pid: int | None = None


def start_supervisor(
    store_for: Callable[[str], Store | None],
    on_lost: Callable[[Lease, dict[str, Any]], None],
    on_released: Callable[[Lease, dict[str, Any], str], None],
) -> Supervisor:
    global _supervisor, _channel_path, _main_pid
    if _supervisor is None or _supervisor.pid != os.getpid():
        _supervisor = Supervisor(store_for, on_lost, on_released)
        _channel_path = _supervisor.path
        _main_pid = os.getpid()
    return _supervisor


def stop_supervisor() -> None:
    global _supervisor
    if _supervisor is not None and _supervisor.pid == os.getpid():
        _supervisor.stop()
    _supervisor = None


def current_supervisor() -> Supervisor | None:
    """The supervisor, in the worker main process only."""
    if _supervisor is not None and _supervisor.pid == os.getpid():
        return _supervisor
    return None


def current_reporter() -> ChildReporter | None:
    """The reporter, in a pool child of a supervised worker only."""
    global _reporter
    if _channel_path is None or _main_pid == os.getpid():
        return None
    if _reporter is None or _reporter.path != _channel_path:
        _reporter = ChildReporter(_channel_path)
    return _reporter
