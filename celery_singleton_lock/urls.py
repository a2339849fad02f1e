"""Parsing and redaction of lock store URLs.

The forms accepted (SPEC section 2):

* one ``redis://``, ``rediss://`` or ``unix://`` URL: one Redis;
* a list, or a comma-separated string, of two or more such URLs: Redlock over independent masters;
* one ``redis+cluster://`` or ``rediss+cluster://`` URL: a Redis Cluster (redis-py's client);
* ``memory://`` or ``memory://NAME``: an in-process store for tests (not shared between processes).

Passwords never leave this module unredacted except to the Redis client itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, parse_qs, urlsplit

from .errors import LockConfigError

__all__ = ["StoreURL", "parse_store_url", "redact_url"]

SINGLE_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
MEMORY_SCHEME = "memory"

_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-z][a-z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)@", re.I)
_PASSWORD_IN_QUERY = re.compile(r"(?P<head>[?&]password=)(?P<pw>[^&\s]*)", re.I)


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (also inside longer text)."""
    text = _PASSWORD_IN_URL.sub(lambda m: m.group("head") + "***@", str(url))
    return _PASSWORD_IN_QUERY.sub(lambda m: m.group("head") + "***", text)


@dataclass(frozen=True)
class StoreURL:
    """A validated lock store location."""

    #: ``"single"``, ``"redlock"``, ``"cluster"`` or ``"memory"``.
    kind: str
    #: The URLs, unredacted (one for single, cluster and memory; N >= 2 for redlock).
    urls: tuple[str, ...]

    @property
    def redacted(self) -> str:
        return ",".join(redact_url(u) for u in self.urls)

    def __repr__(self) -> str:
        return f"StoreURL(kind={self.kind!r}, urls={self.redacted!r})"


def _split(value: object, setting: str) -> list[str]:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        parts = []
        for item in value:
            if not isinstance(item, str):
                raise LockConfigError(
                    f"{setting}: every URL must be a string, got {type(item).__name__}",
                    setting=setting,
                )
            parts.append(item.strip())
    else:
        raise LockConfigError(
            f"{setting} must be a URL string or a list of URLs, got {type(value).__name__}",
            setting=setting,
        )
    if not parts or any(not p for p in parts):
        raise LockConfigError(
            f"{setting} is empty or holds an empty URL: {redact_url(str(value))!r}",
            setting=setting,
        )
    return parts


def _check_one(url: str, setting: str, allowed: tuple[str, ...]) -> SplitResult:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise LockConfigError(
            f"{setting}: cannot parse URL {redact_url(url)!r}: {exc}", setting=setting
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in allowed:
        raise LockConfigError(
            f"{setting}: URL {redact_url(url)!r} has scheme {scheme or '(none)'!r}; "
            f"expected one of {', '.join(s + '://' for s in allowed)}",
            setting=setting,
        )
    if scheme == "unix":
        if not parts.path:
            raise LockConfigError(
                f"{setting}: unix URL {redact_url(url)!r} has no socket path", setting=setting
            )
    elif scheme != MEMORY_SCHEME and not parts.hostname:
        raise LockConfigError(f"{setting}: URL {redact_url(url)!r} has no host", setting=setting)
    if scheme in SINGLE_SCHEMES and scheme != "unix":
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise LockConfigError(
                f"{setting}: URL {redact_url(url)!r} has database {db!r}; expected a number",
                setting=setting,
            )
    query = parse_qs(parts.query)
    if "db" in query and not query["db"][0].isdigit():
        raise LockConfigError(
            f"{setting}: URL {redact_url(url)!r} has db={query['db'][0]!r}; expected a number",
            setting=setting,
        )
    return parts


def parse_store_url(value: object, setting: str = "singleton_lock_url") -> StoreURL:
    """Validate a lock store location; raise :class:`LockConfigError` naming ``setting``."""
    if isinstance(value, StoreURL):
        return value
    parts = _split(value, setting)
    if len(parts) == 1:
        url = parts[0]
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme in CLUSTER_SCHEMES:
            _check_one(url, setting, CLUSTER_SCHEMES)
            return StoreURL("cluster", (url,))
        if scheme == MEMORY_SCHEME:
            _check_one(url, setting, (MEMORY_SCHEME,))
            return StoreURL("memory", (url,))
        _check_one(url, setting, SINGLE_SCHEMES)
        return StoreURL("single", (url,))
    for url in parts:
        _check_one(url, setting, SINGLE_SCHEMES)
    if len(set(parts)) != len(parts):
        raise LockConfigError(
            f"{setting}: the same Redlock master is listed twice: "
            f"{', '.join(redact_url(p) for p in parts)}",
            setting=setting,
        )
    return StoreURL("redlock", tuple(parts))
