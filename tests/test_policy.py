"""The duplicate and backend-error decisions, and the requeue backoff: pure functions."""

from __future__ import annotations

import pytest

from celery_singleton_lock.policy import (
    REQUEUE_BACKOFF_CAP,
    on_backend_error,
    on_duplicate,
    requeue_countdown,
    requeue_span_s,
)


@pytest.mark.parametrize("policy", ["requeue", "wait", "coalesce"])
def test_waiting_policies_requeue_until_the_limit_then_reject(policy: str) -> None:
    assert on_duplicate(policy, "other", "me", 0, 3) == "requeue"
    assert on_duplicate(policy, "other", "me", 2, 3) == "requeue"
    assert on_duplicate(policy, "other", "me", 3, 3) == "reject"


def test_reject_rejects_unless_the_holder_is_an_earlier_delivery_of_this_message() -> None:
    assert on_duplicate("reject", "other", "me", 0, 3) == "reject"
    assert on_duplicate("reject", None, "me", 0, 3) == "reject"
    # acks_late after a killed worker: the lock is this very task's, left to expire.
    assert on_duplicate("reject", "me", "me", 0, 3) == "requeue"
    assert on_duplicate("reject", "me", "me", 3, 3) == "reject"


def test_backend_error_policies() -> None:
    assert on_backend_error("run", 99, 3) == "run"
    assert on_backend_error("requeue", 0, 3) == "requeue"
    assert on_backend_error("requeue", 3, 3) == "fail"
    assert on_backend_error("fail", 0, 3) == "fail"


def test_requeue_backoff_doubles_up_to_the_cap_within_its_jitter() -> None:
    assert requeue_countdown(1.0, 0, jitter=0.5) == pytest.approx(1.0)
    assert requeue_countdown(1.0, 3, jitter=0.5) == pytest.approx(8.0)
    assert requeue_countdown(1.0, 10, jitter=0.5) == pytest.approx(REQUEUE_BACKOFF_CAP)
    assert requeue_countdown(2.0, 1, jitter=0.0) == pytest.approx(2.0 * 2 * 0.8)
    assert requeue_countdown(2.0, 1, jitter=1.0) == pytest.approx(2.0 * 2 * 1.2)
    for _ in range(200):
        assert 0.8 * 4 <= requeue_countdown(1.0, 2) <= 1.2 * 4
    assert requeue_span_s(1.0, 6) == 1 + 2 + 4 + 8 + 16 + 16
