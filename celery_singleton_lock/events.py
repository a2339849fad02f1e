"""Celery monitoring events for lock transitions: ``task-lock-*``.

One event per transition, sent from the process where it happens:

==========================  ====================================================================
``task-lock-acquired``      a task took its lock (``task_id``, ``mode``, ``ttl``, ``fence``)
``task-lock-duplicate``     a duplicate was turned away (``task_id``, ``holder_id``, ``policy``:
                            ``reject`` or ``requeue``), or queued as the follow-up (``coalesce``)
``task-lock-released``      a lock was let go (``task_id``, ``reason``, ``renewals``)
``task-lock-lost``          renewal found the lock gone while its task ran (``task_id``,
                            ``reason``, ``renewals``)
``task-lock-error``         the lock store could not be reached (``task_id``, ``policy``,
                            ``error``)
==========================  ====================================================================

Every event also carries ``lock_key``, ``name`` (the task name, which Flower uses as the
``task`` label of ``flower_events_total``), and, as every Celery event, the sender's
``hostname`` (the worker's node name) and ``pid``.

The event ``uuid`` is the **lock key**, not the task id. Celery's event state (which Flower
uses) turns an unknown ``task-*`` event into a task state of that name (``LOCK-ACQUIRED``) that
outranks ``STARTED`` and ``REVOKED``: with the task id as ``uuid``, a running task would show
``LOCK-ACQUIRED`` and a rejected duplicate would not stay ``REVOKED``. Keyed by the lock, the
events leave every real task's state alone, and Flower lists one row per lock whose state is
its last transition. The rejected duplicate itself gets Celery's own ``task-revoked`` event
(with the reason), sent by :class:`~celery_singleton_lock.task.LockedTask`.

Events are sent when the worker sends task events (``celery worker -E``, or enabled remotely,
as Flower does), the same rule as Celery's own ``task-*`` events: the worker's main process
publishes that switch to its pool children through one shared byte (set up before the pool
forks). Clients that take enqueue-time locks send none: an event names the worker it comes
from, and a client is not one (the worker sends the events of those locks once the task
arrives).

Where prefork children hold locks, the worker's main process renews them and posts the renewal
count back on the board the child reads when it lets go, so the child's ``task-lock-released``
carries it; the main process sends the events of the endings only it sees. Sending never
raises and never retries: a monitoring event is not worth a stalled renewal thread. Events sent
from the worker's main process go through a small queue and a sender thread, so neither the
event loop nor the renewer waits on the broker.

Passwords never appear in events: every text field goes through
:func:`~celery_singleton_lock.urls.redact_url`.
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import threading
import time
from collections import deque
from typing import Any

from celery import signals as celery_signals

from . import signals
from .urls import redact_url

__all__ = [
    "ACQUIRED",
    "DUPLICATE",
    "ERROR",
    "EVENT_TYPES",
    "LOST",
    "RELEASED",
    "backend_error",
    "enabled",
    "install",
    "recently_lost",
    "send",
    "worker_started",
    "worker_stopped",
]

logger = logging.getLogger("celery_singleton_lock.events")

ACQUIRED = "task-lock-acquired"
DUPLICATE = "task-lock-duplicate"
RELEASED = "task-lock-released"
LOST = "task-lock-lost"
ERROR = "task-lock-error"
EVENT_TYPES = (ACQUIRED, DUPLICATE, RELEASED, LOST, ERROR)

#: How often the worker's main process refreshes the "task events on" byte, seconds.
GATE_INTERVAL_S = 0.5
#: Events waiting in the main process's queue before new ones are dropped.
QUEUE_MAX = 1000
#: Longest a worker's shutdown waits for its last lock events to go out, seconds.
SHUTDOWN_FLUSH_S = 2.0
#: Lost locks remembered for the worker's stats: at most this many, for this long (seconds).
LOST_KEEP = 50
LOST_KEEP_S = 300.0

# -- the "task events on" switch, shared with pool children --------------------------------------

_NO_WORKER, _OFF, _ON = 0, 1, 2
# Anonymous shared memory made at import: a pool child forked later sees what the main process
# writes. This module is imported when LockedTask is bound to an app, before the pool forks.
_gate = mmap.mmap(-1, 1)


def _gate_value() -> int:
    return _gate[0]


def _set_gate(value: int) -> None:
    if _gate[0] != value:
        _gate[0] = value


class _Worker:
    """What the worker's main process knows: its node name, its consumer, its pid."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.hostname: str = getattr(worker, "hostname", "") or ""
        self.pid = os.getpid()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="celery-singleton-lock-events",
                                       daemon=True)

    def task_events_on(self) -> bool | None:
        """Celery's own rule for ``task-*`` events; None while the consumer has no dispatcher
        (starting, reconnecting, stopping), when the last answer stands."""
        consumer = getattr(self.worker, "consumer", None)
        dispatcher = getattr(consumer, "event_dispatcher", None)
        if dispatcher is None:
            return None
        if not dispatcher.enabled:
            return False
        groups = dispatcher.groups
        return not groups or "task" in groups

    def refresh(self) -> None:
        on = self.task_events_on()
        if on is not None:
            _set_gate(_ON if on else _OFF)
        elif _gate_value() == _NO_WORKER:
            _set_gate(_OFF)

    def _watch(self) -> None:
        while not self.stopping.wait(GATE_INTERVAL_S):
            try:
                self.refresh()
            except Exception:  # never let the switch thread die
                logger.debug("cannot read the worker's event switch", exc_info=True)


_worker: _Worker | None = None


def worker_started(worker: Any) -> None:
    """Called by the worker bootstep in the worker's main process."""
    global _worker
    _worker = _Worker(worker)
    _worker.refresh()
    _worker.thread.start()


def worker_stopped() -> None:
    """The worker bootstep stops: the switch stays as it was, for the shutdown's releases."""
    state = _in_worker_main()
    if state is not None:
        state.stopping.set()


def _flush_on_shutdown(**kwargs: Any) -> None:
    # Sent after the worker released its children's locks (see hooks): let those go out.
    _sender.flush(SHUTDOWN_FLUSH_S)


def _in_worker_main() -> _Worker | None:
    state = _worker
    return state if state is not None and state.pid == os.getpid() else None


def enabled() -> bool:
    """Whether lock events are sent from this process (the worker's task events switch)."""
    return _gate_value() == _ON


#: ``dispatch_uid`` of this module's receivers of the package's signals.
_UID = "celery_singleton_lock.events"


def wanted(signal: Any) -> bool:
    """Whether sending ``signal`` does anything: lock events are on, or a receiver other than
    this module's listens. The task's hot path asks first, because a ``Signal.send`` that
    reaches only an event sender with events off still costs several microseconds."""
    if enabled():
        return True
    return any(lookup[0] != _UID for lookup, _receiver in signal.receivers)


# -- sending ----------------------------------------------------------------------------------


def _clean(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: redact_url(v) if isinstance(v, str) else v for k, v in fields.items()
            if v is not None}


def _publish(app: Any, hostname: str, type_: str, fields: dict[str, Any]) -> None:
    try:
        with app.events.default_dispatcher(hostname=hostname) as dispatcher:
            dispatcher.send(type_, retry=False, **fields)
    except Exception as exc:  # an event is never worth a failure
        logger.debug("cannot send %s event: %s", type_, redact_url(str(exc)))


class _Sender:
    """A queue and a thread that publish the worker main process's events."""

    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[Any, str, str, dict[str, Any]] | None] = queue.Queue(
            QUEUE_MAX)
        self.thread: threading.Thread | None = None
        self.pid = 0
        self.lock = threading.Lock()

    def put(self, item: tuple[Any, str, str, dict[str, Any]]) -> None:
        with self.lock:
            if self.thread is None or self.pid != os.getpid() or not self.thread.is_alive():
                self.queue = queue.Queue(QUEUE_MAX)
                self.pid = os.getpid()
                self.thread = threading.Thread(target=self._run, args=(self.queue,),
                                               name="celery-singleton-lock-event-sender",
                                               daemon=True)
                self.thread.start()
            try:
                self.queue.put_nowait(item)
            except queue.Full:
                logger.debug("event queue full: dropped %s", item[2])

    def _run(self, q: queue.Queue[tuple[Any, str, str, dict[str, Any]] | None]) -> None:
        while True:
            item = q.get()
            try:
                if item is not None:
                    _publish(*item)
            finally:
                q.task_done()

    def flush(self, timeout_s: float) -> None:
        """Wait (bounded) until queued events are sent."""
        if self.thread is None or self.pid != os.getpid():
            return
        deadline = time.monotonic() + timeout_s
        while self.queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)


_sender = _Sender()


def send(app: Any, type_: str, lock_key: str, *, hostname: str | None = None,
         **fields: Any) -> bool:
    """Send one ``task-lock-*`` event about ``lock_key`` if task events are on.

    ``hostname`` is the worker's node name; in the worker's main process it defaults to the
    worker's own. Returns True if the event was sent or queued.
    """
    if app is None or not enabled():
        return False
    main = _in_worker_main()
    hostname = hostname or (main.hostname if main is not None else None)
    if not hostname:
        return False  # never invent a node name: monitors would list a ghost worker
    # The dispatcher adds ``hostname``, ``pid``, ``timestamp`` and ``clock`` itself.
    body = _clean({"uuid": lock_key, "lock_key": lock_key, **fields})
    if main is not None:
        _sender.put((app, hostname, type_, body))
    else:
        _publish(app, hostname, type_, body)
    return True


# -- signal receivers -------------------------------------------------------------------------


def _context(sender: Any) -> tuple[Any, str, str | None]:
    """``(app, task name, worker node name)`` of a signal's sender task."""
    if sender is None:
        state = _in_worker_main()
        app = getattr(state.worker, "app", None) if state is not None else None
        return app, "", None
    app = getattr(sender, "app", None)
    name = getattr(sender, "name", "") or ""
    hostname = None
    try:
        hostname = sender.request.hostname
    except AttributeError:
        hostname = None
    return app, name, hostname


def _on_acquired(sender: Any = None, lock_key: str = "", task_id: str | None = None,
                 lease: Any = None, **kwargs: Any) -> None:
    if not enabled():  # the hot path: one shared byte read when events are off
        return
    app, name, hostname = _context(sender)
    opts = getattr(sender, "lock_options", None) if sender is not None else None
    send(app, ACQUIRED, lock_key, hostname=hostname, name=name, task_id=task_id,
         mode=getattr(opts, "mode", None), ttl=getattr(lease, "ttl_s", None),
         fence=getattr(lease, "fencing_token", None))


def _on_duplicate(sender: Any = None, lock_key: str = "", task_id: str | None = None,
                  holder_id: str | None = None, policy: str | None = None,
                  **kwargs: Any) -> None:
    if not enabled():
        return
    app, name, hostname = _context(sender)
    send(app, DUPLICATE, lock_key, hostname=hostname, name=name, task_id=task_id,
         holder_id=holder_id, policy=policy)


def _lease_of(sender: Any) -> Any:
    """The lease of the task running in this thread, if any (``LockedTask.lock``)."""
    try:
        return sender.lock
    except AttributeError:
        return None


def _on_released(sender: Any = None, lock_key: str = "", task_id: str | None = None,
                 reason: str | None = None, **kwargs: Any) -> None:
    if not enabled():
        return
    app, name, hostname = _context(sender)
    lease = _lease_of(sender)
    renewals = lease.renewals if lease is not None and lease.key == lock_key else None
    send(app, RELEASED, lock_key, hostname=hostname, name=name, task_id=task_id,
         reason=reason, renewals=renewals)


def _on_lost(sender: Any = None, lock_key: str = "", task_id: str | None = None,
             reason: str | None = None, **kwargs: Any) -> None:
    app, name, hostname = _context(sender)
    _lost.appendleft({
        "key": lock_key, "task": name, "task_id": task_id or "", "reason": reason or "",
        "at": time.time(), "pid": os.getpid(),
    })
    send(app, LOST, lock_key, hostname=hostname, name=name, task_id=task_id, reason=reason)


def backend_error(task: Any, lock_key: str, task_id: str | None, policy: str,
                  error: BaseException | str) -> None:
    """A task could not reach the lock store; ``policy`` is its ``lock_on_backend_error``."""
    try:
        app, name, hostname = _context(task)
        send(app, ERROR, lock_key, hostname=hostname, name=name, task_id=task_id,
             policy=policy, error=str(error))
    except Exception:  # must never change how the task ends
        logger.debug("cannot send %s event", ERROR, exc_info=True)


# -- what the worker's stats show about lost locks ---------------------------------------------

_lost: deque[dict[str, Any]] = deque(maxlen=LOST_KEEP)


def recently_lost() -> list[dict[str, Any]]:
    """Locks this process saw lost in the last :data:`LOST_KEEP_S` seconds, newest first."""
    horizon = time.time() - LOST_KEEP_S
    return [dict(item) for item in list(_lost) if item["at"] >= horizon
            and item["pid"] == os.getpid()]


_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Connect the receivers to this package's signals (once per process)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _installed = True
    signals.lock_acquired.connect(_on_acquired, weak=False, dispatch_uid=_UID)
    signals.lock_duplicate.connect(_on_duplicate, weak=False, dispatch_uid=_UID)
    signals.lock_released.connect(_on_released, weak=False, dispatch_uid=_UID)
    signals.lock_lost.connect(_on_lost, weak=False, dispatch_uid=_UID)
    celery_signals.worker_shutdown.connect(_flush_on_shutdown, weak=False)
    celery_signals.worker_ready.connect(_refresh_when_ready, weak=False)


def _refresh_when_ready(**kwargs: Any) -> None:
    """The consumer has its event dispatcher now: set the switch before the first task."""
    state = _in_worker_main()
    if state is not None:
        state.refresh()
