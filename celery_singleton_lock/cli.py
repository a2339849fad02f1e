"""``celery locks``: list, show, release and purge the locks in the lock store.

Installed through Celery's ``celery.commands`` entry point, so with the app given by ``-A``::

    celery -A proj locks list [--task NAME] [--json]
    celery -A proj locks show KEY [--json]
    celery -A proj locks release KEY [--force] [--yes] [--timeout SECONDS]
    celery -A proj locks purge [--task NAME] --yes
    celery -A proj locks key TASK [ARGS_JSON] [KWARGS_JSON] [--json]

The lock store is the app's ``singleton_lock_url`` (else its Redis broker) and the keys are
under ``singleton_lock_key_prefix``. Reading uses ``SCAN`` only (see
:mod:`celery_singleton_lock.inventory`); with Redlock every master is read and ``masters`` says
on how many the lock stands.

``release`` refuses, unless ``--force``, a lock whose holder is alive. Alive means: a worker
reports the holder task as active, reserved or scheduled (``inspect query_task``, broadcast to
every worker), or the lock names a worker (``name@host``) that does not answer within
``--timeout`` (a busy solo-pool worker does not answer while it runs the holder, so silence
proves nothing). A lock without a holder task (a standalone ``Redlock``) cannot be checked
and needs ``--force``. A task still waiting in the broker queue (enqueue-time locks) is not
seen by any worker: the ``mode`` column tells such locks apart. Every release is a
compare-and-delete with the token read a moment before, so a lock taken again by a new holder
meanwhile is left alone.

``key`` answers "why did my task not run?": the key a call with those arguments locks, computed
by the task itself (``lock_key_for``, in the task's own lock store), and who holds it now. The
arguments are JSON as the message carries them (kombu's JSON, so ``{"__type__": "datetime",
"__value__": "..."}`` is a datetime), which gives the key the worker computes.
``until_and_while_executing`` has two locks, the enqueue lock and the execution lock
(``<key>:run``); both are shown.

Passwords in URLs never appear in the output: every message goes through ``redact_url``.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from typing import Any

import click
from celery.bin.base import CeleryCommand, CeleryOption, handle_preload_options
from celery.exceptions import CeleryCommandException
from celery.platforms import EX_UNAVAILABLE
from kombu.utils import json as kombu_json

from .errors import LockBackendError, LockConfigError, LockKeyError
from .inventory import LockRecord, list_locks, purge_locks, read_lock, release_lock
from .keys import validate_key_prefix
from .settings import register_defaults, resolve_store_url
from .backends.base import LockBackend
from .backends.registry import open_backend
from .urls import redact_url

__all__ = ["locks"]

#: Socket timeout of the command's own connections, seconds (a listing is not a hot path).
CLI_SOCKET_TIMEOUT_S = 5.0
#: Seconds ``release`` waits for workers to answer.
DEFAULT_INSPECT_TIMEOUT_S = 1.0

#: Exit code of a configuration error (sysexits' EX_CONFIG).
EX_CONFIG = 78

_COLUMNS = ("KEY", "TASK", "TASK ID", "WORKER", "PID", "MODE", "ACQUIRED AT", "TTL", "RENEWALS")


class _Context:
    """The app's lock store and key prefix, made on first use."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._store: LockBackend | None = None

    @property
    def prefix(self) -> str:
        register_defaults(self.app)
        try:
            return validate_key_prefix(self.app.conf.get("singleton_lock_key_prefix") or "csl")
        except LockConfigError as exc:
            raise _config_error(exc) from None

    @property
    def store(self) -> LockBackend:
        if self._store is None:
            register_defaults(self.app)
            try:
                url = resolve_store_url(self.app)
                timeout = max(float(self.app.conf.get("singleton_lock_socket_timeout") or 0),
                              CLI_SOCKET_TIMEOUT_S)
                self._store = open_backend(url, socket_timeout=timeout,
                                           setting="singleton_lock_url")
            except LockConfigError as exc:
                raise _config_error(exc) from None
            except LockBackendError as exc:
                raise _backend_error(exc) from None
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def _config_error(exc: Exception) -> CeleryCommandException:
    return CeleryCommandException(message=redact_url(str(exc)), exit_code=EX_CONFIG)


def _backend_error(exc: Exception) -> CeleryCommandException:
    return CeleryCommandException(
        message=f"lock store unavailable: {redact_url(str(exc))}", exit_code=EX_UNAVAILABLE
    )


def _lock_context(ctx: click.Context) -> _Context:
    state = ctx.meta.get(_META_KEY)
    if state is None:
        state = ctx.meta[_META_KEY] = _Context(ctx.obj.app)
        ctx.call_on_close(state.close)
    return state


_META_KEY = "celery_singleton_lock.cli"


def _echo(ctx: click.Context, text: str = "", *, err: bool = False) -> None:
    text = redact_url(text)
    if err:
        ctx.obj.error(text)
    else:
        ctx.obj.echo(text)


def _warn(ctx: click.Context, errors: list[str]) -> None:
    for error in errors:
        _echo(ctx, f"warning: a master was skipped ({error}); "
                   "lock counts on masters may be low", err=True)


# ------------------------------------------------------------------------------------------------
# Formatting


def _ttl_text(ttl_s: float | None) -> str:
    return "-" if ttl_s is None else f"{ttl_s:.1f}s"


def _acquired_text(record: LockRecord) -> str:
    iso = record.acquired_iso
    return "-" if iso is None else iso[:19] + "Z"


def _cells(record: LockRecord, redlock: bool) -> list[str]:
    cells = [
        record.key,
        record.task or "-",
        record.task_id or "-",
        record.hostname or "-",
        "-" if record.pid is None else str(record.pid),
        record.mode or "-",
        _acquired_text(record),
        _ttl_text(record.ttl_s),
        str(record.renewals),
    ]
    if redlock:
        cells.append(f"{record.masters}/{record.n_masters}")
    return cells


def format_table(records: Sequence[LockRecord], n_masters: int) -> str:
    """The ``locks list`` table: one row per lock, columns aligned."""
    redlock = n_masters > 1
    header = list(_COLUMNS) + (["MASTERS"] if redlock else [])
    rows = [header] + [_cells(r, redlock) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    noun = "lock" if len(records) == 1 else "locks"
    lines.append(f"{len(records)} {noun}")
    return "\n".join(lines)


def _show_text(record: LockRecord) -> str:
    pairs = [
        ("key", record.key),
        ("task", record.task or "-"),
        ("task id", record.task_id or "-"),
        ("worker", record.hostname or "-"),
        ("pid", "-" if record.pid is None else str(record.pid)),
        ("mode", record.mode or "-"),
        ("acquired at", record.acquired_iso or "-"),
        ("ttl left", _ttl_text(record.ttl_s)),
        ("lock ttl", _ttl_text(record.lock_ttl_s)),
        ("renewals", str(record.renewals)),
        ("fencing token", "-" if record.fence is None else str(record.fence)),
        ("masters", f"{record.masters}/{record.n_masters}"),
    ]
    width = max(len(name) for name, _ in pairs)
    lines = [f"{name.ljust(width)}  {value}" for name, value in pairs]
    if record.n_masters > 1:
        token = record.token
        lines.append("")
        for i, view in enumerate(record.views):
            if view is None:
                lines.append(f"  master {i}: not held")
            elif view.error:
                lines.append(f"  master {i} {view.name}: error: {view.error}")
            elif not view.held:
                lines.append(f"  master {i} {view.name}: not held")
            else:
                same = "" if view.token == token else " (another holder's token)"
                lines.append(f"  master {i} {view.name}: held, ttl {_ttl_text(view.ttl_s)}{same}")
    return "\n".join(lines)


def _show_json(record: LockRecord) -> dict[str, Any]:
    token = record.token
    data = record.as_json()
    data.update(
        lock_ttl=record.lock_ttl_s,
        fencing_token=record.fence,
        n_masters=record.n_masters,
        on_masters=[
            {
                "master": i,
                "name": view.name if view is not None else None,
                "held": bool(view is not None and view.held),
                "same_holder": bool(view is not None and view.held and view.token == token),
                "ttl": None if view is None or view.ttl_s is None else round(view.ttl_s, 3),
                "error": (view.error or None) if view is not None else None,
            }
            for i, view in enumerate(record.views)
        ],
    )
    return data


def _dump(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False)


# ------------------------------------------------------------------------------------------------
# Liveness of a holder


def holder_alive(app: Any, record: LockRecord, timeout_s: float) -> str | None:
    """Why ``record``'s holder counts as alive, or None if it is not (see the module doc)."""
    if not record.task_id:
        return "it has no holder task to check (a standalone lock)"
    replies = app.control.inspect(timeout=timeout_s).query_task(record.task_id) or {}
    for worker, found in sorted(replies.items()):
        info = (found or {}).get(record.task_id)
        if info:
            state = info[0] if isinstance(info, (list, tuple)) and info else "known"
            return f"its holder task {record.task_id} is {state} on worker {worker}"
    if "@" in record.hostname and record.hostname not in replies:
        return (f"its worker {record.hostname} did not answer within {timeout_s:g}s "
                "(it may be busy running the holder)")
    return None


# ------------------------------------------------------------------------------------------------
# Commands


@click.group(name="locks")
@click.pass_context
@handle_preload_options
def locks(ctx: click.Context) -> None:
    """See and clear celery-singleton-lock locks in the lock store."""


@locks.command(name="list", cls=CeleryCommand)
@click.option("--task", "task", cls=CeleryOption, default=None, metavar="NAME",
              help_group="Listing Options", help="Only the locks of this task.")
@click.option("--json", "as_json", cls=CeleryOption, is_flag=True,
              help_group="Listing Options", help="Print a JSON list instead of a table.")
@click.pass_context
def list_(ctx: click.Context, task: str | None, as_json: bool) -> None:
    """List the locks held: key, task, holder, worker, ttl left, renewals."""
    state = _lock_context(ctx)
    errors: list[str] = []
    try:
        records = list_locks(state.store, state.prefix, task, errors=errors)
    except LockBackendError as exc:
        raise _backend_error(exc) from None
    _warn(ctx, errors)
    if as_json:
        _echo(ctx, _dump([r.as_json() for r in records]))
    else:
        _echo(ctx, format_table(records, state.store.n_masters))


@locks.command(cls=CeleryCommand)
@click.argument("key")
@click.option("--json", "as_json", cls=CeleryOption, is_flag=True,
              help_group="Output Options", help="Print JSON instead of text.")
@click.pass_context
def show(ctx: click.Context, key: str, as_json: bool) -> None:
    """Show one lock, and for Redlock each master's copy."""
    state = _lock_context(ctx)
    record = _read(state, key)
    _echo(ctx, _dump(_show_json(record)) if as_json else _show_text(record))


def _read(state: _Context, key: str) -> LockRecord:
    try:
        record = read_lock(state.store, key)
    except LockBackendError as exc:
        raise _backend_error(exc) from None
    if record is None:
        raise click.ClickException(f"no lock {key} in the lock store")
    return record


@locks.command(cls=CeleryCommand)
@click.argument("key")
@click.option("--force", cls=CeleryOption, is_flag=True, help_group="Release Options",
              help="Release even if the holder is alive.")
@click.option("--yes", "-y", "yes", cls=CeleryOption, is_flag=True,
              help_group="Release Options", help="Do not ask for confirmation.")
@click.option("--timeout", cls=CeleryOption, type=float, default=DEFAULT_INSPECT_TIMEOUT_S,
              show_default=True, help_group="Release Options",
              help="Seconds to wait for workers to answer about the holder.")
@click.pass_context
def release(ctx: click.Context, key: str, force: bool, yes: bool, timeout: float) -> None:
    """Release a lock whose holder is gone (compare-and-delete on every master)."""
    state = _lock_context(ctx)
    record = _read(state, key)
    if not force:
        try:
            alive = holder_alive(ctx.obj.app, record, timeout)
        except Exception as exc:
            raise CeleryCommandException(
                message=f"cannot ask the workers about the holder of {key}: "
                        f"{redact_url(str(exc))}; use --force to release anyway",
                exit_code=EX_UNAVAILABLE,
            ) from None
        if alive:
            raise click.ClickException(
                f"not releasing {key}: {alive}. Use --force to release it anyway."
            )
    if not yes:
        click.confirm(
            f"Release lock {key} held by task {record.task_id or '-'} "
            f"({record.task or 'standalone lock'}) on {record.hostname or '-'}?",
            abort=True,
        )
    try:
        deleted = release_lock(state.store, record)
    except LockBackendError as exc:
        raise _backend_error(exc) from None
    if deleted == 0:
        raise click.ClickException(
            f"lock {key} changed since it was read (released, expired or taken again); "
            "nothing released"
        )
    _echo(ctx, f"released {key} on {deleted}/{state.store.n_masters} "
               f"master{'s' if state.store.n_masters > 1 else ''}")


@locks.command(cls=CeleryCommand)
@click.option("--task", "task", cls=CeleryOption, default=None, metavar="NAME",
              help_group="Purge Options", help="Only the locks of this task.")
@click.option("--yes", "-y", "yes", cls=CeleryOption, is_flag=True,
              help_group="Purge Options", help="Required: confirms deleting the locks.")
@click.pass_context
def purge(ctx: click.Context, task: str | None, yes: bool) -> None:
    """Release every lock (or every lock of --task), whatever their holders. Needs --yes."""
    if not yes:
        what = f"every lock of task {task}" if task else "every lock"
        raise click.UsageError(
            f"purge releases {what}, even those whose tasks still run; pass --yes to confirm"
        )
    state = _lock_context(ctx)
    errors: list[str] = []
    try:
        seen, deleted = purge_locks(state.store, state.prefix, task, errors=errors)
    except LockBackendError as exc:
        raise _backend_error(exc) from None
    _warn(ctx, errors)
    scope = f" of task {task}" if task else ""
    _echo(ctx, f"purged {deleted} of {seen} lock{'s' if seen != 1 else ''}{scope}")


# ------------------------------------------------------------------------------------------------
# locks key: the key a call would lock, and its holder

#: Per lock mode, the locks one call takes: (role, suffix added to the key, when it is held).
_MODE_LOCKS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "while_executing": (
        ("lock", "", "taken by the worker just before the body runs, released when it ends"),),
    "until_executing": (
        ("lock", "", "taken at enqueue, released when a worker starts the task"),),
    "until_executed": (
        ("lock", "", "taken at enqueue, released when the task ends for good"),),
    "until_and_while_executing": (
        ("enqueue", "", "taken at enqueue, released when a worker starts the task"),
        ("execution", ":run", "taken when a worker starts the task, released when it ends"),
    ),
    "until_expired": (
        ("lock", "", "taken at enqueue, never released: it lapses lock_ttl after it was taken"),),
}


def _json_argument(text: str, name: str, kind: type, kind_name: str) -> Any:
    try:
        value = kombu_json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON ({exc}): {text!r}", param_hint=name) from None
    if not isinstance(value, kind):
        raise click.BadParameter(
            f"must be a JSON {kind_name}, not {type(value).__name__}: {text!r}", param_hint=name
        )
    return value


def _find_task(app: Any, name: str) -> Any:
    """The registered task ``name`` (after importing the app's task modules), or a usage error."""
    try:
        app.loader.import_default_modules()
    except Exception as exc:
        raise click.ClickException(
            f"cannot import the task modules of app {app.main!r}: {redact_url(str(exc))}"
        ) from None
    task = app.tasks.get(name)
    if task is None:
        known = sorted(n for n in app.tasks if not n.startswith("celery."))
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise click.BadParameter(f"no task {name!r} in app {app.main!r}{hint}",
                                 param_hint="TASK")
    from .task import LockedTask

    if not isinstance(task, LockedTask):
        raise click.BadParameter(f"task {name!r} is not a LockedTask: it takes no lock",
                                 param_hint="TASK")
    return task


def _holder_text(record: LockRecord | None, quorum: int) -> str:
    if record is None:
        return "none: the lock is free"
    if record.task_id:
        who = f"task {record.task_id}"
        pid = "-" if record.pid is None else str(record.pid)
        where = (f" on worker {record.hostname} (pid {pid})" if record.hostname
                 else ", queued (no worker has taken it yet)")
    else:
        who, where = "a holder with no task id (a standalone lock)", ""
    text = f"{who}{where}, {_ttl_text(record.ttl_s)} left"
    if record.n_masters > 1:
        text += f", on {record.masters}/{record.n_masters} masters"
        if record.masters < quorum:
            text += " (fewer than a quorum: not held, a partial acquisition that will lapse)"
    if record.acquired_iso is not None:
        text += f"; acquired {_acquired_text(record)}"
    return text


@locks.command(cls=CeleryCommand)
@click.argument("task_name", metavar="TASK")
@click.argument("args_json", metavar="[ARGS_JSON]", default="[]", required=False)
@click.argument("kwargs_json", metavar="[KWARGS_JSON]", default="{}", required=False)
@click.option("--json", "as_json", cls=CeleryOption, is_flag=True,
              help_group="Output Options", help="Print JSON instead of text.")
@click.pass_context
def key(ctx: click.Context, task_name: str, args_json: str, kwargs_json: str,
        as_json: bool) -> None:
    """The key a call of TASK with these arguments would lock, and who holds it now.

    ARGS_JSON is a JSON list of positional arguments, KWARGS_JSON a JSON object of keyword
    arguments, as the task message carries them.
    """
    args = _json_argument(args_json, "ARGS_JSON", list, "list")
    kwargs = _json_argument(kwargs_json, "KWARGS_JSON", dict, "object")
    app = ctx.obj.app
    task = _find_task(app, task_name)
    try:
        mode = task.lock_options.mode
        base = task.lock_key_for(*args, **kwargs)
        store = task.lock_store
    except LockConfigError as exc:
        raise _config_error(exc) from None
    except LockKeyError as exc:
        raise click.BadParameter(str(exc), param_hint=["ARGS_JSON", "KWARGS_JSON"]) from None
    except LockBackendError as exc:
        raise _backend_error(exc) from None
    plan = _MODE_LOCKS.get(mode, (("lock", "", ""),))
    limit = task.lock_options.limit
    if limit > 1:  # lock_limit: a lock per holder, one slot key each
        plan = tuple((f"slot {i}", f":slot:{i}", f"one of {limit} that may be held at once")
                     for i in range(limit))
    found = []
    for role, suffix, when in plan:
        lock_key = base + suffix
        try:
            record = read_lock(store, lock_key)
        except LockBackendError as exc:
            raise _backend_error(exc) from None
        held = record is not None and record.masters >= store.quorum
        found.append((role, lock_key, when, record, held))
    if as_json:
        _echo(ctx, _dump({
            "task": task.name,
            "mode": mode,
            "locks": [
                {"role": role, "key": lock_key, "held": held,
                 "holder": record.as_json() if record is not None else None}
                for role, lock_key, _when, record, held in found
            ],
        }))
        return
    lines = [f"task  {task.name} (lock_mode {mode})"]
    for role, lock_key, when, record, _held in found:
        title = "lock" if role == "lock" else f"{role} lock"
        lines.append(f"{title}{f' ({when})' if when else ''}")
        lines.append(f"  key     {lock_key}")
        lines.append(f"  holder  {_holder_text(record, store.quorum)}")
    _echo(ctx, "\n".join(lines))
