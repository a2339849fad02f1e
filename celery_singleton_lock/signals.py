"""Signals sent by celery-singleton-lock (Celery's dispatcher, so ``.connect`` works as usual).

* ``lock_acquired(sender=task, lock_key, task_id, lease)``: a task took its lock.
* ``lock_released(sender=task, lock_key, task_id, reason)``: a lock was released; ``reason`` is
  ``"success"``, ``"failure"``, ``"retry"``, ``"revoked"``, ``"worker_lost"``, ``"time_limit"``,
  ``"started"`` (an enqueue lock released when its task starts) or ``"lock"`` (standalone).
* ``lock_duplicate(sender=task, lock_key, task_id, holder_id, policy)``: a duplicate was
  rejected, requeued or made to wait.
* ``lock_lost(sender=task, lock_key, task_id, reason)``: renewal found the lock gone while its
  holder still ran. Sent in the process that renews the lock (for prefork: the worker's main
  process).

``sender`` is the task (or None for standalone locks).
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = ["lock_acquired", "lock_released", "lock_duplicate", "lock_lost"]

lock_acquired = Signal(name="lock_acquired", providing_args={"lock_key", "task_id", "lease"})
lock_released = Signal(name="lock_released", providing_args={"lock_key", "task_id", "reason"})
lock_duplicate = Signal(
    name="lock_duplicate", providing_args={"lock_key", "task_id", "holder_id", "policy"}
)
lock_lost = Signal(name="lock_lost", providing_args={"lock_key", "task_id", "reason"})
