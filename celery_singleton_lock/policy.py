"""Pure decisions about a task's options and its store: no I/O, unit-tested on their own.

:func:`needed_capabilities` says what a task's lock options ask of its lock store, so a task
whose store cannot do it fails at registration with a LockConfigError that names the option,
instead of misbehaving at run time.
"""

from __future__ import annotations

from collections.abc import Iterable

from .backends.base import Capability
from .errors import LockConfigError

__all__ = ["ENQUEUE_MODES", "needed_capabilities", "check_capabilities"]

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
