"""The lock contract (SPEC sections 6, 7 and 10), one suite run against every kind of store.

Kinds: the in-memory store with 1 and 3 masters (fresh per test), and real ``redis-server``
processes: one server, 3 and 5 Redlock masters, and a 3-node Redis Cluster. What a master holds
is always read back with the server's own client, never through the library.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from itertools import pairwise
from typing import Any

import pytest

from celery_singleton_lock.lock import Redlock
from celery_singleton_lock.keys import channel_for, fence_key_for
from tests.engine_fixtures import (
    ALL_KINDS,
    MULTI_MASTER_KINDS,
    Backend,
    ClusterBackend,
    kind_params,
    make_backend,
)
from tests.servers import wait_until

#: A release must wake a blocked acquire within this many seconds (SPEC 5, ``wait``).
WAKE_BOUND_S = 0.1


@pytest.fixture(params=kind_params(ALL_KINDS))
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    b = make_backend(request, request.param)
    yield b
    b.close()


@pytest.fixture(params=kind_params(MULTI_MASTER_KINDS))
def multi_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    b = make_backend(request, request.param)
    yield b
    b.close()


@pytest.fixture(params=kind_params(["cluster"]))
def cluster_backend(request: pytest.FixtureRequest) -> Iterator[ClusterBackend]:
    b = make_backend(request, request.param)
    assert isinstance(b, ClusterBackend)
    yield b
    b.close()


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A lock name unique to the test, readable in the server's key space."""
    return f"contract:{request.node.originalname}"


def counting_attempts(lock: Redlock) -> list[bool]:
    """Record the outcome of every acquire attempt ``lock`` makes, once it has returned.

    A spy: the real attempt still runs.
    """
    outcomes: list[bool] = []
    attempt: Callable[[], bool] = lock._attempt

    def spy() -> bool:
        got = attempt()
        outcomes.append(got)
        return got

    lock._attempt = spy  # type: ignore[method-assign]
    return outcomes


# ------------------------------------------------------------------------------ basic cycle


def test_acquire_owned_extend_release_cycle(backend: Backend, name: str) -> None:
    lock = backend.lock(name, ttl=10.0)
    assert not lock.owned()
    assert lock.extend() is False  # nothing held yet
    assert lock.acquire(blocking=False) is True
    assert lock.owned()
    assert backend.tokens(lock.key) == [lock.token] * backend.n_masters
    assert all(8_000 < p <= 10_000 for p in backend.pttls(lock.key))

    assert lock.extend(ttl=60.0) is True
    assert all(50_000 < p <= 60_000 for p in backend.pttls(lock.key))
    assert lock.extend() is True
    assert all(8_000 < p <= 10_000 for p in backend.pttls(lock.key))

    assert lock.release() is True
    assert not lock.owned()
    assert backend.key_gone_everywhere(lock.key)
    assert lock.release() is False  # a second release has nothing to release


def test_lock_can_be_taken_again_after_release(backend: Backend, name: str) -> None:
    first, second = backend.lock(name), backend.lock(name)
    assert first.acquire(blocking=False)
    assert first.release()
    assert second.acquire(blocking=False)
    assert first.acquire(blocking=False) is False
    assert second.release()


def test_acquiring_twice_through_one_object_is_an_error(backend: Backend, name: str) -> None:
    lock = backend.lock(name)
    assert lock.acquire(blocking=False)
    with pytest.raises(RuntimeError, match="already held"):
        lock.acquire(blocking=False)
    assert lock.release()


def test_non_blocking_acquire_fails_while_held_and_reports_the_holder(
    backend: Backend, name: str
) -> None:
    holder = backend.lock(name, ttl=10.0, owner="task-holder-1")
    other = backend.lock(name, ttl=10.0, owner="task-other")
    assert holder.acquire(blocking=False)

    started = time.monotonic()
    assert other.acquire(blocking=False) is False
    assert time.monotonic() - started < 0.5  # non-blocking means no waiting
    assert other.token is None and other.fencing_token is None
    assert other.last_attempt is not None
    assert other.last_attempt.holder == "task-holder-1"
    assert 0 < other.last_attempt.holder_pttl_ms <= 10_000
    assert not other.last_attempt.backend_down
    # The failed attempt left the holder's lock untouched on every master.
    assert backend.tokens(holder.key) == [holder.token] * backend.n_masters
    assert holder.release()


def test_release_returns_false_when_the_lock_is_no_longer_ours(backend: Backend, name: str) -> None:
    stale = backend.lock(name, ttl=0.3)
    assert stale.acquire(blocking=False)
    wait_until(lambda: backend.key_gone_everywhere(stale.key), 3.0, message="lock expiry")
    fresh = backend.lock(name, ttl=10.0)
    assert fresh.acquire(blocking=False)

    assert stale.release() is False
    assert backend.tokens(fresh.key) == [fresh.token] * backend.n_masters
    assert fresh.owned()
    assert fresh.release() is True


# ------------------------------------------------------------------------------ with


def test_with_block_holds_the_lock_and_releases_it_on_exit(backend: Backend, name: str) -> None:
    lock = backend.lock(name, ttl=10.0)
    other = backend.lock(name)
    with lock as entered:
        assert entered is lock
        assert lock.owned()
        assert backend.tokens(lock.key) == [lock.token] * backend.n_masters
        assert other.acquire(blocking=False) is False
    assert lock.token is None
    assert backend.key_gone_everywhere(lock.key)
    assert other.acquire(blocking=False)
    assert other.release()


def test_with_block_releases_the_lock_when_the_body_raises(backend: Backend, name: str) -> None:
    lock = backend.lock(name, ttl=10.0)
    with pytest.raises(KeyError, match="boom"):
        with lock:
            assert lock.owned()
            raise KeyError("boom")
    assert backend.key_gone_everywhere(lock.key)


# ------------------------------------------------------------------------------ blocking


def test_acquire_with_timeout_returns_false_after_about_the_timeout(
    backend: Backend, name: str
) -> None:
    holder = backend.lock(name, ttl=10.0)
    assert holder.acquire(blocking=False)
    waiter = backend.lock(name)
    started = time.monotonic()
    assert waiter.acquire(timeout=0.5) is False
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 0.9, elapsed
    assert waiter.token is None
    assert holder.release()


def test_acquire_with_zero_timeout_tries_once(backend: Backend, name: str) -> None:
    holder = backend.lock(name, ttl=10.0)
    assert holder.acquire(blocking=False)
    started = time.monotonic()
    assert backend.lock(name).acquire(timeout=0) is False
    assert time.monotonic() - started < 0.5
    with pytest.raises(ValueError, match="timeout"):
        backend.lock(name).acquire(blocking=False, timeout=1.0)
    with pytest.raises(ValueError, match="timeout"):
        backend.lock(name).acquire(timeout=-1)
    assert holder.release()


def test_blocked_acquire_is_woken_by_a_release_within_100ms(backend: Backend, name: str) -> None:
    holder = backend.lock(name, ttl=30.0)
    assert holder.acquire(blocking=False)
    waiter = backend.lock(name, ttl=30.0)
    attempts = counting_attempts(waiter)
    outcome: dict[str, Any] = {}

    def wait() -> None:
        outcome["got"] = waiter.acquire(timeout=10.0)
        outcome["at"] = time.monotonic()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    channel = channel_for(holder.key)
    wait_until(
        lambda: backend.subscribed_masters(channel) == backend.n_masters,
        5.0,
        message="the waiter's subscription on every master",
    )
    # The first attempt runs before subscribing, the second right after: once both failed,
    # the waiter sleeps on its subscription, and only a notification wakes it early (the
    # fallback re-check comes 1 s later).
    wait_until(lambda: len(attempts) >= 2, 5.0, message="the waiter's attempt after subscribing")
    assert attempts == [False, False]

    released_at = time.monotonic()
    assert holder.release()
    thread.join(5.0)
    assert not thread.is_alive()
    assert outcome["got"] is True
    latency = outcome["at"] - released_at
    assert latency < WAKE_BOUND_S, f"woke {latency * 1000:.0f} ms after the release"
    # Woken by notifications only, no polling loop: at most one attempt per master's
    # announcement (a wake by the first master can find the others not yet released).
    assert 3 <= len(attempts) <= 2 + backend.n_masters
    assert attempts[-1] is True
    # The first master's notification can wake the waiter before the holder's release reached
    # the last masters: a quorum is what it needs.
    holding = backend.tokens(waiter.key).count(waiter.token)
    assert holding >= backend.n_masters // 2 + 1
    assert waiter.release()
    # The waiter unsubscribed once it had the lock.
    wait_until(lambda: backend.subscribed_masters(channel) == 0, 5.0, message="unsubscribe")


# ------------------------------------------------------------------------------ expiry


def test_expired_lock_is_free_for_another_holder(backend: Backend, name: str) -> None:
    holder = backend.lock(name, ttl=0.3)
    assert holder.acquire(blocking=False)
    started = time.monotonic()
    other = backend.lock(name, ttl=10.0)
    assert other.acquire(blocking=False) is False
    wait_until(lambda: other.acquire(blocking=False), 3.0, message="the expired lock to be free")
    assert time.monotonic() - started >= 0.25  # it did live for its ttl
    # A quorum holds the new lock; a master whose copy of the old one outlived the others by a
    # few milliseconds (a loaded machine) may have refused it, as Redlock allows.
    tokens = backend.tokens(other.key)
    assert tokens.count(other.token) >= backend.n_masters // 2 + 1, tokens
    assert set(tokens) <= {other.token, holder.token, None}, tokens
    assert holder.owned() is False
    assert other.release()


def test_blocked_acquire_takes_an_expired_lock_within_ttl_plus_1s(
    backend: Backend, name: str
) -> None:
    holder = backend.lock(name, ttl=0.3)
    assert holder.acquire(blocking=False)
    started = time.monotonic()
    waiter = backend.lock(name, ttl=10.0)
    assert waiter.acquire(timeout=5.0) is True
    assert 0.25 <= time.monotonic() - started < 0.3 + 1.0 + 0.3
    assert waiter.release()


# ------------------------------------------------------------------------------ fencing


def test_fencing_tokens_strictly_increase_across_successive_holders(
    backend: Backend, name: str
) -> None:
    tokens: list[int] = []
    for _ in range(4):
        lock = backend.lock(name, ttl=10.0)
        assert lock.acquire(blocking=False)
        assert isinstance(lock.fencing_token, int)
        tokens.append(lock.fencing_token)
        assert lock.release()
    # A holder that takes over an expired lock (no release in between) also gets a larger one.
    expiring = backend.lock(name, ttl=0.2)
    assert expiring.acquire(blocking=False)
    tokens.append(expiring.fencing_token)  # type: ignore[arg-type]
    successor = backend.lock(name, ttl=10.0)
    wait_until(lambda: successor.acquire(blocking=False), 3.0, message="expiry")
    tokens.append(successor.fencing_token)  # type: ignore[arg-type]
    # The same object acquiring again gets a new, larger token too.
    assert successor.release()
    assert successor.acquire(blocking=False)
    tokens.append(successor.fencing_token)  # type: ignore[arg-type]
    assert successor.release()

    assert all(b > a for a, b in pairwise(tokens)), tokens
    # The counter lives beside the lock and still exists after the lock is gone.
    assert backend.key_gone_everywhere(successor.key)
    assert max(f or 0 for f in backend.fences(successor.key)) == tokens[-1]


def _down_patterns(n_masters: int) -> list[tuple[int, ...]]:
    """Which masters are down for each successive acquisition (always leaving a quorum).

    A master misses an acquisition, then all take part (their counters disagree: the one
    that missed it is behind, or, restarted empty, far ahead), then the same master misses
    the next one: the quorum without it must still issue a larger token.
    """
    if n_masters == 3:
        return [(), (0,), (), (0,), (1,), (), (1,), (2,), ()]
    return [(), (0, 1), (), (0, 1), (2, 3), (), (2, 3), (4, 0), ()]


def test_fencing_tokens_keep_increasing_after_a_master_missed_acquisitions(
    multi_backend: Backend, name: str
) -> None:
    backend = multi_backend
    tokens: list[int] = []
    disagreements = 0
    key = ""
    for down in _down_patterns(backend.n_masters):
        for i in down:
            backend.take_down(i)
        try:
            lock = backend.lock(name, ttl=10.0)
            key = lock.key
            assert lock.acquire(blocking=False), f"no quorum with masters {down} down"
            tokens.append(lock.fencing_token)  # type: ignore[arg-type]
            lock.release()
        finally:
            for i in down:
                backend.bring_back(i)
        fences = backend.fences(key)
        if len(set(fences)) > 1:
            disagreements += 1
    assert all(b > a for a, b in pairwise(tokens)), tokens
    # The scenario did happen: a master came back with a counter unlike the others.
    assert disagreements >= 2


# ------------------------------------------------------------------------------ the handle


def test_lock_handle_exposes_key_token_and_fencing_token(backend: Backend, name: str) -> None:
    lock = backend.lock(name, ttl=10.0)
    assert lock.key == f"csl:{{{name}}}"
    assert lock.token is None and lock.fencing_token is None
    assert lock.acquire(blocking=False)
    assert re.fullmatch(r"[0-9a-f]{32}", lock.token or "")
    assert isinstance(lock.fencing_token, int) and lock.fencing_token > 0
    assert lock.lease is not None and lock.lease.token == lock.token
    first_token = lock.token
    assert lock.release()
    assert lock.token is None and lock.fencing_token is None
    assert lock.acquire(blocking=False)
    assert lock.token != first_token  # a fresh token per acquisition
    assert lock.release()

    assert backend.lock(name, key_prefix="myapp").key == f"myapp:{{{name}}}"
    # A name that brings its own hash tag keeps it.
    assert backend.lock("user:{42}:report").key == "csl:user:{42}:report"


def test_acquire_writes_holder_metadata_into_the_lock_hash(backend: Backend, name: str) -> None:
    lock = backend.lock(
        name,
        ttl=10.0,
        owner="4f6d1c2e-task-id",
        metadata={"task": "proj.tasks.daily_report", "mode": "while_executing"},
    )
    before = time.time()
    assert lock.acquire(blocking=False)
    after = time.time()
    hashes = backend.hashes(lock.key)
    assert len(hashes) == backend.n_masters
    for fields in hashes:
        assert set(fields) >= {
            "token", "owner", "task", "hostname", "mode", "pid", "acquired_at", "ttl", "renewals",
        }  # fmt: skip
        assert fields["token"] == lock.token
        assert fields["owner"] == "4f6d1c2e-task-id"
        assert fields["task"] == "proj.tasks.daily_report"
        assert fields["mode"] == "while_executing"
        assert fields["hostname"] == socket.gethostname()
        assert fields["pid"] == str(os.getpid())
        assert before - 0.01 <= float(fields["acquired_at"]) <= after + 0.01
        assert float(fields["ttl"]) == 10.0
        assert fields["renewals"] == "0"
    assert lock.extend()
    assert [h["renewals"] for h in backend.hashes(lock.key)] == ["1"] * backend.n_masters
    assert lock.release()


def test_plain_lock_metadata_defaults(backend: Backend, name: str) -> None:
    lock = backend.lock(name, ttl=5.0)
    assert lock.acquire(blocking=False)
    fields = backend.hashes(lock.key)[0]
    assert fields["mode"] == "lock"
    assert fields["owner"] == ""
    assert fields["task"] == ""
    assert lock.release()


def test_fencing_counter_sits_beside_the_lock_key(backend: Backend, name: str) -> None:
    lock = backend.lock(name, ttl=10.0)
    assert lock.acquire(blocking=False)
    assert fence_key_for(lock.key) == lock.key + ":fence"
    assert backend.fences(lock.key) == [lock.fencing_token] * backend.n_masters
    assert lock.release()


# ------------------------------------------------------------------------------ cluster slots


@pytest.mark.parametrize(
    "lock_name", ["reports:daily", "user:{42}:report", "a", "x" * 120, "ünïcode:name"]
)
def test_every_key_of_one_lock_is_in_one_cluster_slot(
    cluster_backend: ClusterBackend, lock_name: str
) -> None:
    lock = cluster_backend.lock(lock_name, ttl=10.0)
    fence_key = fence_key_for(lock.key)
    assert cluster_backend.keyslot(lock.key) == cluster_backend.keyslot(fence_key)
    assert cluster_backend.keyslot(lock.key) == cluster_backend.keyslot(channel_for(lock.key))
    assert lock.acquire(blocking=False)
    # Both keys exist, on one node: the one that owns their slot.
    holding = cluster_backend.node_holding(lock.key)
    assert len(holding) == 1
    assert cluster_backend.node_holding(fence_key) == holding
    assert lock.release()
