"""Celery tasks run by triggers: subclass :class:`TriggerTask` and implement ``_run``.

::

    class ImportSubject(TriggerTask):
        def _run(self, context):
            page = context.trigger_kwargs['firstPageReceived']
            ...
            return {'subject_id': subject.pk}   # the cascade's kwargs

A subclass is registered with every Celery app under ``<module>.<ClassName>``
(or its own ``name``), so a configuration can say
``'run': 'app.tasks.ImportSubject'`` or ``'run': ImportSubject.name``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from celery import Task
from celery import _state as celery_state

from triggers import _json as stored_json
from triggers.config import check_kwargs_map, check_metadata
from triggers.exceptions import (
    InvalidArgument,
    InvalidTaskKwargs,
    InvalidTaskResult,
    MaxRetriesExceeded,
    RetryInstance,
    SkipInstance,
    with_context,
)
from triggers.logging import LevelTracker, LoggerContext
from triggers.run import Run
from triggers.types import TaskInstance, merge_dict

if TYPE_CHECKING:
    from triggers.manager import TriggerManager

__all__ = [
    "MaxRetriesExceeded",
    "RetryInstance",
    "SkipInstance",
    "TaskContext",
    "TriggerTask",
    "register_with_apps",
]

logger = logging.getLogger(__name__)


class TaskContext:
    """What a task's ``_run`` receives."""

    def __init__(self, manager: TriggerManager, task_instance: TaskInstance,
                 trigger_kwargs: dict[str, dict[str, Any]], task: TriggerTask | None = None,
                 run: Run | None = None) -> None:
        self.manager = manager
        self._run = run
        self.task_instance = task_instance
        #: Trigger name → kwargs it was fired with, ``withParams`` merged in.
        self.trigger_kwargs = trigger_kwargs
        self.task = task
        self._levels = LevelTracker()

    @property
    def session_uid(self) -> str:
        return self.manager.storage.uid

    def heartbeat(self) -> bool:
        """Renew the running instance's lease now (a long loop may call it between items).

        A heartbeat also runs by itself every third of ``TRIGGERS['LEASE']``.
        Returns ``False`` if this run is no longer current (it was recovered): stop
        early, its outcome will be ignored.
        """
        return self._run.heartbeat() if self._run is not None else True

    @property
    def log_level(self) -> int:
        """Highest level logged so far through :meth:`get_logger_context` loggers."""
        return self._levels.level

    def filter_kwargs(self, filters: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Validate and convert trigger kwargs with phx-filters.

        ``filters`` maps trigger names to ``{kwarg: filter}`` (or to a filter for
        the whole kwargs dict)::

            cleaned = context.filter_kwargs({
                'pageReceived': {'page': f.Required | f.Int | f.Min(1)},
            })

        Returns the cleaned kwargs of those triggers. Raises
        :class:`~triggers.exceptions.InvalidTaskKwargs` (its context holds the
        errors by ``trigger.kwarg``) if anything is invalid.
        """
        import filters as f

        if not isinstance(filters, Mapping):
            raise InvalidArgument(
                f"filter_kwargs() expects a mapping of trigger name to filters, got "
                f"{type(filters).__name__}"
            )
        mapper = f.FilterMapper({
            trigger: f.FilterMapper(spec) if isinstance(spec, Mapping) else spec
            for trigger, spec in filters.items()
        }, allow_extra_keys=True, allow_missing_keys=False)
        data = {trigger: self.trigger_kwargs.get(trigger, {}) for trigger in filters}
        runner = f.FilterRunner(mapper, data)
        if not runner.is_valid():
            errors = runner.get_errors()
            raise with_context(
                InvalidTaskKwargs(
                    f"Invalid trigger kwargs for {self.task_instance.name}: "
                    + "; ".join(f"{key}: {', '.join(m['message'] for m in msgs)}"
                                for key, msgs in errors.items()),
                    instance_name=self.task_instance.name,
                ),
                {"filter_errors": errors},
            )
        cleaned: dict[str, dict[str, Any]] = {
            trigger: value for trigger, value in runner.cleaned_data.items() if trigger in filters
        }
        return cleaned

    def get_logger_context(self, context: Mapping[str, Any] | None = None) -> LoggerContext:
        """A context manager yielding a logger that carries ``context``; see triggers.logging."""
        if context is not None and not isinstance(context, Mapping):
            raise InvalidArgument(
                f"get_logger_context() expects a mapping, got {type(context).__name__}"
            )
        name = self.task.name if self.task is not None else self.task_instance.config.run
        base = {"session_uid": self.session_uid, "instance": self.task_instance.name}
        base.update(context or {})
        return LoggerContext(logging.getLogger(name), base, self._levels)


class TriggerTask(Task):  # type: ignore[type-arg]
    """Base class of the Celery tasks that trigger configurations run.

    Implement :meth:`_run`; ``run`` is provided: it loads the session, moves the
    instance from ``scheduled`` to ``running`` (a duplicate delivery is a logged
    no-op), calls ``_run``, records the result or the failure, and cascades.
    """

    #: Subclasses are registered; this base class is not.
    abstract = True
    max_retries = 3

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("abstract"):
            return
        if not cls.__dict__.get("name"):
            cls.name = f"{cls.__module__}.{cls.__name__}"
        register_with_apps(cls)

    # -- Celery entry point ---------------------------------------------------

    def run(self, uid: str, instance: str, manager: str = "default", storage: str = "cache",
            storage_options: Mapping[str, Any] | None = None) -> Any:
        from triggers.manager import build_manager

        trigger_manager = build_manager(manager, storage, uid, storage_options)
        result, failure = self._execute(trigger_manager, instance,
                                        getattr(self.request, "id", None))
        if failure is not None:
            # Recorded on the instance already; raised so that Celery ends the task in
            # FAILURE with it (result backends, Flower, django-celery-results).
            raise failure
        return result

    def execute_in_thread(self, manager: TriggerManager, instance_name: str) -> Any:
        """Run an instance outside a worker (the threading runner), with a Celery request."""
        self.push_request(id=f"{manager.storage.uid}:{instance_name}", retries=0,
                          called_directly=False)
        try:
            return self.execute_instance(manager, instance_name)
        finally:
            self.pop_request()

    def execute_instance(self, manager: TriggerManager, instance_name: str) -> Any:
        """Run one scheduled instance through the run protocol (:mod:`triggers.run`);
        return the cascade's kwargs (``None`` if it did not finish)."""
        return self._execute(manager, instance_name)[0]

    def _execute(self, manager: TriggerManager, instance_name: str,
                 task_id: str | None = None) -> tuple[Any, BaseException | None]:
        """The cascade's kwargs, and the exception that failed the instance (if it did)."""
        run = Run.start(manager, instance_name, task_id)
        if run is None:
            return None, None
        instance = run.instance
        depth = int(instance.metadata.get("depth", 0))
        if self.request is not None:
            self.request.retries = depth
        context = TaskContext(manager, instance, _merged_kwargs(instance), task=self, run=run)
        try:
            with run.keep_alive():
                result = self._run(context)
            cascade = _result_kwargs(result, instance)
        except RetryInstance as retry:
            run.retry(retry.replacement_kwargs, retry.cooldown, retry.metadata,
                      context.log_level, retry.exc)
            return None, None
        except SkipInstance as skip:
            run.skip(skip.metadata, context.log_level)
            return None, None
        except Exception as exc:  # noqa: BLE001 - every failure is recorded on the instance
            logger.error("%s of session %r failed: %s: %s", instance_name, manager.storage.uid,
                         type(exc).__name__, exc, exc_info=True)
            run.fail(exc, max(context.log_level, logging.ERROR))
            return None, exc
        run.finish(cascade, context.log_level)
        return cascade, None

    def _run(self, context: TaskContext) -> Mapping[str, Any] | None:
        """Do the work. Return a mapping (or ``None``): the cascade's kwargs."""
        raise NotImplementedError(f"{type(self).__name__} must implement _run(context)")

    # -- control flow ---------------------------------------------------------

    def retry(self, exc: BaseException | None = None, cooldown: float | None = None,  # type: ignore[override]
              replacement_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
              metadata: Mapping[str, Any] | None = None, *, countdown: float | None = None,
              max_retries: int | None = None) -> Exception:
        """Return the exception to raise to replay this instance after ``cooldown`` seconds.

        ``raise self.retry(exc=exc, cooldown=10)``: the running instance becomes
        ``replayed`` and a copy (``#n+1``, with ``replacement_kwargs`` if given) is
        scheduled. Past ``max_retries`` it returns a MaxRetriesExceeded, and the
        instance fails with it. As in Celery, ``countdown=`` is accepted for
        ``cooldown`` and ``max_retries=`` overrides the task's for this call.
        """
        if countdown is not None:
            if cooldown is not None and cooldown != countdown:
                return InvalidArgument(f"retry() got cooldown={cooldown!r} and countdown="
                                       f"{countdown!r}; they are the same thing: pass one")
            cooldown = countdown
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 0):
            return InvalidArgument(f"retry() max_retries must be an integer >= 0 or None, "
                                   f"got {limit!r}")
        depth = int(getattr(self.request, "retries", 0) or 0)
        if limit is not None and depth >= limit:
            error = MaxRetriesExceeded(
                f"{self.name} retried {depth} times; max_retries is {limit}"
                + (f" (last error: {type(exc).__name__}: {exc})" if exc else "")
            )
            error.__cause__ = exc
            return error
        if cooldown is not None and (not isinstance(cooldown, (int, float)) or cooldown < 0):
            return InvalidArgument(f"retry() cooldown must be a number of seconds >= 0, "
                                   f"got {cooldown!r}")
        replacement = None
        if replacement_kwargs is not None:
            replacement = check_kwargs_map(replacement_kwargs, "replacement_kwargs")
        return RetryInstance(exc, cooldown, replacement, check_metadata(metadata))

    def skip(self, metadata: Mapping[str, Any] | None = None) -> Exception:
        """Return the exception to raise to mark this instance skipped (``raise self.skip()``)."""
        return SkipInstance(check_metadata(metadata))


def _merged_kwargs(instance: TaskInstance) -> dict[str, dict[str, Any]]:
    """The instance's trigger kwargs deep-merged over the task's ``withParams``.

    Fired values win; nested mappings merge; lists and other values are replaced.
    """
    return merge_dict(copy.deepcopy(instance.config.with_params), instance.kwargs)


def _result_kwargs(result: Any, instance: TaskInstance) -> dict[str, Any]:
    if result is None:
        return {}
    if not isinstance(result, Mapping) or not all(isinstance(k, str) for k in result):
        raise InvalidTaskResult(
            f"{instance.config.run}._run() returned {type(result).__name__} {result!r:.80}; "
            "it must return a mapping with string keys (the cascade's kwargs) or None.",
            instance_name=instance.name,
        )
    try:
        cascade: dict[str, Any] = stored_json.round_trip(dict(result))
    except (TypeError, ValueError) as exc:
        raise InvalidTaskResult(
            f"{instance.config.run}._run() returned a mapping that is not JSON-serialisable: "
            f"{exc}", instance_name=instance.name,
        ) from exc
    return cascade


def register_with_apps(cls: type[Task]) -> None:  # type: ignore[type-arg]
    """Register a task class (its ``name``) with every Celery app, as ``shared_task`` does,
    without finalizing any app."""

    def register(app: Any) -> None:
        # app._tasks, not app.tasks: this runs while the app finalizes.
        if type(app._tasks.get(cls.name)) is not cls:
            app.register_task(cls())

    celery_state.connect_on_app_finalize(register)
    for app in celery_state._get_active_apps():  # type: ignore[attr-defined]
        if app.finalized:
            with app._finalize_mutex:
                register(app)
