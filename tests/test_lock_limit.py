"""``lock_limit``: up to N holders of one key, one slot key each (SPEC 5), against the
in-memory store and real ``redis-server`` processes (one server, Redlock masters, a cluster).

What the masters hold is read back with the servers' own clients (``Backend.hashes``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from itertools import pairwise

import pytest

from celery_singleton_lock.inventory import count_by_task, list_locks
from celery_singleton_lock.lease import Lease
from celery_singleton_lock.lock import try_acquire
from celery_singleton_lock.backends.base import FENCE_TTL_MS, Acquire, LockBackend
from celery_singleton_lock.backends.memory import MemoryMember
from celery_singleton_lock.keys import slot_key
from tests.engine_fixtures import Backend, MemoryBackend, RedisBackend, kind_params, make_backend

KINDS = ["memory1", "memory3", "single", "redlock3", "cluster"]
KEY = "csl:limits.sync:{0123abcd}"
TASK = "limits.sync"


@pytest.fixture(params=kind_params(KINDS))
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    b = make_backend(request, request.param)
    yield b
    b.close()


@pytest.fixture(params=kind_params(["memory3", "redlock3"]))
def multi_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    b = make_backend(request, request.param)
    yield b
    b.close()


def _store(b: Backend) -> LockBackend:
    return b.store if isinstance(b, MemoryBackend) else b.lock("limits").store


def _take(store: LockBackend, owner: str, limit: int = 3) -> Lease | None:
    lease, _ = try_acquire(store, KEY, 5.0, owner=owner, task_name=TASK, limit=limit,
                           metadata=(("owner", owner), ("task", TASK)))
    return lease


def test_limit_gives_each_of_n_holders_its_own_slot_token_and_growing_fence(
    backend: Backend,
) -> None:
    store = _store(backend)
    leases = [_take(store, f"t{i}") for i in range(3)]
    assert all(lease is not None for lease in leases)
    held = [lease for lease in leases if lease is not None]
    assert [lease.key for lease in held] == [slot_key(KEY, i) for i in range(3)]
    assert len({lease.token for lease in held}) == 3
    assert all(a.fencing_token < b.fencing_token for a, b in pairwise(held))
    for lease in held:
        assert backend.tokens(lease.key) == [lease.token] * backend.n_masters
    assert backend.key_gone_everywhere(KEY), "no holder lives at the lock's own key"
    assert backend.fences(slot_key(KEY, 1)) == backend.fences(KEY), "one counter per lock"

    lease, result = try_acquire(store, KEY, 5.0, owner="t3", limit=3)
    assert lease is None and not result.acquired and not result.backend_down
    assert result.holder in {"t0", "t1", "t2"}

    assert held[1].release()
    assert backend.key_gone_everywhere(slot_key(KEY, 1))
    assert backend.tokens(slot_key(KEY, 0)) == [held[0].token] * backend.n_masters
    again = _take(store, "t4")
    assert again is not None and again.key == slot_key(KEY, 1)
    assert again.fencing_token > held[2].fencing_token
    for lease in (held[0], held[2], again):
        assert lease.release()
    assert all(backend.key_gone_everywhere(slot_key(KEY, i)) for i in range(3))


def test_a_slot_lease_is_renewed_and_extended_only_by_its_own_token(backend: Backend) -> None:
    store = _store(backend)
    first, second = _take(store, "t0", limit=2), _take(store, "t1", limit=2)
    assert first is not None and second is not None
    assert first.extend(20.0)
    assert all(p > 10_000 for p in backend.pttls(first.key))
    assert all(p <= 5_000 for p in backend.pttls(second.key))
    assert store.extend_many([first.renewal(), second.renewal()]) == [True, True]
    assert first.release()
    assert not first.is_held() and second.is_held()
    assert second.release()


def test_release_of_one_slot_wakes_a_waiter_for_the_lock(backend: Backend) -> None:
    store = _store(backend)
    held = [_take(store, f"t{i}", limit=2) for i in range(2)]
    assert all(lease is not None for lease in held)
    got: list[Lease] = []
    woke: list[float] = []

    def tried() -> bool:
        lease = _take(store, "waiter", limit=2)
        if lease is not None:
            got.append(lease)
            woke.append(time.monotonic())
        return lease is not None

    waiter = threading.Thread(target=store.wait_released, args=(KEY, 10.0, tried))
    waiter.start()
    try:
        deadline = time.monotonic() + 5
        while backend.subscribed_masters(f"{KEY}:released") < backend.n_masters:
            assert time.monotonic() < deadline, "the waiter never subscribed"
            time.sleep(0.01)
        time.sleep(0.05)  # let the waiter reach its select()
        released = time.monotonic()
        assert held[0] is not None and held[0].release()
    finally:
        waiter.join(10)
    assert got and got[0].key == held[0].key
    assert woke[0] - released < 0.5, "woken by the expiry poll, not by the release"
    for lease in (held[1], got[0]):
        assert lease is not None and lease.release()


def _plant(b: Backend, index: int, key: str) -> None:
    """Hold ``key`` on master ``index`` alone with a foreign token."""
    if isinstance(b, MemoryBackend):
        node: MemoryMember = b.nodes[index]
        node.run([Acquire(key, "foreign", 5000, FENCE_TTL_MS, (("owner", "other"),))])
    else:
        assert isinstance(b, RedisBackend)
        client = b.client(index)
        client.hset(key, mapping={"token": "foreign", "owner": "other"})
        client.pexpire(key, 5000)


def test_masters_that_granted_another_slot_give_it_back(multi_backend: Backend) -> None:
    b = multi_backend
    _plant(b, 0, slot_key(KEY, 0))  # master 0 sees slot 0 taken, the others do not
    lease = _take(_store(b), "mine", limit=2)
    assert lease is not None and lease.key == slot_key(KEY, 0)
    assert b.tokens(slot_key(KEY, 0)) == ["foreign", lease.token, lease.token]
    assert b.key_gone_everywhere(slot_key(KEY, 1)), "the minority grant of slot 1 was kept"
    assert lease.release()


@pytest.fixture(params=kind_params(["single", "redlock3", "cluster"]))
def redis_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    b = make_backend(request, request.param)  # read from outside: not the in-memory store
    yield b
    b.close()


def test_locks_list_and_the_count_show_each_holder(redis_backend: Backend) -> None:
    store = _store(redis_backend)
    held = [_take(store, f"t{i}") for i in range(3)]
    records = list_locks(store, "csl")
    assert sorted(r.task_id for r in records) == ["t0", "t1", "t2"]
    assert {r.key for r in records} == {slot_key(KEY, i) for i in range(3)}
    assert all(r.task == TASK for r in records)
    assert sorted(r.task_id for r in list_locks(store, "csl", TASK)) == ["t0", "t1", "t2"]
    counts, truncated = count_by_task(store, "csl", limit=1000)
    assert counts == {TASK: 3} and not truncated
    for lease in held:
        assert lease is not None and lease.release()
