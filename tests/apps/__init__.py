"""Celery app modules that the task tests run in real ``celery worker`` subprocesses.

An app module builds its app with :func:`tests.apps.common.make_app`, which reads the broker,
result backend, lock store and records URLs from the environment the harness
(:mod:`tests.workers`) sets; the test process points an app with the same tasks at the same
servers (:func:`tests.apps.common.configure`) to send tasks and read results.
"""
