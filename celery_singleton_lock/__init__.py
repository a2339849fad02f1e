"""celery-singleton-lock: distributed singleton locks for Celery tasks.

``LockedTask`` (a Celery base class) takes a per-signature lock before a task body runs,
renews it while the body runs and releases it however the run ends; ``Redlock`` is the lock on
its own. See the README for the settings and the lock modes.
"""

from . import signals
from .errors import (
    DuplicateTaskError,
    LockBackendError,
    LockConfigError,
    LockKeyError,
    LockLostError,
    SingletonLockError,
)
from .lease import Lease
from .lock import Redlock
from .task import LockedTask

__version__ = "0.1.0.dev0"

__all__ = [
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
]
