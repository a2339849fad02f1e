"""Settings of the example project: sqlite, django-celery-beat, and the lock settings.

The servers come from the environment: ``REDIS_URL`` (broker and results) and
``SINGLETON_LOCK_URL`` (the lock store; comma-separated URLs are Redlock masters).
``DJANGO_DB_PATH`` is the sqlite file.
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]

INSTALLED_APPS = [
    "django_celery_beat",
    "shop",
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DJANGO_DB_PATH", str(BASE_DIR / "db.sqlite3")),
        # A worker and two beats share the file: wait for a write lock instead of failing.
        "OPTIONS": {"timeout": 20},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"

# -- Celery (read by shopsite/celery.py with namespace="CELERY") ---------------------------------

REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TIMEZONE = TIME_ZONE
CELERY_BEAT_SCHEDULER = "shopsite.schedulers:HADatabaseScheduler"

# -- celery-singleton-lock: singleton_lock_* as CELERY_SINGLETON_LOCK_* --------------------------

CELERY_SINGLETON_LOCK_URL = os.environ.get("SINGLETON_LOCK_URL", REDIS_URL)
CELERY_SINGLETON_LOCK_TTL = 30.0
CELERY_SINGLETON_LOCK_ON_DUPLICATE = "reject"
CELERY_SINGLETON_LOCK_KEY_PREFIX = "shop"
CELERY_SINGLETON_LOCK_BEAT_TTL = 3.0
