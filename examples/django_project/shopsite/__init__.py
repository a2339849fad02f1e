"""The example Django project; its Celery app loads with Django, as Celery's guide does it."""

from .celery import app as celery_app

__all__ = ["celery_app"]
