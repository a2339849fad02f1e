"""Settings reach the tasks from every place Celery reads configuration from."""

from __future__ import annotations

import pytest
from celery import Celery

from celery_singleton_lock import LockConfigError, LockedTask


class PlainConfig:
    broker_url = "memory://"
    singleton_lock_url = "memory://settings-plain"
    singleton_lock_ttl = 9.0
    singleton_lock_on_duplicate = "wait"


class DjangoSettings:
    CELERY_BROKER_URL = "memory://"
    CELERY_SINGLETON_LOCK_URL = "memory://settings-django"
    CELERY_SINGLETON_LOCK_TTL = 7.5
    CELERY_SINGLETON_LOCK_ON_DUPLICATE = "requeue"
    CELERY_SINGLETON_LOCK_BEAT_TTL = 4.0


def _task(app: Celery) -> LockedTask:
    @app.task(base=LockedTask, shared=False)
    def sync(account_id: int) -> int:
        return account_id

    app.finalize()
    return app.tasks[sync.name]


def test_config_from_object_settings_are_not_hidden_by_the_defaults() -> None:
    app = Celery("plain")
    app.config_from_object(PlainConfig)
    task = _task(app)
    assert task.lock_options.ttl == 9.0
    assert task.lock_options.on_duplicate == "wait"
    assert task.lock_store.description == "memory://settings-plain"
    assert app.conf.singleton_lock_beat_ttl == 10.0  # the defaults still fill the rest


def test_django_namespaced_settings_reach_the_task() -> None:
    app = Celery("django")
    app.config_from_object(DjangoSettings, namespace="CELERY")
    task = _task(app)
    assert task.lock_options.ttl == 7.5
    assert task.lock_options.on_duplicate == "requeue"
    assert task.lock_store.description == "memory://settings-django"
    assert app.conf.get("singleton_lock_beat_ttl") == 4.0
    assert app.conf.get("singleton_lock_key_prefix") == "csl"


def test_a_bad_value_from_a_config_object_fails_at_registration_naming_it() -> None:
    class Bad(PlainConfig):
        singleton_lock_mode = "sometimes"

    app = Celery("bad")
    app.config_from_object(Bad)
    with pytest.raises(LockConfigError) as info:
        _task(app)
    assert info.value.setting == "singleton_lock_mode"
    assert "sometimes" in str(info.value)
