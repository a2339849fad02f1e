"""The public API is exactly what ``__all__`` lists (httpx's test of the same name)."""

from celery.exceptions import TaskRevokedError

import celery_singleton_lock


def test_all_lists_exactly_the_public_names():
    assert sorted(celery_singleton_lock.__all__) == sorted([
        "DuplicateTaskError",
        "Lease",
        "LockBackendError",
        "LockConfigError",
        "LockKeyError",
        "LockLostError",
        "LockedTask",
        "Redlock",
        "SingletonLockError",
        "__version__",
        "signals",
    ])


def test_every_exported_name_exists_and_public_members_are_exported():
    exported = set(celery_singleton_lock.__all__)
    for name in exported:
        assert hasattr(celery_singleton_lock, name), name
    public = {
        name
        for name, value in vars(celery_singleton_lock).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith(
            "celery_singleton_lock")
    }
    assert public <= exported


def test_error_tree_matches_the_contract():
    from celery_singleton_lock import errors

    assert issubclass(errors.LockConfigError, errors.SingletonLockError)
    assert issubclass(errors.LockConfigError, ValueError)
    for cls in (errors.LockKeyError, errors.LockBackendError, errors.LockLostError,
                errors.DuplicateTaskError):
        assert issubclass(cls, errors.SingletonLockError)
    assert issubclass(errors.DuplicateTaskError, TaskRevokedError)


def test_signals_module_has_the_four_signals():
    from celery_singleton_lock import signals

    assert {"lock_acquired", "lock_released", "lock_duplicate", "lock_lost"} <= set(
        signals.__all__)
