"""LockedTask configuration and the lock handle, without a worker.

Options are checked when the task is registered (or when the app is finalized), never deep
inside a running task. Bodies run eagerly (``task.apply()``): the same ``__call__`` a worker
runs, against a real ``redis-server`` where a test reads what was written.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_singleton_lock import LockConfigError, LockedTask, LockKeyError
from tests.servers import RedisServer, wait_until

# Every task here is made with shared=False: a shared task (Celery's default) would be added to
# every app finalized later in the session, and a bad one would break them all.


def _app(lock_url: str = "memory://config-tests", **settings: Any) -> Celery:
    app = Celery("csl_config", set_as_current=False)
    app.conf.update(broker_url="memory://", result_backend="cache+memory://",
                    singleton_lock_url=lock_url, **settings)
    return app


@pytest.fixture
def app() -> Iterator[Celery]:
    app = _app()
    yield app
    app.close()


@pytest.fixture
def redis_app(redis_server_module: RedisServer) -> Iterator[Celery]:
    app = _app(redis_server_module.url)
    yield app
    app.close()


def _body(a: Any, b: int = 2) -> Any:
    return a


# -- keys -----------------------------------------------------------------------------------


class Opaque:
    """A type with no stable encoding."""


def test_argument_without_stable_encoding_raises_lock_key_error_and_body_never_runs(
    app: Celery,
) -> None:
    ran: list[Any] = []

    @app.task(base=LockedTask, shared=False, name="config.opaque")
    def opaque(item: Any, other: int = 1) -> None:
        ran.append(item)

    with pytest.raises(LockKeyError) as info:
        opaque.apply((Opaque(),), throw=True)
    assert info.value.argument is not None and "item" in info.value.argument
    message = str(info.value)
    assert "item" in message and "Opaque" in message
    assert "0x" not in message  # never a repr() with a memory address
    assert ran == []

    with pytest.raises(LockKeyError) as info:
        opaque.apply(kwargs={"item": {"nested": [1, Opaque()]}}, throw=True)
    assert "item" in str(info.value)
    assert ran == []


def test_lock_key_for_equals_the_key_written_to_redis(
    redis_app: Celery, redis_server_module: RedisServer
) -> None:
    seen: dict[str, Any] = {}
    client = redis_server_module.client(decode_responses=True)

    @redis_app.task(base=LockedTask, shared=False, bind=True, name="config.keyed")
    def keyed(self: Any, account: int, full: bool = False) -> None:
        seen["lock_key"] = self.lock.key
        seen["hash"] = client.hgetall(self.lock.key)
        seen["id"] = self.request.id

    result = keyed.apply((42,), {"full": True}, throw=True)
    key = keyed.lock_key_for(42, full=True)
    assert seen["lock_key"] == key == keyed.lock_key_for(account=42, full=True)
    assert seen["hash"]["owner"] == result.id == seen["id"]
    assert seen["hash"]["task"] == "config.keyed"
    assert key.startswith("csl:config.keyed:{") and key.endswith("}")
    # Released at the end: the release is written without waiting for its reply, so this
    # other connection may ask before the server has read it.
    wait_until(lambda: not client.exists(key), 2, message="the lock released")
    client.close()


# -- options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("lock_mode", "bogus"),
        ("lock_on_duplicate", "bogus"),
        ("lock_on_backend_error", "bogus"),
        ("lock_on_lost", "bogus"),
        ("lock_on_enqueue_duplicate", "bogus"),
        ("lock_ttl", 0),
        ("lock_ttl", -1.0),
        ("lock_ttl", "30"),
        ("lock_wait_timeout", 0),
        ("lock_requeue_max", -1),
    ],
)
def test_bad_task_option_raises_lock_config_error_at_registration(
    app: Celery, option: str, value: Any
) -> None:
    app.finalize()
    with pytest.raises(LockConfigError) as info:
        app.task(
            base=LockedTask, shared=False, name=f"config.bad_{option}", **{option: value}
        )(_body)
    assert option in str(info.value)
    assert info.value.setting == option
    assert "config.bad_" in str(info.value)  # and the task


@pytest.mark.parametrize("ttl", [1e-9, 0.0005, 0.02, 0.59])
def test_ttl_below_three_socket_timeouts_raises_naming_the_option_and_the_minimum(
    app: Celery, ttl: float
) -> None:
    app.finalize()
    with pytest.raises(LockConfigError) as info:
        app.task(base=LockedTask, shared=False, name="config.tiny_ttl", lock_ttl=ttl)(_body)
    assert info.value.setting == "lock_ttl"
    assert "at least 0.6 seconds" in str(info.value)
    assert "singleton_lock_socket_timeout" in str(info.value)


def test_ttl_minimum_follows_the_socket_timeout_and_names_the_setting() -> None:
    app = _app(singleton_lock_socket_timeout=0.5, singleton_lock_ttl=1.2)
    app.finalize()
    with pytest.raises(LockConfigError) as info:
        app.task(base=LockedTask, shared=False, name="config.short_setting")(_body)
    assert info.value.setting == "singleton_lock_ttl"
    assert "at least 1.5 seconds" in str(info.value)
    # Exactly the minimum is renewable; a task option above it wins over the short setting.
    ok = app.task(base=LockedTask, shared=False, name="config.at_minimum", lock_ttl=1.5)(_body)
    assert ok.lock_options.ttl == 1.5
    app.close()


def test_beat_ttl_below_three_socket_timeouts_fails_when_the_scheduler_is_made(
    tmp_path: Any,
) -> None:
    from celery_singleton_lock.beat import LockedScheduler

    app = _app(singleton_lock_beat_ttl=0.5)
    with pytest.raises(LockConfigError) as info:
        LockedScheduler(app=app, schedule_filename=str(tmp_path / "schedule"))
    assert info.value.setting == "singleton_lock_beat_ttl"
    assert "at least 0.6 seconds" in str(info.value)
    app.close()


def test_renewed_redlock_with_a_ttl_below_three_socket_timeouts_is_refused() -> None:
    from celery_singleton_lock import Redlock

    with pytest.raises(LockConfigError) as info:
        Redlock("tiny", url="memory://config-tests", ttl=0.3, renew=True)
    assert info.value.setting == "ttl"
    assert "at least 0.6 seconds" in str(info.value)
    Redlock("tiny", url="memory://config-tests", ttl=0.3)  # not renewed: any ttl > 0


def test_fence_ttl_setting_is_validated_and_reaches_the_options() -> None:
    app = _app(singleton_lock_fence_ttl=3600)
    app.finalize()
    task = app.task(base=LockedTask, shared=False, name="config.fence_ttl")(_body)
    assert task.lock_options.fence_ttl == 3600.0
    app.close()
    bad = _app(singleton_lock_fence_ttl=-5)
    bad.finalize()
    with pytest.raises(LockConfigError) as info:
        bad.task(base=LockedTask, shared=False, name="config.bad_fence_ttl")(_body)
    assert info.value.setting == "singleton_lock_fence_ttl"
    bad.close()


def test_lock_key_naming_an_unknown_argument_raises_lock_config_error(app: Celery) -> None:
    app.finalize()
    with pytest.raises(LockConfigError) as info:
        app.task(
            base=LockedTask, shared=False, name="config.unknown_arg", lock_key=["a", "nope"]
        )(_body)
    assert "nope" in str(info.value)
    assert "lock_key" in str(info.value)


def test_bad_option_on_a_lazy_app_raises_at_finalization(app: Celery) -> None:
    app.task(base=LockedTask, shared=False, name="config.lazy_bad", lock_mode="bogus")(_body)
    with pytest.raises(LockConfigError, match="lock_mode"):
        app.finalize()


def test_bad_setting_raises_lock_config_error_naming_the_setting() -> None:
    app = _app()
    # Finalized first: finalizing binds every shared task other modules of the session made,
    # and those would meet the bad setting before ours.
    app.finalize()
    app.conf.singleton_lock_on_duplicate = "explode"
    with pytest.raises(LockConfigError) as info:
        app.task(base=LockedTask, shared=False, name="config.bad_setting")(_body)
    assert "singleton_lock_on_duplicate" in str(info.value)
    assert info.value.setting == "singleton_lock_on_duplicate"
    app.close()


def test_task_option_wins_over_the_setting(
    redis_server_module: RedisServer,
) -> None:
    app = _app(redis_server_module.url, singleton_lock_ttl=7.0,
               singleton_lock_on_duplicate="requeue", singleton_lock_requeue_max=3)
    client = redis_server_module.client(decode_responses=True)
    seen: dict[str, Any] = {}

    @app.task(base=LockedTask, shared=False, bind=True, name="config.own", lock_ttl=3.0,
              lock_on_duplicate="wait")
    def own(self: Any) -> None:
        seen["own"] = (client.hget(self.lock.key, "ttl"), client.pttl(self.lock.key))

    @app.task(base=LockedTask, shared=False, bind=True, name="config.inherited")
    def inherited(self: Any) -> None:
        seen["inherited"] = (client.hget(self.lock.key, "ttl"), client.pttl(self.lock.key))

    assert (own.lock_options.ttl, own.lock_options.on_duplicate) == (3.0, "wait")
    assert (inherited.lock_options.ttl, inherited.lock_options.on_duplicate) == (7.0, "requeue")
    assert own.lock_options.requeue_max == inherited.lock_options.requeue_max == 3
    own.apply(throw=True)
    inherited.apply(throw=True)
    assert seen["own"][0] == "3.0" and 0 < seen["own"][1] <= 3000
    assert seen["inherited"][0] == "7.0" and 3000 < seen["inherited"][1] <= 7000
    client.close()
    app.close()


# -- the handle -----------------------------------------------------------------------------


def test_self_lock_inside_the_body_has_key_token_fence_is_held_and_extend(
    redis_app: Celery, redis_server_module: RedisServer
) -> None:
    client = redis_server_module.client(decode_responses=True)

    @redis_app.task(base=LockedTask, shared=False, bind=True, name="config.handle", lock_ttl=2.0)
    def handle(self: Any, n: int) -> dict[str, Any]:
        lock = self.lock
        pttl_before = client.pttl(lock.key)
        extended = lock.extend(ttl=10.0)
        return {
            "key": lock.key,
            "token": lock.token,
            "fence": lock.fencing_token,
            "held": lock.is_held(),
            "hash_token": client.hget(lock.key, "token"),
            "pttl_before": pttl_before,
            "extended": extended,
            "pttl_after": client.pttl(lock.key),
            "held_after_delete": (client.delete(lock.key), lock.is_held())[1],
        }

    first = handle.apply((1,), throw=True).get()
    second = handle.apply((1,), throw=True).get()
    assert first["key"] == handle.lock_key_for(1)
    assert first["token"] == first["hash_token"] and len(first["token"]) == 32
    assert first["held"] is True
    assert first["extended"] is True
    assert first["pttl_before"] <= 2000 < first["pttl_after"] <= 10_000
    assert first["held_after_delete"] is False
    assert isinstance(first["fence"], int) and second["fence"] > first["fence"]
    assert second["token"] != first["token"]
    assert handle.lock is None  # no lock outside a running body
    client.close()
