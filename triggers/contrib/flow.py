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
* steps run in this process, each in a thread of its own; ``max_concurrent``
  limits how many instances of one step run at once (as in Eventor; default:
  no limit) and ``max_workers`` how many steps of the flow run at once
  (default: no limit); with ``stop_on_exception`` a failure that fires no
  ``at_failure`` or ``at_complete`` event stops new steps from starting
  (running ones finish).

A step's function can read its name, sequence and recovery number from
:data:`environ` (``EVENTOR_STEP_NAME``, ``EVENTOR_STEP_SEQUENCE``,
``EVENTOR_STEP_RECOVERY``).

The store is ``":memory:"`` (this process), a SQLite file path (when Django
is not configured yet: it is configured for it), or ``"db"`` / ``"db:<alias>"``
(the project's database).  Looking at a stored sequence never changes it: only
:meth:`Flow.trigger_event` in ``restart`` mode starts it anew, and only a
``recover`` run resumes it.
"""

from __future__ import annotations

import contextvars
import enum
import inspect
import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any, ClassVar, NamedTuple

from triggers import tasks as _builtin_tasks  # noqa: F401 - registers triggers.noop
from triggers.exceptions import InvalidArgument
from triggers.runners import BaseTaskRunner
from triggers.task import TaskContext, TriggerTask
from triggers.types import (
    CONDITION_ALL,
    CONDITION_ANY,
    STATUS_FAILED,
    STATUS_RUNNING,
    STATUS_SCHEDULED,
    STATUS_SKIPPED,
    TaskInstance,
)

__all__ = [
    "Event",
    "Eventor",
    "Flow",
    "FlowTaskRunner",
    "RunMode",
    "Step",
    "StepEnviron",
    "StepReplay",
    "StepStatus",
    "StepTriggers",
    "and_",
    "environ",
    "or_",
]

#: The flow's logger keeps the name users configure: ``triggers.flow``.
LOGGER_NAME = "triggers.flow"
logger = logging.getLogger(LOGGER_NAME)

STEP_TASK = "triggers.flow.step"
EVENT_TASK = "triggers.noop"

#: Session metadata key: how many recovery runs the flow made on the sequence.
RECOVERY_KEY = "flow_recovery"


class StepTriggers(str, enum.Enum):
    """When a step fires events; the values are the outcome directives."""

    at_ready = "onReady"
    at_active = "onStart"
    at_success = "onSuccess"
    at_failure = "onFailure"
    at_complete = "onComplete"


class StepStatus(str, enum.Enum):
    """Eventor's step statuses: keys of ``recovery``, and also accepted as keys of ``triggers``.

    ``allocate`` and ``fueled`` (Eventor's resource allocation) never happen here.
    """

    ready = "ready"
    allocate = "allocate"
    fueled = "fueled"
    active = "active"
    success = "success"
    failure = "failure"
    complete = "complete"


class StepReplay(str, enum.Enum):
    rerun = "rerun"
    skip = "skip"


class RunMode(str, enum.Enum):
    restart = "restart"
    recover = "recover"


#: Eventor's ``triggers`` keyed by StepStatus (its own spelling) → our directives.
_STATUS_TRIGGERS = {
    StepStatus.ready: StepTriggers.at_ready,
    StepStatus.active: StepTriggers.at_active,
    StepStatus.success: StepTriggers.at_success,
    StepStatus.failure: StepTriggers.at_failure,
    StepStatus.complete: StepTriggers.at_complete,
}

#: Eventor's default recovery policies.
_RECOVERY_DEFAULTS = {
    StepStatus.ready: StepReplay.rerun,
    StepStatus.allocate: StepReplay.rerun,
    StepStatus.fueled: StepReplay.rerun,
    StepStatus.active: StepReplay.rerun,
    StepStatus.failure: StepReplay.rerun,
    StepStatus.success: StepReplay.skip,
}


class Event:
    """An event of a flow: a trigger name, possibly raised by an expression."""

    def __init__(self, name: str, expr: Any = None) -> None:
        self.name = name
        self.expr = expr
        self.sources: list[Any] = []  # events associated to this one (add_assoc)

    def __repr__(self) -> str:
        return f"Event({self.name!r})"


class Step:
    """A step of a flow: a callable (or ``None``: a step that only succeeds), run when
    one of its events fires."""

    def __init__(self, name: str, func: Callable[..., Any] | None, args: Sequence[Any],
                 kwargs: Mapping[str, Any], triggers: Mapping[Any, Iterable[Event | str]],
                 recovery: Mapping[Any, Any], config: Mapping[str, Any]) -> None:
        self.name = name
        self.func = func
        self.args = tuple(args)
        self.kwargs = dict(kwargs)
        self.triggers: dict[StepTriggers, list[str]] = {}
        for key, events in triggers.items():
            when = _trigger_key(key)
            names = [event_name(e) for e in _events(events)]
            if when is not None and names:
                self.triggers.setdefault(when, []).extend(names)
        self.recovery = _recovery_policies(recovery)
        self.config = dict(config)
        self.events: list[str] = []
        self.delay: float = 0.0

    def events_at(self, *whens: StepTriggers) -> list[str]:
        """The names of the events fired at these moments, in order, without repeats."""
        names: list[str] = []
        for when in whens:
            names += [name for name in self.triggers.get(when, []) if name not in names]
        return names

    def __repr__(self) -> str:
        return f"Step({self.name!r})"


def event_name(event: Event | str) -> str:
    if isinstance(event, Event):
        return event.name
    if isinstance(event, str):
        return event
    raise InvalidArgument(f"Expected an event (from add_event) or its name, got {event!r}")


def _events(events: Any) -> Iterable[Event | str]:
    if isinstance(events, (Event, str)):
        return [events]
    return list(events)


def _trigger_key(key: Any) -> StepTriggers | None:
    """A ``triggers`` key: StepTriggers, Eventor's StepStatus, or the name of either."""
    if isinstance(key, StepTriggers):
        return key
    if isinstance(key, StepStatus):
        return _STATUS_TRIGGERS.get(key)  # allocate/fueled: never happen here
    if isinstance(key, str):
        if key in StepTriggers.__members__:  # "at_success"
            return StepTriggers[key]
        if key in {when.value for when in StepTriggers}:  # "onSuccess"
            return StepTriggers(key)
        if key in {status.value for status in StepStatus}:  # "success"
            return _trigger_key(StepStatus(key))
    raise InvalidArgument(f"Not a step trigger (StepTriggers or StepStatus): {key!r}")


def _recovery_policies(recovery: Mapping[Any, Any]) -> dict[StepStatus, StepReplay]:
    """Eventor's recovery mapping: ``complete`` stands for failure and success."""
    try:
        given = {StepStatus(key): StepReplay(value) for key, value in recovery.items()}
    except ValueError as exc:
        raise InvalidArgument(f"Bad recovery policy {dict(recovery)!r}: {exc}") from None
    complete = given.pop(StepStatus.complete, None)
    if complete is not None:
        given.setdefault(StepStatus.failure, complete)
        given.setdefault(StepStatus.success, complete)
    return {**_RECOVERY_DEFAULTS, **given}


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


# -- what a running step sees ------------------------------------------------------


class _StepRun(NamedTuple):
    """The step running in this thread."""

    name: str
    sequence: str
    recovery: int
    prefix: str

    def variables(self) -> dict[str, str]:
        return {f"{self.prefix}STEP_NAME": self.name,
                f"{self.prefix}STEP_SEQUENCE": self.sequence,
                f"{self.prefix}STEP_RECOVERY": str(self.recovery)}


_current_step: contextvars.ContextVar[_StepRun | None] = contextvars.ContextVar(
    "triggers_flow_step", default=None)

#: Guards the EVENTOR_STEP_* variables of os.environ.
_os_environ_lock = threading.Lock()


class StepEnviron(Mapping[str, str]):
    """``os.environ`` as the step running in this thread sees it (read-only).

    In a step's thread, ``EVENTOR_STEP_NAME``, ``EVENTOR_STEP_SEQUENCE`` and
    ``EVENTOR_STEP_RECOVERY`` (with the flow's ``envvar_prefix``) are those of
    that step, whatever other steps run at the same time; every other name is
    looked up in ``os.environ``.  Use the module's instance, :data:`environ`.
    """

    def _own(self) -> dict[str, str]:
        running = _current_step.get()
        return running.variables() if running is not None else {}

    def __getitem__(self, key: str) -> str:
        own = self._own()
        if key in own:
            return own[key]
        return os.environ[key]

    def __iter__(self) -> Iterator[str]:
        own = self._own()
        yield from own
        yield from (key for key in list(os.environ) if key not in own)

    def __len__(self) -> int:
        return len(set(self._own()) | set(os.environ))

    def __repr__(self) -> str:
        return f"StepEnviron({self._own()!r} over os.environ)"


#: The environment of the running step: ``evr.environ["EVENTOR_STEP_NAME"]``.
environ = StepEnviron()


def _set_os_environ(variables: Mapping[str, str | None]) -> None:
    with _os_environ_lock:
        for key, value in variables.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- in-process execution ---------------------------------------------------------

#: Step definitions by flow name (functions cannot be stored as data).
_steps: dict[str, dict[str, Step]] = {}
#: Work queues by flow name: instances handed over by FlowTaskRunner.
_queues: dict[str, queue.Queue[_Handover]] = {}
#: Step settings by flow name (sequence_arg_name).
_settings: dict[str, dict[str, Any]] = {}
_registry_guard = threading.Lock()


class _Handover(NamedTuple):
    """An instance handed over to a flow's loop."""

    manager_class: type[Any]
    storage_class: type[Any]
    uid: str
    options: dict[str, Any]
    instance: str
    task: str           # the step's (or the event's) name
    start_after: float
    run: str            # the Celery task that runs it


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
        _queues[flow_name].put(_Handover(
            type(manager), type(storage), storage.uid, storage.get_options(), task_instance.name,
            task_instance.task_name, float(task_instance.start_after or 0.0),
            task_instance.config.run))


class FlowStep(TriggerTask):
    """Calls a flow step's function with its args and kwargs."""

    name = STEP_TASK

    def _run(self, context: TaskContext) -> dict[str, Any]:
        config = context.task_instance.config
        flow_name = config.extras.get("flow", "")
        step = _steps.get(flow_name, {}).get(config.name)
        if step is None:
            raise InvalidArgument(f"Step {config.name!r} of flow {flow_name!r} "
                                  "is not defined in this process")
        sequence = context.session_uid.partition(":")[2]
        label = f"{step.name}[{sequence}]"
        logger.info("Running step %s", label)
        if step.func is None:
            value: Any = True
        else:
            kwargs = dict(step.kwargs)
            arg_name = step.config.get("sequence_arg_name",
                                       _settings.get(flow_name, {}).get("sequence_arg_name"))
            if arg_name:
                kwargs[arg_name] = sequence
            try:
                value = step.func(*step.args, **kwargs)
            except Exception as exc:
                logger.info("Step completed %s, status: failure, exception %r", label, exc)
                raise
        logger.info("Step completed %s, status: success, result %r", label, value)
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            value = repr(value)
        return {"result": value}


class Flow:
    """Eventor's programmatic API on the triggers engine; see the module documentation.

    ``config`` keys: ``max_concurrent`` (each step's default limit of instances
    running at once; below 1: no limit, the default), ``max_workers`` (steps of
    the flow running at once; below 1: no limit, the default),
    ``stop_on_exception`` (default ``True``), ``sleep_between_loops``
    (seconds, default 0.01), ``envvar_prefix`` (default ``"EVENTOR_"``),
    ``sequence_arg_name`` (default ``None``); ``workdir``, ``logdir``,
    ``task_construct`` and other keys are accepted and ignored.
    """

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
        self.config = config
        self.max_concurrent = _int_option(config, "max_concurrent", -1)
        self.max_workers = _int_option(config, "max_workers", -1)
        self.stop_on_exception = bool(config.get("stop_on_exception", True))
        self.sleep_between_loops = float(config.get("sleep_between_loops", 0.01))
        if self.sleep_between_loops < 0:
            raise InvalidArgument(f"sleep_between_loops must be >= 0, got {self.sleep_between_loops}")
        self.envvar_prefix = str(config.get("envvar_prefix", "EVENTOR_"))
        logging.getLogger(LOGGER_NAME).setLevel(logging_level)
        self.events: dict[str, Event] = {}
        self.steps: dict[str, Step] = {}
        self._sequences: dict[str, str] = {}  # session UID -> sequence, of sessions this flow ran
        self._configured: set[str] = set()
        self._recoveries: dict[str, int] = {}  # session UID -> its recovery number
        self._recovered = False
        self._lock = threading.RLock()
        self._storage_key, self._storage_options = _storage_for(self.store)
        with _registry_guard:
            _steps[self.name] = self.steps
            _settings[self.name] = {"sequence_arg_name": config.get("sequence_arg_name")}
            _queues.setdefault(self.name, queue.Queue())
        logger.info("Eventor store file: %s", self.store)

    # -- building ------------------------------------------------------------

    def add_event(self, name: str, expr: Any = None) -> Event:
        """An event; with ``expr`` it is raised when the expression holds.

        Adding an event of the same name again returns the same event (with the
        new expression, if one is given).
        """
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"An event name must be a non-empty string, got {name!r}")
        expression = _expression(expr) if expr is not None else None
        event = self.events.get(name)
        if event is None:
            event = self.events[name] = Event(name, expression)
        elif expression is not None:
            event.expr = expression
        return event

    def add_step(self, name: str, func: Callable[..., Any] | None = None, args: Sequence[Any] = (),
                 kwargs: Mapping[str, Any] | None = None,
                 triggers: Mapping[Any, Iterable[Event | str]] | None = None,
                 recovery: Mapping[Any, Any] | None = None,
                 config: Mapping[str, Any] | None = None, *,
                 acquires: Any = None, releases: Any = None) -> Step:
        """A step that calls ``func(*args, **kwargs)`` when an associated event fires.

        ``func=None`` makes a step that does nothing and succeeds (result
        ``True``).  As in Eventor, adding a step whose name exists returns the
        existing step unchanged.  Resources (``acquires``, ``releases``) are not
        supported: passing any raises :class:`~triggers.exceptions.InvalidArgument`.
        """
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"A step name must be a non-empty string, got {name!r}")
        if func is not None and not callable(func):
            raise InvalidArgument(f"Step {name!r}: func must be callable or None, got {func!r}")
        if acquires or releases:
            raise InvalidArgument(f"Step {name!r}: resources (acquires, releases) are not "
                                  "supported by triggers.flow")
        existing = self.steps.get(name)
        if existing is not None:
            return existing
        step_config = dict(config or {})
        if "max_concurrent" in step_config:
            _int_option(step_config, "max_concurrent", -1)
        step = Step(name, func, args, kwargs or {}, triggers or {}, recovery or {}, step_config)
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
            if step.name in config:
                raise InvalidArgument(
                    f"Step {step.name!r} has the name of an event raised by an expression or "
                    "by other events: in triggers.flow both are tasks of one configuration, "
                    "so rename one of them")
            after = [step.events[0]] if len(step.events) == 1 else [{CONDITION_ANY: step.events}]
            entry: dict[str, Any] = {"after": after, "run": STEP_TASK, "using": "flow",
                                     "flow": self.name}
            for when in StepTriggers:
                if step.triggers.get(when):
                    entry[when.value] = list(step.triggers[when])
            if step.recovery.get(StepStatus.failure) == StepReplay.skip:
                entry["onRecovery"] = "skip"
            if step.delay:
                entry["delay"] = step.delay
            config[step.name] = entry
        return config

    # -- sessions ------------------------------------------------------------

    def _uid(self, sequence: Any) -> str:
        return f"{self.name}:{sequence}"

    def _build(self, uid: str) -> Any:
        from triggers.manager import build_manager

        return build_manager("default", self._storage_key, uid, self._storage_options)

    def _configure(self, manager: Any) -> None:
        uid = manager.storage.uid
        if uid not in self._configured:
            manager.update_configuration(self.configuration())
            self._configured.add(uid)

    def manager(self, sequence: Any) -> Any:
        """The :class:`~triggers.manager.TriggerManager` of one sequence's session.

        Looking never changes what a stored sequence holds: a session that has
        a configuration is returned as it is; only a new, empty one is
        configured (so that it can be fired into).  Restarting a sequence is
        :meth:`trigger_event`'s job, in ``restart`` mode.
        """
        uid = self._uid(sequence)
        manager = self._build(uid)
        with self._lock:
            if uid not in self._configured and not manager.storage.tasks:
                self._configure(manager)
        return manager

    def trigger_event(self, event: Event | str, sequence: Any = None) -> None:
        """Fire ``event`` in ``sequence`` (one session per sequence; ``None`` is 0).

        In ``restart`` mode, the first event this flow object triggers in a
        sequence starts the sequence anew: whatever the store held for it is
        deleted first (Eventor's restart empties its store).  Later events in
        the same sequence, and every event in ``recover`` mode, add to it.
        """
        name = event_name(event)
        sequence = sequence if sequence is not None else 0
        uid = self._uid(sequence)
        manager = self._build(uid)
        with self._lock:
            if uid not in self._sequences:
                if self.run_mode == RunMode.restart:
                    manager.storage.delete()
                    self._configured.discard(uid)
                    self._recoveries[uid] = 0
                self._sequences[uid] = str(sequence)
            self._configure(manager)
        manager.fire(name)

    # -- running -------------------------------------------------------------

    def __call__(self, max_loops: int = -1) -> bool:
        return self.run(max_loops)

    def run(self, max_loops: int = -1) -> bool:
        """Run until nothing is left to do; return whether every failure was handled.

        ``max_loops`` (Eventor's): below 0 (default), run until nothing is left
        to do; 0, run nothing; ``n > 0``, stop at the ``n``-th time that nothing
        is running or due — steps still waiting out a delay are then left for
        a later ``run()``.  In ``recover`` mode the first ``run()`` makes the
        recovery run.
        """
        if isinstance(max_loops, bool) or not isinstance(max_loops, int):
            raise InvalidArgument(f"max_loops must be an integer, got {max_loops!r}")
        if self.run_mode == RunMode.recover and not self._recovered:
            self._recovered = True
            self._recover()
        if max_loops != 0:
            self._loop(max_loops)
        logger.info("Processing finished")
        return self.failures_handled()

    def _loop(self, max_loops: int) -> None:
        work = _queues[self.name]
        pending: list[_Handover] = []
        running: dict[Future[bool], _Handover] = {}
        per_step: Counter[str] = Counter()
        stopped = False
        idle = 0
        names = [f"{self.envvar_prefix}STEP_{key}" for key in ("NAME", "SEQUENCE", "RECOVERY")]
        saved: dict[str, str | None] = {key: os.environ.get(key) for key in names}
        try:
            while True:
                while True:
                    try:
                        pending.append(work.get_nowait())
                    except queue.Empty:
                        break
                if not stopped:
                    now = time.time()
                    for item in sorted(pending, key=lambda entry: entry.start_after):
                        if item.start_after > now:
                            break
                        if 0 < self.max_workers <= len(running):
                            break
                        limit = self._step_limit(item)
                        if 0 < limit <= per_step[item.task]:
                            continue
                        pending.remove(item)
                        per_step[item.task] += 1
                        running[self._start(item)] = item
                if running:
                    done, _ = wait(list(running), timeout=max(self.sleep_between_loops, 0.001),
                                   return_when=FIRST_COMPLETED)
                    for future in done:
                        item = running.pop(future)
                        per_step[item.task] -= 1
                        if future.result() and not stopped and self._stops(item.task):
                            stopped = True
                            logger.info("Stopping %s: step %s[%s] failed and fired no "
                                        "at_failure or at_complete event", self.name, item.task,
                                        item.uid.partition(":")[2])
                    continue
                if not work.empty():
                    continue
                if stopped or not pending:
                    break
                # Nothing runs; what is pending waits out a delay.
                idle += 1
                if 0 < max_loops <= idle:
                    break
                due = min(item.start_after for item in pending)
                time.sleep(max(0.0, min(self.sleep_between_loops, due - time.time())))
        finally:
            if not stopped:
                for item in pending:  # left for a later run()
                    work.put(item)
            _set_os_environ(saved)

    def _step_limit(self, item: _Handover) -> int:
        """How many instances of the item's step may run at once (0: no limit)."""
        if item.run != STEP_TASK:
            return 0
        step = self.steps.get(item.task)
        limit = self.max_concurrent
        if step is not None and "max_concurrent" in step.config:
            limit = int(step.config["max_concurrent"])
        return max(limit, 0)

    def _recovery_number(self, uid: str) -> int:
        """How many recovery runs the flow made on the session (its steps' EVENTOR_STEP_RECOVERY)."""
        number = self._recoveries.get(uid)
        if number is None:
            number = int(self._build(uid).storage.metadata.get(RECOVERY_KEY) or 0)
            self._recoveries[uid] = number
        return number

    def _start(self, item: _Handover) -> Future[bool]:
        future: Future[bool] = Future()
        future.set_running_or_notify_cancel()
        running = None
        if item.run == STEP_TASK:
            running = _StepRun(item.task, item.uid.partition(":")[2],
                               self._recovery_number(item.uid), self.envvar_prefix)

        def target() -> None:
            try:
                future.set_result(_execute(item, running))
            except BaseException as exc:  # noqa: BLE001 - handed to the loop
                future.set_exception(exc)

        threading.Thread(target=target, name=f"{self.name}-{item.instance}").start()
        return future

    def _stops(self, step_name: str) -> bool:
        """Whether an unhandled failure of this step stops the run (step config first)."""
        step = self.steps.get(step_name)
        if step is not None and "stop_on_exception" in step.config:
            return bool(step.config["stop_on_exception"])
        return self.stop_on_exception

    def failures_handled(self) -> bool:
        """Whether every failed step of the sequences this flow ran fired an
        ``at_failure`` or ``at_complete`` event."""
        for uid in list(self._sequences):
            for instance in self._build(uid).get_unresolved_instances():
                if instance.status == STATUS_FAILED and not _handled(instance):
                    return False
        return True

    def get_step_name(self) -> str:
        """The name of the step running in this thread ('' outside a step), as in Eventor."""
        return environ.get(f"{self.envvar_prefix}STEP_NAME", "")

    def get_step_sequence(self) -> str:
        """The sequence of the step running in this thread ('' outside a step), as in Eventor."""
        return environ.get(f"{self.envvar_prefix}STEP_SEQUENCE", "")

    def get_step_recovery(self) -> str:
        """The recovery number of the step running in this thread ('' outside a step)."""
        return environ.get(f"{self.envvar_prefix}STEP_RECOVERY", "")

    # -- recovery ------------------------------------------------------------

    def _recover(self) -> None:
        for uid in _session_uids(self._storage_key, self._storage_options, self.name):
            manager = self._build(uid)
            with self._lock:
                self._configure(manager)
                self._sequences.setdefault(uid, uid.partition(":")[2])
            number = int(manager.storage.metadata.get(RECOVERY_KEY) or 0) + 1
            manager.storage.transact(lambda step, n=number: step.set_metadata(RECOVERY_KEY, n))
            self._recoveries[uid] = number
            skipped = self._skip_by_policy(manager)
            report = manager.recovery_run(older_than=0)
            report["skipped"] = skipped + report["skipped"]
            logger.info("Recovering %s: %s", uid, report)
            self._succeed_skipped(manager)

    def _skip_by_policy(self, manager: Any) -> list[str]:
        """Mark ``skipped`` the unfinished steps whose recovery policy is ``skip``.

        As in Eventor, such a step does not run again but counts as succeeded:
        :meth:`_succeed_skipped` then fires what its success fires.  Done
        before the recovery run, so that it neither replays nor re-dispatches
        them; the mark ``flow_skip: pending`` lets a later recovery finish the
        job if this process dies in between.
        """
        state_of = {STATUS_FAILED: StepStatus.failure, STATUS_SCHEDULED: StepStatus.ready,
                    STATUS_RUNNING: StepStatus.active}
        skipped: list[str] = []
        for instance in manager.get_unresolved_instances():
            step = self.steps.get(instance.task_name)
            state = state_of.get(instance.status)
            if step is None or state is None or step.recovery[state] != StepReplay.skip:
                continue
            manager.update_instance_status(instance.name, STATUS_SKIPPED, {
                _SKIP_KEY: "pending", "skipped_from": instance.status.value,
                "result": _SKIP_RESULT})
            skipped.append(instance.name)
        return skipped

    def _succeed_skipped(self, manager: Any) -> None:
        """Fire, for each step skipped by policy, its at_success and at_complete events and
        its cascade, as if it had succeeded."""
        for instance in list(manager.storage):
            if instance.status != STATUS_SKIPPED or instance.metadata.get(_SKIP_KEY) != "pending":
                continue
            step = self.steps.get(instance.task_name)
            names = [] if step is None else step.events_at(StepTriggers.at_success,
                                                           StepTriggers.at_complete)
            for name in [*names, instance.task_name]:
                manager.fire(name, _SKIP_RESULT)
            manager.update_instance_metadata(instance.name, {_SKIP_KEY: "done", "cascade": True})


#: Instance metadata of a step skipped by its recovery policy: "pending", then "done".
_SKIP_KEY = "flow_skip"
#: The result (and the kwargs of its events) of a step skipped by its recovery policy.
_SKIP_RESULT: dict[str, Any] = {"result": None}


def _int_option(config: Mapping[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{key} must be an integer, got {value!r}")
    return value


def _handled(instance: TaskInstance) -> bool:
    """Eventor: a failure is handled when it fires events (at_failure, or at_complete)."""
    return bool(instance.config.outcome_triggers("onFailure")
                or instance.config.outcome_triggers("onComplete"))


def _execute(item: _Handover, running: _StepRun | None) -> bool:
    """Run one handed-over instance (a step: as ``running``); whether it failed without
    firing an event."""
    from celery import current_app

    from triggers.runners import close_thread_connections

    token = None
    try:
        manager = item.manager_class(item.storage_class(item.uid, **item.options))
        if running is not None:
            token = _current_step.set(running)
            _set_os_environ(running.variables())
        task = current_app.tasks[item.run]
        assert isinstance(task, TriggerTask)
        task.execute_in_thread(manager, item.instance)
        instance = manager.storage[item.instance]
        return instance.status == STATUS_FAILED and not _handled(instance)
    finally:
        if token is not None:
            _current_step.reset(token)
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
    from triggers.storages import storage_backends

    uids = storage_backends.get_class(storage_key).session_uids(**options)
    return [uid for uid in uids if uid.startswith(f"{flow_name}:")]


#: Eventor's name for the same class.
Eventor = Flow
