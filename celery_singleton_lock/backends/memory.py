"""An in-process lock store that honours TTLs against a swappable clock (``memory://``).

For fast tests of code that takes locks, the project's and its users' own: LockedTask with the
solo or threads pool or eager tasks, :class:`~celery_singleton_lock.Redlock`, beat. A
:class:`MemoryMember` runs each typed operation of :mod:`.base` directly on Python dicts, with
the semantics of the Redis store's scripts (``acquire.lua``, ``release.lua``...), so the
:class:`~.quorum.Quorum` above it, and everything above that, cannot tell the difference.

* ``memory://`` is a private member: its locks live as long as the member object.
* ``memory://NAME``: every member of that name in this process shares one state, so two stores
  opened from the same URL see each other's locks. A list of names is a Redlock quorum of
  independent members (``["memory://a", "memory://b", "memory://c"]``).
* Nothing is shared between processes: a prefork worker's children each have their own.

Time is read from the member's clock (``time.monotonic`` unless given), so a test can move it
with :class:`ManualClock`; :func:`memory_store` builds a quorum of fresh members on one clock.
Setting :attr:`MemoryMember.down` makes a member answer every operation with a
``ConnectionError``, as an unreachable server would.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import LockConfigError
from ..keys import glob_regex, slot_base, slot_key
from .base import (
    EXTENDED,
    GONE,
    NOT_OWNED,
    Acquire,
    AcquireSlot,
    Capability,
    ClaimRun,
    Done,
    Extend,
    FixedMetadata,
    Follow,
    ForceRelease,
    Grant,
    Handover,
    LockView,
    Op,
    Pending,
    Ping,
    QuorumMember,
    RaiseFence,
    Read,
    ReadRuns,
    Release,
    Restore,
)

if TYPE_CHECKING:
    from .quorum import Quorum

__all__ = ["ManualClock", "MemoryMember", "memory_store"]

SCHEME = "memory"


class ManualClock:
    """A clock that moves only when told to: ``clock.advance(seconds)``; ``clock.now`` is the
    time it reads."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __repr__(self) -> str:
        return f"ManualClock({self.now!r})"


# ------------------------------------------------------------------------------------------
# Keys






def _text(value: Any) -> str:
    """A metadata value as the text a store keeps."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _fields(metadata: Sequence[tuple[str, Any]], fixed: FixedMetadata | None) -> dict[str, str]:
    out = {_text(k): _text(v) for k, v in metadata}
    if fixed is not None:
        cached = fixed.cache.get(SCHEME)
        if cached is None:
            cached = fixed.cache[SCHEME] = {_text(k): _text(v) for k, v in fixed.pairs}
        out.update(cached)
    out.pop("token", None)
    return out


# ------------------------------------------------------------------------------------------
# State


@dataclass
class _Held:
    token: str
    fields: dict[str, str]
    expires: float


@dataclass
class _Counter:
    value: int
    expires: float


class _Subscription:
    """Release notifications of one lock: a pipe that holds at most one byte."""

    def __init__(self, state: _State, key: str) -> None:
        self._state, self._key = state, key
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._signalled = False
        self._closed = False

    def notify(self) -> None:  # under the state's lock
        if not self._signalled and not self._closed:
            self._signalled = True
            try:
                os.write(self._w, b"x")
            except OSError:  # full or closed: the waiter is already due to wake
                pass

    def fileno(self) -> int:
        if self._closed:
            raise OSError("the subscription is closed")
        return self._r

    def drain(self) -> bool:
        with self._state.lock:
            if self._closed or not self._signalled:
                return False
            self._signalled = False
            try:
                os.read(self._r, 64)
            except BlockingIOError:
                pass
            return True

    def close(self) -> None:
        with self._state.lock:
            if self._closed:
                return
            self._closed = True
            subs = self._state.subscribers.get(self._key)
            if subs is not None:
                subs.discard(self)
                if not subs:
                    del self._state.subscribers[self._key]
        os.close(self._r)
        os.close(self._w)

    def __repr__(self) -> str:
        return f"<memory subscription {self._key!r}>"


@dataclass(eq=False)
class _State:
    """What members of one name share: the locks, fencing counters, follow-ups, beat state
    and release subscribers, under one lock."""

    clock: Callable[[], float]
    lock: threading.Lock = field(default_factory=threading.Lock)
    locks: dict[str, _Held] = field(default_factory=dict)
    counters: dict[str, _Counter] = field(default_factory=dict)
    #: key -> (the follow-up's task id, expiry)
    follows: dict[str, tuple[str, float]] = field(default_factory=dict)
    #: beat state key -> {entry: last run (unix seconds)}
    runs: dict[str, dict[str, float]] = field(default_factory=dict)
    subscribers: dict[str, set[_Subscription]] = field(default_factory=dict)
    #: Operations since expired entries were last swept out.
    since_sweep: int = 0

    # -- reads with expiry (callers hold the lock) ---------------------------------------------

    def held(self, key: str, now: float) -> _Held | None:
        held = self.locks.get(key)
        if held is not None and held.expires <= now:
            del self.locks[key]
            return None
        return held

    def counter(self, key: str, now: float) -> _Counter | None:
        counter = self.counters.get(key)
        if counter is not None and counter.expires <= now:
            del self.counters[key]
            return None
        return counter

    def follow_up(self, key: str, now: float) -> str | None:
        item = self.follows.get(key)
        if item is None:
            return None
        if item[1] <= now:
            del self.follows[key]
            return None
        return item[0]

    def notify(self, key: str) -> None:
        for sub in self.subscribers.get(slot_base(key), ()):
            sub.notify()

    def sweep(self, now: float) -> None:
        """Drop every expired lock, counter and follow-up (bounds memory over a long run)."""
        self.since_sweep = 0
        for key in [k for k, v in self.locks.items() if v.expires <= now]:
            del self.locks[key]
        for key in [k for k, v in self.counters.items() if v.expires <= now]:
            del self.counters[key]
        for key in [k for k, v in self.follows.items() if v[1] <= now]:
            del self.follows[key]


#: Operations between sweeps of expired entries.
SWEEP_EVERY = 4096

_named: dict[str, _State] = {}
_named_lock = threading.Lock()
#: Every state, so that a forked child gets fresh locks.
_states: weakref.WeakSet[_State] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A lock another thread held at the fork would stay held in the child forever: give the
    child's copies fresh ones (the child's state is its own from here on)."""
    global _named_lock
    _named_lock = threading.Lock()
    for state in list(_states):
        state.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _new_state(clock: Callable[[], float] | None) -> _State:
    state = _State(clock or time.monotonic)
    _states.add(state)
    return state


def _state_for(name: str, clock: Callable[[], float] | None) -> _State:
    if not name:
        return _new_state(clock)
    with _named_lock:
        state = _named.get(name)
        if state is None:
            state = _named[name] = _new_state(clock)
        elif clock is not None and clock is not state.clock:
            raise LockConfigError(
                f"the in-memory lock store memory://{name} already runs on another clock "
                f"({state.clock!r}); give its members one clock, or none",
                setting="singleton_lock_url",
            )
        return state


# ------------------------------------------------------------------------------------------
# The member


class MemoryMember(QuorumMember):
    """One in-process lock server: the typed operations of :mod:`.base` on dicts, one lock.

    ``name`` (``memory://<name>``) shares the state with every member of that name in this
    process; an empty name makes a private member. ``clock`` is the time TTLs are measured
    against (seconds, ``time.monotonic`` unless given; a named state keeps the clock it was
    made with). Renewal and release work from any thread that knows the token, which is what
    :attr:`Capability.ADOPTABLE` asks for, within this process only.
    """

    capabilities: ClassVar[frozenset[str]] = frozenset({
        Capability.QUORUM_MEMBER, Capability.TTL, Capability.NOTIFY, Capability.ADOPTABLE,
        Capability.LIMIT, Capability.FOLLOW, Capability.HANDOVER, Capability.BEAT,
        Capability.LIST,
    })

    def __init__(self, name: str = "", *, clock: Callable[[], float] | None = None) -> None:
        self._state = _state_for(name, clock)
        #: The name the member was made with ("" for a private member).
        self.store_name = name
        self.name = f"memory://{name}" if name else f"memory://#{id(self):x}"
        #: True makes every operation fail as on an unreachable server (for fault tests).
        self.down = False
        self._handlers: dict[type, Callable[[Any, float], Any]] = {
            Acquire: self._acquire, AcquireSlot: self._acquire_slot, Release: self._release,
            Extend: self._extend, Restore: self._restore, RaiseFence: self._raise_fence,
            Handover: self._handover, Read: self._read, Follow: self._follow,
            ClaimRun: self._claim_run, ReadRuns: self._read_runs,
            ForceRelease: self._force_release, Ping: self._ping,
        }

    @property
    def clock(self) -> Callable[[], float]:
        """The clock this member's TTLs are measured against."""
        return self._state.clock

    # -- QuorumMember -------------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, *, socket_timeout: float = 0.2,
                 setting: str = "singleton_lock_url") -> MemoryMember:
        return cls(cls.name_of(url, setting))

    @staticmethod
    def name_of(url: str, setting: str = "singleton_lock_url") -> str:
        """The store name in ``memory://<name>`` ("" for ``memory://``)."""
        scheme, sep, rest = str(url).strip().partition("://")
        if not sep or scheme.lower() != SCHEME:
            raise LockConfigError(f"{setting}: {url!r} is not a memory:// URL", setting=setting)
        name = rest.rstrip("/")
        if any(c in name for c in "?#,") or any(c.isspace() for c in name):
            raise LockConfigError(
                f"{setting}: {url!r}: a memory:// URL names a store with one word, "
                "as in memory://tests", setting=setting)
        return name

    def submit(self, ops: Sequence[Op]) -> Pending:
        if self.down:
            exc = ConnectionError(f"{self.name} is down")
            return Done([exc] * len(ops))
        handlers = self._handlers
        state = self._state
        with state.lock:
            now = state.clock()
            results = []
            for op in ops:
                handler = handlers.get(type(op))
                if handler is None:
                    raise TypeError(f"{self.name}: not a lock-store operation: {op!r}")
                results.append(handler(op, now))
            state.since_sweep += len(ops)
            if state.since_sweep >= SWEEP_EVERY:
                state.sweep(now)
        return Done(results)

    def subscribe(self, key: str) -> _Subscription:
        if self.down:
            raise ConnectionError(f"{self.name} is down")
        base = slot_base(key)
        sub = _Subscription(self._state, base)
        with self._state.lock:
            self._state.subscribers.setdefault(base, set()).add(sub)
        return sub

    def scan(self, prefix: str, pattern: str | None, limit: int | None) -> list[str]:
        """Held lock keys under the key prefix ``prefix`` (``csl`` lists ``csl:...``, as the
        Redis store's ``SCAN MATCH csl:*`` does; "" lists every lock), matching the glob
        ``pattern`` when given, sorted, at most ``limit``."""
        if self.down:
            raise ConnectionError(f"{self.name} is down")
        head = f"{prefix}:" if prefix else ""
        match = glob_regex(pattern).match if pattern else None
        state = self._state
        with state.lock:
            state.sweep(state.clock())
            keys = sorted(k for k in state.locks
                          if k.startswith(head) and (match is None or match(k)))
        return keys if limit is None else keys[:max(0, limit)]

    def close(self) -> None:
        """Nothing to close: the state lives on (a named one for the process), so a closed
        member keeps working."""

    def clear(self) -> None:
        """Forget every lock, counter, follow-up and beat state (of every member of this
        name); waiters are left subscribed."""
        state = self._state
        with state.lock:
            state.locks.clear()
            state.counters.clear()
            state.follows.clear()
            state.runs.clear()

    # -- the operations (under the state's lock, at time ``now``) -----------------------------

    def _take_fence(self, key: str, fence_ttl_ms: int, now: float) -> int:
        """One more acquisition of ``key``: its counter grows (or starts at the clock's time
        in microseconds, and at 1 at least: 0 stands for no fence) and lives
        ``fence_ttl_ms`` more."""
        base = slot_base(key)
        expires = now + int(fence_ttl_ms) / 1000.0
        counter = self._state.counter(base, now)
        if counter is None:
            counter = self._state.counters[base] = _Counter(max(1, int(now * 1_000_000)),
                                                            expires)
        else:
            counter.value += 1
            counter.expires = expires
        return counter.value

    def _fence_of(self, key: str, now: float) -> int:
        counter = self._state.counter(slot_base(key), now)
        return counter.value if counter is not None else 0

    @staticmethod
    def _pttl_ms(held: _Held, now: float) -> int:
        return max(0, int((held.expires - now) * 1000))

    def _acquire(self, op: Acquire, now: float) -> Grant:
        state = self._state
        held = state.held(op.key, now)
        if held is not None:
            if held.token != op.token:
                return Grant(False, holder=held.fields.get("owner", ""),
                             holder_pttl_ms=self._pttl_ms(held, now))
            held.expires = now + int(op.ttl_ms) / 1000.0
            return Grant(True, self._fence_of(op.key, now))
        fence = self._take_fence(op.key, op.fence_ttl_ms, now)
        state.locks[op.key] = _Held(op.token, _fields(op.metadata, op.fixed),
                                    now + int(op.ttl_ms) / 1000.0)
        return Grant(True, fence)

    def _acquire_slot(self, op: AcquireSlot, now: float) -> Grant:
        state = self._state
        free: int | None = None
        owner, least = "", -1
        for i in range(max(1, int(op.limit))):
            held = state.held(slot_key(op.key, i), now)
            if held is None:
                if free is None:
                    free = i
                continue
            if held.token == op.token:
                held.expires = now + int(op.ttl_ms) / 1000.0
                return Grant(True, self._fence_of(op.key, now), slot=i)
            pttl = self._pttl_ms(held, now)
            if least < 0 or pttl < least:
                owner, least = held.fields.get("owner", ""), pttl
        if free is None:
            return Grant(False, holder=owner, holder_pttl_ms=least)
        fence = self._take_fence(op.key, op.fence_ttl_ms, now)
        state.locks[slot_key(op.key, free)] = _Held(
            op.token, _fields(op.metadata, op.fixed), now + int(op.ttl_ms) / 1000.0)
        return Grant(True, fence, slot=free)

    def _release(self, op: Release, now: float) -> bool:
        state = self._state
        held = state.held(op.key, now)
        if held is None or held.token != op.token:
            return False
        del state.locks[op.key]
        if op.notify:
            state.notify(op.key)
        return True

    def _force_release(self, op: ForceRelease, now: float) -> bool:
        state = self._state
        held = state.held(op.key, now)
        if held is None or (op.token and held.token != op.token):
            return False
        del state.locks[op.key]
        state.notify(op.key)
        return True

    def _extend(self, op: Extend, now: float) -> int:
        held = self._state.held(op.key, now)
        if held is None:
            return GONE
        if held.token != op.token:
            return NOT_OWNED
        held.expires = now + int(op.ttl_ms) / 1000.0
        if op.count:
            try:
                renewals = int(held.fields.get("renewals", "0") or 0)
            except ValueError:
                renewals = 0
            held.fields["renewals"] = str(renewals + 1)
        return EXTENDED

    def _raise_to(self, key: str, fence: int, fence_ttl_ms: int, now: float) -> None:
        base = slot_base(key)
        counter = self._state.counter(base, now)
        if counter is None or counter.value < int(fence):
            self._state.counters[base] = _Counter(int(fence), now + int(fence_ttl_ms) / 1000.0)

    def _restore(self, op: Restore, now: float) -> bool:
        state = self._state
        if state.held(op.key, now) is not None:
            return False
        state.locks[op.key] = _Held(op.token, _fields(op.metadata, None),
                                    now + int(op.ttl_ms) / 1000.0)
        self._raise_to(op.key, op.fence, op.fence_ttl_ms, now)
        return True

    def _raise_fence(self, op: RaiseFence, now: float) -> bool:
        self._raise_to(op.key, op.fence, op.fence_ttl_ms, now)
        return True

    def _handover(self, op: Handover, now: float) -> int | None:
        held = self._state.held(op.key, now)
        if held is None or held.token != op.token:
            return None
        held.token = op.new_token
        held.fields.update(_fields(op.metadata, None))
        held.expires = now + int(op.ttl_ms) / 1000.0
        return self._fence_of(op.key, now)

    def _read(self, op: Read, now: float) -> LockView:
        held = self._state.held(op.key, now)
        counter = self._state.counter(slot_base(op.key), now)
        fence = counter.value if counter is not None else None
        if held is None:
            return LockView(self.name, False, fence=fence)
        return LockView(self.name, True, held.token, max(0.0, held.expires - now),
                        dict(held.fields), fence=fence)

    def _follow(self, op: Follow, now: float) -> tuple[bool, str]:
        state = self._state
        current = state.follow_up(op.key, now)
        if not op.take:
            if current == op.task_id:
                del state.follows[op.key]
                return True, op.task_id
            return False, current or ""
        if current is not None and current != op.task_id:
            held = state.held(op.key, now)
            if held is None or current != held.fields.get("owner"):
                return False, current
        state.follows[op.key] = (op.task_id, now + int(op.ttl_ms) / 1000.0)
        return True, op.task_id

    def _claim_run(self, op: ClaimRun, now: float) -> int:
        state = self._state
        leader = state.held(op.lock_key, now)
        if leader is None or leader.token != op.token:
            return -1
        runs = state.runs.setdefault(op.state_key, {})
        last = runs.get(op.entry)
        if last is not None and last > float(op.previous) + 0.0005:
            return 0
        runs[op.entry] = float(op.now)
        return 1

    def _read_runs(self, op: ReadRuns, now: float) -> dict[str, float]:
        return dict(self._state.runs.get(op.state_key, {}))

    def _ping(self, op: Ping, now: float) -> bool:
        return True


def memory_store(url: str = "memory://", *, masters: int = 1,
                 clock: Callable[[], float] | None = None) -> Quorum:
    """A lock store of ``masters`` in-memory members on one clock, for tests.

    ``memory://`` gives fresh private members; ``memory://NAME`` members shared with every
    other store of that name in this process (``NAME``, or ``NAME/0``, ``NAME/1``... for
    several). ``clock`` defaults to ``time.monotonic``; pass a :class:`ManualClock` to move
    time by hand.
    """
    from .quorum import Quorum

    if masters < 1:
        raise LockConfigError("memory_store: masters must be at least 1", setting="masters")
    name = MemoryMember.name_of(url)
    if name and masters > 1:
        members = [MemoryMember(f"{name}/{i}", clock=clock) for i in range(masters)]
    else:
        members = [MemoryMember(name, clock=clock) for _ in range(masters)]
    tick = members[0].clock
    return Quorum(members, description=url, clock=tick)
