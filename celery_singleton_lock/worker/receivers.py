"""Signal wiring in the worker: the main process's supervisor and the endings only it sees.

Connected once, when ``LockedTask`` is first bound to an app.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from celery import signals as celery_signals
from celery.exceptions import TimeLimitExceeded, WorkerLostError

from .. import signals
from ..lease import Lease
from ..backends.base import LockBackend
from .supervisor import current_supervisor, start_supervisor, stop_supervisor

__all__ = ["install", "check_store", "hide_lock_url_password", "release_enqueue_lock"]

logger = logging.getLogger("celery_singleton_lock.hooks")

_installed = False
_app: Any = None


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    celery_signals.worker_init.connect(_on_worker_init, weak=False)
    celery_signals.worker_process_init.connect(_on_child_init, weak=False)
    celery_signals.task_revoked.connect(_on_revoked, weak=False)
    celery_signals.task_failure.connect(_on_failure, weak=False)
    celery_signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)
    celery_signals.celeryd_after_setup.connect(_on_worker_setup, weak=False)
    from .control import install as install_control

    install_control()


def _task(name: str) -> Any:
    if _app is None:
        return None
    return _app.tasks.get(name)


def _store_for(task_name: str) -> LockBackend | None:
    task = _task(task_name)
    store = getattr(task, "lock_store", None)
    return store if isinstance(store, LockBackend) else None


def _main_lost(lease: Lease, msg: dict[str, Any]) -> None:
    task = _task(msg.get("task", ""))
    logger.warning("task %s[%s] lost its lock %s: %s", msg.get("task"), msg.get("task_id"),
                   lease.key, lease.lost_reason)
    signals.lock_lost.send(sender=task, lock_key=lease.key, task_id=msg.get("task_id"),
                           reason=lease.lost_reason)
    if msg.get("on_lost") == "abort":
        try:
            os.kill(int(msg["pid"]), signal.SIGUSR2)
        except (ProcessLookupError, KeyError, ValueError):
            pass


def _main_released(lease: Lease, msg: dict[str, Any], reason: str) -> None:
    logger.info("released lock %s of %s[%s] in the worker main process: %s", lease.key,
                msg.get("task"), msg.get("task_id"), reason)
    signals.lock_released.send(sender=_task(msg.get("task", "")), lock_key=lease.key,
                               task_id=msg.get("task_id"), reason=reason)


def _on_worker_init(sender: Any = None, **kwargs: Any) -> None:
    global _app
    _app = getattr(sender, "app", None)
    if _app is not None:
        hide_lock_url_password(_app)
    try:
        start_supervisor(_store_for, _main_lost, _main_released, _pool_size(sender))
    except OSError:
        logger.exception("cannot start the lock supervisor; children will renew their own locks")


def _pool_size(worker: Any) -> int:
    """The most pool children ``worker`` can have (``--concurrency``, ``--autoscale`` max)."""
    sizes = [0]
    concurrency = getattr(worker, "concurrency", None)
    if isinstance(concurrency, int):
        sizes.append(concurrency)
    else:  # "auto", resolved after worker_init: at most one child per CPU
        sizes.append(os.cpu_count() or 1)
    autoscale = (getattr(worker, "options", None) or {}).get("autoscale")
    if isinstance(autoscale, str):
        autoscale = autoscale.partition(",")[0]
    elif isinstance(autoscale, (list, tuple)) and autoscale:
        autoscale = autoscale[0]
    try:
        sizes.append(int(autoscale or 0))
    except (TypeError, ValueError):
        pass
    return max(sizes)


def hide_lock_url_password(app: Any) -> None:
    """Keep ``singleton_lock_url`` as its parsed, self-redacting form in the worker.

    A :class:`~celery_singleton_lock.urls.StoreURL` is not a string: Celery prints its repr,
    which is redacted, and every reader of the setting accepts it. The setting is replaced under
    the name it was given: ``singleton_lock_url``, or a namespaced form such as Django's
    ``CELERY_SINGLETON_LOCK_URL`` (setting the lowercase name would add a second entry and leave
    the first one in clear). ``celery inspect conf`` also redacts every other URL
    (:mod:`celery_singleton_lock.worker.control`).
    """
    from ..urls import StoreURL, parse_store_url

    conf = app.conf
    names = [k for k in list(conf.keys())
             if isinstance(k, str) and k.lower().endswith("singleton_lock_url")]
    for name in names:
        value = conf.get(name)
        if value is None or isinstance(value, StoreURL):
            continue
        try:
            conf[name] = parse_store_url(value, setting=name)
        except Exception:  # a bad value is reported where it is used, naming the setting
            logger.debug("%s left as set", name, exc_info=True)


def check_store(app: Any) -> bool:
    """Ask every master of the app's lock store to answer once; log an ERROR if it cannot.

    Run when a worker starts, before it takes any task, so a store that is down (or short of
    a quorum) is seen at once rather than as tasks requeued for hours. Returns True when a
    quorum answered.
    """
    from ..errors import LockConfigError
    from ..settings import resolve_options, resolve_store_url
    from ..backends.registry import get_backend as get_store
    from ..task import requeue_span_s

    try:
        url = resolve_store_url(app)
        opts = resolve_options(None, app)  # the app's settings alone
        store = get_store(url, socket_timeout=opts.socket_timeout, fence_ttl_s=opts.fence_ttl,
                          setting="singleton_lock_url")
        answered, errors = store.ping()
    except LockConfigError as exc:
        logger.error("lock store: %s", exc)
        return False
    if answered >= store.quorum:
        logger.info("lock store %s: %d of %d masters answered", store.description, answered,
                    store.n_masters)
        return True
    if opts.on_backend_error == "requeue":
        then = (
            f"tasks are requeued (singleton_lock_on_backend_error='requeue') up to "
            f"{opts.requeue_max} times, over about "
            f"{requeue_span_s(opts.requeue_delay, opts.requeue_max) / 3600:.1f} hours, "
            f"then rejected"
        )
    elif opts.on_backend_error == "run":
        then = "tasks run without their lock (singleton_lock_on_backend_error='run')"
    else:
        then = "tasks fail (singleton_lock_on_backend_error='fail')"
    logger.error("lock store %s is unreachable: %s; until it answers, %s", store.description,
                 store.no_quorum(errors), then)
    return False


def check_pool_shares_store(app: Any, worker: Any) -> bool:
    """Log an ERROR if the app's lock store lives in one process (``memory://``) while the
    worker runs task bodies in several prefork children: each child would have a store of its
    own, so their locks would not exclude each other. Returns False in that case."""
    from ..errors import LockConfigError
    from ..settings import resolve_store_url

    pool = getattr(worker, "pool_cls", None)
    pool_name = f"{getattr(pool, '__module__', '')}.{getattr(pool, '__name__', pool)}"
    children = _pool_size(worker)
    if "prefork" not in pool_name or children <= 1:
        return True
    try:
        url = resolve_store_url(app)
    except LockConfigError:
        return True  # reported by check_store
    if not all(u.split("://", 1)[0].lower() == "memory" for u in url.urls):
        return True
    logger.error(
        "lock store %s: singleton_lock_url names an in-process store, but this worker runs "
        "tasks in up to %d prefork child processes, each with a store of its own: their locks "
        "do not exclude each other, so duplicates run at once. Use a shared store (redis://, "
        "postgresql://, ...) or a pool of one process (-P solo, -P threads)",
        url.redacted, children)
    return False


def _on_worker_setup(sender: Any = None, instance: Any = None, **kwargs: Any) -> None:
    app = getattr(instance, "app", None) or _app
    if app is None:
        return
    try:
        check_store(app)
        check_pool_shares_store(app, instance)
    except Exception:  # a check must never stop the worker from starting
        logger.exception("cannot check the lock store")


def _on_child_init(**kwargs: Any) -> None:
    from .supervisor import child_started
    from ..task import child_lock_lost_handler

    child_started()
    signal.signal(signal.SIGUSR2, child_lock_lost_handler)


def _on_revoked(request: Any = None, terminated: bool = False, **kwargs: Any) -> None:
    sup = current_supervisor()
    task_id = getattr(request, "id", None) or getattr(request, "task_id", None)
    if sup is not None and task_id:
        sup.release_task(task_id, "revoked", if_exited=True)
    try:
        release_enqueue_lock(request, kwargs.get("sender"))
    except Exception:  # never let a release error break the worker's revoke handling
        logger.exception("cannot release the enqueue lock of revoked task %s", task_id)


def release_enqueue_lock(request: Any, sender: Any) -> None:
    """A task revoked before it started still holds its enqueue-time lock: release it."""
    from ..task import TOKEN_HEADER, LockedTask

    name = getattr(request, "name", None) or getattr(request, "task", None) or ""
    task = sender if isinstance(sender, LockedTask) else _task(name)
    # until_expired: the lock is a throttle window that lapses on its own, revoked or not.
    if not isinstance(task, LockedTask) or task.lock_options.mode in ("while_executing",
                                                                      "until_expired"):
        return
    # task_revoked sends the task's Context, whose attributes are the message headers; a
    # worker Request keeps them in request_dict.
    token = getattr(request, TOKEN_HEADER, None)
    if not token:
        headers = getattr(request, "request_dict", None) or {}
        token = headers.get(TOKEN_HEADER) or (headers.get("headers") or {}).get(TOKEN_HEADER)
    if not token:
        return
    key = task.lock_key_for(*(request.args or ()), **(request.kwargs or {}))
    if task.lock_store.release(key, str(token)):
        signals.lock_released.send(sender=task, lock_key=key, task_id=request.id,
                                   reason="revoked")


def _on_failure(task_id: str | None = None, exception: BaseException | None = None,
                **kwargs: Any) -> None:
    sup = current_supervisor()
    if sup is None or not task_id:
        return
    if isinstance(exception, TimeLimitExceeded):
        sup.release_task(task_id, "time_limit", if_exited=True)
    elif isinstance(exception, WorkerLostError):
        sup.release_task(task_id, "worker_lost")


def _on_worker_shutdown(**kwargs: Any) -> None:
    stop_supervisor()
