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

import functools
import json
import logging
import os
import select
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from . import events
from .lease import Lease
from .renewer import get_renewer
from .store import Store

__all__ = ["Supervisor", "ChildReporter", "current_supervisor", "current_reporter"]

logger = logging.getLogger("celery_singleton_lock.supervisor")

#: How often the main process checks that the children holding locks are alive, seconds.
REAP_INTERVAL_S = 0.2
#: How long the main process lets children's reports gather before handling them, seconds.
BATCH_WINDOW_S = 0.05

#: Stands in for a store where a lease is only described (an event), never renewed or released.
_NO_STORE: Any = SimpleNamespace(clock=time.monotonic)


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
        self._wake = threading.Event()
        self._drain_mutex = threading.Lock()
        self._thread = threading.Thread(
            target=self._loop, name="celery-singleton-lock-supervisor", daemon=True
        )
        self._thread.start()

    # -- messages -------------------------------------------------------------------------

    def _loop(self) -> None:
        next_reap = time.monotonic() + REAP_INTERVAL_S
        while not self._stopped:
            try:
                ready, _, _ = select.select([self.sock], [], [],
                                            max(0.0, next_reap - time.monotonic()))
            except (OSError, ValueError):
                if self._stopped:
                    return
                logger.exception("lock supervisor socket failed")
                continue
            try:
                if ready:
                    # Let a window's reports gather, then handle them as one batch: a lock
                    # taken and given back within the window is never adopted at all.
                    self._wake.wait(BATCH_WINDOW_S)
                    self.drain()
                if time.monotonic() >= next_reap:
                    self.reap()
                    next_reap = time.monotonic() + REAP_INTERVAL_S
            except Exception:
                logger.exception("lock supervisor failed on a message")

    def drain(self) -> None:
        """Handle every report already queued (also before declaring a lock lost).

        One thread at a time reads *and* handles, so a child's "releasing" can never be
        handled before its "acquired" (the renewer thread drains too).
        """
        with self._drain_mutex:
            messages: list[dict[str, Any]] = []
            while True:
                try:
                    data = self.sock.recv(65536, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                try:
                    messages.append(json.loads(data))
                except ValueError:
                    logger.warning("lock supervisor dropped an unreadable report")
            self._handle_batch(messages)

    def _handle_batch(self, messages: list[dict[str, Any]]) -> None:
        given_back = {(m["key"], m["token"]) for m in messages if m.get("op") == "releasing"}
        for msg in messages:
            try:
                ident = (msg["key"], msg["token"])
                if msg.get("op") == "acquired" and ident in given_back:
                    # Taken and released before we saw it: nothing to renew or release.
                    if events.enabled():
                        events.child_released(self._lease(msg, None), msg)
                    continue
                if msg.get("op") == "releasing" and ident not in self.held:
                    if events.enabled():
                        acquired = next((m for m in messages if m.get("op") == "acquired"
                                         and (m["key"], m["token"]) == ident), None)
                        if acquired is not None:
                            events.child_released(self._lease(acquired, None),
                                                  {**acquired, **msg})
                    continue
                self.handle(msg)
            except Exception:
                logger.exception("lock supervisor failed on a message")

    def _lease(self, msg: dict[str, Any], store: Store | None) -> Lease:
        return Lease(store or _NO_STORE, msg["key"], msg["token"], float(msg["ttl"]),
                     fencing_token=int(msg.get("fence", 0)), owner=msg.get("task_id", ""),
                     task_name=msg.get("task", ""))

    def handle(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        ident = (msg["key"], msg["token"])
        if op == "acquired":
            store = self.store_for(msg.get("task", ""))
            if store is None:
                logger.warning("no lock store for task %s; cannot renew %s", msg.get("task"),
                               msg["key"])
                return
            lease = self._lease(msg, store)
            lease.renewals = int(msg.get("renewals", 0))
            lease.before_lost = self.drain
            lease.on_lost(functools.partial(self._lost, msg=msg))
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
        self.drain()
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
        self._wake.set()
        self.drain()
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
        self._connected = False

    def send(self, **msg: Any) -> bool:
        try:
            if not self._connected:  # connect once: no path lookup on every report
                self.sock.connect(self.path)
                self._connected = True
            self.sock.send(json.dumps(msg).encode("utf-8"))
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
