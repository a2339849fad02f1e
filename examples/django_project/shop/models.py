"""What the tasks write, so the example can count their runs."""

from django.db import models


class IndexBuild(models.Model):
    """One run of ``shop.rebuild_search_index`` (the periodic task)."""

    task_id = models.CharField(max_length=64, unique=True)
    built_at = models.DateTimeField(auto_now_add=True)


class Invoice(models.Model):
    """An invoice sent for an order, once, however often the task was triggered."""

    order_id = models.IntegerField()
    task_id = models.CharField(max_length=64, unique=True)
