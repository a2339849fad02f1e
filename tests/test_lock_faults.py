"""The lock under stress and faults, against real ``redis-server`` processes (SPEC 6, 7, 10).

* mutual exclusion between forked processes, checked by a counter on a separate server;
* ownership: a holder whose lock expired never releases or extends its successor's lock;
* hung (SIGSTOP), stopped and restarted Redlock masters;
* renewal: long holds of short-ttl locks, 1,000 locks renewed in batches, lost locks;
* bad configuration and unreachable stores, with passwords kept out of messages;
* TLS, ACL users and unix sockets through the lock's own URLs.

Redis servers are started once per session (conftest) or once per module; faults are healed by
the fixtures before the next test.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import threading
import time
import warnings
from collections.abc import Iterator
from itertools import pairwise
from typing import Any

import pytest
import redis

from celery_singleton_lock.errors import LockBackendError, LockConfigError
from celery_singleton_lock.lease import Lease
from celery_singleton_lock.lock import Redlock
from celery_singleton_lock.renewer import get_renewer
from celery_singleton_lock.backends.quorum import Quorum
from celery_singleton_lock.backends.redis.wire import SCRIPTS
from celery_singleton_lock.backends.registry import open_backend
from tests.engine_fixtures import Backend, RedisBackend, make_backend
from tests.servers import RedisServer, RedisTLSUnsupported, StoreTarget, free_port, wait_until

PASSWORD = "s3cr3t-pw"
#: The per-master socket timeout every test here uses (the SPEC default).
SOCKET_TIMEOUT_S = 0.2


#: Run on one Redis and on three Redlock masters (conftest's session servers).
on_single_and_redlock3 = pytest.mark.parametrize("store_url", ["single", "redlock3"], indirect=True)
#: Run on three Redlock masters only.
on_redlock3 = pytest.mark.parametrize("store_url", ["redlock3"], indirect=True)


@pytest.fixture
def backend(store_url: StoreTarget) -> Iterator[RedisBackend]:
    """The healed, flushed store behind ``store_url``, with clients of every master."""
    b = RedisBackend(store_url, socket_timeout=SOCKET_TIMEOUT_S)
    yield b
    b.close()


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    return f"faults:{request.node.originalname}"


def _warm_up(backend: Backend) -> None:
    """Run one lock cycle so every master has a pooled connection and cached scripts."""
    lock = backend.lock("faults:warm-up", ttl=5.0)
    assert lock.acquire(blocking=False)
    assert lock.extend()
    assert lock.release()


# ------------------------------------------------------------------------------ mutual exclusion

PROCESSES = 8
ITERATIONS = 50


def _contend(
    url: Any, lock_name: str, counter_url: str, iterations: int, start: Any
) -> None:  # pragma: no cover - runs in forked children
    counter = redis.Redis.from_url(counter_url, socket_timeout=10)
    lock = Redlock(lock_name, url=url, ttl=10.0, socket_timeout=SOCKET_TIMEOUT_S)
    start.wait(10)
    most_inside = 0
    for _ in range(iterations):
        with lock:
            inside = int(counter.incr("inside"))
            most_inside = max(most_inside, inside)
            seq = int(counter.incr("entries"))
            counter.hset("fence_by_entry", str(seq), str(lock.fencing_token))
            time.sleep(0.001)  # stay inside a little, so any overlap would be seen
            counter.decr("inside")
    counter.rpush("most_inside", most_inside)
    counter.close()


@pytest.mark.slow
@on_single_and_redlock3
def test_forked_processes_never_hold_the_lock_together(
    backend: RedisBackend, redis_server_module: RedisServer, name: str
) -> None:
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs = [
        ctx.Process(
            target=_contend,
            args=(backend.url, name, redis_server_module.url, ITERATIONS, start),
        )
        for _ in range(PROCESSES)
    ]
    with warnings.catch_warnings():  # Python 3.12+ warns about fork with threads running
        warnings.simplefilter("ignore", DeprecationWarning)
        for p in procs:
            p.start()
    start.set()
    try:
        for p in procs:
            p.join(60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    assert [p.exitcode for p in procs] == [0] * PROCESSES

    with redis_server_module.client(decode_responses=True) as counter:
        assert int(counter.get("entries") or 0) == PROCESSES * ITERATIONS
        assert int(counter.get("inside") or 0) == 0
        most_inside = [int(v) for v in counter.lrange("most_inside", 0, -1)]
        fences = counter.hgetall("fence_by_entry")
    assert len(most_inside) == PROCESSES
    assert max(most_inside) <= 1, f"critical sections overlapped: {most_inside}"
    # Every holder, in the order they entered, had a larger fencing token than the last.
    ordered = [int(fences[str(seq)]) for seq in range(1, PROCESSES * ITERATIONS + 1)]
    assert all(b > a for a, b in pairwise(ordered))
    assert backend.key_gone_everywhere(f"csl:{{{name}}}")


# ------------------------------------------------------------------------------ ownership


@on_single_and_redlock3
def test_expired_holder_can_neither_release_nor_extend_its_successors_lock(
    backend: RedisBackend, name: str
) -> None:
    stale = backend.lock(name, ttl=0.3)
    assert stale.acquire(blocking=False)
    wait_until(lambda: backend.key_gone_everywhere(stale.key), 3.0, message="expiry")
    successor = backend.lock(name, ttl=10.0, owner="successor")
    assert successor.acquire(blocking=False)
    before = backend.hashes(successor.key)

    assert stale.extend(ttl=600.0) is False
    assert stale.release() is False

    after = backend.hashes(successor.key)
    assert after == before  # token, owner and renewal count untouched
    assert [h["token"] for h in after] == [successor.token] * backend.n_masters
    assert all(0 < p <= 10_000 for p in backend.pttls(successor.key))  # not extended to 600 s
    assert successor.owned()
    assert successor.release()


@on_single_and_redlock3
def test_release_after_expiry_and_takeover_leaves_the_new_holder_in_place(
    backend: RedisBackend, name: str
) -> None:
    stale = backend.lock(name, ttl=0.3)
    assert stale.acquire(blocking=False)
    successor = backend.lock(name, ttl=10.0)
    wait_until(lambda: successor.acquire(blocking=False), 3.0, message="takeover after expiry")
    assert stale.release() is False  # compare-and-delete: the token is not ours any more
    assert backend.tokens(successor.key) == [successor.token] * backend.n_masters
    assert successor.release()


# ------------------------------------------------------------------------------ Redlock faults


@on_redlock3
@pytest.mark.parametrize("hung", [0, 2])
def test_one_hung_master_of_three_costs_about_one_socket_timeout(
    backend: RedisBackend, name: str, hung: int
) -> None:
    _warm_up(backend)
    backend.target.servers[hung].pause()
    lock = backend.lock(name, ttl=10.0)

    started = time.monotonic()
    assert lock.acquire(blocking=False) is True
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, elapsed
    up = [i for i in range(3) if i != hung]
    assert [backend.client(i).hget(lock.key, "token") for i in up] == [lock.token] * 2
    assert lock.extend() is True
    assert lock.owned()
    started = time.monotonic()
    assert lock.release() is True
    assert time.monotonic() - started < 1.0


@on_redlock3
def test_one_stopped_master_of_three_changes_nothing_visible(
    backend: RedisBackend, name: str
) -> None:
    backend.take_down(1)
    with backend.lock(name, ttl=10.0) as lock:
        assert lock.owned()
        assert backend.lock(name).acquire(blocking=False) is False
    assert backend.lock(name).acquire(blocking=False) is True


@on_redlock3
@pytest.mark.parametrize("fault", ["pause", "stop"])
def test_two_masters_of_three_down_raise_backend_error_and_leave_no_key(
    backend: RedisBackend, name: str, fault: str
) -> None:
    _warm_up(backend)  # pooled connections: a paused master runs its queued commands later
    servers = backend.target.servers
    for i in (1, 2):
        servers[i].pause() if fault == "pause" else servers[i].stop()
    lock = backend.lock(name, ttl=10.0)
    try:
        with pytest.raises(LockBackendError) as info:
            lock.acquire(blocking=False)
        message = str(info.value)
        assert lock.key in message and info.value.lock_key == lock.key
        assert "fewer than 2 of 3 masters" in message
        assert lock.token is None
        # The grant of the master that answered was undone at once.
        assert not backend.client(0).exists(lock.key)
    finally:
        for i in (1, 2):
            servers[i].heal()
    # A master that ran the acquire late is cleaned up in the background, long before the
    # lock's 10 s ttl would remove it.
    healed_at = time.monotonic()
    wait_until(lambda: backend.key_gone_everywhere(lock.key), 2.0, message="cleanup")
    assert time.monotonic() - healed_at < 2.0
    assert lock.acquire(blocking=False)
    assert lock.release()


@on_redlock3
def test_release_refused_by_one_master_is_retried_in_the_background_before_the_ttl(
    backend: RedisBackend, name: str
) -> None:
    lock = backend.lock(name, ttl=30.0)
    assert lock.acquire(blocking=False)
    token = lock.token
    # Master 0 keeps its data but turns the lock's clients away: a password appears and
    # their connections are dropped (the admin connection issuing the commands survives).
    admin = backend.client(0)
    admin.config_set("requirepass", PASSWORD)
    try:
        admin.client_kill_filter(_type="normal", skipme=True)
        assert lock.release() is True  # masters 1 and 2 are a quorum
        assert admin.hget(lock.key, "token") == token  # master 0 still has it
    finally:
        admin.config_set("requirepass", "")
    back_at = time.monotonic()
    wait_until(lambda: not admin.exists(lock.key), 3.0, message="background release retry")
    assert time.monotonic() - back_at < 3.0  # the ttl (30 s) did not do it
    assert backend.key_gone_everywhere(lock.key)


@on_redlock3
def test_with_block_raises_backend_error_when_no_quorum_answers(
    backend: RedisBackend, name: str
) -> None:
    backend.take_down(0)
    backend.take_down(2)
    body_ran = False
    with pytest.raises(LockBackendError):
        with backend.lock(name, ttl=5.0):
            body_ran = True
    assert not body_ran


@on_redlock3
def test_restarted_master_with_empty_script_cache_still_serves_release_and_extend(
    backend: RedisBackend, name: str
) -> None:
    _warm_up(backend)
    held = backend.lock(name, ttl=10.0)
    assert held.acquire(blocking=False)
    backend.target.servers[0].restart()
    restarted = backend.client(0)
    shas = [SCRIPTS[s].sha for s in ("acquire", "extend", "release")]
    assert restarted.script_exists(*shas) == [False, False, False]

    # The lock held before the restart: two masters still have it.
    assert held.extend() is True
    # A lock taken after the restart lives on the restarted master too.
    fresh = backend.lock(f"{name}:after", ttl=10.0)
    assert fresh.acquire(blocking=False)
    assert restarted.hget(fresh.key, "token") == fresh.token
    assert fresh.extend(ttl=60.0) is True
    assert restarted.pttl(fresh.key) > 50_000  # the extend ran there, through EVAL
    assert restarted.script_exists(*shas) == [True, True, False]
    assert fresh.release() is True
    assert not restarted.exists(fresh.key)  # so did the release
    assert restarted.script_exists(*shas) == [True, True, True]
    assert held.release() is True
    assert backend.key_gone_everywhere(held.key)


@on_redlock3
def test_masters_restarted_one_at_a_time_never_leave_a_renewed_holder_short_of_a_quorum(
    backend: RedisBackend, name: str
) -> None:
    """Each master comes back empty; renewal puts the lock back there before the next goes."""
    _warm_up(backend)
    lost = threading.Event()
    held = backend.lock(name, ttl=0.9, renew=True, on_lost=lambda lease: lost.set())
    assert held.acquire(blocking=False)
    assert held.lease is not None
    token, fence = held.token, held.fencing_token
    fence_key = f"{held.key}:fence"
    for index in range(backend.n_masters):
        backend.target.servers[index].restart()  # back without keys (no persistence)
        restarted = backend.client(index)
        # The next renewal (ttl/3 = 0.3 s) puts it back, with its holder and fencing counter
        # (on a loaded machine it may already have, by the time this client connects).
        wait_until(lambda c=restarted: c.hget(held.key, "token") == token, 3.0,
                   message=f"renewal putting the lock back on restarted master {index}")
        fields = restarted.hgetall(held.key)
        assert fields["owner"] == held.owner and 0 < restarted.pttl(held.key) <= 900
        assert int(restarted.get(fence_key) or 0) >= fence
        assert backend.tokens(held.key) == [token] * backend.n_masters
        # A competitor finds it held throughout.
        assert backend.lock(name, ttl=5.0).acquire(blocking=False) is False
    assert not lost.is_set()
    assert held.lease.lost is False
    # After every master was restarted, a new acquisition still gets a larger fencing token.
    assert held.release() is True
    after = backend.lock(name, ttl=5.0)
    assert after.acquire(blocking=False)
    assert after.fencing_token > fence
    after.release()


@on_redlock3
def test_renewal_puts_nothing_back_when_two_masters_lost_the_lock_at_once(
    backend: RedisBackend, name: str
) -> None:
    """Short of a quorum, the lock is lost (lock_on_lost), and no copy is put back."""
    called = threading.Event()
    held = backend.lock(name, ttl=0.9, renew=True, on_lost=lambda lease: called.set())
    assert held.acquire(blocking=False)
    # Both down together, then both back empty: no renewal can run between the two (restarting
    # them one after the other would let a renewal put the lock back on the first).
    backend.target.servers[0].stop()
    backend.target.servers[1].stop()
    backend.target.servers[0].heal()
    backend.target.servers[1].heal()
    assert called.wait(3.0), "on_lost was not called"
    assert held.lease is not None and held.lease.lost
    assert backend.tokens(held.key)[:2] == [None, None]
    competitor = backend.lock(name, ttl=5.0)
    assert competitor.acquire(blocking=False)  # a majority of free masters: it may run
    competitor.release()


@pytest.mark.parametrize("store_url", ["single"], indirect=True)
def test_flushed_script_cache_does_not_break_extend_or_release(
    backend: RedisBackend, name: str
) -> None:
    lock = backend.lock(name, ttl=10.0)
    assert lock.acquire(blocking=False)
    backend.client(0).script_flush()
    assert lock.extend(ttl=60.0) is True
    assert backend.client(0).pttl(lock.key) > 50_000
    backend.client(0).script_flush()
    assert lock.release() is True
    assert not backend.client(0).exists(lock.key)


# ------------------------------------------------------------------------------ renewal


@pytest.mark.slow
def test_with_block_keeps_a_1s_lock_for_5s(request: pytest.FixtureRequest, name: str) -> None:
    backends = [make_backend(request, "single"), make_backend(request, "redlock3")]
    try:
        with contextlib.ExitStack() as stack:
            locks = [stack.enter_context(b.lock(name, ttl=1.0)) for b in backends]
            deadline = time.monotonic() + 5.0
            checks = 0
            while time.monotonic() < deadline:
                for b, lock in zip(backends, locks, strict=True):
                    assert b.tokens(lock.key) == [lock.token] * b.n_masters, (b, checks)
                checks += 1
                time.sleep(0.1)
            assert checks >= 40
            for b, lock in zip(backends, locks, strict=True):
                assert lock.owned()
                renewals = [int(h["renewals"]) for h in b.hashes(lock.key)]
                assert min(renewals) >= 12  # every ttl/3 for 5 s
                assert lock.lease is not None and not lock.lease.lost
        for b in backends:
            assert b.key_gone_everywhere(f"csl:{{{name}}}")
    finally:
        for b in backends:
            b.close()


def _commandstats(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


class RoundTrips:
    """Counts the round trips a store makes to each master (a spy on each node's ``send``).

    Only batches of renewals (``extend`` script calls) are counted, from the moment the spy
    is installed: nothing is ever reset, so a batch in flight at a reset cannot be half
    counted.
    """

    def __init__(self, store: Quorum) -> None:
        self.per_node = [0] * len(store.members)
        self.calls_per_node = [0] * len(store.members)
        for i, member in enumerate(store.members):
            node = member.node  # type: ignore[attr-defined]
            send = node.send

            def counting(calls: Any, *args: Any, _i: int = i, _send: Any = send) -> Any:
                if calls and all(c.script == "extend" for c in calls):
                    self.per_node[_i] += 1
                    self.calls_per_node[_i] += len(calls)
                return _send(calls, *args)

            node.send = counting  # type: ignore[method-assign]


LOCKS = 1000


@pytest.mark.slow
@on_single_and_redlock3
def test_thousand_locks_are_renewed_in_one_round_trip_per_master_per_batch(
    backend: RedisBackend,
) -> None:
    clients = [backend.client(i) for i in range(backend.n_masters)]
    # Counted from here, before the first lock: only renewals (extend.lua) run HINCRBY, so
    # the servers' HINCRBY count is the number of renewals they ran, with no reset racing a
    # renewal batch already on its way.
    for c in clients:
        c.config_resetstat()
    renewer = get_renewer()
    batches0 = renewer.batches
    store = open_backend(backend.url, socket_timeout=SOCKET_TIMEOUT_S)
    assert isinstance(store, Quorum)
    trips = RoundTrips(store)
    locks = [Redlock(f"bulk:{i}", store=store, ttl=1.5, renew=True) for i in range(LOCKS)]
    try:
        for lock in locks:
            assert lock.acquire(blocking=False)
        renewals_at_start, batches_at_start = renewer.renewals, renewer.batches

        # Two renewal periods (ttl/3 = 0.5 s each) renew every lock at least twice.
        wait_until(
            lambda: renewer.renewals - renewals_at_start >= 2 * LOCKS, 5.0,
            message="2 renewal rounds",
        )

        def snapshot() -> Any:
            """Counters read with no renewal batch in flight (a batch every 0.5 s), or None.

            A batch counts a round trip per master when it is sent, and a batch when every
            reply is in: equal counts, unchanged while the servers are read, mean no batch
            was on its way.
            """
            before = (renewer.batches, list(trips.per_node), list(trips.calls_per_node))
            stats = [_commandstats(c) for c in clients]
            after = (renewer.batches, list(trips.per_node), list(trips.calls_per_node))
            settled = before == after and all(n == after[0] - batches0 for n in after[1])
            return (after, stats) if settled else None

        (batches_now, round_trips, sent), stats = wait_until(
            snapshot, 3.0, message="counters read between batches, round trips == batches"
        )
        batches = batches_now - batches0
        # Batching, once every lock is held (the renewals while 1000 locks were being taken
        # come in smaller batches; a batch finishing as the acquisitions end may count here).
        batches_held = batches_now - batches_at_start
        renewed_held = renewer.renewals - renewals_at_start

        for i in range(backend.n_masters):
            # Every renewal is one extend script call on every master ...
            assert stats[i].get("hincrby", 0) == sent[i]
            assert sent[i] >= 2 * LOCKS
            # ... and a whole batch of them travels in one round trip to that master.
            assert round_trips[i] == batches
        assert batches_held <= 7, f"{batches_held} batches for {renewed_held} renewals"
        assert renewed_held / batches_held >= LOCKS / 4
        for lock in locks[:: LOCKS // 10]:
            assert int(clients[0].hget(lock.key, "renewals") or 0) >= 2
    finally:
        for lock in locks:
            lock.release()
        store.close()
    assert all(lock.lease is None for lock in locks)
    assert not any(le.store is store for le in renewer.leases())


@on_single_and_redlock3
def test_renewal_that_finds_the_lock_gone_marks_it_lost_and_calls_on_lost(
    backend: RedisBackend, name: str
) -> None:
    lost: list[Lease] = []
    called = threading.Event()

    def on_lost(lease: Lease) -> None:
        lost.append(lease)
        called.set()

    lock = backend.lock(name, ttl=0.9, renew=True, on_lost=on_lost)
    assert lock.acquire(blocking=False)
    for i in range(backend.n_masters):
        backend.client(i).delete(lock.key)
    assert called.wait(2.0), "on_lost was not called"
    assert lost == [lock.lease]
    assert lock.lease is not None and lock.lease.lost
    assert "gone" in lock.lease.lost_reason
    assert lock.owned() is False
    assert lock.lease not in get_renewer().leases()  # no more renewals of a lost lock
    assert lock.release() is False
    assert backend.key_gone_everywhere(lock.key)  # renewal did not bring it back


@on_single_and_redlock3
def test_renewal_never_extends_a_lock_held_by_another_token(
    backend: RedisBackend, name: str
) -> None:
    called = threading.Event()
    lock = backend.lock(name, ttl=0.9, renew=True, on_lost=lambda lease: called.set())
    assert lock.acquire(blocking=False)
    for i in range(backend.n_masters):
        client = backend.client(i)
        client.hset(lock.key, mapping={"token": "someone-else", "renewals": "7"})
        client.persist(lock.key)
    assert called.wait(2.0), "on_lost was not called"
    for fields, pttl in zip(backend.hashes(lock.key), backend.pttls(lock.key), strict=True):
        assert fields["token"] == "someone-else"
        assert fields["renewals"] == "7"
        assert pttl == -1  # no expiry was set on the foreign lock
    assert lock.release() is False
    assert backend.tokens(lock.key) == ["someone-else"] * backend.n_masters


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (f"http://:{PASSWORD}@127.0.0.1:6379/0", "scheme 'http'"),
        (f"redis://:{PASSWORD}@127.0.0.1:notaport/0", "Port"),
        (f"redis://:{PASSWORD}@127.0.0.1:6379/zero", "database 'zero'"),
        ([], "empty"),
        ("", "empty"),
        ([f"redis://:{PASSWORD}@a:1/0", f"redis://:{PASSWORD}@a:1/0"], "listed twice"),
        (None, "url is required"),
    ],
)
def test_bad_url_is_a_config_error_naming_the_url_without_its_password(
    url: Any, problem: str
) -> None:
    with pytest.raises(LockConfigError) as info:
        Redlock("faults:bad", url=url)
    assert info.value.setting == "url"
    assert problem in str(info.value)
    assert PASSWORD not in str(info.value)
    assert PASSWORD not in repr(info.value)


@pytest.mark.parametrize(
    ("option", "value", "shown"),
    [
        ("ttl", 0, "got 0"),
        ("ttl", -1.5, "got -1.5"),
        ("ttl", math.nan, "got nan"),
        ("ttl", math.inf, "got inf"),
        ("ttl", "abc", "got str 'abc'"),
        ("ttl", None, "got NoneType None"),
        ("ttl", True, "got bool True"),
        ("socket_timeout", 0, "got 0"),
        ("socket_timeout", "fast", "got str 'fast'"),
    ],
)
def test_bad_ttl_is_a_config_error_naming_the_option_and_value(
    option: str, value: Any, shown: str
) -> None:
    with pytest.raises(LockConfigError) as info:
        Redlock("faults:bad", url="redis://127.0.0.1:1/0", **{option: value})
    assert info.value.setting == option
    assert str(info.value).startswith(option)
    assert shown in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"name": ""}, "name"),
        ({"key_prefix": "has space"}, "key_prefix"),
        ({"key_prefix": "{tag}"}, "key_prefix"),
        ({"key_prefix": ""}, "key_prefix"),
    ],
)
def test_bad_name_or_prefix_is_a_config_error_naming_it(
    kwargs: dict[str, Any], setting: str
) -> None:
    kwargs = {"name": "faults:bad", **kwargs}
    with pytest.raises(LockConfigError) as info:
        Redlock(url="redis://127.0.0.1:1/0", **kwargs)
    assert info.value.setting == setting
    assert setting in str(info.value)


def test_bad_extend_ttl_is_a_config_error() -> None:
    from celery_singleton_lock.backends.memory import memory_store

    lock = Redlock("faults:extend", store=memory_store(), ttl=5.0)
    assert lock.acquire(blocking=False)
    for bad in (0, -1, math.nan, "abc"):
        with pytest.raises(LockConfigError, match="ttl"):
            lock.extend(ttl=bad)
    assert lock.owned()
    assert lock.release()


def test_store_with_no_master_is_a_config_error() -> None:
    with pytest.raises(LockConfigError, match="at least one master"):
        Quorum([])


@pytest.mark.parametrize("masters", [1, 3])
def test_unreachable_store_is_a_backend_error_that_hides_the_password(masters: int) -> None:
    ports: set[int] = set()
    while len(ports) < masters:
        ports.add(free_port())
    urls = [f"redis://:{PASSWORD}@127.0.0.1:{port}/0" for port in sorted(ports)]
    lock = Redlock("faults:unreachable", url=urls if masters > 1 else urls[0], ttl=5.0)
    assert PASSWORD not in repr(lock)
    assert PASSWORD not in repr(lock.store)
    assert PASSWORD not in lock.store.description

    started = time.monotonic()
    with pytest.raises(LockBackendError) as info:
        lock.acquire(blocking=False)
    assert time.monotonic() - started < 2.0
    message = str(info.value)
    assert PASSWORD not in message and PASSWORD not in repr(info.value)
    assert lock.key in message
    assert f"redis://:***@127.0.0.1:{min(ports)}/0" in message  # names a master, redacted
    with pytest.raises(LockBackendError):
        with lock:
            pass  # pragma: no cover - never entered
    with pytest.raises(LockBackendError):
        lock.acquire(timeout=1.0)


# ------------------------------------------------------------------------------ TLS, ACL, unix


@pytest.fixture(scope="module")
def tls_server() -> Iterator[RedisServer]:
    server = RedisServer(tls=True)
    try:
        server.start()
    except RedisTLSUnsupported as exc:
        server.close()
        pytest.skip(f"redis-server built without TLS: {exc}")
    yield server
    server.close()


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    with RedisServer(username="locker", password=PASSWORD) as server:
        yield server


@pytest.fixture(scope="module")
def unix_server() -> Iterator[RedisServer]:
    with RedisServer(unix=True, password=PASSWORD) as server:
        yield server


def _full_cycle(lock: Redlock, servers: list[RedisServer]) -> None:
    assert lock.acquire(blocking=False)
    for server in servers:
        with server.client(decode_responses=True) as client:
            assert client.hget(lock.key, "token") == lock.token
    assert lock.extend()
    assert lock.owned()
    assert lock.release()
    for server in servers:
        with server.client() as client:
            assert not client.exists(lock.key)


@pytest.mark.parametrize("tls_query", ["ssl_ca_certs", "ssl_cert_reqs=none"])
def test_lock_over_tls_through_its_rediss_url(tls_server: RedisServer, tls_query: str) -> None:
    query = f"ssl_ca_certs={tls_server.ca_path}" if tls_query == "ssl_ca_certs" else tls_query
    url = f"{tls_server.url}?{query}"
    assert url.startswith("rediss://")
    _full_cycle(Redlock(f"faults:tls:{tls_query}", url=url, ttl=5.0), [tls_server])


def test_tls_certificate_is_verified_by_default(tls_server: RedisServer) -> None:
    lock = Redlock("faults:tls-unverified", url=tls_server.url, ttl=5.0)
    with pytest.raises(LockBackendError, match="CERTIFICATE_VERIFY_FAILED"):
        lock.acquire(blocking=False)


def test_lock_with_acl_user_and_password(acl_server: RedisServer) -> None:
    assert acl_server.url.startswith(f"redis://locker:{PASSWORD}@")
    lock = Redlock("faults:acl", url=acl_server.url, ttl=5.0)
    assert PASSWORD not in repr(lock)
    _full_cycle(lock, [acl_server])


def test_wrong_acl_password_is_a_backend_error_without_either_password(
    acl_server: RedisServer,
) -> None:
    wrong = "wr0ng-pw-123"
    lock = Redlock("faults:acl-wrong", url=acl_server.url.replace(PASSWORD, wrong), ttl=5.0)
    with pytest.raises(LockBackendError) as info:
        lock.acquire(blocking=False)
    assert "invalid username-password pair" in str(info.value)
    assert wrong not in str(info.value) and PASSWORD not in str(info.value)


def test_redlock_over_tls_acl_and_unix_socket_masters(
    tls_server: RedisServer, acl_server: RedisServer, unix_server: RedisServer
) -> None:
    urls = [
        f"{tls_server.url}?ssl_ca_certs={tls_server.ca_path}",
        acl_server.url,
        unix_server.url,
    ]
    assert urls[2].startswith("unix://")
    lock = Redlock("faults:mixed", url=urls, ttl=5.0)
    assert lock.store.n_masters == 3
    assert PASSWORD not in repr(lock)
    _full_cycle(lock, [tls_server, acl_server, unix_server])
    with lock:
        assert Redlock("faults:mixed", url=urls).acquire(blocking=False) is False
    assert os.path.exists(unix_server.socket_path or "")
