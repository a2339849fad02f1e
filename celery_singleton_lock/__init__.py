"""celery-singleton-lock: distributed singleton locks for Celery tasks."""

from .errors import (
    DuplicateTaskError,
    LockBackendError,
    LockConfigError,
    LockKeyError,
    LockLostError,
    SingletonLockError,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "DuplicateTaskError",
    "LockBackendError",
    "LockConfigError",
    "LockKeyError",
    "LockLostError",
    "SingletonLockError",
    "__version__",
]
