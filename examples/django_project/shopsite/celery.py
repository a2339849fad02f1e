"""The project's Celery app: every ``CELERY_*`` Django setting is a Celery setting.

So ``CELERY_SINGLETON_LOCK_URL`` in ``settings.py`` is ``singleton_lock_url``, and so on for
every ``singleton_lock_*`` setting.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shopsite.settings")

app = Celery("shopsite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
