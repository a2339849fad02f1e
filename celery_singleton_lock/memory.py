"""An in-process lock store that honours TTLs against a swappable clock.

For fast unit tests of pure logic and for users' own tests (``singleton_lock_url="memory://"``
with the solo or threads pool, or eager tasks). It runs the same named scripts as Redis, in
Python, so :class:`~celery_singleton_lock.store.Store` and everything above it cannot tell the
difference. It is not shared between processes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .store import Call, Store, _Done

__all__ = ["MemoryNode", "memory_store", "ManualClock"]


class ManualClock:
    """A clock that moves only when told to: ``clock.advance(seconds)``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _PipeSubscription:
    def __init__(self, node: MemoryNode, channel: str) -> None:
        self.node, self.channel = node, channel
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        with node.mutex:
            node.subscribers.setdefault(channel, []).append(self)

    def notify(self) -> None:
        try:
            os.write(self.w, b"x")
        except OSError:  # pipe full: the waiter is already due to wake
            pass

    def fileno(self) -> int:
        return self.r

    def drain(self) -> bool:
        try:
            return bool(os.read(self.r, 4096))
        except BlockingIOError:
            return False

    def close(self) -> None:
        with self.node.mutex:
            subs = self.node.subscribers.get(self.channel, [])
            if self in subs:
                subs.remove(self)
        os.close(self.r)
        os.close(self.w)


class MemoryNode:
    """One in-memory master. ``down = True`` makes it fail like an unreachable Redis."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, name: str = "memory") -> None:
        self.clock = clock
        self.name = name
        self.mutex = threading.RLock()
        #: key -> (value: dict for hashes, str for counters, expires_at or None)
        self.data: dict[str, tuple[Any, float | None]] = {}
        self.subscribers: dict[str, list[_PipeSubscription]] = {}
        self.down = False

    # -- storage with expiry --------------------------------------------------------------

    def _get(self, key: str) -> Any:
        item = self.data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= self.clock():
            del self.data[key]
            return None
        return value

    def _set(self, key: str, value: Any, ttl_ms: int | None) -> None:
        expires = None if ttl_ms is None else self.clock() + int(ttl_ms) / 1000.0
        self.data[key] = (value, expires)

    def _pexpire(self, key: str, ttl_ms: Any) -> None:
        value = self._get(key)
        if value is not None:
            self._set(key, value, int(ttl_ms))

    def pttl_ms(self, key: str) -> int:
        with self.mutex:
            if self._get(key) is None:
                return -2
            expires = self.data[key][1]
            return -1 if expires is None else int((expires - self.clock()) * 1000)

    def keys(self) -> list[str]:
        with self.mutex:
            return [k for k in list(self.data) if self._get(k) is not None]

    def hgetall(self, key: str) -> dict[str, str]:
        with self.mutex:
            value = self._get(key)
            return dict(value) if isinstance(value, dict) else {}

    # -- the scripts ----------------------------------------------------------------------

    def _acquire(self, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        key, fence_key = keys
        token, ttl_ms, fence_ttl_ms = str(args[0]), int(args[1]), int(args[2])
        held = self._get(key)
        if held is not None:
            if held["token"] != token:
                return [0, held.get("owner", ""), self.pttl_ms(key)]
            self._pexpire(key, ttl_ms)
            return [1, int(self._get(fence_key) or 0)]
        current = self._get(fence_key)
        if current is None:
            fence = int(time.time() * 1_000_000)
            self._set(fence_key, str(fence), fence_ttl_ms)
        else:  # every acquisition gives the counter fence_ttl more to live
            fence = int(current) + 1
            self._set(fence_key, str(fence), fence_ttl_ms)
        meta = {str(args[i]): str(args[i + 1]) for i in range(3, len(args) - 1, 2)}
        self._set(key, {"token": token, **meta}, ttl_ms)
        return [1, fence]

    def _acquire_slot(self, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        fence_key, slots = keys[0], keys[1:]
        token = str(args[0])
        free = None
        owner, least = "", -1
        for i, slot in enumerate(slots):
            held = self._get(slot)
            if held is not None and held["token"] == token:
                self._pexpire(slot, int(args[1]))
                return [1, int(self._get(fence_key) or 0), i]
            if held is None:
                free = i if free is None else free
            elif least < 0 or self.pttl_ms(slot) < least:
                least, owner = self.pttl_ms(slot), held.get("owner", "")
        if free is None:
            return [0, owner, least]
        reply = self._acquire((slots[free], fence_key), args)
        return [*reply, free]

    def _follow(self, keys: tuple[str, ...], args: tuple[Any, ...]) -> list[Any]:
        lock, follow = keys
        me, current = str(args[0]), self._get(follow)
        if str(args[1]) == "drop":
            if current == me:
                del self.data[follow]
                return [1, me]
            return [0, current or ""]
        held = self._get(lock)
        owner = held.get("owner") if isinstance(held, dict) else None
        if current is not None and current != me and current != owner:
            return [0, current]
        self._set(follow, me, int(args[2]))
        return [1, me]

    def _release(self, keys: tuple[str, ...], args: tuple[Any, ...]) -> int:
        held = self._get(keys[0])
        if held is not None and held["token"] == str(args[0]):
            del self.data[keys[0]]
            if args[1]:
                for sub in list(self.subscribers.get(str(args[1]), [])):
                    sub.notify()
            return 1
        return 0

    def _extend(self, keys: tuple[str, ...], args: tuple[Any, ...]) -> int:
        held = self._get(keys[0])
        if held is None:
            return -1
        if held["token"] == str(args[0]):
            self._pexpire(keys[0], args[1])
            if str(args[2]) == "1":
                held["renewals"] = str(int(held.get("renewals", "0")) + 1)
            return 1
        return 0

    def _restore(self, keys: tuple[str, ...], args: tuple[Any, ...]) -> int:
        key, fence_key = keys
        if self._get(key) is not None:
            return 0
        meta = {str(args[i]): str(args[i + 1]) for i in range(4, len(args) - 1, 2)}
        self._set(key, {"token": str(args[0]), **meta}, int(args[1]))
        if int(self._get(fence_key) or 0) < int(args[2]):
            self._set(fence_key, str(int(args[2])), int(args[3]))
        return 1

    def _raise_fence(self, keys: tuple[str, ...], args: tuple[Any, ...]) -> int:
        current = int(self._get(keys[0]) or 0)
        if current < int(args[0]):
            self._set(keys[0], str(int(args[0])), int(args[1]))
        return 1

    def _handover(self, keys: tuple[str, ...], args: tuple[Any, ...]) -> list[int]:
        held = self._get(keys[0])
        if held is not None and held["token"] == str(args[0]):
            held["token"] = str(args[1])
            for i in range(3, len(args) - 1, 2):
                held[str(args[i])] = str(args[i + 1])
            self._pexpire(keys[0], args[2])
            return [1, int(self._get(keys[1]) or 0)]
        return [0, 0]

    def _beat_claim(self, keys: tuple[str, ...], args: tuple[Any, ...]) -> int:
        leader = self._get(keys[0])
        if leader is None or leader.get("token") != str(args[0]):
            return -1
        state = self._get(keys[1])
        if state is None:
            state = {}
            self._set(keys[1], state, None)
        last = state.get(str(args[1]))
        if last is not None and float(last) > float(args[2]) + 0.0005:
            return 0
        state[str(args[1])] = str(args[3])
        return 1

    def _plain(self, command: tuple[Any, ...]) -> Any:
        name = str(command[0]).upper()
        if name == "HGET":
            value = self._get(command[1])
            return value.get(command[2]) if isinstance(value, dict) else None
        if name == "HMGET":
            value = self._get(command[1])
            return [value.get(f) if isinstance(value, dict) else None for f in command[2:]]
        if name == "HGETALL":
            return self.hgetall(command[1])
        if name == "PTTL":
            return self.pttl_ms(command[1])
        if name == "PING":
            return True
        raise NotImplementedError(f"memory store has no command {name}")

    def _run(self, call: Call) -> Any:
        if call.script is None:
            return self._plain(call.command)
        handler = getattr(self, f"_{call.script}")
        return handler(call.keys, call.args)

    def send(self, calls: Sequence[Call], packed: bytes | None = None) -> _Done:
        with self.mutex:
            if self.down:
                exc = ConnectionError(f"{self.name} is down")
                return _Done([exc] * len(calls))
            return _Done([self._run(c) for c in calls])

    def subscribe(self, channel: str) -> _PipeSubscription:
        if self.down:
            raise OSError(f"{self.name} is down")
        return _PipeSubscription(self, channel)

    def client(self) -> MemoryNode:
        return self

    def close(self) -> None:
        pass


_named: dict[str, Store] = {}
_named_lock = threading.Lock()


def memory_store(url: str = "memory://", *, masters: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> Store:
    """A :class:`Store` of ``masters`` in-memory nodes.

    ``memory://NAME`` URLs name a store shared by everything in this process that uses the same
    URL; build an unnamed one with ``memory_store(masters=3, clock=ManualClock())``.
    """
    name = url.split("://", 1)[1] if "://" in url else url
    if name:
        with _named_lock:
            store = _named.get(name)
            if store is None:
                store = _named[name] = _build(masters, clock, url)
            return store
    return _build(masters, clock, url)


def _build(masters: int, clock: Callable[[], float], url: str) -> Store:
    nodes = [MemoryNode(clock, name=f"memory#{i}") for i in range(masters)]
    return Store(nodes, clock=clock, description=url)
