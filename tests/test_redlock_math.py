"""Pure unit tests: the Redlock arithmetic (``redlock.py``) and store URL parsing (``urls.py``).

No Redis here: these modules do no I/O, so every rule is checked with plain values.
"""

from __future__ import annotations

import pytest

from celery_singleton_lock.errors import LockConfigError, SingletonLockError
from celery_singleton_lock.redlock import (
    MasterReply,
    drift_s,
    judge_acquire,
    judge_owned,
    quorum,
    validity_s,
)
from celery_singleton_lock.urls import StoreURL, parse_store_url, redact_url

PASSWORD = "s3cr3t-pw"

GRANT = MasterReply(acquired=True, fence=10)


def held_by(holder: str, pttl_ms: int = 5000) -> MasterReply:
    return MasterReply(holder=holder, holder_pttl_ms=pttl_ms)


def down() -> MasterReply:
    return MasterReply(error=ConnectionError("master unreachable"))


# ------------------------------------------------------------------------------ quorum, drift


@pytest.mark.parametrize(
    ("n_masters", "expected"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (6, 4), (7, 4)]
)
def test_quorum_is_a_strict_majority(n_masters: int, expected: int) -> None:
    assert quorum(n_masters) == expected
    assert quorum(n_masters) > n_masters / 2


@pytest.mark.parametrize("n_masters", [0, -1])
def test_quorum_of_no_master_is_an_error(n_masters: int) -> None:
    with pytest.raises(ValueError, match="at least one master"):
        quorum(n_masters)


def test_drift_is_one_percent_of_the_ttl_plus_2ms() -> None:
    assert drift_s(10.0) == pytest.approx(0.102)
    assert drift_s(30.0) == pytest.approx(0.302)
    assert drift_s(0.0) == pytest.approx(0.002)


def test_validity_is_ttl_minus_elapsed_minus_drift() -> None:
    assert validity_s(10.0, 1.0) == pytest.approx(10.0 - 1.0 - 0.102)
    assert validity_s(10.0, 0.0) == pytest.approx(9.898)
    # A round that took longer than the ttl minus the drift leaves no validity.
    assert validity_s(1.0, 0.99) < 0
    assert validity_s(1.0, 1.5) < 0


# ------------------------------------------------------------------------------ judge_acquire


def test_acquire_succeeds_with_a_quorum_of_grants() -> None:
    outcome = judge_acquire([GRANT, GRANT, held_by("task-a")], ttl_s=10.0, elapsed_s=0.01)
    assert outcome.acquired
    assert outcome.granted == 2
    assert outcome.validity_s == pytest.approx(10.0 - 0.01 - 0.102)
    assert not outcome.backend_down


def test_acquire_fails_below_quorum_and_names_the_holder_with_its_longest_ttl() -> None:
    replies = [GRANT, held_by("task-a", 1200), held_by("task-a", 3400)]
    outcome = judge_acquire(replies, ttl_s=10.0, elapsed_s=0.01)
    assert not outcome.acquired
    assert outcome.granted == 1
    assert outcome.holder == "task-a"
    assert outcome.holder_pttl_ms == 3400
    assert not outcome.backend_down


def test_acquire_reports_the_holder_most_masters_name() -> None:
    replies = [held_by("old"), held_by("new"), held_by("new"), GRANT, GRANT]
    outcome = judge_acquire(replies, ttl_s=10.0, elapsed_s=0.0)
    assert not outcome.acquired
    assert outcome.holder == "new"


def test_acquire_with_all_grants_fails_when_the_round_outlived_the_validity() -> None:
    outcome = judge_acquire([GRANT, GRANT, GRANT], ttl_s=1.0, elapsed_s=0.995)
    assert not outcome.acquired
    assert outcome.granted == 3
    assert outcome.validity_s <= 0
    assert not outcome.backend_down


def test_acquire_on_one_master_needs_that_master() -> None:
    assert judge_acquire([GRANT], ttl_s=5.0, elapsed_s=0.0).acquired
    refused = judge_acquire([held_by("x")], ttl_s=5.0, elapsed_s=0.0)
    assert not refused.acquired and refused.holder == "x"
    failed = judge_acquire([down()], ttl_s=5.0, elapsed_s=0.0)
    assert not failed.acquired and failed.backend_down


@pytest.mark.parametrize(
    ("n_grants", "n_errors", "acquired", "backend_down"),
    [
        (3, 0, True, False),
        (2, 1, True, False),  # one unreachable master of three changes nothing
        (1, 2, False, True),  # two of three unreachable: the store is down, not busy
        (0, 3, False, True),
    ],
)
def test_acquire_on_three_masters_with_errors(
    n_grants: int, n_errors: int, acquired: bool, backend_down: bool
) -> None:
    replies = [GRANT] * n_grants + [down() for _ in range(n_errors)]
    outcome = judge_acquire(replies, ttl_s=10.0, elapsed_s=0.2)
    assert outcome.acquired is acquired
    assert outcome.backend_down is backend_down


def test_acquire_on_five_masters_needs_three() -> None:
    three = judge_acquire([GRANT] * 3 + [down(), held_by("h")], ttl_s=10.0, elapsed_s=0.0)
    assert three.acquired and not three.backend_down
    two = judge_acquire([GRANT] * 2 + [held_by("h")] * 3, ttl_s=10.0, elapsed_s=0.0)
    assert not two.acquired and not two.backend_down and two.holder == "h"
    answered_two = judge_acquire([GRANT] * 2 + [down()] * 3, ttl_s=10.0, elapsed_s=0.0)
    assert not answered_two.acquired and answered_two.backend_down


def test_errors_are_never_counted_as_holders() -> None:
    outcome = judge_acquire([down(), down(), held_by("h")], ttl_s=10.0, elapsed_s=0.0)
    assert outcome.holder == "h"
    nobody = judge_acquire([down(), down(), GRANT], ttl_s=10.0, elapsed_s=0.0)
    assert nobody.holder is None


def test_fencing_token_is_the_largest_granted_value_and_disagreement_is_flagged() -> None:
    replies = [
        MasterReply(acquired=True, fence=7),
        MasterReply(acquired=True, fence=9),
        MasterReply(acquired=True, fence=8),
    ]
    outcome = judge_acquire(replies, ttl_s=10.0, elapsed_s=0.0)
    assert outcome.fence == 9
    assert outcome.fences_disagree
    agree = judge_acquire([GRANT, GRANT, GRANT], ttl_s=10.0, elapsed_s=0.0)
    assert agree.fence == 10 and not agree.fences_disagree


def test_fencing_token_ignores_masters_that_did_not_grant() -> None:
    replies = [MasterReply(acquired=True, fence=5), MasterReply(fence=99, holder="h"), down()]
    outcome = judge_acquire(replies, ttl_s=10.0, elapsed_s=0.0)
    assert outcome.fence == 5
    assert not outcome.fences_disagree


def test_no_grant_means_fence_zero() -> None:
    outcome = judge_acquire([held_by("h")] * 3, ttl_s=10.0, elapsed_s=0.0)
    assert outcome.fence == 0 and outcome.granted == 0 and not outcome.acquired


# ------------------------------------------------------------------------------ judge_owned


@pytest.mark.parametrize(
    ("oks", "not_owned", "n_masters", "verdict"),
    [
        (1, 0, 1, True),
        (0, 1, 1, False),
        (0, 0, 1, None),
        (3, 0, 3, True),
        (2, 1, 3, True),
        (2, 0, 3, True),  # one error: still a quorum
        (1, 2, 3, False),
        (0, 2, 3, False),  # two denials: a quorum is impossible, whatever the third says
        (1, 1, 3, None),  # one error decides it either way: undecided
        (0, 1, 3, None),
        (0, 0, 3, None),
        (3, 2, 5, True),
        (2, 3, 5, False),
        (2, 2, 5, None),
        (0, 2, 5, None),
    ],
)
def test_judge_owned(oks: int, not_owned: int, n_masters: int, verdict: bool | None) -> None:
    assert judge_owned(oks, not_owned, n_masters) is verdict


# ------------------------------------------------------------------------------ parse_store_url


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379/0",
        "redis://localhost",
        "redis://127.0.0.1:6380/15",
        "rediss://redis.example.com:6380/1",
        "rediss://redis.example.com:6380/0?ssl_cert_reqs=none",
        "redis://user:pw@localhost:6379/0",
        "redis://:pw@localhost:6379/0",
        "redis://localhost:6379?db=3",
        "unix:///var/run/redis.sock",
        "unix:///var/run/redis.sock?db=2",
        "unix://:pw@/var/run/redis.sock?db=0",
    ],
)
def test_one_url_is_a_single_store(url: str) -> None:
    parsed = parse_store_url(url)
    assert parsed.kind == "single"
    assert parsed.urls == (url,)


@pytest.mark.parametrize(
    "url", ["redis+cluster://10.0.0.1:7000", "rediss+cluster://u:pw@10.0.0.1:7000/0"]
)
def test_cluster_url_is_a_cluster_store(url: str) -> None:
    parsed = parse_store_url(url)
    assert parsed.kind == "cluster"
    assert parsed.urls == (url,)


@pytest.mark.parametrize("url", ["memory://", "memory://tests"])
def test_memory_url_is_a_memory_store(url: str) -> None:
    assert parse_store_url(url) == StoreURL("memory", (url,))


def test_comma_separated_string_is_redlock_with_spaces_stripped() -> None:
    parsed = parse_store_url(" redis://a:6379/0, redis://b:6379/0 ,redis://c:6379/0")
    assert parsed.kind == "redlock"
    assert parsed.urls == ("redis://a:6379/0", "redis://b:6379/0", "redis://c:6379/0")


@pytest.mark.parametrize(
    "value",
    [
        ["redis://a:6379/0", "rediss://b:6380/0", "unix:///tmp/c.sock"],
        ("redis://a:6379/0", "redis://b:6379/0"),
    ],
)
def test_list_or_tuple_of_urls_is_redlock(value: list[str] | tuple[str, ...]) -> None:
    parsed = parse_store_url(value)
    assert parsed.kind == "redlock"
    assert parsed.urls == tuple(value)


def test_list_of_one_url_is_a_single_store() -> None:
    assert parse_store_url(["redis://a:6379/0"]) == StoreURL("single", ("redis://a:6379/0",))


def test_parsed_url_passes_through_unchanged() -> None:
    parsed = parse_store_url(["redis://a:1/0", "redis://b:1/0"])
    assert parse_store_url(parsed) is parsed


BAD_URLS = [
    pytest.param("http://localhost:6379/0", "scheme 'http'", id="bad-scheme"),
    pytest.param("localhost:6379", "scheme 'localhost'", id="no-scheme"),
    pytest.param(f"redis://:{PASSWORD}@localhost:abc/0", "Port", id="port-not-a-number"),
    pytest.param(f"redis://u:{PASSWORD}@localhost:99999/0", "out of range", id="port-too-big"),
    pytest.param(f"redis://:{PASSWORD}@localhost:6379/abc", "database 'abc'", id="db-path"),
    pytest.param(f"redis://:{PASSWORD}@localhost:6379?db=x", "db='x'", id="db-query"),
    pytest.param(f"redis://:{PASSWORD}@:6379/0", "no host", id="no-host"),
    pytest.param("unix://", "no socket path", id="unix-no-path"),
    pytest.param("", "empty", id="empty-string"),
    pytest.param(" , ", "empty", id="only-commas"),
    pytest.param([], "empty", id="empty-list"),
    pytest.param([f"redis://:{PASSWORD}@a:1/0", ""], "empty", id="list-with-empty-url"),
    pytest.param(42, "got int", id="not-a-string"),
    pytest.param(None, "got NoneType", id="none"),
    pytest.param([b"redis://a:1/0", "redis://b:1/0"], "got bytes", id="bytes-in-list"),
    pytest.param(
        ["redis://a:1/0", f"redis+cluster://:{PASSWORD}@b:1"],
        "scheme 'redis+cluster'",
        id="cluster-url-in-redlock-list",
    ),
    pytest.param(
        [f"redis://:{PASSWORD}@a:1/0", "redis://b:1/0", f"redis://:{PASSWORD}@a:1/0"],
        "listed twice",
        id="duplicate-master",
    ),
    pytest.param(
        f"redis://:{PASSWORD}@a:1/0,redis://:{PASSWORD}@a:1/0",
        "listed twice",
        id="duplicate-master-in-comma-string",
    ),
]


@pytest.mark.parametrize(("value", "problem"), BAD_URLS)
@pytest.mark.parametrize("setting", ["singleton_lock_url", "url"])
def test_bad_url_raises_config_error_naming_the_setting_without_the_password(
    value: object, problem: str, setting: str
) -> None:
    with pytest.raises(LockConfigError) as info:
        parse_store_url(value, setting=setting)
    exc = info.value
    assert isinstance(exc, ValueError) and isinstance(exc, SingletonLockError)
    assert exc.setting == setting
    message = str(exc)
    assert message.startswith(setting)
    assert problem in message
    assert PASSWORD not in message
    assert PASSWORD not in repr(exc)


def test_default_setting_name_is_singleton_lock_url() -> None:
    with pytest.raises(LockConfigError) as info:
        parse_store_url("ftp://x")
    assert info.value.setting == "singleton_lock_url"
    assert "singleton_lock_url" in str(info.value)


def test_store_url_repr_and_redacted_form_hide_passwords() -> None:
    parsed = parse_store_url([f"redis://:{PASSWORD}@a:1/0", f"redis://user:{PASSWORD}@b:1/0"])
    assert parsed.urls[0] == f"redis://:{PASSWORD}@a:1/0"  # the client still gets it
    assert PASSWORD not in parsed.redacted
    assert PASSWORD not in repr(parsed)
    assert parsed.redacted == "redis://:***@a:1/0,redis://user:***@b:1/0"


# ------------------------------------------------------------------------------ redact_url


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://:pw@localhost:6379/0", "redis://:***@localhost:6379/0"),
        ("redis://user:pw@localhost:6379/0", "redis://user:***@localhost:6379/0"),
        ("rediss://user:p%40ss@h:6380/0", "rediss://user:***@h:6380/0"),
        ("redis://user:pa:ss@h:1/0", "redis://user:***@h:1/0"),
        ("redis+cluster://u:pw@h:7000", "redis+cluster://u:***@h:7000"),
        ("unix://:pw@/tmp/r.sock?db=0", "unix://:***@/tmp/r.sock?db=0"),
        ("redis://h:1/0?password=pw&db=1", "redis://h:1/0?password=***&db=1"),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://user@localhost:6379/0", "redis://user@localhost:6379/0"),
        ("memory://", "memory://"),
    ],
)
def test_redact_url_replaces_only_the_password(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_redact_url_redacts_every_url_inside_longer_text() -> None:
    text = (
        f"Error connecting to redis://:{PASSWORD}@a:1/0; also tried "
        f"rediss://bob:{PASSWORD}@b:2/0?password={PASSWORD}"
    )
    out = redact_url(text)
    assert PASSWORD not in out
    assert "redis://:***@a:1/0" in out
    assert "rediss://bob:***@b:2/0?password=***" in out
