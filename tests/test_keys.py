"""Lock key derivation: canonical encoding, argument binding, the frozen key format.

Pure tests, no Redis. Hypothesis checks the properties that keep one logical call on one key
(argument order, dict order, equal values of different spelling, the kombu JSON round trip);
golden keys pin the format itself.
"""

from __future__ import annotations

import inspect
import re
import string
import uuid
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kombu.utils import json as kombu_json

from celery_singleton_lock.errors import LockConfigError, LockKeyError
from celery_singleton_lock.keys import (
    bind_arguments,
    encode_value,
    format_key,
    lock_key_for,
    lock_payload,
    name_key,
    validate_key_prefix,
    validate_lock_key_option,
)

#: Every task key: prefix, shown name, then the digest as the only hash tag.
KEY_RE = re.compile(r"^[^\s{}]{1,32}:[A-Za-z0-9_.:\-]{0,128}:\{[0-9a-f]{64}\}$")

slow = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def key(option: Any, fun: Any, *args: Any, task: str = "proj.tasks.t", **kwargs: Any) -> str:
    signature = inspect.signature(fun) if fun is not None else None
    return lock_key_for("csl", task, signature, option, args, kwargs)


# --------------------------------------------------------------------------- strategies

# Timezones: fixed offsets (what kombu gives back) and real zones (what callers pass).
fixed_offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
tzinfos = st.none() | fixed_offsets | st.timezones()

# Every scalar kombu's JSON serializer sends and gives back as the same type.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    | st.uuids()
    | st.datetimes(timezones=tzinfos)
    | st.dates()
    | st.times(timezones=st.none() | fixed_offsets)
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.binary()
)


def _not_kombu_envelope(d: dict[str, Any]) -> bool:
    # kombu decodes a dict with exactly these keys as a typed value: not a plain dict to send.
    return d.keys() != {"__type__", "__value__"}


json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=8), children, max_size=4).filter(_not_kombu_envelope)
    ),
    max_leaves=12,
)

hashable_scalars = (
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.uuids() | st.dates()
)
# Everything the encoder accepts, sets included (those only travel with pickle).
any_values = st.recursive(
    json_scalars | st.frozensets(hashable_scalars, max_size=4),
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
        | st.sets(hashable_scalars, max_size=4)
    ),
    max_leaves=12,
)

prefixes = st.text(
    alphabet=[c for c in string.printable if c not in string.whitespace + "{}"],
    min_size=1,
    max_size=32,
)


def rebuilt(value: Any, rng: Any, *, tuples: bool = False) -> Any:
    """``value`` with every dict rebuilt in a shuffled insertion order (and lists as tuples)."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: rebuilt(v, rng, tuples=tuples) for k, v in items}
    if isinstance(value, (list, tuple)):
        items = [rebuilt(v, rng, tuples=tuples) for v in value]
        return tuple(items) if tuples else items
    return value


def untupled(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: untupled(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [untupled(v) for v in value]
    return value


_US = timedelta(microseconds=1)


def utc_micros(moment: datetime) -> int:
    """The UTC instant an aware datetime denotes, read through its ``utcoffset()`` (so through
    its ``fold`` too), in microseconds since the epoch: no overflow near year 1 or 9999."""
    offset = moment.utcoffset()
    assert offset is not None
    return (moment.replace(tzinfo=None) - datetime(1970, 1, 1)) // _US - offset // _US


def instants(value: Any) -> Any:
    """``value`` with lists for tuples and every aware datetime replaced by its UTC instant.

    Python's ``==`` is not "the same instant" for datetimes: it calls an ambiguous or imaginary
    local time unequal to every time of another zone (PEP 495), and compares two times of one
    zone by their wall clocks, fold ignored. Comparing instants is the exact relation.
    """
    if isinstance(value, dict):
        return {k: instants(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [instants(v) for v in value]
    if isinstance(value, datetime) and value.utcoffset() is not None:
        return ("instant", utc_micros(value))
    return value


def kombu_round_trip(args: Any, kwargs: Any) -> tuple[Any, Any]:
    """What a worker sees of ``args`` and ``kwargs`` sent with Celery's JSON serializer."""
    return kombu_json.loads(kombu_json.dumps([args, kwargs]))


def sync_account(account_id, full=False): ...


def ranged(a, b=None, *rest, c=0, **extra): ...


# --------------------------------------------------------------------------- golden keys

# These keys are frozen: they MUST NEVER CHANGE. A release that derives a different key for the
# same call would run beside the old one during an upgrade with the two never seeing each
# other's locks. A change here is a breaking change of the lock format, never a test fix.


def report(opts, when, ident, amount, blob, tags): ...


def unicode_task(titre): ...


def no_args(): ...


GOLDEN_CALLS: list[tuple[str, Any, str]] = [
    (
        "all_args",
        lambda: key(None, sync_account, 42, task="proj.tasks.sync_account"),
        "csl:proj.tasks.sync_account:{cf697394324040e1ef208af56b594d93489cc8e09e6a8c366b80e65175c7dfc5}",
    ),
    (
        "lock_key_list",
        lambda: key(["account_id"], sync_account, 42, full=True, task="proj.tasks.sync_account"),
        "csl:proj.tasks.sync_account:{92e1eee38b41f8622d1d87759eb7b98178c7352645fdc71a23340f2b2078afbc}",
    ),
    (
        "lock_key_empty",
        lambda: key([], sync_account, 42, task="proj.tasks.sync_account"),
        "csl:proj.tasks.sync_account:{b7f875a06e6d6dfcb51deaea7870b7ea1599093944976daf00ec0d2145c7940f}",
    ),
    (
        "lock_key_callable",
        lambda: key(
            lambda account_id, full=False: f"account-{account_id}",
            sync_account,
            42,
            task="proj.tasks.sync_account",
        ),
        "csl:proj.tasks.sync_account:{e6880c7a4812320ba62bd2bfa8b56a9f9bb38dd1ae58d957a7c71b053c4f6d71}",
    ),
    (
        "unicode_task_name",
        lambda: key(None, unicode_task, "été", task="projet.tâches.résumé"),
        "csl:projet.t_ches.r_sum_:{d63f0ab518751a71e7df9ef02ff503e6195e66b6150e3e745c78c9b6b6c1c9fb}",
    ),
    (
        "long_task_name",
        lambda: key(None, no_args, task="proj." + "very_long_module_name." * 8 + "task"),
        "csl:proj.very_long_module_name.very_long_module_name.very_long_module_name.very_long_module_name.very_long_module_name.very_long_mod:{92074a6a601f3d012984c7e2b089de71afe4760f03c2aad8b4d74c7dab9e6a87}",
    ),
    (
        "nested_typed_args",
        lambda: lock_key_for(
            "myapp",
            "proj.reports.build",
            inspect.signature(report),
            None,
            (
                {"z": [1, 2.5, None], "a": {"deep": (True, "x")}, "$ref": "user"},
                datetime(2024, 5, 17, 14, 30, 0, 123456, tzinfo=timezone(timedelta(hours=2))),
                uuid.UUID("12345678-1234-5678-1234-567812345678"),
                Decimal("19.990"),
                b"\x00\xffbytes",
            ),
            {"tags": frozenset({"b", "a", "c"})},
        ),
        "myapp:proj.reports.build:{40b6ba0adc45b47d46169a6bef9d7e13ff7648cd3adad3217d63a9e4d5c5223e}",
    ),
    (
        "unknown_signature",
        lambda: key(None, None, 1, "two", [3], flag=False, task="proj.tasks.untyped"),
        "csl:proj.tasks.untyped:{5061eb1036af9c2a2d1ffcd9fb31f9d454f95e8d226463831de2cc51f4351152}",
    ),
    (
        "naive_datetime_date_time",
        lambda: key(
            None,
            ranged,
            datetime(2024, 1, 2, 3, 4, 5),
            date(2024, 1, 2),
            time(23, 59, 59, 1),
            c=-0.0,
            task="proj.tasks.ranged",
        ),
        "csl:proj.tasks.ranged:{b6abae555a0e4545ce791c5d31159d6d3575e366c1f220b6ea13a0c0bd3560a5}",
    ),
]


@pytest.mark.parametrize(
    "compute, expected", [(c, e) for _, c, e in GOLDEN_CALLS], ids=[n for n, _, _ in GOLDEN_CALLS]
)
def test_golden_keys_never_change(compute: Any, expected: str) -> None:
    assert compute() == expected


def test_golden_payload_of_typed_arguments_never_changes() -> None:
    # The text hashed into the "nested_typed_args" key above: tells which spelling moved.
    payload = lock_payload(
        None,
        inspect.signature(report),
        (
            {"z": [1, 2.5, None], "a": {"deep": (True, "x")}, "$ref": "user"},
            datetime(2024, 5, 17, 14, 30, 0, 123456, tzinfo=timezone(timedelta(hours=2))),
            uuid.UUID("12345678-1234-5678-1234-567812345678"),
            Decimal("19.990"),
            b"\x00\xffbytes",
        ),
        {"tags": frozenset({"b", "a", "c"})},
        task_name="proj.reports.build",
    )
    assert payload == (
        '{"amount":{"$decimal":"19.99"},"blob":{"$bytes":"AP9ieXRlcw=="},'
        '"ident":{"$uuid":"12345678-1234-5678-1234-567812345678"},'
        '"opts":{"$$ref":"user","a":{"deep":[true,"x"]},"z":[1,2.5,null]},'
        '"tags":{"$set":["a","b","c"]},"when":{"$datetime":"2024-05-17T12:30:00.123456Z"}}'
    )


def test_golden_standalone_lock_names_never_change() -> None:
    assert name_key("csl", "reports:daily") == "csl:{reports:daily}"
    assert name_key("csl", "user:{42}:report") == "csl:user:{42}:report"
    assert name_key("myapp", "a{}b") == "myapp:{a{}b}"


def test_golden_payload_spells_typed_values_with_tags() -> None:
    # The payload is what gets hashed: pinned too, so a change in spelling shows up here first.
    assert encode_value(
        {"b": (1, 2.0), "a": {2, 1}, "$x": None, "t": True, "u": uuid.UUID(int=1)}
    ) == (
        '{"$$x":null,"a":{"$set":[1,2]},"b":[1,2],"t":true,'
        '"u":{"$uuid":"00000000-0000-0000-0000-000000000001"}}'
    )


# --------------------------------------------------------------------------- one call, one key


@given(a=json_values, b=json_values, c=json_values)
@slow
def test_keyword_and_positional_calls_share_one_key(a: Any, b: Any, c: Any) -> None:
    keys = {
        key(None, ranged, a, b, c=c),
        key(None, ranged, a, b=b, c=c),
        key(None, ranged, a=a, b=b, c=c),
        key(None, ranged, c=c, b=b, a=a),
    }
    assert len(keys) == 1


@given(a=json_values)
@slow
def test_defaults_applied_give_the_same_key_as_explicit_values(a: Any) -> None:
    assert key(None, ranged, a) == key(None, ranged, a, None, c=0) == key(None, ranged, a=a, c=0)


def test_keyword_order_in_var_kwargs_never_matters() -> None:
    assert key(None, ranged, 1, x=1, y=2) == key(None, ranged, 1, y=2, x=1)
    assert key(None, ranged, 1, x=1, y=2) != key(None, ranged, 1, x=2, y=1)


def test_extra_positionals_are_part_of_the_key() -> None:
    assert key(None, ranged, 1, 2, 3) != key(None, ranged, 1, 2, 4)
    assert key(None, ranged, 1, 2, 3) != key(None, ranged, 1, 2)


@given(value=any_values, rng=st.randoms(use_true_random=False))
@slow
def test_dict_insertion_order_never_changes_the_key(value: Any, rng: Any) -> None:
    assert encode_value(rebuilt(value, rng)) == encode_value(value)


@given(value=any_values, rng=st.randoms(use_true_random=False))
@slow
def test_tuples_encode_exactly_like_lists(value: Any, rng: Any) -> None:
    assert encode_value(rebuilt(value, rng, tuples=True)) == encode_value(untupled(value))


@given(n=st.integers(min_value=-(2**53), max_value=2**53))
def test_integral_float_and_equal_int_share_one_encoding(n: int) -> None:
    assert encode_value(float(n)) == encode_value(n)


def test_negative_zero_encodes_like_zero() -> None:
    assert encode_value(-0.0) == encode_value(0.0) == encode_value(0)
    assert encode_value(Decimal("-0.00")) == encode_value(Decimal("0"))


@given(d=st.decimals(allow_nan=False, allow_infinity=False), extra=st.integers(0, 5))
def test_decimals_with_trailing_zeros_share_one_encoding(d: Decimal, extra: int) -> None:
    sign, digits, exponent = d.as_tuple()
    assert isinstance(exponent, int)
    padded = Decimal((sign, (*digits, *([0] * extra)), exponent - extra))
    assert padded == d
    assert encode_value(padded) == encode_value(d)


def test_decimal_beyond_context_precision_is_not_rounded() -> None:
    a = Decimal("1.0000000000000000000000000000001")
    b = Decimal("1.0000000000000000000000000000002")
    assert encode_value(a) != encode_value(b)
    assert encode_value(Decimal("1.0")) == encode_value(Decimal("1.00"))


@given(
    moment=st.datetimes(
        min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=st.timezones()
    ),
    other=st.timezones() | fixed_offsets,
)
# A draw that once failed: the repeated hour when Lindeman left daylight saving time (02:00 was
# 15:00Z with fold=0). Python's == calls it unequal to every time of another zone.
@example(moment=datetime(1992, 3, 1, 2, 0, tzinfo=ZoneInfo("Australia/Lindeman")),
         other=timezone.utc)
@example(moment=datetime(2024, 3, 10, 2, 30, tzinfo=ZoneInfo("America/New_York")),
         other=ZoneInfo("Europe/Paris"))
@example(moment=datetime(2024, 11, 3, 1, 30, fold=1, tzinfo=ZoneInfo("America/New_York")),
         other=ZoneInfo("America/New_York"))
@slow
def test_one_instant_in_two_timezones_shares_one_key(moment: datetime, other: Any) -> None:
    # Any local time, imaginary and ambiguous ones too, denotes the instant its utcoffset()
    # gives (under its fold); astimezone() moves that instant, so both spell one instant.
    moved = moment.astimezone(other)
    assert utc_micros(moved) == utc_micros(moment)
    assert encode_value(moved) == encode_value(moment)


NEW_YORK = ZoneInfo("America/New_York")
UTC = timezone.utc


def utc_text(*fields: int) -> str:
    return encode_value(datetime(*fields, tzinfo=UTC))


@pytest.mark.parametrize(
    "local, same_as",
    [
        # Clocks go forward at 02:00 on 2024-03-10: 02:30 never happens (imaginary). fold=0
        # reads it with the offset before the gap (EST), fold=1 with the one after (EDT).
        (datetime(2024, 3, 10, 2, 30, tzinfo=NEW_YORK), datetime(2024, 3, 10, 7, 30, tzinfo=UTC)),
        (datetime(2024, 3, 10, 2, 30, fold=1, tzinfo=NEW_YORK),
         datetime(2024, 3, 10, 6, 30, tzinfo=UTC)),
        # Clocks go back at 02:00 on 2024-11-03: 01:30 happens twice (ambiguous). fold=0 is the
        # first time (EDT), fold=1 the second (EST).
        (datetime(2024, 11, 3, 1, 30, tzinfo=NEW_YORK), datetime(2024, 11, 3, 5, 30, tzinfo=UTC)),
        (datetime(2024, 11, 3, 1, 30, fold=1, tzinfo=NEW_YORK),
         datetime(2024, 11, 3, 6, 30, tzinfo=UTC)),
        # The failing Hypothesis draw: the repeated hour in Lindeman, first time (AEDT, +11).
        (datetime(1992, 3, 1, 2, 0, tzinfo=ZoneInfo("Australia/Lindeman")),
         datetime(1992, 2, 29, 15, 0, tzinfo=UTC)),
    ],
    ids=["gap_fold0", "gap_fold1", "overlap_fold0", "overlap_fold1", "lindeman_1992"],
)
def test_imaginary_and_ambiguous_local_times_are_keyed_by_the_instant_their_fold_gives(
    local: datetime, same_as: datetime
) -> None:
    assert encode_value(local) == encode_value(same_as)
    assert encode_value(local) == (
        '{"$datetime":"' + same_as.replace(tzinfo=None).isoformat(timespec="microseconds")
        + 'Z"}'
    )
    # The caller computes the key from ``local``; the worker from what kombu's JSON gives
    # back (an isoformat() with the offset of that fold): the same key on both sides.
    assert encode_value(kombu_round_trip([local], {})[0][0]) == encode_value(local)


def test_both_folds_of_one_wall_time_get_two_keys_although_python_calls_them_equal() -> None:
    first = datetime(2024, 11, 3, 1, 30, fold=0, tzinfo=NEW_YORK)
    second = first.replace(fold=1)
    assert first == second  # one zone: Python compares wall clocks and ignores fold
    assert encode_value(first) == utc_text(2024, 11, 3, 5, 30)
    assert encode_value(second) == utc_text(2024, 11, 3, 6, 30)
    assert key(None, sync_account, first) != key(None, sync_account, second)


def test_an_imaginary_time_shares_the_key_of_the_real_time_at_its_instant() -> None:
    imaginary = datetime(2024, 3, 10, 2, 30, tzinfo=NEW_YORK)
    real = datetime(2024, 3, 10, 3, 30, tzinfo=NEW_YORK)  # 07:30Z too, in EDT
    assert imaginary != real  # one zone: Python compares the wall clocks 02:30 and 03:30
    assert key(None, sync_account, imaginary) == key(None, sync_account, real)
    # astimezone() of the imaginary time gives the real one: a round trip need not come back.
    assert imaginary.astimezone(UTC).astimezone(NEW_YORK) == real


@given(t=st.times(timezones=fixed_offsets), other=fixed_offsets)
def test_aware_times_equal_in_python_share_one_encoding(t: time, other: Any) -> None:
    moved_offset = other.utcoffset(None) - t.utcoffset()
    moved = (datetime.combine(date(2000, 1, 2), t.replace(tzinfo=None)) + moved_offset).time()
    candidate = moved.replace(tzinfo=other)
    assert (candidate == t) == (encode_value(candidate) == encode_value(t))


def test_naive_and_aware_datetimes_stay_distinct() -> None:
    naive = datetime(2024, 1, 1, 12)
    assert encode_value(naive) != encode_value(naive.replace(tzinfo=timezone.utc))


@given(a=any_values, b=any_values)
# One instant that Python's == calls two: an imaginary New York time and its UTC spelling.
@example(a=[datetime(2024, 3, 10, 2, 30, tzinfo=ZoneInfo("America/New_York"))],
         b=(datetime(2024, 3, 10, 7, 30, tzinfo=timezone.utc),))
@slow
def test_equal_encodings_only_for_equal_values(a: Any, b: Any) -> None:
    if encode_value(a) == encode_value(b):
        assert instants(a) == instants(b)


@pytest.mark.parametrize(
    "a, b",
    [
        ("1", 1),
        (True, 1),
        (False, 0),
        (None, "null"),
        ([1, 2], {1, 2}),
        ([], set()),
        (uuid.UUID(int=7), str(uuid.UUID(int=7))),
        (Decimal("1.5"), 1.5),
        (Decimal("1"), 1),
        (Decimal("1.5"), "1.5"),
        (b"abc", "abc"),
        (date(2024, 1, 1), "2024-01-01"),
        (datetime(2024, 1, 1), date(2024, 1, 1)),
        (time(1, 2, 3), "01:02:03.000000"),
        ({"$uuid": str(uuid.UUID(int=7))}, uuid.UUID(int=7)),
        ({"$set": [1, 2]}, {1, 2}),
        ({"a": 1}, [["a", 1]]),
    ],
    ids=repr,
)
def test_different_values_give_different_keys(a: Any, b: Any) -> None:
    assert encode_value(a) != encode_value(b)
    assert key(None, sync_account, a) != key(None, sync_account, b)


def test_different_tasks_give_different_keys_even_with_equal_shown_names() -> None:
    base = "proj." + "x" * 200
    k1, k2 = key([], None, task=base + ".a"), key([], None, task=base + ".b")
    assert k1 != k2
    assert k1.split(":{")[0] == k2.split(":{")[0]


def test_names_that_sanitise_alike_give_different_keys() -> None:
    assert key([], None, task="proj.t\u00e9") != key([], None, task="proj.t\u00e8")


# --------------------------------------------------------------------------- kombu transport


keyword_names = st.text(max_size=8).filter(str.isidentifier)


@given(
    args=st.lists(json_values, max_size=4),
    kwargs=st.dictionaries(keyword_names, json_values, max_size=4),
)
@slow
def test_key_survives_the_kombu_json_round_trip(args: list[Any], kwargs: dict[str, Any]) -> None:
    # Caller side: the Python values (tuples and all). Worker side: what kombu gives back.
    sent_args, sent_kwargs = kombu_round_trip(args, kwargs)
    assert key(None, None, *args, **kwargs) == key(None, None, *sent_args, **sent_kwargs)


@given(
    a=json_values,
    rest=st.lists(json_values, max_size=3),
    kwargs=st.dictionaries(keyword_names.filter(lambda k: k not in "ab"), json_values, max_size=4),
)
@slow
def test_bound_key_survives_the_kombu_json_round_trip(
    a: Any, rest: list[Any], kwargs: dict[str, Any]
) -> None:
    args = (a, *rest)
    sent_args, sent_kwargs = kombu_round_trip(args, kwargs)
    assert key(None, ranged, *args, **kwargs) == key(None, ranged, *sent_args, **sent_kwargs)


@given(value=json_values)
@slow
def test_every_transportable_value_encodes_the_same_after_the_round_trip(value: Any) -> None:
    assert encode_value(kombu_round_trip([value], {})[0][0]) == encode_value(value)


# --------------------------------------------------------------------------- key shape


@given(
    prefix=prefixes,
    task_name=st.text(min_size=1, max_size=1000),
    payload_size=st.integers(0, 200_000),
)
@slow
def test_every_key_stays_under_250_bytes_with_one_hash_tag(
    prefix: str, task_name: str, payload_size: int
) -> None:
    k = lock_key_for(
        prefix, task_name, inspect.signature(sync_account), None, ("x" * payload_size,), {}
    )
    assert len(k.encode("utf-8")) < 250
    assert k.count("{") == 1 and k.count("}") == 1
    assert k.startswith(prefix + ":")
    assert KEY_RE.match(k)


@given(task_name=st.text(min_size=1, max_size=400))
def test_shown_name_is_the_sanitised_task_name_cut_to_128_chars(task_name: str) -> None:
    shown = format_key("csl", task_name, "")[len("csl:") : -len(":{" + "0" * 64 + "}")]
    assert len(shown) == min(len(task_name), 128)
    assert re.fullmatch(r"[A-Za-z0-9_.:\-]*", shown)
    assert all(s == t or s == "_" for s, t in zip(shown, task_name, strict=False))


def test_digest_is_sha256_of_full_task_name_and_payload() -> None:
    import hashlib

    digest = hashlib.sha256(b"proj.t\n{}").hexdigest()
    assert format_key("csl", "proj.t", "{}") == f"csl:proj.t:{{{digest}}}"
    assert lock_payload(None, inspect.signature(no_args), (), {}, task_name="proj.t") == "{}"


def test_callable_payload_with_lone_surrogates_still_gives_a_key() -> None:
    assert KEY_RE.match(key(lambda *a, **k: "\ud800", None, task="proj.t"))


# --------------------------------------------------------------------------- selection


def test_lock_key_list_uses_only_the_named_arguments() -> None:
    assert key(["account_id"], sync_account, 1, full=True) == key(["account_id"], sync_account, 1)
    assert key(["account_id"], sync_account, 1) != key(["account_id"], sync_account, 2)
    assert key(["account_id"], sync_account, 1) == key(["account_id"], sync_account, account_id=1)


def test_lock_key_list_order_does_not_matter() -> None:
    assert key(["a", "c"], ranged, 1, c=3) == key(["c", "a"], ranged, 1, c=3)


def test_lock_key_list_covering_all_arguments_equals_the_default() -> None:
    assert key(["account_id", "full"], sync_account, 1) == key(None, sync_account, 1)


def test_empty_lock_key_gives_one_key_per_task() -> None:
    assert key([], sync_account, 1) == key([], sync_account, 2)
    assert key([], sync_account, 1, task="a") != key([], sync_account, 1, task="b")
    assert lock_payload([], None, (object(),), {}, task_name="t") == ""


def test_callable_lock_key_receives_args_and_kwargs() -> None:
    def by_account(account_id, full=False):
        return f"{account_id}:{full}"

    assert key(by_account, sync_account, 1, full=True) == key(by_account, sync_account, 1, True)
    assert lock_payload(by_account, None, (1,), {"full": True}, task_name="t") == "1:True"


def test_callable_lock_key_returning_non_str_raises_naming_task_and_option() -> None:
    with pytest.raises(LockKeyError, match=r"lock_key.*'proj.t'|'proj.t'.*lock_key") as info:
        key(lambda *a: 42, None, task="proj.t")
    assert info.value.task_name == "proj.t"
    assert info.value.argument == "lock_key"
    assert "int" in str(info.value)


def test_arguments_not_matching_the_signature_raise_naming_the_task() -> None:
    with pytest.raises(LockKeyError, match="proj.tasks.sync_account") as info:
        key(None, sync_account, 1, 2, 3, task="proj.tasks.sync_account")
    assert info.value.task_name == "proj.tasks.sync_account"


_MISSING = object()


def test_bind_failure_message_shows_no_default_repr() -> None:
    def with_sentinel(a, marker=_MISSING): ...

    with pytest.raises(LockKeyError, match="unexpected keyword argument 'b'") as info:
        key(None, with_sentinel, 1, b=2)
    assert "0x" not in str(info.value)


def test_bind_collects_var_args_as_list_and_var_kwargs_as_dict() -> None:
    bound = bind_arguments(inspect.signature(ranged), (1, 2, 3, 4), {"z": 5}, task_name="t")
    assert bound == {"a": 1, "b": 2, "rest": [3, 4], "c": 0, "extra": {"z": 5}}


def test_bind_without_signature_keeps_args_and_kwargs() -> None:
    assert bind_arguments(None, (1, 2), {"x": 3}, task_name="t") == {
        "args": [1, 2],
        "kwargs": {"x": 3},
    }


def test_bound_method_signature_leaves_out_self() -> None:
    class Task:
        def run(self, account_id, full=False): ...

    signature = inspect.signature(Task().run)
    assert bind_arguments(signature, (1,), {}, task_name="t") == {"account_id": 1, "full": False}


@pytest.mark.parametrize("args, kwargs", [
    ((), {}), ((1,), {}), ((1, 2), {}), ((1, 2, 3), {}), ((1, 2, 3, 4), {}),
    ((1,), {"b": 2}), ((), {"a": 1, "c": 3}), ((1,), {"a": 2}), ((1,), {"zz": 1}),
    ((1, 2), {"b": 3}), ((), {"b": 1}),
])
def test_bind_by_hand_agrees_with_inspect(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Ordinary parameters are bound without inspect; the result (or error) is the same."""

    def plain(a, b=[1], c=None): ...  # noqa: B006 - an unhashable default on purpose

    signature = inspect.signature(plain)
    try:
        expected = signature.bind(*args, **kwargs)
    except TypeError:
        with pytest.raises(LockKeyError):
            bind_arguments(signature, args, kwargs, task_name="t")
        return
    expected.apply_defaults()
    assert bind_arguments(signature, args, kwargs, task_name="t") == dict(expected.arguments)


# --------------------------------------------------------------------------- unsupported values


class Custom:
    pass


@pytest.mark.parametrize(
    "value, path, type_name",
    [
        (object(), "opts", "object"),
        (lambda: None, "opts", "function"),
        (Custom(), "opts", "test_keys.Custom"),
        (Custom, "opts", "type"),
        ({"x": [0, 0, Custom()]}, "opts['x'][2]", "test_keys.Custom"),
        ({"x": {Custom()}}, "opts['x'][<set member>]", "test_keys.Custom"),
    ],
    ids=["object", "lambda", "instance", "class", "nested", "set_member"],
)
def test_unsupported_value_raises_naming_path_and_type_without_address(
    value: Any, path: str, type_name: str
) -> None:
    with pytest.raises(LockKeyError) as info:
        lock_key_for("csl", "proj.t", inspect.signature(lambda opts: None), None, (value,), {})
    message = str(info.value)
    assert f"argument {path} " in message
    assert type_name in message
    assert "'proj.t'" in message
    assert "0x" not in message
    assert info.value.argument == path
    assert info.value.task_name == "proj.t"


def test_unsupported_value_error_carries_its_type() -> None:
    with pytest.raises(LockKeyError) as info:
        encode_value([Custom()], "items", task_name="proj.t")
    assert info.value.value_type is Custom
    assert info.value.argument == "items[0]"


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), -float("inf"), Decimal("NaN"), Decimal("-Infinity")]
)
def test_non_finite_numbers_raise(value: Any) -> None:
    with pytest.raises(LockKeyError, match="non-finite"):
        encode_value({"x": value}, "opts")


def test_non_str_dict_key_raises_naming_the_path() -> None:
    with pytest.raises(LockKeyError, match=r"opts\['a'\] has a key of type 'int'"):
        encode_value({"a": {1: "x"}}, "opts")


def test_self_containing_value_raises_instead_of_recursing() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(LockKeyError, match="contains itself"):
        encode_value(loop, "loop")


def test_shared_but_acyclic_values_are_fine() -> None:
    shared = [1]
    assert encode_value([shared, shared]) == "[[1],[1]]"


def test_too_deep_nesting_raises() -> None:
    value: Any = 1
    for _ in range(150):
        value = [value]
    with pytest.raises(LockKeyError, match="nested deeper"):
        encode_value(value)


def test_huge_integers_encode_past_the_int_to_str_limit() -> None:
    big = 10**5000 + 7
    assert encode_value(big) == "1" + "0" * 4999 + "7"
    assert encode_value(-big) == "-" + encode_value(big)


# --------------------------------------------------------------------------- validation


def test_valid_lock_key_options_pass() -> None:
    signature = inspect.signature(sync_account)
    for option in (None, [], (), ["account_id"], ("account_id", "full"), lambda *a: "x"):
        validate_lock_key_option(option, signature, task_name="t")


def test_unknown_lock_key_names_raise_naming_them_and_the_task() -> None:
    with pytest.raises(LockConfigError) as info:
        validate_lock_key_option(
            ["acount_id", "full", "mode"],
            inspect.signature(sync_account),
            task_name="proj.tasks.sync_account",
        )
    message = str(info.value)
    assert info.value.setting == "lock_key"
    assert "acount_id" in message and "mode" in message
    assert "proj.tasks.sync_account" in message
    assert "account_id, full" in message  # the known arguments


@pytest.mark.parametrize(
    "option, fragment",
    [
        ("account_id", "did you mean lock_key=['account_id']"),
        (42, "'int'"),
        ({"account_id"}, "'set'"),
        ([1], "of type int"),
        ([""], "non-empty"),
    ],
)
def test_malformed_lock_key_option_raises_config_error(option: Any, fragment: str) -> None:
    with pytest.raises(LockConfigError, match=re.escape(fragment)) as info:
        validate_lock_key_option(option, inspect.signature(sync_account), task_name="proj.t")
    assert info.value.setting == "lock_key"
    assert "proj.t" in str(info.value)


def test_named_lock_key_without_readable_signature_raises() -> None:
    with pytest.raises(LockConfigError, match="signature") as info:
        validate_lock_key_option(["x"], None, task_name="proj.t")
    assert info.value.setting == "lock_key"
    validate_lock_key_option([], None, task_name="proj.t")


def test_lock_payload_rejects_unknown_names_too() -> None:
    with pytest.raises(LockConfigError, match="nope"):
        lock_payload(["nope"], inspect.signature(sync_account), (1,), {}, task_name="t")


@pytest.mark.parametrize("prefix", ["csl", "a", "my-app.locks", "x" * 32, "p:q"])
def test_valid_key_prefix_is_returned(prefix: str) -> None:
    assert validate_key_prefix(prefix) == prefix


@pytest.mark.parametrize(
    "prefix, fragment",
    [
        ("", "empty"),
        ("x" * 33, "at most 32"),
        ("my app", "whitespace"),
        ("tab\there", "whitespace"),
        ("v\u00e9rrou", "ASCII"),
        ("a{b", "'{'"),
        ("a}b", "'{'"),
        (None, "str"),
        (b"csl", "str"),
    ],
)
def test_invalid_key_prefix_raises_naming_the_setting(prefix: Any, fragment: str) -> None:
    with pytest.raises(LockConfigError, match=re.escape(fragment)) as info:
        validate_key_prefix(prefix)
    assert info.value.setting == "singleton_lock_key_prefix"
    assert "singleton_lock_key_prefix" in str(info.value)


def test_key_prefix_error_names_a_custom_setting() -> None:
    with pytest.raises(LockConfigError, match="key_prefix") as info:
        validate_key_prefix("", setting="key_prefix")
    assert info.value.setting == "key_prefix"


def test_format_key_refuses_an_invalid_prefix() -> None:
    with pytest.raises(LockConfigError):
        format_key("a b", "t", "")


# --------------------------------------------------------------------------- standalone names


def test_standalone_name_becomes_the_hash_tag() -> None:
    assert name_key("csl", "reports:daily") == "csl:{reports:daily}"


def test_standalone_name_with_its_own_hash_tag_is_kept() -> None:
    assert name_key("csl", "user:{42}:sync") == "csl:user:{42}:sync"


def test_standalone_name_with_empty_braces_is_wrapped() -> None:
    # "{}" is no hash tag to Redis, so the name is wrapped to keep derived keys in one slot.
    assert name_key("csl", "a{}{b}") == "csl:{a{}{b}}"


@pytest.mark.parametrize("name", ["", None, 42, "}x"])
def test_invalid_standalone_name_raises_naming_the_setting(name: Any) -> None:
    with pytest.raises(LockConfigError) as info:
        name_key("csl", name)
    assert info.value.setting == "name"
