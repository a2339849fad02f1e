"""django-celery-beat's DatabaseScheduler, made highly available.

Run several beats with it; one leads (the leader lock, ttl ``CELERY_SINGLETON_LOCK_BEAT_TTL``),
the others stand by and take over if it dies, and no periodic task is sent twice for one due
time. ``settings.CELERY_BEAT_SCHEDULER`` names it, so a plain ``celery -A shopsite beat`` uses
it.
"""

from django_celery_beat.schedulers import DatabaseScheduler

from celery_singleton_lock.beat import SingletonSchedulerMixin


class HADatabaseScheduler(SingletonSchedulerMixin, DatabaseScheduler):
    """Sends the periodic tasks stored in the database only while it holds the leader lock."""
