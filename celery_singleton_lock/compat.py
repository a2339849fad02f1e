"""Drop-in base classes for projects moving from celery-singleton and celery-once.

A move is an import change::

    from celery_singleton import Singleton, DuplicateTaskError
    from celery_once import QueueOnce, AlreadyQueued

become::

    from celery_singleton_lock.compat import Singleton, DuplicateTaskError
    from celery_singleton_lock.compat import QueueOnce, AlreadyQueued

Both classes are :class:`~celery_singleton_lock.LockedTask` with the peer's options translated
into lock options when the task is registered, so they keep what LockedTask does and the peers
did not: owner-checked release (never a plain ``DEL``), release on every ending (success,
failure, revoke, time limit, a killed pool child), and a lock renewed while its task runs, so a
dead worker's lock lapses within ``lock_ttl`` instead of never.

:class:`Singleton` (celery-singleton 0.3): ``lock_mode="until_executed"``.

* ``unique_on`` -> ``lock_key`` (a str is one name; ``None`` or ``[]``, as in celery-singleton,
  mean every argument);
* ``raise_on_duplicate`` (else ``singleton_raise_on_duplicate``) -> a duplicate
  ``apply_async`` raises :class:`DuplicateTaskError`; otherwise it returns the ``AsyncResult``
  of the task holding the lock;
* ``lock_expiry`` (else ``singleton_lock_expiry``) -> ``lock_queued_ttl``: how long the lock
  lives while its task waits in the queue. Once a worker runs the task the lock is renewed
  until the task ends, so it never lapses under a running task;
* ``singleton_backend_url`` (else ``singleton_lock_url``, else a Redis ``result_backend``,
  else a Redis broker) is where the locks live; ``singleton_key_prefix`` (else
  ``singleton_lock_key_prefix``) is the first part of their keys.

:class:`QueueOnce` (celery-once 3.0): ``once={'graceful', 'keys', 'timeout',
'unlock_before_run'}`` and ``app.conf.ONCE``.

* ``keys`` -> ``lock_key``; ``unlock_before_run=True`` -> ``lock_mode="until_executing"``
  (released when a worker starts the task), else ``"until_executed"``;
* ``timeout`` (else ``ONCE['settings']['default_timeout']``, else 3600) -> ``lock_queued_ttl``;
* a duplicate raises :class:`AlreadyQueued`, whose ``countdown`` is the seconds the lock has
  left; with ``graceful`` it returns None. ``apply_async(..., once={'graceful': ...,
  'timeout': ...})`` sets both for one call;
* ``ONCE['settings']['url']`` is where the locks live (else ``singleton_lock_url``, else a
  Redis broker); ``blocking`` and ``blocking_timeout`` make a duplicate ``apply_async`` wait for
  the lock, woken by the release notification.

The keys differ from the peers' keys (this project's frozen key format), so a lock that the old
library holds at the moment of the switch is not seen by the new one.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

from . import errors
from ._process import current_pid
from .errors import LockBackendError, LockConfigError
from .inventory import read_lock
from .keys import validate_key_prefix, validate_lock_key_option
from .settings import LockOptions, check_seconds
from .backends.base import LockBackend
from .backends.registry import get_backend as get_store
from .task import LockedTask, run_signature
from .urls import StoreURL, parse_store_url

__all__ = ["AlreadyQueued", "DuplicateTaskError", "QueueOnce", "Singleton"]

#: celery-once's ``once`` option keys, and those it also reads from one ``apply_async`` call.
ONCE_OPTIONS = ("graceful", "keys", "timeout", "unlock_before_run")
ONCE_CALL_OPTIONS = ("graceful", "timeout")
#: celery-once's ``default_timeout`` when ``app.conf.ONCE`` gives none, seconds.
ONCE_DEFAULT_TIMEOUT_S = 3600.0
#: The only ``ONCE['backend']`` that maps onto a lock store here.
ONCE_REDIS_BACKEND = "celery_once.backends.Redis"
_ONCE_SETTINGS = ("url", "default_timeout", "blocking", "blocking_timeout")


class DuplicateTaskError(errors.DuplicateTaskError):
    """celery-singleton's ``DuplicateTaskError``: ``task_id`` is the task holding the lock.

    A subclass of this package's :class:`~celery_singleton_lock.DuplicateTaskError`, so either
    name catches it.
    """

    @property
    def task_id(self) -> str | None:
        """The id of the task holding the lock (celery-singleton's name for ``holder_id``)."""
        return self.holder_id


class AlreadyQueued(errors.DuplicateTaskError):
    """celery-once's ``AlreadyQueued``: ``countdown`` is the seconds the lock has left.

    Also a :class:`~celery_singleton_lock.DuplicateTaskError` with ``lock_key`` and
    ``holder_id``. ``message`` is celery-once's text, ``"Expires in N seconds"``.
    """

    def __init__(
        self,
        countdown: float,
        lock_key: str | None = None,
        holder_id: str | None = None,
        task_name: str | None = None,
    ) -> None:
        super().__init__(f"Expires in {countdown} seconds", lock_key, holder_id, task_name)
        #: Seconds until the lock held by the other task expires (if it is not released first).
        self.countdown = countdown
        #: celery-once's message.
        self.message = f"Expires in {countdown} seconds"
        self.args = (countdown, lock_key, holder_id, task_name)

    def __str__(self) -> str:
        task = f"task {self.task_name} " if self.task_name else ""
        return (f"{task}already queued: lock {self.lock_key} is held by task {self.holder_id}; "
                f"it expires in {self.countdown:g} seconds")


def _task_name(cls: type) -> str:
    return str(getattr(cls, "name", None) or cls.__name__)


def _setting(app: Any, name: str) -> Any:
    try:
        return app.conf.get(name)
    except AttributeError:
        return None


def _lock_key_option(cls: type, value: Any, option: str) -> Any:
    """``value`` as a ``lock_key``, checked against the task's signature, errors naming
    ``option`` (the peer's name for it)."""
    name = _task_name(cls)
    try:
        validate_lock_key_option(value, run_signature(cls), task_name=name)
    except LockConfigError as exc:
        raise LockConfigError(str(exc).replace("lock_key", option, 1), setting=option,
                              task_name=name) from None
    return value


def _bool_option(cls: type, value: Any, option: str) -> bool:
    if not isinstance(value, bool):
        raise LockConfigError(
            f"task {_task_name(cls)}: {option} must be True or False, got {value!r}",
            setting=option, task_name=_task_name(cls),
        )
    return value


def _seconds_option(cls: type, value: Any, option: str) -> float:
    try:
        return check_seconds(value, option)
    except LockConfigError as exc:
        raise LockConfigError(f"task {_task_name(cls)}: {exc}", setting=option,
                              task_name=_task_name(cls)) from None


class _OwnStore:
    """A task's lock store at a URL of the peer's settings, made once per process."""

    def __init__(self, url: StoreURL, setting: str) -> None:
        self.url = url
        self.setting = setting
        self._store: LockBackend | None = None
        self._pid = 0

    def get(self, socket_timeout: float) -> LockBackend:
        store = self._store
        if store is None or self._pid != current_pid():
            store = get_store(self.url, socket_timeout=socket_timeout, setting=self.setting)
            self._store, self._pid = store, current_pid()
        return store


class _CompatTask(LockedTask):
    """What both shims share: their own lock store URL and key prefix, if their settings say."""

    abstract = True

    #: The store named by the peer's settings (None: this package's ``singleton_lock_url``).
    _compat_store: ClassVar[_OwnStore | None] = None
    #: The key prefix named by the peer's settings (None: ``singleton_lock_key_prefix``).
    _compat_prefix: ClassVar[str | None] = None

    @classmethod
    def _set(cls, option: str, value: Any) -> None:
        """Set a lock option the peer's options decide, unless the task gives it itself."""
        if option not in cls.__dict__ or option in cls.__dict__.get("_compat_derived", ()):
            setattr(cls, option, value)
            derived = set(cls.__dict__.get("_compat_derived", ()))
            derived.add(option)
            cls._compat_derived = frozenset(derived)

    @property
    def lock_options(self) -> LockOptions:
        opts = super().lock_options
        prefix = self._compat_prefix
        if prefix is None or opts.key_prefix == prefix:
            return opts
        cached = self.__dict__.get("_compat_options")
        if cached is None or cached[0] is not opts:
            cached = self.__dict__["_compat_options"] = (opts, replace(opts, key_prefix=prefix))
        return cached[1]

    @property
    def lock_store(self) -> LockBackend:
        own = self._compat_store
        if own is None:
            return super().lock_store
        return own.get(self.lock_options.socket_timeout)

    def _remaining_s(self, key: str | None) -> float:
        """Seconds the lock at ``key`` has left (0.0 when it is gone or cannot be read)."""
        if not key:
            return 0.0
        try:
            record = read_lock(self.lock_store, key)
        except LockBackendError:
            return 0.0
        if record is None or record.ttl_s is None:
            return 0.0
        return round(record.ttl_s, 3)


# ------------------------------------------------------------------------------------------------
# celery-singleton


class Singleton(_CompatTask):
    """celery-singleton's ``Singleton`` on a :class:`~celery_singleton_lock.LockedTask`.

    One task per signature is queued or running: a duplicate ``apply_async`` returns the
    ``AsyncResult`` of the task holding the lock, or raises :class:`DuplicateTaskError` with
    ``raise_on_duplicate``. The lock is taken at enqueue and released when the task ends for
    good (``lock_mode="until_executed"``).
    """

    abstract = True

    #: Argument names that make two calls one task (celery-singleton; None: all arguments).
    unique_on: Any = None
    #: True: a duplicate raises DuplicateTaskError (else ``singleton_raise_on_duplicate``).
    raise_on_duplicate: bool | None = None
    #: Seconds the lock lives while its task is queued (else ``singleton_lock_expiry``).
    lock_expiry: float | None = None

    @classmethod
    def on_bound(cls, app: Any) -> None:
        if cls.__dict__.get("name") or cls.__dict__.get("run"):
            cls._translate(app)
        super().on_bound(app)

    @classmethod
    def _translate(cls, app: Any) -> None:
        name = _task_name(cls)
        unique_on = cls.unique_on
        if isinstance(unique_on, str):
            unique_on = [unique_on]
        # celery-singleton tests ``if unique_on:``, so [] means every argument too.
        cls._set("lock_key", _lock_key_option(cls, list(unique_on) if unique_on else None,
                                              "unique_on"))
        cls._set("lock_mode", "until_executed")
        raise_on_duplicate, option = cls.raise_on_duplicate, "raise_on_duplicate"
        if raise_on_duplicate is None:
            raise_on_duplicate = _setting(app, "singleton_raise_on_duplicate")
            option = "singleton_raise_on_duplicate"
        if raise_on_duplicate is not None:
            _bool_option(cls, raise_on_duplicate, option)
        cls._set("lock_on_enqueue_duplicate", "raise" if raise_on_duplicate else "return_existing")
        expiry, option = cls.lock_expiry, "lock_expiry"
        if expiry is None:
            expiry, option = _setting(app, "singleton_lock_expiry"), "singleton_lock_expiry"
        if expiry is not None:
            cls._set("lock_queued_ttl", _seconds_option(cls, expiry, option))
        for unsupported in ("singleton_backend_class", "singleton_backend_kwargs"):
            if _setting(app, unsupported):
                raise LockConfigError(
                    f"task {name}: {unsupported} is not supported: the locks live in the Redis "
                    "of singleton_backend_url (options go in its query string)",
                    setting=unsupported, task_name=name,
                )
        cls._compat_store = _singleton_store(app)
        prefix = _setting(app, "singleton_key_prefix")
        cls._compat_prefix = (None if prefix is None
                              else validate_key_prefix(prefix, setting="singleton_key_prefix"))

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        try:
            return super().apply_async(args, kwargs, **options)
        except DuplicateTaskError:
            raise
        except errors.DuplicateTaskError as exc:
            raise DuplicateTaskError(str(exc), exc.lock_key, exc.holder_id, self.name) from None


def _singleton_store(app: Any) -> _OwnStore | None:
    """celery-singleton's URL order, this package's ``singleton_lock_url`` second."""
    url = _setting(app, "singleton_backend_url")
    if url is not None:
        return _OwnStore(parse_store_url(url, setting="singleton_backend_url"),
                         "singleton_backend_url")
    if _setting(app, "singleton_lock_url") is not None:
        return None
    backend = _setting(app, "result_backend")
    if isinstance(backend, str) and backend.split("://", 1)[0] in ("redis", "rediss"):
        return _OwnStore(parse_store_url(backend, setting="result_backend"), "result_backend")
    return None  # the broker when it is Redis, else a LockConfigError at first use


# ------------------------------------------------------------------------------------------------
# celery-once


class _CallOptions(threading.local):
    queued_ttl: float | None = None


class QueueOnce(_CompatTask):
    """celery-once's ``QueueOnce`` on a :class:`~celery_singleton_lock.LockedTask`.

    A task is queued once per signature: a duplicate ``apply_async`` raises
    :class:`AlreadyQueued` (with ``once={'graceful': True}``, returns None). The lock is taken
    at enqueue and released when the task ends for good, or when a worker starts it with
    ``unlock_before_run``.
    """

    abstract = True

    #: celery-once's task option: ``graceful``, ``keys``, ``timeout``, ``unlock_before_run``.
    once: ClassVar[Mapping[str, Any]] = {"graceful": False, "unlock_before_run": False}

    _once_graceful: ClassVar[bool] = False
    #: Seconds a duplicate apply_async waits for the lock (ONCE's blocking); None: no wait.
    _once_blocking: ClassVar[float | None] = None
    #: Options of the apply_async call in progress in this thread (once={'timeout': ...}).
    _once_call: ClassVar[_CallOptions] = _CallOptions()

    @classmethod
    def on_bound(cls, app: Any) -> None:
        if cls.__dict__.get("name") or cls.__dict__.get("run"):
            cls._translate(app)
        super().on_bound(app)

    @classmethod
    def _translate(cls, app: Any) -> None:
        once = _once_options(cls, cls.once, ONCE_OPTIONS, "once")
        config = _once_config(cls, app)
        cls._once_graceful = bool(once.get("graceful", False))
        cls._set("lock_key", _lock_key_option(cls, _keys(cls, once.get("keys")), "once['keys']"))
        unlock_before_run = once.get("unlock_before_run", False)
        cls._set("lock_mode", "until_executing" if unlock_before_run else "until_executed")
        timeout = once.get("timeout")
        if timeout is None:
            timeout = config.get("default_timeout", ONCE_DEFAULT_TIMEOUT_S)
            timeout = _seconds_option(cls, timeout, "ONCE['settings']['default_timeout']")
        cls._set("lock_queued_ttl", timeout)
        cls._set("lock_on_enqueue_duplicate", "raise")
        blocking = _bool_option(cls, config.get("blocking", False),
                                "ONCE['settings']['blocking']")
        wait = config.get("blocking_timeout", 1.0)
        cls._once_blocking = (None if not blocking else math.inf if wait is None
                              else _seconds_option(cls, wait,
                                                   "ONCE['settings']['blocking_timeout']"))
        url = config.get("url")
        cls._compat_store = (None if url is None else _OwnStore(
            parse_store_url(_unix_url(url), setting="ONCE['settings']['url']"),
            "ONCE['settings']['url']"))
        cls._once_call = _CallOptions()

    @property
    def lock_options(self) -> LockOptions:
        opts = super().lock_options
        ttl = self._once_call.queued_ttl
        return opts if ttl is None else replace(opts, queued_ttl=ttl)

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Queue the task, or raise :class:`AlreadyQueued` (graceful: return None)."""
        once = _once_options(type(self), options.pop("once", None) or {}, ONCE_CALL_OPTIONS,
                             "apply_async(once=...)")
        graceful = once.get("graceful", self._once_graceful)
        call = self._once_call
        outer, call.queued_ttl = call.queued_ttl, once.get("timeout")
        queued: list[Any] = []
        duplicates: list[errors.DuplicateTaskError] = []

        def tried() -> bool:
            try:
                queued.append(super(QueueOnce, self).apply_async(args, kwargs, **options))
            except errors.DuplicateTaskError as exc:
                duplicates.append(exc)
                return False
            return True

        try:
            if self._once_blocking is None:
                if tried():
                    return queued[0]
            else:
                # ONCE's blocking: try again on each release notice, until blocking_timeout.
                key = self.lock_key_for(*(args or ()), **(kwargs or {}))
                if self.lock_store.wait_released(key, self._once_blocking, tried):
                    return queued[0]
        finally:
            call.queued_ttl = outer
        duplicate = duplicates[-1]
        if graceful:
            return None
        raise AlreadyQueued(self._remaining_s(duplicate.lock_key), duplicate.lock_key,
                            duplicate.holder_id, self.name) from None


def _once_options(cls: type, once: Any, allowed: tuple[str, ...], option: str) -> dict[str, Any]:
    """celery-once's ``once`` mapping, checked: known keys, each of the right type."""
    name = _task_name(cls)
    if not isinstance(once, Mapping):
        raise LockConfigError(f"task {name}: {option} must be a dict, got {once!r}",
                              setting=option, task_name=name)
    unknown = sorted(str(k) for k in once if k not in allowed)
    if unknown:
        raise LockConfigError(
            f"task {name}: {option} has unknown keys {', '.join(unknown)}; known: "
            f"{', '.join(allowed)}" + ("" if "keys" in allowed else
                                       " (keys and unlock_before_run are set on the task)"),
            setting=option, task_name=name,
        )
    checked = dict(once)
    for flag in ("graceful", "unlock_before_run"):
        if flag in checked:
            _bool_option(cls, checked[flag], f"{option}['{flag}']")
    if checked.get("timeout") is not None:
        checked["timeout"] = _seconds_option(cls, checked["timeout"], f"{option}['timeout']")
    return checked


def _keys(cls: type, keys: Any) -> Any:
    if isinstance(keys, str):
        raise LockConfigError(
            f"task {_task_name(cls)}: once['keys'] must be a list of argument names, not a str; "
            f"did you mean once={{'keys': [{keys!r}]}}?",
            setting="once['keys']", task_name=_task_name(cls),
        )
    return None if keys is None else list(keys) if isinstance(keys, (list, tuple)) else keys


def _once_config(cls: type, app: Any) -> dict[str, Any]:
    """``app.conf.ONCE['settings']``, checked (an empty dict when ONCE is not set)."""
    name = _task_name(cls)
    conf = _setting(app, "ONCE")
    if conf is None:
        return {}
    if not isinstance(conf, Mapping):
        raise LockConfigError(f"task {name}: ONCE must be a dict, got {type(conf).__name__}",
                              setting="ONCE", task_name=name)
    backend = conf.get("backend", ONCE_REDIS_BACKEND)
    if backend != ONCE_REDIS_BACKEND:
        raise LockConfigError(
            f"task {name}: ONCE['backend'] {backend!r} is not supported: the locks live in the "
            f"Redis of ONCE['settings']['url'] (backend {ONCE_REDIS_BACKEND!r})",
            setting="ONCE['backend']", task_name=name,
        )
    settings = conf.get("settings") or {}
    if not isinstance(settings, Mapping):
        raise LockConfigError(f"task {name}: ONCE['settings'] must be a dict",
                              setting="ONCE['settings']", task_name=name)
    unknown = sorted(str(k) for k in settings if k not in _ONCE_SETTINGS)
    if unknown:
        raise LockConfigError(
            f"task {name}: ONCE['settings'] has unknown keys {', '.join(unknown)}; known: "
            f"{', '.join(_ONCE_SETTINGS)}",
            setting="ONCE['settings']", task_name=name,
        )
    return dict(settings)


def _unix_url(url: Any) -> Any:
    """celery-once's ``redis+socket:///path`` is ``unix:///path`` here."""
    if isinstance(url, str) and url.startswith("redis+socket://"):
        return "unix://" + url[len("redis+socket://"):]
    return url

