"""``LockedTask``: a Celery base class that runs one task per lock key at a time.

The worker takes the lock just before the body runs (one round trip), renews it while the body
runs and releases it however the run ends (one round trip), so the hot path costs two lock
round trips. Duplicates are rejected (ready state ``REVOKED`` with a
:class:`DuplicateTaskError`), requeued (same task id, a countdown with backoff and jitter, a
counter header separate from ``request.retries``), made to wait for a release notification, or
coalesced (the first becomes the one follow-up that runs after the holder).
"""

from __future__ import annotations

import ctypes
import inspect
import logging
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, ClassVar

from celery import Task, states
from celery.exceptions import Ignore, Retry
from celery.signals import before_task_publish
from celery.utils import uuid

from . import events, signals
from ._process import current_pid, new_token
from .errors import DuplicateTaskError, LockBackendError, LockConfigError, LockLostError
from .keys import lock_key_for, validate_lock_key_option
from .lease import Lease
from .lock import try_acquire
from .renewer import get_renewer
from .settings import LockOptions, register_defaults, resolve_options, resolve_store_url
from .backends.base import (
    AcquireInFlight,
    AcquireResult,
    Capability,
    FixedMetadata,
    LockBackend,
)
from .backends.registry import capabilities_of
from .backends.registry import get_backend as get_store
from . import policy
from .policy import REQUEUE_BACKOFF_CAP, check_capabilities, requeue_countdown, requeue_span_s
from .worker.supervisor import current_poster

__all__ = ["LockedTask", "REQUEUE_HEADER", "TOKEN_HEADER", "execution_key", "requeue_span_s"]

logger = logging.getLogger("celery_singleton_lock.task")

#: Message header counting requeues of a duplicate (separate from ``request.retries``).
REQUEUE_HEADER = "singleton_lock_requeues"
#: Message header carrying the token of the enqueue-time lock to its worker.
TOKEN_HEADER = "singleton_lock_token"

_HOSTNAME = socket.gethostname()


def run_signature(task_cls: type) -> inspect.Signature | None:
    """The signature of the task body as callers call it (without ``self`` for bind=True)."""
    raw = inspect.getattr_static(task_cls, "run", None)
    if raw is None:
        return None
    try:
        if isinstance(raw, staticmethod):
            return inspect.signature(raw.__func__)
        sig = inspect.signature(raw)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    return sig.replace(parameters=params[1:]) if params else sig


class _Held:
    """Per-execution state, kept on the request (task objects are shared between threads)."""

    __slots__ = ("lease", "thread_id", "options", "kept", "post")

    def __init__(self, lease: Lease, options: LockOptions) -> None:
        self.lease = lease
        self.thread_id = threading.get_ident()
        self.options = options
        #: True when a retry handed the lock back to the queued message (until_executed).
        self.kept = False
        #: Where the lock is posted for the worker's main process (prefork), if it is.
        self.post: tuple[int, int] | None = None


# The lease of the task running in this pool child, for the SIGUSR2 (lock lost) handler.
_child_current: _Held | None = None


class LockedTask(Task):
    """A task that holds a distributed lock per signature while it runs (see SPEC 1-6).

    Options (class attributes or ``@app.task(...)`` keywords; None falls back to the
    ``singleton_lock_*`` setting of the same name)::

        lock_key, lock_ttl, lock_mode, lock_on_duplicate, lock_requeue_delay,
        lock_requeue_max, lock_wait_timeout, lock_queued_ttl, lock_on_backend_error,
        lock_on_lost, lock_on_enqueue_duplicate, lock_limit (no setting)
    """

    #: None: all arguments; a list of argument names; [] for the task name alone; or a callable.
    lock_key: Any = None
    #: Seconds a lock lives without renewal (renewed every ttl/3 while the body runs).
    lock_ttl: float | None = None
    #: ``while_executing`` (default), ``until_executing``, ``until_executed``,
    #: ``until_and_while_executing``, ``until_expired``.
    lock_mode: str | None = None
    #: ``reject``, ``requeue``, ``wait`` or ``coalesce``.
    lock_on_duplicate: str | None = None
    #: Base countdown of a requeued duplicate, seconds.
    lock_requeue_delay: float | None = None
    #: Requeues of one message before it is rejected.
    lock_requeue_max: int | None = None
    #: Longest a ``wait`` duplicate blocks, seconds.
    lock_wait_timeout: float | None = None
    #: Lifetime of an enqueue-time lock while its task waits in the queue, seconds.
    lock_queued_ttl: float | None = None
    #: ``requeue``, ``run`` or ``fail`` when the lock store is unreachable.
    lock_on_backend_error: str | None = None
    #: ``warn`` or ``abort`` when renewal finds the lock gone.
    lock_on_lost: str | None = None
    #: ``return_existing`` or ``raise`` for enqueue-time duplicates.
    lock_on_enqueue_duplicate: str | None = None
    #: Bodies of one key that may run at once (``while_executing``), each with its own lock
    #: (a slot key ``<key>:slot:<i>``), token and fencing token. None or 1: the plain lock.
    lock_limit: int | None = None

    _lock_cache: ClassVar[dict[str, Any]]

    # -- registration ---------------------------------------------------------------------

    @classmethod
    def on_bound(cls, app: Any) -> None:
        register_defaults(app)
        from .worker import receivers as hooks

        hooks.install()
        from .worker import bootstep

        bootstep.install(app)
        cls._lock_cache = {}
        if cls.__dict__.get("name") or cls.__dict__.get("run"):
            cls._validate_lock_options(app)

    @classmethod
    def _validate_lock_options(cls, app: Any) -> None:
        name = cls.name or cls.__name__
        try:
            opts = resolve_options(cls, app)
            if app.conf.get("singleton_lock_url") is not None:
                url = resolve_store_url(app)  # an unparseable URL fails here, naming it
                # Options the store cannot do fail here too, naming the option.
                check_capabilities(capabilities_of(url), url.redacted, opts.mode,
                                   opts.on_duplicate, opts.limit)
            validate_lock_key_option(cls.lock_key, run_signature(cls), task_name=name)
        except LockConfigError as exc:
            raise LockConfigError(f"task {name}: {exc}", setting=exc.setting,
                                  task_name=name) from None

    # -- configuration, resolved once per process ----------------------------------------

    @property
    def lock_options(self) -> LockOptions:
        cache = self._cache()
        opts = cache.get("options")
        if opts is None:
            opts = cache["options"] = resolve_options(self, self.app)
        return opts

    @property
    def lock_store(self) -> LockBackend:
        cache = self._cache()
        store = cache.get("store")
        if store is None or cache.get("pid") != current_pid():
            url = resolve_store_url(self.app)
            opts = self.lock_options
            store = get_store(url, socket_timeout=opts.socket_timeout,
                              fence_ttl_s=opts.fence_ttl, setting="singleton_lock_url")
            try:  # a URL known only now (the broker's): its store must do what opts need
                check_capabilities(store.capabilities, store.description, opts.mode,
                                   opts.on_duplicate, opts.limit)
            except LockConfigError as exc:
                raise LockConfigError(f"task {self.name}: {exc}", setting=exc.setting,
                                      task_name=self.name) from None
            cache["store"], cache["pid"] = store, current_pid()
        return store

    def _cache(self) -> dict[str, Any]:
        cache = self.__dict__.get("_lock_instance_cache")
        if cache is None:
            cache = self.__dict__["_lock_instance_cache"] = {}
        return cache

    def lock_key_for(self, *args: Any, **kwargs: Any) -> str:
        """The full Redis key of the lock these arguments take."""
        cache = self._cache()
        if "signature" not in cache:
            cache["signature"] = run_signature(type(self))
        return lock_key_for(
            self.lock_options.key_prefix, self.name, cache["signature"], self.lock_key,
            args, kwargs,
        )

    @property
    def lock(self) -> Lease | None:
        """The lock held by the running body (``.key``, ``.token``, ``.fencing_token``...)."""
        held = getattr(self.request, "_singleton_lock", None)
        return held.lease if held is not None else None

    # -- execution ------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        req = self.request
        if req.called_directly or req.id is None:
            return super().__call__(*args, **kwargs)
        opts = self.lock_options
        key = self.lock_key_for(*args, **kwargs)
        mode = opts.mode
        if mode == "until_expired":
            self._arrive_in_window(key, opts, req, args, kwargs)
            return self.run(*args, **kwargs)
        if mode in ("until_executing", "until_and_while_executing"):
            self._arrive(key, opts, req, args, kwargs)
            if mode == "until_executing":
                return self.run(*args, **kwargs)
            key = execution_key(key)
        lease = None
        if mode == "until_executed":
            lease = self._take_over(key, opts, req)
        if lease is None:
            lease = self._take(key, opts, req, args, kwargs)
        if lease is None:  # lock_on_backend_error="run"
            return self.run(*args, **kwargs)
        held = _Held(lease, opts)
        req._singleton_lock = held
        self._watch(held, req)
        reason = "failure"
        try:
            result = self.run(*args, **kwargs)
            reason = "success"
            return result
        except Retry:
            reason = "retry"
            raise
        finally:
            self._let_go(held, req, reason)

    def _arrive(
        self, key: str, opts: LockOptions, req: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """The task starts: release its enqueue lock, or find that another task holds it."""
        store = self.lock_store
        token = _header(req, TOKEN_HEADER)
        try:
            if token and store.release(key, str(token)):
                signals.lock_released.send(sender=self, lock_key=key, task_id=req.id,
                                           reason="started")
                return
            holder = store.holder(key)
        except LockBackendError as exc:
            self._backend_error(exc, key, opts, req, args, kwargs)
            return
        if holder is not None and holder != req.id:
            self._duplicate(key, holder, opts, req, args, kwargs)

    def _arrive_in_window(
        self, key: str, opts: LockOptions, req: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """until_expired: a message enqueued with the window's lock runs; one without it (sent
        with ``send_task``, say) opens a window of its own, or is a duplicate of the task that
        holds it. The window's lock is never released: it lapses ``lock_ttl`` after it was
        taken."""
        if _header(req, TOKEN_HEADER):
            return
        store = self.lock_store
        fixed = self._fixed_metadata(opts, req.hostname or _HOSTNAME)
        try:
            lease, result = try_acquire(store, key, opts.ttl, fixed, owner=req.id,
                                        task_name=self.name, metadata=(("owner", req.id),))
        except LockBackendError as exc:
            self._backend_error(exc, key, opts, req, args, kwargs)
            return
        if lease is None and result.holder != req.id:  # its own id: an earlier delivery
            self._duplicate(key, result.holder, opts, req, args, kwargs)

    def _take_over(self, key: str, opts: LockOptions, req: Any) -> Lease | None:
        """until_executed: turn the enqueue lock this message carries into the running lock."""
        token = _header(req, TOKEN_HEADER)
        if not token:
            return None
        store = self.lock_store
        fresh = new_token()
        started = store.clock()
        meta = [("owner", req.id), ("hostname", req.hostname or _HOSTNAME), ("pid", current_pid()),
                ("ttl", opts.ttl)]
        try:
            fence = store.handover(key, str(token), fresh, opts.ttl, meta)
        except LockBackendError:
            return None
        if fence is None:
            return None
        lease = Lease(store, key, fresh, opts.ttl, started=started, owner=req.id,
                      task_name=self.name, fencing_token=fence)
        signals.lock_acquired.send(sender=self, lock_key=key, task_id=req.id, lease=lease)
        return lease

    def _take(
        self, key: str, opts: LockOptions, req: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Lease | None:
        store = self.lock_store
        fixed = self._fixed_metadata(opts, req.hostname or _HOSTNAME)

        def attempt() -> tuple[Lease | None, AcquireResult]:
            return try_acquire(store, key, opts.ttl, fixed, owner=req.id, task_name=self.name,
                               metadata=(("owner", req.id),), limit=opts.limit)

        try:
            lease, result = attempt()
            if lease is None and opts.on_duplicate == "wait":
                # Sleep on release notices, trying again after each (and at the timeout).
                def tried() -> bool:
                    nonlocal lease, result
                    lease, result = attempt()
                    return lease is not None

                store.wait_released(key, opts.wait_timeout, tried)
            elif lease is None and opts.on_duplicate == "coalesce" and result.holder != req.id:
                lease, result = self._follow_up(store, key, opts, req, attempt, result)
        except LockBackendError as exc:
            self._backend_error(exc, key, opts, req, args, kwargs)
            return None  # lock_on_backend_error="run": the body runs unlocked
        if lease is not None:
            lease.info = {"hostname": req.hostname or _HOSTNAME, "pid": current_pid(),
                          "mode": opts.mode}
            if events.wanted(signals.lock_acquired):
                signals.lock_acquired.send(sender=self, lock_key=key, task_id=req.id,
                                           lease=lease)
            return lease
        self._duplicate(key, result.holder, opts, req, args, kwargs)
        raise AssertionError("unreachable")  # _duplicate always raises

    def _follow_up(
        self, store: LockBackend, key: str, opts: LockOptions, req: Any,
        attempt: Callable[[], tuple[Lease | None, AcquireResult]], result: AcquireResult,
    ) -> tuple[Lease | None, AcquireResult]:
        """coalesce: become the key's one follow-up and sleep on release notices until the
        holder lets go, or be rejected naming the follow-up that already waits.

        The claim (``<key>:next``) outlives the wait and a requeue after it, so a follow-up
        whose worker died comes back as the follow-up (``acks_late``); once the follow-up
        holds the lock, its claim no longer counts.
        """
        ttl_s = follow_up_ttl_s(opts)
        waiting = store.follow(key, req.id, ttl_s)
        if waiting is not None:
            self._reject(key, waiting, req)
        signals.lock_duplicate.send(sender=self, lock_key=key, task_id=req.id,
                                    holder_id=result.holder, policy="coalesce")
        lease: Lease | None = None
        lost_to: list[str] = []

        def tried() -> bool:
            nonlocal lease, result
            lease, result = attempt()
            if lease is not None:
                return True
            other = store.follow(key, req.id, ttl_s)  # still waiting: keep the claim alive
            if other is not None:
                lost_to.append(other)
            return other is not None

        store.wait_released(key, opts.wait_timeout, tried)
        if lease is not None:
            store.unfollow(key, req.id)
        elif lost_to:
            self._reject(key, lost_to[0], req)
        return lease, result  # not taken by the timeout: requeued, still the follow-up

    def _fixed_metadata(self, opts: LockOptions, hostname: str) -> FixedMetadata:
        """The lock hash fields that are the same for every run here, packed once."""
        cache = self._cache()
        ident = (current_pid(), hostname)
        fixed = cache.get("fixed")
        if fixed is None or fixed[0] != ident:
            packed = FixedMetadata([("task", self.name), ("hostname", hostname),
                                    ("mode", opts.mode), ("ttl", opts.ttl), ("renewals", 0),
                                    ("pid", ident[0])])
            fixed = cache["fixed"] = (ident, packed)
        return fixed[1]

    def _backend_error(
        self, exc: LockBackendError, key: str, opts: LockOptions, req: Any,
        args: tuple[Any, ...], kwargs: dict[str, Any],
    ) -> None:
        events.backend_error(self, key, req.id, opts.on_backend_error, exc)
        requeues = self._requeues(req)
        action = policy.on_backend_error(opts.on_backend_error, requeues, opts.requeue_max)
        if action == "run":
            logger.warning("running %s[%s] without its lock %s: %s", self.name, req.id, key, exc)
            return None
        if action == "requeue":
            logger.warning("requeueing %s[%s]: lock store unavailable: %s",
                           self.name, req.id, exc)
            self._requeue(req, args, kwargs, opts, requeues)
        raise LockBackendError(
            f"task {self.name}[{req.id}] did not run: lock store unavailable for {key}: {exc}",
            lock_key=key, task_name=self.name,
        )

    @staticmethod
    def _requeues(req: Any) -> int:
        value = getattr(req, REQUEUE_HEADER, None)
        if value is None:
            value = (req.headers or {}).get(REQUEUE_HEADER, 0)
        try:
            return int(value or 0)
        except (TypeError, ValueError):
            return 0

    def _duplicate(
        self, key: str, holder: str | None, opts: LockOptions, req: Any,
        args: tuple[Any, ...], kwargs: dict[str, Any],
    ) -> None:
        requeues = self._requeues(req)
        if policy.on_duplicate(opts.on_duplicate, holder, req.id, requeues,
                               opts.requeue_max) == "requeue":
            signals.lock_duplicate.send(sender=self, lock_key=key, task_id=req.id,
                                        holder_id=holder, policy="requeue")
            self._requeue(req, args, kwargs, opts, requeues)
        self._reject(key, holder, req)

    def _requeue(
        self, req: Any, args: tuple[Any, ...], kwargs: dict[str, Any], opts: LockOptions,
        requeues: int,
    ) -> None:
        headers = dict(req.headers or {})
        headers[REQUEUE_HEADER] = requeues + 1
        sig = self.signature_from_request(
            req, args, kwargs, countdown=requeue_countdown(opts.requeue_delay, requeues),
            headers=headers,
        )
        sig.apply_async(singleton_lock_requeue=True)
        raise Ignore()

    def _reject(self, key: str, holder: str | None, req: Any) -> None:
        exc = DuplicateTaskError(
            f"task {self.name}[{req.id}] is a duplicate: lock {key} is held by task {holder}",
            key, holder, self.name,
        )
        signals.lock_duplicate.send(sender=self, lock_key=key, task_id=req.id,
                                    holder_id=holder, policy="reject")
        try:
            # mark_as_failure also ends the chord part and every later link of a chain in the
            # same state, so nothing after a rejected duplicate stays PENDING forever; like a
            # revoke, it calls no errbacks.
            self.backend.mark_as_failure(req.id, exc, request=req, state=states.REVOKED,
                                         call_errbacks=False)
        except Exception:
            logger.exception("cannot store the REVOKED state of duplicate %s", req.id)
        self._send_revoked_event(req, str(exc))
        logger.info("rejected duplicate %s[%s]: lock %s held by %s", self.name, req.id, key,
                    holder)
        raise Ignore()

    def _send_revoked_event(self, req: Any, reason: str) -> None:
        if not req.hostname:
            return
        try:
            self.send_event("task-revoked", terminated=False, signum=None, expired=False,
                            reason=reason, exception=f"DuplicateTaskError({reason!r})")
        except Exception:
            logger.debug("cannot send task-revoked event for %s", req.id, exc_info=True)

    # -- while the body runs --------------------------------------------------------------

    def _watch(self, held: _Held, req: Any) -> None:
        """Have the lock renewed: by the worker main process (prefork) or by this process."""
        global _child_current
        lease = held.lease
        poster = current_poster()
        # The main process can renew and release a child's lock only where any connection
        # with the token may (a session-bound lock stays with the process that took it).
        if poster is not None and Capability.ADOPTABLE in lease.store.capabilities:
            held.post = poster.post({
                "key": lease.key, "token": lease.token, "ttl": lease.ttl_s, "task": self.name,
                "task_id": req.id, "fence": lease.fencing_token, "on_lost": held.options.on_lost,
                "hostname": req.hostname or _HOSTNAME, "acquired_at": lease.acquired_at,
                "started": lease.started, "validity": lease.valid_until - lease.started,
                "mode": held.options.mode,
            })
            if held.post is not None:
                _child_current = held
                return
        lease.on_lost(lambda le: self._lost_here(held, req.id))
        get_renewer().add(lease)

    def _lost_here(self, held: _Held, task_id: str) -> None:
        lease = held.lease
        logger.warning("task %s[%s] lost its lock %s: %s", self.name, task_id, lease.key,
                       lease.lost_reason)
        signals.lock_lost.send(sender=self, lock_key=lease.key, task_id=task_id,
                               reason=lease.lost_reason)
        if held.options.on_lost == "abort":
            _raise_in_thread(held.thread_id, LockLostError)

    def _stop_renewal(self, held: _Held) -> None:
        """Stop renewing ``held`` here or in the worker main process (before it changes hands)."""
        global _child_current
        if _child_current is held:
            _child_current = None
        if held.post is not None:
            poster = current_poster()
            if poster is not None:
                held.lease.renewals, lost = poster.clear(held.post)
                if lost:  # reported by the main process: not again at release
                    held.lease.lost = True
            held.post = None
        elif held.lease.registered:
            get_renewer().remove(held.lease)

    def _let_go(self, held: _Held, req: Any, reason: str) -> None:
        lease = held.lease
        try:
            self._stop_renewal(held)
            if held.kept:  # until_executed retry: the lock went back to the queued message
                return
            if lease.lost:  # already reported lost: release what may be left, quietly
                released = lease.release(wait=False)
            elif lease.store.clock() >= lease.valid_until:
                # Not known valid any more (a pool child's lease is renewed by the main
                # process, so: the body ran past its ttl): wait for the masters' answer, and
                # a lock that had expired (its process stopped past its ttl) is reported lost.
                released = lease.release()
                if not released and not lease.lost:
                    self._lost_at_release(lease, req.id)
            else:
                # The reply is read with the next batch on that connection: the release costs
                # this task a write, not a round trip (a failed master is retried later). A
                # reply showing the lock taken by another (two masters restarted empty at once)
                # reports it lost then.
                task_id = req.id
                released = lease.release(
                    wait=False, on_lost=lambda: self._lost_at_release(lease, task_id))
            if released and events.wanted(signals.lock_released):
                signals.lock_released.send(sender=self, lock_key=lease.key, task_id=req.id,
                                           reason=reason)
        except Exception:  # a release error must not turn into a task failure
            logger.exception("releasing lock %s of %s[%s] failed", lease.key, self.name, req.id)
        finally:
            req._singleton_lock = None

    def _lost_at_release(self, lease: Lease, task_id: str) -> None:
        """The body's release found its lock gone or taken by another: it expired (nothing
        renewed it in time: the process was stopped past its ttl, say), or masters restarted
        empty let another take it. Another holder may have run meanwhile."""
        lease.lost = True
        lease.lost_reason = "the lock was no longer held when its task ended"
        logger.warning("task %s[%s] lost its lock %s: %s", self.name, task_id, lease.key,
                       lease.lost_reason)
        signals.lock_lost.send(sender=self, lock_key=lease.key, task_id=task_id,
                               reason=lease.lost_reason)

    # -- enqueue --------------------------------------------------------------------------

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Publish the task; with an ``until_*`` mode, take its lock first (SPEC 4).

        A duplicate returns the holder's ``AsyncResult`` and publishes nothing
        (``lock_on_enqueue_duplicate="return_existing"``) or raises :class:`DuplicateTaskError`
        (``"raise"``). A publish that fails releases the lock it took.
        """
        if options.pop("singleton_lock_requeue", False):
            return super().apply_async(args, kwargs, **options)
        opts = self.lock_options
        if opts.mode == "while_executing" or self.app.conf.task_always_eager:
            return super().apply_async(args, kwargs, **options)
        task_id = options.get("task_id")
        request = self.request_stack.top if task_id is not None else None
        if request is not None and task_id == request.id:
            # self.retry() (or a replace) of the running task: no new enqueue lock.
            held = getattr(request, "_singleton_lock", None)
            if held is not None and opts.mode == "until_executed":
                return self._retry_keeping_lock(held, opts, args, kwargs, options)
            return super().apply_async(args, kwargs, **options)
        return self._enqueue_locked(opts, args, kwargs, options)

    def _enqueue_locked(
        self, opts: LockOptions, args: Any, kwargs: Any, options: dict[str, Any]
    ) -> Any:
        key = self.lock_key_for(*(args or ()), **(kwargs or {}))
        task_id = options.get("task_id") or uuid()
        options["task_id"] = task_id
        store = self.lock_store
        # until_expired: a throttle window of lock_ttl from now, whenever the task runs.
        ttl = opts.ttl if opts.mode == "until_expired" else opts.queued_ttl + _delay_s(options)
        # The queued lock is not renewed and has no handle here: the store's acquire round
        # (the one Redlock makes) with the token that travels in the message.
        token = new_token()
        # No worker holds a queued lock yet: hostname and pid are filled in when one takes it.
        meta = [("owner", task_id), ("task", self.name), ("mode", opts.mode), ("ttl", ttl),
                ("acquired_at", f"{time.time():.6f}")]
        # The acquire goes out now and Celery builds the message while the masters answer;
        # the replies are read just before the message would leave (before_task_publish),
        # and a lock not had stops the publish there.
        _watch_publishes(self.name)
        flight = _Publishing(store.begin_acquire(key, token, ttl, meta), token,
                             opts.on_backend_error == "run")
        options["headers"] = {**(options.get("headers") or {}), TOKEN_HEADER: token}
        outer, _publishing.current = getattr(_publishing, "current", None), flight
        try:
            result = super().apply_async(args, kwargs, **options)
        except _NotPublished:
            result = None
            # Celery subscribed to the result of the message it was about to send: undo it.
            cancel = getattr(getattr(self.backend, "result_consumer", None), "cancel_for", None)
            if cancel is not None:
                try:
                    cancel(task_id)
                except Exception:
                    logger.debug("cannot cancel the result subscription of %s", task_id,
                                 exc_info=True)
        except BaseException:
            if flight.attempt.finish().acquired:
                store.release(key, token)
            raise
        finally:
            _publishing.current = outer
        attempt = flight.attempt.finish()
        if attempt.backend_down:
            exc = LockBackendError(
                f"cannot lock {key!r} to enqueue {self.name}: "
                f"{store.no_quorum(attempt.errors)}",
                lock_key=key, task_name=self.name,
            )
            if result is None:
                raise exc
            logger.warning("published %s[%s] without its enqueue lock: %s", self.name, task_id,
                           exc)
            return result
        if not attempt.acquired:
            holder = attempt.holder
            signals.lock_duplicate.send(sender=self, lock_key=key, task_id=task_id,
                                        holder_id=holder, policy=opts.on_enqueue_duplicate)
            if result is not None:
                # Published before the lock was judged (the message never passed Celery's
                # before_task_publish): the worker turns it away when it arrives.
                logger.warning("%s[%s] was published although %s is held by %s", self.name,
                               task_id, key, holder)
                return result
            if opts.on_enqueue_duplicate == "return_existing" and holder:
                return self.AsyncResult(holder)
            raise DuplicateTaskError(
                f"task {self.name} not queued: lock {key} is held by task {holder}",
                key, holder, self.name,
            )
        return result

    def _retry_keeping_lock(
        self, held: _Held, opts: LockOptions, args: Any, kwargs: Any, options: dict[str, Any]
    ) -> Any:
        """until_executed + self.retry(): hand the running lock back to the queued message."""
        lease = held.lease
        fresh = new_token()
        self._stop_renewal(held)
        kept = lease.store.handover(
            lease.key, lease.token, fresh, opts.queued_ttl + _delay_s(options),
            [("pid", current_pid())],
        )
        if kept is None:
            return super().apply_async(args, kwargs, **options)
        held.kept = True
        options["headers"] = {**(options.get("headers") or {}), TOKEN_HEADER: fresh}
        try:
            return super().apply_async(args, kwargs, **options)
        except BaseException:
            held.kept = False
            lease.store.release(lease.key, fresh)
            raise


class _NotPublished(BaseException):
    """Stops a publish from before_task_publish (Celery's signals swallow an ``Exception``)."""


class _Publishing:
    """An enqueue in progress: the acquire whose replies decide whether the message leaves."""

    __slots__ = ("attempt", "token", "publish_unlocked")

    def __init__(self, attempt: AcquireInFlight, token: str, publish_unlocked: bool) -> None:
        self.attempt = attempt
        self.token = token
        #: lock_on_backend_error="run": publish even when the store cannot be reached.
        self.publish_unlocked = publish_unlocked


_publishing = threading.local()
_watched_names: set[str] = set()
_watched_lock = threading.Lock()


def _watch_publishes(task_name: str) -> None:
    """Have before_task_publish call :func:`_before_publish` for this task's messages."""
    if task_name in _watched_names:
        return
    with _watched_lock:
        if task_name not in _watched_names:
            before_task_publish.connect(_before_publish, sender=task_name, weak=False,
                                        dispatch_uid=f"celery-singleton-lock:{task_name}")
            _watched_names.add(task_name)


def _before_publish(headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    flight: _Publishing | None = getattr(_publishing, "current", None)
    if flight is None or not headers or headers.get(TOKEN_HEADER) != flight.token:
        return
    attempt = flight.attempt.finish()
    if attempt.acquired:
        return
    if attempt.backend_down and flight.publish_unlocked:
        headers.pop(TOKEN_HEADER, None)  # no lock to hand over: the worker takes its own
        return
    raise _NotPublished()


def follow_up_ttl_s(opts: LockOptions) -> float:
    """How long a coalesce follow-up's claim lives unrefreshed: its wait, the holder's ttl and
    the longest requeue countdown after a wait that timed out."""
    return opts.wait_timeout + opts.ttl + REQUEUE_BACKOFF_CAP * opts.requeue_delay * 1.2


def execution_key(key: str) -> str:
    """The execution lock of ``until_and_while_executing`` (same hash tag as the enqueue lock)."""
    return f"{key}:run"


def _header(req: Any, name: str) -> Any:
    value = getattr(req, name, None)
    if value is None:
        value = (req.headers or {}).get(name)
    return value


def _delay_s(options: dict[str, Any]) -> float:
    """Seconds until the message is due (countdown or eta), added to the queued lock's ttl."""
    countdown = options.get("countdown")
    if countdown:
        return max(0.0, float(countdown))
    eta = options.get("eta")
    if isinstance(eta, datetime):
        now = datetime.now(eta.tzinfo) if eta.tzinfo else datetime.now()
        return max(0.0, (eta - now).total_seconds())
    if isinstance(eta, str):
        try:
            parsed = datetime.fromisoformat(eta)
        except ValueError:
            return 0.0
        return _delay_s({"eta": parsed})
    return 0.0


def _raise_in_thread(thread_id: int, exc_type: type[BaseException]) -> None:
    """Raise ``exc_type`` asynchronously in a thread of this process (like a soft time limit)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc_type)
    )


def child_lock_lost_handler(signum: int, frame: Any) -> None:
    """SIGUSR2 in a pool child: the main process found the running task's lock lost."""
    held = _child_current
    if held is None or held.options.on_lost != "abort":
        return
    lease = held.lease
    if lease.store.owned(lease.key, lease.token):
        return
    lease.lost = True
    raise LockLostError(
        f"lock {lease.key} was lost while its task ran", lock_key=lease.key,
        task_name=lease.task_name,
    )

