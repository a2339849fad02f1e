"""Parsing and redaction of lock store URLs.

The forms accepted (SPEC section 2):

* one ``redis://``, ``rediss://`` or ``unix://`` URL: one Redis;
* a list, or a comma-separated string, of two or more such URLs: Redlock over independent masters;
* one ``redis+cluster://`` or ``rediss+cluster://`` URL: a Redis Cluster (redis-py's client);
* ``memory://`` or ``memory://NAME``: an in-process store for tests (not shared between processes);
* ``redis+sentinel://[[user]:password@]host:26379[,host2:26379...]/master_name[/db]`` (and
  ``rediss+sentinel://``): the current master of a Redis behind Sentinel. The password is the
  master's; ``?sentinel_password=`` gives the Sentinels' own.

Passwords never leave this module unredacted except to the Redis client itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

from .errors import LockConfigError

__all__ = ["SentinelTarget", "StoreURL", "parse_sentinel_url", "parse_store_url", "redact_url",
           "sentinel_from_kombu"]

SINGLE_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
MEMORY_SCHEME = "memory"
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")

_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-z][a-z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)@", re.I)
_PASSWORD_IN_QUERY = re.compile(r"(?P<head>[?&][a-z_]*password=)(?P<pw>[^&\s]*)", re.I)


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (also inside longer text)."""
    text = _PASSWORD_IN_URL.sub(lambda m: m.group("head") + "***@", str(url))
    return _PASSWORD_IN_QUERY.sub(lambda m: m.group("head") + "***", text)


@dataclass(frozen=True)
class StoreURL:
    """A validated lock store location."""

    #: ``"single"``, ``"redlock"``, ``"cluster"``, ``"sentinel"``, ``"memory"``, or the URL
    #: scheme of another registered store (``"postgresql"``...).
    kind: str
    #: The URLs, unredacted (one for single, cluster and memory; N >= 2 for redlock).
    urls: tuple[str, ...]

    @property
    def redacted(self) -> str:
        return ",".join(redact_url(u) for u in self.urls)

    def __repr__(self) -> str:
        return f"StoreURL(kind={self.kind!r}, urls={self.redacted!r})"


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names."""

    #: (host, port) of every Sentinel.
    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int
    username: str | None
    password: str | None
    sentinel_password: str | None
    ssl: bool

    def __repr__(self) -> str:
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        return f"SentinelTarget({hosts}/{self.master_name}/{self.db})"


def parse_sentinel_url(url: str, setting: str = "singleton_lock_url") -> SentinelTarget:
    """Split a ``redis+sentinel://`` URL; :class:`LockConfigError` naming ``setting``."""
    def bad(why: str) -> LockConfigError:
        return LockConfigError(f"{setting}: Sentinel URL {redact_url(url)!r} {why}",
                               setting=setting)

    scheme, _, rest = url.partition("://")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) if colon else None)
    sentinels = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon:
            host, port = item.strip(), "26379"
        if not host or not port.isdigit():
            raise bad(f"has a bad Sentinel address {item.strip()!r}; expected host:port")
        sentinels.append((host.strip("[]"), int(port)))
    segments = [p for p in path.split("/") if p]
    if not segments:
        raise bad("names no master: expected redis+sentinel://host:26379/master_name[/db]")
    if len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
        raise bad("has a bad path; expected /master_name or /master_name/db (a number)")
    params = parse_qs(query)
    return SentinelTarget(
        sentinels=tuple(sentinels),
        master_name=unquote(segments[0]),
        db=int(segments[1]) if len(segments) == 2 else 0,
        username=username,
        password=password,
        sentinel_password=params.get("sentinel_password", [None])[0],
        ssl=scheme.lower() == "rediss+sentinel",
    )


def sentinel_from_kombu(broker_url: str, master_name: str | None) -> str:
    """kombu's ``sentinel://h1:26379;sentinel://h2:26379`` broker form as our Sentinel URL."""
    parts = [p.strip() for p in broker_url.split(";") if p.strip()]
    first = urlsplit(parts[0])
    auth = first.netloc.rpartition("@")[0]
    hosts = ",".join(urlsplit(p).netloc.rpartition("@")[2] for p in parts)
    db = first.path.strip("/") or "0"
    if not master_name:
        raise LockConfigError(
            "the broker is Redis behind Sentinel but broker_transport_options has no "
            "'master_name': set it, or set singleton_lock_url to "
            "redis+sentinel://host:26379/master_name",
            setting="broker_transport_options",
        )
    return f"redis+sentinel://{auth + '@' if auth else ''}{hosts}/{master_name}/{db}"


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
    if isinstance(value, str) and value.strip().lower().startswith(
            tuple(f"{s}://" for s in SENTINEL_SCHEMES)):
        url = value.strip()  # its commas separate Sentinels, not Redlock masters
        parse_sentinel_url(url, setting)
        return StoreURL("sentinel", (url,))
    if isinstance(value, str) and "://" in value:
        scheme = value.split("://", 1)[0].strip().lower()
        if scheme not in (*SINGLE_SCHEMES, *CLUSTER_SCHEMES, MEMORY_SCHEME):
            return _other_store(value, setting)
    elif isinstance(value, (list, tuple)) and value and isinstance(value[0], str) \
            and "://" in value[0]:
        scheme = value[0].split("://", 1)[0].strip().lower()
        if scheme not in (*SINGLE_SCHEMES, *CLUSTER_SCHEMES, MEMORY_SCHEME):
            return _other_store(value, setting)
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


def split_url_list(value: object, setting: str) -> list[str]:
    """The URLs of a setting given as a comma-separated string or a list of strings."""
    return _split(value, setting)


def check_redis_url(url: str, setting: str, *, cluster: bool = False) -> None:
    """Raise LockConfigError naming ``setting`` for a Redis URL the store cannot use."""
    _check_one(url, setting, CLUSTER_SCHEMES if cluster else SINGLE_SCHEMES)


def _other_store(value: object, setting: str) -> StoreURL:
    """A store of a scheme registered in the ``celery_singleton_lock.backends`` group."""
    from .backends.base import QuorumMember
    from .backends.registry import split_urls

    cls, urls = split_urls(value, setting)
    check = getattr(cls, "check_urls", None)
    if check is not None:
        check(urls, setting)
    if issubclass(cls, QuorumMember) and len(set(urls)) != len(urls):
        raise LockConfigError(
            f"{setting}: the same Redlock master is listed twice: "
            f"{', '.join(redact_url(p) for p in urls)}", setting=setting,
        )
    scheme = urls[0].split("://", 1)[0].lower()
    return StoreURL(scheme, tuple(urls))
