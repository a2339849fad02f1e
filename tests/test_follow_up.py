"""The follow-up claim of ``lock_on_duplicate="coalesce"`` (``LockBackend.follow``/``unfollow``),
against the in-memory store and real ``redis-server`` processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from celery_singleton_lock.lock import try_acquire
from celery_singleton_lock.backends.base import LockBackend
from celery_singleton_lock.keys import follow_key_for
from tests.engine_fixtures import Backend, MemoryBackend, kind_params, make_backend

KEY = "csl:follow.sync:{89abcdef}"


@pytest.fixture(params=kind_params(["memory1", "memory3", "single", "redlock3", "cluster"]))
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    b = make_backend(request, request.param)
    yield b
    b.close()


def _store(b: Backend) -> LockBackend:
    return b.store if isinstance(b, MemoryBackend) else b.lock("follow").store


def test_one_follow_up_at_a_time_until_it_holds_the_lock(backend: Backend) -> None:
    store = _store(backend)
    holder, _ = try_acquire(store, KEY, 5.0, owner="holder", metadata=(("owner", "holder"),))
    assert holder is not None
    assert store.follow(KEY, "first", 10.0) is None
    assert store.follow(KEY, "first", 10.0) is None, "the follow-up refreshes its claim"
    assert store.follow(KEY, "second", 10.0) == "first"
    assert holder.release()
    assert store.follow(KEY, "second", 10.0) == "first", "it still waits to run"

    follow, _ = try_acquire(store, KEY, 5.0, owner="first", metadata=(("owner", "first"),))
    assert follow is not None
    # Running now, it waits no more: the next duplicate becomes the follow-up, even before
    # the claim is dropped.
    assert store.follow(KEY, "third", 10.0) is None
    store.unfollow(KEY, "first")  # not its claim any more: left alone
    assert store.follow(KEY, "fourth", 10.0) == "third"
    store.unfollow(KEY, "third")
    assert store.follow(KEY, "fourth", 10.0) is None
    store.unfollow(KEY, "fourth")
    assert follow.release()
    assert backend.pttls(follow_key_for(KEY)) == [-2] * backend.n_masters


def test_a_follow_up_claim_lapses_after_its_ttl(backend: Backend) -> None:
    store = _store(backend)
    holder, _ = try_acquire(store, KEY, 5.0, owner="holder", metadata=(("owner", "holder"),))
    assert holder is not None
    assert store.follow(KEY, "first", 1.0) is None
    assert all(0 < p <= 1000 for p in backend.pttls(follow_key_for(KEY)))
    assert holder.release()
