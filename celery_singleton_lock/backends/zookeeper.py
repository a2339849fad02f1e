"""The ZooKeeper lock store (``zookeeper://``, kazoo, extra ``[zookeeper]``).

A lock is an ephemeral sequential node under one parent node per key; the node with the lowest
sequence number holds the lock (the ``lock_limit`` lowest hold its slots). Layout, under the
URL's chroot::

    /locks/<bucket>/<key>/l-<token>-<sequence>   a holder (data: its metadata, JSON)
    /locks/<bucket>/<key>/w-<ticket>-<sequence>  a place in line of a waiting ``wait``
    /locks/<bucket>/<key>/slot-<i>               slot number i of a ``lock_limit`` holder
    /follow/<bucket>/<key>                       the key's one follow-up (``coalesce``)
    /beat/<bucket>/<key>                         beat's last runs (JSON)

``<key>`` is the lock key, percent-encoded where ZooKeeper forbids a character; ``<bucket>``
is two hex digits of its SHA-1, so no parent has more children than one reply can carry and
``celery locks list`` reads the keys in bounded pages of buckets.

* **Fencing token**: the creation zxid (``czxid``) of the node that first took the lock's place
  in line. zxids grow with every write to the ensemble, and a key's holders take their turns
  in the order of their nodes, so the token grows with every acquisition of the key. A node
  re-created under another session (adoption, handover) keeps its token in its data.
* **Wait**: a waiter puts a ticket node in line and watches only the node just before it (with
  ``lock_limit`` > 1, the children of the parent); its next attempt turns the ticket into the
  lock when the ticket reaches the front, so waiters are served first come, first served and a
  release wakes one waiter, not a herd.
* **The session**: the lock ends with the session that holds its node. A lock does not lapse
  after ``ttl``: the session timeout (``?session_timeout=``, default 20 s) bounds how long a
  dead holder's lock outlives it. Renewal checks that the node still exists (and counts
  ``renewals`` in its data); while the session is suspended its answer is "undecided", and
  once the node is gone, "lost".
* **Adoption** (prefork: the main process renews a child's locks): a renewal by a session that
  does not hold the node moves the node to the renewer's session in one transaction (delete
  checked by version, create of the same name), so it keeps its place in line and its token,
  and from then on the lock follows the worker main process's session, not the busy child's.
* **Handover** (enqueue locks): the same transaction moves the lock to the session of the
  process that takes it over, under the new token.
* Parent nodes of released keys are deleted as the last holder leaves (a delete that fails
  while the parent has children); listing also removes the empty parents it walks past, and
  :meth:`~ZooKeeperBackend.maintain` the nodes of creates whose answer was lost.

Every request is bounded by ``singleton_lock_socket_timeout``. A forked child never uses its
parent's client: it opens a session of its own on first use.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote

from ..errors import LockBackendError, LockConfigError
from ..keys import glob_regex
from ..urls import redact_url
from .base import (
    AcquireResult,
    Capability,
    FixedMetadata,
    LockBackend,
    LockRecord,
    LockView,
    Renewal,
)

__all__ = ["ZooKeeperBackend", "ZooKeeperTarget", "parse_zookeeper_url"]

logger = logging.getLogger("celery_singleton_lock.backends.zookeeper")

SCHEME = "zookeeper"
DEFAULT_PORT = 2181
#: Default session timeout, seconds (the server may narrow it to its min/max).
DEFAULT_SESSION_TIMEOUT_S = 20.0
#: Buckets the lock parents are spread over (two hex digits of the key's SHA-1).
BUCKET_DIGITS = 2
#: Lock parents read in one pipelined page while listing.
PAGE = 64
#: Longest a waiter sleeps between attempts when no watch fired (a missed watch, a
#: coalesce claim to keep alive), seconds.
WAKE_S = 2.0
#: An acquire looks at the line first for this long after it found a key's parent, seconds.
BUSY_S = 5.0
#: Tries of an optimistic update (a version-checked write that lost a race).
TRIES = 8

_LOCK, _TICKET, _CLAIM = "l-", "w-", "slot-"
_SLOT = re.compile(r"(?<=\}):slot:(\d+)$")
#: Characters kept as they are in a node name; everything else is percent-encoded.
_SAFE = "!$&'()*+,;=:@{}[]-._~ "
_QUERY_KEYS = {"session_timeout", "connect_timeout"}


# ------------------------------------------------------------------------------------------
# The URL


@dataclass(frozen=True)
class ZooKeeperTarget:
    """What a ``zookeeper://`` URL names."""

    url: str
    #: ``host:port,host:port`` of the ensemble.
    hosts: str
    #: ``/path`` every node lives under ("" for the root).
    chroot: str
    session_timeout_s: float
    connect_timeout_s: float | None
    username: str | None
    password: str | None

    @property
    def redacted(self) -> str:
        return redact_url(self.url)

    def __repr__(self) -> str:
        return f"ZooKeeperTarget({self.redacted!r})"


def parse_zookeeper_url(url: str, setting: str = "singleton_lock_url") -> ZooKeeperTarget:
    """Split ``zookeeper://[user:password@]host[:port][,host2[:port]...][/chroot][?options]``.

    Options: ``session_timeout`` and ``connect_timeout`` (seconds). Raises
    :class:`LockConfigError` naming ``setting``.
    """
    shown = redact_url(url)

    def bad(why: str) -> LockConfigError:
        return LockConfigError(f"{setting}: ZooKeeper URL {shown!r} {why}", setting=setting)

    if not isinstance(url, str) or "://" not in url:
        raise bad("is not a URL")
    scheme, _, rest = url.strip().partition("://")
    if scheme.lower() != SCHEME:
        raise bad(f"has scheme {scheme!r}; expected zookeeper://")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        if not user or not colon:
            raise bad("has credentials that are not user:password (digest auth)")
        username, password = unquote(user), unquote(pw)
    if not hostlist.strip():
        raise bad("names no host; expected zookeeper://host:2181[,host2:2181...][/chroot]")
    hosts = []
    for item in hostlist.split(","):
        item = item.strip()
        if item.startswith("["):  # [::1]:2181
            host, _, port = item[1:].partition("]")
            port = port.lstrip(":")
            host = f"[{host}]"
        else:
            host, colon, port = item.rpartition(":")
            if not colon:
                host, port = item, ""
        if not host or host == "[]":
            raise bad(f"has an empty host in {hostlist!r}")
        if port and (not port.isdigit() or not 0 < int(port) < 65536):
            raise bad(f"has a bad port {port!r} for host {host!r}")
        hosts.append(f"{host}:{port or DEFAULT_PORT}")
    segments = path.split("/") if path else []
    if segments and segments[-1] == "":
        segments.pop()  # a trailing slash
    if any(s in ("", ".", "..", "zookeeper") for s in segments) or any(
            ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in path):
        raise bad(f"has a bad chroot {('/' + path)!r}")
    chroot = "/" + "/".join(unquote(s) for s in segments) if segments else ""
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise bad("has a query that cannot be parsed") from None
    unknown = set(params) - _QUERY_KEYS
    if unknown:
        raise bad(f"has unknown option(s) {', '.join(sorted(unknown))}; "
                  f"expected {', '.join(sorted(_QUERY_KEYS))}")

    def seconds(name: str) -> float | None:
        if name not in params:
            return None
        try:
            value = float(params[name][-1])
        except ValueError:
            raise bad(f"has {name}={params[name][-1]!r}; expected seconds") from None
        if not value > 0 or value != value or value == float("inf"):
            raise bad(f"has {name}={params[name][-1]!r}; expected a positive number")
        return value

    return ZooKeeperTarget(
        url=url.strip(), hosts=",".join(hosts), chroot=chroot,
        session_timeout_s=seconds("session_timeout") or DEFAULT_SESSION_TIMEOUT_S,
        connect_timeout_s=seconds("connect_timeout"), username=username, password=password,
    )


# ------------------------------------------------------------------------------------------
# Names


def _encode(text: str) -> str:
    name = quote(text, safe=_SAFE)
    return name.replace(".", "%2E") if name in (".", "..") else name


def _bucket(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:BUCKET_DIGITS]


def _split_slot(key: str) -> tuple[str, int | None]:
    """``(lock key, sequence)`` of a slot key ``<key>:slot:<sequence>``, else ``(key, None)``."""
    m = _SLOT.search(key)
    return (key[:m.start()], int(m.group(1))) if m else (key, None)


class _Node:
    """One child of a lock parent: a holder's node or a waiter's ticket."""

    __slots__ = ("name", "kind", "token", "seq")

    def __init__(self, name: str, kind: str, token: str, seq: int) -> None:
        self.name, self.kind, self.token, self.seq = name, kind, token, seq

    @classmethod
    def parse(cls, name: str) -> _Node | None:
        if len(name) < 13 or name[-11] != "-" or not name[-10:].isdigit():
            return None
        if name.startswith(_LOCK):
            return cls(name, "l", unquote(name[2:-11]), int(name[-10:]))
        if name.startswith(_TICKET):
            return cls(name, "w", name[2:-11], int(name[-10:]))
        return None


def _line(names: Sequence[str]) -> list[_Node]:
    """A parent's children in line order (lowest sequence first)."""
    nodes = [n for n in map(_Node.parse, names) if n is not None]
    nodes.sort(key=lambda n: n.seq)
    return nodes


class _Ticket:
    __slots__ = ("path", "name", "seq", "czxid")

    def __init__(self, path: str, czxid: int) -> None:
        self.path = path
        self.name = path.rsplit("/", 1)[1]
        self.seq = int(self.name[-10:])
        self.czxid = czxid


#: An acquire's outcome: acquired, fence, holder's owner id, node path, slot number, and the
#: data written (None when not known).
_Taken = tuple[bool, int, "str | None", str, int, "dict[str, str] | None"]


class _Down(Exception):
    """The ensemble did not answer (connection lost, session expired, timeout)."""


class _Redact(logging.Filter):
    """Keeps the digest credentials out of kazoo's log records (it logs its requests)."""

    def __init__(self) -> None:
        super().__init__()
        #: Every password (and ``user:password``) of a store opened in this process.
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is left alone
            return True
        found = [s for s in list(self.secrets) if s and s in text]
        if found:
            for s in sorted(found, key=len, reverse=True):
                text = text.replace(s, "***")
            record.msg, record.args = text, None
        return True


#: Every store of this module, so the interpreter's exit ends their sessions at once (their
#: locks go then, not a session timeout later).
_OPEN: weakref.WeakSet[ZooKeeperBackend] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for store in list(_OPEN):
        with contextlib.suppress(Exception):  # the interpreter is going away
            store.close()


#: kazoo logs through this logger (its requests included, at DEBUG), through the filter.
_KAZOO_LOG = logging.getLogger("celery_singleton_lock.backends.zookeeper.kazoo")
_REDACT = _Redact()
_KAZOO_LOG.addFilter(_REDACT)


# ------------------------------------------------------------------------------------------
# The store


class ZooKeeperBackend(LockBackend):
    """Locks as ephemeral sequential nodes of one ZooKeeper ensemble (see the module doc)."""

    capabilities = frozenset({
        Capability.SESSION, Capability.NOTIFY, Capability.ADOPTABLE, Capability.LIMIT,
        Capability.FOLLOW, Capability.HANDOVER, Capability.BEAT, Capability.LIST,
    })
    #: ``zookeeper://h1:2181,h2:2181/chroot``: the commas separate hosts of one ensemble.
    comma_separates_urls = False

    def __init__(self, target: ZooKeeperTarget, *, socket_timeout: float = 0.2,
                 fence_ttl_ms: int | None = None) -> None:
        self.target = target
        self.description = target.redacted
        self.request_timeout_s = float(socket_timeout)
        self.connect_timeout_s = target.connect_timeout_s or max(2.0, 5 * self.request_timeout_s)
        if fence_ttl_ms is not None:
            self.fence_ttl_ms = fence_ttl_ms  # unused: a zxid needs no counter
        self.clock = time.monotonic
        self._root = target.chroot
        self._mutex = threading.RLock()
        self._zk: Any = None
        self._pid = os.getpid()
        self._connected = threading.Event()
        #: (lock key, token) -> the holder node's path, for this process's own locks.
        self._paths: dict[tuple[str, str], str] = {}
        #: lock key -> when its parent was last found there (an acquire then looks first).
        self._busy: dict[str, float] = {}
        #: (lock key, token) -> the node's data as last written by this process.
        self._held: dict[tuple[str, str], dict[str, str]] = {}
        #: (thread, lock key) -> the ticket of a wait in progress.
        self._tickets: dict[tuple[int, str], _Ticket] = {}
        #: (thread, lock key) of a wait in progress -> the owner id of its last attempt.
        self._owners: dict[tuple[int, str], str] = {}
        #: (thread, lock key) of a wait in progress -> the lock_limit it asks (it watches by it).
        self._limits: dict[tuple[int, str], int] = {}
        #: Nodes of ours to delete that a failed request may have left (an acquire that timed
        #: out, a ticket), and releases to retry until their deadline.
        self._orphans: set[str] = set()
        #: (lock key, parent, name prefix, token) of creates whose outcome is unknown (the
        #: connection dropped first): :meth:`maintain` deletes what they made, if anything.
        self._suspects: set[tuple[str, str, str, str]] = set()
        #: (lock key, token) of acquires in progress, which the sweep leaves alone.
        self._taking: set[tuple[str, str]] = set()
        self._retries: list[tuple[str, str, float]] = []
        self._wakers: set[threading.Event] = set()
        self._log = _KAZOO_LOG
        _OPEN.add(self)
        if target.password:
            _REDACT.secrets.update((f"{target.username}:{target.password}", target.password))

    @classmethod
    def from_urls(cls, urls: Sequence[str], *, socket_timeout: float, fence_ttl_ms: int,
                  setting: str) -> ZooKeeperBackend:
        if len(urls) != 1:
            raise LockConfigError(
                f"{setting}: a ZooKeeper ensemble is one URL whose hosts are separated by "
                f"commas (zookeeper://h1:2181,h2:2181/chroot), not a list of "
                f"{len(urls)} URLs: {', '.join(redact_url(u) for u in urls)}", setting=setting)
        target = parse_zookeeper_url(urls[0], setting)
        try:
            import kazoo.client  # noqa: F401
        except ImportError as exc:
            raise LockConfigError(
                f"{setting}: the zookeeper:// lock store needs kazoo, which is not installed "
                f"({exc}); pip install 'celery-singleton-lock[zookeeper]'", setting=setting,
            ) from exc
        return cls(target, socket_timeout=socket_timeout, fence_ttl_ms=fence_ttl_ms)

    # -- paths ---------------------------------------------------------------------------

    def _parent(self, key: str) -> str:
        return f"{self._root}/locks/{_bucket(key)}/{_encode(key)}"

    def _follow_path(self, key: str) -> str:
        return f"{self._root}/follow/{_bucket(key)}/{_encode(key)}"

    def _state_path(self, key: str) -> str:
        return f"{self._root}/beat/{_bucket(key)}/{_encode(key)}"

    # -- the client ------------------------------------------------------------------------

    def _client(self) -> Any:
        """This process's connected client; :class:`_Down` when it cannot connect in time."""
        with self._mutex:
            if self._pid != os.getpid():
                # Forked: the parent's client has no threads here and its socket is the
                # parent's session. Leave it untouched (closing it would end that session).
                self._zk = None
                self._connected = threading.Event()
                self._paths.clear()
                self._held.clear()
                self._tickets.clear()
                self._orphans.clear()
                self._suspects.clear()
                self._taking.clear()
                self._owners.clear()
                self._limits.clear()
                self._retries.clear()
                self._wakers.clear()
                self._pid = os.getpid()
            zk = self._zk
            first = zk is None
            if first:
                zk = self._zk = self._new_client()
        if not zk.connected:
            self._connected.wait(self.connect_timeout_s if first else self.request_timeout_s)
            if not zk.connected:
                raise _Down(f"not connected to ZooKeeper (state {zk.state})")
        return zk

    def _new_client(self) -> Any:
        from kazoo.client import KazooClient
        from kazoo.retry import KazooRetry

        t = self.target
        auth = acl = None
        if t.password is not None:
            from kazoo.security import CREATOR_ALL_ACL

            # Digest credentials: every node made is this identity's alone, so a client
            # without them (or with a wrong password) is refused (NoAuth), not just tagged.
            auth, acl = [("digest", f"{t.username}:{t.password}")], CREATOR_ALL_ACL
        connected = self._connected
        zk = KazooClient(
            hosts=t.hosts, timeout=t.session_timeout_s, auth_data=auth, default_acl=acl,
            logger=self._log,
            connection_retry=KazooRetry(max_tries=-1, delay=0.05, backoff=2, max_delay=1.0),
        )

        def on_state(state: str) -> None:  # kazoo's thread: no blocking calls here
            if state == "CONNECTED":
                connected.set()
            else:
                connected.clear()
                logger.info("ZooKeeper session %s: %s", self.description, state)
            for event in list(self._wakers):
                event.set()

        zk.add_listener(on_state)
        zk.start_async()
        return zk

    def _result(self, async_result: Any) -> Any:
        """An asynchronous request's answer; ZooKeeper's own refusals (no node, node exists,
        bad version, not empty) are raised as they are, everything else as :class:`_Down`."""
        from kazoo.exceptions import (
            BadVersionError,
            KazooException,
            NodeExistsError,
            NoNodeError,
            NotEmptyError,
        )

        try:
            return async_result.get(timeout=self.request_timeout_s)
        except (NoNodeError, NodeExistsError, BadVersionError, NotEmptyError):
            raise
        except KazooException as exc:
            raise _Down(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) \
                from exc
        except Exception as exc:  # the handler's timeout
            if type(exc).__name__ == "KazooTimeoutError":
                raise _Down(f"no answer within {self.request_timeout_s:g} s") from exc
            raise

    def _quiet(self, async_result: Any) -> Any:
        """An answer whose refusal does not matter (None then)."""
        try:
            return self._result(async_result)
        except _Down:
            raise
        except Exception:  # noqa: BLE001 - ZooKeeper's refusals
            return None

    def _error(self, what: str, exc: BaseException, key: str | None = None) -> LockBackendError:
        return LockBackendError(f"cannot {what}: {self.no_quorum([f'{self.description}: {exc}'])}",
                                lock_key=key)

    def _forget_later(self, async_create: Any) -> None:
        """A create whose answer we gave up on may still happen: delete what it makes."""
        def done(result: Any) -> None:
            try:
                value = result.get_nowait()
            except Exception:  # noqa: BLE001 - it failed: nothing to remove
                return
            self._orphan(value[0] if isinstance(value, tuple) else value)

        async_create.rawlink(done)

    def _create(self, zk: Any, path: str, data: bytes, *, ephemeral: bool = False,
                sequence: bool = False) -> tuple[str, Any]:
        """Create ``path`` (its missing ancestors too); ``(path, stat)``."""
        from kazoo.exceptions import NoNodeError

        for _ in range(TRIES):
            pending = zk.create_async(path, data, ephemeral=ephemeral, sequence=sequence,
                                      include_data=True)
            try:
                return self._result(pending)
            except NoNodeError:
                self._ensure(zk, path.rsplit("/", 1)[0])
            except _Down:
                if ephemeral:
                    self._forget_later(pending)
                    parent, _, name = path.rpartition("/")
                    self._suspect(unquote(parent.rsplit("/", 1)[1]), name)
                raise
        raise _Down(f"cannot create {path}: its parent keeps disappearing")

    def _ensure(self, zk: Any, path: str) -> None:
        from kazoo.exceptions import NodeExistsError, NoNodeError

        missing = []
        while path:
            try:
                self._result(zk.create_async(path, b""))
                break
            except NodeExistsError:
                break
            except NoNodeError:
                missing.append(path)
                path = path.rsplit("/", 1)[0]
        for p in reversed(missing):
            try:
                self._result(zk.create_async(p, b""))
            except NodeExistsError:
                pass

    def _children(self, zk: Any, parent: str) -> list[_Node]:
        from kazoo.exceptions import NoNodeError

        try:
            return _line(self._result(zk.get_children_async(parent)))
        except NoNodeError:
            return []

    def _find(self, zk: Any, key: str, token: str) -> str | None:
        """The path of the node ``token`` holds ``key`` by, or None."""
        with self._mutex:
            path = self._paths.get((key, token))
        if path is not None:
            return path
        parent = self._parent(key)
        for node in self._children(zk, parent):
            if node.kind == "l" and node.token == token:
                return f"{parent}/{node.name}"
        return None

    def _my_claim(self, zk: Any, base: str, index: int | None,
                  token: str) -> tuple[str, int] | None:
        """(path, version) of slot ``index``'s number when ``token`` holds it, else None."""
        from kazoo.exceptions import NoNodeError

        if index is None:
            return None
        path = f"{self._parent(base)}/{_CLAIM}{index}"
        try:
            data, stat = self._result(zk.get_async(path))
        except NoNodeError:
            return None
        return (path, int(stat.version)) if data == token.encode() else None

    def _remember(self, key: str, token: str, path: str,
                  fields: dict[str, str] | None = None) -> None:
        """Keep the path of a lock this process holds, and its data (renewal rewrites it)."""
        with self._mutex:
            if len(self._paths) > 100_000:
                self._paths.clear()
                self._held.clear()
            self._paths[(key, token)] = path
            if fields is not None:
                self._held[(key, token)] = fields

    def _forget(self, key: str, token: str) -> None:
        with self._mutex:
            self._paths.pop((key, token), None)
            self._held.pop((key, token), None)

    # -- metadata ----------------------------------------------------------------------------

    @staticmethod
    def _fields(token: str, ttl_s: float, metadata: Sequence[tuple[str, Any]],
                fixed: FixedMetadata | None, limit: int | None) -> dict[str, str]:
        fields: dict[str, str] = {}
        if fixed is not None:
            cached = fixed.cache.get(SCHEME)
            if cached is None:
                cached = fixed.cache[SCHEME] = {str(k): str(v) for k, v in fixed.pairs}
            fields.update(cached)
        for k, v in metadata:
            fields[str(k)] = str(v)
        fields.setdefault("ttl", f"{ttl_s:g}")
        fields["token"] = token
        if limit is not None:
            fields["limit"] = str(limit)
        return fields

    @staticmethod
    def _dump(fields: dict[str, str]) -> bytes:
        return json.dumps(fields, separators=(",", ":")).encode("utf-8")

    @staticmethod
    def _load(data: bytes | None) -> dict[str, str]:
        try:
            value = json.loads(data or b"{}")
        except ValueError:
            return {}
        return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}

    @staticmethod
    def _fence(fields: dict[str, str], stat: Any) -> int:
        try:
            return int(fields["fence"])
        except (KeyError, ValueError):
            return int(stat.czxid)

    def _view(self, path: str, data: bytes, stat: Any) -> tuple[LockView, bool]:
        """The node as a :class:`LockView`, and whether it is one of several slots."""
        fields = self._load(data)
        token = fields.pop("token", "")
        if not token:
            parsed = _Node.parse(path.rsplit("/", 1)[1])
            token = parsed.token if parsed is not None else ""
        fence = self._fence(fields, stat)
        fields["fence"] = str(fence)
        kwargs: dict[str, Any] = {}
        if "fence" in getattr(LockView, "__dataclass_fields__", {}):
            kwargs["fence"] = fence
        view = LockView(name=self.description, held=True, token=token, ttl_s=None,
                        fields=fields, **kwargs)
        return view, "limit" in fields

    # -- taking a lock ----------------------------------------------------------------------

    def acquire(self, key: str, token: str, ttl_s: float,
                metadata: Sequence[tuple[str, Any]] = (),
                fixed: FixedMetadata | None = None) -> AcquireResult:
        return self._take(key, token, ttl_s, 1, metadata, fixed, slot=False)

    def acquire_slot(self, key: str, token: str, ttl_s: float, limit: int,
                     metadata: Sequence[tuple[str, Any]] = (),
                     fixed: FixedMetadata | None = None) -> AcquireResult:
        if limit < 1:
            raise LockConfigError(f"lock_limit must be >= 1, got {limit!r}", setting="lock_limit")
        return self._take(key, token, ttl_s, limit, metadata, fixed, slot=True)

    def _take(self, key: str, token: str, ttl_s: float, limit: int,
              metadata: Sequence[tuple[str, Any]], fixed: FixedMetadata | None,
              *, slot: bool) -> AcquireResult:
        started = self.clock()
        ident = (threading.get_ident(), key)
        fields = self._fields(token, ttl_s, metadata, fixed, limit if slot else None)
        with self._mutex:
            ticket = self._tickets.get(ident)
            if ident in self._owners:  # a wait in progress: its ticket names the owner, and
                self._owners[ident] = fields.get("owner", "")
                self._limits[ident] = limit  # it watches the line by the limit
            self._taking.add((key, token))
        try:
            zk = self._client()
            taken = None
            if ticket is not None:
                taken = self._take_with_ticket(zk, key, token, limit, fields, ticket, slot)
            if taken is None:
                taken = self._take_fresh(zk, key, token, limit, fields, slot)
            if taken[0]:
                self._remember(key, token, taken[3], taken[5])
        except _Down as exc:
            return AcquireResult(False, 0, 0.0, started, None, -1, True,
                                 (f"{self.description}: {exc}",), "")
        finally:
            with self._mutex:
                self._taking.discard((key, token))
        acquired, fence, holder, path, index, _ = taken
        if not acquired:
            return AcquireResult(False, 0, 0.0, started, holder, -1, False, (), "")
        validity = max(0.0, ttl_s - (self.clock() - started))
        return AcquireResult(True, fence, validity, started, None, -1, False, (),
                             f"{key}:slot:{index}" if slot else key)

    @staticmethod
    def _free_slot(names: Sequence[str], limit: int) -> int | None:
        used = {n[len(_CLAIM):] for n in names if n.startswith(_CLAIM)}
        return next((i for i in range(limit) if str(i) not in used), None)

    def _holder_of(self, zk: Any, parent: str, line: list[_Node],
                   limit: int) -> tuple[str | None, bool]:
        """The owner id of the first holder in line (or of the waiter at the front), and
        whether it was still there when read."""
        from kazoo.exceptions import NoNodeError

        first = next((n for n in line[:limit] if n.kind == "l"), None) or (
            line[0] if line else None)
        if first is None:
            return "", False
        try:
            data, _ = self._result(zk.get_async(f"{parent}/{first.name}"))
        except NoNodeError:
            return "", False
        return self._load(data).get("owner", ""), True

    def _take_fresh(self, zk: Any, key: str, token: str, limit: int, fields: dict[str, str],
                    slot: bool) -> _Taken:
        """Put a node in line; keep it if it is among the ``limit`` first, else remove it."""
        from kazoo.exceptions import NoNodeError

        parent = self._parent(key)
        prefix = f"{parent}/{_LOCK}{_encode(token)}-"
        data = self._dump(fields)
        with self._mutex:
            busy = self._busy.get(key, -BUSY_S) > self.clock() - BUSY_S
        if not busy:
            # A key not seen held lately is most likely free, its parent removed by its last
            # release: make the parent and the lock in one round trip.
            first = self._take_new_parent(zk, parent, prefix, token, fields, slot)
            if first is not None:
                return first
        for _ in range(TRIES):
            # Look first: a full line refuses at once, without a node of ours in it, so a
            # refused attempt never stands in line ahead of anyone.
            try:
                ahead = _line(self._result(zk.get_children_async(parent)))
            except NoNodeError:
                ahead = None
            if ahead is not None and len(ahead) >= limit:
                mine = [n for n in ahead[:limit] if n.kind == "l" and n.token == token]
                if mine:
                    held = self._held_already(zk, parent, mine[0])
                    if held is None:
                        continue
                    return held
                owner, present = self._holder_of(zk, parent, ahead, limit)
                if not present:
                    continue  # the one at the front left meanwhile: look again
                return False, 0, owner, "", 0, None
            if ahead is None:
                first = self._take_new_parent(zk, parent, prefix, token, fields, slot)
                if first is not None:
                    return first
                continue
            created = zk.create_async(prefix, data, ephemeral=True, sequence=True,
                                      include_data=True)
            listed = zk.get_children_async(parent)
            try:
                path, stat = self._result(created)
            except NoNodeError:
                self._quiet(listed)
                continue  # the parent went since we looked
            except _Down:
                self._forget_later(created)
                self._suspect(key, f"{_LOCK}{_encode(token)}-")
                raise
            try:
                names = self._result(listed)
            except _Down:
                self._orphan(path)
                raise
            except NoNodeError:
                names = []
            line = _line(names)
            name = path.rsplit("/", 1)[1]
            rank = next((i for i, n in enumerate(line) if n.name == name), len(line))
            mine = [n for n in line[:limit] if n.kind == "l" and n.token == token
                    and n.name != name]
            if rank < limit and not mine:
                if not slot:
                    return True, int(stat.czxid), None, path, 0, fields
                index = self._claim(zk, parent, names, limit, token, path, fields)
                if index is not None:
                    return True, int(stat.czxid), None, path, index, {**fields, "slot": str(index)}
            # Not ours (or ours already by an older node): take the new node out of line.
            deleted = zk.delete_async(path)
            self._settle_delete(deleted, path)
            if mine:
                held = self._held_already(zk, parent, mine[0])
                if held is None:
                    continue
                return held
            owner, present = self._holder_of(zk, parent, [n for n in line if n.name != name],
                                             limit)
            if not present and line and rank > 0:
                continue  # the one ahead left meanwhile: look again
            return False, 0, owner, "", 0, None
        raise _Down(f"cannot take {key!r}: the line keeps changing")

    def _take_new_parent(self, zk: Any, parent: str, prefix: str, token: str,
                         fields: dict[str, str],
                         slot: bool) -> _Taken | None:
        """No parent: make it and the first node (and slot 0) in one transaction. The first
        child of a new parent has sequence 0, so its stat is asked in the same round trip.
        None when another made the parent first."""
        from kazoo.exceptions import NodeExistsError, NoNodeError

        first_path = prefix + "0" * 10
        txn = zk.transaction()
        txn.create(parent, b"")
        txn.create(prefix, self._dump({**fields, "slot": "0"} if slot else fields),
                   ephemeral=True, sequence=True)
        if slot:
            txn.create(f"{parent}/{_CLAIM}0", token.encode(), ephemeral=True)
        committed = txn.commit_async()
        first = zk.exists_async(first_path)
        try:
            results = self._result(committed)
        except _Down:
            self._forget_later_txn(committed, first_path)
            key = unquote(parent.rsplit("/", 1)[1])
            self._suspect(key, f"{_LOCK}{_encode(token)}-")
            if slot:
                self._suspect(key, _CLAIM, token)
            raise
        stat = self._quiet(first)
        if not isinstance(results[0], BaseException) and stat is not None:
            return True, int(stat.czxid), None, first_path, 0, (
                {**fields, "slot": "0"} if slot else fields)
        if isinstance(results[0], NoNodeError):
            self._ensure(zk, parent.rsplit("/", 1)[0])
        elif isinstance(results[0], NodeExistsError):
            key = unquote(parent.rsplit("/", 1)[1])
            with self._mutex:
                if len(self._busy) > 10_000:
                    self._busy.clear()
                self._busy[key] = self.clock()
        else:
            raise _Down(f"cannot create {parent}: {results[0]!r}")
        return None

    def _held_already(self, zk: Any, parent: str,
                      node: _Node) -> _Taken | None:
        """An acquire by the token that holds the lock already: its fence and slot."""
        from kazoo.exceptions import NoNodeError

        path = f"{parent}/{node.name}"
        try:
            data, stat = self._result(zk.get_async(path))
        except NoNodeError:
            return None
        fields = self._load(data)
        slot = fields.get("slot", "0")
        return (True, self._fence(fields, stat), None, path, int(slot) if slot.isdigit() else 0,
                None)

    def _claim(self, zk: Any, parent: str, names: Sequence[str], limit: int, token: str,
               path: str, fields: dict[str, str]) -> int | None:
        """Take the first free slot number (an ephemeral ``slot-<i>`` beside the nodes, its
        data the token) and write it into the node at ``path``, in the same round trip."""
        from kazoo.exceptions import NodeExistsError

        taken = set(names)
        for _ in range(limit):
            index = self._free_slot(list(taken), limit)
            if index is None:
                return None
            claim = f"{parent}/{_CLAIM}{index}"
            pending = zk.create_async(claim, token.encode(), ephemeral=True)
            written = zk.set_async(path, self._dump({**fields, "slot": str(index)}))
            try:
                self._result(pending)
            except NodeExistsError:
                taken.add(f"{_CLAIM}{index}")
                continue
            except _Down:
                self._forget_later(pending)
                self._suspect(unquote(parent.rsplit("/", 1)[1]), _CLAIM, token)
                raise
            try:
                self._result(written)
            except Exception:  # noqa: BLE001 - the node went: give the number back
                zk.delete_async(claim)
                return None
            return index
        return None

    def _take_with_ticket(self, zk: Any, key: str, token: str, limit: int,
                          fields: dict[str, str], ticket: _Ticket,
                          slot: bool) -> _Taken | None:
        """A waiter's attempt: its ticket becomes the lock once it is among the first
        ``limit``. None when the ticket is gone (the caller then tries afresh)."""
        parent = self._parent(key)
        for _ in range(TRIES):
            names = self._quiet(zk.get_children_async(parent)) or []
            line = _line(names)
            rank = next((i for i, n in enumerate(line) if n.name == ticket.name), None)
            if rank is None:
                self._drop_ticket(key, ticket)
                return None
            if rank >= limit:
                owner, _ = self._holder_of(zk, parent, line, limit)
                return False, 0, owner, "", 0, None
            index = self._free_slot(names, limit) if slot else 0
            if index is None:
                owner, _ = self._holder_of(zk, parent, line, limit)
                return False, 0, owner, "", 0, None
            fields = {**fields, "fence": str(ticket.czxid)}
            if slot:
                fields["slot"] = str(index)
            path = f"{parent}/{_LOCK}{_encode(token)}-{ticket.seq:010d}"
            txn = zk.transaction()
            txn.delete(ticket.path)
            txn.create(path, self._dump(fields), ephemeral=True)
            if slot:
                txn.create(f"{parent}/{_CLAIM}{index}", token.encode(), ephemeral=True)
            committed = txn.commit_async()
            try:
                results = self._result(committed)
            except _Down:
                self._forget_later_txn(committed, path)
                self._suspect(key, f"{_LOCK}{_encode(token)}-")
                if slot:
                    self._suspect(key, _CLAIM, token)
                raise
            if not any(isinstance(r, BaseException) for r in results):
                self._drop_ticket(key, ticket)
                return True, ticket.czxid, None, path, index, fields
            if slot and type(results[-1]).__name__ == "NodeExistsError":
                continue  # another took that slot number first: choose again
            self._drop_ticket(key, ticket)
            return None
        return None

    def _forget_later_txn(self, committed: Any, path: str) -> None:
        def done(result: Any) -> None:
            try:
                values = result.get_nowait()
            except Exception:  # noqa: BLE001
                return
            if values and not any(isinstance(v, BaseException) for v in values):
                self._orphan(path)

        committed.rawlink(done)

    def _settle_delete(self, pending: Any, path: str) -> None:
        try:
            self._quiet(pending)
        except _Down:
            self._orphan(path)
            raise

    def _suspect(self, key: str, prefix: str, token: str = "") -> None:
        """A create under ``key``'s parent whose outcome is unknown: its node (a name starting
        with ``prefix``; a slot claim whose data is ``token``) is deleted later unless held."""
        with self._mutex:
            self._suspects.add((key, self._parent(key), prefix, token))
        self._owe_maintenance()

    def _sweep(self, zk: Any, key: str, parent: str, prefix: str, token: str) -> None:
        from kazoo.exceptions import NoNodeError

        with self._mutex:
            held = set(self._paths.values())
            tickets = {t.path for t in self._tickets.values()}
            busy = (key, token) in self._taking or (key, token) in self._paths
        for name in self._quiet(zk.get_children_async(parent)) or ():
            path = f"{parent}/{name}"
            if not name.startswith(prefix) or path in held or path in tickets:
                continue
            if name.startswith(_CLAIM):
                got = None if busy else self._quiet(zk.get_async(path))
                if got is None or got[0] != token.encode():
                    continue
            elif name.startswith(_LOCK) and busy:
                continue
            try:
                self._result(zk.delete_async(path))
                logger.info("removed %s, left by a request whose answer was lost", path)
            except NoNodeError:
                pass

    def _orphan(self, path: str) -> None:
        with self._mutex:
            self._orphans.add(path)
        self._owe_maintenance()

    def _owe_maintenance(self) -> None:
        """Have the renewal thread call :meth:`maintain` (about once a second) until done."""
        from ..renewer import get_renewer

        get_renewer().watch_cleanup(self)

    # -- a held lock -------------------------------------------------------------------------

    def release(self, key: str, token: str, *, deadline: float | None = None) -> bool:
        return bool(self._release(key, token, deadline))

    def release_later(self, key: str, token: str, *, deadline: float | None = None,
                      on_lost: Callable[[], None] | None = None) -> None:
        if self._release(key, token, deadline) is False and on_lost is not None:
            on_lost()

    def _release(self, key: str, token: str, deadline: float | None) -> bool | None:
        """True: deleted; False: it was not ours; None: no answer (retried until deadline)."""
        from kazoo.exceptions import NoNodeError

        base, index = _split_slot(key)
        try:
            zk = self._client()
            path = self._find(zk, base, token)
            if path is None:
                self._forget(base, token)
                return False
            claim = self._my_claim(zk, base, index, token)
            self._forget(base, token)
            if claim is not None:
                txn = zk.transaction()
                txn.delete(path)
                txn.delete(claim[0], claim[1])
                deleted = txn.commit_async()
            else:
                deleted = zk.delete_async(path)
            zk.delete_async(self._parent(base))  # the last holder removes the parent
            try:
                answer = self._result(deleted)
            except NoNodeError:
                return False
            if isinstance(answer, list) and any(isinstance(r, BaseException) for r in answer):
                if isinstance(answer[0], NoNodeError):
                    return False
                self._quiet(zk.delete_async(path))  # the claim changed hands: the node alone
            return True
        except _Down as exc:
            logger.info("cannot release %s on %s yet: %s", key, self.description, exc)
            if deadline is not None and deadline > self.clock():
                with self._mutex:
                    self._retries.append((key, token, deadline))
                self._owe_maintenance()
            return None

    def extend_many(self, items: Sequence[Renewal], *,
                    count_renewal: bool = True) -> list[bool | None]:
        """Check (and count) each lock in pipelined requests: a lock of this process is one
        write of its cached data (or an ``exists``), whose answer tells whose session holds
        the node; another session's lock is read first. A node held by another session is
        adopted: re-created under this one, same name, same data, in one transaction."""
        from kazoo.exceptions import BadVersionError, NoNodeError
        from kazoo.protocol.states import KazooState

        if not items:
            return []
        try:
            zk = self._client()
        except _Down:
            return [None] * len(items)
        if zk.state != KazooState.CONNECTED:
            return [None] * len(items)
        verdicts: list[bool | None] = [None] * len(items)
        bases = [_split_slot(it.key)[0] for it in items]
        try:
            paths: list[str | None] = []
            cached: list[dict[str, str] | None] = []
            with self._mutex:
                for base, it in zip(bases, items, strict=True):
                    paths.append(self._paths.get((base, it.token)))
                    known = self._held.get((base, it.token))
                    cached.append(dict(known) if known is not None else None)
            listings = {b: zk.get_children_async(self._parent(b))
                        for b, p in zip(bases, paths, strict=True) if p is None}
            lines = {b: self._quiet(pending) for b, pending in listings.items()}
            for j, (base, it) in enumerate(zip(bases, items, strict=True)):
                if paths[j] is None:
                    node = next((n for n in _line(lines[base] or [])
                                 if n.kind == "l" and n.token == it.token), None)
                    if node is None:
                        verdicts[j] = False
                        continue
                    paths[j] = f"{self._parent(base)}/{node.name}"
            # Phase 1: one request per lock.
            asked: dict[int, tuple[str, Any]] = {}
            for j in range(len(items)):
                if verdicts[j] is not None:
                    continue
                fields = cached[j]
                if fields is None:
                    asked[j] = ("get", zk.get_async(paths[j]))
                elif count_renewal:
                    fields["renewals"] = str(int(fields.get("renewals", "0") or 0) + 1)
                    asked[j] = ("set", zk.set_async(paths[j], self._dump(fields)))
                else:
                    asked[j] = ("exists", zk.exists_async(paths[j]))
            session = zk.client_id[0] if zk.client_id else None
            writes: dict[int, Any] = {}
            for j, (how, pending) in asked.items():
                try:
                    answer = self._result(pending)
                except NoNodeError:
                    verdicts[j] = False
                    continue
                except _Down:
                    continue
                if answer is None:  # exists: no node
                    verdicts[j] = False
                    continue
                if how == "get":
                    data, stat = answer
                    fields = self._load(data)
                    if count_renewal:
                        try:
                            fields["renewals"] = str(int(fields.get("renewals", "0")) + 1)
                        except ValueError:
                            fields["renewals"] = "1"
                else:
                    stat, fields = answer, cached[j]
                    assert fields is not None  # asked by "set" or "exists" only when cached
                moved = stat.ephemeralOwner != session
                if moved:
                    # Adopt: re-create the node under this session, same name, same token.
                    fields.setdefault("fence", str(stat.czxid))
                    cached[j] = fields
                    index = _split_slot(items[j].key)[1]
                    claim = self._my_claim(zk, bases[j], index, items[j].token)
                    txn = zk.transaction()
                    txn.delete(paths[j], version=stat.version)
                    txn.create(paths[j], self._dump(fields), ephemeral=True)
                    if claim is not None:  # its slot number moves with it
                        txn.delete(claim[0], claim[1])
                        txn.create(claim[0], items[j].token.encode(), ephemeral=True)
                    writes[j] = txn.commit_async()
                elif how == "get" and count_renewal:
                    cached[j] = fields
                    writes[j] = zk.set_async(paths[j], self._dump(fields), stat.version)
                else:
                    if how == "get":
                        cached[j] = fields
                    verdicts[j] = True
            # Phase 2: the adoptions and the first counts of locks read.
            for j, pending in writes.items():
                try:
                    answer = self._result(pending)
                except BadVersionError:
                    verdicts[j] = True  # renewed by another process meanwhile: still ours
                    continue
                except NoNodeError:
                    verdicts[j] = False
                    continue
                except _Down:
                    continue
                if isinstance(answer, list) and answer and isinstance(answer[0], BaseException):
                    verdicts[j] = False if isinstance(answer[0], NoNodeError) else True
                else:
                    verdicts[j] = True
            for j, verdict in enumerate(verdicts):
                if verdict is True and paths[j] is not None:
                    self._remember(bases[j], items[j].token, paths[j],  # type: ignore[arg-type]
                                   cached[j])
                elif verdict is False:
                    self._forget(bases[j], items[j].token)
        except _Down:
            pass
        return verdicts

    def handover(self, key: str, token: str, new_token: str, ttl_s: float,
                 metadata: Sequence[tuple[str, Any]] = ()) -> int | None:
        from kazoo.exceptions import NoNodeError

        base, _ = _split_slot(key)
        try:
            zk = self._client()
            for _ in range(TRIES):
                path = self._find(zk, base, token)
                if path is None:
                    return None
                try:
                    data, stat = self._result(zk.get_async(path))
                except NoNodeError:
                    self._forget(base, token)
                    return None
                fields = self._load(data)
                fence = self._fence(fields, stat)
                for k, v in metadata:
                    fields[str(k)] = str(v)
                fields.update(token=new_token, ttl=f"{ttl_s:g}", fence=str(fence), renewals="0")
                new_path = f"{path.rsplit('/', 1)[0]}/{_LOCK}{_encode(new_token)}-{path[-10:]}"
                index = _split_slot(key)[1]
                claim = self._my_claim(zk, base, index, token)
                txn = zk.transaction()
                txn.delete(path, version=stat.version)
                txn.create(new_path, self._dump(fields), ephemeral=True)
                if claim is not None:
                    txn.delete(claim[0], claim[1])
                    txn.create(claim[0], new_token.encode(), ephemeral=True)
                committed = txn.commit_async()
                try:
                    results = self._result(committed)
                except _Down:
                    self._forget_later_txn(committed, new_path)
                    self._suspect(base, f"{_LOCK}{_encode(new_token)}-", new_token)
                    raise
                if not any(isinstance(r, BaseException) for r in results):
                    self._forget(base, token)
                    self._remember(base, new_token, new_path, fields)
                    return fence
                if isinstance(results[0], NoNodeError):
                    self._forget(base, token)
                    return None
            return None
        except _Down as exc:
            raise self._error(f"hand lock {key!r} over", exc, key) from exc

    def _read(self, what: str, key: str | None, read: Callable[[Any], Any]) -> Any:
        """Run a read; after a dropped connection, once more when the client has reconnected.

        A process that held the GIL past its session timeout (a long C call) wakes to a dead
        connection its client has not noticed yet: the first request fails at once, and the
        client reconnects (with a new session) within milliseconds.
        """
        try:
            return read(self._client())
        except _Down as first:
            self._connected.wait(self.request_timeout_s)
            try:
                return read(self._client())
            except _Down as exc:
                raise self._error(what, exc, key) from first

    def owned(self, key: str, token: str) -> bool:
        base, _ = _split_slot(key)

        def read(zk: Any) -> bool:
            path = self._find(zk, base, token)
            if path is None:
                return False
            if self._result(zk.exists_async(path)) is None:
                self._forget(base, token)
                return False
            return True

        return bool(self._read(f"read lock {key!r}", key, read))

    def holder(self, key: str) -> str | None:
        record = self.lock_info(key)
        return None if record is None else record.task_id

    def wait_released(self, key: str, timeout_s: float, tried: Callable[[], bool]) -> bool:
        """Wait in line: a ticket node keeps this waiter's place, and only the node ahead of
        it is watched; ``tried()`` takes the lock once the ticket is at the front."""
        deadline = self.clock() + timeout_s
        ident = (threading.get_ident(), key)
        wake = threading.Event()
        front = False
        with self._mutex:
            self._wakers.add(wake)
            self._owners[ident] = ""
        try:
            while True:
                wake.clear()
                if tried():
                    return True
                remaining = deadline - self.clock()
                if remaining <= 0:
                    return False
                with self._mutex:
                    ticket = self._tickets.get(ident)
                if ticket is None:  # join the line (again, if the session lost the ticket)
                    try:
                        self._make_ticket(key, ident)
                    except _Down as exc:
                        logger.debug("cannot wait in line for %s: %s", key, exc)
                try:
                    # At the front yet not taken (a race, a refusal of tried's own): try at
                    # once the first time, then wait for the line to change.
                    front = self._watch_ahead(key, ident, wake, patient=front)
                except _Down:
                    front = False
                wake.wait(min(remaining, WAKE_S))
        finally:
            with self._mutex:
                self._wakers.discard(wake)
                ticket = self._tickets.pop(ident, None)
                self._owners.pop(ident, None)
                self._limits.pop(ident, None)
            if ticket is not None:
                self._delete_ticket(ticket)

    def _make_ticket(self, key: str, ident: tuple[int, str]) -> None:
        zk = self._client()
        prefix = f"{self._parent(key)}/{_TICKET}{secrets.token_hex(6)}-"
        with self._mutex:
            owner = self._owners.get(ident, "")
        # The waiter's task id, which an attempt refused while it is at the front names.
        data = self._dump({"owner": owner, "waiting": "1"})
        path, stat = self._create(zk, prefix, data, ephemeral=True, sequence=True)
        with self._mutex:
            self._tickets[ident] = _Ticket(path, int(stat.czxid))

    def _drop_ticket(self, key: str, ticket: _Ticket) -> None:
        with self._mutex:
            ident = (threading.get_ident(), key)
            if self._tickets.get(ident) is ticket:
                del self._tickets[ident]

    def _delete_ticket(self, ticket: _Ticket) -> None:
        try:
            zk = self._client()
            self._quiet(zk.delete_async(ticket.path))
            zk.delete_async(ticket.path.rsplit("/", 1)[0])
        except _Down:
            self._orphan(ticket.path)

    def _watch_ahead(self, key: str, ident: tuple[int, str], wake: threading.Event, *,
                     patient: bool) -> bool:
        """Set a watch that fires when this waiter may have reached the front. True when it is
        at the front already: then ``wake`` is set at once, unless ``patient``, in which case
        any change of the line wakes it."""
        from kazoo.exceptions import NoNodeError

        with self._mutex:
            ticket = self._tickets.get(ident)
            limit = self._limits.get(ident, 1)
        if ticket is None:
            wake.set()
            return False
        zk = self._client()
        parent = self._parent(key)

        def fired(_event: Any) -> None:
            wake.set()

        watch_line = limit > 1 or patient
        try:
            names = self._result(zk.get_children_async(parent, watch=fired if watch_line
                                                      else None))
        except NoNodeError:
            wake.set()
            return False
        line = _line(names)
        rank = next((i for i, n in enumerate(line) if n.name == ticket.name), None)
        if rank is None:
            wake.set()
            return False
        if rank < limit:
            if not patient:
                wake.set()
            return True
        if not watch_line:
            ahead = f"{parent}/{line[rank - 1].name}"
            if self._result(zk.exists_async(ahead, watch=fired)) is None:
                wake.set()
        return False

    # -- coalesce ----------------------------------------------------------------------------

    def follow(self, key: str, task_id: str, ttl_s: float) -> str | None:
        from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError

        path = self._follow_path(key)
        try:
            zk = self._client()
            for _ in range(TRIES):
                try:
                    data, stat = self._result(zk.get_async(path))
                except NoNodeError:
                    data, stat = None, None
                claim = json.dumps({"task_id": task_id, "expires_at": time.time() + ttl_s})
                if stat is not None:
                    current = self._load(data)
                    other = current.get("task_id", "")
                    try:
                        expired = float(current.get("expires_at", "0")) < time.time()
                    except ValueError:
                        expired = True
                    if other and other != task_id and not expired:
                        record = self._lock_info(zk, key)
                        if record is None or record.task_id != other:
                            return other
                    try:
                        self._result(zk.set_async(path, claim.encode(), stat.version))
                        return None
                    except (BadVersionError, NoNodeError):
                        continue
                try:
                    self._create(zk, path, claim.encode())
                    return None
                except NodeExistsError:
                    continue
            raise _Down("the follow-up node keeps changing")
        except _Down as exc:
            raise self._error(f"queue a follow-up of {key!r}", exc, key) from exc

    def unfollow(self, key: str, task_id: str) -> None:
        from kazoo.exceptions import BadVersionError, NoNodeError

        path = self._follow_path(key)
        try:
            zk = self._client()
            data, stat = self._result(zk.get_async(path))
            if self._load(data).get("task_id") == task_id:
                self._result(zk.delete_async(path, stat.version))
        except (NoNodeError, BadVersionError):
            pass
        except _Down as exc:
            logger.info("cannot drop follow-up %s of %s: %s", task_id, key, exc)

    # -- beat ----------------------------------------------------------------------------------

    def claim_run(self, lock_key: str, token: str, state_key: str, entry: str,
                  previous: float, now: float) -> int:
        from kazoo.exceptions import NoNodeError

        base, _ = _split_slot(lock_key)
        state = self._state_path(state_key)
        try:
            zk = self._client()
            for _ in range(TRIES):
                leader = self._find(zk, base, token)
                if leader is None:
                    return -1
                try:
                    data, stat = self._result(zk.get_async(state))
                except NoNodeError:
                    data, stat = None, None
                runs = self._load(data)
                last = runs.get(entry)
                if last is not None and float(last) > previous + 0.0005:
                    return 0 if self._result(zk.exists_async(leader)) is not None else -1
                runs[entry] = repr(float(now))
                txn = zk.transaction()
                txn.check(leader, -1)
                if stat is None:
                    txn.create(state, self._dump(runs))
                else:
                    txn.set_data(state, self._dump(runs), stat.version)
                results = self._result(txn.commit_async())
                if not any(isinstance(r, BaseException) for r in results):
                    return 1
                if isinstance(results[0], NoNodeError):
                    self._forget(base, token)
                    return -1
                if isinstance(results[1], NoNodeError) and stat is None:
                    self._ensure(zk, state.rsplit("/", 1)[0])
                # else NodeExists or BadVersion: another writer came first; read again
            raise _Down("beat's state node keeps changing")
        except _Down as exc:
            raise self._error(f"claim beat entry {entry!r}", exc, lock_key) from exc

    def last_runs(self, state_key: str) -> dict[str, float]:
        from kazoo.exceptions import NoNodeError

        def read(zk: Any) -> Any:
            try:
                return self._result(zk.get_async(self._state_path(state_key)))[0]
            except NoNodeError:
                return None

        data = self._read("read beat's last runs", None, read)
        if data is None:
            return {}
        runs: dict[str, float] = {}
        for entry, value in self._load(data).items():
            try:
                runs[entry] = float(value)
            except ValueError:
                continue
        return runs

    # -- seeing and clearing -----------------------------------------------------------------

    def list_locks(self, prefix: str, *, pattern: str | None = None, limit: int | None = None,
                   errors: list[str] | None = None) -> list[LockRecord]:
        """Walk the buckets ``PAGE`` at a time and read their lock parents ``PAGE`` a round
        trip (no reply carries more than one bucket's keys); empty parents met on the way are
        removed."""
        from kazoo.exceptions import NoNodeError

        records: list[LockRecord] = []
        head = prefix + ":"  # the keys "<prefix>:...", as SCAN MATCH "<prefix>:*" reads them
        try:
            zk = self._client()
            try:
                buckets = sorted(self._result(zk.get_children_async(f"{self._root}/locks")))
            except NoNodeError:
                return []
            keys: list[str] = []
            for b in range(0, len(buckets), PAGE):
                # One page of buckets a round trip; their keys read PAGE parents a trip.
                listed = [zk.get_children_async(f"{self._root}/locks/{bk}")
                          for bk in buckets[b:b + PAGE]]
                for pending in listed:
                    for name in self._quiet(pending) or ():
                        key = unquote(name)
                        if (glob_regex(pattern).match(key) if pattern
                                else key.startswith(head)):
                            keys.append(key)
                last = b + PAGE >= len(buckets)
                while len(keys) >= PAGE or (last and keys):
                    page, keys = keys[:PAGE], keys[PAGE:]
                    records.extend(self._read_parents(zk, page))
                    if limit is not None and len(records) >= limit:
                        return records[:limit]
        except _Down as exc:
            if errors is not None:
                errors.append(f"{self.description}: {exc}")
        return records if limit is None else records[:limit]

    def _read_parents(self, zk: Any, keys: Sequence[str]) -> list[LockRecord]:
        listed = [(key, zk.get_children_async(self._parent(key))) for key in keys]
        reads: list[tuple[str, int, str, Any]] = []
        for key, pending in listed:
            names = self._quiet(pending)
            if names is None:
                continue
            if not names:
                zk.delete_async(self._parent(key))  # bounded cleanup of an empty parent
                continue
            for rank, node in enumerate(_line(names)[:64]):
                if node.kind == "l":
                    reads.append((key, rank, node.name,
                                  zk.get_async(f"{self._parent(key)}/{node.name}")))
        records = []
        for key, rank, name, pending in reads:
            got = self._quiet(pending)
            if got is None:
                continue
            record = self._record(key, rank, f"{self._parent(key)}/{name}", *got)
            if record is not None:
                records.append(record)
        return records

    def _record(self, key: str, rank: int, path: str, data: bytes,
                stat: Any) -> LockRecord | None:
        """The record of the node at ``path`` (``rank`` in line) if it holds ``key``: the
        first in line, or a node that has a slot number."""
        view, slotted = self._view(path, data, stat)
        slot = view.fields.get("slot", "")
        if slotted:
            return LockRecord.from_view(f"{key}:slot:{slot}", view) if slot.isdigit() else None
        return LockRecord.from_view(key, view) if rank == 0 else None

    def lock_info(self, key: str) -> LockRecord | None:
        return self._read(
            f"read lock {key!r}", key, lambda zk: self._lock_info(zk, key))

    def _lock_info(self, zk: Any, key: str) -> LockRecord | None:
        from kazoo.exceptions import NoNodeError

        base, index = _split_slot(key)
        parent = self._parent(base)
        pending_claim = (zk.get_async(f"{parent}/{_CLAIM}{index}") if index is not None
                         else None)
        line = self._children(zk, parent)
        if pending_claim is not None:
            try:
                holder = self._result(pending_claim)[0].decode("utf-8", "replace")
            except NoNodeError:
                return None
            rank, node = next(((r, n) for r, n in enumerate(line)
                               if n.kind == "l" and n.token == holder), (0, None))
        else:
            rank, node = (0, line[0]) if line and line[0].kind == "l" else (0, None)
        if node is None:
            return None
        try:
            data, stat = self._result(zk.get_async(f"{parent}/{node.name}"))
        except NoNodeError:
            return None
        record = self._record(base, rank, f"{parent}/{node.name}", data, stat)
        return record if record is not None and record.key == key else None

    def force_release(self, record: LockRecord) -> int:
        from kazoo.exceptions import NoNodeError

        base, index = _split_slot(record.key)
        try:
            zk = self._client()
            token = record.token
            if not token:
                found = self._lock_info(zk, record.key)
                token = found.token if found is not None else ""
            path = self._find(zk, base, token) if token else None
            if path is None:
                return 0
            claim = self._my_claim(zk, base, index, token)
            txn = zk.transaction()
            txn.delete(path)
            if claim is not None:
                txn.delete(claim[0], claim[1])
            results = self._result(txn.commit_async())
            self._forget(base, token)
            zk.delete_async(self._parent(base))
            if isinstance(results[0], NoNodeError):
                return 0
            if any(isinstance(r, BaseException) for r in results):
                try:
                    self._result(zk.delete_async(path))
                except NoNodeError:
                    return 0
            return 1
        except _Down as exc:
            raise self._error(f"release lock {record.key!r}", exc, record.key) from exc

    def ping(self) -> tuple[int, list[str]]:
        from kazoo.exceptions import NoNodeError

        try:
            zk = self._client()
            try:  # a read the ACL checks: a wrong password is refused here
                self._result(zk.get_children_async(f"{self._root}/locks"))
            except NoNodeError:
                pass
            return 1, []
        except _Down as exc:
            return 0, [f"{self.description}: {exc}"]

    # -- housekeeping ------------------------------------------------------------------------

    def needs_maintenance(self) -> bool:
        with self._mutex:
            return bool(self._orphans or self._retries or self._suspects)

    def maintain(self) -> None:
        """Delete nodes a failed request may have left, and retry failed releases."""
        from kazoo.exceptions import NoNodeError

        with self._mutex:
            orphans, self._orphans = self._orphans, set()
            retries, self._retries = self._retries, []
            suspects, self._suspects = self._suspects, set()
        try:
            zk = self._client()
        except _Down:
            with self._mutex:
                self._orphans |= orphans
                self._suspects |= suspects
                self._retries.extend(r for r in retries if r[2] > self.clock())
            return
        for suspect in suspects:
            try:
                self._sweep(zk, *suspect)
            except _Down:
                with self._mutex:
                    self._suspects.add(suspect)
        with self._mutex:
            held = set(self._paths.values())  # a retry with the same token may have kept it
            taking = tuple(f"{self._parent(k)}/{_LOCK}{_encode(t)}-" for k, t in self._taking)
        for path in orphans - held:
            if taking and path.startswith(taking):
                self._orphan(path)  # an acquire with its token runs: look again later
                continue
            try:
                self._result(zk.delete_async(path))
            except NoNodeError:
                pass
            except _Down:
                self._orphan(path)
        for key, token, deadline in retries:
            if deadline > self.clock():
                self._release(key, token, deadline)

    def close(self) -> None:
        """End the session (its locks go with it at once) and close the connection."""
        with self._mutex:
            zk, self._zk = self._zk, None
            mine = self._pid == os.getpid()
            self._paths.clear()
            self._held.clear()
            self._tickets.clear()
            self._connected = threading.Event()
        if zk is not None and mine:
            try:
                zk.stop()
                zk.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                logger.debug("closing %s", self.description, exc_info=True)
