"""Lock keys: canonical argument encoding, digest and the frozen key format.

Pure functions, no I/O: everything here is testable without Redis.

A task's lock key is derived in two places that must agree: in the caller at enqueue time (from
the caller's Python values) and in the worker (from the values Celery deserialised out of the
message). With the default JSON serializer the worker sees what ``kombu.utils.json`` gives back,
so the encoding is built to be invariant under that round trip:

* a tuple encodes exactly like a list, because JSON turns every tuple into a list;
* ``datetime``, ``date``, ``time``, ``Decimal``, ``UUID`` and ``bytes`` come back from kombu as
  the same types, so they get tagged encodings (``{"$uuid":"..."}``) that differ from a plain
  string with the same text;
* equal values of different spelling encode the same: ``1`` and ``1.0`` (the same dict key to
  Python), ``Decimal("1.0")`` and ``Decimal("1.00")``, one instant in two timezones (aware
  datetimes are normalised to UTC; naive ones stay naive and distinct from aware ones);
* ``True`` and ``1`` do not collide, nor do ``[1, 2]`` and ``{1, 2}``, nor ``"1"`` and ``1``.

The encoding is JSON text with sorted keys and compact separators. Tags are one-key objects
whose key starts with a single ``$``; a user's dict key starting with ``$`` gets one more ``$``
in front, so no user dict ever encodes like a tag. Any other type raises ``LockKeyError`` naming
the argument (with its path inside nested values) and its type, never its ``repr()``, whose
output can hold memory addresses.

The key format (frozen, pinned by golden tests: changing it would split the locks of an old and
a new release running side by side)::

    {prefix}:{shown_name}:{{{digest}}}

``digest`` is the SHA-256 hex digest of ``task_name + "\\n" + payload``. It covers the *full*
task name, so cutting the shown name to 128 characters never merges two tasks. ``shown_name``
is the task name made safe for reading (characters outside ``[A-Za-z0-9_.:-]`` become ``_``).
The braces are the Redis Cluster hash tag: every key derived from a lock key by appending a
suffix (``key + ":fence"``) lands in the same cluster slot. With a valid prefix (at most 32
ASCII characters) a key is at most 228 bytes, under the 250 that some tools expect.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import inspect
import json
import math
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from .errors import LockConfigError, LockKeyError

__all__ = [
    "encode_value",
    "bind_arguments",
    "validate_lock_key_option",
    "validate_key_prefix",
    "lock_payload",
    "format_key",
    "lock_key_for",
    "name_key",
]

#: Longest accepted key prefix, in characters (ASCII only, so also in bytes).
MAX_PREFIX_LENGTH = 32
#: The task name shown in a key is cut to this many characters.
MAX_SHOWN_NAME_LENGTH = 128
#: Deepest nesting of containers accepted in an argument.
MAX_DEPTH = 100

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.:\-]")
_DAY_US = 86_400_000_000
_EPOCH = datetime(1970, 1, 1)
_SUPPORTED = (
    "None, bool, int, finite float, str, list, tuple, dict with str keys, set, frozenset, "
    "UUID, datetime, date, time, Decimal, bytes"
)


# --------------------------------------------------------------------------- encoding


def encode_value(value: Any, argument: str = "<value>", *, task_name: str | None = None) -> str:
    """Return the canonical text of ``value``; equal values give equal text.

    ``argument`` and ``task_name`` only serve the ``LockKeyError`` message raised for a value
    (or a value nested inside it) that has no stable encoding.
    """
    return _Encoder(task_name).encode(value, argument, 0)


def _encode_arguments(arguments: Mapping[str, Any], task_name: str | None) -> str:
    """Encode bound arguments like a dict, naming each value's path after its argument."""
    encoder = _Encoder(task_name)
    return encoder.encode_items(arguments, lambda name: name, "<arguments>", 0)


class _Encoder:
    """One encoding pass; tracks the containers on the current path to catch cycles."""

    def __init__(self, task_name: str | None) -> None:
        self.task_name = task_name
        self.open: set[int] = set()

    def fail(self, path: str, value: Any, reason: str) -> LockKeyError:
        task = f" of task {self.task_name!r}" if self.task_name is not None else ""
        return LockKeyError(
            f"Cannot build the lock key{task}: argument {path} {reason}. Choose other "
            f"arguments with lock_key=[...] or give lock_key a callable.",
            argument=path,
            value_type=type(value),
            task_name=self.task_name,
        )

    def encode(self, value: Any, path: str, depth: int) -> str:
        # bool before int: bool is an int subclass, and True must not encode like 1.
        if value is None:
            return "null"
        if value is True:
            return "true"
        if value is False:
            return "false"
        if isinstance(value, int):
            return _int_text(int(value))
        if isinstance(value, float):
            if not math.isfinite(value):
                raise self.fail(path, value, f"is a non-finite float ({value})")
            # An integral float equals the int (and is the same dict key): one encoding.
            return _int_text(int(value)) if value.is_integer() else repr(float(value))
        if isinstance(value, str):
            return _str_text(value)
        if isinstance(value, (list, tuple, dict, set, frozenset)):
            return self.encode_container(value, path, depth)
        if isinstance(value, datetime):  # before date: datetime is a date subclass
            return _tagged("datetime", _datetime_text(value))
        if isinstance(value, date):
            return _tagged("date", value.isoformat())
        if isinstance(value, time):
            return _tagged("time", _time_text(value))
        if isinstance(value, Decimal):
            if not value.is_finite():
                raise self.fail(path, value, f"is a non-finite Decimal ({value})")
            return _tagged("decimal", _decimal_text(value))
        if isinstance(value, uuid.UUID):
            return _tagged("uuid", str(value))
        if isinstance(value, (bytes, bytearray)):
            return _tagged("bytes", base64.b64encode(bytes(value)).decode("ascii"))
        raise self.fail(
            path,
            value,
            f"is of type {_type_name(type(value))!r}, which has no stable encoding "
            f"(supported: {_SUPPORTED})",
        )

    def encode_container(self, value: Any, path: str, depth: int) -> str:
        if depth >= MAX_DEPTH:
            raise self.fail(path, value, f"is nested deeper than {MAX_DEPTH} levels")
        if id(value) in self.open:
            raise self.fail(path, value, "contains itself")
        self.open.add(id(value))
        try:
            if isinstance(value, dict):
                return self.encode_items(value, lambda key: f"{path}[{key!r}]", path, depth + 1)
            if isinstance(value, (set, frozenset)):
                member_path = f"{path}[<set member>]"
                members = sorted(self.encode(m, member_path, depth + 1) for m in value)
                return _tagged_raw("set", "[" + ",".join(members) + "]")
            items = (self.encode(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))
            return "[" + ",".join(items) + "]"
        finally:
            self.open.discard(id(value))

    def encode_items(
        self, mapping: Mapping[Any, Any], child_path: Callable[[str], str], path: str, depth: int
    ) -> str:
        for key in mapping:
            if not isinstance(key, str):
                raise self.fail(
                    path,
                    key,
                    f"has a key of type {_type_name(type(key))!r}; only str keys are supported",
                )
        parts = [
            _str_text(_escape_key(key)) + ":" + self.encode(mapping[key], child_path(key), depth)
            for key in sorted(mapping)
        ]
        return "{" + ",".join(parts) + "}"


def _tagged(tag: str, text: str) -> str:
    return _tagged_raw(tag, _str_text(text))


def _tagged_raw(tag: str, encoded: str) -> str:
    return '{"$' + tag + '":' + encoded + "}"


def _escape_key(key: str) -> str:
    # Tags are single-"$" keys; a user key starting with "$" gets one more, so never collides.
    return "$" + key if key.startswith("$") else key


def _str_text(text: str) -> str:
    # ASCII-only JSON string: lone surrogates and every code point have one 7-bit spelling.
    return json.dumps(text, ensure_ascii=True)


_INT_STR_LIMIT = 10**600


def _int_text(number: int) -> str:
    """Decimal digits of ``number``, also past Python's int-to-str digit limit."""
    if -_INT_STR_LIMIT < number < _INT_STR_LIMIT:
        return str(number)
    sign, number = ("-", -number) if number < 0 else ("", number)
    chunks: list[str] = []
    while number:
        number, chunk = divmod(number, 10**500)
        chunks.append(str(chunk))
    head, *tail = reversed(chunks)
    return sign + head + "".join(c.zfill(500) for c in tail)


def _decimal_text(value: Decimal) -> str:
    # Strip trailing zeros by hand: Decimal.normalize() would round to the context precision.
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite, checked by the caller
    kept = list(digits)
    while len(kept) > 1 and kept[-1] == 0:
        kept.pop()
        exponent += 1
    if kept == [0]:
        return "0"  # also -0 and 0E+5: all equal to 0
    return str(Decimal((value.is_signed(), tuple(kept), exponent)))


def _datetime_text(value: datetime) -> str:
    offset = value.utcoffset()
    naive = value.replace(tzinfo=None)
    if offset is None:
        return naive.isoformat(timespec="microseconds")
    try:
        return (naive - offset).isoformat(timespec="microseconds") + "Z"
    except OverflowError:
        # The UTC instant falls outside year 1..9999: count microseconds from the epoch.
        return f"{(naive - _EPOCH - offset) // timedelta(microseconds=1)}usZ"


def _time_text(value: time) -> str:
    offset = value.utcoffset()
    naive = value.replace(tzinfo=None)
    if offset is None:
        return naive.isoformat(timespec="microseconds")
    # Aware times compare after subtracting their offset, without wrapping at midnight.
    micros = (
        (value.hour * 3600 + value.minute * 60 + value.second) * 1_000_000
        + value.microsecond
        - offset // timedelta(microseconds=1)
    )
    days, micros = divmod(micros, _DAY_US)
    seconds, micro = divmod(micros, 1_000_000)
    text = time(seconds // 3600, seconds // 60 % 60, seconds % 60, micro).isoformat(
        timespec="microseconds"
    )
    return text + "Z" + (f"{days:+d}d" if days else "")


def _type_name(cls: type) -> str:
    module = getattr(cls, "__module__", None)
    name = str(getattr(cls, "__qualname__", None) or getattr(cls, "__name__", "?"))
    return name if module in (None, "builtins") else f"{module}.{name}"


# --------------------------------------------------------------------------- arguments


def bind_arguments(
    signature: inspect.Signature | None,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    task_name: str,
) -> dict[str, Any]:
    """Bind ``args`` and ``kwargs`` to ``signature`` with defaults applied, by parameter name.

    ``f(1, b=2)``, ``f(1, 2)`` and ``f(a=1, b=2)`` give one dict. ``*args`` appear as a list under
    their parameter name, ``**kwargs`` as a dict under theirs.

    ``signature`` is the signature of the callable the message's arguments are passed to, as
    Celery exposes it: ``inspect.signature(task.run)``. For a bound task (``bind=True``),
    ``task.run`` is a bound method, so its signature already leaves out ``self``; nothing is
    skipped here. With ``signature=None`` (unreadable) the result is
    ``{"args": [...], "kwargs": {...}}``.
    """
    if signature is None:
        return {"args": list(args), "kwargs": dict(kwargs)}
    plain = _plain_parameters(signature)
    if plain is not None and len(args) <= len(plain[0]):
        # Only ordinary parameters: bind by hand (inspect's bind costs more than the rest of
        # the key); anything unusual (a missing or repeated argument) goes to inspect below.
        names, defaults = plain
        quick = dict(zip(names, args, strict=False))
        for name in names[len(args):]:
            if name in kwargs:
                quick[name] = kwargs[name]
            elif name in defaults:
                quick[name] = defaults[name]
        if len(quick) == len(names) and len(args) + len(kwargs) <= len(names) and all(
                name in quick and name not in names[:len(args)] for name in kwargs):
            return quick
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise LockKeyError(
            # Not the signature's text: its defaults' repr() can hold memory addresses.
            f"Cannot build the lock key of task {task_name!r}: its arguments do not match "
            f"its signature: {exc}",
            task_name=task_name,
        ) from None
    bound.apply_defaults()
    result: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            result[name] = list(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            result[name] = dict(value)
        else:
            result[name] = value
    return result


_Plain = tuple[tuple[str, ...], dict[str, Any]]
#: id(signature) -> (signature, its plain parameters); the signature is kept so the id stays its.
_plain_cache: dict[int, tuple[inspect.Signature, _Plain | None]] = {}


def _plain_parameters(signature: inspect.Signature) -> _Plain | None:
    """``(names, defaults)`` when every parameter is an ordinary one (positional or keyword).

    Cached by identity: a signature's defaults need not be hashable.
    """
    cached = _plain_cache.get(id(signature))
    if cached is not None and cached[0] is signature:
        return cached[1]
    params = list(signature.parameters.values())
    plain: _Plain | None = None
    if all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
        plain = (tuple(p.name for p in params),
                 {p.name: p.default for p in params if p.default is not inspect.Parameter.empty})
    if len(_plain_cache) > 1024:
        _plain_cache.clear()
    _plain_cache[id(signature)] = (signature, plain)
    return plain


# --------------------------------------------------------------------------- validation


def validate_lock_key_option(
    option: Any, signature: inspect.Signature | None, *, task_name: str
) -> None:
    """Check a task's ``lock_key`` option; raise ``LockConfigError(setting="lock_key")`` if bad.

    Accepted: ``None`` (all arguments), a list or tuple of argument names of the task (``[]``:
    the task name alone) or a callable taking the task's arguments and returning a str.
    """
    if option is None or callable(option):
        return
    if isinstance(option, str):
        raise LockConfigError(
            f"lock_key of task {task_name!r} must be None, a list of argument names or a "
            f"callable, not a str; did you mean lock_key=[{option!r}]?",
            setting="lock_key",
            task_name=task_name,
        )
    if not isinstance(option, (list, tuple)):
        raise LockConfigError(
            f"lock_key of task {task_name!r} must be None, a list of argument names or a "
            f"callable, not {_type_name(type(option))!r}",
            setting="lock_key",
            task_name=task_name,
        )
    bad = [name for name in option if not isinstance(name, str) or not name]
    if bad:
        kinds = ", ".join(sorted({_type_name(type(n)) for n in bad}))
        raise LockConfigError(
            f"lock_key of task {task_name!r} must list argument names as non-empty str; "
            f"got values of type {kinds}",
            setting="lock_key",
            task_name=task_name,
        )
    _check_names(option, signature, task_name)


def _check_names(names: Sequence[str], signature: inspect.Signature | None, task_name: str) -> None:
    if not names:
        return
    if signature is None:
        raise LockConfigError(
            f"lock_key of task {task_name!r} names arguments ({', '.join(names)}) but the "
            f"task's signature cannot be read; give lock_key a callable instead",
            setting="lock_key",
            task_name=task_name,
        )
    unknown = [name for name in names if name not in signature.parameters]
    if unknown:
        known = ", ".join(signature.parameters) or "(none)"
        raise LockConfigError(
            f"lock_key of task {task_name!r} names unknown arguments: {', '.join(unknown)}; "
            f"the task's arguments are: {known}",
            setting="lock_key",
            task_name=task_name,
        )


def validate_key_prefix(prefix: Any, setting: str = "singleton_lock_key_prefix") -> str:
    """Return ``prefix`` if it is a valid key prefix, else raise ``LockConfigError``.

    Valid: a non-empty str of at most 32 printable ASCII characters without whitespace, ``{``
    or ``}`` (braces would move the Redis Cluster hash tag). ASCII keeps every key under
    250 bytes.
    """
    if not isinstance(prefix, str):
        raise LockConfigError(
            f"{setting} must be a str, not {_type_name(type(prefix))!r}", setting=setting
        )
    problem = None
    if not prefix:
        problem = "must not be empty"
    elif len(prefix) > MAX_PREFIX_LENGTH:
        problem = f"must be at most {MAX_PREFIX_LENGTH} characters, not {len(prefix)}"
    elif not (prefix.isascii() and prefix.isprintable()) or " " in prefix:
        problem = "must be printable ASCII without whitespace"
    elif "{" in prefix or "}" in prefix:
        problem = "must not contain '{' or '}'"
    if problem:
        raise LockConfigError(f"{setting} {problem}: {prefix!r}", setting=setting)
    return prefix


# --------------------------------------------------------------------------- keys


def lock_payload(
    option: Any,
    signature: inspect.Signature | None,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    task_name: str,
) -> str:
    """Return the canonical text hashed into a task's lock key, as chosen by ``lock_key``.

    ``None``: all bound arguments. A list: only the named ones (their order in the list does not
    matter). ``[]``: the empty string, one lock per task. A callable: its result, used as is.
    """
    if option is None:
        return _encode_arguments(
            bind_arguments(signature, args, kwargs, task_name=task_name), task_name
        )
    if callable(option):
        result = option(*args, **kwargs)
        if not isinstance(result, str):
            raise LockKeyError(
                f"lock_key of task {task_name!r} is a callable that returned "
                f"{_type_name(type(result))!r}; it must return a str",
                argument="lock_key",
                value_type=type(result),
                task_name=task_name,
            )
        return str(result)
    validate_lock_key_option(option, signature, task_name=task_name)
    if not option:
        return ""
    bound = bind_arguments(signature, args, kwargs, task_name=task_name)
    return _encode_arguments({name: bound[name] for name in option}, task_name)


def format_key(prefix: str, task_name: str, payload: str) -> str:
    """Return the Redis key ``{prefix}:{shown_name}:{{{digest}}}`` (format frozen)."""
    text = task_name + "\n" + payload
    # surrogatepass: a payload from a user callable may hold lone surrogates.
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{_key_head(prefix, task_name)}:{{{digest}}}"


@functools.lru_cache(maxsize=1024)
def _key_head(prefix: str, task_name: str) -> str:
    """``{prefix}:{shown_name}``, validated (cached: a worker keys a few tasks many times)."""
    validate_key_prefix(prefix)
    return f"{prefix}:{_UNSAFE_NAME_CHARS.sub('_', task_name)[:MAX_SHOWN_NAME_LENGTH]}"


def lock_key_for(
    prefix: str,
    task_name: str,
    signature: inspect.Signature | None,
    option: Any,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
) -> str:
    """Return the full Redis key of the lock of one call of a task."""
    payload = lock_payload(option, signature, args, kwargs, task_name=task_name)
    return format_key(prefix, task_name, payload)


def name_key(prefix: str, name: str) -> str:
    """Return the Redis key of a standalone lock named ``name`` (``Redlock("reports:daily")``).

    The name becomes the hash tag (``csl:{reports:daily}``) unless it already holds one, in
    which case it is kept as is (``csl:user:{42}:report``).
    """
    validate_key_prefix(prefix)
    if not isinstance(name, str) or not name:
        shown = "an empty str" if isinstance(name, str) else repr(_type_name(type(name)))
        raise LockConfigError(f"A lock name must be a non-empty str, not {shown}", setting="name")
    if _has_hash_tag(name):
        return f"{prefix}:{name}"
    if name.startswith("}"):
        # "{" + name would open with an empty tag, which Redis ignores (no shared slot).
        raise LockConfigError(
            f"A lock name must not start with '}}' unless it holds a {{...}} hash tag: {name!r}",
            setting="name",
        )
    return f"{prefix}:{{{name}}}"


def _has_hash_tag(text: str) -> bool:
    """Whether Redis Cluster hashes ``text`` by a tag: the first "{", the next "}", not empty."""
    start = text.find("{")
    return start >= 0 and text.find("}", start + 1) > start + 1


# -- keys beside a lock (its store keeps them next to the lock key, in its hash slot) --------

def channel_for(key: str) -> str:
    """The pub/sub channel on which a release of ``key`` is announced to waiters (a slot's
    release is announced on its lock's channel)."""
    return f"{slot_base(key)}:released"


def fence_key_for(key: str) -> str:
    """The fencing counter of ``key``; it shares the key's hash tag, so one cluster slot. The
    slots of one lock share the lock's counter."""
    return f"{slot_base(key)}:fence"


def follow_key_for(key: str) -> str:
    """Where the task id of ``key``'s one follow-up (``coalesce``) is kept (same hash tag)."""
    return f"{key}:next"


_SLOT_SUFFIX = re.compile(r"(?<=\}):slot:\d+$")


def slot_key(key: str, index: int) -> str:
    """Slot ``index`` of a lock that several holders may hold at once (``lock_limit``)."""
    return f"{key}:slot:{index}"


def slot_base(key: str) -> str:
    """The lock a slot key belongs to (``key`` itself when it is not a slot key)."""
    return _SLOT_SUFFIX.sub("", key) if key[-1:].isdigit() else key


@functools.lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """A regular expression matching what the glob ``pattern`` matches, with Redis's ``MATCH``
    syntax: ``*``, ``?``, ``[abc]``, ``[^a-z]``, and ``\\`` escaping the next character."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j, negate = i + 1, False
            if j < n and pattern[j] == "^":
                negate, j = True, j + 1
            items: list[str] = []
            while j < n and pattern[j] != "]":
                if pattern[j] == "\\" and j + 1 < n:
                    items.append(re.escape(pattern[j + 1]))
                    j += 2
                elif j + 2 < n and pattern[j + 1] == "-" and pattern[j + 2] != "]":
                    low, high = sorted((pattern[j], pattern[j + 2]))
                    items.append(f"{re.escape(low)}-{re.escape(high)}")
                    j += 3
                else:
                    items.append(re.escape(pattern[j]))
                    j += 1
            if items:
                out.append(f"[{'^' if negate else ''}{''.join(items)}]")
            else:
                out.append("." if negate else "(?!)")
            i = j + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)
