"""This process's id and a unique token source, kept without a system call per use.

Both are reset in every child forked with ``os.fork`` (billiard's pool included), so a forked
child never reuses its parent's pid or token sequence.
"""

from __future__ import annotations

import itertools
import os

__all__ = ["current_pid", "new_token"]

_pid = os.getpid()
_prefix = os.urandom(8).hex()
_counter = itertools.count(1)


def current_pid() -> int:
    """``os.getpid()``, cached (a system call on every call otherwise)."""
    return _pid


def new_token() -> str:
    """A lock holder token: 32 hex digits, unique among every process and lock.

    16 random hex digits chosen per process, then a per-process counter. Uniqueness is what a
    token needs (it is compared, never trusted as a secret: anyone who can reach Redis can
    delete a key), and this costs no system call per lock, unlike ``secrets.token_hex``.
    """
    return f"{_prefix}{next(_counter):016x}"


def _after_fork_in_child() -> None:
    global _pid, _prefix, _counter
    _pid = os.getpid()
    _prefix = os.urandom(8).hex()
    _counter = itertools.count(1)


os.register_at_fork(after_in_child=_after_fork_in_child)
