"""The lock-store interface: what every store offers, and what it declares it can do.

There are two kinds of store class, both picked by URL scheme (:mod:`.registry`):

* a :class:`LockBackend` is a whole store: a database, a ZooKeeper ensemble. LockedTask,
  :class:`~celery_singleton_lock.Redlock`, beat, ``celery locks`` and the metrics call only the
  methods of this class, with plain Python values in and out.
* a :class:`QuorumMember` is one independent server (one Redis, one memcached). It runs small
  typed operations (:class:`Acquire`, :class:`Release`, :class:`Extend`, ...) in batches, one
  round trip a batch, and is always used through :class:`~.quorum.Quorum`, the
  :class:`LockBackend` that runs the Redlock rules (SPEC 7) over one or more members: one URL
  is a quorum of one, a list of URLs a quorum of several. A batch is *sent* to every member
  first (:meth:`QuorumMember.submit`) and the replies are *read* afterwards, so N members cost
  one round trip.

A store declares its :attr:`LockBackend.capabilities`; a task whose options need one that its
store lacks gets :class:`~celery_singleton_lock.errors.LockConfigError` at registration
(:func:`require`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar, NamedTuple, Protocol

from ..errors import LockConfigError

__all__ = [
    "Capability",
    "FixedMetadata",
    "AcquireResult",
    "AcquireInFlight",
    "Renewal",
    "LockView",
    "LockRecord",
    "LockBackend",
    "QuorumMember",
    "Pending",
    "Done",
    "Subscription",
    "Op",
    "Acquire",
    "AcquireSlot",
    "Release",
    "Extend",
    "Restore",
    "RaiseFence",
    "Handover",
    "Read",
    "Follow",
    "ClaimRun",
    "ReadRuns",
    "ForceRelease",
    "Ping",
    "Grant",
    "EXTENDED",
    "NOT_OWNED",
    "GONE",
    "require",
    "FENCE_TTL_MS",
]

#: Default lifetime of a fencing counter after its key's last acquisition
#: (``singleton_lock_fence_ttl``), in ms.
FENCE_TTL_MS = 7 * 24 * 3600 * 1000


class Capability:
    """What a store can do; :attr:`LockBackend.capabilities` holds these names."""

    #: A lock lapses ``ttl`` after its last acquisition or renewal (Redis, databases,
    #: memcached). Required by ``lock_mode="until_expired"``.
    TTL = "ttl"
    #: A lock ends with its holder's session instead (ZooKeeper's ephemeral nodes).
    SESSION = "session"
    #: ``wait_released`` is woken by the store's own release notification, not by polling.
    NOTIFY = "notify"
    #: Renewal and release by any connection that knows the token, so the prefork worker's
    #: main process can adopt its children's locks (SPEC 6).
    ADOPTABLE = "adoptable"
    #: Up to N holders of one key (``lock_limit``).
    LIMIT = "limit"
    #: One follow-up per held key (``lock_on_duplicate="coalesce"``).
    FOLLOW = "follow"
    #: Enqueue locks handed over to the task atomically (``until_executed``, ``until_expired``).
    HANDOVER = "handover"
    #: Beat's leader lock and once-per-due-time claims (``LockedScheduler``).
    BEAT = "beat"
    #: Locks can be listed by key prefix (``celery locks list``, the metrics).
    LIST = "list"
    #: One server that :class:`~.quorum.Quorum` can combine with others (Redlock).
    QUORUM_MEMBER = "quorum_member"


class FixedMetadata:
    """Holder metadata that many acquisitions share (task name, hostname, pid...), given once.

    A store may keep its own encoding of the pairs in :attr:`cache` (the Redis store keeps
    them packed as RESP), so a task's acquire encodes only what changes.
    """

    __slots__ = ("pairs", "cache")

    def __init__(self, pairs: Iterable[tuple[str, Any]]) -> None:
        self.pairs: tuple[tuple[str, Any], ...] = tuple(pairs)
        #: Store-private encodings of :attr:`pairs`, by the store's own key.
        self.cache: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"FixedMetadata({self.pairs!r})"


def all_metadata(metadata: Sequence[tuple[str, Any]],
                 fixed: FixedMetadata | None) -> tuple[tuple[str, Any], ...]:
    """``metadata`` followed by ``fixed``'s pairs."""
    return (*metadata, *fixed.pairs) if fixed is not None else tuple(metadata)


class AcquireResult(NamedTuple):
    """The outcome of an acquire."""

    acquired: bool
    #: The fencing token: grows with every acquisition of the key (0 when not acquired).
    fence: int
    #: Seconds the lock is known valid from ``started`` (the store's monotonic clock).
    validity_s: float
    started: float
    #: The current holder's owner id (task id) when not acquired; None when unknown.
    holder: str | None
    #: The current holder's remaining ttl in ms (-1: unknown or none).
    holder_pttl_ms: int
    #: True when the store could not decide (too few members answered).
    backend_down: bool
    #: Why each member that failed did, password-free.
    errors: tuple[str, ...]
    #: The key the lock was taken under: the lock's own key, or the slot key granted
    #: (``acquire_slot``); "" when not acquired.
    key: str = ""


class AcquireInFlight(Protocol):
    """An acquire sent whose answer is not read yet: :meth:`finish` reads and judges it."""

    def finish(self) -> AcquireResult: ...


class _Finished:
    __slots__ = ("result",)

    def __init__(self, result: AcquireResult) -> None:
        self.result = result

    def finish(self) -> AcquireResult:
        return self.result


class Renewal(NamedTuple):
    """One lock to renew with :meth:`LockBackend.extend_many`, and what to restore it with."""

    key: str
    token: str
    ttl_ms: int
    #: The lock's fencing token (a quorum raises it where it puts a lost copy back).
    fence: int = 0
    #: Holder metadata (field, value), written where a lost copy is put back.
    metadata: tuple[tuple[str, Any], ...] = ()


@dataclass
class LockView:
    """One member's copy of a lock: held or not, its token, ttl and holder metadata."""

    #: The member's printable name (password-free), not the lock's key.
    name: str
    held: bool
    token: str = ""
    ttl_s: float | None = None
    fields: dict[str, str] = field(default_factory=dict)
    error: str = ""
    #: The key's fencing counter on this member (the last fencing token issued), if known.
    fence: int | None = None


@dataclass
class LockRecord:
    """A lock as its store holds it (for a quorum: merged over the members)."""

    key: str
    task: str
    task_id: str
    hostname: str
    pid: int | None
    mode: str
    acquired_at: float | None
    #: Seconds left while the store (a quorum of members) still holds it (None: no expiry).
    ttl_s: float | None
    renewals: int
    #: How many members hold the lock with the same token (1 for a store that is not a quorum).
    masters: int
    n_masters: int
    #: The lock's ``ttl`` field: its lifetime without renewal, seconds.
    lock_ttl_s: float | None = None
    #: Per member (index = member): its copy, for ``show`` and compare-and-delete.
    views: list[LockView | None] = field(default_factory=list)
    fence: int | None = None
    #: The holder's token (the one most members hold); never printed.
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

    @classmethod
    def from_view(cls, key: str, view: LockView, n_masters: int = 1) -> LockRecord:
        """The record of a lock one copy describes (a store that is not a quorum)."""
        f = view.fields

        def num(name: str, kind: Callable[[str], Any]) -> Any:
            try:
                return kind(f[name]) if f.get(name, "") != "" else None
            except ValueError:
                return None

        return cls(
            key=key, task=f.get("task", ""), task_id=f.get("owner", ""),
            hostname=f.get("hostname", ""), pid=num("pid", int), mode=f.get("mode", ""),
            acquired_at=num("acquired_at", float), ttl_s=view.ttl_s,
            renewals=num("renewals", int) or 0, masters=1, n_masters=n_masters,
            lock_ttl_s=num("ttl", float), views=[view],
            fence=view.fence if view.fence is not None else num("fence", int),
            token=view.token,
        )


class Subscription(Protocol):
    """Release notifications of one key; ``fileno()`` becomes readable when one arrives."""

    def fileno(self) -> int: ...
    def drain(self) -> bool: ...  # True if a notification arrived since the last drain
    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------
# The whole-store interface


class LockBackend(abc.ABC):
    """A lock store. Every method takes and returns plain Python values.

    Keys are strings the caller builds (SPEC 3); tokens are random strings that identify one
    holding. Metadata is (field, value) pairs kept with the lock for ``celery locks``: ``owner``
    (the holder's task id), ``task``, ``hostname``, ``pid``, ``mode``, ``acquired_at``, ``ttl``,
    ``fence``, ``renewals``; values are written as text.

    Errors: a store that cannot answer raises
    :class:`~celery_singleton_lock.errors.LockBackendError` from ``acquire`` (or reports
    ``backend_down``), never a driver exception.
    """

    #: What this store can do (:class:`Capability` names).
    capabilities: ClassVar[frozenset[str]] = frozenset()
    #: Printable, password-free description (``redis://:***@host:6379/0``).
    description: str
    #: The monotonic clock validity is measured against (a test may swap it).
    clock: Callable[[], float]
    #: Members in the store (Redlock masters; 1 for any other store).
    n_masters: int = 1
    #: Members that must agree (1 for any other store).
    quorum: int = 1
    #: Lifetime of a fencing counter after the key's last acquisition, ms.
    fence_ttl_ms: int = FENCE_TTL_MS
    #: Longest a waiter sleeps between tries where the store has no release notification
    #: (:attr:`Capability.NOTIFY`), seconds.
    poll_interval_s: float = 1.0

    @classmethod
    @abc.abstractmethod
    def from_urls(cls, urls: Sequence[str], *, socket_timeout: float, fence_ttl_ms: int,
                  setting: str) -> LockBackend:
        """Open the store the URLs name (one URL, unless the store combines several).

        Raise :class:`LockConfigError` naming ``setting`` for a URL this store cannot use.
        """

    # -- taking a lock ----------------------------------------------------------------------

    @abc.abstractmethod
    def acquire(self, key: str, token: str, ttl_s: float,
                metadata: Sequence[tuple[str, Any]] = (),
                fixed: FixedMetadata | None = None) -> AcquireResult:
        """Take ``key`` for ``token`` for ``ttl_s`` if it is free (or already ``token``'s: its
        ttl is refreshed and its fencing token stays the same). Acquired: the fencing token,
        larger than any given before for this key. Not acquired: the holder's owner id and
        remaining ttl."""

    def begin_acquire(self, key: str, token: str, ttl_s: float,
                      metadata: Sequence[tuple[str, Any]] = (),
                      fixed: FixedMetadata | None = None) -> AcquireInFlight:
        """Start an acquire and return before its answer (LockedTask publishes meanwhile).
        The default runs it at once."""
        return _Finished(self.acquire(key, token, ttl_s, metadata, fixed))

    def acquire_slot(self, key: str, token: str, ttl_s: float, limit: int,
                     metadata: Sequence[tuple[str, Any]] = (),
                     fixed: FixedMetadata | None = None) -> AcquireResult:
        """Take one of ``limit`` slots of ``key`` (``lock_limit``); ``result.key`` names the
        slot, which is then renewed and released as a lock of its own (:attr:`Capability.LIMIT`).
        """
        raise LockConfigError(f"the lock store {self.description} cannot hold lock_limit slots",
                              setting="lock_limit")

    # -- a held lock -----------------------------------------------------------------------

    @abc.abstractmethod
    def release(self, key: str, token: str, *, deadline: float | None = None) -> bool:
        """Delete ``key`` if ``token`` holds it (compare-and-delete) and wake its waiters.
        True if it was ours. Members that could not be reached may be retried in the
        background (:meth:`maintain`) until ``deadline`` (:attr:`clock` time)."""

    def release_later(self, key: str, token: str, *, deadline: float | None = None,
                      on_lost: Callable[[], None] | None = None) -> None:
        """Release without waiting for the answer where the store can (a task's release then
        costs a write). ``on_lost()`` runs if the answer shows the lock was no longer ours.
        The default releases at once."""
        if not self.release(key, token, deadline=deadline) and on_lost is not None:
            on_lost()

    @abc.abstractmethod
    def extend_many(self, items: Sequence[Renewal], *,
                    count_renewal: bool = True) -> list[bool | None]:
        """Renew many locks in one batch. Per item: True (renewed), False (lost: gone or held
        by another token) or None (undecided: the store did not answer; retry)."""

    def extend(self, key: str, token: str, ttl_s: float) -> bool | None:
        """Renew one lock (:meth:`extend_many` of one)."""
        return self.extend_many([Renewal(key, token, max(1, int(ttl_s * 1000)))],
                                count_renewal=False)[0]

    def handover(self, key: str, token: str, new_token: str, ttl_s: float,
                 metadata: Sequence[tuple[str, Any]] = ()) -> int | None:
        """Give the lock ``token`` holds to ``new_token`` atomically (never free between), with
        a new ttl and metadata. Returns the lock's fencing token (unchanged: a handover is not
        a new acquisition), or None if ``token`` did not hold it (:attr:`Capability.HANDOVER`).
        """
        raise LockConfigError(f"the lock store {self.description} cannot hand a lock over",
                              setting="lock_mode")

    @abc.abstractmethod
    def owned(self, key: str, token: str) -> bool:
        """True when ``token`` holds ``key``."""

    @abc.abstractmethod
    def holder(self, key: str) -> str | None:
        """The holder's owner id if ``key`` is held ("" for a holder without one), else None.
        Raises LockBackendError when the store does not answer."""

    @abc.abstractmethod
    def wait_released(self, key: str, timeout_s: float, tried: Callable[[], bool]) -> bool:
        """Call ``tried()`` until it returns True, sleeping between tries until ``key`` is
        released (woken by the store's notification where it has one, else by bounded
        polling) or its holder's lock lapses. False after ``timeout_s``."""

    # -- coalesce -----------------------------------------------------------------------------

    def follow(self, key: str, task_id: str, ttl_s: float) -> str | None:
        """Make ``task_id`` the one follow-up of held ``key`` for ``ttl_s`` (or refresh it).
        None if it is; else the task id of the follow-up that already waits
        (:attr:`Capability.FOLLOW`)."""
        raise LockConfigError(f"the lock store {self.description} cannot keep a follow-up",
                              setting="lock_on_duplicate")

    def unfollow(self, key: str, task_id: str) -> None:
        """``task_id`` is no longer ``key``'s follow-up."""

    # -- beat ------------------------------------------------------------------------------

    def claim_run(self, lock_key: str, token: str, state_key: str, entry: str,
                  previous: float, now: float) -> int:
        """For beat's leader (``token`` holds ``lock_key``): record that ``entry`` runs at
        ``now`` unless it already ran after ``previous`` (unix seconds). 1: send it; 0: it was
        already sent; -1: ``token`` no longer leads (:attr:`Capability.BEAT`)."""
        raise LockConfigError(f"the lock store {self.description} cannot keep beat's state",
                              setting="beat_scheduler")

    def last_runs(self, state_key: str) -> dict[str, float]:
        """Every entry's last run (unix seconds) recorded by :meth:`claim_run`."""
        return {}

    # -- seeing and clearing -----------------------------------------------------------------

    @abc.abstractmethod
    def list_locks(self, prefix: str, *, pattern: str | None = None, limit: int | None = None,
                   errors: list[str] | None = None) -> list[LockRecord]:
        """Held locks under the key prefix ``prefix``: keys ``<prefix>:...``, as
        ``singleton_lock_key_prefix`` makes them (``csl`` lists ``csl:...``, never
        ``cslx:...``), matching the glob ``pattern`` when given, read in bounded pages, at
        most ``limit``. Members that could not be read are described in ``errors``."""

    @abc.abstractmethod
    def lock_info(self, key: str) -> LockRecord | None:
        """The lock at ``key``, or None if it is not held."""

    @abc.abstractmethod
    def force_release(self, record: LockRecord) -> int:
        """Delete the lock ``record`` describes, whoever holds it (``celery locks release``),
        and wake its waiters: a compare-and-delete with the token read, so a lock taken again
        since it was read is kept. Returns on how many members it was deleted."""

    def force_release_many(self, records: Sequence[LockRecord]) -> int:
        """:meth:`force_release` of each record; returns how many were deleted somewhere."""
        return sum(1 for record in records if self.force_release(record) > 0)

    def lock_keys(self, prefix: str, *, pattern: str | None = None,
                  limit: int | None = None) -> list[str]:
        """Keys of the held locks under ``prefix`` (for counting; no holder metadata)."""
        return [r.key for r in self.list_locks(prefix, pattern=pattern, limit=limit)]

    @abc.abstractmethod
    def ping(self) -> tuple[int, list[str]]:
        """Ask every member to answer: (how many answered, why the others did not)."""

    def no_quorum(self, errors: Sequence[str] = ()) -> str:
        """Why an operation failed for want of an answer, for a LockBackendError."""
        if self.n_masters == 1:
            why = "the lock store did not answer"
        else:
            why = f"fewer than {self.quorum} of {self.n_masters} masters answered"
        return f"{why} ({'; '.join(errors)})" if errors else why

    # -- housekeeping ------------------------------------------------------------------------

    def needs_maintenance(self) -> bool:
        """True when :meth:`maintain` has work (releases to retry, replies to read)."""
        return False

    def maintain(self) -> None:
        """Background work the store owes; the renewal thread calls it about once a second."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close every connection; a closed store opens them again on its next use."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r})"


def require(store: LockBackend, capability: str, what: str, setting: str) -> None:
    """Raise LockConfigError naming ``setting`` when ``store`` lacks ``capability``."""
    if capability not in store.capabilities:
        raise LockConfigError(
            f"{setting}: {what} needs a lock store that can do {capability!r}; "
            f"{store.description} cannot", setting=setting,
        )


# ------------------------------------------------------------------------------------------
# Quorum members: one server, typed operations in batches


class Acquire(NamedTuple):
    """Take ``key`` if free or ours; the fencing counter grows (it lives ``fence_ttl_ms``
    after; a missing one starts at the server's time in microseconds). Result: :class:`Grant`.
    """

    key: str
    token: str
    ttl_ms: int
    fence_ttl_ms: int
    metadata: tuple[tuple[str, Any], ...] = ()
    fixed: FixedMetadata | None = None


class AcquireSlot(NamedTuple):
    """Take the first free of ``limit`` slots of ``key`` (slot keys ``<key>:slot:<i>``; the
    slots share ``key``'s counter). Result: :class:`Grant` with ``slot``."""

    key: str
    token: str
    ttl_ms: int
    fence_ttl_ms: int
    limit: int
    metadata: tuple[tuple[str, Any], ...] = ()
    fixed: FixedMetadata | None = None


class Release(NamedTuple):
    """Compare-and-delete; ``notify`` wakes waiters. Result: bool (it was ours)."""

    key: str
    token: str
    notify: bool = True


class Extend(NamedTuple):
    """Compare-and-set-ttl; ``count`` adds one to the ``renewals`` field. Result:
    :data:`EXTENDED`, :data:`NOT_OWNED` (another token) or :data:`GONE` (no lock)."""

    key: str
    token: str
    ttl_ms: int
    count: bool = True


class Restore(NamedTuple):
    """Put a lock back where its key is gone (a member restarted empty), only if free there;
    raise the counter to at least ``fence``. Result: bool (put back)."""

    key: str
    token: str
    ttl_ms: int
    fence: int
    fence_ttl_ms: int
    metadata: tuple[tuple[str, Any], ...] = ()


class RaiseFence(NamedTuple):
    """Raise ``key``'s fencing counter to at least ``fence``. Result: True."""

    key: str
    fence: int
    fence_ttl_ms: int


class Handover(NamedTuple):
    """Give the lock ``token`` holds to ``new_token`` with a new ttl and metadata. Result:
    the lock's fencing token, or None if ``token`` did not hold it."""

    key: str
    token: str
    new_token: str
    ttl_ms: int
    metadata: tuple[tuple[str, Any], ...] = ()


class Read(NamedTuple):
    """Read one lock. Result: :class:`LockView` (``held`` False when there is none)."""

    key: str


class Follow(NamedTuple):
    """``take``: make ``task_id`` the follow-up of held ``key`` (ttl ``ttl_ms``) unless another
    task is; ``drop``: stop being it. Result: (True, task_id) or (False, the follow-up's id)."""

    key: str
    task_id: str
    take: bool
    ttl_ms: int = 0


class ClaimRun(NamedTuple):
    """Beat: see :meth:`LockBackend.claim_run`. Result: 1, 0 or -1."""

    lock_key: str
    token: str
    state_key: str
    entry: str
    previous: float
    now: float


class ReadRuns(NamedTuple):
    """Beat: every entry's last run. Result: dict[str, float]."""

    state_key: str


class ForceRelease(NamedTuple):
    """Delete ``key`` whoever holds it, if ``token`` ("" for any) holds it. Result: bool."""

    key: str
    token: str = ""


class Ping(NamedTuple):
    """Result: True."""


Op = (Acquire | AcquireSlot | Release | Extend | Restore | RaiseFence | Handover | Read |
      Follow | ClaimRun | ReadRuns | ForceRelease | Ping)

#: :class:`Extend` results.
EXTENDED, NOT_OWNED, GONE = 1, 0, -1


class Grant(NamedTuple):
    """A member's answer to :class:`Acquire` / :class:`AcquireSlot`."""

    acquired: bool
    #: The fencing token issued (acquired).
    fence: int = 0
    #: The holder's owner id, and its remaining ttl in ms (not acquired).
    holder: str = ""
    holder_pttl_ms: int = -1
    #: The slot taken (:class:`AcquireSlot`), else -1.
    slot: int = -1


class Pending(Protocol):
    """A batch sent to a member; :meth:`receive` reads its results, one per operation, an
    exception standing for each one that failed."""

    def receive(self) -> list[Any]: ...


class Done:
    """A batch already run: ``receive()`` returns its results."""

    __slots__ = ("results",)

    def __init__(self, results: list[Any]) -> None:
        self.results = results

    def receive(self) -> list[Any]:
        return self.results


class QuorumMember(abc.ABC):
    """One server of a :class:`~.quorum.Quorum`: runs typed operations in batches.

    A member never raises from :meth:`submit` or ``receive()`` for a server fault: the result
    of each operation it could not run is the exception that stands for it (a driver error is
    fine), and the quorum decides.
    """

    capabilities: ClassVar[frozenset[str]] = frozenset({Capability.QUORUM_MEMBER})
    #: Printable, password-free name of the server.
    name: str

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str, *, socket_timeout: float, setting: str) -> QuorumMember:
        """Open one server. Raise LockConfigError naming ``setting`` for a URL it cannot use."""

    @classmethod
    def check_urls(cls, urls: Sequence[str], setting: str) -> None:
        """Reject a list of URLs this kind of member cannot form a quorum from."""

    @abc.abstractmethod
    def submit(self, ops: Sequence[Op]) -> Pending:
        """Send ``ops`` now, in one round trip where the server allows; read on ``receive()``."""

    def run(self, ops: Sequence[Op]) -> list[Any]:
        return self.submit(ops).receive()

    @classmethod
    def submit_all(cls, members: Sequence[QuorumMember], ops: Sequence[Op]) -> list[Pending]:
        """:meth:`submit` ``ops`` to each of ``members`` (all of this class), in order: a
        class may prepare the batch once for all of them. Reads nothing."""
        return [m.submit(ops) for m in members]

    def post(self, ops: Sequence[Op], done: Callable[[list[Any]], None]) -> None:
        """Send ``ops`` without waiting; ``done(results)`` runs when they are read (the default:
        at once)."""
        done(self.run(ops))

    def owes_replies(self) -> bool:
        """True when results of posted batches are still to be read (:meth:`settle`)."""
        return False

    def settle(self) -> None:
        """Read the results owed to posted batches."""

    def subscribe(self, key: str) -> Subscription | None:
        """Release notifications of ``key``, or None where the server has none (waiters then
        poll)."""
        return None

    @abc.abstractmethod
    def scan(self, prefix: str, pattern: str | None, limit: int | None) -> list[str]:
        """Lock keys ``<prefix>:...`` (matching the glob ``pattern`` when given, which then
        decides alone), read in bounded pages. Fencing counters, follow-up keys and beat state
        are not lock keys. Raise on failure."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
