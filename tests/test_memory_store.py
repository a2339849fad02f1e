"""The in-memory quorum member (``memory://``), operation by operation, on a ManualClock.

Each operation is checked against what the Redis store's script of the same name does
(``backends/redis/lua/*.lua``); the black-box suite over every store is
``tests/test_store_contract.py``.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import uuid
import warnings
from collections.abc import Iterator

import pytest

from celery_singleton_lock.backends.base import (
    EXTENDED,
    GONE,
    NOT_OWNED,
    Acquire,
    AcquireSlot,
    Capability,
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
from celery_singleton_lock.backends.memory import ManualClock, MemoryMember, memory_store
from celery_singleton_lock.backends.registry import backend_class
from celery_singleton_lock.errors import LockConfigError
from celery_singleton_lock.keys import glob_regex, slot_base

FENCE_TTL_MS = 60_000


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1000.0)


@pytest.fixture
def member(clock: ManualClock) -> MemoryMember:
    return MemoryMember(clock=clock)


def _key() -> str:
    return f"csl:test:{{{uuid.uuid4().hex}}}"


def acquire(member: MemoryMember, key: str, token: str, ttl_ms: int = 1000,
            metadata: tuple[tuple[str, object], ...] = (), fixed: FixedMetadata | None = None,
            fence_ttl_ms: int = FENCE_TTL_MS) -> Grant:
    return member.run([Acquire(key, token, ttl_ms, fence_ttl_ms, metadata, fixed)])[0]


def one(member: MemoryMember, op: object) -> object:
    return member.run([op])[0]  # type: ignore[list-item]


def readable(sub: object, timeout_s: float = 0.0) -> bool:
    ready, _, _ = select.select([sub.fileno()], [], [], timeout_s)  # type: ignore[attr-defined]
    return bool(ready)


# -- acquire --------------------------------------------------------------------------------


def test_acquire_a_free_key_starts_its_counter_at_the_clock_in_microseconds(
        member: MemoryMember, clock: ManualClock) -> None:
    key = _key()
    grant = acquire(member, key, "t1", metadata=(("owner", "task-1"), ("pid", 42)))
    assert grant == Grant(True, 1_000_000_000)
    view = one(member, Read(key))
    assert isinstance(view, LockView)
    assert (view.held, view.token, view.ttl_s, view.fence) == (True, "t1", 1.0, 1_000_000_000)
    assert view.fields == {"owner": "task-1", "pid": "42"}  # text, and never the token


def test_a_clock_at_zero_still_gives_a_positive_fence() -> None:
    member = MemoryMember(clock=ManualClock(0.0))
    assert acquire(member, _key(), "t1").fence == 1


def test_a_second_token_is_refused_with_the_holder_and_its_remaining_ttl(
        member: MemoryMember, clock: ManualClock) -> None:
    key = _key()
    acquire(member, key, "t1", ttl_ms=2000, metadata=(("owner", "task-1"),))
    clock.advance(0.5)
    assert acquire(member, key, "t2") == Grant(False, holder="task-1", holder_pttl_ms=1500)
    assert one(member, Read(key)).token == "t1"  # type: ignore[attr-defined]


def test_a_holder_without_owner_field_is_reported_as_empty(member: MemoryMember) -> None:
    key = _key()
    acquire(member, key, "t1")
    assert acquire(member, key, "t2").holder == ""


def test_acquire_again_with_the_same_token_refreshes_the_ttl_and_keeps_the_fence(
        member: MemoryMember, clock: ManualClock) -> None:
    key = _key()
    first = acquire(member, key, "t1", metadata=(("owner", "a"),))
    clock.advance(0.9)
    again = acquire(member, key, "t1", ttl_ms=5000, metadata=(("owner", "b"),))
    assert again == Grant(True, first.fence)
    view = one(member, Read(key))
    assert view.ttl_s == pytest.approx(5.0)  # type: ignore[attr-defined]
    assert view.fields["owner"] == "a"  # type: ignore[attr-defined]  # as acquire.lua: kept


def test_fixed_metadata_is_written_after_the_per_call_pairs(member: MemoryMember) -> None:
    key = _key()
    fixed = FixedMetadata([("task", "proj.sync"), ("hostname", "w1"), ("pid", 7)])
    acquire(member, key, "t1", metadata=(("owner", "id-1"), ("ttl", 1.5)), fixed=fixed)
    assert one(member, Read(key)).fields == {  # type: ignore[attr-defined]
        "owner": "id-1", "ttl": "1.5", "task": "proj.sync", "hostname": "w1", "pid": "7"}
    acquire(member, _key(), "t2", fixed=fixed)  # the cached encoding is reused
    assert "memory" in fixed.cache


def test_a_lock_lapses_exactly_ttl_after_its_acquisition(
        member: MemoryMember, clock: ManualClock) -> None:
    key = _key()
    acquire(member, key, "t1", ttl_ms=1000)
    clock.advance(0.999)
    assert one(member, Read(key)).held  # type: ignore[attr-defined]
    clock.advance(0.001)
    assert one(member, Read(key)) == LockView(member.name, False, fence=1_000_000_000)
    assert acquire(member, key, "t2").acquired


def test_fences_grow_over_release_expiry_and_an_expired_counter(
        member: MemoryMember, clock: ManualClock) -> None:
    key = _key()
    fences = [acquire(member, key, "t1").fence]
    assert one(member, Release(key, "t1")) is True
    fences.append(acquire(member, key, "t2").fence)
    clock.advance(1.0)  # t2's lock lapses
    fences.append(acquire(member, key, "t3", fence_ttl_ms=2000).fence)
    assert fences[1:] == [fences[0] + 1, fences[0] + 2]
    one(member, Release(key, "t3"))
    clock.advance(2.0)  # the counter itself lapses: it starts again from the clock
    fences.append(acquire(member, key, "t4").fence)
    assert fences[3] == 1003 * 1_000_000 > fences[2]


def test_every_acquisition_gives_the_counter_fence_ttl_more(
        member: MemoryMember, clock: ManualClock) -> None:
    key = _key()
    first = acquire(member, key, "t1", ttl_ms=100, fence_ttl_ms=1000).fence
    for _ in range(3):
        clock.advance(0.6)  # past the lock's ttl, not past the counter's last lifetime
        assert acquire(member, key, uuid.uuid4().hex, ttl_ms=100, fence_ttl_ms=1000).acquired
    assert one(member, Read(key)).fence == first + 3  # type: ignore[attr-defined]


# -- release, extend -------------------------------------------------------------------------


def test_release_is_owner_checked(member: MemoryMember) -> None:
    key = _key()
    acquire(member, key, "t1")
    assert member.run([Release(key, "t2"), Read(key)])[0] is False
    assert one(member, Read(key)).held  # type: ignore[attr-defined]
    assert one(member, Release(key, "t1")) is True
    assert one(member, Release(key, "t1")) is False
    assert one(member, Release(_key(), "t1")) is False


def test_extend_answers_extended_not_owned_or_gone_and_counts_renewals(
        member: MemoryMember, clock: ManualClock) -> None:
    key = _key()
    acquire(member, key, "t1", ttl_ms=1000)
    clock.advance(0.8)
    assert one(member, Extend(key, "t1", 3000)) == EXTENDED
    assert one(member, Extend(key, "t1", 3000, count=False)) == EXTENDED
    assert one(member, Extend(key, "t2", 3000)) == NOT_OWNED
    view = one(member, Read(key))
    assert view.ttl_s == pytest.approx(3.0)  # type: ignore[attr-defined]
    assert view.fields["renewals"] == "1"  # type: ignore[attr-defined]
    clock.advance(3.0)
    assert one(member, Extend(key, "t1", 3000)) == GONE


# -- restore, raise_fence, handover ----------------------------------------------------------


def test_restore_puts_a_lock_back_only_where_the_key_is_free_and_raises_the_counter(
        member: MemoryMember) -> None:
    key = _key()
    meta = (("owner", "task-1"), ("task", "t"))
    assert one(member, Restore(key, "t1", 2000, 5_000_000_000, FENCE_TTL_MS, meta)) is True
    view = one(member, Read(key))
    assert (view.token, view.ttl_s, view.fence) == ("t1", 2.0, 5_000_000_000)  # type: ignore
    assert view.fields == dict(meta)  # type: ignore[attr-defined]
    assert one(member, Restore(key, "t2", 2000, 9_000_000_000, FENCE_TTL_MS)) is False
    assert one(member, Read(key)).token == "t1"  # type: ignore[attr-defined]
    one(member, Release(key, "t1"))
    assert acquire(member, key, "t3").fence == 5_000_000_001


def test_restore_never_lowers_the_counter(member: MemoryMember) -> None:
    key = _key()
    fence = acquire(member, key, "t1").fence
    one(member, Release(key, "t1"))
    assert one(member, Restore(key, "t1", 1000, 5, FENCE_TTL_MS)) is True
    one(member, Release(key, "t1"))
    assert acquire(member, key, "t2").fence == fence + 1


def test_raise_fence_raises_and_never_lowers(member: MemoryMember) -> None:
    key = _key()
    fence = acquire(member, key, "t1").fence
    assert one(member, RaiseFence(key, fence - 10, FENCE_TTL_MS)) is True
    assert one(member, Read(key)).fence == fence  # type: ignore[attr-defined]
    assert one(member, RaiseFence(key, fence + 10, FENCE_TTL_MS)) is True
    one(member, Release(key, "t1"))
    assert acquire(member, key, "t2").fence == fence + 11
    other = _key()
    assert one(member, RaiseFence(other, 77, FENCE_TTL_MS)) is True  # no counter yet
    assert acquire(member, other, "t").fence == 78


def test_handover_moves_the_lock_to_the_new_token_and_keeps_its_fence(
        member: MemoryMember, clock: ManualClock) -> None:
    key = _key()
    fence = acquire(member, key, "enqueue", ttl_ms=1000,
                    metadata=(("owner", "id-1"), ("mode", "until_executed"))).fence
    assert one(member, Handover(key, "other", "worker", 5000)) is None
    clock.advance(0.9)
    assert one(member, Handover(key, "enqueue", "worker", 5000,
                                (("hostname", "w1"), ("mode", "running")))) == fence
    view = one(member, Read(key))
    assert (view.token, view.ttl_s) == ("worker", 5.0)  # type: ignore[attr-defined]
    assert view.fields == {"owner": "id-1", "mode": "running",  # type: ignore[attr-defined]
                           "hostname": "w1"}
    assert one(member, Release(key, "enqueue")) is False
    assert one(member, Release(key, "worker")) is True


# -- slots -----------------------------------------------------------------------------------


def test_acquire_slot_gives_distinct_slots_sharing_the_key_counter(
        member: MemoryMember, clock: ManualClock) -> None:
    key = _key()
    grants = []
    for i, token in enumerate(["a", "b", "c"]):
        grants.append(one(member, AcquireSlot(key, token, 1000 + 100 * i, FENCE_TTL_MS, 3,
                                              (("owner", f"id-{token}"),))))
    assert [g.slot for g in grants] == [0, 1, 2]  # type: ignore[attr-defined]
    fences = [g.fence for g in grants]  # type: ignore[attr-defined]
    assert fences == [fences[0], fences[0] + 1, fences[0] + 2]
    # Every slot is taken: refused, naming the holder whose slot frees first.
    assert one(member, AcquireSlot(key, "d", 1000, FENCE_TTL_MS, 3)) == \
        Grant(False, holder="id-a", holder_pttl_ms=1000)
    # The same token again: its own slot, refreshed.
    clock.advance(0.5)
    assert one(member, AcquireSlot(key, "b", 4000, FENCE_TTL_MS, 3)) == \
        Grant(True, fences[2], slot=1)
    assert one(member, Read(f"{key}:slot:1")).ttl_s == pytest.approx(4.0)  # type: ignore
    # A released slot is the next one taken.
    assert one(member, Release(f"{key}:slot:1", "b")) is True
    assert one(member, AcquireSlot(key, "d", 1000, FENCE_TTL_MS, 3)) == \
        Grant(True, fences[2] + 1, slot=1)
    # A plain acquire of the key shares the counter too.
    assert acquire(member, key, "e").fence == fences[2] + 2


def test_slot_base_strips_a_slot_suffix_after_the_hash_tag_only() -> None:
    assert slot_base("csl:t:{abc}:slot:12") == "csl:t:{abc}"
    assert slot_base("csl:t:{abc}") == "csl:t:{abc}"
    assert slot_base("csl:{name}:slot:x") == "csl:{name}:slot:x"
    assert slot_base("plain:slot:3") == "plain:slot:3"


# -- follow-ups ------------------------------------------------------------------------------


def test_follow_keeps_one_follow_up_until_it_holds_the_lock_or_drops(
        member: MemoryMember, clock: ManualClock) -> None:
    key = _key()
    acquire(member, key, "t-holder", metadata=(("owner", "holder"),), ttl_ms=10_000)
    assert one(member, Follow(key, "f1", True, 2000)) == (True, "f1")
    assert one(member, Follow(key, "f1", True, 2000)) == (True, "f1")  # refreshed
    assert one(member, Follow(key, "f2", True, 2000)) == (False, "f1")
    assert one(member, Follow(key, "f2", False)) == (False, "f1")
    # f1 takes the lock: it waits no more, so another may follow it.
    one(member, Release(key, "t-holder"))
    acquire(member, key, "t-f1", metadata=(("owner", "f1"),), ttl_ms=10_000)
    assert one(member, Follow(key, "f2", True, 2000)) == (True, "f2")
    assert one(member, Follow(key, "f2", False)) == (True, "f2")
    assert one(member, Follow(key, "f2", False)) == (False, "")
    # A follow-up lapses after its ttl.
    assert one(member, Follow(key, "f3", True, 1000)) == (True, "f3")
    clock.advance(1.0)
    assert one(member, Follow(key, "f4", True, 1000)) == (True, "f4")


def test_follow_keys_are_not_locks(member: MemoryMember) -> None:
    key = _key()
    one(member, Follow(key, "f1", True, 2000))
    assert one(member, Read(key)).held is False  # type: ignore[attr-defined]
    assert member.scan("csl", None, None) == []


# -- beat ------------------------------------------------------------------------------------


def test_claim_run_only_for_the_leader_and_once_per_due_time(member: MemoryMember) -> None:
    lock, state = _key(), _key()
    acquire(member, lock, "leader", ttl_ms=10_000)
    assert one(member, ClaimRun(lock, "other", state, "e1", 0.0, 100.0)) == -1
    assert one(member, ClaimRun(lock, "leader", state, "e1", 0.0, 100.0)) == 1
    # Another leader that saw the previous run as 0.0 would send it again: refused.
    assert one(member, ClaimRun(lock, "leader", state, "e1", 0.0, 100.2)) == 0
    assert one(member, ClaimRun(lock, "leader", state, "e1", 100.0, 160.0)) == 1
    assert one(member, ClaimRun(lock, "leader", state, "e2", 0.0, 161.0)) == 1
    assert one(member, ReadRuns(state)) == {"e1": 160.0, "e2": 161.0}
    assert one(member, ReadRuns(_key())) == {}
    assert member.scan("csl", None, None) == [lock]  # beat state is not a lock


# -- forced release, notifications ----------------------------------------------------------


def test_force_release_deletes_whoever_holds_it_or_only_the_token_given(
        member: MemoryMember) -> None:
    key = _key()
    acquire(member, key, "t1")
    assert one(member, ForceRelease(key, "t2")) is False
    assert one(member, ForceRelease(key, "t1")) is True
    acquire(member, key, "t3")
    assert one(member, ForceRelease(key)) is True
    assert one(member, ForceRelease(key)) is False


def test_a_release_wakes_subscribers_of_that_key_only(member: MemoryMember) -> None:
    key, other = _key(), _key()
    sub, sub_other = member.subscribe(key), member.subscribe(other)
    try:
        acquire(member, key, "t1")
        assert not readable(sub)
        one(member, Release(key, "t2"))  # not ours: nothing released, nobody woken
        assert not readable(sub) and sub.drain() is False
        one(member, Release(key, "t1"))
        assert readable(sub) and not readable(sub_other)
        assert sub.drain() is True
        assert not readable(sub) and sub.drain() is False
        acquire(member, key, "t1")
        one(member, Release(key, "t1", notify=False))
        assert not readable(sub)
        acquire(member, key, "t1")
        one(member, ForceRelease(key))
        assert readable(sub) and sub.drain() is True
    finally:
        sub.close()
        sub_other.close()
    sub.close()  # closing twice is harmless
    with pytest.raises(OSError):
        sub.fileno()


def test_many_releases_before_a_drain_leave_one_wake_up(member: MemoryMember) -> None:
    key = _key()
    sub = member.subscribe(key)
    try:
        for _ in range(100_000):  # far more than a pipe holds: a release never blocks
            one(member, Acquire(key, "t", 1000, FENCE_TTL_MS))
            one(member, Release(key, "t"))
        assert sub.drain() is True and sub.drain() is False
    finally:
        sub.close()


def test_a_slot_release_notifies_its_lock_key(member: MemoryMember) -> None:
    key = _key()
    sub = member.subscribe(key)
    try:
        grant = one(member, AcquireSlot(key, "a", 1000, FENCE_TTL_MS, 2))
        one(member, Release(f"{key}:slot:{grant.slot}", "a"))  # type: ignore[attr-defined]
        assert readable(sub, 1.0)
    finally:
        sub.close()


def test_a_release_in_another_thread_wakes_a_waiter(member: MemoryMember) -> None:
    key = _key()
    acquire(member, key, "t1")
    sub = member.subscribe(key)
    try:
        threading.Timer(0.05, lambda: one(member, Release(key, "t1"))).start()
        assert readable(sub, 5.0)
    finally:
        sub.close()


# -- scan ------------------------------------------------------------------------------------


def test_scan_lists_held_lock_keys_by_prefix_pattern_and_limit(
        member: MemoryMember, clock: ManualClock) -> None:
    keys = [f"csl:proj.a:{{{i:03d}}}" for i in range(5)] + ["csl:proj.b:{x}", "other:{y}",
                                                            "cslx:proj.a:{000}"]
    for key in keys:
        acquire(member, key, "t", ttl_ms=1000)
    acquire(member, "csl:short:{s}", "t", ttl_ms=10)
    one(member, AcquireSlot("csl:proj.c:{z}", "t", 1000, FENCE_TTL_MS, 2))
    one(member, Follow("csl:proj.a:{000}", "f", True, 1000))
    clock.advance(0.5)  # csl:short lapses
    # Under a key prefix: no counters, follow-ups, lapsed locks or other prefixes.
    assert member.scan("csl", None, None) == sorted(keys[:6] + ["csl:proj.c:{z}:slot:0"])
    assert member.scan("csl:proj.a", None, 2) == keys[:2]
    assert member.scan("csl", r"csl:proj.a:\{00[13]\}", None) == [keys[1], keys[3]]
    assert member.scan("csl", "csl:proj.?:{*", None) == sorted(
        keys[:6] + ["csl:proj.c:{z}:slot:0"])
    assert member.scan("", None, None) == sorted(keys + ["csl:proj.c:{z}:slot:0"])
    assert member.scan("nothing", None, None) == []
    assert member.scan("csl", None, 0) == []


@pytest.mark.parametrize(("pattern", "text", "matched"), [
    ("a*", "abc", True), ("a*", "ba", False), ("a?c", "abc", True), ("a?c", "ac", False),
    ("[ab]x", "bx", True), ("[ab]x", "cx", False), ("[^ab]x", "cx", True),
    ("[^ab]x", "ax", False), ("[a-c]", "b", True), ("[c-a]", "b", True), ("[a-c]", "d", False),
    (r"\*", "*", True), (r"\*", "a", False), (r"a\[b", "a[b", True), ("x.y", "x.y", True),
    ("x.y", "xzy", False), ("a*", "a\nb", True), ("[]", "a", False), (r"[\]]", "]", True),
    ("csl:t:{*", "csl:t:{ab}", True), ("(a)+", "(a)+", True),
])
def test_glob_patterns_match_as_redis_match_does(pattern: str, text: str, matched: bool) -> None:
    assert bool(glob_regex(pattern).match(text)) is matched


def test_expired_entries_are_swept_out(member: MemoryMember, clock: ManualClock) -> None:
    for _ in range(50):
        key = _key()
        acquire(member, key, "t", ttl_ms=10, fence_ttl_ms=20)
        one(member, Follow(key, "f", True, 10))
    clock.advance(1.0)
    member.scan("", None, None)
    state = member._state
    assert (state.locks, state.counters, state.follows) == ({}, {}, {})


# -- members, names, URLs --------------------------------------------------------------------


def test_members_of_one_name_share_state_and_unnamed_ones_are_private() -> None:
    name = f"shared-{uuid.uuid4().hex}"
    a, b = MemoryMember(name), MemoryMember.from_url(f"memory://{name}", socket_timeout=0.2,
                                                     setting="singleton_lock_url")
    key = _key()
    assert acquire(a, key, "t1").acquired
    assert acquire(b, key, "t2").acquired is False
    assert (a.name, b.name) == (f"memory://{name}", f"memory://{name}")
    sub = b.subscribe(key)
    try:
        one(a, Release(key, "t1"))
        assert readable(sub, 1.0)
    finally:
        sub.close()
    c, d = MemoryMember(), MemoryMember.from_url("memory://", socket_timeout=0.2,
                                                 setting="singleton_lock_url")
    assert acquire(c, key, "t1").acquired and acquire(d, key, "t2").acquired
    assert c.name != d.name


def test_a_named_state_keeps_its_clock() -> None:
    name = f"clocked-{uuid.uuid4().hex}"
    clock = ManualClock()
    first = MemoryMember(name, clock=clock)
    assert MemoryMember(name).clock is clock is first.clock
    assert MemoryMember(name, clock=clock).clock is clock
    with pytest.raises(LockConfigError, match="another clock"):
        MemoryMember(name, clock=ManualClock())


@pytest.mark.parametrize("url", ["redis://h", "memory", "memory://a,b", "memory://a b",
                                 "memory://x?y=1"])
def test_a_bad_memory_url_names_the_setting(url: str) -> None:
    with pytest.raises(LockConfigError) as info:
        MemoryMember.from_url(url, socket_timeout=0.2, setting="singleton_lock_url")
    assert info.value.setting == "singleton_lock_url"


def test_memory_is_registered_with_its_capabilities() -> None:
    assert backend_class("memory") is MemoryMember
    assert MemoryMember.capabilities == {
        Capability.QUORUM_MEMBER, Capability.TTL, Capability.NOTIFY, Capability.ADOPTABLE,
        Capability.LIMIT, Capability.FOLLOW, Capability.HANDOVER, Capability.BEAT,
        Capability.LIST}


def test_a_member_that_is_down_fails_every_operation(member: MemoryMember) -> None:
    member.down = True
    results = member.run([Ping(), Read(_key())])
    assert len(results) == 2 and all(isinstance(r, ConnectionError) for r in results)
    with pytest.raises(ConnectionError):
        member.subscribe(_key())
    with pytest.raises(ConnectionError):
        member.scan("", None, None)
    member.down = False
    assert member.run([Ping()]) == [True]


def test_a_closed_member_keeps_working_and_clear_forgets_everything(
        member: MemoryMember) -> None:
    key = _key()
    acquire(member, key, "t1")
    member.close()
    assert one(member, Read(key)).held  # type: ignore[attr-defined]
    member.clear()
    assert one(member, Read(key)) == LockView(member.name, False)


def test_not_an_operation_is_a_type_error(member: MemoryMember) -> None:
    with pytest.raises(TypeError):
        member.run([("acquire", "k")])  # type: ignore[list-item]


# -- threads ---------------------------------------------------------------------------------


@pytest.fixture
def threads() -> Iterator[list[threading.Thread]]:
    started: list[threading.Thread] = []
    yield started
    for thread in started:
        thread.join(10)


def test_concurrent_acquisitions_give_one_holder_and_distinct_fences(
        threads: list[threading.Thread]) -> None:
    member = MemoryMember()
    key = _key()
    barrier = threading.Barrier(8)
    won: list[str] = []
    fences: list[int] = []
    inside = [0, 0]  # holders now, most holders ever
    guard = threading.Lock()

    def contend(me: str) -> None:
        barrier.wait()
        for i in range(200):
            token = f"{me}-{i}"
            grant = acquire(member, key, token, ttl_ms=60_000)
            if grant.acquired:
                with guard:
                    inside[0] += 1
                    inside[1] = max(inside)
                    won.append(token)
                    fences.append(grant.fence)
                with guard:
                    inside[0] -= 1
                assert one(member, Release(key, token)) is True

    for n in range(8):
        thread = threading.Thread(target=contend, args=(f"t{n}",))
        threads.append(thread)
        thread.start()
    for thread in threads:
        thread.join(30)
    assert inside == [0, 1]
    assert won and len(set(fences)) == len(fences) == len(won)


def test_a_forked_child_does_not_inherit_a_held_state_lock() -> None:
    member = MemoryMember(f"forked-{uuid.uuid4().hex}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads running
        with member._state.lock:  # another thread inside an operation at the fork
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child: never back into pytest
                code = 1
                try:
                    signal.signal(signal.SIGALRM, signal.SIG_DFL)
                    signal.alarm(5)  # a deadlock ends the child with SIGALRM
                    ok = member.run([Ping(), Acquire(_key(), "t", 1000, FENCE_TTL_MS)])
                    code = 0 if ok[0] is True and ok[1].acquired else 2
                finally:
                    os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# -- the quorum helper -----------------------------------------------------------------------


def test_memory_store_builds_a_quorum_of_fresh_members_on_one_clock() -> None:
    clock = ManualClock()
    store = memory_store(masters=3, clock=clock)
    assert (store.n_masters, store.quorum) == (3, 2)
    key = _key()
    result = store.acquire(key, "t1", 1.0, (("owner", "id-1"),))
    assert result.acquired and result.fence == 1_000_000_000
    assert store.holder(key) == "id-1"
    clock.advance(1.0)
    assert store.holder(key) is None
    assert memory_store(masters=3, clock=clock).acquire(key, "t2", 1.0).acquired  # fresh
    named = f"helper-{uuid.uuid4().hex}"
    one_store = memory_store(f"memory://{named}", masters=2, clock=clock)
    assert one_store.acquire(key, "t1", 5.0).acquired
    assert not memory_store(f"memory://{named}", masters=2).acquire(key, "t2", 5.0).acquired
    with pytest.raises(LockConfigError):
        memory_store(masters=0)
