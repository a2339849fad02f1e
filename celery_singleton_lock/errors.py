"""Exceptions raised by celery-singleton-lock.

The hierarchy::

    SingletonLockError
    ├── LockConfigError      (also ValueError)  a setting, option or argument is invalid
    ├── LockKeyError         (also TypeError)   an argument has no stable encoding for the lock key
    ├── LockBackendError                        the lock store is unreachable or has no quorum
    └── LockLostError                           the lock expired or was taken while its holder ran
    DuplicateTaskError       (also SingletonLockError and celery's TaskRevokedError)

Every error carries the key, task and setting it concerns where there is one, and its message
names them. Redis URLs in messages are always redacted.
"""

from __future__ import annotations

from typing import Any

from celery.exceptions import TaskRevokedError

__all__ = [
    "SingletonLockError",
    "LockConfigError",
    "LockKeyError",
    "LockBackendError",
    "LockLostError",
    "DuplicateTaskError",
]


class SingletonLockError(Exception):
    """Base class of every error of this package."""

    #: The full Redis key of the lock concerned, if any.
    lock_key: str | None = None
    #: The task name concerned, if any.
    task_name: str | None = None

    def __init__(
        self, message: str = "", *, lock_key: str | None = None, task_name: str | None = None
    ) -> None:
        super().__init__(message)
        self.lock_key = lock_key
        self.task_name = task_name


class LockConfigError(SingletonLockError, ValueError):
    """A setting, task option or argument has an invalid value.

    ``setting`` names it (``singleton_lock_ttl``, ``lock_mode``, ``url`` ...).
    """

    def __init__(self, message: str, *, setting: str | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.setting = setting


class LockKeyError(SingletonLockError, TypeError):
    """An argument used in the lock key has no stable encoding.

    ``argument`` names the argument and ``value_type`` its type.
    """

    def __init__(
        self,
        message: str,
        *,
        argument: str | None = None,
        value_type: type | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(message, **kw)
        self.argument = argument
        self.value_type = value_type


class LockBackendError(SingletonLockError):
    """The lock store is unreachable, or too few Redlock masters answered for a quorum."""


class LockLostError(SingletonLockError):
    """The lock expired or was taken by another holder while its owner still ran.

    Raised inside a running task body when ``lock_on_lost="abort"``.
    """


class DuplicateTaskError(SingletonLockError, TaskRevokedError):
    """A task was not run (or not queued) because another task holds its lock.

    ``lock_key`` is the lock's Redis key and ``holder_id`` the id of the task holding it
    (``None`` when the holder is not a task, or is unknown).

    The arguments are kept in ``args`` so that result backends, which rebuild an exception as
    ``cls(*args)`` (the JSON backend too), give back ``lock_key`` and ``holder_id``.
    """

    def __init__(
        self,
        message: str = "",
        lock_key: str | None = None,
        holder_id: str | None = None,
        task_name: str | None = None,
    ) -> None:
        super().__init__(message, lock_key=lock_key, task_name=task_name)
        self.holder_id = holder_id or None
        self.args = (message, lock_key, holder_id, task_name)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
