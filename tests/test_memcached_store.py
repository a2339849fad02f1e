"""The memcached:// store against real ``memcached`` processes.

First each typed operation on one member directly (``member.run([...])``), checked against
the items memcached really holds; then the store as the library opens it
(``open_backend(url_or_list)``): one server, a quorum of three, a member down.

memcached counts expiry in whole seconds, so the tests that wait for a lock to lapse use a
1 s ttl and bound the wait by the documented ``ceil(ttl) + 1`` seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.exceptions import TimeLimitExceeded, WorkerLostError

from tests.memcached_server import MemcachedServer, find_memcached
from tests.servers import RedisServer, wait_until
from tests.workers import CeleryWorker, TaskEnv

pytest.importorskip("pymemcache")
if find_memcached() is None:  # pragma: no cover - CI installs it
    pytest.skip("no memcached binary (apt-get install memcached)", allow_module_level=True)

from celery_singleton_lock.backends import memcached as mc  # noqa: E402
from celery_singleton_lock.backends.base import (  # noqa: E402
    EXTENDED,
    GONE,
    NOT_OWNED,
    Acquire,
    AcquireSlot,
    ClaimRun,
    Extend,
    FixedMetadata,
    Follow,
    ForceRelease,
    Grant,
    Handover,
    LockView,
    Ping,
    RaiseFence,
    Read,
    ReadRuns,
    Release,
    Restore,
)
from celery_singleton_lock.backends.memcached import MemcachedMember  # noqa: E402
from celery_singleton_lock.errors import LockBackendError, LockConfigError  # noqa: E402

FENCE_TTL_MS = 60_000


@pytest.fixture(scope="module")
def server() -> Iterator[MemcachedServer]:
    with MemcachedServer() as s:
        yield s


@pytest.fixture
def mcd(server: MemcachedServer) -> MemcachedServer:
    """The module's server, healed and emptied."""
    server.heal()
    server.flush()
    return server


@pytest.fixture
def member(mcd: MemcachedServer) -> Iterator[MemcachedMember]:
    m = MemcachedMember.from_url(mcd.url, socket_timeout=0.5, setting="singleton_lock_url")
    yield m
    m.close()


def new_key(name: str = "t") -> str:
    return f"csl:{name}:{{{uuid.uuid4().hex}}}"


def raw(server: MemcachedServer, key: str) -> dict[str, Any] | None:
    """The JSON value of lock ``key`` as memcached holds it."""
    client = server.client()
    try:
        value = client.get(mc.stored_key(key))
    finally:
        client.close()
    return None if value is None else json.loads(value)


def acquire(key: str, token: str, ttl_ms: int = 10_000, owner: str = "",
            fence_ttl_ms: int = FENCE_TTL_MS, **fields: Any) -> Acquire:
    meta = (("owner", owner or token),) + tuple(fields.items())
    return Acquire(key, token, ttl_ms, fence_ttl_ms, meta)


# ------------------------------------------------------------------------------------------
# Pure helpers


def test_exptime_never_shorter_than_the_ttl_and_absolute_beyond_30_days() -> None:
    assert mc.exptime(1) == 2
    assert mc.exptime(1000) == 2
    assert mc.exptime(1001) == 3
    assert mc.exptime(30_000) == 31
    far = mc.exptime(31 * 24 * 3600 * 1000)
    assert far > time.time() + 31 * 24 * 3600  # a unix time, as memcached reads it


def test_stored_key_round_trips_and_refuses_overlong_keys() -> None:
    task_key = "csl:proj.tasks.sync:{0123abcd}"
    assert mc.stored_key(task_key) == task_key
    odd = "csl:{reports daily %50 é\n}"
    stored = mc.stored_key(odd)
    assert " " not in stored and "\n" not in stored and stored.isascii()
    assert mc.original_key(stored) == odd
    assert "%:" not in stored
    with pytest.raises(LockBackendError, match="too long"):
        mc.stored_key("csl:{" + "x" * 300 + "}")


def test_urls_are_checked_and_names_are_password_free() -> None:
    with pytest.raises(LockConfigError, match="credentials") as info:
        MemcachedMember.check_urls(["memcached://u:s3cret@h:11211"], "singleton_lock_url")
    assert "s3cret" not in str(info.value)
    with pytest.raises(LockConfigError, match="no path"):
        MemcachedMember.check_urls(["memcached://h:11211/0"], "singleton_lock_url")
    with pytest.raises(LockConfigError, match="twice"):
        MemcachedMember.check_urls(["memcached://h", "memcached://h:11211"], "x")
    MemcachedMember.check_urls(["memcached://a", "memcached://b:1"], "x")
    m = MemcachedMember("::1", 11211)
    assert m.name == "memcached://[::1]:11211"


def test_glob_follows_redis_rules() -> None:
    from celery_singleton_lock.keys import glob_regex

    assert glob_regex(r"csl:t:\{*").fullmatch("csl:t:{ab}")
    assert not glob_regex(r"csl:t:\{*").fullmatch("csl:u:{ab}")
    assert glob_regex("a?c").fullmatch("abc")
    assert glob_regex("a[^x]c").fullmatch("abc") and not glob_regex("a[^b]c").fullmatch("abc")
    assert glob_regex(r"a\*").fullmatch("a*") and not glob_regex(r"a\*").fullmatch("ab")


# ------------------------------------------------------------------------------------------
# Operations on one member


def test_acquire_is_an_add_another_token_is_refused_and_the_holder_refreshes(
        member: MemcachedMember, mcd: MemcachedServer) -> None:
    key = new_key()
    first, second = member.run([acquire(key, "tok-a", owner="task-a", task="t"),
                                acquire(key, "tok-b", owner="task-b")])
    assert isinstance(first, Grant) and first.acquired and first.fence > 0
    assert second == Grant(False, holder="task-a", holder_pttl_ms=second.holder_pttl_ms)
    assert 0 < second.holder_pttl_ms <= 10_000
    item = raw(mcd, key)
    assert item is not None and item["t"] == "tok-a" and item["f"]["owner"] == "task-a"
    # The holder again: its ttl is refreshed, the fence is the one it holds.
    [again] = member.run([acquire(key, "tok-a", ttl_ms=20_000)])
    assert again.acquired and again.fence == first.fence
    [view] = member.run([Read(key)])
    assert 10.0 < view.ttl_s <= 20.0


def test_fence_grows_with_every_acquisition_and_starts_at_server_time(
        member: MemcachedMember) -> None:
    key = new_key()
    fences = []
    before_us = time.time() * 1e6
    for i in range(5):
        [grant, released] = member.run([acquire(key, f"tok-{i}"), Release(key, f"tok-{i}")])
        assert grant.acquired and released is True
        fences.append(grant.fence)
    assert fences == sorted(set(fences))
    # A new counter starts at the server's time in microseconds (seconds from the server).
    assert abs(fences[0] - before_us) < 5e6


def test_a_lock_lapses_between_its_ttl_and_two_seconds_after_and_its_old_holder_never_touches_the_successor(  # noqa: E501
        member: MemcachedMember, mcd: MemcachedServer) -> None:
    key = new_key()
    a0 = time.monotonic()
    [old] = member.run([acquire(key, "old", ttl_ms=1000)])
    a1 = time.monotonic()
    assert old.acquired
    free_at: list[float] = []

    def taken() -> bool:
        r0 = time.monotonic()
        [grant] = member.run([acquire(key, "new", ttl_ms=30_000, owner="successor")])
        if grant.acquired:
            free_at.extend([r0, time.monotonic()])
        return grant.acquired

    wait_until(taken, 5.0, interval_s=0.05, message="the 1 s lock to lapse")
    assert free_at[1] >= a0 + 1.0, "the lock lapsed before its ttl"
    assert free_at[0] <= a1 + 2.0 + 0.5, "the lock outlived ceil(ttl) + 1 s"
    before = raw(mcd, key)
    assert before is not None and before["t"] == "new"
    # The old holder, back from a pause past its ttl: neither renewal nor release touch it.
    assert member.run([Extend(key, "old", 60_000), Release(key, "old"),
                       ForceRelease(key, "old")]) == [NOT_OWNED, False, False]
    assert raw(mcd, key) == before
    [grant] = member.run([acquire(key, "third")])
    assert not grant.acquired and grant.holder == "successor"


def test_fence_grows_after_the_counter_itself_expired(
        member: MemcachedMember, mcd: MemcachedServer) -> None:
    key = new_key()
    [first, _] = member.run([acquire(key, "a", fence_ttl_ms=1000), Release(key, "a")])
    counter = mc._fence_name(key)
    client = mcd.client()
    try:
        wait_until(lambda: client.get(counter) is None, 5.0, interval_s=0.05,
                   message="the fencing counter to expire")
    finally:
        client.close()
    [second] = member.run([acquire(key, "b", fence_ttl_ms=1000)])
    assert second.acquired and second.fence > first.fence


def test_extend_checks_the_owner_and_counts_renewals(
        member: MemcachedMember, mcd: MemcachedServer) -> None:
    key = new_key()
    member.run([acquire(key, "tok", ttl_ms=5000)])
    results = member.run([Extend(key, "tok", 20_000), Extend(key, "other", 20_000),
                          Extend(new_key(), "tok", 20_000), Extend(key, "tok", 20_000, False)])
    assert results == [EXTENDED, NOT_OWNED, GONE, EXTENDED]
    [view] = member.run([Read(key)])
    assert view.fields["renewals"] == "1"
    assert 15.0 < view.ttl_s <= 20.0
    item = raw(mcd, key)
    assert item is not None and item["t"] == "tok"


def test_release_is_compare_and_delete(member: MemcachedMember, mcd: MemcachedServer) -> None:
    key = new_key()
    member.run([acquire(key, "tok")])
    assert member.run([Release(key, "other"), Release(key, "tok"), Release(key, "tok")]) == \
        [False, True, False]
    assert raw(mcd, key) is None
    [grant] = member.run([acquire(key, "next")])
    assert grant.acquired


def test_cas_with_a_negative_expiry_deletes_only_the_version_read(
        mcd: MemcachedServer, request: pytest.FixtureRequest) -> None:
    """The memcached behaviour release relies on: ``cas`` with expiry -1 is a
    compare-and-delete, refused once another client changed the item."""
    client = mcd.client()
    request.addfinalizer(client.close)
    client.set("k", b"first", 60)
    _, cas = client.gets("k")
    client.set("k", b"successor", 60)
    assert client.cas("k", b"", cas, -1) is False
    assert client.get("k") == b"successor"
    _, cas = client.gets("k")
    assert client.cas("k", b"", cas, -1) is True
    assert client.get("k") is None
    assert client.add("k", b"again", 60) is True


def test_read_gives_fields_token_ttl_and_fence(member: MemcachedMember) -> None:
    key = new_key()
    fixed = FixedMetadata([("task", "proj.sync"), ("hostname", "w1"), ("pid", 42)])
    op = Acquire(key, "tok", 8000, FENCE_TTL_MS,
                 (("owner", "task-1"), ("acquired_at", "1700000000.5"), ("ttl", "8.0")), fixed)
    [grant, view, missing] = member.run([op, Read(key), Read(new_key())])
    assert isinstance(view, LockView) and view.held and view.token == "tok"
    assert view.name == member.name
    assert view.fields == {"owner": "task-1", "acquired_at": "1700000000.5", "ttl": "8.0",
                           "task": "proj.sync", "hostname": "w1", "pid": "42"}
    assert 7.0 < view.ttl_s <= 8.0
    assert getattr(view, "fence", grant.fence) == grant.fence
    assert not missing.held and missing.token == ""


def test_slots_hold_up_to_the_limit_and_share_one_counter(
        member: MemcachedMember) -> None:
    key = new_key()
    ops = [AcquireSlot(key, t, ttl, FENCE_TTL_MS, 2, (("owner", t),))
           for t, ttl in (("a", 9000), ("b", 4000), ("c", 9000), ("a", 9000))]
    a, b, c, a_again = member.run(ops)
    assert (a.acquired, a.slot, b.acquired, b.slot) == (True, 0, True, 1)
    assert b.fence > a.fence
    # Full: the holder named is the one whose slot frees first.
    assert not c.acquired and c.holder == "b" and 0 < c.holder_pttl_ms <= 4000
    assert a_again.acquired and a_again.slot == 0
    assert member.run([Release(f"{key}:slot:0", "a")]) == [True]
    [c2] = member.run([AcquireSlot(key, "c", 9000, FENCE_TTL_MS, 2, (("owner", "c"),))])
    assert c2.acquired and c2.slot == 0 and c2.fence > b.fence
    [view] = member.run([Read(f"{key}:slot:0")])
    assert view.token == "c" and getattr(view, "fence", c2.fence) == c2.fence


def test_restore_puts_a_lock_back_only_where_free_and_raises_the_counter(
        member: MemcachedMember) -> None:
    key = new_key()
    fence = int(time.time() * 1e6) + 10**12
    put_back, refused = member.run([
        Restore(key, "tok", 5000, fence, FENCE_TTL_MS, (("owner", "t1"),)),
        Restore(key, "other", 5000, fence + 5, FENCE_TTL_MS, ()),
    ])
    assert (put_back, refused) == (True, False)
    [view] = member.run([Read(key)])
    assert view.token == "tok" and view.fields["owner"] == "t1"
    assert getattr(view, "fence", fence) == fence
    # A raise never lowers; the next acquisition goes beyond it.
    assert member.run([RaiseFence(key, fence - 100, FENCE_TTL_MS),
                       RaiseFence(key, fence + 7, FENCE_TTL_MS),
                       Release(key, "tok"), acquire(key, "next")])[:3] == [True, True, True]
    [view] = member.run([Read(key)])
    assert getattr(view, "fence", fence + 8) == fence + 8


def test_handover_keeps_the_fence_and_swaps_the_token(member: MemcachedMember) -> None:
    key = new_key()
    [grant] = member.run([acquire(key, "enqueue", owner="task-1", mode="until_executed")])
    refused, handed = member.run([
        Handover(key, "wrong", "x", 5000, ()),
        Handover(key, "enqueue", "worker", 9000, (("hostname", "w1"),)),
    ])
    assert refused is None and handed == grant.fence
    [view, old_release] = member.run([Read(key), Release(key, "enqueue")])
    assert view.token == "worker"
    assert view.fields == {"owner": "task-1", "mode": "until_executed", "hostname": "w1"}
    assert old_release is False
    assert member.run([Release(key, "worker")]) == [True]


def test_follow_keeps_one_follow_up_per_held_key(member: MemcachedMember) -> None:
    key = new_key()
    member.run([acquire(key, "tok-1", owner="task-1")])
    assert member.run([Follow(key, "task-2", True, 5000), Follow(key, "task-3", True, 5000),
                       Follow(key, "task-2", True, 5000)]) == \
        [(True, "task-2"), (False, "task-2"), (True, "task-2")]
    # The follow-up took the lock: it waits no more, so another may follow it.
    member.run([Release(key, "tok-1"), acquire(key, "tok-2", owner="task-2")])
    assert member.run([Follow(key, "task-3", True, 5000)]) == [(True, "task-3")]
    assert member.run([Follow(key, "task-9", False), Follow(key, "task-3", False),
                       Follow(key, "task-3", False)]) == \
        [(False, "task-3"), (True, "task-3"), (False, "")]


def test_claim_run_once_per_due_time_and_only_for_the_leader(
        member: MemcachedMember) -> None:
    leader = new_key("beat")
    state = leader + ":schedule"
    member.run([acquire(leader, "leader-tok")])
    results = member.run([
        ClaimRun(leader, "leader-tok", state, "every-minute", 0.0, 100.0),
        ClaimRun(leader, "leader-tok", state, "every-minute", 0.0, 100.0),
        ClaimRun(leader, "leader-tok", state, "every-minute", 100.0, 160.0),
        ClaimRun(leader, "not-leader", state, "every-minute", 160.0, 220.0),
        ClaimRun(leader, "leader-tok", state, "hourly", 0.0, 150.5),
        ReadRuns(state),
    ])
    assert results == [1, 0, 1, -1, 1, {"every-minute": 160.0, "hourly": 150.5}]


def test_force_release_with_and_without_a_token(member: MemcachedMember) -> None:
    key = new_key()
    member.run([acquire(key, "tok")])
    assert member.run([ForceRelease(key, "other"), ForceRelease(key, "tok")]) == [False, True]
    member.run([acquire(key, "tok2")])
    assert member.run([ForceRelease(key), ForceRelease(key), Ping()]) == [True, False, True]


def test_scan_lists_lock_keys_from_metadump(member: MemcachedMember) -> None:
    assert member.can_list is True
    keys = [new_key("proj.a") for _ in range(3)] + [new_key("proj.b")]
    odd = "csl:{daily report 100%}"
    other = "elsewhere:{x}"
    ops: list[Any] = [acquire(k, "tok") for k in (*keys, odd, other)]
    ops += [Follow(keys[0], "task-2", True, 5000), AcquireSlot(new_key("proj.c"), "s",
            5000, FENCE_TTL_MS, 2, ()),
            ClaimRun(keys[1], "tok", keys[1] + ":schedule", "e", 0.0, 1.0)]
    results = member.run(ops)
    assert not any(isinstance(r, BaseException) for r in results)
    listed = member.scan("csl", None, None)
    # Counters, the follow-up and beat's runs are not lock keys; the slot key is.
    slot_keys = [k for k in listed if k.endswith(":slot:0")]
    assert sorted(k for k in listed if not k.endswith(":slot:0")) == sorted([*keys, odd])
    assert len(slot_keys) == 1
    assert sorted(member.scan("csl", r"csl:proj.a:\{*", None)) == sorted(keys[:3])
    assert len(member.scan("csl", None, 2)) == 2
    member.run([Release(keys[0], "tok")])
    assert keys[0] not in member.scan("csl", None, None)


def test_a_server_without_the_lru_crawler_lists_nothing_and_says_why() -> None:
    with MemcachedServer(extra_args=("-o", "no_lru_crawler")) as s:
        m = MemcachedMember.from_url(s.url, socket_timeout=0.5, setting="x")
        try:
            assert m.can_list is False and "list" not in m.capabilities
            with pytest.raises(LockBackendError, match="lru_crawler"):
                m.scan("csl", None, None)
            # Every lock operation still works.
            key = new_key()
            [grant] = m.run([acquire(key, "t")])
            assert grant.acquired
        finally:
            m.close()


# ------------------------------------------------------------------------------------------
# Faults


@pytest.mark.slow
def test_a_killed_or_hung_server_gives_exception_results_and_a_restart_heals() -> None:
    with MemcachedServer() as s:
        m = MemcachedMember.from_url(s.url, socket_timeout=0.3, setting="x")
        key = new_key()
        try:
            [grant] = m.run([acquire(key, "a", ttl_ms=30_000)])
            assert grant.acquired
            s.pause()
            t0 = time.monotonic()
            results = m.run([Extend(key, "a", 30_000), Read(key), Release(key, "a")])
            took = time.monotonic() - t0
            assert all(isinstance(r, LockBackendError) for r in results), results
            assert "timed out" in str(results[0])
            assert took < 0.3 * 2 + 1.0, "one timeout per batch, not one per operation"
            s.resume()
            s.kill()
            results = m.run([acquire(key, "b"), Ping()])
            assert all(isinstance(r, LockBackendError) for r in results), results
            # Restarted empty: the first batch after it works (a pooled connection the
            # restart closed is replaced), and the lock is gone there.
            s.start()
            assert m.run([Extend(key, "a", 30_000), Ping()]) == [GONE, True]
        finally:
            m.close()


def test_a_restart_keeps_the_fence_growing(mcd: MemcachedServer) -> None:
    m = MemcachedMember.from_url(mcd.url, socket_timeout=0.5, setting="x")
    try:
        key = new_key()
        [before] = m.run([acquire(key, "a")])
        mcd.restart()
        [after] = m.run([acquire(key, "b")])
        assert after.acquired and after.fence > before.fence
    finally:
        m.close()


# ------------------------------------------------------------------------------------------
# Through the registry: one server, a quorum of three


def open_store(value: Any, **kwargs: Any) -> Any:
    pytest.importorskip("celery_singleton_lock.backends.quorum")
    from celery_singleton_lock.backends.registry import open_backend

    return open_backend(value, **kwargs)


@pytest.fixture(scope="module")
def three() -> Iterator[list[MemcachedServer]]:
    servers = [MemcachedServer() for _ in range(3)]
    try:
        for s in servers:
            s.start()
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture
def trio(three: list[MemcachedServer]) -> list[MemcachedServer]:
    for s in three:
        s.heal()
        s.flush()
    return three


def test_one_url_opens_a_quorum_of_one(mcd: MemcachedServer) -> None:
    store = open_store(mcd.url, socket_timeout=0.5)
    try:
        assert store.n_masters == 1 and "notify" not in store.capabilities
        assert {"ttl", "limit", "follow", "handover", "beat", "list"} <= store.capabilities
        key = new_key()
        got = store.acquire(key, "tok", 10.0, [("owner", "task-1")])
        assert got.acquired and got.fence > 0 and got.validity_s > 9.0
        dup = store.acquire(key, "tok2", 10.0, [("owner", "task-2")])
        assert not dup.acquired and dup.holder == "task-1"
        assert store.holder(key) == "task-1" and store.owned(key, "tok")
        from celery_singleton_lock.backends.base import Renewal

        assert store.extend_many([Renewal(key, "tok", 20_000), Renewal(key, "nope", 20_000),
                                  Renewal(new_key(), "tok", 20_000)]) == [True, False, False]
        [record] = store.list_locks("csl", pattern=r"csl:t:\{*")
        assert record.key == key and record.task_id == "task-1" and record.renewals == 1
        assert store.release(key, "tok") is True and store.release(key, "tok") is False
        assert store.holder(key) is None
    finally:
        store.close()


def test_wait_released_wakes_within_the_poll_bound(mcd: MemcachedServer) -> None:
    store = open_store(mcd.url, socket_timeout=0.5)
    try:
        key = new_key()
        assert store.acquire(key, "holder", 30.0).acquired
        woke: list[float] = []
        released_at: list[float] = []

        def tried() -> bool:
            got = store.acquire(key, "waiter", 30.0)
            if got.acquired:
                woke.append(time.monotonic())
            return got.acquired

        waiter = threading.Thread(target=lambda: store.wait_released(key, 10.0, tried))
        waiter.start()
        wait_until(lambda: waiter.is_alive(), 2.0)
        time.sleep(0.2)  # let the waiter find the lock held and start polling
        released_at.append(time.monotonic())
        assert store.release(key, "holder")
        waiter.join(10.0)
        assert woke, "the waiter never took the lock"
        # Polled every 50 ms at most: woken well within half a second even on a loaded box.
        assert woke[0] - released_at[0] < 0.5
        assert store.owned(key, "waiter")
    finally:
        store.close()


def test_three_servers_are_a_redlock_quorum(trio: list[MemcachedServer]) -> None:
    store = open_store([s.url for s in trio], socket_timeout=0.3)
    try:
        assert store.n_masters == 3 and store.quorum == 2
        key = new_key()
        got = store.acquire(key, "tok", 10.0, [("owner", "task-1")])
        assert got.acquired
        assert all(raw(s, key)["t"] == "tok" for s in trio)
        from celery_singleton_lock.backends.base import Renewal

        assert store.extend_many([Renewal(key, "tok", 10_000)]) == [True]
        assert not store.acquire(key, "tok2", 10.0).acquired
        [record] = store.list_locks("csl")
        assert record.masters == 3 and record.task_id == "task-1"
        assert store.release(key, "tok")
        assert all(raw(s, key) is None for s in trio)
    finally:
        store.close()
    # A comma-separated string names the same quorum.
    joined = open_store(",".join(s.url for s in trio), socket_timeout=0.3)
    try:
        assert joined.n_masters == 3 and joined.acquire(new_key(), "t", 5.0).acquired
    finally:
        joined.close()


@pytest.mark.slow
def test_one_member_down_of_three_still_acquires_and_a_second_down_refuses(
        trio: list[MemcachedServer]) -> None:
    store = open_store([s.url for s in trio], socket_timeout=0.3)
    try:
        trio[0].kill()
        key = new_key()
        t0 = time.monotonic()
        got = store.acquire(key, "tok", 10.0, [("owner", "task-1")])
        assert got.acquired and not got.backend_down
        assert time.monotonic() - t0 < 1.0
        assert len(got.errors) <= 1
        assert store.release(key, "tok")
        trio[1].pause()
        t0 = time.monotonic()
        down = store.acquire(key, "tok2", 10.0)
        assert not down.acquired and down.backend_down
        assert time.monotonic() - t0 < 0.3 + 1.0, "a hung member costs one socket timeout"
    finally:
        store.close()
        for s in trio:
            s.heal()


def test_fast_members_are_asked_in_turn_and_slow_ones_at_once(
        trio: list[MemcachedServer]) -> None:
    """Members that answer fast run one after the other (a thread switch costs more than the
    round trips it would overlap); once members hang, they are asked in parallel, so three
    hung members cost one timeout a round, not three."""
    store = open_store([s.url for s in trio], socket_timeout=0.4)
    try:
        store.ping()
        assert not any(m.slow() for m in store.members)
        for s in trio:
            s.pause()
        first = store.acquire(new_key(), "tok", 10.0)  # learns that they hang
        assert not first.acquired and first.backend_down
        assert all(m.slow() for m in store.members)
        t0 = time.monotonic()
        got = store.acquire(new_key(), "tok", 10.0)
        took = time.monotonic() - t0
        assert not got.acquired and got.backend_down
        # One timeout for the acquire round, one for the release of what it may have taken.
        assert took < 0.4 * 2 + 0.3, f"{took:.2f} s for three hung members"
    finally:
        for s in trio:
            s.resume()
        store.close()


# ------------------------------------------------------------------------------------------
# Real workers: LockedTask on memcached, released within 1 s of every ending (SPEC 6)

#: The bound every ending must meet.
RELEASE_BOUND_S = 1.0
WORKER_QUEUE = "mc-release"
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


class McTaskEnv(TaskEnv):
    """A :class:`~tests.workers.TaskEnv` whose lock store is one memcached (the base class
    reads locks with Redis clients; this one reads memcached's items)."""

    def __init__(self, app_module: str, lock_server: MemcachedServer) -> None:
        self.app_module = app_module
        self.lock_url = lock_server.url
        self.server = RedisServer().start()
        base = self.server.url.rsplit("/", 1)[0]
        self.broker_url, self.backend_url = f"{base}/0", f"{base}/1"
        self.record_url = f"{base}/2"
        self.records = redis.Redis.from_url(self.record_url, decode_responses=True)
        self.results = redis.Redis.from_url(self.backend_url, decode_responses=True)
        self.workers = []
        self.lock_clients = []
        self.lock_server = lock_server
        self.mc_client = lock_server.client()

    def _get(self, key: str) -> bytes | None:
        """The item of lock ``key`` (a connection a server restart broke is opened again)."""
        from pymemcache.exceptions import MemcacheUnexpectedCloseError

        try:
            value: bytes | None = self.mc_client.get(mc.stored_key(key))
        except (MemcacheUnexpectedCloseError, OSError):
            self.mc_client.close()
            value = self.mc_client.get(mc.stored_key(key))
        return value

    def lock(self, key: str) -> dict[str, Any] | None:
        value = self._get(key)
        return None if value is None else json.loads(value)

    def gone_after(self, key: str, since: float, timeout_s: float = 5.0) -> float:
        """Seconds from ``since`` (wall clock) until ``key`` is seen gone (polled every 5 ms)."""
        deadline = time.monotonic() + timeout_s
        while self._get(key) is not None:
            if time.monotonic() > deadline:
                raise AssertionError(f"lock {key} still held after {timeout_s} s: "
                                     f"{self.lock(key)}\n{self.describe()}")
            time.sleep(0.005)
        return time.time() - since

    def started(self, tag: str, timeout_s: float = 15) -> dict[str, Any]:
        raw_info = self.wait(lambda: self.records.get(f"{tag}:start"), timeout_s,
                             f"{tag} started")
        info: dict[str, Any] = json.loads(raw_info)
        assert info["held"] is True  # the body ran under its lock
        return info

    def recorded(self, tag: str, what: str, timeout_s: float = 15) -> float:
        return float(self.wait(lambda: self.records.get(f"{tag}:{what}"), timeout_s,
                               f"{tag} {what}"))

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.mc_client.close()


@pytest.fixture(scope="module")
def task_env(server: MemcachedServer) -> Iterator[McTaskEnv]:
    from tests.apps import mc_app
    from tests.apps.common import configure

    env = McTaskEnv("tests.apps.mc_app", server)
    configure(mc_app.app, env.broker_url, env.backend_url, server.url)
    try:
        yield env
    finally:
        try:
            env.close()
        finally:
            mc_app.queued.lock_store.close()  # the enqueue locks' store, in this process


@pytest.fixture(scope="module")
def mc_worker(task_env: McTaskEnv) -> Iterator[CeleryWorker]:
    """One prefork worker (2 children) for the endings that leave the worker running."""
    worker = task_env.worker(pool="prefork", concurrency=2, queues=[WORKER_QUEUE])
    try:
        yield worker.start()
    finally:
        task_env.stop_workers([worker])


@pytest.fixture
def app_env(task_env: McTaskEnv, server: MemcachedServer,
            request: pytest.FixtureRequest) -> Iterator[McTaskEnv]:
    """The task environment, its memcached healed; worker logs shown on failure."""
    server.heal()
    yield from _with_logs(task_env, request)


def _with_logs(env: McTaskEnv, request: pytest.FixtureRequest) -> Iterator[McTaskEnv]:
    failed = request.session.testsfailed
    first = len(env.workers)
    yield env
    if request.session.testsfailed > failed:
        sys.stderr.write(env.describe(since=first) + "\n")


def _tag() -> str:
    return f"t-{uuid.uuid4().hex}"


def _within_bound(elapsed: float, what: str) -> None:
    print(f"{what}: released {elapsed * 1000:.0f} ms after the ending")
    assert elapsed <= RELEASE_BOUND_S, f"{what}: released {elapsed:.3f} s after the ending"


@pytest.mark.slow
def test_worker_success_failure_retry_and_until_executed_release_within_1s(
        app_env: McTaskEnv, mc_worker: CeleryWorker) -> None:
    from tests.apps import mc_app

    tag = _tag()
    result = mc_app.ok.apply_async((tag,), queue=WORKER_QUEUE)
    _within_bound(app_env.gone_after(mc_app.ok.lock_key_for(tag),
                                     app_env.recorded(tag, "end")), "success")
    assert result.get(timeout=10) == "ok"

    tag = _tag()
    result = mc_app.boom.apply_async((tag,), queue=WORKER_QUEUE)
    _within_bound(app_env.gone_after(mc_app.boom.lock_key_for(tag),
                                     app_env.recorded(tag, "end")), "failure")
    with pytest.raises(ValueError, match="boom"):
        result.get(timeout=10)

    tag, countdown = _tag(), 1.0
    result = mc_app.retrying.apply_async((tag, countdown), queue=WORKER_QUEUE)
    retried = app_env.recorded(tag, "retry")
    _within_bound(app_env.gone_after(mc_app.retrying.lock_key_for(tag, countdown), retried),
                  "self.retry()")
    assert not app_env.records.exists(f"{tag}:end")  # released before the retry ran
    assert result.get(timeout=15) == 1

    # until_executed: taken at enqueue, handed over to the worker, released at the end.
    tag = _tag()
    result = mc_app.queued.apply_async((tag,), queue=WORKER_QUEUE)
    key = mc_app.queued.lock_key_for(tag)
    _within_bound(app_env.gone_after(key, app_env.recorded(tag, "end")), "until_executed")
    assert result.get(timeout=10) == "ran"


@pytest.mark.slow
def test_worker_revoke_terminate_time_limit_and_killed_child_release_within_1s(
        app_env: McTaskEnv, mc_worker: CeleryWorker) -> None:
    from tests.apps import mc_app

    tag = _tag()
    result = mc_app.sleeper.apply_async((tag, 30.0), queue=WORKER_QUEUE)
    app_env.started(tag)
    key = mc_app.sleeper.lock_key_for(tag, 30.0)
    item = app_env.lock(key)
    assert item is not None and item["f"]["owner"] == result.id
    revoked_at = time.time()
    result.revoke(terminate=True)
    _within_bound(app_env.gone_after(key, revoked_at), "revoke(terminate=True)")
    app_env.wait_ready([result.id], 10)
    assert result.state == "REVOKED"

    tag = _tag()
    result = mc_app.limited.apply_async((tag,), queue=WORKER_QUEUE)
    info = app_env.started(tag)
    # time_limit=1.0 counts from just before the body started: this overstates a little.
    _within_bound(app_env.gone_after(mc_app.limited.lock_key_for(tag), info["time"] + 1.0),
                  "hard time limit")
    app_env.wait_ready([result.id], 10)
    assert isinstance(result.result, TimeLimitExceeded)

    tag = _tag()
    result = mc_app.sleeper.apply_async((tag, 30.0), queue=WORKER_QUEUE)
    info = app_env.started(tag)
    key = mc_app.sleeper.lock_key_for(tag, 30.0)
    item = app_env.lock(key)
    assert item is not None and int(item["f"]["pid"]) == info["pid"]
    assert info["pid"] in mc_worker.child_pids()
    killed_at = time.time()
    os.kill(info["pid"], signal.SIGKILL)
    _within_bound(app_env.gone_after(key, killed_at), "pool child killed")
    app_env.wait_ready([result.id], 10)
    assert isinstance(result.result, WorkerLostError)


@pytest.mark.slow
def test_worker_wait_duplicate_runs_within_the_poll_bound_of_the_release(
        app_env: McTaskEnv, mc_worker: CeleryWorker) -> None:
    """lock_on_duplicate="wait" on memcached: no notification, so the waiting duplicate polls
    (every 50 ms at most) and starts soon after the holder's release."""
    from tests.apps import mc_app

    slot, first, second = _tag(), _tag(), _tag()
    holder = mc_app.waiting.apply_async((slot, first, 1.5), queue=WORKER_QUEUE)
    app_env.started(first)
    waiter = mc_app.waiting.apply_async((slot, second, 0.0), queue=WORKER_QUEUE)
    ended = app_env.recorded(first, "end")
    started = app_env.started(second)["time"]
    print(f"wait: the duplicate started {(started - ended) * 1000:.0f} ms after the holder ended")
    assert started >= ended, "the duplicate ran beside the holder"
    assert started - ended < 0.5
    assert (holder.get(timeout=10), waiter.get(timeout=10)) == (first, second)


@pytest.mark.slow
def test_worker_revoke_before_start_releases_the_enqueue_lock_within_1s(
        app_env: McTaskEnv, mc_worker: CeleryWorker) -> None:
    from tests.apps import mc_app

    tag = _tag()
    key = mc_app.queued.lock_key_for(tag)
    held_queue = f"mc-held-{uuid.uuid4().hex[:8]}"
    result = mc_app.queued.apply_async((tag,), queue=held_queue)
    item = app_env.lock(key)
    assert item is not None and item["f"]["owner"] == result.id  # taken at enqueue
    control = mc_app.app.control
    assert control.revoke(result.id, destination=[mc_worker.hostname], reply=True, timeout=5)
    assert control.add_consumer(held_queue, destination=[mc_worker.hostname], reply=True,
                                timeout=5)
    try:
        text = f"Discarding revoked task: {mc_app.queued.name}[{result.id}]"

        def discarded() -> float | None:
            for line in mc_worker.log_text().splitlines():
                stamp = LOG_TIME.match(line)
                if text in line and stamp:
                    return datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            return None

        at = float(app_env.wait(discarded, 10, "the revoked task discarded"))
        _within_bound(app_env.gone_after(key, at), "revoke before start")
    finally:
        control.cancel_consumer(held_queue, destination=[mc_worker.hostname], reply=True,
                                timeout=5)
    assert not app_env.records.exists(f"{tag}:start")


@pytest.mark.slow
def test_worker_warm_shutdown_finishes_and_releases_and_a_killed_worker_lock_lapses(
        app_env: McTaskEnv) -> None:
    from tests.apps import mc_app

    queue = f"mc-warm-{uuid.uuid4().hex[:8]}"
    warm = app_env.worker(pool="prefork", concurrency=2, queues=[queue])
    doomed = app_env.worker(pool="prefork", concurrency=2, queues=[f"{queue}-doomed"])
    try:
        warm.start()
        doomed.start()
        tag, lost = _tag(), _tag()
        result = mc_app.sleeper.apply_async((tag, 2.0), queue=queue)
        mc_app.sleeper.apply_async((lost, 30.0), queue=f"{queue}-doomed")
        app_env.started(tag)
        app_env.started(lost)
        warm.terminate()
        _within_bound(app_env.gone_after(mc_app.sleeper.lock_key_for(tag, 2.0),
                                         app_env.recorded(tag, "end")), "warm shutdown")
        assert result.get(timeout=10) == "slept"
        assert warm.wait_exit(15) is not None
        # The whole worker killed: renewed while it ran, its lock lapses within the ttl plus
        # memcached's whole-second rounding (stored for ceil(ttl) + 1 s).
        key = mc_app.sleeper.lock_key_for(lost, 30.0)
        app_env.wait(lambda: int((app_env.lock(key) or {"f": {}})["f"].get("renewals", 0))
                     >= 1, 5, "a renewal")
        killed_at = time.time()
        doomed.kill()
        expired = app_env.gone_after(key, killed_at, timeout_s=10)
        print(f"killed worker: lock lapsed {expired * 1000:.0f} ms after the kill")
        assert expired <= mc_app.LOCK_TTL_S + 2.0 + 0.5
    finally:
        app_env.stop_workers([warm, doomed])


@pytest.mark.slow
def test_worker_lock_lost_when_memcached_restarts_under_a_running_body(
        app_env: McTaskEnv, mc_worker: CeleryWorker, server: MemcachedServer) -> None:
    """A restart empties memcached: the holder's next renewal finds its lock gone and, with
    ``lock_on_lost="abort"``, the body gets LockLostError."""
    from tests.apps import mc_app

    tag = _tag()
    result = mc_app.fragile.apply_async((tag, 20.0), queue=WORKER_QUEUE)
    app_env.started(tag)
    restarted_at = time.monotonic()
    server.restart()
    app_env.wait_ready([result.id], 10)
    took = time.monotonic() - restarted_at
    assert result.state == "FAILURE"
    assert type(result.result).__name__ == "LockLostError", result.result
    # Found at the next renewal (every ttl/3), not at the end of the 20 s body.
    assert took < mc_app.LOCK_TTL_S + 2.0


@pytest.mark.slow
def test_real_workers_never_run_two_bodies_of_one_signature_at_once_on_memcached(
        app_env: McTaskEnv, mc_worker: CeleryWorker) -> None:
    """2 workers x 2 prefork children, 100 tasks of one signature: never two bodies at once."""
    from tests.apps import mc_app

    queue = WORKER_QUEUE  # the module's worker and one more
    second = app_env.worker(pool="prefork", concurrency=2, queues=[queue])
    try:
        second.start()
        slot, hold_s, sent = f"slot-{uuid.uuid4().hex}", 0.05, 100
        results = [mc_app.guarded.apply_async((slot, hold_s), queue=queue)
                   for _ in range(sent)]
        ids = [r.id for r in results]
        states = app_env.wait_ready(ids, 90)
        assert int(app_env.records.get(f"{slot}:max") or 0) == 1
        ran, rejected = states.count("SUCCESS"), states.count("REVOKED")
        assert ran + rejected == sent and ran >= 1 and rejected >= 1
        assert app_env.records.llen(f"{slot}:runs") == ran
        pids = {r.result for r, s in zip(results, states, strict=True) if s == "SUCCESS"}
        print(f"memcached dedup: {ran} ran, {rejected} rejected, bodies in {len(pids)} children")
        app_env.gone_after(mc_app.guarded.lock_key_for(slot, hold_s), time.time())
    finally:
        app_env.stop_workers([second])


@pytest.mark.slow
@pytest.mark.parametrize("crawler", [True, False], ids=["metadump", "no_lru_crawler"])
def test_celery_locks_list_on_memcached(crawler: bool) -> None:
    """``celery locks list`` lists memcached's locks through metadump; on a server without
    the LRU crawler it exits with an error naming the server and why, and ``locks show``
    still reads the one key."""
    import subprocess

    extra = () if crawler else ("-o", "no_lru_crawler")
    key = "csl:mc.sleeper:{cli}"
    with MemcachedServer(extra_args=extra) as s:
        store = open_store(s.url, socket_timeout=0.5)
        try:
            assert store.acquire(key, "tok", 30.0, [("owner", "task-1"), ("task", "mc.sleeper"),
                                                    ("hostname", "w1"), ("pid", 12)]).acquired
            env = dict(os.environ, CSL_TEST_LOCK_URL=s.url, CSL_TEST_BROKER="memory://",
                       PYTHONPATH=str(Path(__file__).resolve().parent.parent))

            def cli(*args: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [sys.executable, "-m", "celery", "-A", "tests.apps.mc_app", "locks", *args],
                    env=env, capture_output=True, text=True, timeout=60)

            listed = cli("list", "--json")
            shown = cli("show", key)
        finally:
            store.close()
    assert shown.returncode == 0 and "task-1" in shown.stdout
    if crawler:
        assert listed.returncode == 0, listed.stderr
        [row] = json.loads(listed.stdout)
        assert (row["key"], row["task_id"], row["masters"]) == (key, "task-1", 1)
    else:
        assert listed.returncode != 0
        assert f"cannot list the locks on {s.url}: it has no lru_crawler metadump" in \
            listed.stderr


_STOPPED_HOLDER = r"""
import sys
from celery_singleton_lock import Redlock

lock = Redlock(sys.argv[2], url=sys.argv[1], ttl=1.0)
assert lock.acquire(blocking=False)
print(lock.key, lock.fencing_token, flush=True)
sys.stdin.readline()          # stopped here (SIGSTOP) past its ttl
print(lock.owned(), lock.extend(), lock.release(), flush=True)
"""


@pytest.mark.slow
def test_a_holder_stopped_past_its_ttl_never_removes_its_successors_lock(
        mcd: MemcachedServer, tmp_path: Path) -> None:
    """A process holding a 1 s lock is frozen (SIGSTOP) until another takes the lapsed lock;
    thawed, it finds the lock not its own and neither renews nor removes the successor's."""
    import subprocess

    from celery_singleton_lock import Redlock

    name = f"stopped-{uuid.uuid4().hex}"
    script = tmp_path / "holder.py"
    script.write_text(_STOPPED_HOLDER)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    holder = subprocess.Popen([sys.executable, str(script), mcd.url, name], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        key, fence = holder.stdout.readline().split()
        os.kill(holder.pid, signal.SIGSTOP)
        store = open_store(mcd.url, socket_timeout=0.5)
        successor = Redlock(name, store=store, ttl=30.0)
        wait_until(lambda: successor.acquire(blocking=False), 5.0, interval_s=0.05,
                   message="the frozen holder's lock to lapse")
        assert successor.fencing_token > int(fence)
        before = raw(mcd, key)
        os.kill(holder.pid, signal.SIGCONT)
        holder.stdin.write("go\n")
        holder.stdin.flush()
        owned, extended, released = holder.stdout.readline().split()
        assert (owned, extended, released) == ("False", "False", "False")
        assert raw(mcd, key) == before and successor.owned()
        assert successor.release()
        store.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(holder.pid, signal.SIGCONT)
        holder.kill()
        holder.wait(10)
        for stream in (holder.stdin, holder.stdout):
            if stream is not None:
                stream.close()


def test_threads_sharing_one_quorum_store_never_hold_one_key_at_once(
        trio: list[MemcachedServer]) -> None:
    """One store object, used by 6 threads at once on one key of a 3-server quorum: never two
    holders, and the fencing tokens seen inside grow with every acquisition."""
    store = open_store([s.url for s in trio], socket_timeout=0.5)
    key = new_key()
    inside = 0
    top = 0
    fences: list[int] = []
    errors: list[BaseException] = []
    guard = threading.Lock()

    def worker(n: int) -> None:
        nonlocal inside, top
        try:
            for i in range(40):
                tok = f"{n}-{i}"
                got = store.acquire(key, tok, 10.0, [("owner", tok)])
                if not got.acquired:
                    continue
                with guard:
                    inside += 1
                    top = max(top, inside)
                    fences.append(got.fence)
                time.sleep(0.001)
                with guard:
                    inside -= 1
                assert store.release(key, tok)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        store.close()
    assert not errors, errors
    assert top == 1 and len(fences) >= 6
    assert fences == sorted(set(fences))


def test_a_lock_memcached_evicts_is_reported_lost_at_the_next_renewal() -> None:
    """Under memory pressure memcached evicts by LRU, a held lock too: the renewal finds it
    gone and the holder hears of it (``on_lost``, which LockedTask turns into
    ``lock_on_lost``)."""
    from celery_singleton_lock import Redlock

    with MemcachedServer(memory_mb=2) as s:
        lost = threading.Event()
        store = open_store(s.url, socket_timeout=0.5)
        lock = Redlock(f"evicted-{uuid.uuid4().hex}", store=store, ttl=3.0, renew=True,
                       on_lost=lambda lease: lost.set())
        assert lock.acquire(blocking=False)
        try:
            client = s.client()
            try:
                # Items of the lock's own size (memcached evicts within a slab class), far
                # more than 2 MB holds, faster than the renewal (every ttl/3) writes it anew.
                # Reading the lock meanwhile would keep it (an item read twice is bumped).
                stored = mc.stored_key(lock.key)
                size = len(client.get(stored))
                for n in range(0, 60_000, 1000):
                    client.set_many({f"{n + i:0{len(stored)}d}": b"v" * size
                                     for i in range(1000)}, expire=0, noreply=False)
                assert client.stats()[b"evictions"] > 0
                assert client.get(mc.stored_key(lock.key)) is None, "the lock was not evicted"
            finally:
                client.close()
            assert lost.wait(3.0 / 3 + 2.0), "the renewal did not report the lost lock"
            assert not lock.owned()
        finally:
            assert lock.release() is False
            store.close()


def test_a_forked_child_opens_its_own_connections(trio: list[MemcachedServer]) -> None:
    """After a fork the child never uses (or closes) the parent's sockets: it opens its own,
    and the parent's go on working."""
    store = open_store([s.url for s in trio], socket_timeout=0.5)
    try:
        key = new_key()
        assert store.acquire(key, "parent", 30.0).acquired
        parent_ports = {c.sock.getsockname()[1] for m in store.members
                        for c in m._pool._idle if c.sock is not None}
        assert len(parent_ports) >= 3
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: renew through the same store object, report, go
            code = 1
            try:
                ok = store.extend(key, "parent", 30.0) is True
                ports = {c.sock.getsockname()[1] for m in store.members
                         for c in m._pool._idle if c.sock is not None}
                os.write(write_end, json.dumps(sorted(ports)).encode())
                code = 0 if ok else 2
            finally:
                os._exit(code)
        os.close(write_end)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read_end) as pipe:
            child_ports = set(json.loads(pipe.read() or "[]"))
        assert os.waitstatus_to_exitcode(status) == 0
        assert child_ports and not child_ports & parent_ports
        assert store.extend(key, "parent", 30.0) is True and store.release(key, "parent")
    finally:
        store.close()


@pytest.mark.slow
def test_servers_restarted_one_at_a_time_never_leave_the_holder_short_of_a_quorum(
        trio: list[MemcachedServer]) -> None:
    """SPEC 7 on memcached: each restart empties one server; the next renewal puts the lock
    back there (Restore), so the holder keeps a quorum and a duplicate never gets one."""
    from celery_singleton_lock import Redlock

    urls = [s.url for s in trio]
    ttl = 3.0
    name = f"restarts-{uuid.uuid4().hex}"
    stores = [open_store(urls, socket_timeout=0.5) for _ in range(2)]
    holder = Redlock(name, store=stores[0], ttl=ttl, renew=True)
    assert holder.acquire(blocking=False)
    duplicate = Redlock(name, store=stores[1], ttl=ttl)
    try:
        fence = holder.fencing_token
        for server in trio:
            server.restart()
            assert raw(server, holder.key) is None
            # Back on the restarted server within a renewal (every ttl/3), token and all.
            wait_until(lambda s=server: (raw(s, holder.key) or {}).get("t") == holder.token,
                       ttl / 3 + 2.0, interval_s=0.05, message=f"the lock back on {server.url}")
            assert not duplicate.acquire(blocking=False)
        assert holder.owned()
        # Each server's counter was raised to the holder's fence: the next one is larger.
        assert holder.release()
        assert duplicate.acquire(blocking=False) and duplicate.fencing_token > fence
    finally:
        holder.release()
        duplicate.release()
        for store in stores:
            store.close()


def test_a_server_without_cas_is_refused() -> None:
    """``memcached -C`` gives every item version 0: no owner check could hold, so the store
    refuses it when opened, and an operation that meets it says why."""
    with MemcachedServer(extra_args=("-C",)) as s:
        with pytest.raises(LockConfigError, match=r"CAS disabled \(-C\)") as info:
            open_store(s.url, socket_timeout=0.5)
        assert info.value.setting == "singleton_lock_url"
        member = MemcachedMember("127.0.0.1", s.port, socket_timeout=0.5)  # never probed
        try:
            key = new_key()
            grant, release = member.run([acquire(key, "tok"), Release(key, "tok")])
            assert grant.acquired  # add needs no CAS
            assert isinstance(release, LockBackendError) and "CAS disabled" in str(release)
            assert raw(s, key) is not None
        finally:
            member.close()


def test_with_dash_m_memcached_refuses_new_items_instead_of_evicting_a_held_lock() -> None:
    """``memcached -M`` answers "out of memory" instead of evicting: a flood that would have
    evicted the lock (see the test above) is refused and the holder keeps its lock."""
    from pymemcache.exceptions import MemcacheServerError

    with MemcachedServer(memory_mb=2, extra_args=("-M",)) as s:
        member = MemcachedMember.from_url(s.url, socket_timeout=0.5, setting="x")
        client = s.client()
        try:
            key = new_key()
            [grant] = member.run([acquire(key, "tok", ttl_ms=30_000)])
            assert grant.acquired
            stored = mc.stored_key(key)
            size = len(client.get(stored))
            with pytest.raises(MemcacheServerError, match="out of memory"):
                for n in range(0, 60_000, 1000):
                    client.set_many({f"{n + i:0{len(stored)}d}": b"v" * size
                                     for i in range(1000)}, expire=0, noreply=False)
            assert client.stats()[b"evictions"] == 0
            [view] = member.run([Read(key)])
            assert view.held and view.token == "tok"
        finally:
            client.close()
            member.close()
