"""The store's own connection reader, posted releases, and the board children post locks on.

Real ``redis-server`` processes; the board is real shared memory across a real ``fork``.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.exceptions import NoScriptError, ResponseError

from celery_singleton_lock._process import current_pid, new_token
from celery_singleton_lock.worker.board import PAYLOAD_SIZE, SLOTS_PER_CHILD, LeaseBoard
from celery_singleton_lock.backends.base import FixedMetadata
from celery_singleton_lock.backends.quorum import Quorum
from celery_singleton_lock.backends.redis.wire import Call, RedisNode
from celery_singleton_lock.backends.registry import open_backend
from tests.servers import RedisServer, wait_until


@pytest.fixture
def store(redis_server_module: RedisServer) -> Iterator[Quorum]:
    s = open_backend(redis_server_module.url, socket_timeout=2.0)
    yield s
    s.close()


@pytest.fixture
def admin(redis_server_module: RedisServer) -> Iterator[redis.Redis]:
    """A plain redis-py client of the same server, to look at it from outside the store."""
    client = redis.Redis.from_url(redis_server_module.url)
    yield client
    client.close()


def one(store: Quorum, *command: object) -> object:
    return _node(store).send([Call.plain(*command)]).receive()[0]


def test_every_kind_of_reply(store: Quorum) -> None:
    big = b"\r\n".join(secrets.token_bytes(1000) for _ in range(100))  # > one 64 KiB read
    replies = _node(store).send([
        Call.plain("PING"),
        Call.plain("SET", "k", big),
        Call.plain("GET", "k"),
        Call.plain("GET", "missing"),
        Call.plain("INCR", "n"),
        Call.plain("EVAL", "return {1, {2, 'x'}, false, 'y'}", 0),
        Call.plain("INCR", "k"),
        Call.plain("EVALSHA", "0" * 40, 0),
        Call.plain("LRANGE", "missing", 0, -1),
    ]).receive()
    assert replies[:6] == [b"PONG", b"OK", big, None, 1, [1, [2, b"x"], None, b"y"]]
    assert isinstance(replies[6], ResponseError) and "not an integer" in str(replies[6])
    assert isinstance(replies[7], NoScriptError)
    assert replies[8] == []
    # An error reply leaves the connection usable.
    assert one(store, "GET", "n") == b"1"


def test_a_script_missing_after_a_restart_is_sent_whole(redis_server: RedisServer) -> None:
    store = open_backend(redis_server.url, socket_timeout=2.0)
    try:
        assert store.acquire("csl:{w}", "t1", 30).acquired
        redis_server.restart()  # an empty script cache, and our idle connection is stale
        assert store.acquire("csl:{w}", "t2", 30).acquired
        assert store.release("csl:{w}", "t2") is True
    finally:
        store.close()


def test_fixed_metadata_is_written_also_through_the_noscript_fallback(
    redis_server: RedisServer,
) -> None:
    """The packed-once fields go into the lock hash, also when the script must be sent whole."""
    store = open_backend(redis_server.url, socket_timeout=2.0)
    client = redis.Redis.from_url(redis_server.url)
    fixed = FixedMetadata([("task", "t.name"), ("pid", 4321), ("ttl", 30.0)])
    try:
        for token, restart in (("t1", False), ("t2", True)):
            if restart:
                redis_server.restart()  # an empty script cache: EVAL with the same arguments
            key = f"csl:{{fixed-{token}}}"
            assert store.acquire(key, token, 30, [("owner", f"id-{token}")], fixed).acquired
            assert client.hgetall(key) == {
                b"token": token.encode(), b"owner": f"id-{token}".encode(),
                b"task": b"t.name", b"pid": b"4321", b"ttl": b"30.0",
            }
            assert 0 < client.pttl(key) <= 30_000
    finally:
        client.close()
        store.close()


def test_tokens_are_unique_and_a_forked_child_gets_its_own() -> None:
    tokens = {new_token() for _ in range(1000)}
    assert len(tokens) == 1000
    assert all(len(t) == 32 and int(t, 16) >= 0 for t in tokens)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its pid and first token, then exit without cleanup
        os.write(write, f"{current_pid()} {os.getpid()} {new_token()}".encode())
        os._exit(0)
    os.close(write)
    try:
        reported, real, child_token = os.read(read, 200).decode().split()
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert int(reported) == int(real) == pid
    assert current_pid() == os.getpid() != pid
    # Another process: another random prefix, so even its first token is new here.
    assert child_token[:16] not in {t[:16] for t in tokens}
    assert child_token not in tokens


def _node(store: Any) -> RedisNode:
    node = store.members[0].node
    assert isinstance(node, RedisNode)
    return node


def test_posted_release_runs_at_once_and_its_reply_is_read_with_the_next_batch(
    store: Quorum, admin: redis.Redis
) -> None:
    assert store.acquire("csl:{p}", "tok", 30).acquired
    store.release_later("csl:{p}", "tok", deadline=store.clock() + 30)
    wait_until(lambda: not admin.exists("csl:{p}"), 2.0, message="lock released")
    assert sum(len(c.owed) for c in _node(store)._idle) == 1  # not read yet
    assert store.acquire("csl:{q}", "tok", 30).acquired  # the next batch reads it
    assert sum(len(c.owed) for c in _node(store)._idle) == 0
    assert not store._cleanup


def test_posted_release_lost_with_its_connection_is_retried(
    store: Quorum, admin: redis.Redis
) -> None:
    assert store.acquire("csl:{d}", "tok", 30).acquired
    # The server drops our connection: the posted release never reaches it.
    admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    store.release_later("csl:{d}", "tok", deadline=store.clock() + 30)
    store.members[0].settle()  # reads the (missing) reply: a failure is retried
    # Released long before its 30 s ttl, by the renewer's cleanup.
    wait_until(lambda: not admin.exists("csl:{d}"), 5.0, message="lock released by retry")


# -- the board --------------------------------------------------------------------------------


def _msg(n: int) -> dict[str, object]:
    return {"key": f"csl:t:{{{n}}}", "token": f"tok{n}", "ttl": 3.0, "task_id": f"id{n}"}


def test_board_post_read_clear() -> None:
    board = LeaseBoard(2)
    handle = board.post(1, 4242, _msg(1))
    assert handle is not None
    slot, seq = handle
    assert slot // SLOTS_PER_CHILD == 1 and seq % 2 == 0
    assert board.read(slot) == (seq, 4242, _msg(1))
    board.renewed(slot, seq, 5)
    assert board.clear(slot, seq) == 5
    read = board.read(slot)
    assert read is not None and read[2] is None
    # Renewals recorded for an earlier post are not reported for a later one.
    slot2, seq2 = board.post(1, 4242, _msg(2)) or (0, 0)
    assert slot2 == slot and seq2 > seq
    assert board.clear(slot2, seq2) == 0
    # The main process marks a post whose lock it found lost, so the child does not say so again.
    got3 = board.post(0, os.getpid(), {"key": "k3", "token": new_token()})
    assert got3 is not None
    board.renewed(*got3, 4, lost=True)
    assert board.clear_and_read(*got3) == (4, True)
    got4 = board.post(0, os.getpid(), {"key": "k4", "token": new_token()})
    assert got4 is not None
    board.renewed(*got4, 2)
    assert board.clear_and_read(*got4) == (2, False)


def test_board_never_overwrites_a_post_and_refuses_what_does_not_fit() -> None:
    board = LeaseBoard(1)
    handles = [board.post(0, 1, _msg(i)) for i in range(SLOTS_PER_CHILD)]
    assert len({h[0] for h in handles if h}) == SLOTS_PER_CHILD
    assert board.post(0, 1, _msg(99)) is None  # full: the caller renews on its own
    assert board.post(5, 1, _msg(1)) is None  # no such child index
    assert LeaseBoard(1).post(0, 1, {"key": "x" * (PAYLOAD_SIZE + 1)}) is None
    for i, h in enumerate(handles):
        assert h is not None and board.read(h[0]) == (h[1], 1, _msg(i))


def test_board_post_from_a_forked_child_is_seen_by_the_parent() -> None:
    board = LeaseBoard(1)
    before = board.headers()
    pid = os.fork()
    if pid == 0:  # the child: post, keep it posted, exit without cleanup
        board.post(0, os.getpid(), _msg(7))
        os._exit(0)
    os.waitpid(pid, 0)
    assert board.headers() != before
    found = [board.read(s) for s in range(board.n_slots)]
    posted = [r for r in found if r is not None and r[2] is not None]
    assert [(r[1], r[2]) for r in posted] == [(pid, _msg(7))]
    # The parent frees the slot of the child that is gone; the next child may use it.
    slot = found.index(posted[0])
    board.free(slot)
    assert board.post(0, 1, _msg(8)) == (slot, posted[0][0] + 2)


@pytest.mark.parametrize("protocol", [2, 3])
def test_locks_work_over_resp2_and_resp3_as_the_url_asks(
    redis_server_module: RedisServer, protocol: int
) -> None:
    import threading

    from celery_singleton_lock import Redlock

    url = f"{redis_server_module.url}?protocol={protocol}"
    store = open_backend(url, socket_timeout=2.0)
    try:
        info = one(store, "CLIENT", "INFO")
        assert f"resp={protocol}".encode() in info  # the store's own connection speaks it
        holder = Redlock(f"wire:resp{protocol}", store=store, ttl=5.0, owner="holder-id")
        assert holder.acquire(blocking=False)
        assert holder.fencing_token > 0
        rival = Redlock(f"wire:resp{protocol}", store=store, ttl=5.0)
        assert rival.acquire(blocking=False) is False
        assert rival.last_attempt is not None and rival.last_attempt.holder == "holder-id"
        assert store.holder(holder.key) == "holder-id"
        assert holder.extend() is True and holder.owned() is True
        fields = one(store, "HGETALL", holder.key)  # a list in RESP2, a map in RESP3
        pairs = fields.items() if isinstance(fields, dict) else zip(fields[::2], fields[1::2])
        assert dict(pairs)[b"owner"] == b"holder-id"
        # A waiter is woken by the release's notification, well before its 5 s timeout.
        got: list[float] = []

        def wait() -> None:
            started = time.monotonic()
            if rival.acquire(timeout=5.0):
                got.append(time.monotonic() - started)

        waiter = threading.Thread(target=wait)
        waiter.start()
        wait_until(lambda: one(store, "PUBSUB", "NUMSUB", f"{holder.key}:released")[1] == 1,
                   3.0, message="the waiter's subscription")
        assert holder.release() is True
        waiter.join(6.0)
        assert got and got[0] < 0.5, got  # the fallback poll would take 1 s
        assert rival.release() is True
    finally:
        store.close()
