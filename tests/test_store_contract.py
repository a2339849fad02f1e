"""One black-box contract suite over the lock-store interface, run on every kind of store.

Each test opens a store with :func:`~celery_singleton_lock.backends.registry.open_backend`
from the URL a kind's session fixture ``_store_<kind>`` yields (tests/kinds_*.py) and uses
fresh random keys, so nothing is flushed between tests. Only the methods of
:class:`~celery_singleton_lock.backends.base.LockBackend` are called: what passes here on one
store passes on all. A store without a capability skips those tests, naming it.

Timing assertions carry margins for a loaded two-core machine; the wake latencies measured
are written to the terminal at the end of the module.

A kinds module (tests/kinds_*.py) lists its kinds in ``KINDS`` and gives each a session
fixture ``_store_<kind>``; a kind whose URLs can carry a password may add
``_store_<kind>_password`` (a store behind one), else the password test skips it. A store that
does not notify waiters may say how long it polls at most in ``poll_interval_s`` (1 s if not).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import redis
from celery.result import AsyncResult

from celery_singleton_lock.backends.base import AcquireResult, Capability, LockBackend, Renewal
from celery_singleton_lock.backends.registry import open_backend
from celery_singleton_lock.errors import DuplicateTaskError, LockBackendError
from tests import kinds_memcached, kinds_redis, kinds_sql, kinds_zookeeper
from tests.servers import RedisServer, wait_until
from tests.workers import READY_STATES, CeleryWorker

#: Every kind of store, in the order the kinds modules list them.
KINDS: list[str] = [*kinds_redis.KINDS, *kinds_sql.KINDS, *kinds_zookeeper.KINDS,
                    *kinds_memcached.KINDS]
#: Kinds whose store lives in the test process only (no real worker can share it).
IN_PROCESS = {"memory", "memory3"}

#: A notified waiter is woken within 100 ms (SPEC 5); this bound leaves room for a loaded
#: machine. A polling store's bound is its poll interval plus this margin.
WAKE_BOUND_S = 0.5
#: Poll interval assumed for a store that does not say (``poll_interval_s``) and notifies
#: nobody: the longest a Quorum waiter sleeps between tries.
DEFAULT_POLL_S = 1.0
#: TTL of the locks that are left to lapse: short, but several socket timeouts long.
SHORT_TTL_S = 0.8
#: Bound for a lapsed lock to be taken by another token.
LAPSE_BOUND_S = 5.0


def _param(kind: str) -> Any:
    return pytest.param(kind, marks=[pytest.mark.cluster] if kind == "cluster" else [],
                        id=kind)


@pytest.fixture(params=[_param(k) for k in KINDS])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _url_of(value: Any) -> Any:
    return getattr(value, "url", value)


@pytest.fixture
def target_url(kind: str, request: pytest.FixtureRequest) -> Any:
    return _url_of(request.getfixturevalue(f"_store_{kind}"))


@pytest.fixture
def open_store(target_url: Any) -> Iterator[Callable[..., LockBackend]]:
    """Factory: a new store of this kind (or of ``url``), closed at teardown."""
    opened: list[LockBackend] = []

    def make(url: Any = None) -> LockBackend:
        store = open_backend(target_url if url is None else url, socket_timeout=0.5)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Callable[..., LockBackend]) -> LockBackend:
    return open_store()


def need(kind: str, store: LockBackend, capability: str) -> None:
    if capability not in store.capabilities:
        pytest.skip(f"{kind}: no {capability}")


def new_key() -> str:
    return f"singleton_lock:contract:{{{uuid.uuid4().hex}}}"


def token() -> str:
    return uuid.uuid4().hex


def meta(owner: str, **extra: Any) -> tuple[tuple[str, Any], ...]:
    """Holder metadata as LockedTask writes it."""
    fields: dict[str, Any] = {
        "owner": owner, "task": "contract.task", "hostname": "contract-host", "pid": 4242,
        "mode": "while_executing", "acquired_at": 1_700_000_000.25, "ttl": 30.0,
    }
    fields.update(extra)
    return tuple(fields.items())


def take(store: LockBackend, key: str, tok: str, ttl_s: float = 30.0, owner: str = "") -> int:
    """Acquire or fail the test; returns the fence."""
    result = store.acquire(key, tok, ttl_s, meta(owner or f"id-{tok[:8]}"))
    assert result.acquired, result
    return result.fence


# -- wake latencies, reported at the end of the module -------------------------------------------

_LATENCIES: dict[str, list[float]] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_latencies(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not _LATENCIES:
        return
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.write_line("")
        reporter.write_line("store contract: release -> waiter's successful try (ms)")
        for kind, seen in _LATENCIES.items():
            ms = sorted(round(s * 1000, 1) for s in seen)
            reporter.write_line(f"  {kind:>10}: median {statistics.median(ms):7.1f}  "
                                f"max {max(ms):7.1f}  n={len(ms)}")


def wake_bound_s(store: LockBackend) -> float:
    if Capability.NOTIFY in store.capabilities:
        return WAKE_BOUND_S
    return float(getattr(store, "poll_interval_s", DEFAULT_POLL_S)) + WAKE_BOUND_S


class Waiter(threading.Thread):
    """``wait_released`` in a thread of its own, trying to take ``key`` for ``tok``."""

    def __init__(self, store: LockBackend, key: str, tok: str, timeout_s: float) -> None:
        super().__init__(daemon=True)
        self.store, self.key, self.tok, self.timeout_s = store, key, tok, timeout_s
        self.first_try = threading.Event()
        self.tries = 0
        self.taken_at: float | None = None
        self.result: bool | None = None
        self.error: BaseException | None = None
        self.fence = 0
        self.slot = ""

    def tried(self) -> bool:
        self.tries += 1
        result = self.store.acquire(self.key, self.tok, 30.0, meta(f"waiter-{self.tok[:8]}"))
        if result.acquired:
            self.taken_at = time.monotonic()
            self.fence = result.fence
        self.first_try.set()
        return result.acquired

    def run(self) -> None:
        try:
            self.result = self.store.wait_released(self.key, self.timeout_s, self.tried)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.first_try.set()

    def started_waiting(self) -> Waiter:
        self.start()
        assert self.first_try.wait(10), "the waiter never tried"
        assert self.error is None, self.error
        assert self.taken_at is None, "the waiter took a lock that was held"
        return self

    def finish(self, timeout_s: float = 10.0) -> bool:
        self.join(timeout_s)
        assert not self.is_alive(), "the waiter is still waiting"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


# -- taking a lock ----------------------------------------------------------------------------


def test_acquire_gives_a_fence_and_a_second_token_is_refused_naming_the_holder(
        kind: str, store: LockBackend) -> None:
    key = new_key()
    first = store.acquire(key, token(), 10.0, meta("holder-1"))
    assert first.acquired and not first.backend_down, first
    assert first.fence > 0 and first.key == key
    assert 0 < first.validity_s <= 10.0
    other = store.acquire(key, token(), 10.0, meta("holder-2"))
    assert not other.acquired and not other.backend_down, other
    assert (other.fence, other.key) == (0, "")
    assert other.holder == "holder-1"
    if Capability.TTL in store.capabilities:
        assert 0 < other.holder_pttl_ms <= 10_000


def test_acquire_again_with_the_same_token_refreshes_the_lock(
        kind: str, store: LockBackend) -> None:
    key, tok = new_key(), token()
    first = store.acquire(key, tok, 2.0, meta("holder-1"))
    again = store.acquire(key, tok, 60.0, meta("holder-1"))
    assert first.acquired and again.acquired, (first, again)
    assert again.fence == first.fence  # a refresh is not a new acquisition
    if Capability.TTL in store.capabilities:
        record = store.lock_info(key)
        assert record is not None and record.ttl_s is not None and record.ttl_s > 5.0, record
    assert store.owned(key, tok)


def test_fences_grow_strictly_over_acquisitions_of_one_key(
        kind: str, store: LockBackend) -> None:
    key = new_key()
    fences = []
    for _ in range(5):
        tok = token()
        fences.append(take(store, key, tok))
        assert store.release(key, tok) is True
    assert fences == sorted(set(fences)), fences


def test_begin_acquire_then_finish_is_an_acquire(kind: str, store: LockBackend) -> None:
    key, tok = new_key(), token()
    started = store.begin_acquire(key, tok, 30.0, meta("early"))
    result = started.finish()
    assert result.acquired and result.fence > 0 and result.key == key, result
    assert started.finish() == result  # read once
    refused = store.begin_acquire(key, token(), 30.0, meta("late")).finish()
    assert not refused.acquired and refused.holder == "early"
    assert store.owned(key, tok)


def test_release_is_owner_checked(kind: str, store: LockBackend) -> None:
    key, tok = new_key(), token()
    take(store, key, tok, owner="holder-1")
    assert store.release(key, token()) is False
    assert store.owned(key, tok) and store.holder(key) == "holder-1"
    assert store.release(key, tok) is True
    assert not store.owned(key, tok) and store.holder(key) is None
    assert store.release(key, tok) is False
    assert store.release(new_key(), tok) is False


def test_owned_and_holder(kind: str, store: LockBackend) -> None:
    key, tok = new_key(), token()
    assert store.holder(key) is None and not store.owned(key, tok)
    assert store.acquire(key, tok, 30.0).acquired  # no metadata: a holder without owner id
    assert store.holder(key) == ""
    assert store.owned(key, tok) and not store.owned(key, token())


def test_release_later_frees_the_lock_within_1s_and_reports_one_that_was_not_ours(
        kind: str, store: LockBackend) -> None:
    key, tok = new_key(), token()
    take(store, key, tok, owner="task-1")
    lost = threading.Event()
    store.release_later(key, token(), on_lost=lost.set)  # another token: not released
    assert lost.wait(5.0), "on_lost never ran for a lock that was not ours"
    assert store.owned(key, tok)
    kept = threading.Event()
    store.release_later(key, tok, deadline=store.clock() + 30.0, on_lost=kept.set)
    wait_until(lambda: store.holder(key) is None, 1.0, interval_s=0.01,
               message="the lock gone after release_later")
    assert take(store, key, token()) > 0
    assert not kept.wait(0.2)


def test_a_lapsed_lock_is_not_its_old_tokens_and_fences_still_grow(
        kind: str, store: LockBackend) -> None:
    need(kind, store, Capability.TTL)
    key, old, new = new_key(), token(), token()
    fence = take(store, key, old, ttl_s=SHORT_TTL_S)
    started = time.monotonic()

    def successor() -> AcquireResult | None:
        result = store.acquire(key, new, 30.0, meta("successor"))
        return result if result.acquired else None  # a result is a tuple: always truthy

    taken = wait_until(successor, LAPSE_BOUND_S, message="the lapsed lock taken by another token")
    assert time.monotonic() - started >= SHORT_TTL_S * 0.5  # it was held meanwhile
    assert taken.fence > fence
    assert store.extend(key, old, 30.0) is False
    assert store.extend_many([Renewal(key, old, 30_000)]) == [False]
    assert store.release(key, old) is False
    assert store.owned(key, new) and not store.owned(key, old)
    assert store.holder(key) == "successor"


def test_a_session_store_ends_its_locks_with_the_session(
        kind: str, store: LockBackend, open_store: Callable[..., LockBackend]) -> None:
    need(kind, store, Capability.SESSION)
    key, old = new_key(), token()
    fence = take(store, key, old)
    store.close()  # the session ends: so do its locks
    other, new = open_store(), token()

    def successor() -> AcquireResult | None:
        result = other.acquire(key, new, 30.0, meta("successor"))
        return result if result.acquired else None

    taken = wait_until(successor, LAPSE_BOUND_S, message="the lock of a closed session taken")
    assert taken.fence > fence
    assert store.extend(key, old, 30.0) is False  # reopened: not the old session's lock
    assert store.release(key, old) is False
    assert other.holder(key) == "successor"


def test_extend_many_renews_every_lock_it_holds_and_no_other(
        kind: str, store: LockBackend) -> None:
    tok = token()
    keys = [new_key() for _ in range(200)]
    for key in keys:
        take(store, key, tok, ttl_s=5.0)
    released, taken_by_other = new_key(), new_key()
    take(store, released, tok)
    assert store.release(released, tok)
    take(store, taken_by_other, token())
    items = [Renewal(k, tok, 60_000) for k in [*keys, released, taken_by_other]]
    assert store.extend_many(items) == [True] * 200 + [False, False]
    if Capability.TTL in store.capabilities:
        for key in (keys[0], keys[-1]):
            record = store.lock_info(key)
            assert record is not None and record.ttl_s is not None and record.ttl_s > 10, record
    assert store.extend_many([]) == []
    assert store.extend(keys[0], tok, 30.0) is True


def test_handover_keeps_the_fence_and_moves_ownership(kind: str, store: LockBackend) -> None:
    need(kind, store, Capability.HANDOVER)
    key, enqueue, worker = new_key(), token(), token()
    fence = take(store, key, enqueue, owner="task-1")
    assert store.handover(key, token(), worker, 30.0, meta("task-1")) is None
    assert store.handover(key, enqueue, worker, 30.0,
                          meta("task-1", mode="until_executed", hostname="w1")) == fence
    assert store.owned(key, worker) and not store.owned(key, enqueue)
    assert store.holder(key) == "task-1"
    record = store.lock_info(key)
    assert record is not None and (record.mode, record.hostname) == ("until_executed", "w1")
    assert store.release(key, enqueue) is False
    assert store.release(key, worker) is True


# -- waiting ------------------------------------------------------------------------------------


def test_wait_released_is_woken_by_a_release(
        kind: str, store: LockBackend, open_store: Callable[..., LockBackend]) -> None:
    other = open_store()  # the waiter's own store, as in another worker
    bound = wake_bound_s(store)
    rounds = 5 if Capability.NOTIFY in store.capabilities else 2
    seen = []
    for _ in range(rounds):
        key, holder = new_key(), token()
        take(store, key, holder)
        waiter = Waiter(other, key, token(), timeout_s=20.0).started_waiting()
        released_at = time.monotonic()
        assert store.release(key, holder) is True
        assert waiter.finish() is True
        assert waiter.taken_at is not None
        seen.append(waiter.taken_at - released_at)
        assert other.owned(key, waiter.tok)
    _LATENCIES.setdefault(kind, []).extend(seen)
    assert max(seen) < bound, [round(s * 1000) for s in seen]
    if Capability.NOTIFY in store.capabilities:  # SPEC 5: woken within 100 ms
        assert statistics.median(seen) < 0.1, [round(s * 1000) for s in seen]


def test_a_waiter_gives_up_after_its_timeout(kind: str, store: LockBackend) -> None:
    key = new_key()
    take(store, key, token())
    started = time.monotonic()
    waiter = Waiter(store, key, token(), timeout_s=0.5)
    waiter.start()
    assert waiter.finish() is False
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 0.5 + 1.0, elapsed
    assert waiter.tries >= 1 and waiter.taken_at is None


def test_force_release_frees_a_lock_whoever_holds_it_and_wakes_a_waiter(
        kind: str, store: LockBackend, open_store: Callable[..., LockBackend]) -> None:
    key, holder = new_key(), token()
    take(store, key, holder, owner="stuck")
    record = store.lock_info(key)
    assert record is not None and record.task_id == "stuck"
    waiter = Waiter(open_store(), key, token(), timeout_s=20.0).started_waiting()
    released_at = time.monotonic()
    assert store.force_release(record) >= 1
    assert waiter.finish() is True and waiter.taken_at is not None
    assert waiter.taken_at - released_at < wake_bound_s(store)
    assert store.holder(key) == f"waiter-{waiter.tok[:8]}"
    assert not store.owned(key, holder)
    # The record of a lock taken again since it was read releases nothing.
    assert store.force_release(record) == 0
    assert store.owned(key, waiter.tok)


# -- lock_limit slots -------------------------------------------------------------------------


def test_acquire_slot_gives_limit_holders_distinct_slots_and_frees_one_on_release(
        kind: str, store: LockBackend, open_store: Callable[..., LockBackend]) -> None:
    need(kind, store, Capability.LIMIT)
    key = new_key()
    tokens = [token() for _ in range(3)]
    results = [store.acquire_slot(key, t, 30.0, 3, meta(f"slot-holder-{i}"))
               for i, t in enumerate(tokens)]
    assert all(r.acquired for r in results), results
    slots = [r.key for r in results]
    assert len(set(slots)) == 3 and key not in slots and all(slots)
    fences = [r.fence for r in results]
    assert fences == sorted(set(fences)), fences
    fourth = token()
    refused = store.acquire_slot(key, fourth, 30.0, 3, meta("slot-holder-3"))
    assert not refused.acquired and not refused.backend_down, refused
    assert refused.holder in {f"slot-holder-{i}" for i in range(3)}
    if Capability.TTL in store.capabilities:
        assert refused.holder_pttl_ms > 0
    for i, slot in enumerate(slots):
        assert store.owned(slot, tokens[i]) and store.holder(slot) == f"slot-holder-{i}"
    # A waiter on the lock's key is woken by the release of one slot.
    other = open_store()
    waiter = _SlotWaiter(other, key, fourth, limit=3).started_waiting()
    released_at = time.monotonic()
    assert store.release(slots[1], tokens[1]) is True
    assert waiter.finish() is True and waiter.taken_at is not None
    assert waiter.taken_at - released_at < wake_bound_s(store)
    assert waiter.slot == slots[1]
    assert waiter.fence > fences[-1]
    assert store.owned(slots[1], fourth)


class _SlotWaiter(Waiter):
    def __init__(self, store: LockBackend, key: str, tok: str, limit: int) -> None:
        super().__init__(store, key, tok, timeout_s=20.0)
        self.limit = limit

    def tried(self) -> bool:
        self.tries += 1
        result = self.store.acquire_slot(self.key, self.tok, 30.0, self.limit, meta("slot-4"))
        if result.acquired:
            self.taken_at = time.monotonic()
            self.fence, self.slot = result.fence, result.key
        self.first_try.set()
        return result.acquired


# -- coalesce and beat ------------------------------------------------------------------------


def test_follow_keeps_one_follow_up_and_unfollow_lets_another_in(
        kind: str, store: LockBackend) -> None:
    need(kind, store, Capability.FOLLOW)
    key = new_key()
    take(store, key, token(), owner="running")
    assert store.follow(key, "next-1", 30.0) is None
    assert store.follow(key, "next-1", 30.0) is None  # refreshed
    assert store.follow(key, "next-2", 30.0) == "next-1"
    store.unfollow(key, "next-2")  # not the follow-up: changes nothing
    assert store.follow(key, "next-2", 30.0) == "next-1"
    store.unfollow(key, "next-1")
    assert store.follow(key, "next-2", 30.0) is None
    store.unfollow(key, "next-2")


def test_claim_run_lets_the_leader_send_each_due_time_once(
        kind: str, store: LockBackend) -> None:
    need(kind, store, Capability.BEAT)
    lock_key, leader = new_key(), token()
    state_key = f"{lock_key}:schedule"  # as beat names it: one hash tag, one cluster slot
    take(store, lock_key, leader, owner="beat-1")
    assert store.claim_run(lock_key, leader, state_key, "every-minute", 0.0, 1000.0) == 1
    # A second leader that saw the entry's previous run as 0.0 finds it already sent.
    assert store.claim_run(lock_key, leader, state_key, "every-minute", 0.0, 1000.5) == 0
    assert store.claim_run(lock_key, token(), state_key, "every-minute", 1000.0, 1060.0) == -1
    assert store.claim_run(lock_key, leader, state_key, "every-minute", 1000.0, 1060.0) == 1
    assert store.claim_run(lock_key, leader, state_key, "hourly", 0.0, 1061.0) == 1
    assert store.last_runs(state_key) == pytest.approx({"every-minute": 1060.0, "hourly": 1061.0})
    assert store.last_runs(new_key()) == {}


# -- seeing and clearing ----------------------------------------------------------------------


def test_lock_info_shows_the_holder_metadata(kind: str, store: LockBackend) -> None:
    key, tok = new_key(), token()
    fence = take(store, key, tok, owner="task-id-1")
    record = store.lock_info(key)
    assert record is not None
    assert record.key == key
    assert (record.task_id, record.task, record.hostname, record.pid, record.mode) == (
        "task-id-1", "contract.task", "contract-host", 4242, "while_executing")
    assert record.acquired_at == pytest.approx(1_700_000_000.25)
    assert (record.masters, record.n_masters) == (store.n_masters, store.n_masters)
    assert record.fence in (None, fence)
    if Capability.TTL in store.capabilities:
        assert record.ttl_s is not None and 0 < record.ttl_s <= 30.0
    assert "token" not in json.dumps(record.as_json())
    assert tok not in json.dumps(record.as_json())
    assert store.lock_info(new_key()) is None


def _many_locks(store: LockBackend) -> tuple[str, list[str], list[str]]:
    """250 locks of two tasks under a fresh key prefix (and one under a longer prefix)."""
    prefix = f"singleton_lock:contract:{uuid.uuid4().hex}"
    tok = token()
    a_keys = [f"{prefix}:task.a:{{{i:04d}}}" for i in range(200)]
    b_keys = [f"{prefix}:task.b:{{{i:04d}}}" for i in range(50)]
    for i, key in enumerate([*a_keys, *b_keys]):
        assert store.acquire(key, tok, 60.0, meta(f"owner-{i}", task=key.split(":")[3])).acquired
    take(store, f"{prefix}x:task.a:{{0}}", token())  # the prefix's text, longer
    return prefix, a_keys, b_keys


def test_list_locks_by_prefix_pattern_and_limit_reads_every_page(
        kind: str, store: LockBackend) -> None:
    need(kind, store, Capability.LIST)
    prefix, a_keys, b_keys = _many_locks(store)
    # As celery locks and the metrics ask: the key prefix setting, and a pattern under it.
    records = store.list_locks(prefix, pattern=f"{prefix}:*")
    assert sorted(r.key for r in records) == sorted([*a_keys, *b_keys])
    by_key = {r.key: r for r in records}
    first = by_key[a_keys[0]]
    assert (first.task_id, first.task, first.hostname, first.pid, first.mode) == (
        "owner-0", "task.a", "contract-host", 4242, "while_executing")
    assert (first.masters, first.n_masters) == (store.n_masters, store.n_masters)
    assert by_key[b_keys[-1]].task_id == "owner-249"
    only_b = store.list_locks(prefix, pattern=f"{prefix}:task.b:*")
    assert sorted(r.key for r in only_b) == b_keys
    some = store.list_locks(prefix, pattern=f"{prefix}:*", limit=10)
    assert len(some) == 10 and {r.key for r in some} <= set(a_keys + b_keys)
    errors: list[str] = []
    assert store.list_locks(prefix, pattern=f"{prefix}:nothing:*", errors=errors) == []
    assert errors == []
    assert sorted(store.lock_keys(prefix, pattern=f"{prefix}:task.b:*")) == b_keys
    # celery locks purge: every lock listed is released, once.
    assert store.force_release_many(only_b) == len(b_keys)
    assert store.list_locks(prefix, pattern=f"{prefix}:task.b:*") == []
    assert store.force_release_many(only_b) == 0
    assert len(store.list_locks(prefix, pattern=f"{prefix}:*")) == len(a_keys)


def test_list_locks_without_a_pattern_lists_the_keys_under_the_key_prefix(
        kind: str, store: LockBackend) -> None:
    """``prefix`` is a key prefix, as ``singleton_lock_key_prefix``: ``csl`` names the keys
    ``csl:...`` (Redis's ``SCAN MATCH csl:*``), not those of a longer prefix ``cslx:...``."""
    need(kind, store, Capability.LIST)
    prefix, a_keys, b_keys = _many_locks(store)
    assert sorted(r.key for r in store.list_locks(prefix)) == sorted([*a_keys, *b_keys])
    assert sorted(r.key for r in store.list_locks(f"{prefix}:task.b")) == b_keys
    assert len(store.list_locks(prefix, limit=10)) == 10


def test_ping_answers_for_every_member(kind: str, store: LockBackend) -> None:
    assert store.ping() == (store.n_masters, [])
    assert 1 <= store.quorum <= store.n_masters


def test_no_description_or_error_shows_a_password(
        kind: str, request: pytest.FixtureRequest,
        open_store: Callable[..., LockBackend]) -> None:
    try:
        url = _url_of(request.getfixturevalue(f"_store_{kind}_password"))
    except pytest.FixtureLookupError:
        pytest.skip(f"{kind}: no store behind a password to open")
    urls = url if isinstance(url, list) else [url]
    password = _password_of(urls[0])
    assert password and all(password in u for u in urls), "the fixture's URL has no password"
    store = open_store(url)
    assert store.ping() == (store.n_masters, [])
    key, tok = new_key(), token()
    take(store, key, tok)
    for text in (store.description, repr(store)):
        assert password not in text, text
    # A wrong password: the store refuses, and says why without either password.
    wrong = [u.replace(password, "Wr0ng-pass-xyz") for u in urls]
    texts: list[str] = []
    try:
        bad = open_store(wrong if isinstance(url, list) else wrong[0])
    except LockBackendError as exc:  # a store that connects as it opens may refuse at once
        texts.append(str(exc))
    else:
        answered, errors = bad.ping()
        assert answered == 0 and len(errors) == bad.n_masters
        texts += [bad.description, repr(bad), *errors]
        try:
            result = bad.acquire(new_key(), token(), 5.0)
        except LockBackendError as exc:
            texts.append(str(exc))
        else:
            assert not result.acquired and result.backend_down
            texts.extend(result.errors)
    for text in texts:
        assert password not in text and "Wr0ng-pass-xyz" not in text, text


def _password_of(url: str) -> str | None:
    password = urlsplit(url).password
    return unquote(password) if password else None


def test_a_closed_store_opens_again_on_next_use(kind: str, store: LockBackend) -> None:
    key, tok = new_key(), token()
    take(store, key, tok)
    store.close()
    later = new_key()
    fence = take(store, later, tok)
    assert fence > 0 and store.owned(later, tok)
    if Capability.TTL in store.capabilities:  # a session store's locks end with the session
        assert store.owned(key, tok)
    assert store.release(later, tok) is True
    store.close()
    store.close()  # twice is harmless


# -- real workers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker() -> Iterator[RedisServer]:
    """Broker (db 0), results (db 1) and the bodies' records (db 2); never a lock store."""
    with RedisServer() as server:
        yield server


def _states(results: redis.Redis, ids: list[str]) -> list[str]:
    raw = results.mget([f"celery-task-meta-{i}" for i in ids])
    return [json.loads(r)["status"] if r else "PENDING" for r in raw]


@pytest.mark.slow
def test_real_workers_never_run_two_bodies_of_one_signature_at_once(
        kind: str, target_url: Any, broker: RedisServer, store: LockBackend) -> None:
    if kind in IN_PROCESS:
        pytest.skip(f"{kind}: an in-process store, which worker processes cannot share")
    from tests.apps import store_dedup

    base = broker.url.rsplit("/", 1)[0]
    urls = {"broker": f"{base}/0", "backend": f"{base}/1", "records": f"{base}/2"}
    store_dedup.configure_store(store_dedup.app, urls["broker"], urls["backend"], target_url)
    env = {"CSL_TEST_STORE_URL": json.dumps(target_url)}
    workers = [CeleryWorker("tests.apps.store_dedup", urls["broker"], urls["backend"], "",
                            record_url=urls["records"], pool="prefork", concurrency=2, env=env)
               for _ in range(2)]
    records = redis.Redis.from_url(urls["records"], decode_responses=True)
    results_db = redis.Redis.from_url(urls["backend"], decode_responses=True)
    try:
        for worker in workers:
            worker.start()
        slot, hold_s, sent = f"slot-{uuid.uuid4().hex}", 0.3, 100
        key = store_dedup.guarded.lock_key_for(slot, hold_s)
        results = [store_dedup.guarded.delay(slot, hold_s) for _ in range(sent)]
        ids = [r.id for r in results]
        # The lock is in this store (not, say, in the broker's Redis): its holder is one of them.
        deadline, holder = time.monotonic() + 30, None
        while holder is None and time.monotonic() < deadline:
            holder = store.holder(key)
            if holder is None:
                time.sleep(0.01)
        assert holder in set(ids), holder
        states: list[str] = []

        def all_ready() -> bool:
            states[:] = _states(results_db, ids)
            return all(s in READY_STATES for s in states)

        try:
            wait_until(all_ready, 90, interval_s=0.05, message=f"{sent} tasks ready")
        except TimeoutError as exc:
            logs = "\n".join(w.describe() for w in workers)
            raise AssertionError(f"{exc}: {({s: states.count(s) for s in set(states)})}\n"
                                 f"{logs}") from None
        assert int(records.get(f"{slot}:max") or 0) == 1
        ran, rejected = states.count("SUCCESS"), states.count("REVOKED")
        assert ran + rejected == sent, {s: states.count(s) for s in set(states)}
        assert ran >= 1 and rejected >= 1
        assert records.llen(f"{slot}:runs") == ran
        succeeded = {i for i, s in zip(ids, states, strict=True) if s == "SUCCESS"}
        for result, state in zip(results, states, strict=True):
            if state == "REVOKED":
                exc = AsyncResult(result.id, app=store_dedup.app).result
                assert isinstance(exc, DuplicateTaskError), exc
                assert exc.lock_key == key and exc.holder_id in succeeded
        wait_until(lambda: store.holder(key) is None, 5, message="the last holder's release")
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.close()
        records.close()
        results_db.close()
