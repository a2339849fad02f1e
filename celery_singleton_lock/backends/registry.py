"""Stores by URL scheme, through the ``celery_singleton_lock.backends`` entry-point group.

Each entry's name is a URL scheme and its value a :class:`~.base.LockBackend` or
:class:`~.base.QuorumMember` class. The project's own stores are registered the same way, in
its ``pyproject.toml``; a third party adds one by installing a package with such an entry
point, and nothing else::

    [project.entry-points."celery_singleton_lock.backends"]
    etcd = "my_package.etcd:EtcdBackend"
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

from ..errors import LockConfigError
from .base import FENCE_TTL_MS, LockBackend, QuorumMember

__all__ = ["GROUP", "backend_class", "schemes", "open_backend", "get_backend", "split_urls",
           "capabilities_of"]

#: The entry-point group that names store classes by URL scheme.
GROUP = "celery_singleton_lock.backends"

#: The extra that brings each of the project's own optional drivers.
EXTRAS = {
    "postgresql": "postgres", "postgres": "postgres",
    "mysql": "mysql", "mariadb": "mysql",
    "zookeeper": "zookeeper", "memcached": "memcached",
}

_classes: dict[str, type] = {}
_classes_lock = threading.Lock()


def schemes() -> list[str]:
    """Every registered URL scheme."""
    return sorted({ep.name.lower() for ep in entry_points(group=GROUP)})


def backend_class(scheme: str, setting: str = "singleton_lock_url") -> type:
    """The store class registered for ``scheme``; LockConfigError naming ``setting`` if none
    is, or if its driver is not installed (naming the extra that brings it)."""
    scheme = scheme.lower()
    with _classes_lock:
        cls = _classes.get(scheme)
    if cls is not None:
        return cls
    found = [ep for ep in entry_points(group=GROUP) if ep.name.lower() == scheme]
    if not found:
        known = ", ".join(s + "://" for s in schemes()) or "(none: is the package installed?)"
        raise LockConfigError(
            f"{setting}: no lock store is registered for URL scheme {scheme or '(none)'!r}; "
            f"expected one of {known}", setting=setting,
        )
    try:
        cls = found[0].load()
    except ImportError as exc:
        extra = EXTRAS.get(scheme)
        hint = (f"pip install 'celery-singleton-lock[{extra}]'" if extra
                else f"install the package that provides {found[0].value}")
        raise LockConfigError(
            f"{setting}: the {scheme}:// lock store needs a driver that is not installed "
            f"({exc}); {hint}", setting=setting,
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, (LockBackend, QuorumMember))):
        raise LockConfigError(
            f"{setting}: entry point {found[0].value!r} for {scheme}:// is not a LockBackend "
            f"or QuorumMember class", setting=setting,
        )
    with _classes_lock:
        _classes[scheme] = cls
    return cls


def scheme_of(url: str) -> str:
    return url.split("://", 1)[0].strip().lower() if "://" in url else ""


def split_urls(value: object, setting: str) -> tuple[type, tuple[str, ...]]:
    """The store class and the URLs a setting names (validated by the class)."""
    from ..urls import split_url_list

    if isinstance(value, str) and "://" in value:
        cls = backend_class(scheme_of(value.strip()), setting)
        if not getattr(cls, "comma_separates_urls", True):
            # Its commas separate hosts of one store (Sentinels, a ZooKeeper ensemble).
            return cls, (value.strip(),)
    urls = tuple(split_url_list(value, setting))
    classes = {backend_class(scheme_of(u), setting) for u in urls}
    if len(classes) > 1:
        from ..urls import redact_url

        raise LockConfigError(
            f"{setting}: the URLs name different kinds of lock store: "
            f"{', '.join(redact_url(u) for u in urls)}", setting=setting,
        )
    return classes.pop(), urls


def capabilities_of(value: object, setting: str = "singleton_lock_url") -> frozenset[str]:
    """What the store that ``value`` names can do, read from its class: nothing connects."""
    from ..urls import StoreURL
    from .base import Capability

    if isinstance(value, StoreURL):
        value = list(value.urls) if len(value.urls) > 1 else value.urls[0]
    cls, _ = split_urls(value, setting)
    caps = frozenset(getattr(cls, "capabilities", frozenset()))
    return caps - {Capability.QUORUM_MEMBER} if issubclass(cls, QuorumMember) else caps


def open_backend(value: object, *, socket_timeout: float = 0.2,
                 setting: str = "singleton_lock_url",
                 fence_ttl_ms: int = FENCE_TTL_MS) -> LockBackend:
    """A new store for the URL (or list of URLs) ``value``."""
    from ..urls import StoreURL, redact_url

    if isinstance(value, StoreURL):
        value = list(value.urls) if len(value.urls) > 1 else value.urls[0]
    cls, urls = split_urls(value, setting)
    if issubclass(cls, QuorumMember):
        from .quorum import Quorum

        cls.check_urls(urls, setting)
        if len(set(urls)) != len(urls):
            raise LockConfigError(
                f"{setting}: the same Redlock master is listed twice: "
                f"{', '.join(redact_url(u) for u in urls)}", setting=setting,
            )
        members = [cls.from_url(u, socket_timeout=socket_timeout, setting=setting)
                   for u in urls]
        return Quorum(members, description=", ".join(redact_url(u) for u in urls),
                      fence_ttl_ms=fence_ttl_ms)
    return cls.from_urls(urls, socket_timeout=socket_timeout, fence_ttl_ms=fence_ttl_ms,
                         setting=setting)


_stores: dict[tuple[Any, ...], LockBackend] = {}
_stores_lock = threading.Lock()
_stores_pid = os.getpid()


def get_backend(value: object, *, socket_timeout: float = 0.2,
                setting: str = "singleton_lock_url",
                fence_ttl_s: float = FENCE_TTL_MS / 1000.0) -> LockBackend:
    """A process-wide store for ``value`` (connection pools are shared, per process)."""
    global _stores_pid
    from ..urls import StoreURL

    if isinstance(value, StoreURL):
        key_urls: Any = value.urls
    elif isinstance(value, str):
        key_urls = value
    elif isinstance(value, Sequence):
        key_urls = tuple(value)
    else:
        key_urls = value
    fence_ttl_ms = max(1, int(fence_ttl_s * 1000))
    cache_key = (key_urls, socket_timeout, fence_ttl_ms)
    with _stores_lock:
        if _stores_pid != os.getpid():  # forked: the parent's sockets are not ours
            _stores.clear()
            _stores_pid = os.getpid()
        store = _stores.get(cache_key)
        if store is None:
            store = open_backend(value, socket_timeout=socket_timeout, setting=setting,
                                 fence_ttl_ms=fence_ttl_ms)
            _stores[cache_key] = store
        return store
