"""Task runners: how a scheduled instance gets executed.

* :class:`CeleryTaskRunner` (``celery``, the default) sends a Celery message
  that names the session, the instance and the registry keys of the manager and
  storage; a worker rebuilds them and runs the task.
* :class:`ThreadingTaskRunner` (``threading``) runs each instance in a thread
  of this process, with a fresh manager and storage of the same classes; use it
  in tests and for the embedded default. :meth:`ThreadingTaskRunner.join_all`
  waits for every thread, cascades included.

A runner is called only after the instance was stored as ``scheduled`` and the
session lock was released.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, ClassVar

from triggers.exceptions import DispatchError, UnknownTask
from triggers.registry import TriggersRegistry
from triggers.timers import max_countdown, sent_later
from triggers.types import TaskInstance

if TYPE_CHECKING:
    from triggers.manager import TriggerManager
    from triggers.task import TriggerTask

__all__ = [
    "DEFAULT_TASK_RUNNER",
    "BaseTaskRunner",
    "CeleryTaskRunner",
    "ThreadingTaskRunner",
    "task_runners",
]

#: Runner used when neither the task's ``using``, the manager, nor
#: ``TRIGGERS['RUNNER']`` says otherwise: a registry key, or (as in the original) a
#: runner class. Assigning another value (as the original's test helpers do)
#: overrides ``TRIGGERS['RUNNER']``.
DEFAULT_TASK_RUNNER: Any = "celery"
_BUNDLED_DEFAULT = DEFAULT_TASK_RUNNER

#: Set by triggers.testing: the runner tests use, whatever the settings say.
_forced_runner: str | None = None


def default_runner_name() -> str:
    """The default runner: forced by the testing helpers, else TRIGGERS['RUNNER'],
    else :data:`DEFAULT_TASK_RUNNER`."""
    if _forced_runner is not None:
        return _forced_runner
    default = DEFAULT_TASK_RUNNER
    name = default if isinstance(default, str) else str(default.name)
    if default is not _BUNDLED_DEFAULT:
        return name
    from django.conf import settings

    if settings.configured:
        from triggers.conf import triggers_settings

        configured: str | None = triggers_settings.RUNNER
        if configured:
            return configured
    return name

logger = logging.getLogger(__name__)


class BaseTaskRunner:
    """Base class of task runners; subclasses set ``name`` and implement :meth:`run`."""

    #: Registry key under the ``triggers.runners`` entry-point group.
    name: ClassVar[str] = ""

    def run(self, manager: TriggerManager, task_instance: TaskInstance) -> None:
        """Hand ``task_instance`` (stored as ``scheduled``) over for execution."""
        raise NotImplementedError

    @classmethod
    def resolve(cls, target: str) -> TriggerTask:
        """The registered Celery task called ``target``; it must be a TriggerTask."""
        from celery import current_app

        from triggers.task import TriggerTask

        task = find_task(target)
        if task is None:
            raise UnknownTask(
                f"No Celery task named {target!r} is registered with the Celery app "
                f"{current_app.main!r}. {missing_task_hint()}", task_name=target)
        if not isinstance(task, TriggerTask):
            raise UnknownTask(
                f"Celery task {target!r} is a {type(task).__name__}, not a TriggerTask; "
                "trigger configurations can only run TriggerTask subclasses.",
                task_name=target,
            )
        return task


_imported_default_modules = False


def missing_task_hint() -> str:
    """How to make a task name known, for the app this process has loaded."""
    from celery import current_app

    if current_app.main in (None, "default"):
        return ("No project Celery app is loaded in this process: import it in your "
                "project package's __init__.py (from .celery import app as celery_app), as "
                "Celery's Django guide shows; its autodiscover_tasks() then imports the "
                "tasks modules.")
    return ("Define it as a TriggerTask subclass in a module the app imports (e.g. the "
            "tasks.py of an installed app, through autodiscover_tasks()).")


def celery_app_loaded() -> bool:
    """Whether a project's Celery app is the current app (not Celery's fallback app)."""
    from celery import current_app

    return current_app.main not in (None, "default")


def allow_unknown_tasks() -> bool:
    """``TRIGGERS['ALLOW_UNKNOWN_TASKS']``: send ``run`` names this process does not know."""
    from django.conf import settings

    if not settings.configured:
        return False
    from triggers.conf import triggers_settings

    return bool(triggers_settings.ALLOW_UNKNOWN_TASKS)


def find_task(name: str) -> Any:
    """The task called ``name`` in the current Celery app, or ``None``.

    If the name is unknown, the app's task modules (``imports``, autodiscovered
    modules) are imported once per process, as a worker does at start-up.
    """
    global _imported_default_modules
    from celery import current_app

    task = current_app.tasks.get(name)
    if task is None and not _imported_default_modules:
        _imported_default_modules = True
        current_app.loader.import_default_modules()
        task = current_app.tasks.get(name)
    return task


class CeleryTaskRunner(BaseTaskRunner):
    """Sends the task to the Celery broker; Celery routing applies."""

    name = "celery"

    def run(self, manager: TriggerManager, task_instance: TaskInstance) -> None:
        if sent_later(task_instance):
            # Brokers cap how long a message may wait: it stays in the store, and the
            # sweep sends it TRIGGERS['MAX_COUNTDOWN'] seconds before its start.
            logger.info("Keeping %s of session %r in the store until %.0f s before it starts "
                        "(the sweep sends it).", task_instance.name, manager.storage.uid,
                        max_countdown())
            return
        message = manager.build_task_message(task_instance)
        wait = _seconds_to_wait(task_instance)
        options: dict[str, Any] = {"countdown": wait} if wait > 0 else {}
        target = task_instance.config.run
        if find_task(target) is None and allow_unknown_tasks():
            # Split deployment: only the workers import the task; they check it (an
            # unregistered name makes the instance fail, see triggers.tasks).
            from celery import current_app

            current_app.send_task(target, kwargs=message, **options)
            return
        # resolve() checks that the name is a registered TriggerTask: a configuration
        # must not be able to send a message to any other task.
        self.resolve(target).apply_async(kwargs=message, **options)


class ThreadingTaskRunner(BaseTaskRunner):
    """Runs each instance in a thread of this process (tests, the embedded default)."""

    name = "threading"

    _threads: ClassVar[list[threading.Thread]] = []
    _errors: ClassVar[list[BaseException]] = []
    _guard: ClassVar[threading.Lock] = threading.Lock()

    def run(self, manager: TriggerManager, task_instance: TaskInstance) -> None:
        task = self.resolve(task_instance.config.run)
        manager_class = type(manager)
        storage = manager.storage
        storage_class, uid, options = type(storage), storage.uid, storage.get_options()
        delay = _seconds_to_wait(task_instance)
        name = task_instance.name

        def target() -> None:
            try:
                if delay > 0:
                    time.sleep(delay)
                worker_manager = manager_class(storage_class(uid, **options))
                task.execute_in_thread(worker_manager, name)
            except BaseException as exc:  # noqa: BLE001 - handed to join_all()
                logger.exception("Thread running %s of session %r failed", name, uid)
                with self._guard:
                    self._errors.append(exc)
            finally:
                close_thread_connections()

        thread = threading.Thread(target=target, name=f"triggers:{uid}:{name}", daemon=True)
        with self._guard:
            self._threads.append(thread)
        try:
            thread.start()
        except RuntimeError as exc:
            with self._guard:
                self._threads.remove(thread)
            raise DispatchError(f"Could not start a thread for {name}: {exc}") from exc

    @classmethod
    def join_all(cls, timeout: float | None = None) -> None:
        """Wait for every thread this runner started, cascades included.

        Errors raised inside the threads (not task failures, which are recorded
        on the instance, but errors of the framework or the storage) are re-raised
        here: the first one, with the others attached as notes.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with cls._guard:
                pending = [t for t in cls._threads if t.is_alive() or not t.ident]
                cls._threads[:] = pending
            if not pending:
                break
            for thread in pending:
                remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
                thread.join(remaining)
            if deadline is not None and time.monotonic() >= deadline:
                if any(t.is_alive() for t in pending):
                    raise TimeoutError(f"Runner threads still running after {timeout} s")
        with cls._guard:
            errors, cls._errors[:] = list(cls._errors), []
        if errors:
            first = errors[0]
            for other in errors[1:]:
                if hasattr(first, "add_note"):
                    first.add_note(f"Another runner thread failed too: {other!r}")
            raise first


def _seconds_to_wait(task_instance: TaskInstance) -> float:
    """Seconds until a delayed (or cooling-down) instance may start; 0 if it may now."""
    start_after = task_instance.start_after
    return max(0.0, round(start_after - time.time(), 3)) if start_after is not None else 0.0


def close_thread_connections() -> None:
    """Close the database connections this runner thread opened (if Django has any)."""
    from django.conf import settings

    if not settings.configured:
        return
    from django.db import connections

    connections.close_all()


#: Registry of task runners: ``task_runners.get('threading')``.
task_runners = TriggersRegistry("triggers.runners", "task runner")


def get_runner(name: str) -> BaseTaskRunner:
    runner: BaseTaskRunner = task_runners.get(name)
    return runner


def runner_names() -> set[str]:
    return {str(key) for key in task_runners.keys()}
