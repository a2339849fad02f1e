"""A task for ``tests/test_store_contract.py``: one body that proves mutual exclusion, on
whatever lock store ``CSL_TEST_STORE_URL`` names (JSON: a URL or a list of URLs).

The body enters by an atomic INCR of ``<slot>:inside`` in the records database, keeping its
maximum in ``<slot>:max``; two bodies of one signature at once would push that to 2.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery

from celery_singleton_lock import LockedTask
from tests.apps.common import ENTER_SCRIPT, configure, records

app = Celery("csl_store_dedup")


def configure_store(app: Celery, broker_url: str | None, backend_url: str | None,
                    store_url: Any) -> Celery:
    """Point ``app`` at the test broker and the lock store (a URL is set as it is: its commas
    may separate a Sentinel's or an ensemble's hosts)."""
    configure(app, broker_url, backend_url, None)
    app.conf.singleton_lock_url = store_url
    return app


configure_store(app, os.environ.get("CSL_TEST_BROKER"), os.environ.get("CSL_TEST_BACKEND"),
                json.loads(os.environ.get("CSL_TEST_STORE_URL") or "null"))


@app.task(base=LockedTask, bind=True, shared=False, name="store_dedup.reject")
def guarded(self: Any, slot: str, hold_s: float) -> int:
    r = records()
    r.eval(ENTER_SCRIPT, 2, f"{slot}:inside", f"{slot}:max")
    try:
        time.sleep(hold_s)
    finally:
        r.decr(f"{slot}:inside")
        r.rpush(f"{slot}:runs", self.request.id)
    return os.getpid()
