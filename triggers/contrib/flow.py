"""A programmatic flow API in the style of Eventor, on the triggers engine.

::

    from triggers import flow

    def prog(progname):
        return progname

    ev = flow.Flow(store=":memory:")
    ev1s = ev.add_event("run_step1")
    ev2s = ev.add_event("run_step2")
    ev3s = ev.add_event("run_step3")
    s1 = ev.add_step("s1", func=prog, kwargs={"progname": "prog1"},
                     triggers={flow.StepTriggers.at_success: (ev2s,)})
    s2 = ev.add_step("s2", func=prog, kwargs={"progname": "prog2"},
                     triggers={flow.StepTriggers.at_success: (ev3s,)})
    s3 = ev.add_step("s3", func=prog, kwargs={"progname": "prog3"})
    ev.add_assoc(ev1s, s1)
    ev.add_assoc(ev2s, s2)
    ev.add_assoc(ev3s, s3)
    ev.trigger_event(ev1s, 1)
    assert ev()                       # runs until nothing is left to do

A flow translates to an ordinary trigger configuration, one session per
sequence (UID ``<flow name>:<sequence>``), so its sessions can be inspected
with the usual tools:

* an event is a trigger; an event with an expression (``or_``/``and_``) is a
  task that runs the built-in ``triggers.noop`` once its expression holds, so
  its cascade fires the event;
* a step is a task running ``triggers.flow.step``, which calls the step's
  function; its associated events are its ``after`` condition (any of them),
  an association's delay its ``delay``, its ``triggers`` the outcome
  directives (``at_success`` → ``onSuccess`` …), its recovery policy for
  failures ``onRecovery``;
* steps run in this process, in threads, at most ``max_concurrent`` at once
  (``max_concurrent < 1``: no limit); with ``stop_on_exception`` an unhandled
  failure stops new steps from starting (running ones finish).

The store is ``":memory:"`` (this process), a SQLite file path (when Django
is not configured yet: it is configured for it), or ``"db"`` / ``"db:<alias>"``
(the project's database).
"""

from __future__ import annotations

import enum
import inspect
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, ClassVar

from triggers import tasks as _builtin_tasks  # noqa: F401 - registers triggers.noop
from triggers.exceptions import InvalidArgument
from triggers.runners import BaseTaskRunner
from triggers.task import TaskContext, TriggerTask
from triggers.types import CONDITION_ALL, CONDITION_ANY, TaskInstance

__all__ = [
    "Event",
    "Eventor",
    "Flow",
    "FlowTaskRunner",
    "RunMode",
    "Step",
    "StepReplay",
    "StepStatus",
    "StepTriggers",
    "and_",
    "or_",
]

#: The flow's logger keeps the name users configure: ``triggers.flow``.
LOGGER_NAME = "triggers.flow"
logger = logging.getLogger(LOGGER_NAME)

STEP_TASK = "triggers.flow.step"
EVENT_TASK = "triggers.noop"


class StepTriggers(str, enum.Enum):
    """When a step fires events; the values are the outcome directives."""

    at_ready = "onReady"
    at_active = "onStart"
    at_success = "onSuccess"
    at_failure = "onFailure"
    at_complete = "onComplete"


class StepStatus(str, enum.Enum):
    ready = "ready"
    active = "active"
    success = "success"
    failure = "failure"


class StepReplay(str, enum.Enum):
    rerun = "rerun"
    skip = "skip"


class RunMode(str, enum.Enum):
    restart = "restart"
    recover = "recover"


class Event:
    """An event of a flow: a trigger name, possibly raised by an expression."""

    def __init__(self, name: str, expr: Any = None) -> None:
        self.name = name
        self.expr = expr
        self.sources: list[Any] = []  # events associated to this one (add_assoc)

    def __repr__(self) -> str:
        return f"Event({self.name!r})"


class Step:
    """A step of a flow: a callable, run when one of its events fires."""

    def __init__(self, name: str, func: Callable[..., Any], args: Sequence[Any],
                 kwargs: Mapping[str, Any], triggers: Mapping[Any, Iterable[Event]],
                 recovery: Mapping[Any, Any], config: Mapping[str, Any]) -> None:
        self.name = name
        self.func = func
        self.args = tuple(args)
        self.kwargs = dict(kwargs)
        self.triggers = {StepTriggers(key): [event_name(e) for e in events]
                         for key, events in triggers.items()}
        self.recovery = {StepStatus(key): StepReplay(value) for key, value in recovery.items()}
        self.config = dict(config)
        self.events: list[str] = []
        self.delay: float = 0.0

    def __repr__(self) -> str:
        return f"Step({self.name!r})"


def event_name(event: Event | str) -> str:
    if isinstance(event, Event):
        return event.name
    if isinstance(event, str):
        return event
    raise InvalidArgument(f"Expected an event (from add_event) or its name, got {event!r}")


def or_(*items: Any) -> dict[str, list[Any]]:
    """At least one of the items (events or expressions) holds."""
    return {CONDITION_ANY: [_expression(item) for item in items]}


def and_(*items: Any) -> dict[str, list[Any]]:
    """All of the items hold."""
    return {CONDITION_ALL: [_expression(item) for item in items]}


def _expression(item: Any) -> Any:
    """An Eventor expression as a condition item: a tuple is AND, or_() is OR."""
    if isinstance(item, (Event, str)):
        return event_name(item)
    if isinstance(item, Mapping):
        return dict(item)
    if isinstance(item, (tuple, list)):
        return {CONDITION_ALL: [_expression(nested) for nested in item]}
    raise InvalidArgument(f"Not an event expression: {item!r}")


# -- in-process execution ---------------------------------------------------------

#: Step definitions by flow name (functions cannot be stored as data).
_steps: dict[str, dict[str, Step]] = {}
#: Work queues by flow name: instances handed over by FlowTaskRunner.
_queues: dict[str, queue.Queue[tuple[Any, ...]]] = {}
_registry_guard = threading.Lock()


class FlowTaskRunner(BaseTaskRunner):
    """Hands instances of a flow to the flow's own loop (registry key ``flow``)."""

    name = "flow"

    def run(self, manager: Any, task_instance: TaskInstance) -> None:
        flow_name = task_instance.config.extras.get("flow")
        if flow_name not in _queues:
            raise InvalidArgument(
                f"{task_instance.name} uses the 'flow' runner, but no flow "
                f"{flow_name!r} runs in this process")
        storage = manager.storage
        _queues[flow_name].put((type(manager), type(storage), storage.uid, storage.get_options(),
                                task_instance.name, task_instance.start_after or 0.0,
                                task_instance.config.run))


class FlowStep(TriggerTask):
    """Calls a flow step's function with its args and kwargs."""

    name = STEP_TASK

    def _run(self, context: TaskContext) -> dict[str, Any]:
        config = context.task_instance.config
        step = _steps.get(config.extras.get("flow", ""), {}).get(config.name)
        if step is None:
            raise InvalidArgument(f"Step {config.name!r} of flow {config.extras.get('flow')!r} "
                                  "is not defined in this process")
        logger.info("Running step %s", context.task_instance.name)
        value = step.func(*step.args, **step.kwargs)
        logger.info("Step completed %s, result %r", context.task_instance.name, value)
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            value = repr(value)
        return {"result": value}


class Flow:
    """Eventor's programmatic API on the triggers engine; see the module documentation."""

    _names: ClassVar[set[str]] = set()

    def __init__(self, name: str = "", store: str = "", run_mode: RunMode | str = RunMode.restart,
                 recovery_run: Any = None, logging_level: int = logging.INFO,
                 config: Mapping[str, Any] | None = None) -> None:
        caller = inspect.stack()[1].filename
        self.name = name or os.path.splitext(os.path.basename(caller))[0]
        if ":" in self.name:
            raise InvalidArgument(f"A flow name may not contain ':', got {self.name!r}")
        self.store = store or os.path.splitext(caller)[0] + ".db"
        self.run_mode = RunMode(run_mode)
        self.recovery_run = recovery_run
        config = dict(config or {})
        self.max_concurrent = int(config.get("max_concurrent", 1))
        self.stop_on_exception = bool(config.get("stop_on_exception", True))
        self.sleep_between_loops = float(config.get("sleep_between_loops", 0.01))
        logging.getLogger(LOGGER_NAME).setLevel(logging_level)
        self.events: dict[str, Event] = {}
        self.steps: dict[str, Step] = {}
        self._sequences: dict[str, str] = {}  # session UID -> sequence
        self._configured: set[str] = set()
        self._storage_key, self._storage_options = _storage_for(self.store)
        with _registry_guard:
            _steps[self.name] = self.steps
            _queues.setdefault(self.name, queue.Queue())

    # -- building ------------------------------------------------------------

    def add_event(self, name: str, expr: Any = None) -> Event:
        """An event; with ``expr`` it is raised when the expression holds."""
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"An event name must be a non-empty string, got {name!r}")
        event = Event(name, _expression(expr) if expr is not None else None)
        self.events[name] = event
        return event

    def add_step(self, name: str, func: Callable[..., Any], args: Sequence[Any] = (),
                 kwargs: Mapping[str, Any] | None = None,
                 triggers: Mapping[Any, Iterable[Event]] | None = None,
                 recovery: Mapping[Any, Any] | None = None,
                 config: Mapping[str, Any] | None = None) -> Step:
        """A step that calls ``func(*args, **kwargs)`` when an associated event fires."""
        if not callable(func):
            raise InvalidArgument(f"Step {name!r}: func must be callable, got {func!r}")
        step = Step(name, func, args, kwargs or {}, triggers or {}, recovery or {}, config or {})
        self.steps[name] = step
        return step

    def add_assoc(self, event: Event | str, *assocs: Step | Event, delay: float = 0) -> None:
        """``event`` triggers each of ``assocs`` (steps, or further events)."""
        source = event_name(event)
        for assoc in assocs:
            if isinstance(assoc, Step):
                assoc.events.append(source)
                assoc.delay = max(assoc.delay, float(delay))
            elif isinstance(assoc, Event):
                assoc.sources.append(source)
            else:
                raise InvalidArgument(f"add_assoc() takes steps and events, got {assoc!r}")

    def configuration(self) -> dict[str, dict[str, Any]]:
        """The trigger configuration this flow translates to."""
        config: dict[str, dict[str, Any]] = {}
        for event in self.events.values():
            items = ([event.expr] if event.expr is not None else []) + list(event.sources)
            if not items:
                continue
            after = items if event.expr is not None and not event.sources else [
                {CONDITION_ANY: items}]
            config[event.name] = {"after": after, "run": EVENT_TASK, "using": "flow",
                                  "flow": self.name}
        for step in self.steps.values():
            if not step.events:
                continue
            after = [step.events[0]] if len(step.events) == 1 else [{CONDITION_ANY: step.events}]
            entry: dict[str, Any] = {"after": after, "run": STEP_TASK, "using": "flow",
                                     "flow": self.name}
            for when, names in step.triggers.items():
                entry[when.value] = names
            if step.recovery.get(StepStatus.failure) == StepReplay.skip:
                entry["onRecovery"] = "skip"
            if step.delay:
                entry["delay"] = step.delay
            config[step.name] = entry
        return config

    # -- running -------------------------------------------------------------

    def manager(self, sequence: Any) -> Any:
        """The trigger manager of one sequence's session (configured on first use)."""
        from triggers.manager import TriggerManager, build_manager

        uid = f"{self.name}:{sequence}"
        manager: TriggerManager = build_manager("default", self._storage_key, uid,
                                                self._storage_options)
        if uid not in self._configured:
            if self.run_mode == RunMode.restart:
                # A restart is a new run: forget what an earlier run left in the store.
                manager.storage.delete()
            manager.update_configuration(self.configuration())
            self._configured.add(uid)
            self._sequences[uid] = str(sequence)
        return manager

    def trigger_event(self, event: Event | str, sequence: Any = None) -> None:
        """Fire ``event`` in ``sequence`` (one session per sequence)."""
        self.manager(sequence if sequence is not None else 0).fire(event_name(event))

    def __call__(self) -> bool:
        return self.run()

    def run(self) -> bool:
        """Run until nothing is left to do; return whether every failure was handled."""
        if self.run_mode == RunMode.recover:
            self._recover()
        work = _queues[self.name]
        limit = self.max_concurrent if self.max_concurrent >= 1 else None
        running: set[Future[Any]] = set()
        delayed: list[tuple[Any, ...]] = []
        stopped = False
        with ThreadPoolExecutor(max_workers=limit or 64, thread_name_prefix=self.name) as pool:
            while True:
                while True:
                    try:
                        delayed.append(work.get_nowait())
                    except queue.Empty:
                        break
                now = time.time()
                if not stopped:
                    for item in sorted(delayed, key=lambda entry: entry[5]):
                        if limit is not None and len(running) >= limit:
                            break
                        if item[5] <= now:
                            delayed.remove(item)
                            running.add(pool.submit(_execute, item))
                if not running and (stopped or not delayed) and work.empty():
                    break
                if running:
                    done, running = _wait(running, self.sleep_between_loops)
                    for future in done:
                        failed_step = future.result()
                        if failed_step and not stopped and self._stops(failed_step):
                            stopped = True
                            logger.info("Stopping %s: step %s failed without a failure handler",
                                        self.name, failed_step)
                else:
                    time.sleep(self.sleep_between_loops)
        logger.info("Processing finished")
        return self.failures_handled()

    def _stops(self, step_name: str) -> bool:
        """Whether an unhandled failure of this step stops the run (step config first)."""
        step = self.steps.get(step_name)
        if step is not None and "stop_on_exception" in step.config:
            return bool(step.config["stop_on_exception"])
        return self.stop_on_exception

    def failures_handled(self) -> bool:
        """Whether every failed step of this run's sequences has a failure handler."""
        for sequence in list(self._sequences.values()):
            manager = self.manager(sequence)
            for instance in manager.get_unresolved_instances():
                if instance.status.value == "failed" and not _handled(instance):
                    return False
        return True

    def _recover(self) -> None:
        from triggers.manager import build_manager

        for uid in _session_uids(self._storage_key, self._storage_options, self.name):
            manager = build_manager("default", self._storage_key, uid, self._storage_options)
            manager.update_configuration(self.configuration())
            self._configured.add(uid)
            self._sequences.setdefault(uid, uid.partition(":")[2])
            report = manager.recovery_run(older_than=0)
            logger.info("Recovering %s: %s", uid, report)


def _handled(instance: TaskInstance) -> bool:
    return bool(instance.config.outcome_triggers("onFailure"))


def _wait(running: set[Future[Any]], timeout: float) -> tuple[set[Future[Any]], set[Future[Any]]]:
    done, pending = wait(running, timeout=timeout, return_when=FIRST_COMPLETED)
    return set(done), set(pending)


def _execute(item: tuple[Any, ...]) -> str | None:
    """Run one handed-over instance; its task's name if it failed without a handler."""
    from celery import current_app

    from triggers.runners import close_thread_connections

    manager_class, storage_class, uid, options, name, _, task_name = item
    try:
        manager = manager_class(storage_class(uid, **options))
        task = current_app.tasks[task_name]
        assert isinstance(task, TriggerTask)
        task.execute_in_thread(manager, name)
        instance = manager.storage[name]
        if instance.status.value == "failed" and not _handled(instance):
            return str(instance.task_name)
        return None
    finally:
        close_thread_connections()


def _storage_for(store: str) -> tuple[str, dict[str, Any]]:
    if store == ":memory:":
        return "memory", {"namespace": "flow"}
    if store == "db" or store.startswith("db:"):
        return "db", {"using": store.partition(":")[2] or "default"}
    from django.conf import settings

    if settings.configured:
        raise InvalidArgument(
            f"Flow store {store!r}: Django is configured already, so a SQLite file cannot be "
            "set up for the flow; use store='db' (or 'db:<alias>') for the project's database, "
            "or ':memory:'.")
    import django
    from django.core.management import call_command

    settings.configure(
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "triggers"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": store,
                               "OPTIONS": {"timeout": 30}}},
        USE_TZ=True,
    )
    django.setup()
    call_command("migrate", verbosity=0)
    return "db", {"using": "default"}


def _session_uids(storage_key: str, options: Mapping[str, Any], flow_name: str) -> list[str]:
    if storage_key == "memory":
        from triggers.storages.memory import MemoryStorageBackend

        uids = MemoryStorageBackend.session_uids(options["namespace"])
    else:
        from triggers.storages.database import DatabaseStorageBackend

        uids = DatabaseStorageBackend.session_uids(options["using"])
    return [uid for uid in uids if uid.startswith(f"{flow_name}:")]


#: Eventor's name for the same class.
Eventor = Flow
