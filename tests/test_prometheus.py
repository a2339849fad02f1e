"""``celery_singleton_lock.prometheus``: the collector against real Redis servers and real events.

Locks are taken through the library; events are published on a real broker and consumed by the
collector's own receiver thread. Flower serving the collector is in ``test_flower.py``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from celery_singleton_lock import events
from celery_singleton_lock.keys import format_key
from celery_singleton_lock.lock import Redlock
from celery_singleton_lock.prometheus import LockCollector, register
from tests.servers import RedisServer, free_port, wait_until


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``registry`` as ``{(name, sorted labels): value}``."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return samples(registry).get((name, tuple(sorted(labels.items()))))


def held(url: Any, task: str, n: int) -> list[Redlock]:
    locks = []
    for i in range(n):
        lock = Redlock(task, url=url, key=format_key("csl", task, f"{uuid.uuid4()}-{i}"),
                       ttl=60, metadata={"task": task})
        assert lock.acquire(blocking=False)
        locks.append(lock)
    return locks


def make_app(broker: str, lock_url: Any) -> Celery:
    app = Celery(f"prom-{uuid.uuid4().hex[:6]}", broker=broker, set_as_current=False)
    app.conf.singleton_lock_url = lock_url
    return app


@pytest.fixture
def collectors() -> Iterator[Callable[..., tuple[LockCollector, CollectorRegistry]]]:
    made: list[LockCollector] = []

    def make(app: Celery, **options: Any) -> tuple[LockCollector, CollectorRegistry]:
        registry = CollectorRegistry()
        options.setdefault("consume_events", False)
        collector = register(app, registry, **options)
        made.append(collector)
        return collector, registry

    yield make
    for collector in made:
        collector.close()


def test_locks_held_per_task_read_from_the_store(
    redis_server: RedisServer, collectors: Callable[..., Any]
) -> None:
    held(redis_server.url, "tasks.a", 3)
    held(redis_server.url, "tasks.b", 1)
    standalone = Redlock("reports:daily", url=redis_server.url, ttl=60)
    assert standalone.acquire(blocking=False)
    _, registry = collectors(make_app(redis_server.url, redis_server.url))
    assert value(registry, "celery_singleton_lock_locks_held", task="tasks.a") == 3
    assert value(registry, "celery_singleton_lock_locks_held", task="tasks.b") == 1
    assert value(registry, "celery_singleton_lock_locks_held", task="") == 1
    assert value(registry, "celery_singleton_lock_store_up") == 1
    assert value(registry, "celery_singleton_lock_scan_truncated") == 0
    names = {name for name, _ in samples(registry)}
    assert names and all(n.startswith("celery_singleton_lock_") for n in names)


def test_store_reads_are_cached_and_bounded(
    redis_server: RedisServer, collectors: Callable[..., Any]
) -> None:
    held(redis_server.url, "tasks.c", 5)
    collector, registry = collectors(make_app(redis_server.url, redis_server.url),
                                     cache_s=30.0, scan_limit=3)
    assert value(registry, "celery_singleton_lock_locks_held", task="tasks.c") == 3
    assert value(registry, "celery_singleton_lock_scan_truncated") == 1
    client = redis_server.client()
    client.config_resetstat()
    generate_latest(registry)  # within cache_s: no read at all
    assert "cmdstat_scan" not in client.info("commandstats")
    collector.scan_limit = 100
    collector.refresh(force=True)
    assert value(registry, "celery_singleton_lock_locks_held", task="tasks.c") == 5
    assert value(registry, "celery_singleton_lock_scan_truncated") == 0
    assert "cmdstat_keys" not in client.info("commandstats")


def test_redlock_lock_counts_once_it_stands_on_a_quorum(
    redis_masters: Callable[..., list[RedisServer]], collectors: Callable[..., Any]
) -> None:
    masters = redis_masters(3)
    urls = [m.url for m in masters]
    locks = held(urls, "tasks.r", 3)
    masters[2].client().delete(locks[0].key)  # 2 of 3: still held
    masters[1].client().delete(locks[1].key)
    masters[2].client().delete(locks[1].key)  # 1 of 3: not held
    _, registry = collectors(make_app(masters[0].url, urls))
    assert value(registry, "celery_singleton_lock_locks_held", task="tasks.r") == 2


def test_an_unreachable_store_reports_down_without_failing_the_scrape(
    collectors: Callable[..., Any]
) -> None:
    url = f"redis://:secret-pw@127.0.0.1:{free_port()}/0"
    _, registry = collectors(make_app(url, url))
    assert value(registry, "celery_singleton_lock_store_up") == 0
    assert "secret-pw" not in generate_latest(registry).decode()


def test_register_defaults_to_the_default_registry_once_per_app(redis_server: RedisServer
                                                                ) -> None:
    from prometheus_client import REGISTRY

    app = make_app(redis_server.url, redis_server.url)
    collector = register(app, consume_events=False)
    try:
        assert register(app) is collector
        assert REGISTRY.get_sample_value("celery_singleton_lock_store_up") == 1
    finally:
        REGISTRY.unregister(collector)
        collector.close()


def test_counters_come_from_lock_events(redis_server: RedisServer,
                                        collectors: Callable[..., Any]) -> None:
    app = make_app(redis_server.url, redis_server.url)
    _, registry = collectors(app, consume_events=True)
    previous = events._gate_value()
    events._set_gate(events._ON)

    def send(type_: str, **fields: Any) -> None:
        events.send(app, type_, "csl:tasks.e:{x}", hostname="w1@test", name="tasks.e",
                    **fields)

    def listening() -> float | None:
        events.send(app, events.ACQUIRED, "csl:warm.up:{x}", hostname="w1@test",
                    name="warm.up")
        return value(registry, "celery_singleton_lock_acquisitions_total", task="warm.up")

    try:
        wait_until(listening, 10, interval_s=0.1, message="the collector's receiver")
        send(events.ACQUIRED, task_id="t1")
        send(events.DUPLICATE, task_id="t2", holder_id="t1", policy="reject")
        send(events.DUPLICATE, task_id="t3", holder_id="t1", policy="requeue")
        send(events.RELEASED, task_id="t1", reason="success", renewals=4)
        send(events.LOST, task_id="t4", reason="gone")
        send(events.ERROR, task_id="t5", policy="requeue", error="down")
        wait_until(lambda: value(registry, "celery_singleton_lock_backend_errors_total",
                                 task="tasks.e", policy="requeue"), 10,
                   message="every event counted")
    finally:
        events._set_gate(previous)
    time.sleep(0.2)
    metric = "celery_singleton_lock_"
    assert value(registry, metric + "acquisitions_total", task="tasks.e") == 1
    assert value(registry, metric + "duplicates_total", task="tasks.e", policy="reject") == 1
    assert value(registry, metric + "duplicates_total", task="tasks.e", policy="requeue") == 1
    assert value(registry, metric + "releases_total", task="tasks.e", reason="success") == 1
    assert value(registry, metric + "renewals_total", task="tasks.e") == 4
    assert value(registry, metric + "lost_total", task="tasks.e") == 1
