"""The locks in the lock store, read from outside their holders: list, show, release, purge.

What the ``celery locks`` command and the Prometheus collector read. Everything here uses
``SCAN`` with ``TYPE hash`` (never ``KEYS``, which blocks Redis for the whole keyspace), paged
with ``COUNT``:

* one Redis: one scan;
* Redlock: every master is scanned and read; a lock is merged by key, with the number of
  masters that hold it (``masters``) and the fields of the token most masters agree on;
* Redis Cluster: every primary is scanned and read on its own connection.

A lock is a hash (``token``, ``owner``, ``task``, ``hostname``, ``pid``, ``mode``,
``acquired_at``, ``ttl``, ``renewals``) whose ``PTTL`` is the time it has left. Beside it, the
``<key>:fence`` string is a fencing counter, not a lock: ``TYPE hash`` skips it. A lock with
``lock_limit`` has one hash per holder, ``<key>:slot:<i>``: each is listed and counted.

``--task`` filtering is a ``MATCH`` on the task name shown in the key
(``prefix:<shown name>:{digest}``), so a filtered listing only reads the locks of that task
however many others there are; rows are then checked against the exact ``task`` field, since
two task names can show alike.

Releasing is a compare-and-delete (the ``release`` script) with the token read on each master:
a lock taken again by a new holder after it was read is never removed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from redis.exceptions import RedisError

from .errors import LockBackendError
from .keys import format_key
from .store import Call, Store, _text, channel_for, fence_key_for, slot_base
from .urls import redact_url

__all__ = [
    "LockRecord",
    "MasterView",
    "Target",
    "count_by_task",
    "key_pattern",
    "list_locks",
    "purge_locks",
    "read_lock",
    "release_lock",
    "scan_keys",
    "shown_task_name",
    "targets",
    "task_of_key",
]

#: Keys asked for per ``SCAN`` call.
SCAN_COUNT = 1000
#: Keys read per pipelined round trip.
READ_BATCH = 500

_GLOB_SPECIAL = re.compile(r"([\\*?\[\]])")


def _glob_escape(text: str) -> str:
    return _GLOB_SPECIAL.sub(r"\\\1", text)


def shown_task_name(task: str) -> str:
    """The task name as a lock key shows it (taken from :func:`~.keys.format_key` itself)."""
    key = format_key("csl", task, "")
    return key[len("csl:"):key.rindex(":{")]


def key_pattern(prefix: str, task: str | None = None) -> str:
    """The ``SCAN MATCH`` pattern of every lock under ``prefix``, or of one task's locks."""
    if task is None:
        return _glob_escape(prefix) + ":*"
    return f"{_glob_escape(prefix)}:{_glob_escape(shown_task_name(task))}:{{*"


def task_of_key(prefix: str, key: str) -> str:
    """The task name shown in a task lock key, or in one of its slot keys (``lock_limit``);
    ``""`` for a standalone lock (``csl:{name}``)."""
    head = prefix + ":"
    if not key.startswith(head):
        return ""
    rest = slot_base(key[len(head):])
    cut = rest.rfind(":{")
    if cut <= 0 or not rest.endswith("}"):
        return ""
    return rest[:cut]


def _error(exc: BaseException, where: str) -> LockBackendError:
    return LockBackendError(f"cannot read locks from {where}: {redact_url(str(exc))}")


# ------------------------------------------------------------------------------------------------
# Where to read: one client per master, or per primary of a cluster.


@dataclass(frozen=True)
class Target:
    """One Redis server to scan: ``master`` is the index of its Redlock master (0 otherwise)."""

    master: int
    name: str
    client: Any


def _client(store: Store, node: Any) -> Any:
    client = node.client()
    if not hasattr(client, "pipeline"):
        raise LockBackendError(
            f"the lock store {store.description} cannot be read from another process "
            "(an in-memory store lives inside the process that made it)"
        )
    return client


def targets(store: Store) -> list[Target]:
    """A client per Redis server that holds locks of ``store`` (cluster: every primary)."""
    found: list[Target] = []
    for i, node in enumerate(store.nodes):
        client = _client(store, node)
        if hasattr(client, "get_primaries"):  # redis-py's RedisCluster
            try:
                primaries = client.get_primaries()
            except (RedisError, OSError) as exc:
                raise _error(exc, node.name) from None
            for primary in primaries:
                found.append(Target(i, f"{node.name} ({primary.name})",
                                    client.get_redis_connection(primary)))
        else:
            found.append(Target(i, node.name, client))
    return found


def scan_keys(
    target: Target, pattern: str, *, count: int = SCAN_COUNT, limit: int | None = None
) -> Iterator[str]:
    """The keys of lock hashes on ``target`` that match ``pattern`` (``SCAN``, paged)."""
    cursor = 0
    seen = 0
    try:
        while True:
            cursor, keys = target.client.scan(cursor=cursor, match=pattern, count=count,
                                              _type="hash")
            for key in keys:
                yield _text(key)
                seen += 1
                if limit is not None and seen >= limit:
                    return
            if int(cursor) == 0:
                return
    except (RedisError, OSError) as exc:
        raise _error(exc, target.name) from None


# ------------------------------------------------------------------------------------------------
# Records


@dataclass
class MasterView:
    """One master's copy of a lock (``show`` prints these for Redlock)."""

    name: str
    held: bool
    token: str = ""
    ttl_s: float | None = None
    fields: dict[str, str] = field(default_factory=dict)
    error: str = ""


@dataclass
class LockRecord:
    """A lock as the store holds it, merged over the masters."""

    key: str
    task: str
    task_id: str
    hostname: str
    pid: int | None
    mode: str
    acquired_at: float | None
    #: Seconds left while a quorum of masters still holds it (None: no expiry set).
    ttl_s: float | None
    renewals: int
    #: How many masters hold the lock with the same token.
    masters: int
    n_masters: int
    #: The lock's ``ttl`` field: its lifetime without renewal, seconds.
    lock_ttl_s: float | None = None
    #: Per master (index = master): its copy, for ``show`` and compare-and-delete.
    views: list[MasterView | None] = field(default_factory=list)
    fence: int | None = None
    #: The holder's token (the one most masters hold); never printed.
    token: str = field(default="", repr=False)

    @property
    def acquired_iso(self) -> str | None:
        if self.acquired_at is None:
            return None
        return datetime.fromtimestamp(self.acquired_at, timezone.utc).isoformat()

    def as_json(self) -> dict[str, Any]:
        """The ``--json`` form (SPEC 8)."""
        return {
            "key": self.key,
            "task": self.task,
            "task_id": self.task_id,
            "hostname": self.hostname,
            "pid": self.pid,
            "mode": self.mode,
            "acquired_at": self.acquired_iso,
            "ttl": None if self.ttl_s is None else round(self.ttl_s, 3),
            "renewals": self.renewals,
            "masters": self.masters,
        }


def _int(value: str) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _float(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _merge(key: str, views: list[MasterView | None], quorum: int) -> LockRecord | None:
    """One record from the masters' copies: the token most masters hold wins."""
    held = [v for v in views if v is not None and v.held]
    if not held:
        return None
    token, masters = Counter(v.token for v in held).most_common(1)[0]
    mine = [v for v in held if v.token == token]
    f = mine[0].fields
    ttls = sorted((v.ttl_s for v in mine if v.ttl_s is not None), reverse=True)
    # The lock stands while a quorum holds it: the quorum-th longest ttl among its masters.
    ttl = ttls[min(quorum, len(ttls)) - 1] if ttls else None
    return LockRecord(
        key=key,
        task=f.get("task", ""),
        task_id=f.get("owner", ""),
        hostname=redact_url(f.get("hostname", "")),
        pid=_int(f.get("pid", "")),
        mode=f.get("mode", ""),
        acquired_at=_float(f.get("acquired_at", "")),
        ttl_s=ttl,
        renewals=max((_int(v.fields.get("renewals", "")) or 0) for v in mine),
        masters=masters,
        n_masters=len(views),
        lock_ttl_s=_float(f.get("ttl", "")),
        views=views,
        token=token,
    )


def _read_views(target: Target, keys: Sequence[str]) -> list[MasterView]:
    """``HGETALL`` and ``PTTL`` of ``keys`` on one server, pipelined in batches."""
    out: list[MasterView] = []
    for start in range(0, len(keys), READ_BATCH):
        chunk = keys[start:start + READ_BATCH]
        try:
            pipe = target.client.pipeline(transaction=False)
            for key in chunk:
                pipe.hgetall(key)
                pipe.pttl(key)
            replies = pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            raise _error(exc, target.name) from None
        for i, _key in enumerate(chunk):
            raw, pttl = replies[2 * i], replies[2 * i + 1]
            if isinstance(raw, BaseException) or isinstance(pttl, BaseException):
                error = raw if isinstance(raw, BaseException) else pttl
                out.append(MasterView(target.name, False, error=redact_url(str(error))))
                continue
            fields = {_text(k): _text(v) for k, v in (raw or {}).items()}
            token = fields.pop("token", "")
            ttl_ms = int(pttl) if pttl is not None else -2
            out.append(MasterView(
                target.name,
                held=bool(token) and ttl_ms != -2,
                token=token,
                ttl_s=None if ttl_ms < 0 else ttl_ms / 1000.0,
                fields=fields,
            ))
    return out


def list_locks(
    store: Store,
    prefix: str,
    task: str | None = None,
    *,
    count: int = SCAN_COUNT,
    errors: list[str] | None = None,
) -> list[LockRecord]:
    """Every lock under ``prefix`` (or of ``task``), merged over the masters, sorted by key.

    With Redlock, masters that cannot be read are skipped (their messages are appended to
    ``errors``) as long as a quorum can be read; otherwise :class:`LockBackendError`.
    """
    pattern = key_pattern(prefix, task)
    n = store.n_masters
    found: dict[str, list[MasterView | None]] = {}
    failed: dict[int, str] = {}
    for target in targets(store):
        if target.master in failed:
            continue
        try:
            keys = list(scan_keys(target, pattern, count=count))
            views = _read_views(target, keys)
        except LockBackendError as exc:
            if n == 1:
                raise
            failed[target.master] = str(exc)
            continue
        for key, view in zip(keys, views, strict=True):
            found.setdefault(key, [None] * n)[target.master] = view
    if len(failed) > n - store.quorum:
        raise LockBackendError(
            f"cannot read locks from a quorum of masters: {'; '.join(failed.values())}"
        )
    if errors is not None:
        errors.extend(failed.values())
    records = []
    for key in sorted(found):
        record = _merge(key, found[key], store.quorum)
        if record is None:
            continue  # expired or released between SCAN and read
        if task is not None and record.task != task:
            continue  # another task whose name shows alike in keys
        records.append(record)
    return records


def read_lock(store: Store, key: str) -> LockRecord | None:
    """One lock, read on every master (``None`` if no master holds it)."""
    views: list[MasterView | None] = [None] * store.n_masters
    errors = []
    fences: list[int] = []
    for i, node in enumerate(store.nodes):
        # A cluster client routes each key to the primary that serves its slot.
        target = Target(i, node.name, _client(store, node))
        try:
            views[i] = _read_views(target, [key])[0]
            fence = target.client.get(fence_key_for(key))
        except LockBackendError as exc:
            errors.append(str(exc))
            views[i] = MasterView(node.name, False, error=str(exc))
            continue
        except (RedisError, OSError) as exc:
            errors.append(f"{node.name}: {redact_url(str(exc))}")
            continue
        if fence is not None and (value := _int(_text(fence))) is not None:
            fences.append(value)
    record = _merge(key, views, store.quorum)
    if record is None:
        if errors and len(errors) >= store.quorum:
            raise LockBackendError(f"cannot read lock {key}: {'; '.join(errors)}", lock_key=key)
        return None
    record.fence = max(fences) if fences else None
    return record


# ------------------------------------------------------------------------------------------------
# Release


def _release_calls(record: LockRecord, notify: bool) -> dict[int, Call]:
    """The release of the holder's copies only: a master holding another token may be in the
    middle of someone's acquisition, which is not ours to break."""
    channel = channel_for(record.key) if notify else ""
    return {
        i: Call.run("release", (record.key,), (record.token, channel))
        for i, view in enumerate(record.views)
        if view is not None and view.held and record.token and view.token == record.token
    }


def _deleted(reply: Any) -> bool:
    return not isinstance(reply, BaseException) and _int(_text(reply)) == 1


def release_lock(store: Store, record: LockRecord) -> int:
    """Compare-and-delete ``record`` on every master that held it, with the token read there.

    Returns how many masters deleted it (0: it changed since it was read). Waiters are woken
    as by a normal release. Raises :class:`LockBackendError` if no master could be asked.
    """
    calls = _release_calls(record, store.notify)
    replies = store.fanout_each({i: [call] for i, call in calls.items()})
    deleted = sum(1 for reply in replies.values() if _deleted(reply[0]))
    failures = [redact_url(str(r[0])) for r in replies.values() if isinstance(r[0], BaseException)]
    if deleted == 0 and failures:
        raise LockBackendError(f"cannot release {record.key}: {'; '.join(failures)}",
                               lock_key=record.key)
    return deleted


def purge_locks(
    store: Store,
    prefix: str,
    task: str | None = None,
    *,
    count: int = SCAN_COUNT,
    errors: list[str] | None = None,
) -> tuple[int, int]:
    """Compare-and-delete every lock under ``prefix`` (or of ``task``).

    Returns ``(locks seen, locks deleted on at least one master)``.
    """
    records = list_locks(store, prefix, task, count=count, errors=errors)
    deleted = 0
    for start in range(0, len(records), READ_BATCH):
        chunk = records[start:start + READ_BATCH]
        per_node: dict[int, list[Call]] = {}
        owners: dict[int, list[int]] = {}
        for j, record in enumerate(chunk):
            for i, call in _release_calls(record, store.notify).items():
                per_node.setdefault(i, []).append(call)
                owners.setdefault(i, []).append(j)
        replies = store.fanout_each(per_node)
        hit = {j for i, node_replies in replies.items()
               for j, reply in zip(owners[i], node_replies, strict=True) if _deleted(reply)}
        deleted += len(hit)
    return len(records), deleted


# ------------------------------------------------------------------------------------------------
# Counting (Prometheus): key names only, no reads.


def count_by_task(
    store: Store, prefix: str, *, limit: int, count: int = SCAN_COUNT
) -> tuple[dict[str, int], bool]:
    """Locks held per task name (as keys show it), scanning at most ``limit`` keys per server.

    A Redlock lock counts once it stands on a quorum of masters. Returns
    ``(counts, truncated)``; raises :class:`LockBackendError` when a quorum cannot be read.
    """
    pattern = key_pattern(prefix)
    seen: Counter[str] = Counter()
    truncated = False
    failed: set[int] = set()
    for target in targets(store):
        n = 0
        try:
            for key in scan_keys(target, pattern, count=count, limit=limit):
                seen[key] += 1
                n += 1
        except LockBackendError:
            if store.n_masters == 1:
                raise
            failed.add(target.master)
        if n >= limit:
            truncated = True
    if len(failed) > store.n_masters - store.quorum:
        raise LockBackendError("cannot read locks from a quorum of masters")
    counts: Counter[str] = Counter()
    for key, masters in seen.items():
        if masters >= store.quorum:
            counts[task_of_key(prefix, key)] += 1
    return dict(counts), truncated
