"""The trigger manager: fires triggers, schedules task instances, records outcomes."""

from __future__ import annotations

import copy
import logging
import secrets
import threading
import traceback as traceback_module
import weakref
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, ClassVar, cast

from asgiref.sync import sync_to_async

from triggers import _json as stored_json
from triggers import runners, signals
from triggers.config import (
    check_kwargs,
    check_kwargs_map,
    check_metadata,
    check_status,
    validate_configuration,
    validate_trigger_name,
)
from triggers.exceptions import (
    DispatchError,
    InvalidArgument,
    InvalidInstanceStatus,
    InvalidTrigger,
    LockTimeout,
    UnknownTask,
)
from triggers.registry import TriggersRegistry
from triggers.retrying import GaveUp, retry_transient
from triggers.storages import storage_backends
from triggers.storages.base import BaseTriggerStorage, SessionStep, Want
from triggers.timers import dispatch_grace, due_at, format_time, redispatch_backoff, sent_later
from triggers.types import (
    DIRECTIVE_ON_COMPLETE,
    DIRECTIVE_ON_FAILURE,
    DIRECTIVE_ON_READY,
    STATUS_ABANDONED,
    STATUS_FAILED,
    STATUS_REPLAYED,
    STATUS_RUNNING,
    STATUS_SCHEDULED,
    STATUS_SKIPPED,
    STATUS_UNSTARTED,
    TaskConfig,
    TaskInstance,
    TaskStatus,
    lease_expired,
    now,
    task_name_of,
)

if TYPE_CHECKING:
    pass

__all__ = ["FinalizingTriggerManager", "TriggerManager", "get_trigger_manager",
           "trigger_managers", "unsent_instances"]

logger = logging.getLogger(__name__)

Kwargs = dict[str, Any]
#: The triggers applied in one step, in order, each with the instances it scheduled.
Fired = list[tuple[str, list[TaskInstance]]]

#: How deep outcome triggers (onReady …) may nest within one step before it is a loop.
MAX_OUTCOME_DEPTH = 50

class TriggerManager:
    """Controls one session through its storage backend.

    ``TriggerManager(storage)`` or ``TriggerManager(storage=storage)``.
    Subclasses may override :attr:`default_task_runner_name` and the hooks
    :meth:`_post_fire`, :meth:`_post_replay` and :meth:`_post_skip`; register
    them under the ``triggers.managers`` entry-point group so that workers can
    rebuild them.
    """

    #: Registry key (set for the bundled class; found by lookup for others).
    name: ClassVar[str] = "default"
    #: The extra configuration keys this manager reads (``None``: any key that is not a
    #: near miss of a directive). Declared, a near miss is an error with a suggestion,
    #: and so is any other unknown key.
    custom_directives: ClassVar[frozenset[str] | None] = None

    def __init__(self, storage: BaseTriggerStorage) -> None:
        if not isinstance(storage, BaseTriggerStorage):
            raise InvalidArgument(
                f"TriggerManager needs a storage backend (a BaseTriggerStorage), got "
                f"{type(storage).__name__} {storage!r}"
            )
        self.storage = storage

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.storage!r})"

    @property
    def default_task_runner_name(self) -> str:
        """Runner for tasks whose configuration has no ``using`` (cascades included).

        ``TRIGGERS['RUNNER']`` if set, else :data:`triggers.runners.DEFAULT_TASK_RUNNER`.
        """
        return runners.default_runner_name()

    # ------------------------------------------------------------------
    # Public API.
    # ------------------------------------------------------------------

    def update_configuration(self, configuration: Mapping[str, Mapping[str, Any]]) -> None:
        """Validate and store task configurations, replacing tasks of the same name.

        Every problem is reported at once in a ConfigurationError; on error the
        stored configuration is unchanged. Triggers fired earlier are not
        re-applied to the new tasks.
        """
        configs = validate_configuration(
            configuration, runners.runner_names, _check_task, session_uid=self.storage.uid,
            custom_directives=self.custom_directives,
        )
        self.storage.update_configuration(configs)

    def fire(self, trigger_name: str, trigger_kwargs: Mapping[str, Any] | None = None, *,
             idempotency_key: str | None = None) -> list[TaskInstance]:
        """Fire a trigger; returns the instances it scheduled.

        With ``idempotency_key``, a fire repeated with the same key in the same
        session (a web request retried, a webhook delivered twice) is applied once;
        a repeat changes nothing and returns what the first one scheduled (sending
        again those still ``scheduled``, in case the first call was cut off before it
        dispatched them: a run starts once however often it is sent). Keys are
        kept for the session's life, the newest ``TRIGGERS['IDEMPOTENCY_KEYS']``.

        Inside the caller's ``transaction.atomic()`` (``ATOMIC_REQUESTS``
        included), a storage whose steps cannot join that transaction (Redis, a
        cache, memory) applies the trigger when the transaction commits, and not at
        all if it rolls back; ``fire()`` then returns ``[]``. The database storage
        applies it in the transaction and dispatches on commit.
        """
        kwargs = self._check_trigger(trigger_name, trigger_kwargs)
        key = _check_idempotency_key(idempotency_key, self.storage.uid)
        # Applied at the commit, and tried again there if the store falters: with a key
        # (the caller's, or one of its own), so that a retry never applies it twice.
        deferred_key = key or f"on-commit:{secrets.token_hex(8)}"
        if self._defer_to_commit(
                lambda: self.fire(trigger_name, kwargs, idempotency_key=deferred_key)):
            return []

        def apply(step: SessionStep) -> Fired | list[str]:
            if key is not None:
                earlier = step.remembered(key)
                if earlier is not None:
                    return earlier
            self.apply_trigger(step, trigger_name, kwargs)
            if key is not None:
                step.remember(key, [instance.name for instance in step.fired[0][1]])
            return step.fired

        outcome = self.storage.transact(apply, Want(
            triggers=[trigger_name], idempotency=[key] if key is not None else []))
        if outcome and isinstance(outcome[0], str):
            logger.info("Fire of %r in session %r with idempotency key %r was applied before; "
                        "nothing changed.", trigger_name, self.storage.uid, key)
            earlier = [self.storage[name] for name in outcome]
            # The first call may have been cut off before it dispatched (its reply lost):
            # what is still scheduled is sent again; a run starts once however often.
            waiting = [instance for instance in earlier if instance.status == STATUS_SCHEDULED]
            if waiting:
                self.storage.on_commit(lambda: self.dispatch(waiting))
            return earlier
        fired = cast(Fired, outcome)
        if not fired:
            return []
        self.after_step(fired)
        return fired[0][1]

    def fire_once(self, trigger_name: str, trigger_kwargs: Mapping[str, Any] | None = None
                  ) -> list[TaskInstance] | None:
        """Fire a trigger unless it has fired in this session before (atomically).

        Returns the instances it scheduled, or ``None`` if the trigger had fired
        already. However many processes call it at once, it fires once.
        """
        return self._fire_if(trigger_name, trigger_kwargs, lambda step: True)

    def _fire_if(self, trigger_name: str, trigger_kwargs: Mapping[str, Any] | None,
                 condition: Callable[[SessionStep], bool], want: Want | None = None
                 ) -> list[TaskInstance] | None:
        """Fire a trigger that has not fired yet if ``condition(step)`` holds, in one step."""
        kwargs = self._check_trigger(trigger_name, trigger_kwargs)
        if self._defer_to_commit(lambda: self._fire_if(trigger_name, kwargs, condition, want)):
            return None

        def apply(step: SessionStep) -> Fired | None:
            if step.latest(trigger_name) is not None or not condition(step):
                return None
            self.apply_trigger(step, trigger_name, kwargs)
            return step.fired

        prefetch = Want(triggers=[trigger_name])
        if want is not None:
            prefetch.counters |= want.counters
            prefetch.open = want.open
        fired = self.storage.transact(apply, prefetch)
        if fired is None:
            return None
        self.after_step(fired)
        return fired[0][1]

    def replay_failed_instance(self, failed_instance: TaskInstance | str,
                               replacement_kwargs: Mapping[str, Mapping[str, Any]] | None = None
                               ) -> TaskInstance:
        """Mark a failed instance ``replayed`` and schedule a copy of it at once.

        The copy gets ``replacement_kwargs`` (trigger → kwargs; they replace the
        original kwargs, they are not merged) or the original kwargs; its
        metadata ``parent`` names the failed instance.
        """
        name = self._instance_name(failed_instance)
        replacement = None
        if replacement_kwargs is not None:
            replacement = check_kwargs_map(replacement_kwargs, "replacement_kwargs")
        def replay(step: SessionStep) -> TaskInstance:
            failed = step.instance(name)
            self._require(failed, failed.can_replay, "replayed", "only failed instances")
            return self.replace_instance(step, failed, replacement, {})

        clone = self.storage.transact(replay, Want(instances=[name],
                                                    counters=[task_name_of(name)]))
        self._send_step_signals()
        self.storage.on_commit(lambda: self._run_hooks(lambda: self._post_replay(clone), [clone]))
        return clone

    def skip_failed_instance(self, failed_instance: TaskInstance | str, cascade: bool = False,
                             result: Mapping[str, Any] | None = None) -> TaskInstance:
        """Mark a failed instance ``skipped``; with ``cascade`` fire its task as if it succeeded."""
        name = self._instance_name(failed_instance)
        result_kwargs = check_kwargs(result, "result")
        def skip(step: SessionStep) -> tuple[TaskInstance, Fired]:
            self.observe_step(step)
            instance = step.instance(name)
            self._require(instance, instance.can_skip, "skipped", "only failed instances")
            instance.set_status(STATUS_SKIPPED, cascade=bool(cascade), result=result_kwargs)
            step.save(instance)
            if cascade:
                self.apply_trigger(step, instance.task_name, result_kwargs)
            return instance, step.fired

        instance, fired = self.storage.transact(skip, Want(
            instances=[name], triggers=[task_name_of(name)] if cascade else []))
        self.after_step(fired)
        self.after_skip(instance, cascade)
        return instance

    def update_instance_status(self, task_instance: TaskInstance | str, status: TaskStatus | str,
                               metadata: Mapping[str, Any] | None = None, cascade: bool = False,
                               cascade_kwargs: Mapping[str, Any] | None = None) -> TaskInstance:
        """Set an instance's status by hand, merge ``metadata``, optionally cascade.

        Nothing is dispatched because of the new status itself; with
        ``cascade`` the task's name is fired with ``cascade_kwargs``.
        """
        name = self._instance_name(task_instance)
        new_status = check_status(status)
        meta = check_metadata(metadata)
        cascade_args = check_kwargs(cascade_kwargs, "cascade_kwargs")
        def update(step: SessionStep) -> tuple[TaskInstance, Fired]:
            self.observe_step(step)
            instance = step.instance(name)
            instance.set_status(new_status, **meta)
            step.save(instance)
            if cascade:
                self.apply_trigger(step, instance.task_name, cascade_args)
            return instance, step.fired

        instance, fired = self.storage.transact(update, Want(
            instances=[name], triggers=[task_name_of(name)] if cascade else []))
        self.after_step(fired)
        return instance

    def update_instance_metadata(self, task_instance: TaskInstance | str,
                                 metadata: Mapping[str, Any]) -> TaskInstance:
        """Merge ``metadata`` into an instance's metadata."""
        name = self._instance_name(task_instance)
        if metadata is None:
            raise InvalidArgument("metadata must be a mapping, got None")
        meta = check_metadata(metadata)

        def update(step: SessionStep) -> TaskInstance:
            instance = step.instance(name)
            instance.metadata.update(meta)
            instance.metadata["modified"] = now()
            step.save(instance)
            return instance

        return self.storage.transact(update, Want(instances=[name]))

    def mark_instance_logs_resolved(self, task_instance: TaskInstance | str) -> TaskInstance:
        """Mark an instance's log messages as looked at (see get_instances_with_unresolved_logs)."""
        return self.update_instance_metadata(task_instance, {"logs_resolved": True})

    def get_unresolved_tasks(self) -> list[TaskConfig]:
        """Tasks with no instance yet, or with at least one unresolved instance."""
        return self.storage.get_unresolved_tasks()

    def get_unresolved_instances(self) -> list[TaskInstance]:
        """Instances that are not finished, abandoned, replayed or skipped."""
        return self.storage.get_unresolved_instances()

    def recover(self, older_than: float | None = None, *,
                instances: Iterable[str] | None = None) -> list[TaskInstance]:
        """Re-dispatch instances stuck in ``scheduled`` or ``running``; returns them.

        An instance is stuck when it has been ``scheduled`` (its message was lost,
        or the broker was down) or ``running`` (its worker died) for at least
        ``older_than`` seconds (default: ``TRIGGERS['RECOVER_AFTER']``, 300). A
        running one goes back to ``scheduled`` first: its old run can no longer
        record an outcome. A running instance with a lease (``TRIGGERS['LEASE']``) is
        stuck only once its lease expired too: a live run renews it, so it is never
        started again while its worker works. Exactly-once start still holds for every
        dispatch; for runs without a lease choose ``older_than`` above your longest
        task, since a run that is merely slow would otherwise be started again.

        ``instances`` (names) limits recovery to those instances of the session.
        """
        if older_than is None:
            older_than = _recover_after()
        if not isinstance(older_than, (int, float)) or older_than < 0:
            raise InvalidArgument(f"older_than must be a number of seconds >= 0, got {older_than!r}")
        only: set[str] | None = None
        if instances is not None:
            if isinstance(instances, str) or not all(isinstance(name, str)
                                                     for name in instances):
                raise InvalidArgument("instances must be a list of instance names "
                                      f"(e.g. ['t#0']), got {instances!r}")
            only = set(instances)
        limit = now() - older_than

        def find_stuck(step: SessionStep) -> list[TaskInstance]:
            self.observe_step(step)
            stuck: list[TaskInstance] = []
            for instance in step.open_instances():
                if only is not None and instance.name not in only:
                    continue
                if instance.status == STATUS_SCHEDULED:
                    # One waiting out its delay or cooldown is not stuck until that ends.
                    since = max(float(instance.start_after or 0), float(instance.metadata.get(
                        "scheduled", instance.metadata.get("modified", 0))))
                elif instance.status == STATUS_RUNNING:
                    if "lease" in instance.metadata and not lease_expired(instance):
                        continue  # its worker is alive: it renews the lease
                    since = instance.metadata.get("started", instance.metadata.get("modified", 0))
                else:
                    continue
                if float(since) > limit:
                    continue
                previous = instance.status.value
                instance.metadata.pop("run", None)
                instance.metadata.pop("start_after", None)  # due now
                instance.set_status(STATUS_SCHEDULED, scheduled=now(), recovered_from=previous,
                                    recoveries=int(instance.metadata.get("recoveries", 0)) + 1)
                step.save(instance)
                step.note(instance, "recovered")
                stuck.append(instance)
            return stuck

        stuck = self.storage.transact(find_stuck)
        for instance in stuck:
            logger.warning("Recovering %s of session %r (was %s)", instance.name,
                           self.storage.uid, instance.metadata["recovered_from"])
        self._send_step_signals()
        self.storage.on_commit(lambda: self.dispatch(stuck))
        return stuck

    def sweep(self) -> tuple[list[tuple[TaskInstance, str]], dict[str, float]]:
        """Do this session's time-driven work that is due (see :mod:`triggers.timers`).

        Scheduled instances whose dispatch is owed are sent again (then after twice
        the wait, and so on); those whose start was too far away for a countdown are
        sent when it is ``TRIGGERS['MAX_COUNTDOWN']`` away; running ones whose lease
        expired (their worker died) are taken over: back to ``scheduled``, the old run
        can no longer record an outcome, and sent again. Each is recorded in the
        session history (``redispatched``, ``timer``, ``takeover``) and logged.

        Returns each instance sent with what it was (``redispatched``, ``timer`` or
        ``takeover``), and the due time of every open instance that has one
        afterwards. :func:`triggers.sweep.sweep` calls this for the sessions that the
        storage's due index says are due.
        """
        stamp = now()
        sent: list[tuple[TaskInstance, str]] = []

        def due_work(step: SessionStep) -> dict[str, float]:
            self.observe_step(step)
            sent.clear()
            dues: dict[str, float] = {}
            if not step.tasks:
                return dues  # the session is gone (deleted, or expired when idle)
            step.swept = True  # see triggers.storages.redis.DueIndex
            for instance in step.open_instances():
                due = due_at(instance)
                if due is not None and due <= stamp:
                    metadata = instance.metadata
                    if instance.status == STATUS_RUNNING:
                        run = metadata.pop("run", None)
                        instance.set_status(STATUS_SCHEDULED, scheduled=stamp,
                                            recovered_from="running", expired_run=run,
                                            recoveries=int(metadata.get("recoveries", 0)) + 1)
                        kind = "takeover"
                    elif sent_later(instance):
                        metadata["redispatch_at"] = round(
                            float(instance.start_after or stamp) + dispatch_grace(), 3)
                        kind = "timer"
                    else:
                        sends = int(metadata.get("redispatches", 0)) + 1
                        metadata["redispatches"] = sends
                        metadata["redispatch_at"] = round(stamp + redispatch_backoff(sends), 3)
                        kind = "redispatched"
                    step.save(instance)
                    step.note(instance, kind)
                    sent.append((instance, kind))
                    due = due_at(instance)
                if due is not None:
                    dues[instance.name] = due
            return dues

        dues: dict[str, float] = self.storage.transact(due_work)
        for instance, kind in sent:
            if kind == "takeover":
                logger.warning("Taking over %s of session %r: the lease of run %s expired (its "
                               "worker died?); sending it again.", instance.name,
                               self.storage.uid, instance.metadata.get("expired_run"))
            elif kind == "timer":
                logger.info("Sending %s of session %r: it starts in %.0f s.", instance.name,
                            self.storage.uid, float(instance.start_after or stamp) - now())
            else:
                scheduled = instance.metadata.get("scheduled")
                logger.warning("Sending %s of session %r again: scheduled at %s and not started "
                               "(its message was lost?); send #%s.", instance.name,
                               self.storage.uid,
                               format_time(scheduled) if isinstance(scheduled, (int, float))
                               else scheduled, instance.metadata.get("redispatches"))
        instances = [instance for instance, _kind in sent]
        self._send_step_signals()
        self.storage.on_commit(lambda: self.dispatch(instances))
        return list(sent), dues

    def recovery_run(
        self, older_than: float = 0.0,
        replacement_kwargs: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    ) -> dict[str, list[str]]:
        """Rerun what a run left undone; keep what finished (Eventor's recovery run).

        Stuck ``scheduled`` / ``running`` instances (older than ``older_than``
        seconds; 0 when the previous run is known to be over) are dispatched
        again, and every failed instance is replayed — or skipped, if its task
        says ``"onRecovery": "skip"``. ``replacement_kwargs`` maps task names to
        the kwargs their replays get. Finished instances and their cascades stay.
        Returns the names ``recovered``, ``replayed`` and ``skipped``.
        """
        replacements = dict(replacement_kwargs or {})
        recovered = [instance.name for instance in self.recover(older_than)]
        replayed: list[str] = []
        skipped: list[str] = []
        for instance in self.get_unresolved_instances():
            if instance.status != STATUS_FAILED:
                continue
            if instance.config.on_recovery == "skip":
                self.skip_failed_instance(instance.name)
                skipped.append(instance.name)
            else:
                self.replay_failed_instance(instance.name, replacements.get(instance.task_name))
                replayed.append(instance.name)
        return {"recovered": recovered, "replayed": replayed, "skipped": skipped}

    # ------------------------------------------------------------------
    # Async forms, for async views and other coroutines.
    # ------------------------------------------------------------------
    # Each runs its synchronous method through asgiref's sync_to_async with
    # thread_sensitive=True: in the thread where Django runs the request's other
    # synchronous code (its database connections, its transactions). Signals, the
    # dispatch of what was scheduled and the hooks happen as they do for the
    # synchronous call, in that thread.

    async def aupdate_configuration(self, configuration: Mapping[str, Mapping[str, Any]]) -> None:
        """:meth:`update_configuration` for async code."""
        await sync_to_async(self.update_configuration, thread_sensitive=True)(configuration)

    async def afire(self, trigger_name: str, trigger_kwargs: Mapping[str, Any] | None = None, *,
                    idempotency_key: str | None = None) -> list[TaskInstance]:
        """:meth:`fire` for async code: ``await manager.afire("pageReceived", {...})``."""
        return await sync_to_async(self.fire, thread_sensitive=True)(
            trigger_name, trigger_kwargs, idempotency_key=idempotency_key)

    async def areplay_failed_instance(
            self, failed_instance: TaskInstance | str,
            replacement_kwargs: Mapping[str, Mapping[str, Any]] | None = None) -> TaskInstance:
        """:meth:`replay_failed_instance` for async code."""
        return await sync_to_async(self.replay_failed_instance, thread_sensitive=True)(
            failed_instance, replacement_kwargs)

    async def askip_failed_instance(self, failed_instance: TaskInstance | str,
                                    cascade: bool = False,
                                    result: Mapping[str, Any] | None = None) -> TaskInstance:
        """:meth:`skip_failed_instance` for async code."""
        return await sync_to_async(self.skip_failed_instance, thread_sensitive=True)(
            failed_instance, cascade, result)

    async def aupdate_instance_status(
            self, task_instance: TaskInstance | str, status: TaskStatus | str,
            metadata: Mapping[str, Any] | None = None, cascade: bool = False,
            cascade_kwargs: Mapping[str, Any] | None = None) -> TaskInstance:
        """:meth:`update_instance_status` for async code."""
        return await sync_to_async(self.update_instance_status, thread_sensitive=True)(
            task_instance, status, metadata, cascade, cascade_kwargs)

    async def aupdate_instance_metadata(self, task_instance: TaskInstance | str,
                                        metadata: Mapping[str, Any]) -> TaskInstance:
        """:meth:`update_instance_metadata` for async code."""
        return await sync_to_async(self.update_instance_metadata, thread_sensitive=True)(
            task_instance, metadata)

    async def amark_instance_logs_resolved(self, task_instance: TaskInstance | str
                                           ) -> TaskInstance:
        """:meth:`mark_instance_logs_resolved` for async code."""
        return await sync_to_async(self.mark_instance_logs_resolved, thread_sensitive=True)(
            task_instance)

    async def aget_unresolved_tasks(self) -> list[TaskConfig]:
        """:meth:`get_unresolved_tasks` for async code."""
        return await sync_to_async(self.get_unresolved_tasks, thread_sensitive=True)()

    async def aget_unresolved_instances(self) -> list[TaskInstance]:
        """:meth:`get_unresolved_instances` for async code."""
        return await sync_to_async(self.get_unresolved_instances, thread_sensitive=True)()

    # ------------------------------------------------------------------
    # Hooks.
    # ------------------------------------------------------------------

    def _post_fire(self, trigger_name: str, tasks_scheduled: list[TaskInstance]) -> None:
        """Called after a trigger was applied and saved and its instances dispatched."""

    def _post_replay(self, task_instance: TaskInstance) -> None:
        """Called after a replay; receives the new instance (``metadata['parent']``)."""

    def _post_skip(self, task_instance: TaskInstance, cascade: bool) -> None:
        """Called after a skip (and after the cascade's ``_post_fire``)."""

    # ------------------------------------------------------------------
    # Task execution (called by TriggerTask in a worker or runner thread).
    # ------------------------------------------------------------------

    def build_task_message(self, task_instance: TaskInstance) -> dict[str, Any]:
        """The JSON kwargs of a Celery message that lets a worker run ``task_instance``."""
        manager_key = trigger_managers.key_for(type(self))
        storage_key = storage_backends.key_for(type(self.storage))
        missing = []
        if manager_key is None:
            missing.append(f"manager class {exception_name(type(self))} under 'triggers.managers'")
        if storage_key is None:
            missing.append(f"storage class {exception_name(type(self.storage))} under "
                           "'triggers.storages'")
        if missing:
            raise DispatchError(
                f"Cannot send {task_instance.name} of session {self.storage.uid!r} to a worker: "
                f"register the {' and the '.join(missing)} (entry points), so that the worker "
                "rebuilds the same classes.",
                session_uid=self.storage.uid, instance_name=task_instance.name,
            )
        return {
            "uid": self.storage.uid,
            "instance": task_instance.name,
            "manager": manager_key,
            "storage": storage_key,
            "storage_options": self.storage.get_options(),
        }

    def fail_scheduled_instance(self, task_instance: TaskInstance | str,
                                exc: BaseException) -> TaskInstance | None:
        """Mark a ``scheduled`` instance that can never run ``failed`` with ``exc``.

        For an instance whose task no worker knows (the runner could not find it,
        or a worker reported it unregistered). Fires its ``onFailure`` /
        ``onComplete`` triggers. An instance that is no longer scheduled is left
        alone (returns ``None``).
        """
        name = self._instance_name(task_instance)
        meta = failure_metadata(exc, with_traceback=False)

        def fail(step: SessionStep) -> tuple[TaskInstance | None, Fired]:
            instance = step.instance(name)
            if instance.status != STATUS_SCHEDULED:
                return None, []
            instance.set_status(STATUS_FAILED, **meta)
            instance.metadata.pop("dispatch_error", None)
            step.save(instance)
            outcome = {"instance": name, "exc_type": meta["exc_type"],
                       "exc_message": meta["exc_message"]}
            for directive in (DIRECTIVE_ON_FAILURE, DIRECTIVE_ON_COMPLETE):
                self.fire_outcome(step, instance, directive, outcome)
            return instance, step.fired

        instance, fired = self.storage.transact(fail, Want(instances=[name]))
        if instance is not None:
            logger.error("%s of session %r failed: it can never run: %s", name,
                         self.storage.uid, exc)
            self.after_step(fired)
        return instance

    # ------------------------------------------------------------------
    # Internals.
    # ------------------------------------------------------------------

    def apply_trigger(self, step: SessionStep, trigger_name: str, kwargs: Kwargs,
                       depth: int = 0) -> list[TaskInstance]:
        """Record a trigger and update every task that reacts to it; returns what it scheduled.

        The step's ``fired`` log gets the trigger and what it scheduled, followed by
        the ``onReady`` triggers of those instances (applied in the same step).
        """
        if depth >= MAX_OUTCOME_DEPTH:
            raise InvalidTrigger(
                f"Outcome triggers nest more than {MAX_OUTCOME_DEPTH} deep in one step of "
                f"session {self.storage.uid!r} (last: {trigger_name!r}): outcome triggers "
                "(onReady, onStart …) form a loop. Nothing was changed.",
                session_uid=self.storage.uid,
            )
        self._note_trigger(step, trigger_name, kwargs)
        touched: list[TaskInstance] = []
        for config in step.reacting(trigger_name):
            touched += self._apply_to_task(step, config, trigger_name, kwargs)
        step.set_latest_kwargs(trigger_name, kwargs)
        scheduled = []
        for instance in touched:
            if instance.can_abandon:
                instance.set_status(STATUS_ABANDONED, abandoned_by=trigger_name)
                step.save(instance)
            elif instance.can_schedule:
                self._schedule(step, instance)
                scheduled.append(instance)
        step.fired.append((trigger_name, scheduled))
        for instance in scheduled:
            self.fire_outcome(step, instance, DIRECTIVE_ON_READY, {"instance": instance.name},
                               depth + 1)
        return scheduled

    def _apply_to_task(self, step: SessionStep, config: TaskConfig, trigger_name: str,
                       kwargs: Kwargs) -> list[TaskInstance]:
        """Apply a trigger to one task's waiting instances; returns those it may change.

        The original's rule: the trigger applies to every waiting instance that it
        has not reached yet; a new instance is created when the task has none yet,
        or when an ``andEvery`` trigger applied to none. A new instance inherits the
        latest kwargs of the other ``after`` triggers and records the ``unless``
        triggers that fired before it.
        """
        waiting = step.waiting(config.name)
        if trigger_name in config.unless_names:
            # Scheduled instances still waiting out a delay react to unless triggers only.
            waiting += [instance for instance in step.delayed(config.name)
                        if instance.is_waiting]
        create = True
        if step.count(config.name):
            create = trigger_name == config.and_every
            for instance in waiting:
                if instance.apply_trigger(trigger_name, kwargs):
                    step.save(instance)
                    create = False
        if create:
            latest = {name: step.latest(name)
                      for name in config.after_names | config.unless_names if name != trigger_name}
            instance = step.new_instance(
                config,
                {name: value for name, value in latest.items()
                 if value is not None and name in config.after_names},
                abandon_state={name for name, value in latest.items()
                               if value is not None and name in config.unless_names},
            )
            instance.apply_trigger(trigger_name, kwargs)
            step.save(instance)
            waiting.append(instance)
        return waiting

    def fire_outcome(self, step: SessionStep, instance: TaskInstance, directive: str,
                      kwargs: Kwargs, depth: int = 0) -> None:
        self.observe_step(step)
        for trigger_name in instance.config.outcome_triggers(directive):
            self.apply_trigger(step, trigger_name, kwargs, depth)

    def _schedule(self, step: SessionStep, instance: TaskInstance) -> None:
        runner = instance.config.using or self.default_task_runner_name
        stamp = now()
        extra: Kwargs = {}
        if instance.config.delay:
            extra = {"delay": instance.config.delay,
                     "start_after": round(stamp + instance.config.delay, 3)}
        instance.set_status(STATUS_SCHEDULED, scheduled=stamp, runner=runner, **extra)
        step.save(instance)

    def replace_instance(self, step: SessionStep, old: TaskInstance,
                          replacement: dict[str, Kwargs] | None, metadata: Kwargs,
                          retry: bool = False, cooldown: float | None = None) -> TaskInstance:
        """Mark ``old`` replayed and store a scheduled copy of it."""
        self.observe_step(step)
        old.set_status(STATUS_REPLAYED, **metadata)
        step.save(old)
        if retry:
            step.note(old, "retried")
        depth = int(old.metadata.get("depth", 0)) + (1 if retry else 0)
        meta: Kwargs = {"parent": old.name}
        if depth:
            meta["depth"] = depth
        clone = step.new_instance(old.config, replacement if replacement is not None else old.kwargs,
                                  STATUS_UNSTARTED, meta, old.abandon_state)
        old.metadata["replaced_by"] = clone.name
        self._schedule(step, clone)
        if cooldown:
            clone.metadata["cooldown"] = cooldown
            clone.metadata["start_after"] = round(clone.metadata["scheduled"] + cooldown, 3)
        return clone

    def after_step(self, fired: Fired) -> None:
        """After commit: dispatch what the step scheduled, then ``_post_fire`` per trigger.

        The step's signals (:mod:`triggers.signals`) are sent after commit too, before
        the dispatch.
        """
        self._send_step_signals(fired)
        if not fired:
            return

        def hooks() -> None:
            for trigger_name, scheduled in fired:
                self._post_fire(trigger_name, scheduled)

        dispatch = [instance for _, scheduled in fired for instance in scheduled]
        self.storage.on_commit(lambda: self._run_hooks(hooks, dispatch))

    def after_skip(self, instance: TaskInstance, cascade: bool = False) -> None:
        """After commit: ``_post_skip`` of an instance that was skipped (by
        :meth:`skip_failed_instance`, or by its run: ``raise self.skip()``)."""
        self.storage.on_commit(lambda: self._run_hooks(lambda: self._post_skip(instance, cascade),
                                                       []))

    def _defer_to_commit(self, apply: Callable[[], Any]) -> bool:
        """Inside the caller's transaction, apply a fire on commit if the storage cannot
        join that transaction; whether it was deferred."""
        if self.storage.in_lock_block():
            return False
        alias = self.storage.caller_transaction()
        if alias is None or self.storage.joins_transaction(alias):
            return False
        from django.db import transaction

        def later() -> None:
            try:
                retry_transient(apply, f"apply a fire deferred to the commit of database "
                                f"{alias!r} in session {self.storage.uid!r}",
                                _deferred_retry())
            except Exception as exc:
                cause = exc.cause if isinstance(exc, GaveUp) else exc
                logger.error("Could not apply a fire deferred to the commit of database %r in "
                             "session %r: %s: %s", alias, self.storage.uid,
                             type(cause).__name__, cause)
                raise cause from None

        transaction.on_commit(later, using=alias, robust=True)
        return True

    def _run_hooks(self, hooks: Callable[[], None], dispatch: list[TaskInstance]) -> None:
        """Dispatch what a step scheduled, then run its hooks, under the session's hook lock.

        Hooks of one session thus run one at a time, across threads and processes,
        in causal order (a cascade's hooks after those of the step that dispatched
        its task), and each reads the session afresh, seeing every change made
        before it: a check-then-fire in a hook (the cookbook's
        FinalizingTriggerManager) acts once. A manager that overrides no hook
        takes no lock.
        """
        if not self._overrides_hooks():
            self.dispatch(dispatch)
            return
        with ExitStack() as held:
            try:
                held.enter_context(self.storage.hook_lock())
            except LockTimeout as exc:
                # Another hook of the session held the lock longer than lock_timeout.
                # The step is written: its instances are dispatched, its hooks run.
                logger.warning("The hooks of session %r run without the session's hook "
                               "lock: %s", self.storage.uid, exc)
            self.dispatch(dispatch)
            hooks()

    def _overrides_hooks(self) -> bool:
        return any(getattr(getattr(self, hook), "__func__", None) is not getattr(TriggerManager, hook)
                   for hook in ("_post_fire", "_post_replay", "_post_skip"))

    def dispatch(self, instances: Iterable[TaskInstance]) -> None:
        """Hand stored, scheduled instances to their runners (never under the lock).

        A failed hand-over is logged and recorded in the instance's metadata
        (``dispatch_error``); the instance stays ``scheduled`` for recovery.
        """
        for instance in instances:
            runner_name = instance.metadata.get("runner") or self.default_task_runner_name
            try:
                runners.get_runner(runner_name).run(self, instance)
            except UnknownTask as exc:
                # No retry can help: the instance can never run.
                self.fail_scheduled_instance(instance.name, exc)
            except Exception as exc:  # noqa: BLE001 - recorded, and logged with traceback
                logger.exception("Could not dispatch %s of session %r with runner %r",
                                 instance.name, self.storage.uid, runner_name)
                self._record_dispatch_error(instance.name, exc)

    def _record_dispatch_error(self, name: str, exc: Exception) -> None:
        try:
            def record(step: SessionStep) -> None:
                instance = step.instance(name)
                error = f"{exception_name(type(exc))}: {exc}"
                if instance.status == STATUS_SCHEDULED:
                    if instance.metadata.get("dispatch_error") != error:
                        step.note(instance, "unsent")  # a new failure: the history says so
                    instance.metadata["dispatch_error"] = error
                    step.save(instance)

            self.storage.transact(record, Want(instances=[name]))
        except Exception:  # noqa: BLE001 - the storage itself is failing; already logged above
            logger.exception("Could not record the dispatch error of %s", name)

    def _running(self, step: SessionStep, started: TaskInstance) -> TaskInstance | None:
        """The instance, if it is still running the run that ``started`` began."""
        instance = step.instance(started.name)
        if (instance.status != STATUS_RUNNING
                or instance.metadata.get("run") != started.metadata.get("run")):
            return None
        return instance

    def _log_stale_outcome(self, started: TaskInstance) -> None:
        logger.warning(
            "Not recording the outcome of run %s of %s in session %r: the instance was "
            "changed or recovered meanwhile.",
            started.metadata.get("run"), started.name, self.storage.uid,
        )

    def _require(self, instance: TaskInstance, allowed: bool, action: str, who: str) -> None:
        if not allowed:
            raise InvalidInstanceStatus(
                f"Cannot mark {instance.name} of session {self.storage.uid!r} {action}: "
                f"it is {instance.status.value}; {who} can be {action}.",
                session_uid=self.storage.uid, instance_name=instance.name,
                status=instance.status,
            )

    def _check_trigger(self, trigger_name: Any, trigger_kwargs: Any) -> Kwargs:
        """The kwargs to store for a trigger; InvalidTrigger for a bad name or kwargs."""
        problem = validate_trigger_name(trigger_name)
        if problem:
            raise InvalidTrigger(f"Cannot fire in session {self.storage.uid!r}: {problem}")
        return check_kwargs(trigger_kwargs, f"trigger_kwargs of {trigger_name!r}", InvalidTrigger)

    def _instance_name(self, task_instance: TaskInstance | str) -> str:
        if isinstance(task_instance, TaskInstance):
            return task_instance.name
        if isinstance(task_instance, str) and task_instance:
            return task_instance
        raise InvalidArgument(
            f"Expected a task instance or its name, got {type(task_instance).__name__} "
            f"{task_instance!r}"
        )


    # ------------------------------------------------------------------
    # Signals (triggers.signals): what a step changed, sent after commit.
    # ------------------------------------------------------------------
    # The manager notes the step it works in (observe_step(), called by its steps
    # and by apply_trigger / fire_outcome / replace_instance, which the run protocol's
    # steps call too); after_step() — or the method, for steps that return no
    # ``fired`` — reads the step's status changes and triggers, and sends the signals
    # through storage.on_commit(). Nothing is computed when no receiver listens.

    def observe_step(self, step: SessionStep) -> None:
        """Note that this thread works in ``step``, so that the step's status changes and
        triggers are sent as :mod:`triggers.signals` once it is committed.

        The manager's own steps call it; code that changes instances in a step of its own
        and then calls :meth:`after_step` with the step's ``fired`` calls it too.
        """
        current: _Observed | None = getattr(_observed, "entry", None)
        if current is None or current.step is not step or current.fired is not step.fired:
            _observed.entry = _Observed(step)

    def _note_trigger(self, step: SessionStep, trigger_name: str, kwargs: Kwargs) -> None:
        self.observe_step(step)
        _observed.entry.triggers.append((trigger_name, kwargs))

    def _send_step_signals(self, fired: Fired | None = None) -> None:
        """Send the signals of the step this thread observed last, once it is committed.

        ``fired``: what the step returned (its ``fired`` log); a step that was not
        observed (its ``fired`` is another list) sends nothing.
        """
        entry: _Observed | None = getattr(_observed, "entry", None)
        _observed.entry = None
        if entry is None or (fired is not None and entry.fired is not fired):
            return
        sender = type(self)
        changes = (_status_changes(entry.step)
                   if signals.instance_status_changed.has_listeners(sender) else [])
        triggers = entry.applied() if signals.trigger_fired.has_listeners(sender) else []
        if not changes and not triggers:
            return
        uid = self.storage.uid

        def send() -> None:
            for instance, old_status, new_status in changes:
                signals.instance_status_changed.send_robust(
                    sender, session=uid, instance=instance, old_status=old_status,
                    new_status=new_status, manager=self)
            for trigger_name, trigger_kwargs, scheduled in triggers:
                signals.trigger_fired.send_robust(
                    sender, session=uid, trigger_name=trigger_name,
                    trigger_kwargs=trigger_kwargs, scheduled=scheduled, manager=self)

        self.storage.on_commit(send)


class _Observed:
    """The step a thread works in, with the kwargs of the triggers it applied, in order."""

    __slots__ = ("fired", "step", "triggers")

    def __init__(self, step: SessionStep) -> None:
        self.step = step
        #: The step's ``fired`` log when it was observed (a nested call in a lock block
        #: gets a list of its own).
        self.fired = step.fired
        self.triggers: list[tuple[str, Kwargs]] = []

    def applied(self) -> list[tuple[str, Kwargs, list[TaskInstance]]]:
        """Each trigger the step applied: name, kwargs and copies of what it scheduled."""
        applied = []
        for index, (trigger_name, scheduled) in enumerate(self.fired):
            noted = self.triggers[index] if index < len(self.triggers) else None
            kwargs = (noted[1] if noted is not None and noted[0] == trigger_name
                      else self.step.new_latest.get(trigger_name, {}))
            applied.append((trigger_name, copy.deepcopy(kwargs),
                            [_snapshot(instance) for instance in scheduled]))
        return applied


#: Per thread: ``entry``, the step observed last (an _Observed); ``reported``, the
#: statuses already reported of a step that several calls share (a lock block).
_observed = threading.local()


def _status_changes(step: SessionStep) -> list[tuple[TaskInstance, TaskStatus | None, TaskStatus]]:
    """The instances whose status ``step`` changed: a copy of each, old and new status.

    In a lock block several calls share one step: each reports only what changed
    since the previous one reported.
    """
    seen = getattr(_observed, "reported", None)
    if seen is None or seen[0]() is not step:
        seen = _observed.reported = (weakref.ref(step), {})
    reported: dict[str, TaskStatus | None] = seen[1]
    changes = []
    for name, instance in step.dirty.items():
        before = reported[name] if name in reported else step.status_before(name)
        if before != instance.status:
            changes.append((_snapshot(instance), before, instance.status))
            reported[name] = instance.status
    return changes


def _snapshot(instance: TaskInstance) -> TaskInstance:
    """A copy of ``instance`` that later changes to the original do not reach."""
    return TaskInstance(instance.name, instance.config, copy.deepcopy(instance.kwargs),
                        instance.status, copy.deepcopy(instance.metadata),
                        instance.abandon_state)


def _deferred_retry() -> float:
    """Seconds a fire deferred to a commit is retried: ``TRIGGERS['OUTCOME_RETRY']``, at
    most 10 (the request that committed waits for it)."""
    from triggers.conf import triggers_settings

    return min(float(triggers_settings.OUTCOME_RETRY), 10.0)


def _check_idempotency_key(key: Any, uid: str) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not key.strip() or len(key) > 255:
        raise InvalidArgument(
            f"idempotency_key must be a non-empty string of at most 255 characters, got "
            f"{type(key).__name__} {key!r:.80}", session_uid=uid)
    return key


def _recover_after() -> float:
    from django.conf import settings

    if settings.configured:
        from triggers.conf import triggers_settings

        return float(triggers_settings.RECOVER_AFTER)
    return 300.0


def exception_name(cls: type) -> str:
    """``module.Name`` of an exception class, built-ins included (``builtins.ValueError``),
    as the original recorded it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def failure_metadata(exc: BaseException, with_traceback: bool = True) -> Kwargs:
    """What a failed instance's metadata records about the exception."""
    meta: Kwargs = {"exc_type": exception_name(type(exc)), "exc_message": str(exc),
                    "finished": now()}
    if with_traceback:
        meta["exc_traceback"] = "".join(traceback_module.format_exception(exc))
    context = getattr(exc, "context", None)
    if isinstance(context, Mapping) and context:
        meta["exc_context"] = _json_copy_lenient(context)
    return meta


def _json_copy_lenient(value: Mapping[str, Any]) -> Any:
    """Exception context as JSON; what JSON cannot hold (objects, NaN, …) becomes its repr()."""
    try:
        return stored_json.lenient_round_trip(dict(value))
    except (TypeError, ValueError):
        return {str(key): repr(item) for key, item in value.items()}


def _check_task(run: str) -> str | None:
    """What is wrong with a ``run`` target, if anything.

    With a project's Celery app loaded (its tasks imported), the name must be a
    registered TriggerTask, unless ``TRIGGERS['ALLOW_UNKNOWN_TASKS']`` lets names
    that only the workers import through. Without an app nothing can be checked.
    """
    from triggers.task import TriggerTask

    task = runners.find_task(run)
    if task is None:
        if runners.celery_app_loaded() and not runners.allow_unknown_tasks():
            from celery import current_app

            return (f"no Celery task named {run!r} is registered with the Celery app "
                    f"{current_app.main!r}. {runners.missing_task_hint()} Or set "
                    "TRIGGERS['ALLOW_UNKNOWN_TASKS'] = True if only the workers import it")
        return None
    if not isinstance(task, TriggerTask):
        return (f"Celery task {run!r} is a {type(task).__name__}, not a TriggerTask; "
                "only TriggerTask subclasses can be run by triggers")
    return None


class FinalizingTriggerManager(TriggerManager):
    """Fires ``sessionFinalized`` once, when nothing else in the session is unresolved.

    The cookbook's recipe as a library class (registry key ``finalizing``): after
    every trigger it checks for unresolved tasks, ignoring those that wait for
    ``sessionFinalized`` themselves, and fires ``sessionFinalized`` the first
    time there are none.
    """

    TRIGGER_SESSION_FINALIZED = "sessionFinalized"

    def _post_fire(self, trigger_name: str, tasks_scheduled: list[TaskInstance]) -> None:
        if trigger_name != self.TRIGGER_SESSION_FINALIZED:
            self._finalize_if_done()

    def _post_skip(self, task_instance: TaskInstance, cascade: bool) -> None:
        # A skip applies no trigger when it does not cascade; it may end the last work.
        self._finalize_if_done()

    def _finalize_if_done(self) -> None:
        if self.TRIGGER_SESSION_FINALIZED in self.storage.latest_kwargs:
            return
        for config in self.get_unresolved_tasks():
            if self.TRIGGER_SESSION_FINALIZED not in config.after_names:
                return
        # The check and the fire are one atomic step: a fire from another process in
        # between cannot make it finalize a session that has open work again.
        self._fire_if(self.TRIGGER_SESSION_FINALIZED, None, self._nothing_else_unresolved,
                      Want(open=True))

    def _nothing_else_unresolved(self, step: SessionStep) -> bool:
        step.need(Want(counters=step.tasks, open=True))
        open_tasks = {instance.task_name for instance in step.open_instances()}
        return not any(
            self.TRIGGER_SESSION_FINALIZED not in config.after_names
            and (step.count(name) == 0 or name in open_tasks)
            for name, config in step.tasks.items())


#: Registry of trigger managers: ``trigger_managers.get('default', storage)``.
trigger_managers = TriggersRegistry("triggers.managers", "trigger manager")


def unsent_instances(storage: BaseTriggerStorage) -> dict[str, str]:
    """The session's scheduled instances whose message could not be handed to their
    runner (name → ``dispatch_error``), read afresh: what an operator is told was not
    sent (the sweep sends them again)."""
    storage.invalidate_cache()
    return {instance.name: str(instance.metadata["dispatch_error"])
            for instance in storage.get_unresolved_instances()
            if instance.metadata.get("dispatch_error")}


def build_manager(manager_key: str, storage_key: str, uid: str,
                  storage_options: Mapping[str, Any] | None = None) -> TriggerManager:
    """Rebuild a manager and its storage from registry keys (as a worker does)."""
    storage = storage_backends.get(storage_key, uid, **dict(storage_options or {}))
    manager: TriggerManager = trigger_managers.get(manager_key, storage)
    return manager


def get_trigger_manager(uid: str) -> TriggerManager:
    """The manager configured by the ``TRIGGERS`` setting, for session ``uid``.

    The library version of the cookbook's recipe: ``TRIGGERS['MANAGER']`` over
    ``TRIGGERS['STORAGE']`` with its options (database or cache alias, timeout,
    lock settings, ``STORAGE_OPTIONS``).
    """
    from triggers.conf import triggers_settings

    return build_manager(triggers_settings.MANAGER, triggers_settings.STORAGE, uid,
                         triggers_settings.storage_options())
