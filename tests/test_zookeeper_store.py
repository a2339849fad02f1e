"""The ZooKeeper store against a real ZooKeeper server (tests/zk_server.py).

What the contract suite (test_store_contract.py) does not reach: the ZooKeeper-specific
promises of issue 15 and of the README's ZooKeeper section. The line of waiters (first come,
first served, each woken by its predecessor's watch), fencing tokens from creation zxids, the
lock following its session (expiry, a killed holder, a restarted or frozen server), adoption
by another session, handover across sessions, parents removed, listing in pages, URL errors,
fork safety and credentials kept out of logs.

Every store here is opened with a socket timeout of 2 s (ZooKeeper writes, on a loaded
two-core machine) unless the test is about timeouts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from celery_singleton_lock.backends.base import Capability, LockBackend, Renewal, require
from celery_singleton_lock.backends.registry import open_backend
from celery_singleton_lock.errors import LockBackendError, LockConfigError
from tests.apps.common import configure
from tests.servers import RedisServer, wait_until
from tests.workers import CeleryWorker
from tests.zk_server import ZooKeeperServer

kazoo = pytest.importorskip("kazoo")
from kazoo.client import KazooClient  # noqa: E402

from celery_singleton_lock.backends.zookeeper import (  # noqa: E402
    ZooKeeperBackend,
    _bucket,
    _encode,
    parse_zookeeper_url,
)

#: A waiter is woken within 100 ms of the release (SPEC 5); measured on a quiet machine in
#: a few ms, the bound has room for a loaded one.
WAKE_BOUND_S = 0.1
TIMEOUT_S = 2.0


@pytest.fixture
def url(zookeeper_server: ZooKeeperServer) -> str:
    """A fresh chroot on the session's server, so no test sees another's nodes."""
    return zookeeper_server.url()


@pytest.fixture
def open_store(url: str) -> Iterator[Callable[..., ZooKeeperBackend]]:
    opened: list[LockBackend] = []

    def make(where: str | None = None, *, socket_timeout: float = TIMEOUT_S,
             **options: Any) -> ZooKeeperBackend:
        target = where or url
        if options:
            target += "?" + "&".join(f"{k}={v}" for k, v in options.items())
        store = open_backend(target, socket_timeout=socket_timeout)
        assert isinstance(store, ZooKeeperBackend)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def raw(zookeeper_server: ZooKeeperServer) -> Iterator[KazooClient]:
    """A plain kazoo client of the whole tree, to look at the nodes from outside."""
    client = KazooClient(hosts=zookeeper_server.hosts, timeout=5.0)
    client.start(timeout=10)
    yield client
    client.stop()
    client.close()


def new_key() -> str:
    return f"csl:zk.test:{{{uuid.uuid4().hex}}}"


def tok() -> str:
    return uuid.uuid4().hex


def meta(owner: str) -> tuple[tuple[str, Any], ...]:
    return (("owner", owner), ("task", "zk.test"), ("hostname", "here"), ("pid", os.getpid()),
            ("mode", "while_executing"), ("acquired_at", time.time()), ("ttl", 30.0))


def parent_path(url: str, key: str) -> str:
    chroot = parse_zookeeper_url(url).chroot
    return f"{chroot}/locks/{_bucket(key)}/{_encode(key)}"


# -- URLs and capabilities -------------------------------------------------------------------


@pytest.mark.parametrize("bad, why", [
    ("zookeeper://", "names no host"),
    ("zookeeper://h1:2181,:2181/x", "empty host"),
    ("zookeeper://h1:99999/x", "bad port"),
    ("zookeeper://h1:21x1/x", "bad port"),
    ("zookeeper://h1:2181/a//b", "bad chroot"),
    ("zookeeper://h1:2181/a/../b", "bad chroot"),
    ("zookeeper://h1:2181/x?session_timeout=soon", "expected seconds"),
    ("zookeeper://h1:2181/x?session_timeout=-1", "positive"),
    ("zookeeper://h1:2181/x?sessiontimeout=1", "unknown option"),
    ("zookeeper://alice@h1:2181/x", "user:password"),
])
def test_a_bad_url_raises_lock_config_error_naming_the_setting(bad: str, why: str) -> None:
    with pytest.raises(LockConfigError, match=why) as info:
        open_backend(bad, setting="singleton_lock_url")
    assert info.value.setting == "singleton_lock_url"
    assert "singleton_lock_url" in str(info.value)


def test_a_list_of_zookeeper_urls_is_refused_one_url_lists_the_ensemble() -> None:
    with pytest.raises(LockConfigError, match="one URL whose hosts are separated by commas") \
            as info:
        open_backend(["zookeeper://h1:2181/a", "zookeeper://h2:2181/a"], setting="url")
    assert info.value.setting == "url"
    store = open_backend("zookeeper://h1:2181, h2 ,[::1]:2182/chroot/deep", setting="url")
    assert isinstance(store, ZooKeeperBackend)
    assert store.target.hosts == "h1:2181,h2:2181,[::1]:2182"
    assert store.target.chroot == "/chroot/deep"
    store.close()


def test_a_password_never_shows_in_the_description_or_errors() -> None:
    store = open_backend("zookeeper://alice:s3cret-pw@127.0.0.1:1/x?connect_timeout=0.3",
                         socket_timeout=0.2)
    assert "s3cret-pw" not in store.description and "***" in store.description
    try:
        with pytest.raises(LockBackendError) as info:
            store.holder(new_key())
        assert "s3cret-pw" not in str(info.value)
        result = store.acquire(new_key(), tok(), 5.0)
        assert result.backend_down and not result.acquired
        assert not any("s3cret-pw" in e for e in result.errors)
        answered, errors = store.ping()
        assert answered == 0 and errors and not any("s3cret-pw" in e for e in errors)
    finally:
        store.close()
    with pytest.raises(LockConfigError) as bad:
        open_backend("zookeeper://alice:s3cret-pw@h1:notaport/x")
    assert "s3cret-pw" not in str(bad.value)


def test_a_missing_kazoo_raises_lock_config_error_naming_the_extra() -> None:
    code = (
        "import sys; sys.modules['kazoo'] = None; sys.modules['kazoo.client'] = None\n"
        "from celery_singleton_lock.backends.registry import open_backend\n"
        "from celery_singleton_lock.errors import LockConfigError\n"
        "try:\n"
        "    open_backend('zookeeper://127.0.0.1:2181/x', setting='singleton_lock_url')\n"
        "except LockConfigError as exc:\n"
        "    print(exc.setting, '|', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.startswith("singleton_lock_url |")
    assert "pip install 'celery-singleton-lock[zookeeper]'" in out


def test_capabilities_say_session_not_ttl_so_until_expired_is_refused() -> None:
    store = ZooKeeperBackend(parse_zookeeper_url("zookeeper://h1/x"))
    assert Capability.SESSION in store.capabilities and Capability.TTL not in store.capabilities
    for cap in (Capability.NOTIFY, Capability.ADOPTABLE, Capability.LIMIT, Capability.FOLLOW,
                Capability.HANDOVER, Capability.BEAT, Capability.LIST):
        assert cap in store.capabilities
    with pytest.raises(LockConfigError, match="lock_mode"):
        require(store, Capability.TTL, "lock_mode='until_expired'", "lock_mode")


# -- the line ---------------------------------------------------------------------------------


def test_fencing_tokens_grow_with_every_acquisition_and_survive_handover_and_adoption(
        open_store: Callable[..., ZooKeeperBackend]) -> None:
    a, b = open_store(), open_store()
    key = new_key()
    fences = []
    for i in range(5):
        store = (a, b)[i % 2]
        t = tok()
        result = store.acquire(key, t, 30.0, meta(f"o{i}"))
        assert result.acquired, result
        fences.append(result.fence)
        assert store.release(key, t) is True  # the parent goes too: counting starts again
    assert fences == sorted(set(fences)), fences
    # A handover and an adoption keep the token: neither is a new acquisition.
    t1, t2 = tok(), tok()
    fence = a.acquire(key, t1, 30.0, meta("h")).fence
    assert fence > fences[-1]
    assert b.handover(key, t1, t2, 30.0, [("owner", "h2")]) == fence
    assert a.extend_many([Renewal(key, t2, 30_000)]) == [True]  # adopted back by a
    assert b.lock_info(key).fence == fence  # type: ignore[union-attr]
    assert a.release(key, t2) is True
    assert b.acquire(key, tok(), 30.0).fence > fence


def test_waiters_are_woken_by_their_predecessor_within_100ms_first_come_first_served(
        open_store: Callable[..., ZooKeeperBackend], url: str, raw: KazooClient) -> None:
    holder = open_store()
    key, held = new_key(), tok()
    assert holder.acquire(key, held, 30.0, meta("holder")).acquired
    order: list[tuple[str, float, int]] = []
    done = threading.Event()

    def waiter(name: str, store: LockBackend) -> None:
        t = tok()

        def tried() -> bool:
            result = store.acquire(key, t, 30.0, meta(name))
            if result.acquired:
                order.append((name, time.monotonic(), result.fence))
            return result.acquired

        assert store.wait_released(key, 20.0, tried)
        done.wait(20)
        store.release(key, t)

    parent = parent_path(url, key)
    threads = []
    for i, name in enumerate(["first", "second", "third"]):
        th = threading.Thread(target=waiter, args=(name, open_store()), daemon=True)
        th.start()
        threads.append(th)
        # Each waiter's ticket is in line before the next one starts.
        wait_until(lambda n=i: len(raw.get_children(parent)) == n + 2, 10,
                   message=f"ticket {i}")
    time.sleep(0.2)  # let the last waiter finish its try and set its watch
    wakes = []
    released = time.monotonic()
    assert holder.release(key, held) is True
    wait_until(lambda: len(order) == 1, 5, interval_s=0.002, message="the first waiter")
    wakes.append(order[0][1] - released)
    done.set()  # each holder releases at once: the next in line takes it
    for th in threads:
        th.join(20)
    assert [name for name, _, _ in order] == ["first", "second", "third"]
    fences = [f for _, _, f in order]
    assert fences == sorted(fences) and len(set(fences)) == 3
    assert wakes[0] < WAKE_BOUND_S, f"woken {wakes[0] * 1000:.0f} ms after the release"
    print(f"predecessor watch: first waiter held the lock {wakes[0] * 1000:.1f} ms after "
          "the release")
    wait_until(lambda: not raw.exists(parent), 5, message="the parent removed")


def test_a_waiter_that_gives_up_leaves_the_line(
        open_store: Callable[..., ZooKeeperBackend], url: str, raw: KazooClient) -> None:
    a, b = open_store(), open_store()
    key, t = new_key(), tok()
    assert a.acquire(key, t, 30.0).acquired
    started = time.monotonic()
    assert b.wait_released(key, 0.5, lambda: b.acquire(key, tok(), 30.0).acquired) is False
    assert 0.45 < time.monotonic() - started < 5.0
    assert len(raw.get_children(parent_path(url, key))) == 1  # its ticket is gone
    assert a.release(key, t)
    wait_until(lambda: not raw.exists(parent_path(url, key)), 5, message="the parent removed")


def test_a_refused_acquire_leaves_no_node_and_names_the_holder(
        open_store: Callable[..., ZooKeeperBackend], url: str, raw: KazooClient) -> None:
    a, b = open_store(), open_store()
    key, t = new_key(), tok()
    assert a.acquire(key, t, 30.0, meta("the-holder")).acquired
    refused = b.acquire(key, tok(), 30.0, meta("late"))
    assert not refused.acquired and not refused.backend_down
    assert refused.holder == "the-holder" and refused.holder_pttl_ms == -1
    assert len(raw.get_children(parent_path(url, key))) == 1
    again = a.acquire(key, t, 30.0)  # the holder's own token: still its lock, same fence
    assert again.acquired


def test_lock_limit_holds_the_n_lowest_and_a_release_frees_its_slot(
        open_store: Callable[..., ZooKeeperBackend]) -> None:
    a, b = open_store(), open_store()
    key = new_key()
    tokens = [tok() for _ in range(3)]
    results = [a.acquire_slot(key, t, 30.0, 2, meta(f"s{i}")) for i, t in enumerate(tokens)]
    assert [r.acquired for r in results] == [True, True, False]
    assert [r.key for r in results[:2]] == [f"{key}:slot:0", f"{key}:slot:1"]
    assert results[2].holder in ("s0", "s1")
    assert sorted(r.key for r in b.list_locks("csl:zk.test")
                  if r.key.startswith(key)) == [f"{key}:slot:0", f"{key}:slot:1"]
    assert b.holder(f"{key}:slot:1") == "s1" and b.lock_info(key) is None
    assert a.release(f"{key}:slot:0", tokens[0]) is True
    again = b.acquire_slot(key, tokens[2], 30.0, 2, meta("s2"))
    assert again.acquired and again.key == f"{key}:slot:0"
    assert again.fence > results[1].fence
    record = a.lock_info(f"{key}:slot:0")
    assert record is not None and record.task_id == "s2"
    assert a.force_release(record) == 1
    assert b.extend_many([Renewal(f"{key}:slot:0", tokens[2], 30_000),
                          Renewal(f"{key}:slot:1", tokens[1], 30_000)]) == [False, True]


# -- the session ------------------------------------------------------------------------------

HOLDER = """
import sys, time
from celery_singleton_lock.backends.registry import open_backend
from celery_singleton_lock.backends.base import Renewal
url, key, token = sys.argv[1:4]
store = open_backend(url, socket_timeout=2.0)
assert store.acquire(key, token, 30.0, [("owner", "child")]).acquired
print("held", flush=True)
for line in sys.stdin:
    verdict = None
    deadline = time.monotonic() + 15
    while verdict is None and time.monotonic() < deadline:  # undecided while reconnecting
        verdict = store.extend_many([Renewal(key, token, 30000)])[0]
        if verdict is None:
            time.sleep(0.1)
    print(verdict, flush=True)
"""


def _holder_process(url: str, key: str, token: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, url, key, token],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_killed_holders_lock_goes_at_its_session_timeout(
        open_store: Callable[..., ZooKeeperBackend], url: str) -> None:
    session_s = 1.5
    key = new_key()
    proc = _holder_process(f"{url}?session_timeout={session_s}", key, tok())
    waiter = open_store()
    try:
        assert waiter.holder(key) == "child"
        killed = time.monotonic()
        proc.kill()
        proc.wait(10)
        # The node follows the session, not the connection: still held just after the kill.
        assert waiter.holder(key) == "child"
        mine = tok()
        assert waiter.wait_released(key, 10.0, lambda: waiter.acquire(key, mine, 30.0).acquired)
        gone_after = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"killed holder's lock taken {gone_after:.2f} s after the kill "
          f"(session timeout {session_s} s)")
    assert gone_after < session_s + 2.0


def test_an_expired_session_releases_the_lock_and_the_holder_learns_it_is_lost(
        open_store: Callable[..., ZooKeeperBackend], url: str) -> None:
    key = new_key()
    proc = _holder_process(f"{url}?session_timeout=1", key, tok())
    waiter = open_store()
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write("extend\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "True"
        proc.send_signal(signal.SIGSTOP)  # no heartbeats: the server expires the session
        mine = tok()
        assert waiter.wait_released(key, 10.0, lambda: waiter.acquire(key, mine, 30.0).acquired)
        proc.send_signal(signal.SIGCONT)
        proc.stdin.write("extend\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "False"  # lost: lock_on_lost fires
        assert waiter.owned(key, mine)
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(10)


def test_closing_a_store_ends_its_session_and_its_locks_at_once(
        open_store: Callable[..., ZooKeeperBackend]) -> None:
    a, b = open_store(), open_store()
    key = new_key()
    assert a.acquire(key, tok(), 30.0).acquired
    a.close()
    assert b.holder(key) is None
    assert a.acquire(key, tok(), 30.0).acquired  # a closed store opens again


def test_a_process_that_exits_without_releasing_ends_its_session_at_exit(
        open_store: Callable[..., ZooKeeperBackend], url: str) -> None:
    key = new_key()
    code = ("import sys\nfrom celery_singleton_lock.backends.registry import open_backend\n"
            "store = open_backend(sys.argv[1], socket_timeout=2.0)\n"
            "assert store.acquire(sys.argv[2], 'tok', 30.0, [('owner', 'script')]).acquired\n")
    subprocess.run([sys.executable, "-c", code, url, key], check=True, timeout=60)
    ended = time.monotonic()
    # Gone at once (the session closed at exit), not a session timeout (20 s) later.
    assert open_store().holder(key) is None
    assert time.monotonic() - ended < 5.0


def test_renewal_by_another_session_adopts_the_lock(
        open_store: Callable[..., ZooKeeperBackend]) -> None:
    child, main, other = open_store(), open_store(), open_store()
    key, t = new_key(), tok()
    assert child.acquire(key, t, 30.0, meta("task-1")).acquired
    assert main.extend_many([Renewal(key, t, 30_000)]) == [True]
    child.close()  # the creating session ends: the adopted lock stays
    assert other.holder(key) == "task-1"
    assert main.owned(key, t)
    record = other.lock_info(key)
    assert record is not None and record.renewals == 1
    assert child.release(key, t) is True  # any session that knows the token releases it
    assert other.holder(key) is None


def test_a_handed_over_lock_outlives_the_session_that_took_it(
        open_store: Callable[..., ZooKeeperBackend]) -> None:
    client, worker, other = open_store(), open_store(), open_store()
    key, queued, running = new_key(), tok(), tok()
    fence = client.acquire(key, queued, 3600.0, meta("task-9")).fence
    assert worker.handover(key, queued, running, 30.0, [("owner", "task-9")]) == fence
    assert worker.handover(key, queued, tok(), 30.0) is None  # the old token holds nothing
    client.close()
    assert other.holder(key) == "task-9" and worker.owned(key, running)
    assert not worker.owned(key, queued)


def test_a_frozen_server_leaves_renewal_undecided_and_a_restarted_one_keeps_the_lock() -> None:
    with ZooKeeperServer() as server:
        url = server.url()
        store = open_backend(f"{url}?session_timeout=60", socket_timeout=0.5)
        other = open_backend(url, socket_timeout=2.0)
        try:
            key, t = new_key(), tok()
            assert store.acquire(key, t, 30.0).acquired
            lost_answer = new_key()
            server.pause()
            try:
                assert store.extend_many([Renewal(key, t, 30_000)]) == [None]
                result = store.acquire(lost_answer, tok(), 30.0)
                assert result.backend_down and not result.acquired
            finally:
                server.resume()
            wait_until(lambda: store.extend_many([Renewal(key, t, 30_000)]) == [True], 20,
                       message="renewal after the resume")
            # The acquire it gave up on ran when the server woke: its node, held by nobody,
            # is removed by the store's maintenance (the renewal thread), not left in line.
            late = tok()
            wait_until(lambda: other.acquire(lost_answer, late, 30.0).acquired, 10,
                       message="the node of the unanswered acquire removed")
            server.restart()  # same data: the session and its node come back with it
            verdicts: list[bool | None] = []
            wait_until(lambda: verdicts.append(store.extend_many(
                [Renewal(key, t, 30_000)])[0]) or verdicts[-1] is not None, 50,
                message="a decided renewal after the restart")
            if verdicts[-1]:  # the session survived: still held, by this holder alone
                assert not other.acquire(key, tok(), 30.0).acquired
                assert store.release(key, t) is True
            else:  # the server took longer than the session timeout to serve: reported lost
                assert other.acquire(key, tok(), 30.0).acquired
            print(f"after the restart the lock was {'kept' if verdicts[-1] else 'lost'}")
        finally:
            store.close()
            other.close()


def test_a_forked_child_opens_a_session_of_its_own(
        open_store: Callable[..., ZooKeeperBackend]) -> None:
    store = open_store()
    key, child_key, t = new_key(), new_key(), tok()
    assert store.acquire(key, t, 30.0).acquired
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            ok = (store.acquire(child_key, t, 30.0).acquired and store.holder(key) == ""
                  and not store.acquire(key, tok(), 30.0).acquired)
            store.close()  # ends the child's session only
            code = 0 if ok else 2
        finally:
            os.write(write, str(code).encode())
            os._exit(code)
    os.close(write)
    assert os.read(read, 8) == b"0"
    os.close(read)
    os.waitpid(pid, 0)
    assert store.owned(key, t)  # the parent's session was not touched
    assert store.holder(child_key) is None  # the child's lock ended with its session


def test_one_store_shared_by_threads_never_has_two_holders(
        open_store: Callable[..., ZooKeeperBackend]) -> None:
    store = open_store()
    key = new_key()
    inside, top, taken = [0], [0], [0]
    mutex = threading.Lock()

    def worker() -> None:
        for _ in range(15):
            t = tok()
            if store.acquire(key, t, 30.0).acquired:
                with mutex:
                    inside[0] += 1
                    top[0] = max(top[0], inside[0])
                    taken[0] += 1
                time.sleep(0.001)
                with mutex:
                    inside[0] -= 1
                assert store.release(key, t) is True

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert top[0] == 1 and taken[0] >= 1


# -- coalesce, beat, listing, housekeeping -----------------------------------------------------


def test_follow_and_beat_claims(open_store: Callable[..., ZooKeeperBackend]) -> None:
    store = open_store()
    key, leader, state = new_key(), tok(), new_key()
    assert store.acquire(key, tok(), 30.0, meta("running")).acquired
    assert store.follow(key, "next-1", 30.0) is None
    assert store.follow(key, "next-2", 30.0) == "next-1"
    assert store.follow(key, "next-1", 0.2) is None
    wait_until(lambda: store.follow(key, "next-2", 30.0) is None, 5,
               message="the expired follow-up replaced")
    store.unfollow(key, "next-2")
    assert store.follow(key, "next-3", 30.0) is None
    beat = new_key()
    assert store.acquire(beat, leader, 10.0).acquired
    assert store.claim_run(beat, leader, state, "e", 0.0, 100.0) == 1
    assert store.claim_run(beat, leader, state, "e", 0.0, 100.5) == 0
    assert store.claim_run(beat, tok(), state, "e", 100.0, 200.0) == -1
    assert store.claim_run(beat, leader, state, "e", 100.0, 200.0) == 1
    assert store.last_runs(state) == {"e": 200.0}
    assert store.last_runs(new_key()) == {}


def test_released_keys_leave_no_parent_and_listing_sweeps_empty_ones(
        open_store: Callable[..., ZooKeeperBackend], url: str, raw: KazooClient) -> None:
    store = open_store()
    keys = [new_key() for _ in range(20)]
    tokens = [tok() for _ in keys]
    for key, t in zip(keys, tokens, strict=True):
        assert store.acquire(key, t, 30.0).acquired
    for key, t in zip(keys, tokens, strict=True):
        assert store.release(key, t)
    # The parent's delete follows the node's in the same pipeline, unanswered.
    wait_until(lambda: not any(raw.exists(parent_path(url, k)) for k in keys), 5,
               message="every parent removed")
    stale = new_key()
    raw.ensure_path(parent_path(url, stale))  # as a crash between two writes would leave
    assert store.list_locks("csl:zk.test") == []
    wait_until(lambda: not raw.exists(parent_path(url, stale)), 5, message="the sweep")


@pytest.mark.slow
def test_listing_walks_buckets_in_pages_within_its_limit(
        open_store: Callable[..., ZooKeeperBackend], url: str, raw: KazooClient) -> None:
    store = open_store()
    n = 300
    keys = [f"csl:zk.list:{{{i:05d}}}" for i in range(n)]
    for i, key in enumerate(keys):
        assert store.acquire(key, tok(), 30.0, meta(f"o{i}")).acquired
    buckets = raw.get_children(f"{parse_zookeeper_url(url).chroot}/locks")
    assert 100 < len(buckets) <= 256  # spread out: no parent holds every key
    started = time.monotonic()
    records = store.list_locks("csl:zk.list")
    took = time.monotonic() - started
    assert sorted(r.key for r in records) == keys
    assert {r.task_id for r in records} == {f"o{i}" for i in range(n)}
    assert all(r.ttl_s is None and r.fence for r in records)
    assert len(store.list_locks("csl:zk.list", limit=7)) == 7
    assert sorted(r.key for r in store.list_locks("csl", pattern="csl:zk.list:{0001*")) == \
        keys[10:20]
    print(f"listed {n} locks in {took * 1000:.0f} ms")


def test_credentials_never_reach_the_logs(url: str, caplog: pytest.LogCaptureFixture) -> None:
    authed = url.replace("zookeeper://", "zookeeper://alice:pw-9f8e7d@")
    caplog.set_level(1)  # everything, kazoo's request dumps included
    store = open_backend(authed, socket_timeout=TIMEOUT_S)
    try:
        key, t = new_key(), tok()
        assert store.acquire(key, t, 30.0).acquired
        assert store.release(key, t)
        assert store.ping() == (1, [])
    finally:
        store.close()
    assert caplog.records, "nothing was logged: the test would prove nothing"
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "scheme='digest'" in text  # kazoo's dump of the auth request was logged...
    assert "pw-9f8e7d" not in text  # ...without the password
    assert "alice:***" in text


def test_ping_and_a_dead_ensemble(open_store: Callable[..., ZooKeeperBackend]) -> None:
    assert open_store().ping() == (1, [])
    dead = open_backend("zookeeper://127.0.0.1:1/x?connect_timeout=0.3", socket_timeout=0.2)
    try:
        answered, errors = dead.ping()
        assert answered == 0 and "127.0.0.1:1" in errors[0]
        assert dead.extend_many([Renewal(new_key(), tok(), 1000)]) == [None]
        with pytest.raises(LockBackendError):
            dead.lock_info(new_key())
        errs: list[str] = []
        assert dead.list_locks("csl", errors=errs) == [] and errs
    finally:
        dead.close()


def test_node_data_is_the_holders_metadata(
        open_store: Callable[..., ZooKeeperBackend], url: str, raw: KazooClient) -> None:
    store = open_store()
    key, t = new_key(), tok()
    fence = store.acquire(key, t, 30.0, meta("task-7")).fence
    (name,) = raw.get_children(parent_path(url, key))
    data, stat = raw.get(f"{parent_path(url, key)}/{name}")
    fields = json.loads(data)
    assert fields["owner"] == "task-7" and fields["task"] == "zk.test"
    assert fields["token"] == t and stat.czxid == fence and stat.ephemeralOwner != 0
    record = store.lock_info(key)
    assert record is not None and record.fence == fence and record.ttl_s is None
    assert t not in json.dumps(record.as_json())


# -- real workers ---------------------------------------------------------------------------------
#
# `celery worker` subprocesses (prefork) of tests/apps/zk_app.py, locking in ZooKeeper: a Redis
# of the test's own is only their broker, result backend and the bodies' records.

#: Every ending releases the lock within this bound (SPEC 6).
RELEASE_BOUND_S = 1.0
#: The workers' ZooKeeper session timeout: a killed worker's locks go after it.
WORKER_SESSION_S = 2.0


class ZkTaskEnv:
    def __init__(self, server: RedisServer, store_url: str) -> None:
        from tests.apps import zk_app

        base = server.url.rsplit("/", 1)[0]
        self.broker_url, self.backend_url, self.record_url = (f"{base}/{i}" for i in range(3))
        self.store_url = store_url
        self.app = zk_app.app
        configure(self.app, self.broker_url, self.backend_url, None,
                  singleton_lock_socket_timeout=0.5)
        self.app.conf.singleton_lock_url = store_url
        self.records = redis.Redis.from_url(self.record_url, decode_responses=True)
        self.results = redis.Redis.from_url(self.backend_url, decode_responses=True)
        self.store = open_backend(store_url, socket_timeout=TIMEOUT_S)
        self.workers: list[CeleryWorker] = []

    def worker(self, **options: Any) -> CeleryWorker:
        worker = CeleryWorker("tests.apps.zk_app", self.broker_url, self.backend_url, "",
                              record_url=self.record_url,
                              env={"CSL_TEST_STORE_URL": json.dumps(self.store_url)}, **options)
        self.workers.append(worker)
        return worker

    def describe(self) -> str:
        return "\n".join(w.describe() for w in self.workers)

    def wait(self, predicate: Callable[[], Any], timeout_s: float, message: str) -> Any:
        try:
            return wait_until(predicate, timeout_s, interval_s=0.01, message=message)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.describe()}") from None

    def started(self, tag: str, timeout_s: float = 15) -> dict[str, Any]:
        info: dict[str, Any] = json.loads(
            self.wait(lambda: self.records.get(f"{tag}:start"), timeout_s, f"{tag} started"))
        assert info["held"] is True
        return info

    def ended(self, tag: str, what: str = "end", timeout_s: float = 15) -> dict[str, Any]:
        return json.loads(  # type: ignore[no-any-return]
            self.wait(lambda: self.records.get(f"{tag}:{what}"), timeout_s, f"{tag} {what}"))

    def released_after(self, key: str, ending: float, timeout_s: float = 5) -> float:
        """Seconds from ``ending`` (wall clock) until ``key`` is seen free."""
        deadline = time.monotonic() + timeout_s
        while self.store.holder(key) is not None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{key} still held after {timeout_s} s\n{self.describe()}")
            time.sleep(0.005)
        return time.time() - ending

    def states(self, ids: list[str]) -> list[str]:
        raw = self.results.mget([f"celery-task-meta-{i}" for i in ids])
        return [json.loads(r)["status"] if r else "PENDING" for r in raw]

    def close(self) -> None:
        for worker in self.workers:
            worker.terminate()
        for worker in self.workers:
            worker.close()
        self.store.close()
        self.records.close()
        self.results.close()


@pytest.fixture(scope="module")
def zk_env(zookeeper_server: ZooKeeperServer) -> Iterator[ZkTaskEnv]:
    with RedisServer() as server:
        env = ZkTaskEnv(server, f"{zookeeper_server.url()}?session_timeout={WORKER_SESSION_S}")
        try:
            yield env
        finally:
            env.close()


@pytest.fixture(scope="module")
def zk_worker(zk_env: ZkTaskEnv) -> CeleryWorker:
    return zk_env.worker(pool="prefork", concurrency=2, queues=["zk"]).start()


def _tag() -> str:
    return f"t-{uuid.uuid4().hex}"


def _within_bound(what: str, elapsed: float) -> None:
    print(f"{what}: released {elapsed * 1000:.0f} ms after the ending")
    assert elapsed <= RELEASE_BOUND_S, f"{what}: {elapsed:.3f} s"


@pytest.mark.slow
def test_real_workers_2x2_never_run_two_bodies_of_one_signature_at_once(
        zk_env: ZkTaskEnv) -> None:
    from tests.apps import zk_app

    workers = [zk_env.worker(pool="prefork", concurrency=2, queues=["zk-dedup"])
               for _ in range(2)]
    try:
        for worker in workers:
            worker.start()
        slot, hold_s, sent = f"slot-{uuid.uuid4().hex}", 0.05, 80
        results = [zk_app.guarded.apply_async((slot, hold_s), queue="zk-dedup")
                   for _ in range(sent)]
        ids = [r.id for r in results]
        zk_env.wait(lambda: all(s in ("SUCCESS", "REVOKED", "FAILURE")
                                for s in zk_env.states(ids)), 90, f"{sent} tasks ready")
        states = zk_env.states(ids)
        assert int(zk_env.records.get(f"{slot}:max") or 0) == 1
        ran, rejected = states.count("SUCCESS"), states.count("REVOKED")
        assert ran + rejected == sent and ran >= 1 and rejected >= 1, states
        assert zk_env.records.llen(f"{slot}:runs") == ran
        pids = {r.result for r in results if r.state == "SUCCESS"}
        print(f"{sent} sent: {ran} ran in {len(pids)} pool children, {rejected} rejected")
        key = zk_app.guarded.lock_key_for(slot, hold_s)
        zk_env.wait(lambda: zk_env.store.holder(key) is None, 5, "the last release")
    finally:
        for worker in workers:
            worker.terminate()


@pytest.mark.slow
def test_every_ending_releases_the_zookeeper_lock_within_1s(
        zk_env: ZkTaskEnv, zk_worker: CeleryWorker) -> None:
    from tests.apps import zk_app

    tag = _tag()  # success
    result = zk_app.ok.apply_async((tag,), queue="zk")
    info = zk_env.started(tag)
    _within_bound("success", zk_env.released_after(zk_app.ok.lock_key_for(tag),
                                                   zk_env.ended(tag)["time"]))
    assert result.get(timeout=10) == "ok" and info["fence"]

    tag = _tag()  # failure
    result = zk_app.boom.apply_async((tag,), queue="zk")
    zk_env.started(tag)
    _within_bound("failure", zk_env.released_after(zk_app.boom.lock_key_for(tag),
                                                   zk_env.ended(tag)["time"]))
    with pytest.raises(ValueError, match="boom"):
        result.get(timeout=10)

    tag = _tag()  # self.retry()
    result = zk_app.retrying.apply_async((tag, 2.0), queue="zk")
    zk_env.started(tag)
    retried = zk_env.ended(tag, "retry")["time"]
    _within_bound("retry", zk_env.released_after(zk_app.retrying.lock_key_for(tag, 2.0), retried))
    assert result.get(timeout=15) == 1

    tag = _tag()  # revoke(terminate=True)
    result = zk_app.sleeper.apply_async((tag, 30.0), queue="zk")
    zk_env.started(tag)
    key = zk_app.sleeper.lock_key_for(tag, 30.0)
    assert zk_env.store.holder(key) == result.id
    revoked = time.time()
    result.revoke(terminate=True)
    _within_bound("revoke terminate", zk_env.released_after(key, revoked))

    tag = _tag()  # hard time limit
    result = zk_app.limited.apply_async((tag,), queue="zk")
    info = zk_env.started(tag)
    _within_bound("hard time limit", zk_env.released_after(zk_app.limited.lock_key_for(tag),
                                                           info["time"] + 1.0))

    tag = _tag()  # the pool child killed
    result = zk_app.sleeper.apply_async((tag, 30.0), queue="zk")
    info = zk_env.started(tag)
    key = zk_app.sleeper.lock_key_for(tag, 30.0)
    assert info["pid"] in zk_worker.child_pids()
    killed = time.time()
    os.kill(info["pid"], signal.SIGKILL)
    _within_bound("killed child", zk_env.released_after(key, killed))

    tag = _tag()  # revoke before start (a countdown the worker holds)
    result = zk_app.ok.apply_async((tag,), queue="zk", countdown=30)
    key = zk_app.ok.lock_key_for(tag)
    time.sleep(0.5)  # let the worker receive it: nothing holds the lock meanwhile
    result.revoke()
    zk_env.wait(lambda: result.state == "REVOKED", 10, "the revoke")
    assert zk_env.store.holder(key) is None


@pytest.mark.slow
def test_warm_shutdown_and_a_killed_worker(zk_env: ZkTaskEnv) -> None:
    from tests.apps import zk_app

    worker = zk_env.worker(pool="prefork", concurrency=2, queues=["zk-warm"]).start()
    tag = _tag()
    result = zk_app.sleeper.apply_async((tag, 2.0), queue="zk-warm")
    zk_env.started(tag)
    worker.terminate()  # warm shutdown: the body finishes, then its lock goes
    _within_bound("warm shutdown", zk_env.released_after(zk_app.sleeper.lock_key_for(tag, 2.0),
                                                         zk_env.ended(tag)["time"]))
    assert result.get(timeout=10) == "slept"
    assert worker.wait_exit(15) is not None

    worker = zk_env.worker(pool="prefork", concurrency=2, queues=["zk-doomed"]).start()
    tag = _tag()
    zk_app.sleeper.apply_async((tag, 30.0), queue="zk-doomed")
    zk_env.started(tag)
    key = zk_app.sleeper.lock_key_for(tag, 30.0)
    zk_env.wait(lambda: (zk_env.store.lock_info(key) or _NO_RECORD).renewals >= 1, 5,
                "a renewal (the main process adopts the lock)")
    killed = time.time()
    worker.kill()
    gone = zk_env.released_after(key, killed, timeout_s=WORKER_SESSION_S + 5)
    print(f"killed worker: lock gone {gone:.2f} s after the kill "
          f"(session timeout {WORKER_SESSION_S} s)")
    assert gone <= WORKER_SESSION_S + 1.0


@pytest.mark.slow
def test_a_body_holding_the_gil_keeps_its_lock_past_the_childs_session_timeout(
        zk_env: ZkTaskEnv, zk_worker: CeleryWorker) -> None:
    """The child's ZooKeeper heartbeats stop while the body holds the GIL; the worker's main
    process adopted the lock at its first renewal, so the lock follows its session."""
    from tests.apps import zk_app

    seconds = 3 * WORKER_SESSION_S
    tag = _tag()
    result = zk_app.hog.apply_async((tag, seconds), queue="zk")
    info = zk_env.started(tag)
    key = zk_app.hog.lock_key_for(tag, seconds)
    holders = []
    while not zk_env.records.exists(f"{tag}:end"):
        holders.append(zk_env.store.holder(key))
        if holders[-1] is None and zk_env.records.exists(f"{tag}:end"):
            break  # the body ended and released meanwhile
        assert holders[-1] == result.id, (
            f"lost {time.time() - info['time']:.2f} s into the body ({len(holders)} checks)\n"
            f"{zk_worker.describe()}")
        time.sleep(0.05)
    end = json.loads(zk_env.records.get(f"{tag}:end") or "{}")
    assert end["took"] > WORKER_SESSION_S + 0.5, end  # past the child's session timeout
    assert end["held"] is True
    assert isinstance(result.get(timeout=10), int)
    print(f"GIL held {end['took']:.1f} s in one call (session timeout {WORKER_SESSION_S} s): "
          f"lock held throughout ({len(holders)} checks), pid {info['pid']}")
    zk_env.released_after(key, time.time())


_NO_RECORD = type("NoRecord", (), {"renewals": 0})()


@pytest.mark.slow
def test_a_worker_whose_session_expired_loses_the_lock_and_lock_on_lost_fires(
        zk_env: ZkTaskEnv, zk_worker: CeleryWorker) -> None:
    """The whole worker frozen past its session timeout: the server ends the session and the
    lock with it (another takes it); once the worker runs again, its renewal finds the lock
    gone and ``lock_on_lost="abort"`` raises LockLostError inside the body."""
    from tests.apps import zk_app

    tag = _tag()
    result = zk_app.abortable.apply_async((tag, 30.0), queue="zk")
    zk_env.started(tag)
    key = zk_app.abortable.lock_key_for(tag, 30.0)
    zk_env.wait(lambda: (zk_env.store.lock_info(key) or _NO_RECORD).renewals >= 1, 5,
                "a renewal (the main process adopts the lock)")
    intruder = tok()
    zk_worker.pause()
    try:
        assert zk_env.store.wait_released(
            key, WORKER_SESSION_S + 10, lambda: zk_env.store.acquire(key, intruder, 30.0).acquired)
    finally:
        zk_worker.resume()
    zk_env.wait(lambda: result.state == "FAILURE", 15, "the body aborted")
    assert type(result.result).__name__ == "LockLostError", result.result
    assert zk_env.store.owned(key, intruder)  # the lost holder's release took nothing
    assert zk_env.store.release(key, intruder) is True
