"""Task configurations, task instances and their statuses."""

from __future__ import annotations

import datetime
import enum
import logging
import time
from collections.abc import Collection, Iterable, Mapping
from typing import Any

__all__ = [
    "lease_expired",
    "CONDITION_ALL",
    "CONDITION_ANY",
    "INSTANCE_SEPARATOR",
    "OPEN_STATUSES",
    "RESOLVED_STATUSES",
    "STATUS_ABANDONED",
    "STATUS_FAILED",
    "STATUS_FINISHED",
    "STATUS_REPLAYED",
    "STATUS_RUNNING",
    "STATUS_SCHEDULED",
    "STATUS_SKIPPED",
    "STATUS_UNSTARTED",
    "TaskConfig",
    "TaskInstance",
    "TaskStatus",
    "condition_met",
    "condition_names",
    "merge_dict",
]

#: Separates a task's name from an instance's number: ``t_importSubject#0``.
INSTANCE_SEPARATOR = "#"


class TaskStatus(str, enum.Enum):
    """Status of a task instance. Members compare equal to their string values."""

    UNSTARTED = "unstarted"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    ABANDONED = "abandoned"
    REPLAYED = "replayed"
    SKIPPED = "skipped"

    def __str__(self) -> str:
        return self.value

    @property
    def is_resolved(self) -> bool:
        return self in RESOLVED_STATUSES


STATUS_UNSTARTED = TaskStatus.UNSTARTED
STATUS_SCHEDULED = TaskStatus.SCHEDULED
STATUS_RUNNING = TaskStatus.RUNNING
STATUS_FINISHED = TaskStatus.FINISHED
STATUS_FAILED = TaskStatus.FAILED
STATUS_ABANDONED = TaskStatus.ABANDONED
STATUS_REPLAYED = TaskStatus.REPLAYED
STATUS_SKIPPED = TaskStatus.SKIPPED

#: Statuses after which nothing more happens to an instance.
RESOLVED_STATUSES = frozenset({STATUS_FINISHED, STATUS_ABANDONED, STATUS_REPLAYED, STATUS_SKIPPED})
#: Statuses of instances that still need attention (a failed one must be replayed or skipped).
OPEN_STATUSES = frozenset(TaskStatus) - RESOLVED_STATUSES

# Names of the configuration directives, as written in a configuration.
DIRECTIVE_AFTER = "after"
DIRECTIVE_RUN = "run"
DIRECTIVE_AND_EVERY = "andEvery"
DIRECTIVE_UNLESS = "unless"
DIRECTIVE_WITH_PARAMS = "withParams"
DIRECTIVE_USING = "using"
DIRECTIVE_DELAY = "delay"
DIRECTIVE_ON_READY = "onReady"
DIRECTIVE_ON_START = "onStart"
DIRECTIVE_ON_SUCCESS = "onSuccess"
DIRECTIVE_ON_FAILURE = "onFailure"
DIRECTIVE_ON_COMPLETE = "onComplete"
DIRECTIVE_ON_RECOVERY = "onRecovery"
#: Outcome directives: triggers fired when an instance becomes ready, starts,
#: succeeds, fails (retries exhausted), or completes either way.
OUTCOME_DIRECTIVES = (
    DIRECTIVE_ON_READY,
    DIRECTIVE_ON_START,
    DIRECTIVE_ON_SUCCESS,
    DIRECTIVE_ON_FAILURE,
    DIRECTIVE_ON_COMPLETE,
)
DIRECTIVES = (
    DIRECTIVE_AFTER,
    DIRECTIVE_RUN,
    DIRECTIVE_AND_EVERY,
    DIRECTIVE_UNLESS,
    DIRECTIVE_WITH_PARAMS,
    DIRECTIVE_USING,
    DIRECTIVE_DELAY,
    DIRECTIVE_ON_RECOVERY,
    *OUTCOME_DIRECTIVES,
)
#: Keys of a nested condition: ``{"any": [...]}`` (OR) and ``{"all": [...]}`` (AND).
CONDITION_ANY = "any"
CONDITION_ALL = "all"

#: A condition: a list of items that must all hold; an item is a trigger name,
#: ``{"any": [items]}`` (at least one holds) or ``{"all": [items]}`` (all hold).
Condition = list[Any]


def merge_dict(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` deep-merged over ``base``: nested mappings merge, other values replace.

    How a task's ``withParams`` combine with the kwargs its triggers were fired
    with: ``merge_dict(with_params, fired)`` (fired values win).
    """
    merged = dict(base)
    for key, value in override.items():
        below = merged.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            merged[key] = merge_dict(below, value)
        else:
            merged[key] = value
    return merged


def condition_names(condition: Iterable[Any]) -> set[str]:
    """Every trigger name a condition mentions."""
    names: set[str] = set()
    for item in condition:
        if isinstance(item, str):
            names.add(item)
        elif isinstance(item, Mapping):
            for nested in item.values():
                names |= condition_names(nested)
    return names


def condition_met(condition: Iterable[Any], fired: Collection[str]) -> bool:
    """Whether every item of ``condition`` holds, given the triggers that fired."""
    return all(_item_met(item, fired) for item in condition)


def _item_met(item: Any, fired: Collection[str]) -> bool:
    if isinstance(item, str):
        return item in fired
    if CONDITION_ANY in item:
        return any(_item_met(nested, fired) for nested in item[CONDITION_ANY])
    return all(_item_met(nested, fired) for nested in item[CONDITION_ALL])


def describe_item(item: Any) -> str:
    """``a``, ``(b | c)``, ``(d & e)``: a condition item for people."""
    if isinstance(item, str):
        return item
    if CONDITION_ANY in item:
        return "(" + " | ".join(describe_item(nested) for nested in item[CONDITION_ANY]) + ")"
    return "(" + " & ".join(describe_item(nested) for nested in item[CONDITION_ALL]) + ")"


class TaskConfig:
    """The configuration of one trigger task (one entry of a session's configuration).

    ``after``, ``run``, ``and_every``, ``unless``, ``with_params`` and ``using``
    hold the directives; ``extras`` keeps every other key verbatim for custom
    managers.
    """

    __slots__ = ("_declared_after", "_names", "after", "and_every", "delay", "extras", "name",
                 "on_recovery", "outcomes", "run", "unless", "using", "with_params")

    def __init__(
        self,
        name: str,
        after: Iterable[str],
        run: str,
        and_every: str | None = None,
        unless: Iterable[str] | None = None,
        with_params: Mapping[str, Mapping[str, Any]] | None = None,
        using: str | None = None,
        extras: Mapping[str, Any] | None = None,
        delay: float | None = None,
        outcomes: Mapping[str, Iterable[str]] | None = None,
        on_recovery: str | None = None,
    ) -> None:
        self.name = name
        declared = sorted(after) if isinstance(after, (set, frozenset)) else list(after)
        self._declared_after = declared
        #: The condition an instance waits for: the ``after`` items, and the ``andEvery``
        #: trigger (an instance needs it too, as in the original).
        self.after: list[Any] = declared + (
            [and_every] if and_every and and_every not in declared else [])
        self.run = run
        self.and_every = and_every
        self.unless: list[str] = (sorted(unless) if isinstance(unless, (set, frozenset))
                                  else list(unless or ()))
        self.with_params: dict[str, dict[str, Any]] = {
            key: dict(value) for key, value in (with_params or {}).items()
        }
        self.using = using
        self.extras: dict[str, Any] = dict(extras or {})
        #: Seconds between becoming ready and starting.
        self.delay = delay
        #: Outcome directive (``onSuccess`` …) → triggers it fires.
        self.outcomes: dict[str, list[str]] = {
            key: list(value) for key, value in (outcomes or {}).items() if value}
        #: ``rerun`` or ``skip``: what a recovery run does with a failed instance.
        self.on_recovery = on_recovery
        #: Every trigger name the task reacts to.
        self._names = condition_names(self.after) | condition_names(self.unless) | (
            {and_every} if and_every else set())

    # camelCase aliases, matching the directive names of a configuration.
    @property
    def andEvery(self) -> str | None:  # noqa: N802 - mirrors the directive name
        return self.and_every

    @property
    def withParams(self) -> dict[str, dict[str, Any]]:  # noqa: N802 - mirrors the directive name
        return self.with_params

    @property
    def triggers(self) -> set[str]:
        """Every trigger this task reacts to (``after``, ``andEvery`` and ``unless``)."""
        return self._names

    @property
    def after_names(self) -> set[str]:
        """Every trigger name in ``after`` (nested conditions included)."""
        return condition_names(self.after)

    @property
    def unless_names(self) -> set[str]:
        """Every trigger name in ``unless`` (nested conditions included)."""
        return condition_names(self.unless)

    @property
    def after_sorted(self) -> list[str]:
        """The trigger names in ``after``, sorted (handy in templates)."""
        return sorted(self.after_names)

    @property
    def unless_sorted(self) -> list[str]:
        """The trigger names in ``unless``, sorted (handy in templates)."""
        return sorted(self.unless_names)

    @property
    def extra(self) -> dict[str, Any]:
        """The original's name for :attr:`extras`."""
        return self.extras

    def uses_trigger(self, trigger_name: str) -> bool:
        """Whether the task reacts to ``trigger_name`` (``after``, ``andEvery`` or ``unless``)."""
        return trigger_name in self._names

    def outcome_triggers(self, directive: str) -> list[str]:
        """Triggers the outcome directive (``onSuccess`` …) fires."""
        return self.outcomes.get(directive, [])

    def to_dict(self) -> dict[str, Any]:
        """The configuration entry, as it would be written in a configuration."""
        data: dict[str, Any] = {DIRECTIVE_AFTER: list(self._declared_after),
                                DIRECTIVE_RUN: self.run}
        if self.and_every is not None:
            data[DIRECTIVE_AND_EVERY] = self.and_every
        if self.unless:
            data[DIRECTIVE_UNLESS] = list(self.unless)
        if self.with_params:
            data[DIRECTIVE_WITH_PARAMS] = {k: dict(v) for k, v in self.with_params.items()}
        if self.using is not None:
            data[DIRECTIVE_USING] = self.using
        if self.delay is not None:
            data[DIRECTIVE_DELAY] = self.delay
        for directive, names in self.outcomes.items():
            data[directive] = list(names)
        if self.on_recovery is not None:
            data[DIRECTIVE_ON_RECOVERY] = self.on_recovery
        data.update(self.extras)
        return data

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> TaskConfig:
        """Build from a configuration entry (validated beforehand, see ``triggers.config``)."""
        extras = {key: value for key, value in data.items() if key not in DIRECTIVES}
        return cls(
            name=name,
            after=data.get(DIRECTIVE_AFTER) or (),
            run=data[DIRECTIVE_RUN],
            and_every=data.get(DIRECTIVE_AND_EVERY),
            unless=data.get(DIRECTIVE_UNLESS) or (),
            with_params=data.get(DIRECTIVE_WITH_PARAMS) or {},
            using=data.get(DIRECTIVE_USING),
            extras=extras,
            delay=data.get(DIRECTIVE_DELAY),
            outcomes={key: data[key] for key in OUTCOME_DIRECTIVES if data.get(key)},
            on_recovery=data.get(DIRECTIVE_ON_RECOVERY),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TaskConfig):
            return NotImplemented
        return self.name == other.name and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"TaskConfig({self.name!r}, {self.to_dict()!r})"


def now() -> float:
    """Current time as stored in instance metadata (epoch seconds, millisecond precision)."""
    return round(time.time(), 3)


class TaskInstance:
    """One run of a trigger task: ``<task>#<n>``.

    ``kwargs`` maps each trigger that reached the instance to the kwargs it was
    fired with; ``metadata`` holds timestamps, results, failures and anything a
    manager or task attached.
    """

    __slots__ = ("_status", "abandon_state", "config", "kwargs", "metadata", "name")

    # The original's names for the statuses (members of TaskStatus, equal to strings).
    STATUS_UNSTARTED = STATUS_UNSTARTED
    STATUS_SCHEDULED = STATUS_SCHEDULED
    STATUS_RUNNING = STATUS_RUNNING
    STATUS_FINISHED = STATUS_FINISHED
    STATUS_FAILED = STATUS_FAILED
    STATUS_ABANDONED = STATUS_ABANDONED
    STATUS_REPLAYED = STATUS_REPLAYED
    STATUS_SKIPPED = STATUS_SKIPPED

    # Metadata keys (the original's constant names; see docs/statuses.rst).
    META_COOLDOWN = "cooldown"
    META_DEPTH = "depth"
    META_EXCEPTION_CONTEXT = "exc_context"
    META_EXCEPTION_INFO = "exc_traceback"
    META_EXCEPTION_MESSAGE = "exc_message"
    META_EXCEPTION_TYPE = "exc_type"
    META_LOG_LEVEL = "log_level"
    META_LOGS_RESOLVED = "logs_resolved"
    META_PARENT = "parent"
    META_RESULT = "result"
    #: The original kept its timestamps nested under this key; triggers keeps them flat,
    #: as epoch seconds at the TIMESTAMP_* keys and at ``scheduled``, ``started`` and
    #: ``finished`` (see created / last_modified).
    META_TIMESTAMPS = "timestamps"
    TIMESTAMP_CREATED = "created"
    TIMESTAMP_LAST_MODIFIED = "modified"

    def __init__(
        self,
        name: str,
        config: TaskConfig,
        kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        status: TaskStatus | str = STATUS_UNSTARTED,
        metadata: Mapping[str, Any] | None = None,
        abandon_state: Iterable[str] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.kwargs: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (kwargs or {}).items()}
        self.status = status  # coerced to TaskStatus by the setter
        self.metadata: dict[str, Any] = dict(metadata or {})
        #: The ``unless`` triggers that reached this instance (it is abandoned once
        #: they meet the task's ``unless`` condition, before it starts).
        self.abandon_state: set[str] = set(abandon_state or ())

    @property
    def status(self) -> TaskStatus:
        return self._status

    @status.setter
    def status(self, value: TaskStatus | str) -> None:
        self._status = TaskStatus(value)

    @property
    def task_name(self) -> str:
        return self.config.name

    @property
    def number(self) -> int:
        return int(self.name.rsplit(INSTANCE_SEPARATOR, 1)[1])

    @property
    def missing_triggers(self) -> list[str]:
        """``after`` items that do not hold yet (``(b | c)`` for an unmet OR)."""
        return [describe_item(item) for item in self.config.after
                if not _item_met(item, self.kwargs)]

    @property
    def is_ready(self) -> bool:
        """Whether the ``after`` condition (``andEvery`` included) holds for the triggers
        that reached it."""
        return condition_met(self.config.after, self.kwargs)

    @property
    def start_after(self) -> float | None:
        """When a delayed (or cooling-down) scheduled instance may start (epoch seconds)."""
        value = self.metadata.get("start_after")
        return float(value) if value is not None else None

    @property
    def is_waiting(self) -> bool:
        """Not started yet: unstarted, or scheduled but still waiting out its delay.

        Triggers still reach a waiting instance, and ``unless`` can abandon it.
        """
        if self.status == STATUS_UNSTARTED:
            return True
        start_after = self.start_after
        return (self.status == STATUS_SCHEDULED and start_after is not None
                and start_after > time.time())

    @property
    def can_abandon(self) -> bool:
        """Not started yet, and the ``unless`` triggers that reached it meet the condition."""
        return (bool(self.config.unless) and self.is_waiting
                and condition_met(self.config.unless, self.abandon_state))

    @property
    def can_run(self) -> bool:
        """Every ``after`` trigger has fired, it has not started, and is not to be abandoned."""
        return (self.status in (STATUS_UNSTARTED, STATUS_SCHEDULED) and self.is_ready
                and not self.can_abandon)

    @property
    def can_schedule(self) -> bool:
        """Ready to be handed to a runner: unstarted, every ``after`` trigger fired, not abandoned."""
        return self.status == STATUS_UNSTARTED and self.is_ready and not self.can_abandon

    def apply_trigger(self, trigger_name: str, kwargs: Mapping[str, Any]) -> bool:
        """Record a trigger that reached this waiting instance; whether it applied.

        An ``after`` trigger applies once (the first kwargs are kept); an
        ``unless`` trigger is recorded in :attr:`abandon_state`.
        """
        applied = False
        if (self.status == STATUS_UNSTARTED and trigger_name not in self.kwargs
                and trigger_name in self.config.after_names):
            self.kwargs[trigger_name] = dict(kwargs)
            applied = True
        if (self.is_waiting and trigger_name not in self.abandon_state
                and trigger_name in self.config.unless_names):
            self.abandon_state.add(trigger_name)
            applied = True
        return applied

    @property
    def can_replay(self) -> bool:
        return self.status == STATUS_FAILED

    @property
    def can_skip(self) -> bool:
        return self.status == STATUS_FAILED

    @property
    def is_resolved(self) -> bool:
        return self.status in RESOLVED_STATUSES

    @property
    def created(self) -> datetime.datetime | None:
        """When the instance was created (aware, UTC)."""
        return _timestamp(self.metadata.get(self.TIMESTAMP_CREATED))

    @property
    def last_modified(self) -> datetime.datetime | None:
        """When the instance last changed (aware, UTC)."""
        return _timestamp(self.metadata.get(self.TIMESTAMP_LAST_MODIFIED))

    @property
    def log_level(self) -> int:
        """Highest log level the task emitted (``logging.NOTSET`` until it ran)."""
        return int(self.metadata.get("log_level", logging.NOTSET))

    @property
    def log_level_name(self) -> str:
        return logging.getLevelName(self.log_level)

    @property
    def logs_resolved(self) -> bool:
        return bool(self.metadata.get("logs_resolved", False))

    @property
    def has_unresolved_logs(self) -> bool:
        """It logged a warning or worse, and nobody marked its logs resolved yet."""
        return self.log_level >= logging.WARNING and not self.logs_resolved

    def set_status(self, status: TaskStatus | str, **metadata: Any) -> None:
        """Change the status, record when, and merge ``metadata``."""
        self.status = TaskStatus(status)
        self.metadata.update(metadata)
        self.metadata["modified"] = now()
        if self.status in RESOLVED_STATUSES:
            # Only a running instance needs its run token.
            self.metadata.pop("run", None)
        if self.status != TaskStatus.RUNNING:
            self.metadata.pop("lease", None)  # a lease is a running instance's
        if "redispatch_at" not in metadata:
            # Owed dispatches count from the latest change (see triggers.timers).
            self.metadata.pop("redispatch_at", None)
            self.metadata.pop("redispatches", None)
        if not self.metadata.get("log_level"):
            self.metadata.pop("log_level", None)

    def to_dict(self) -> dict[str, Any]:
        """Compact JSON-ready form (the configuration is stored once, with the session)."""
        # The task's name is part of the instance's name, so it is not stored again.
        data: dict[str, Any] = {"status": self.status.value}
        if self.kwargs:
            data["kwargs"] = self.kwargs
        if self.metadata:
            data["meta"] = self.metadata
        if self.abandon_state:
            data["unless"] = sorted(self.abandon_state)
        return data

    def copy(self) -> TaskInstance:
        return TaskInstance(self.name, self.config, self.kwargs, self.status, self.metadata,
                            self.abandon_state)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TaskInstance):
            return NotImplemented
        return (
            self.name == other.name
            and self.status == other.status
            and self.kwargs == other.kwargs
            and self.metadata == other.metadata
            and self.abandon_state == other.abandon_state
            and self.config == other.config
        )

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"TaskInstance({self.name!r}, status={self.status.value!r})"


def _timestamp(value: Any) -> datetime.datetime | None:
    if value is None:
        return None
    return datetime.datetime.fromtimestamp(float(value), tz=datetime.timezone.utc)


def instance_name(task_name: str, number: int) -> str:
    return f"{task_name}{INSTANCE_SEPARATOR}{number}"


def task_name_of(name: str) -> str:
    """``t_importSubject#3`` → ``t_importSubject``."""
    return name.rsplit(INSTANCE_SEPARATOR, 1)[0]


def lease_expired(instance: TaskInstance) -> bool:
    """Whether a running instance has a lease, and it expired (no heartbeat renewed it)."""
    lease = instance.metadata.get("lease")
    return lease is not None and float(lease) < time.time()
