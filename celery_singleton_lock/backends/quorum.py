"""Redlock (SPEC 7) as one :class:`~.base.LockBackend` over independent quorum members.

Every operation is *sent* to every member first (:meth:`QuorumMember.submit`) and the results
are *read* afterwards, so N members cost one round trip, concurrently, without a thread per
call: the members work in parallel while this process waits on the first. A hung member costs
one socket timeout, not one per member. The rules themselves (quorum size, validity, how a
round is judged) are the pure functions of :mod:`celery_singleton_lock.redlock`.

One URL is a quorum of one: the same code, with nothing to agree on.
"""

from __future__ import annotations

import logging
import random
import select
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..errors import LockBackendError, LockConfigError
from ..redlock import MasterReply, RoundOutcome, judge_acquire, judge_owned, quorum, validity_s
from ..urls import redact_url
from .base import (
    EXTENDED,
    FENCE_TTL_MS,
    GONE,
    Acquire,
    AcquireResult,
    AcquireSlot,
    Capability,
    ClaimRun,
    Extend,
    FixedMetadata,
    Follow,
    ForceRelease,
    Grant,
    Handover,
    LockBackend,
    LockRecord,
    LockView,
    Op,
    Pending,
    Ping,
    QuorumMember,
    RaiseFence,
    Read,
    ReadRuns,
    Release,
    Renewal,
    Restore,
    Subscription,
)

__all__ = ["Quorum", "QuorumAcquire"]

logger = logging.getLogger("celery_singleton_lock.backends.quorum")

#: Locks read per batch when listing.
READ_BATCH = 500
#: How often a waiter on members without notifications polls, at most, in seconds.
POLL_S = 0.05


def _slot_key(key: str, index: int) -> str:
    return f"{key}:slot:{index}"


def _master_reply(result: Any) -> MasterReply:
    if isinstance(result, BaseException):
        return MasterReply(error=result)
    if result.acquired:
        return MasterReply(acquired=True, fence=result.fence)
    return MasterReply(holder=result.holder, holder_pttl_ms=result.holder_pttl_ms)


def _acquire_result(outcome: RoundOutcome, started: float, errors: tuple[str, ...],
                    key: str = "") -> AcquireResult:
    return AcquireResult(
        acquired=outcome.acquired, fence=outcome.fence, validity_s=outcome.validity_s,
        started=started, holder=outcome.holder or None, holder_pttl_ms=outcome.holder_pttl_ms,
        backend_down=outcome.backend_down, errors=errors, key=key,
    )


class QuorumAcquire:
    """An acquire sent to every member whose results are not read yet (:meth:`finish`)."""

    __slots__ = ("store", "key", "token", "ttl_s", "started", "_pending", "_result")

    def __init__(self, store: Quorum, key: str, token: str, ttl_s: float, started: float,
                 pending: list[Pending]) -> None:
        self.store, self.key, self.token, self.ttl_s = store, key, token, ttl_s
        self.started = started
        self._pending: list[Pending] | None = pending
        self._result: AcquireResult | None = None

    def finish(self) -> AcquireResult:
        """Read every member's result and judge the round (once; later calls return it)."""
        if self._result is None:
            pending, self._pending = self._pending, None
            assert pending is not None
            results = [p.receive()[0] for p in pending]
            self._result = self.store._judge_acquire(self.key, self.token, self.ttl_s,
                                                     self.started, results)
        return self._result


class _PostedRelease:
    """The results of one posted release, judged when every member has answered."""

    __slots__ = ("store", "key", "token", "deadline", "on_lost", "waiting", "released",
                 "not_owned", "failed")

    def __init__(self, store: Quorum, key: str, token: str, deadline: float | None,
                 on_lost: Callable[[], None] | None) -> None:
        self.store, self.key, self.token, self.deadline = store, key, token, deadline
        self.on_lost = on_lost
        self.waiting = len(store.members)
        self.released = self.not_owned = 0
        #: Members whose result was an error (a connection broken by a restart, say).
        self.failed: list[int] = []

    def answer(self, index: int, results: list[Any]) -> None:
        self._count(index, results[0])
        self.waiting -= 1
        if not self.waiting:
            self._judge()

    def _count(self, index: int, result: Any) -> None:
        if isinstance(result, BaseException):
            self.failed.append(index)
        elif result:
            self.released += 1
        else:
            self.not_owned += 1

    def _judge(self) -> None:
        store = self.store
        if self.failed:
            # Once more at once, on fresh connections: a member restarted empty (whose old
            # connection broke) may hold another's lock now, which decides whether ours was lost.
            failed, self.failed = self.failed, []
            results = store._run_on(failed, Release(self.key, self.token, False))
            for i in failed:
                self._count(i, results[i])
            if self.failed:
                store._retry_later(self.key, self.token, self.deadline)
        if self.released < store.quorum and self.not_owned:
            logger.info("lock %s was no longer held when its task released it", self.key)
        if self.on_lost is not None and \
                judge_owned(self.released, self.not_owned, len(store.members)) is False:
            try:
                self.on_lost()
            except Exception:
                logger.exception("lock-lost callback failed for %s", self.key)


class Quorum(LockBackend):
    """N independent members (N=1 for one server or a cluster) and the Redlock rules over them.
    """

    def __init__(
        self,
        members: Sequence[QuorumMember],
        *,
        clock: Callable[[], float] = time.monotonic,
        description: str | None = None,
        notify: bool = True,
        fence_ttl_ms: int = FENCE_TTL_MS,
    ) -> None:
        if not members:
            raise LockConfigError("a lock store needs at least one master",
                                  setting="singleton_lock_url")
        self.members = list(members)
        self.n_masters = len(self.members)
        self.quorum = quorum(self.n_masters)
        self.clock = clock
        self.description = description or ", ".join(m.name for m in self.members)
        #: Publish releases so waiters wake at once (disable only to measure the cost).
        self.notify = notify
        self.fence_ttl_ms = max(1, int(fence_ttl_ms))
        #: Members without notifications are polled this often by waiters, at most.
        self.poll_interval_s = POLL_S if any(Capability.NOTIFY not in m.capabilities
                                             for m in self.members) else 1.0
        kinds = {type(m) for m in self.members}
        #: The members' class when they share one: it sends a batch to all of them at once.
        self._kind = kinds.pop() if len(kinds) == 1 else None
        caps = frozenset.intersection(*(frozenset(m.capabilities) for m in self.members))
        self.capabilities = caps - {Capability.QUORUM_MEMBER}  # type: ignore[misc]
        self._cleanup_lock = threading.Lock()
        #: (key, token, deadline) releases that failed on some member, retried in the
        #: background.
        self._cleanup: list[tuple[str, str, float]] = []

    @classmethod
    def from_urls(cls, urls: Sequence[str], *, socket_timeout: float, fence_ttl_ms: int,
                  setting: str) -> Quorum:
        from .registry import open_backend

        store = open_backend(list(urls), socket_timeout=socket_timeout, setting=setting,
                             fence_ttl_ms=fence_ttl_ms)
        if not isinstance(store, Quorum):
            raise LockConfigError(f"{setting}: {store.description} is not a quorum of servers",
                                  setting=setting)
        return store

    def __repr__(self) -> str:
        return f"Quorum({self.description!r}, masters={self.n_masters})"

    # -- the round trip -------------------------------------------------------------------

    def _submit(self, ops: Sequence[Op]) -> list[Pending]:
        """Send ``ops`` to every member, reading nothing yet."""
        kind = self._kind
        if kind is not None:
            return kind.submit_all(self.members, ops)
        return [m.submit(ops) for m in self.members]

    def _run(self, op: Op) -> list[Any]:
        """``op`` on every member (sent to all, then read): one result per member."""
        if len(self.members) == 1:
            return self.members[0].submit((op,)).receive()
        return [p.receive()[0] for p in self._submit((op,))]

    def _run_on(self, indexes: Iterable[int], op: Op) -> dict[int, Any]:
        ops = (op,)
        pending = [(i, self.members[i].submit(ops)) for i in indexes]
        return {i: p.receive()[0] for i, p in pending}

    def _run_each(self, per_member: dict[int, list[Op]]) -> dict[int, list[Any]]:
        """Each member its own batch, concurrently; one round trip per member."""
        pending = [(i, self.members[i].submit(ops)) for i, ops in per_member.items() if ops]
        return {i: p.receive() for i, p in pending}

    def _errors(self, results: Iterable[tuple[int, Any]]) -> list[str]:
        return [f"{self.members[i].name}: {redact_url(str(r))}"
                for i, r in results if isinstance(r, BaseException)]

    # -- taking a lock ----------------------------------------------------------------------

    def acquire(self, key: str, token: str, ttl_s: float,
                metadata: Sequence[tuple[str, Any]] = (),
                fixed: FixedMetadata | None = None) -> AcquireResult:
        """One Redlock round: take ``key`` on a quorum within the validity, or release it all."""
        return self.begin_acquire(key, token, ttl_s, metadata, fixed).finish()

    def begin_acquire(self, key: str, token: str, ttl_s: float,
                      metadata: Sequence[tuple[str, Any]] = (),
                      fixed: FixedMetadata | None = None) -> QuorumAcquire:
        """Send an acquire to every member; :meth:`QuorumAcquire.finish` reads and judges.
        ``finish()`` must be called: until then each member's connection is taken."""
        op = Acquire(key, token, max(1, int(ttl_s * 1000)), self.fence_ttl_ms,
                     tuple(metadata), fixed)
        started = self.clock()
        return QuorumAcquire(self, key, token, ttl_s, started, self._submit((op,)))

    def _judge_acquire(self, key: str, token: str, ttl_s: float, started: float,
                       results: list[Any]) -> AcquireResult:
        parsed = [_master_reply(r) for r in results]
        outcome = judge_acquire(parsed, ttl_s, self.clock() - started)
        if outcome.acquired and outcome.fences_disagree:
            outcome = self._raise_fences(key, parsed, outcome, ttl_s, started)
        errors: tuple[str, ...] = ()
        if outcome.granted < len(parsed):
            errors = self._member_errors(parsed)
        if not outcome.acquired:
            # Undo partial grants; members that did not answer may have applied it late.
            touched = [i for i, r in enumerate(parsed) if r.acquired or r.error is not None]
            if touched:
                self._release(key, token, touched, started + ttl_s)
        return _acquire_result(outcome, started, errors, key if outcome.acquired else "")

    def acquire_slot(self, key: str, token: str, ttl_s: float, limit: int,
                     metadata: Sequence[tuple[str, Any]] = (),
                     fixed: FixedMetadata | None = None) -> AcquireResult:
        """One Redlock round for one of ``limit`` slots of ``key`` (``lock_limit``).

        Each member takes its first free slot in the same round trip as a plain acquire. The
        lock is the slot that most members granted, if that is a quorum; ``result.key`` names
        it. Grants of other slots (members that saw the holders come and go in another order)
        are released at once.
        """
        op = AcquireSlot(key, token, max(1, int(ttl_s * 1000)), self.fence_ttl_ms, limit,
                         tuple(metadata), fixed)
        slots = [_slot_key(key, i) for i in range(limit)]
        started = self.clock()
        results = self._run(op)
        parsed = [_master_reply(r) for r in results]
        granted = [r.slot if isinstance(r, Grant) and r.acquired else None for r in results]
        chosen = granted[0]
        if chosen is None or any(g != chosen for g in granted):  # not one slot everywhere
            counts = Counter(g for g in granted if g is not None)
            chosen = min(counts, key=lambda g: (-counts[g], g)) if counts else None
            # A member that granted another slot counts as one where the chosen slot is not
            # ours.
            parsed = [p if g == chosen else MasterReply() if g is not None else p
                      for p, g in zip(parsed, granted, strict=True)]
        outcome = judge_acquire(parsed, ttl_s, self.clock() - started)
        if outcome.acquired and outcome.fences_disagree:
            outcome = self._raise_fences(key, parsed, outcome, ttl_s, started)
        errors: tuple[str, ...] = ()
        if not outcome.acquired or outcome.granted < len(parsed):
            undo: dict[str, list[int]] = {}
            for i, g in enumerate(granted):
                if g is not None and (g != chosen or not outcome.acquired):
                    undo.setdefault(slots[g], []).append(i)
                elif g is None and parsed[i].error is not None and not outcome.acquired:
                    for slot in slots:  # no answer: it may have taken any slot, late
                        undo.setdefault(slot, []).append(i)
            for slot, members in undo.items():
                self._release(slot, token, members, started + ttl_s)
            errors = self._member_errors(parsed)
        key_taken = slots[chosen] if outcome.acquired and chosen is not None else ""
        return _acquire_result(outcome, started, errors, key_taken)

    def _member_errors(self, parsed: Sequence[MasterReply]) -> tuple[str, ...]:
        """Why each member that failed did, named and redacted, for a LockBackendError."""
        return tuple(f"{m.name}: {redact_url(str(r.error))}"
                     for m, r in zip(self.members, parsed, strict=True) if r.error is not None)

    def _raise_fences(self, key: str, parsed: list[MasterReply], outcome: RoundOutcome,
                      ttl_s: float, started: float) -> RoundOutcome:
        """Members issued different fence values: raise a majority to the token handed out."""
        granted = [i for i, r in enumerate(parsed) if r.acquired]
        results = self._run_on(granted, RaiseFence(key, outcome.fence, self.fence_ttl_ms))
        raised = sum(1 for r in results.values() if not isinstance(r, BaseException))
        validity = validity_s(ttl_s, self.clock() - started)
        ok = raised >= self.quorum and validity > 0
        return RoundOutcome(
            acquired=ok, validity_s=validity, fence=outcome.fence, fences_disagree=False,
            holder=outcome.holder, holder_pttl_ms=outcome.holder_pttl_ms,
            backend_down=outcome.backend_down or raised < self.quorum,
            granted=outcome.granted,
        )

    # -- releasing ----------------------------------------------------------------------------

    def release(self, key: str, token: str, *, deadline: float | None = None) -> bool:
        """Compare-and-delete on every member; True if a quorum deleted our lock.

        Members that could not be reached are retried in the background (:meth:`maintain`)
        until ``deadline`` (:attr:`clock`), after which the lock has expired there anyway.
        """
        return self._release(key, token, None, deadline) >= self.quorum

    def release_count(self, key: str, token: str, *, deadline: float | None = None) -> int:
        """:meth:`release`, returning how many members deleted our lock."""
        return self._release(key, token, None, deadline)

    def _release(self, key: str, token: str, indexes: Iterable[int] | None,
                 deadline: float | None) -> int:
        op = Release(key, token, self.notify)
        results = self._run(op) if indexes is None else self._run_on(indexes, op).values()
        released = 0
        failed = False
        for r in results:
            if r is True:
                released += 1
            elif r is not False:
                failed = True  # an exception stands for the result
        if failed:
            self._retry_later(key, token, deadline)
        return released

    def _retry_later(self, key: str, token: str, deadline: float | None) -> None:
        """Have the background cleanup retry a release that failed somewhere, until
        ``deadline`` (after which the lock has expired there anyway)."""
        if deadline is not None and deadline > self.clock():
            from ..renewer import get_renewer

            with self._cleanup_lock:
                self._cleanup.append((key, token, deadline))
            get_renewer().watch_cleanup(self)

    def release_later(self, key: str, token: str, *, deadline: float | None = None,
                      on_lost: Callable[[], None] | None = None) -> None:
        """Send the compare-and-delete to every member without waiting for the results.

        The members run it as soon as it arrives; the results are read with the connection's
        next batch, or by the renewal thread within about a second (a task's release costs a
        write, not a round trip). A member that failed is retried in the background until
        ``deadline``, as with :meth:`release`. Members that cannot post release at once.
        ``on_lost()`` runs once the results show that the lock was no longer ours on enough
        members for a quorum (another holder took it meanwhile).
        """
        from ..renewer import get_renewer

        ops = (Release(key, token, self.notify),)
        posted = _PostedRelease(self, key, token, deadline, on_lost)
        for i, member in enumerate(self.members):
            member.post(ops, lambda results, i=i: posted.answer(i, results))
        if posted.waiting:
            get_renewer().watch_settle(self)

    def needs_maintenance(self) -> bool:
        return bool(self._cleanup) or any(m.owes_replies() for m in self.members)

    def maintain(self) -> None:
        """Read the results of posted releases, and retry releases that failed somewhere."""
        for member in self.members:
            member.settle()
        if self._cleanup:
            self.retry_cleanup()

    def retry_cleanup(self) -> int:
        """Retry releases that failed on some member; returns how many are still pending."""
        with self._cleanup_lock:
            pending, self._cleanup = self._cleanup, []
        if not pending:
            return 0
        now = self.clock()
        keep: list[tuple[str, str, float]] = []
        for key, token, deadline in pending:
            if deadline <= now:
                continue
            results = self._run(Release(key, token, False))
            if any(isinstance(r, BaseException) for r in results):
                keep.append((key, token, deadline))
        with self._cleanup_lock:
            self._cleanup.extend(keep)
            return len(self._cleanup)

    # -- renewing -------------------------------------------------------------------------------

    def extend_many(self, items: Sequence[Renewal], *,
                    count_renewal: bool = True) -> list[bool | None]:
        """Compare-and-set-ttl many locks in one round trip per member.

        Returns, per item, True (a quorum extended it), False (lost: a quorum is impossible)
        or None (errors left it undecided). A lock that a quorum extended is put back on the
        members where its key was gone and is free (a member restarted without persistence),
        in a second round trip that only such a renewal pays, so members restarted one at a
        time never leave the holder short of a quorum (SPEC 7).
        """
        if not items:
            return []
        ops = [Extend(it.key, it.token, it.ttl_ms, count_renewal) for it in items]
        per_member = [p.receive() for p in self._submit(ops)]
        verdicts: list[bool | None] = []
        restore: dict[int, list[Op]] = {}
        n = len(self.members)
        for j, item in enumerate(items):
            oks = not_owned = 0
            gone: list[int] = []
            for i, results in enumerate(per_member):
                r = results[j]
                if isinstance(r, BaseException):
                    continue
                if r == EXTENDED:
                    oks += 1
                else:
                    not_owned += 1
                    if r == GONE:
                        gone.append(i)
            verdict = judge_owned(oks, not_owned, n)
            verdicts.append(verdict)
            if verdict is True and gone:
                op = Restore(item.key, item.token, item.ttl_ms, item.fence, self.fence_ttl_ms,
                             item.metadata)
                for i in gone:
                    restore.setdefault(i, []).append(op)
        if restore:
            self._restore(restore)
        return verdicts

    def _restore(self, per_member: dict[int, list[Op]]) -> None:
        """Put locks back on the members that lost them; failures wait for the next renewal."""
        for i, results in self._run_each(per_member).items():
            for op, result in zip(per_member[i], results, strict=True):
                if isinstance(result, BaseException):
                    logger.info("cannot put lock %s back on %s: %s", op.key,
                                self.members[i].name, redact_url(str(result)))
                elif result is True:
                    logger.info("put lock %s back on %s, which had lost it", op.key,
                                self.members[i].name)

    def handover(self, key: str, token: str, new_token: str, ttl_s: float,
                 metadata: Sequence[tuple[str, Any]] = ()) -> int | None:
        """Give a held lock to ``new_token`` atomically on a quorum (never released between).

        Returns the lock's fencing token when a quorum handed it over, else None.
        """
        results = self._run(Handover(key, token, new_token, max(1, int(ttl_s * 1000)),
                                     tuple(metadata)))
        fences = [r for r in results if isinstance(r, int) and not isinstance(r, bool)]
        return max(fences) if len(fences) >= self.quorum else None

    # -- reading one lock ---------------------------------------------------------------------

    def _views(self, key: str) -> list[Any]:
        return self._run(Read(key))

    def owned(self, key: str, token: str) -> bool:
        """True when a quorum of members hold ``key`` with ``token``."""
        oks = sum(1 for v in self._views(key)
                  if isinstance(v, LockView) and v.held and v.token == token)
        return oks >= self.quorum

    def locked(self, key: str) -> bool:
        """True when anyone holds ``key`` on a quorum of members."""
        return sum(1 for v in self._views(key) if isinstance(v, LockView) and v.held) \
            >= self.quorum

    def holder(self, key: str) -> str | None:
        """The owner id of the lock at ``key`` if a quorum holds it ("" for no owner), else
        None. Raises :class:`LockBackendError` when too few members answer."""
        views = [v for v in self._views(key) if not isinstance(v, BaseException)]
        if len(views) < self.quorum:
            raise LockBackendError(f"cannot read lock {key!r}: {self.no_quorum()}", lock_key=key)
        owners = Counter(v.fields.get("owner", "") for v in views if v.held)
        if not owners:
            return None
        owner, count = owners.most_common(1)[0]
        return owner if count >= self.quorum else None

    def ping(self) -> tuple[int, list[str]]:
        """Ask every member to answer once: (how many answered, why the others did not)."""
        errors = self._errors(enumerate(self._run(Ping())))
        return len(self.members) - len(errors), errors

    # -- coalesce -------------------------------------------------------------------------------

    def follow(self, key: str, task_id: str, ttl_s: float) -> str | None:
        """Make ``task_id`` the one follow-up of the held lock ``key`` on a quorum
        (``coalesce``) for ``ttl_s``, or refresh it. Returns None if it is, else the task id of
        the follow-up that already waits. Raises LockBackendError when too few members answer.
        """
        results = self._run(Follow(key, task_id, True, max(1, int(ttl_s * 1000))))
        answered = [r for r in results if not isinstance(r, BaseException)]
        if len(answered) < self.quorum:
            raise LockBackendError(f"cannot queue a follow-up of {key!r}: {self.no_quorum()}",
                                   lock_key=key)
        if sum(1 for ok, _ in answered if ok) >= self.quorum:
            return None
        waiting = Counter(current for ok, current in answered if not ok)
        self.unfollow(key, task_id)
        return waiting.most_common(1)[0][0]

    def unfollow(self, key: str, task_id: str) -> None:
        """``task_id`` is no longer ``key``'s follow-up (it holds the lock now, or lost)."""
        self._run(Follow(key, task_id, False))

    # -- waiting --------------------------------------------------------------------------------

    def wait_released(self, key: str, timeout_s: float, tried: Callable[[], bool]) -> bool:
        """Call ``tried()`` until it returns True, sleeping on release notifications between.

        Subscribes on every member *before* each attempt, so a release between an attempt and
        the wait still wakes it. Members without notifications are polled every
        :data:`POLL_S` at most. Returns False on timeout.
        """
        deadline = self.clock() + timeout_s
        subs: list[Subscription] = []
        polled = False
        try:
            for member in self.members:
                try:
                    sub = member.subscribe(key)
                except (LockBackendError, OSError, Exception):  # noqa: BLE001 - driver errors
                    logger.debug("cannot subscribe on %s", member.name, exc_info=True)
                    sub = None
                if sub is None:
                    polled = True
                else:
                    subs.append(sub)
            while True:
                for s in subs:
                    s.drain()
                if tried():
                    return True
                remaining = deadline - self.clock()
                if remaining <= 0:
                    return False
                # Wake on a release, or at the latest after 1 s to notice an expired lock
                # (expiry publishes nothing).
                # Polls are jittered (half to all of POLL_S), so waiters started together
                # do not keep asking at the same instant.
                wait = min(remaining, POLL_S * random.uniform(0.5, 1.0) if polled else 1.0)
                fds = []
                for s in subs:
                    try:
                        fds.append(s.fileno())
                    except OSError:
                        continue
                if fds:
                    select.select(fds, [], [], wait)
                else:
                    time.sleep(wait)
        finally:
            for s in subs:
                s.close()

    # -- beat -------------------------------------------------------------------------------------

    def claim_run(self, lock_key: str, token: str, state_key: str, entry: str,
                  previous: float, now: float) -> int:
        results = self._run(ClaimRun(lock_key, token, state_key, entry, previous, now))
        votes = [r for r in results if not isinstance(r, BaseException)]
        if sum(1 for v in votes if v == 1) >= self.quorum:
            return 1
        if any(v == -1 for v in votes):
            return -1
        return 0

    def last_runs(self, state_key: str) -> dict[str, float]:
        """The newest run of each entry over every member that answered."""
        newest: dict[str, float] = {}
        for runs in self._run(ReadRuns(state_key)):
            if isinstance(runs, BaseException):
                continue
            for name, ts in runs.items():
                newest[name] = max(ts, newest.get(name, 0.0))
        return newest

    # -- seeing and clearing ------------------------------------------------------------------

    def _merge(self, key: str, views: list[LockView | None]) -> LockRecord | None:
        """One record from the members' copies: the token most members hold wins."""
        held = [v for v in views if v is not None and v.held]
        if not held:
            return None
        token, masters = Counter(v.token for v in held).most_common(1)[0]
        mine = [v for v in held if v.token == token]
        ttls = sorted((v.ttl_s for v in mine if v.ttl_s is not None), reverse=True)
        # The lock stands while a quorum holds it: the quorum-th longest ttl among its members.
        ttl = ttls[min(self.quorum, len(ttls)) - 1] if ttls else None
        record = LockRecord.from_view(key, mine[0], len(views))
        record.hostname = redact_url(record.hostname)
        record.ttl_s = ttl
        record.renewals = max(LockRecord.from_view(key, v).renewals for v in mine)
        record.masters = masters
        record.views = views
        fences = [v.fence for v in views if v is not None and v.fence is not None]
        record.fence = max(fences) if fences else None
        return record

    def _scan(self, prefix: str, pattern: str | None, limit: int | None,
              failed: dict[int, str]) -> dict[int, list[str]]:
        found: dict[int, list[str]] = {}
        for i, member in enumerate(self.members):
            try:
                found[i] = member.scan(prefix, pattern, limit)
            except Exception as exc:  # noqa: BLE001 - a member's driver error
                if self.n_masters == 1:
                    if isinstance(exc, LockBackendError):
                        raise
                    raise LockBackendError(
                        f"cannot read locks from {member.name}: {redact_url(str(exc))}"
                    ) from exc
                failed[i] = str(exc) if isinstance(exc, LockBackendError) else \
                    f"cannot read locks from {member.name}: {redact_url(str(exc))}"
        if len(failed) > self.n_masters - self.quorum:
            raise LockBackendError(
                f"cannot read locks from a quorum of masters: {'; '.join(failed.values())}")
        return found

    def list_locks(self, prefix: str, *, pattern: str | None = None, limit: int | None = None,
                   errors: list[str] | None = None) -> list[LockRecord]:
        """Every lock under ``prefix`` (matching ``pattern``), merged over the members, sorted
        by key. Members that cannot be read are skipped (described in ``errors``) as long as
        a quorum can be read; otherwise LockBackendError."""
        failed: dict[int, str] = {}
        keys_of = self._scan(prefix, pattern, limit, failed)
        n = self.n_masters
        found: dict[str, list[LockView | None]] = {}
        for i, keys in keys_of.items():
            for start in range(0, len(keys), READ_BATCH):
                chunk = keys[start:start + READ_BATCH]
                results = self.members[i].run([Read(k) for k in chunk])
                for key, view in zip(chunk, results, strict=True):
                    if isinstance(view, BaseException):
                        view = LockView(self.members[i].name, False,
                                        error=redact_url(str(view)))
                    found.setdefault(key, [None] * n)[i] = view
        if errors is not None:
            errors.extend(failed.values())
        records = []
        for key in sorted(found):
            record = self._merge(key, found[key])
            if record is not None:  # None: expired or released between scan and read
                records.append(record)
            if limit is not None and len(records) >= limit:
                break
        return records

    def lock_keys(self, prefix: str, *, pattern: str | None = None,
                  limit: int | None = None) -> list[str]:
        """Keys held on a quorum of members (key names only, no reads)."""
        failed: dict[int, str] = {}
        seen: Counter[str] = Counter()
        for keys in self._scan(prefix, pattern, limit, failed).values():
            seen.update(set(keys))
        return sorted(k for k, n in seen.items() if n >= self.quorum)

    def lock_info(self, key: str) -> LockRecord | None:
        """One lock, read on every member (None if no member holds it)."""
        results = self._views(key)
        views: list[LockView | None] = []
        errors = []
        for member, r in zip(self.members, results, strict=True):
            if isinstance(r, BaseException):
                errors.append(f"{member.name}: {redact_url(str(r))}")
                views.append(LockView(member.name, False, error=redact_url(str(r))))
            else:
                views.append(r)
        record = self._merge(key, views)
        if record is None and errors and len(errors) >= self.quorum:
            raise LockBackendError(f"cannot read lock {key}: {'; '.join(errors)}", lock_key=key)
        return record

    def _force_ops(self, record: LockRecord) -> dict[int, Op]:
        """The release of the holder's copies only: a member holding another token may be in
        the middle of someone's acquisition, which is not ours to break."""
        return {
            i: ForceRelease(record.key, record.token)
            for i, view in enumerate(record.views)
            if view is not None and view.held and record.token and view.token == record.token
        }

    def force_release(self, record: LockRecord) -> int:
        """Compare-and-delete ``record`` on every member that held it, with the token read.

        Returns how many members deleted it (0: it changed since it was read). Waiters are
        woken as by a normal release. Raises LockBackendError if no member could be asked.
        """
        ops = self._force_ops(record)
        results = self._run_each({i: [op] for i, op in ops.items()})
        deleted = sum(1 for r in results.values() if r[0] is True)
        failures = [redact_url(str(r[0])) for r in results.values()
                    if isinstance(r[0], BaseException)]
        if deleted == 0 and failures:
            raise LockBackendError(f"cannot release {record.key}: {'; '.join(failures)}",
                                   lock_key=record.key)
        return deleted

    def force_release_many(self, records: Sequence[LockRecord]) -> int:
        deleted = 0
        for start in range(0, len(records), READ_BATCH):
            chunk = records[start:start + READ_BATCH]
            per_member: dict[int, list[Op]] = {}
            owners: dict[int, list[int]] = {}
            for j, record in enumerate(chunk):
                for i, op in self._force_ops(record).items():
                    per_member.setdefault(i, []).append(op)
                    owners.setdefault(i, []).append(j)
            results = self._run_each(per_member)
            hit = {j for i, rs in results.items()
                   for j, r in zip(owners[i], rs, strict=True) if r is True}
            deleted += len(hit)
        return deleted

    def close(self) -> None:
        for member in self.members:
            member.close()
