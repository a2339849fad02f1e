"""Redlock arithmetic: quorum, clock drift allowance, validity and the outcome of one round.

Pure functions, no I/O, so they are tested without Redis. Times are in seconds (``_s``) on a
monotonic clock; the store measures them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

__all__ = [
    "quorum",
    "drift_s",
    "validity_s",
    "MasterReply",
    "RoundOutcome",
    "judge_acquire",
    "judge_owned",
]

#: Clock drift allowance: 1 % of the ttl plus 2 ms for the process's own timer resolution
#: (the allowance of the Redlock description).
DRIFT_FACTOR = 0.01
DRIFT_CONSTANT_S = 0.002


def quorum(n_masters: int) -> int:
    """How many of ``n_masters`` must agree: a strict majority, N//2 + 1."""
    if n_masters < 1:
        raise ValueError("a lock store needs at least one master")
    return n_masters // 2 + 1


def drift_s(ttl_s: float) -> float:
    """The clock drift allowance subtracted from a lock's validity."""
    return ttl_s * DRIFT_FACTOR + DRIFT_CONSTANT_S


def validity_s(ttl_s: float, elapsed_s: float) -> float:
    """Seconds a freshly acquired lock is known to stay valid: ``ttl - elapsed - drift``."""
    return ttl_s - elapsed_s - drift_s(ttl_s)


class MasterReply(NamedTuple):
    """What one master answered to an acquire: taken, held by another, or an error."""

    acquired: bool = False
    #: The fencing counter value the master issued (when acquired).
    fence: int = 0
    #: The owner id stored by the current holder (when held by another).
    holder: str | None = None
    #: The holder's remaining ttl in ms (when held by another).
    holder_pttl_ms: int = -1
    #: The error, when the master did not answer.
    error: BaseException | None = None


class RoundOutcome(NamedTuple):
    """The verdict on one acquire round over all masters."""

    acquired: bool
    #: Seconds the lock stays valid (<= 0 when not acquired in time).
    validity_s: float
    #: The fencing token: the largest value issued by the masters that granted the lock.
    fence: int
    #: True when the granting masters issued different fence values (the counters need raising).
    fences_disagree: bool
    #: The most reported holder's owner id, if others hold the lock.
    holder: str | None
    #: The longest remaining ttl in ms reported for the holder (-1 when unknown).
    holder_pttl_ms: int
    #: True when too few masters answered at all for a quorum: the store is down, not busy.
    backend_down: bool
    #: How many masters granted the lock.
    granted: int


def judge_acquire(replies: Sequence[MasterReply], ttl_s: float, elapsed_s: float) -> RoundOutcome:
    """Decide an acquire round: quorum of grants and positive validity."""
    n = len(replies)
    first = replies[0] if replies else None
    if first is not None and first.acquired and all(
        r.acquired and r.fence == first.fence for r in replies
    ):  # the common case: every master granted the same fence
        validity = validity_s(ttl_s, elapsed_s)
        return RoundOutcome(validity > 0, validity, first.fence, False, None, -1, False, n)
    need = quorum(n)
    granted = [r for r in replies if r.acquired]
    answered = sum(1 for r in replies if r.error is None)
    validity = validity_s(ttl_s, elapsed_s)
    fences = {r.fence for r in granted}
    holders = Counter(r.holder for r in replies if not r.acquired and r.error is None)
    holder = holders.most_common(1)[0][0] if holders else None
    pttls = [r.holder_pttl_ms for r in replies if r.holder_pttl_ms is not None]
    return RoundOutcome(
        acquired=len(granted) >= need and validity > 0,
        validity_s=validity,
        fence=max(fences) if fences else 0,
        fences_disagree=len(fences) > 1,
        holder=holder,
        holder_pttl_ms=max(pttls) if pttls else -1,
        backend_down=answered < need,
        granted=len(granted),
    )


def judge_owned(oks: int, not_owned: int, n_masters: int) -> bool | None:
    """Decide a renewal or ownership check from per-master answers.

    Returns True when a quorum confirmed ownership, False when enough masters denied it that a
    quorum is impossible (the lock is lost), and None when errors left it undecided.
    """
    need = quorum(n_masters)
    if oks >= need:
        return True
    if not_owned > n_masters - need:
        return False
    return None
