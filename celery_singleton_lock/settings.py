"""Settings (``app.conf.singleton_lock_*``) and task options (``lock_*``), validated once.

Settings are registered with ``app.add_defaults`` so Django users get ``CELERY_SINGLETON_LOCK_*``
through Celery's namespace. A task option of the same name without the ``singleton_`` prefix
(``lock_ttl``) wins over the setting when it is not None, as Celery's ``Task.from_config`` does.
Every value is checked at task registration; errors name the setting or option.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import LockConfigError
from .keys import validate_key_prefix
from .urls import StoreURL, parse_store_url, sentinel_from_kombu

__all__ = [
    "DEFAULTS",
    "MODES",
    "ON_DUPLICATE",
    "ON_BACKEND_ERROR",
    "ON_LOST",
    "ON_ENQUEUE_DUPLICATE",
    "TASK_OPTIONS",
    "MIN_TTL_TIMEOUTS",
    "LockOptions",
    "check_limit",
    "check_renewable_ttl",
    "register_defaults",
    "resolve_options",
    "resolve_store_url",
]

MODES = ("while_executing", "until_executing", "until_executed", "until_and_while_executing",
         "until_expired")
ON_DUPLICATE = ("reject", "requeue", "wait", "coalesce")
ON_BACKEND_ERROR = ("requeue", "run", "fail")
ON_LOST = ("warn", "abort")
ON_ENQUEUE_DUPLICATE = ("return_existing", "raise")

#: Every setting and its default (SPEC section 2).
DEFAULTS: dict[str, Any] = {
    "singleton_lock_url": None,
    "singleton_lock_ttl": 30.0,
    "singleton_lock_key_prefix": "csl",
    "singleton_lock_mode": "while_executing",
    "singleton_lock_on_duplicate": "reject",
    "singleton_lock_requeue_delay": 5.0,
    "singleton_lock_requeue_max": 100,
    "singleton_lock_wait_timeout": 60.0,
    "singleton_lock_queued_ttl": 3600.0,
    "singleton_lock_on_backend_error": "requeue",
    "singleton_lock_on_lost": "warn",
    "singleton_lock_socket_timeout": 0.2,
    "singleton_lock_on_enqueue_duplicate": "return_existing",
    "singleton_lock_beat_ttl": 10.0,
    "singleton_lock_fence_ttl": 604800.0,
}

#: Settings with a task option of the same name without the ``singleton_`` prefix.
TASK_OPTIONS = tuple(
    name[len("singleton_"):]
    for name in DEFAULTS
    if name
    not in (
        "singleton_lock_url",
        "singleton_lock_key_prefix",
        "singleton_lock_socket_timeout",
        "singleton_lock_beat_ttl",
        "singleton_lock_fence_ttl",
    )
)

#: A ttl must outlast this many socket timeouts: one renewal may take a whole timeout, and
#: renewal runs every ttl/3.
MIN_TTL_TIMEOUTS = 3

_CHOICES = {
    "lock_mode": MODES,
    "lock_on_duplicate": ON_DUPLICATE,
    "lock_on_backend_error": ON_BACKEND_ERROR,
    "lock_on_lost": ON_LOST,
    "lock_on_enqueue_duplicate": ON_ENQUEUE_DUPLICATE,
}
_SECONDS = ("lock_ttl", "lock_requeue_delay", "lock_wait_timeout", "lock_queued_ttl")


def register_defaults(app: Any) -> None:
    """Add the ``singleton_lock_*`` defaults to ``app`` once, below every user setting.

    ``app.add_defaults`` would put them *above* a configuration loaded with
    ``config_from_object`` (Django's ``CELERY_SINGLETON_LOCK_*`` included) and hide it, so the
    defaults are appended as the last map of the configuration chain instead, once the app is
    configured.
    """
    if getattr(app, "_singleton_lock_defaults", False):
        return
    app._singleton_lock_defaults = True
    defaults = dict(DEFAULTS)

    def append(conf: Any) -> None:
        conf.defaults.append(defaults)
        conf.maps.append(defaults)

    if getattr(app, "configured", False):
        append(app._conf)
    else:
        app.on_after_configure.connect(
            lambda sender=None, source=None, **kwargs: append(source), weak=False
        )


def check_choice(value: Any, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise LockConfigError(
            f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}",
            setting=name,
        )
    return str(value)


def check_seconds(value: Any, name: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LockConfigError(
            f"{name} must be a number of seconds, got {type(value).__name__} {value!r}",
            setting=name,
        )
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise LockConfigError(f"{name} must be {bound} seconds, got {value!r}", setting=name)
    return float(value)


def check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LockConfigError(f"{name} must be an integer >= 0, got {value!r}", setting=name)
    return value


def check_renewable_ttl(ttl_s: float, name: str, socket_timeout_s: float) -> float:
    """``ttl_s`` if it is at least :data:`MIN_TTL_TIMEOUTS` socket timeouts, else an error.

    A shorter lock can lapse between two renewals (or before the worker's main process adopts
    it), and at a few milliseconds it expires before the acquire's reply is even read.
    """
    minimum = MIN_TTL_TIMEOUTS * socket_timeout_s
    if ttl_s < minimum:
        raise LockConfigError(
            f"{name} must be at least {minimum:g} seconds ({MIN_TTL_TIMEOUTS} x "
            f"singleton_lock_socket_timeout={socket_timeout_s:g}), got {ttl_s!r}",
            setting=name,
        )
    return ttl_s


def _conf(app: Any, name: str) -> Any:
    try:
        value = app.conf.get(name)
    except AttributeError:
        value = None
    return DEFAULTS[name] if value is None else value


@dataclass(frozen=True)
class LockOptions:
    """The effective lock options of one task."""

    ttl: float
    mode: str
    on_duplicate: str
    requeue_delay: float
    requeue_max: int
    wait_timeout: float
    queued_ttl: float
    on_backend_error: str
    on_lost: str
    on_enqueue_duplicate: str
    key_prefix: str
    socket_timeout: float
    fence_ttl: float
    #: Bodies of one key that may run at once (``lock_limit``, a task option only).
    limit: int = 1


def check_limit(value: Any, mode: str, on_duplicate: str = "reject") -> int:
    """``lock_limit``: an integer >= 1 (None: 1), above 1 only for ``while_executing`` and
    not with ``coalesce`` (whose one follow-up waits for the one holder)."""
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LockConfigError(
            f"lock_limit must be an integer >= 1, got {type(value).__name__} {value!r}",
            setting="lock_limit",
        )
    if value > 1 and mode != "while_executing":
        raise LockConfigError(
            f"lock_limit={value} needs lock_mode='while_executing' (it limits the bodies that "
            f"run at once), got lock_mode={mode!r}",
            setting="lock_limit",
        )
    if value > 1 and on_duplicate == "coalesce":
        raise LockConfigError(
            f"lock_limit={value} cannot be used with lock_on_duplicate='coalesce' (one "
            f"follow-up runs after the one holder)",
            setting="lock_limit",
        )
    return value


def check_coalesce(on_duplicate: str, mode: str, name: str) -> None:
    """``coalesce`` queues a follow-up behind a running body: ``while_executing`` only."""
    if on_duplicate == "coalesce" and mode != "while_executing":
        raise LockConfigError(
            f"{name}='coalesce' needs lock_mode='while_executing' (a follow-up waits for the "
            f"running holder), got lock_mode={mode!r}",
            setting=name,
        )


def _validate(option: str, value: Any, setting_name: str) -> Any:
    if option in _CHOICES:
        return check_choice(value, _CHOICES[option], setting_name)
    if option in _SECONDS:
        return check_seconds(value, setting_name, allow_zero=option == "lock_requeue_delay")
    if option == "lock_requeue_max":
        return check_count(value, setting_name)
    return value


def resolve_options(task: Any, app: Any) -> LockOptions:
    """The task's options over the app's settings, each validated (``LockConfigError``)."""
    values: dict[str, Any] = {}
    names: dict[str, str] = {}
    for option in TASK_OPTIONS:
        own = getattr(task, option, None)
        name = option if own is not None else "singleton_" + option
        value = own if own is not None else _conf(app, name)
        values[option], names[option] = _validate(option, value, name), name
    prefix = validate_key_prefix(_conf(app, "singleton_lock_key_prefix"))
    timeout = check_seconds(_conf(app, "singleton_lock_socket_timeout"),
                            "singleton_lock_socket_timeout")
    check_renewable_ttl(values["lock_ttl"], names["lock_ttl"], timeout)
    check_coalesce(values["lock_on_duplicate"], values["lock_mode"], names["lock_on_duplicate"])
    fence_ttl = check_seconds(_conf(app, "singleton_lock_fence_ttl"), "singleton_lock_fence_ttl")
    return LockOptions(
        ttl=values["lock_ttl"],
        mode=values["lock_mode"],
        on_duplicate=values["lock_on_duplicate"],
        requeue_delay=values["lock_requeue_delay"],
        requeue_max=values["lock_requeue_max"],
        wait_timeout=values["lock_wait_timeout"],
        queued_ttl=values["lock_queued_ttl"],
        on_backend_error=values["lock_on_backend_error"],
        on_lost=values["lock_on_lost"],
        on_enqueue_duplicate=values["lock_on_enqueue_duplicate"],
        key_prefix=prefix,
        socket_timeout=timeout,
        fence_ttl=fence_ttl,
        limit=check_limit(getattr(task, "lock_limit", None), values["lock_mode"],
                          values["lock_on_duplicate"]),
    )


def resolve_store_url(app: Any) -> StoreURL:
    """``singleton_lock_url``, else the broker URL when it is a Redis URL, else an error."""
    url = _conf(app, "singleton_lock_url")
    if url is not None:
        return parse_store_url(url, setting="singleton_lock_url")
    broker = app.conf.get("broker_url") or ""
    scheme = broker.split("://", 1)[0].lower() if isinstance(broker, str) else ""
    if scheme in ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel"):
        return parse_store_url(broker, setting="broker_url")
    if scheme == "sentinel":  # kombu's form: sentinel://h1:26379;sentinel://h2:26379
        options = app.conf.get("broker_transport_options") or {}
        url = sentinel_from_kombu(broker, options.get("master_name"))
        return parse_store_url(url, setting="broker_url")
    raise LockConfigError(
        "singleton_lock_url is not set and the broker is not Redis: set "
        "app.conf.singleton_lock_url to a redis://, rediss://, unix://, redis+cluster:// or "
        "redis+sentinel:// URL (or a list of Redlock master URLs), or to the URL of another "
        "lock store: postgresql://, mysql://, zookeeper://, memcached://",
        setting="singleton_lock_url",
    )
