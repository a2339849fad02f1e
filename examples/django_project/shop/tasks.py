"""The tasks: a ``LockedTask`` through ``shared_task``, set up by ``CELERY_SINGLETON_LOCK_*``."""

import time

from celery import shared_task

from celery_singleton_lock import LockedTask

from .models import IndexBuild, Invoice


@shared_task(base=LockedTask, bind=True, name="shop.send_invoice", lock_key=["order_id"])
def send_invoice(self, order_id: int) -> int:
    """One invoice per order at a time: a second click while it runs is rejected."""
    time.sleep(1.0)  # rendering the PDF, talking to the mail server...
    Invoice.objects.create(order_id=order_id, task_id=self.request.id)
    return order_id


@shared_task(bind=True, name="shop.rebuild_search_index")
def rebuild_search_index(self) -> str:
    """Scheduled from the database by django-celery-beat (a PeriodicTask row).

    A plain task: every message a beat sends runs and leaves a row.
    """
    IndexBuild.objects.create(task_id=self.request.id)
    return "index rebuilt"
