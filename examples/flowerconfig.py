"""Flower configuration that adds the lock metrics to Flower's ``/metrics``.

Run Flower with your app and this file::

    celery -A proj flower --conf=examples/flowerconfig.py

Flower executes this file once at startup, after ``-A`` has loaded the app, so
``celery.current_app`` is that app. ``register`` adds a collector to prometheus_client's default
registry, which Flower's ``/metrics`` serves: ``celery_singleton_lock_locks_held{task}`` read
from the lock store at scrape time, and counters of the ``task-lock-*`` events the workers send
(acquisitions, duplicates by policy, releases, renewals, lost locks, lock store errors).
Workers send those events when task events are on, which Flower turns on by itself.

Flower settings can go here too, as in any Flower config file (``port = 5555`` ...).
"""

from celery import current_app

from celery_singleton_lock.prometheus import register

register(current_app._get_current_object())
