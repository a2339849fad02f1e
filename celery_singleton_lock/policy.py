"""Pure decisions about a task's options and its store: no I/O, unit-tested on their own.

:func:`needed_capabilities` says what a task's lock options ask of its lock store, so a task
whose store cannot do it fails at registration with a LockConfigError that names the option,
instead of misbehaving at run time.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from .backends.base import Capability
from .errors import LockConfigError

__all__ = [
    "ENQUEUE_MODES",
    "REQUEUE_BACKOFF_CAP",
    "needed_capabilities",
    "check_capabilities",
    "on_duplicate",
    "on_backend_error",
    "requeue_countdown",
    "requeue_span_s",
]

#: Requeue countdowns grow as base * 2**n up to this many times the base, with +-20 % jitter.
REQUEUE_BACKOFF_CAP = 16

#: Modes whose lock is taken when the task is sent (in the client) and released or handed over
#: by the worker that runs it.
ENQUEUE_MODES = ("until_executing", "until_executed", "until_and_while_executing",
                 "until_expired")


def needed_capabilities(mode: str, on_duplicate: str, limit: int) -> list[tuple[str, str, str]]:
    """(capability, the option that needs it, the option's name) for these options."""
    needs: list[tuple[str, str, str]] = []
    if mode == "until_expired":
        needs.append((Capability.TTL, 'lock_mode="until_expired" (a window that lapses by ttl)',
                      "lock_mode"))
    if mode in ENQUEUE_MODES:
        needs.append((Capability.ADOPTABLE,
                      f'lock_mode="{mode}" (a lock taken by the sender, released by a worker)',
                      "lock_mode"))
    if mode == "until_executed":
        needs.append((Capability.HANDOVER,
                      'lock_mode="until_executed" (the enqueue lock handed to the running task)',
                      "lock_mode"))
    if on_duplicate == "coalesce":
        needs.append((Capability.FOLLOW, 'lock_on_duplicate="coalesce"', "lock_on_duplicate"))
    if limit > 1:
        needs.append((Capability.LIMIT, f"lock_limit={limit}", "lock_limit"))
    return needs


def check_capabilities(capabilities: Iterable[str], description: str, mode: str,
                       on_duplicate: str, limit: int) -> None:
    """Raise LockConfigError naming the option when the store lacks what it needs."""
    have = frozenset(capabilities)
    for capability, what, setting in needed_capabilities(mode, on_duplicate, limit):
        if capability not in have:
            raise LockConfigError(
                f"{what} needs a lock store that can do {capability!r}; the store "
                f"{description} cannot", setting=setting,
            )


def on_duplicate(policy: str, holder: str | None, task_id: str, requeues: int,
                 requeue_max: int) -> str:
    """What a duplicate that could not take the lock becomes: ``"requeue"`` or ``"reject"``.

    ``requeue``, ``wait`` and ``coalesce`` requeue until ``requeue_max`` requeues; a holder
    with the task's own id is an earlier delivery of this very message (a worker killed with
    ``acks_late``), which is never rejected while requeues remain: its lock expires.
    """
    if (policy in ("requeue", "wait", "coalesce") or holder == task_id) \
            and requeues < requeue_max:
        return "requeue"
    return "reject"


def on_backend_error(policy: str, requeues: int, requeue_max: int) -> str:
    """What a task whose store cannot be reached does: ``"run"`` (unlocked), ``"requeue"``
    (until ``requeue_max`` requeues) or ``"fail"``."""
    if policy == "run":
        return "run"
    if policy == "requeue" and requeues < requeue_max:
        return "requeue"
    return "fail"


def requeue_countdown(base_s: float, requeues: int, jitter: float | None = None) -> float:
    """Backoff with jitter: ``base * min(2**n, 16) * uniform(0.8, 1.2)`` seconds (``jitter``
    in [0, 1] picks the point in that range; random by default)."""
    factor = min(2 ** max(0, requeues), REQUEUE_BACKOFF_CAP)
    u = random.random() if jitter is None else jitter
    return base_s * factor * (0.8 + 0.4 * u)


def requeue_span_s(base_s: float, requeue_max: int) -> float:
    """About how long ``requeue_max`` requeues take in all (the jitter averages out)."""
    return sum(base_s * min(2**n, REQUEUE_BACKOFF_CAP) for n in range(requeue_max))
