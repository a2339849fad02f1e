"""The locks in the lock store, read from outside their holders: list, show, release, purge.

What the ``celery locks`` command and the Prometheus collector read, through the store's
interface only (:meth:`~.backends.base.LockBackend.list_locks`, ``lock_info``,
``force_release``, ``lock_keys``). Each store reads in bounded pages: Redis with ``SCAN``
(never ``KEYS``), a database with an indexed range query, ZooKeeper by walking the lock parents.
A Redlock lock is merged by key over the masters, with the number of masters that hold it
(``masters``) and the fields of the token most masters agree on.

``--task`` filtering is a match on the task name shown in the key
(``prefix:<shown name>:{digest}``), so a filtered listing only reads the locks of that task
however many others there are; rows are then checked against the exact ``task`` field, since
two task names can show alike.

Releasing is a compare-and-delete with the token read: a lock taken again by a new holder
after it was read is never removed.
"""

from __future__ import annotations

import re
from collections import Counter

from .backends.base import LockBackend, LockRecord, LockView
from .keys import format_key, slot_base

__all__ = [
    "LockRecord",
    "MasterView",
    "count_by_task",
    "key_pattern",
    "list_locks",
    "purge_locks",
    "read_lock",
    "release_lock",
    "shown_task_name",
    "task_of_key",
]

#: The keys a Prometheus scrape reads at most, by default.
SCAN_COUNT = 1000
#: One member's copy of a lock (the name ``celery locks show`` has always used).
MasterView = LockView

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


# ------------------------------------------------------------------------------------------------
# Reading and releasing, through the store's interface


def list_locks(
    store: LockBackend,
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
    records = store.list_locks(prefix, pattern=key_pattern(prefix, task), errors=errors)
    if task is not None:  # another task whose name shows alike in keys
        records = [r for r in records if r.task == task]
    return sorted(records, key=lambda r: r.key)


def read_lock(store: LockBackend, key: str) -> LockRecord | None:
    """One lock, read on every master (``None`` if no master holds it)."""
    return store.lock_info(key)


def release_lock(store: LockBackend, record: LockRecord) -> int:
    """Compare-and-delete ``record`` on every master that held it, with the token read there.

    Returns how many masters deleted it (0: it changed since it was read). Waiters are woken
    as by a normal release. Raises :class:`LockBackendError` if no master could be asked.
    """
    return store.force_release(record)


def purge_locks(
    store: LockBackend,
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
    return len(records), store.force_release_many(records)


def count_by_task(
    store: LockBackend, prefix: str, *, limit: int, count: int = SCAN_COUNT
) -> tuple[dict[str, int], bool]:
    """Locks held per task name (as keys show it), reading at most ``limit`` keys.

    A Redlock lock counts once it stands on a quorum of masters. Returns
    ``(counts, truncated)``; raises :class:`LockBackendError` when a quorum cannot be read.
    """
    keys = store.lock_keys(prefix, pattern=key_pattern(prefix), limit=limit)
    counts: Counter[str] = Counter(task_of_key(prefix, key) for key in keys)
    return dict(counts), len(keys) >= limit
