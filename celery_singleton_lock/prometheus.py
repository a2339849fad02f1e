"""Prometheus metrics of the locks: ``register(app, registry=None)``.

Register the collector in a Flower config file (``celery -A proj flower
--conf=flowerconfig.py``, see ``examples/flowerconfig.py``): Flower's ``/metrics`` serves
prometheus_client's default registry, so the series below appear beside Flower's own. Any other
process can register it too and serve the registry itself
(``prometheus_client.start_http_server``).

Series (every name starts with ``celery_singleton_lock_``):

=================================================  =============================================
``locks_held{task}``                               locks in the lock store now, per task, read
                                                   at scrape time (cached ``cache_s`` seconds)
``store_up``                                       1 if the last read of the store succeeded
``scan_truncated``                                 1 if the read stopped at ``scan_limit`` keys
``acquisitions_total{task}``                       ``task-lock-acquired`` events
``duplicates_total{task,policy}``                  ``task-lock-duplicate`` events (``reject``,
                                                   ``requeue``, ``coalesce``)
``releases_total{task,reason}``                    ``task-lock-released`` events
``renewals_total{task}``                           renewals of the locks released (the
                                                   ``renewals`` field of those events)
``lost_total{task}``                               ``task-lock-lost`` events
``backend_errors_total{task,policy}``              ``task-lock-error`` events
=================================================  =============================================

The store read is a ``SCAN`` of key names only (no reads of the hashes): the ``task`` label is
the task name as the key shows it (``""`` for standalone locks), and with Redlock a lock counts
once it stands on a quorum of masters. At most ``scan_limit`` keys are scanned per server, so a
scrape stays bounded however many locks there are.

The counters come from the lock events the workers send (see
:mod:`celery_singleton_lock.events`; workers send them when task events are on, which Flower
turns on). The collector consumes them itself, on its own connection to the broker, from a
daemon thread bound to the ``task.lock.#`` routing key only. That works in Flower without
patching it (Flower offers no hook into the events it receives) and in any other process
alike; the price is a second subscription to the lock events, which are few (one per lock
transition). Counters start at zero when the collector starts, as Prometheus expects of a
restarted process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from .errors import LockBackendError, LockConfigError
from .events import ACQUIRED, DUPLICATE, ERROR, EVENT_TYPES, LOST, RELEASED
from .inventory import count_by_task
from .keys import validate_key_prefix
from .settings import register_defaults, resolve_store_url
from .backends.base import LockBackend
from .backends.registry import open_backend
from .urls import redact_url

__all__ = ["LockCollector", "register"]

logger = logging.getLogger("celery_singleton_lock.prometheus")

PREFIX = "celery_singleton_lock_"
#: The routing key the collector binds to: only ``task-lock-*`` events.
ROUTING_KEY = "task.lock.#"
#: Socket timeout of the collector's connections to the lock store, seconds.
STORE_TIMEOUT_S = 2.0
#: Seconds between reconnection attempts of the event receiver.
RECONNECT_S = 2.0

_registered: dict[tuple[int, int], LockCollector] = {}
_registered_lock = threading.Lock()


class LockCollector:
    """A prometheus_client collector: lock store gauges and lock event counters."""

    def __init__(
        self,
        app: Any,
        *,
        cache_s: float = 5.0,
        scan_limit: int = 100_000,
        consume_events: bool = True,
    ) -> None:
        self.app = app
        self.cache_s = float(cache_s)
        self.scan_limit = int(scan_limit)
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._store: LockBackend | None = None
        self._prefix: str | None = None
        self._held: dict[str, int] = {}
        self._truncated = False
        self._up = 0
        self._read_at = -float("inf")
        self._last_error = ""
        #: metric -> label values -> count
        self._counts: dict[str, dict[tuple[str, ...], float]] = defaultdict(
            lambda: defaultdict(float)
        )
        self._stopping = threading.Event()
        self._receiver: Any = None
        self._thread: threading.Thread | None = None
        if consume_events:
            self._thread = threading.Thread(target=self._consume, daemon=True,
                                            name="celery-singleton-lock-prometheus")
            self._thread.start()

    # -- events -----------------------------------------------------------------------------

    def on_event(self, event: dict[str, Any]) -> None:
        """Count one ``task-lock-*`` event (called by the receiver thread; public for tests)."""
        type_ = event.get("type")
        task = str(event.get("name") or "")
        with self._lock:
            if type_ == ACQUIRED:
                self._counts["acquisitions"][(task,)] += 1
            elif type_ == DUPLICATE:
                self._counts["duplicates"][(task, str(event.get("policy") or ""))] += 1
            elif type_ == RELEASED:
                self._counts["releases"][(task, str(event.get("reason") or ""))] += 1
                renewals = event.get("renewals")
                if isinstance(renewals, (int, float)) and renewals > 0:
                    self._counts["renewals"][(task,)] += renewals
                else:
                    self._counts["renewals"].setdefault((task,), 0.0)
            elif type_ == LOST:
                self._counts["lost"][(task,)] += 1
            elif type_ == ERROR:
                self._counts["backend_errors"][(task, str(event.get("policy") or ""))] += 1

    def _consume(self) -> None:
        handlers = {type_: self.on_event for type_ in EVENT_TYPES}
        while not self._stopping.is_set():
            try:
                with self.app.connection_for_read() as conn:
                    receiver = self.app.events.Receiver(conn, handlers=handlers,
                                                        routing_key=ROUTING_KEY)
                    self._receiver = receiver
                    if self._stopping.is_set():
                        return
                    receiver.capture(limit=None, timeout=None, wakeup=False)
            except Exception as exc:
                if self._stopping.is_set():
                    return
                logger.warning("lock event receiver failed, reconnecting in %.0fs: %s",
                               RECONNECT_S, redact_url(str(exc)))
                self._stopping.wait(RECONNECT_S)

    def close(self) -> None:
        """Stop the event receiver thread and close the store connections."""
        self._stopping.set()
        receiver = self._receiver
        if receiver is not None:
            receiver.should_stop = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._store is not None:
            self._store.close()

    # -- the store --------------------------------------------------------------------------

    def _open(self) -> tuple[LockBackend, str]:
        if self._store is None or self._prefix is None:
            register_defaults(self.app)
            url = resolve_store_url(self.app)
            self._prefix = validate_key_prefix(
                self.app.conf.get("singleton_lock_key_prefix") or "csl")
            self._store = open_backend(url, socket_timeout=STORE_TIMEOUT_S,
                                       setting="singleton_lock_url")
        return self._store, self._prefix

    def refresh(self, force: bool = False) -> None:
        """Read the locks held per task, unless the last read is younger than ``cache_s``."""
        with self._read_lock:
            if not force and time.monotonic() - self._read_at < self.cache_s:
                return
            try:
                store, prefix = self._open()
                held, truncated = count_by_task(store, prefix, limit=self.scan_limit)
            except (LockBackendError, LockConfigError) as exc:
                message = redact_url(str(exc))
                if message != self._last_error:
                    logger.warning("cannot read the lock store: %s", message)
                self._last_error = message
                self._up = 0
            else:
                self._held, self._truncated, self._up = held, truncated, 1
                self._last_error = ""
            self._read_at = time.monotonic()

    # -- prometheus_client ------------------------------------------------------------------

    def describe(self) -> list[Any]:
        # Declared without reading the store, so registering never blocks.
        return list(self._families(read=False))

    def collect(self) -> Iterator[Any]:
        self.refresh()
        yield from self._families(read=True)

    def _families(self, read: bool) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        held = GaugeMetricFamily(PREFIX + "locks_held",
                                 "Locks in the lock store, per task (read at scrape time).",
                                 labels=["task"])
        up = GaugeMetricFamily(PREFIX + "store_up",
                               "1 if the last read of the lock store succeeded.")
        truncated = GaugeMetricFamily(PREFIX + "scan_truncated",
                                      "1 if the last read stopped at the scan limit.")
        if read:
            for task, n in sorted(self._held.items()):
                held.add_metric([task], n)
            up.add_metric([], self._up)
            truncated.add_metric([], 1 if self._truncated else 0)
        yield held
        yield up
        yield truncated
        specs = (
            ("acquisitions", "Locks acquired (task-lock-acquired events).", ["task"]),
            ("duplicates", "Duplicates turned away, by policy (task-lock-duplicate events).",
             ["task", "policy"]),
            ("releases", "Locks released, by reason (task-lock-released events).",
             ["task", "reason"]),
            ("renewals", "Renewals of the locks released.", ["task"]),
            ("lost", "Locks lost while their task ran (task-lock-lost events).", ["task"]),
            ("backend_errors", "Lock store unreachable, by policy (task-lock-error events).",
             ["task", "policy"]),
        )
        with self._lock:
            snapshot = {name: dict(values) for name, values in self._counts.items()}
        for name, doc, labels in specs:
            family = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            for values, count in sorted(snapshot.get(name, {}).items()):
                family.add_metric(list(values), count)
            yield family


def register(app: Any, registry: Any = None, **options: Any) -> LockCollector:
    """Register a :class:`LockCollector` for ``app`` (once per app and registry).

    ``registry`` defaults to prometheus_client's default registry (the one Flower serves).
    ``options``: ``cache_s`` (seconds a store read is reused, default 5),
    ``scan_limit`` (keys scanned per server at most, default 100000),
    ``consume_events`` (default True: count the ``task-lock-*`` events).
    """
    from prometheus_client import REGISTRY

    registry = REGISTRY if registry is None else registry
    ident = (id(app), id(registry))
    with _registered_lock:
        collector = _registered.get(ident)
        if collector is None:
            collector = LockCollector(app, **options)
            registry.register(collector)
            _registered[ident] = collector
        return collector
