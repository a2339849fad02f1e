"""``celery_singleton_lock.compat``: celery-singleton's and celery-once's README examples.

Each example of the two READMEs runs here against :class:`~celery_singleton_lock.compat.Singleton`
and :class:`~celery_singleton_lock.compat.QueueOnce`, with a real prefork worker of
``tests.apps.compat_app`` and a real lock ``redis-server``. The locks live where the peers'
settings say: celery-singleton's ``singleton_backend_url`` (database 3 of the lock server, keys
under ``singleton_key_prefix``) and celery-once's ``ONCE['settings']['url']`` (database 4);
``singleton_lock_url`` (database 0) stays empty.

The bodies that sleep in the READMEs hold until the test lets them go (``go:<task id>``). Tasks
that must stay queued are sent to the ``parked`` queue, which no worker consumes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

import celery_singleton_lock
from celery_singleton_lock import LockConfigError
from celery_singleton_lock.compat import AlreadyQueued, DuplicateTaskError, QueueOnce, Singleton
from celery_singleton_lock.keys import channel_for
from tests.apps import compat_app
from tests.test_cli import run_cli
from tests.workers import CeleryWorker, TaskEnv, open_task_env

#: A queue no worker consumes: what is sent there stays queued, holding its enqueue lock.
PARKED = "parked"


class Servers:
    """The lock databases of this module and what tasks a test started."""

    def __init__(self, env: TaskEnv) -> None:
        self.env = env
        base = env.lock_url.rsplit("/", 1)[0]
        #: celery-singleton's ``singleton_backend_url`` and celery-once's ``ONCE`` URL.
        self.singleton_url = f"{base}/3"
        self.once_url = f"{base}/4"
        self.singleton_db = redis.Redis.from_url(self.singleton_url, decode_responses=True)
        self.once_db = redis.Redis.from_url(self.once_url, decode_responses=True)
        self.started: list[Any] = []

    def locks(self, db: redis.Redis) -> dict[str, dict[str, str]]:
        """The lock hashes of one database (fencing counters left out)."""
        return {k: db.hgetall(k) for k in db.scan_iter(count=1000) if not k.endswith(":fence")}

    def entered(self, result: Any) -> Any:
        """Wait until the body of ``result`` runs on the worker."""
        self.started.append(result)
        self.env.wait(lambda: self.env.records.exists(f"entered:{result.id}"), 15,
                      f"task {result.id} entered")
        return result

    def finish(self, *results: Any) -> list[Any]:
        """Let ``results`` end and return their values."""
        for result in results:
            self.env.records.set(f"go:{result.id}", "1")
        return [result.get(timeout=15) for result in results]

    def runs(self, task_name: str) -> list[str]:
        return self.env.records.lrange(f"runs:{task_name}", 0, -1)

    def close(self) -> None:
        self.singleton_db.close()
        self.once_db.close()


@pytest.fixture(scope="module")
def env() -> Iterator[TaskEnv]:
    with open_task_env("tests.apps.compat_app") as task_env:
        yield task_env


@pytest.fixture(scope="module")
def servers(env: TaskEnv) -> Iterator[Servers]:
    s = Servers(env)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def worker(env: TaskEnv, servers: Servers) -> Iterator[CeleryWorker]:
    w = env.worker(pool="prefork", concurrency=2, env={
        "CSL_TEST_SINGLETON_URL": servers.singleton_url, "CSL_TEST_ONCE_URL": servers.once_url})
    try:
        yield w.start()
    finally:
        env.stop_workers([w])


def make_client(env: TaskEnv, servers: Servers, **settings: Any) -> Celery:
    return compat_app.client(env.broker_url, env.backend_url, env.lock_url,
                             servers.singleton_url, servers.once_url, **settings)


@pytest.fixture(scope="module")
def app(env: TaskEnv, servers: Servers) -> Celery:
    return make_client(env, servers)


@pytest.fixture(autouse=True)
def clean(env: TaskEnv, servers: Servers) -> Iterator[None]:
    yield
    for result in servers.started:
        env.records.set(f"go:{result.id}", "1")
    for result in servers.started:
        result.get(timeout=15, propagate=False)
    servers.started.clear()
    servers.singleton_db.flushdb()
    servers.once_db.flushdb()
    env.records.flushdb()
    env.lock_client.flushdb()


def wait_gone(env: TaskEnv, db: redis.Redis, key: str) -> None:
    env.wait(lambda: not db.exists(key), 5, f"lock {key} released")


# ------------------------------------------------------------------------------------------------
# celery-singleton's README


def test_singleton_quick_start_queues_one_task_for_two_identical_calls(
    app: Celery, servers: Servers, env: TaskEnv, worker: CeleryWorker
) -> None:
    do_stuff = app.tasks["singleton.do_stuff"]
    async_result = servers.entered(do_stuff.delay(1, 2, 3, a="b"))
    async_result2 = do_stuff.delay(1, 2, 3, a="b")
    assert async_result == async_result2  # These are the same, task is only queued once
    # The lock lives at singleton_backend_url under singleton_key_prefix, and the worker took
    # over the enqueue lock there (its hostname is in the lock).
    (key, fields), = servers.locks(servers.singleton_db).items()
    assert key == do_stuff.lock_key_for(1, 2, 3, a="b")
    assert key.startswith(compat_app.SINGLETON_PREFIX + ":singleton.do_stuff:{")
    assert fields["owner"] == async_result.id and fields["hostname"] == worker.hostname
    assert env.lock_client.dbsize() == 0  # singleton_lock_url holds nothing
    assert servers.finish(async_result) == ["I just woke up"]
    assert servers.runs("singleton.do_stuff") == [async_result.id]
    wait_gone(env, servers.singleton_db, key)


def test_singleton_how_it_works_duplicates_share_one_result_until_it_finishes(
    app: Celery, servers: Servers, env: TaskEnv, worker: CeleryWorker
) -> None:
    do_stuff = app.tasks["singleton.do_stuff"]
    a = servers.entered(do_stuff.delay(1, 2, 3))
    b = do_stuff.delay(1, 2, 3)
    assert a == b  # Both are AsyncResult for the same task
    c = servers.entered(do_stuff.delay(4, 5, 6))
    assert a != c  # c has different arguments so it spawns a new task
    # wait for a to finish
    servers.finish(a)
    wait_gone(env, servers.singleton_db, do_stuff.lock_key_for(1, 2, 3))
    # Now we can spawn a duplicate of it
    d = servers.entered(do_stuff.delay(1, 2, 3))
    assert a != d
    servers.finish(c, d)
    assert sorted(servers.runs("singleton.do_stuff")) == sorted([a.id, c.id, d.id])


def test_singleton_unique_on_considers_only_the_named_arguments(
    app: Celery, servers: Servers, worker: CeleryWorker
) -> None:
    do_something = app.tasks["singleton.do_something"]
    task1 = servers.entered(do_something.delay(username="bob", otherarg=99))
    task2 = do_something.delay(username="bob", otherarg=100)  # this is a duplicate of task1
    assert task1 == task2
    task3 = servers.entered(do_something.delay(username="alice", otherarg=99))
    assert task3 != task1
    assert servers.finish(task1, task3) == ["bob", "alice"]


def test_singleton_unique_on_naming_no_argument_is_refused_at_registration() -> None:
    # The README's own unique_on example names 'user_id' for a task taking 'username':
    # celery-singleton fails with a KeyError at the first call; here the task is refused.
    app = Celery("compat_unique_on", set_as_current=False)
    app.finalize()

    def do_something(username: str, otherarg: Any = None) -> None: ...

    with pytest.raises(LockConfigError) as info:
        app.task(base=Singleton, unique_on=["user_id"], name="t.do_something",
                 shared=False)(do_something)
    assert info.value.setting == "unique_on"
    assert "unique_on" in str(info.value) and "user_id" in str(info.value)
    assert "username, otherarg" in str(info.value)


def test_singleton_raise_on_duplicate_raises_with_the_existing_task_id(
    app: Celery, servers: Servers, worker: CeleryWorker
) -> None:
    do_something = app.tasks["singleton.do_something_raise"]
    task1 = servers.entered(do_something.delay("bob"))
    with pytest.raises(DuplicateTaskError) as info:
        do_something.delay("bob")
    print("You tried to create a duplicate of task with ID", info.value.task_id)
    assert info.value.task_id == task1.id == info.value.holder_id
    assert isinstance(info.value, celery_singleton_lock.DuplicateTaskError)
    assert info.value.lock_key == do_something.lock_key_for("bob")
    assert servers.finish(task1) == ["bob"]


def test_singleton_app_settings_raise_on_duplicate_and_lock_expiry_with_task_option_first(
    env: TaskEnv, servers: Servers
) -> None:
    client = make_client(env, servers, singleton_raise_on_duplicate=True,
                         singleton_lock_expiry=120)
    do_stuff = client.tasks["singleton.do_stuff"]
    first = do_stuff.apply_async(("settings",), queue=PARKED)
    with pytest.raises(DuplicateTaskError) as info:
        do_stuff.apply_async(("settings",), queue=PARKED)
    assert info.value.task_id == first.id
    assert 0 < servers.singleton_db.pttl(do_stuff.lock_key_for("settings")) <= 120_000
    # A task option supersedes the app's setting.
    never_raise = client.tasks["singleton.never_raise"]
    kept = never_raise.apply_async(("x",), queue=PARKED)
    assert never_raise.apply_async(("x",), queue=PARKED) == kept
    expiring = client.tasks["singleton.runs_for_12_seconds"]
    expiring.apply_async(("option",), queue=PARKED)
    assert 0 < servers.singleton_db.pttl(expiring.lock_key_for("option")) <= 2_000


def test_singleton_lock_expiry_frees_a_queued_task_lock_but_never_a_running_ones(
    app: Celery, servers: Servers, env: TaskEnv, worker: CeleryWorker
) -> None:
    runs_for_12_seconds = app.tasks["singleton.runs_for_12_seconds"]
    # lock_expiry=2: a task still queued after 2 s no longer blocks an identical one.
    task1 = runs_for_12_seconds.apply_async(("queued",), queue=PARKED)
    assert runs_for_12_seconds.apply_async(("queued",), queue=PARKED) == task1
    key = runs_for_12_seconds.lock_key_for("queued")
    assert 0 < servers.singleton_db.pttl(key) <= 2_000
    env.wait(lambda: not servers.singleton_db.exists(key), 5, "the queued lock to expire")
    task2 = runs_for_12_seconds.apply_async(("queued",), queue=PARKED)
    assert task1 != task2  # These are two separate task instances
    # Once a worker runs the task, its lock is renewed until the task ends, whatever
    # lock_expiry says: a duplicate of a running task is never queued beside it.
    running = servers.entered(runs_for_12_seconds.delay("running"))
    running_key = runs_for_12_seconds.lock_key_for("running")
    fields = servers.singleton_db.hgetall(running_key)
    assert fields["hostname"] == worker.hostname
    assert float(fields["ttl"]) == runs_for_12_seconds.lock_options.ttl > 2
    assert servers.singleton_db.pttl(running_key) > 2_000
    assert runs_for_12_seconds.delay("running") == running
    servers.finish(running)
    wait_gone(env, servers.singleton_db, running_key)


def test_singleton_revoke_of_a_queued_task_releases_its_lock(
    app: Celery, servers: Servers, env: TaskEnv, worker: CeleryWorker
) -> None:
    # celery-singleton releases only on success and failure: a revoked task kept its lock
    # for good. Here every ending releases it.
    do_stuff = app.tasks["singleton.do_stuff"]
    queued = do_stuff.apply_async(("revoked",), countdown=60)
    key = do_stuff.lock_key_for("revoked")
    env.wait(lambda: servers.singleton_db.hget(key, "owner") == queued.id, 5, "the lock")
    queued.revoke()
    wait_gone(env, servers.singleton_db, key)
    assert servers.runs("singleton.do_stuff") == []


# ------------------------------------------------------------------------------------------------
# celery-once's README


def test_once_second_delay_raises_already_queued_until_the_task_completes(
    app: Celery, servers: Servers, env: TaskEnv, worker: CeleryWorker
) -> None:
    example = app.tasks["once.example"]
    first = servers.entered(example.delay(10))
    with pytest.raises(AlreadyQueued) as info:
        example.delay(10)
    # celery-once's AlreadyQueued carries the seconds the lock has left.
    key = example.lock_key_for(10)
    assert 0 < info.value.countdown <= example.lock_options.ttl
    assert info.value.message == f"Expires in {info.value.countdown} seconds"
    assert info.value.lock_key == key and info.value.holder_id == first.id
    with pytest.raises(AlreadyQueued):
        example.apply_async(args=(10,))
    assert set(servers.locks(servers.once_db)) == {key}  # at ONCE['settings']['url']
    # Once the task completes the lock clears.
    assert servers.finish(first) == [10]
    wait_gone(env, servers.once_db, key)
    again = servers.entered(example.delay(10))
    assert again != first
    servers.finish(again)
    assert servers.runs("once.example") == [first.id, again.id]


def test_once_a_task_ending_in_an_exception_clears_its_lock(
    app: Celery, servers: Servers, env: TaskEnv, worker: CeleryWorker
) -> None:
    failing = app.tasks["once.failing"]
    result = failing.delay(1)
    with pytest.raises(ValueError, match=r"failing\(1\)"):
        result.get(timeout=15)
    wait_gone(env, servers.once_db, failing.lock_key_for(1))
    again = failing.delay(1)  # no AlreadyQueued: the lock cleared
    assert again != result
    with pytest.raises(ValueError):
        again.get(timeout=15)


def test_once_graceful_returns_none_instead_of_raising(
    app: Celery, servers: Servers, worker: CeleryWorker
) -> None:
    example = app.tasks["once.example"]
    first = servers.entered(example.delay(10))
    # Either catch the exception,
    try:
        example.delay(10)
        raise AssertionError("AlreadyQueued was not raised")
    except AlreadyQueued:
        pass
    # or, handle it gracefully at run time,
    assert example.apply_async(args=(10,), once={"graceful": True}) is None
    # (apply() runs the task here and takes its lock as a worker would: the lock is held, so
    # the body does not run; celery-once's apply() ignores the lock and runs it)
    assert example.apply(args=(10,), once={"graceful": True}).state == "IGNORED"
    # or by default.
    graceful_task = app.tasks["once.graceful_task"]
    held = servers.entered(graceful_task.delay(5))
    assert graceful_task.delay(5) is None
    servers.finish(first, held)
    assert servers.runs("once.example") == [first.id]
    assert servers.runs("once.graceful_task") == [held.id]


def test_once_graceful_false_for_one_call_overrides_the_task_option(
    app: Celery, servers: Servers
) -> None:
    graceful_task = app.tasks["once.graceful_task"]
    graceful_task.apply_async(args=(6,), queue=PARKED)
    assert graceful_task.apply_async(args=(6,), queue=PARKED) is None
    with pytest.raises(AlreadyQueued):
        graceful_task.apply_async(args=(6,), queue=PARKED, once={"graceful": False})


def test_once_keys_restricts_the_lock_to_the_named_arguments(app: Celery) -> None:
    slow_add = app.tasks["once.slow_add_a"]
    slow_add.apply_async((1, 1), queue=PARKED)
    # Checks if any tasks are running with the `a=1`
    with pytest.raises(AlreadyQueued):
        slow_add.apply_async((1, 2), queue=PARKED)
    slow_add.apply_async((2, 2), queue=PARKED)
    # Will enforce only one task can run, no matter what arguments.
    slow_add_none = app.tasks["once.slow_add_none"]
    slow_add_none.apply_async((1, 1), queue=PARKED)
    with pytest.raises(AlreadyQueued):
        slow_add_none.apply_async((2, 2), queue=PARKED)


def test_once_keys_run_on_the_worker_with_the_same_key(
    app: Celery, servers: Servers, env: TaskEnv, worker: CeleryWorker
) -> None:
    slow_add = app.tasks["once.slow_add_a"]
    first = servers.entered(slow_add.delay(1, 1))
    assert servers.once_db.hget(slow_add.lock_key_for(1, 99), "hostname") == worker.hostname
    with pytest.raises(AlreadyQueued):
        slow_add.delay(1, 2)
    assert servers.finish(first) == [2]
    wait_gone(env, servers.once_db, slow_add.lock_key_for(1, 1))


def test_once_timeout_and_default_timeout_bound_the_queued_lock(
    app: Celery, servers: Servers, env: TaskEnv
) -> None:
    long_running_task = app.tasks["once.long_running_task"]
    long_running_task.apply_async(queue=PARKED)
    pttl = servers.once_db.pttl(long_running_task.lock_key_for())
    assert 3600_000 < pttl <= 36000_000  # once={'timeout': 60 * 60 * 10}
    example = app.tasks["once.example"]
    example.apply_async((1,), queue=PARKED)
    assert 0 < servers.once_db.pttl(example.lock_key_for(1)) <= 3600_000  # default_timeout
    # A timeout for one call; once it lapses, the task can be queued again.
    first = example.apply_async((2,), queue=PARKED, once={"timeout": 1.5})
    key = example.lock_key_for(2)
    assert 0 < servers.once_db.pttl(key) <= 1_500
    with pytest.raises(AlreadyQueued) as info:
        example.apply_async((2,), queue=PARKED)
    assert 0 < info.value.countdown <= 1.5
    env.wait(lambda: not servers.once_db.exists(key), 5, "the one-call timeout to lapse")
    assert example.apply_async((2,), queue=PARKED) != first
    # ONCE's default_timeout is the app's.
    client = make_client(env, servers, ONCE={"backend": "celery_once.backends.Redis",
                                             "settings": {"url": servers.once_url,
                                                          "default_timeout": 120}})
    client.tasks["once.example"].apply_async((3,), queue=PARKED)
    assert 0 < servers.once_db.pttl(example.lock_key_for(3)) <= 120_000


def test_once_unlock_before_run_frees_the_lock_when_the_task_starts(
    app: Celery, servers: Servers, env: TaskEnv, worker: CeleryWorker
) -> None:
    unlock_first = app.tasks["once.unlock_first"]
    unlock_first.apply_async(("queued",), queue=PARKED)
    with pytest.raises(AlreadyQueued):  # still queued: locked
        unlock_first.apply_async(("queued",), queue=PARKED)
    first = servers.entered(unlock_first.delay("started"))
    wait_gone(env, servers.once_db, unlock_first.lock_key_for("started"))
    second = servers.entered(unlock_first.delay("started"))  # the lock went when it started
    assert second != first
    assert servers.finish(first, second) == ["started", "started"]


def test_once_blocking_waits_for_the_release_instead_of_raising(
    env: TaskEnv, servers: Servers, worker: CeleryWorker
) -> None:
    blocking = make_client(env, servers, ONCE={
        "backend": "celery_once.backends.Redis",
        "settings": {"url": servers.once_url, "default_timeout": 3600, "blocking": True,
                     "blocking_timeout": 10}})
    example = blocking.tasks["once.example"]
    first = servers.entered(example.delay(20))
    outcome: dict[str, Any] = {}

    def duplicate() -> None:
        started = time.monotonic()
        try:
            outcome["result"] = example.delay(20)
        except Exception as exc:  # reported below
            outcome["error"] = exc
        outcome["waited_s"] = time.monotonic() - started

    caller = threading.Thread(target=duplicate)
    caller.start()
    # The duplicate call is blocked while the first holds the lock.
    channel = channel_for(example.lock_key_for(20))
    env.wait(lambda: servers.once_db.pubsub_numsub(channel)[0][1] > 0, 5,
             "the duplicate waiting on the release notice")
    assert caller.is_alive()
    servers.finish(first)
    caller.join(15)
    assert not caller.is_alive() and "error" not in outcome, outcome
    second = servers.entered(outcome["result"])
    assert second != first and outcome["waited_s"] < 10
    servers.finish(second)
    assert servers.runs("once.example") == [first.id, second.id]


def test_once_blocking_timeout_ends_in_already_queued(
    env: TaskEnv, servers: Servers
) -> None:
    blocking = make_client(env, servers, ONCE={
        "backend": "celery_once.backends.Redis",
        "settings": {"url": servers.once_url, "blocking": True, "blocking_timeout": 0.3}})
    example = blocking.tasks["once.example"]
    example.apply_async((30,), queue=PARKED)
    started = time.monotonic()
    with pytest.raises(AlreadyQueued):
        example.apply_async((30,), queue=PARKED)
    assert 0.3 <= time.monotonic() - started < 5


# ------------------------------------------------------------------------------------------------
# Bad options, and what stays this package's own


def make_bad(base: type, settings: dict[str, Any] | None = None, **options: Any) -> None:
    app = Celery("compat_bad", set_as_current=False)
    app.conf.update(settings or {})
    app.finalize()

    def task(a: int, b: int = 0) -> None: ...

    app.task(base=base, name="bad.task", shared=False, **options)(task)


@pytest.mark.parametrize("base, settings, options, setting, fragment", [
    (QueueOnce, None, {"once": {"grace": True}}, "once", "unknown keys grace"),
    (QueueOnce, None, {"once": {"keys": "a"}}, "once['keys']", "did you mean"),
    (QueueOnce, None, {"once": {"keys": ["c"]}}, "once['keys']", "unknown arguments: c"),
    (QueueOnce, None, {"once": {"timeout": -1}}, "once['timeout']", "> 0"),
    (QueueOnce, None, {"once": {"graceful": "yes"}}, "once['graceful']", "True or False"),
    (QueueOnce, {"ONCE": {"backend": "celery_once.backends.File", "settings": {}}}, {},
     "ONCE['backend']", "not supported"),
    (QueueOnce, {"ONCE": {"settings": {"url": "http://x"}}}, {}, "ONCE['settings']['url']",
     "ONCE['settings']['url']"),
    (QueueOnce, {"ONCE": {"settings": {"default_timeout": "1h"}}}, {},
     "ONCE['settings']['default_timeout']", "number of seconds"),
    (QueueOnce, {"ONCE": {"settings": {"urls": "redis://x"}}}, {}, "ONCE['settings']",
     "unknown keys urls"),
    (Singleton, None, {"lock_expiry": 0}, "lock_expiry", "> 0"),
    (Singleton, {"singleton_lock_expiry": "soon"}, {}, "singleton_lock_expiry", "seconds"),
    (Singleton, None, {"raise_on_duplicate": 1}, "raise_on_duplicate", "True or False"),
    (Singleton, {"singleton_key_prefix": "a b"}, {}, "singleton_key_prefix", "whitespace"),
    (Singleton, {"singleton_backend_url": "http://x"}, {}, "singleton_backend_url",
     "singleton_backend_url"),
    (Singleton, {"singleton_backend_class": "my.Backend"}, {}, "singleton_backend_class",
     "not supported"),
])
def test_bad_peer_options_are_refused_naming_the_option(
    base: type, settings: dict[str, Any] | None, options: dict[str, Any], setting: str,
    fragment: str
) -> None:
    with pytest.raises(LockConfigError) as info:
        make_bad(base, settings, **options)
    assert info.value.setting == setting
    assert fragment in str(info.value)


def test_once_options_of_one_call_are_checked(app: Celery) -> None:
    example = app.tasks["once.example"]
    with pytest.raises(LockConfigError, match="set on the task") as info:
        example.apply_async((1,), queue=PARKED, once={"keys": []})
    assert info.value.setting == "apply_async(once=...)"


def test_compat_tasks_are_locked_tasks_with_the_mapped_modes(app: Celery) -> None:
    assert isinstance(app.tasks["singleton.do_stuff"], celery_singleton_lock.LockedTask)
    modes = {name: app.tasks[name].lock_options.mode for name in
             ("singleton.do_stuff", "once.example", "once.unlock_first")}
    assert modes == {"singleton.do_stuff": "until_executed", "once.example": "until_executed",
                     "once.unlock_first": "until_executing"}


def test_locks_key_shows_a_compat_tasks_key_and_holder_in_its_own_store(
    app: Celery, servers: Servers, env: TaskEnv, worker: CeleryWorker
) -> None:
    do_stuff = app.tasks["singleton.do_stuff"]
    running = servers.entered(do_stuff.delay(7, a="b"))
    proc = run_cli(env.lock_url, "key", "singleton.do_stuff", "[7]", '{"a": "b"}', "--json",
                   app_module="tests.apps.compat_app", broker=env.broker_url,
                   backend=env.backend_url,
                   extra_env={"CSL_TEST_SINGLETON_URL": servers.singleton_url,
                              "CSL_TEST_ONCE_URL": servers.once_url})
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    (lock,) = shown["locks"]
    assert lock["key"] == do_stuff.lock_key_for(7, a="b") and lock["held"]
    assert lock["holder"]["task_id"] == running.id
    assert lock["holder"]["hostname"] == worker.hostname
    servers.finish(running)

