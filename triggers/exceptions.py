"""Exceptions raised by triggers.

Every exception derives from :class:`TriggersError`; most also derive from the
built-in class a caller would naturally catch::

    TriggersError
    ├── ConfigurationError (ValueError)        bad trigger configuration
    ├── InvalidTrigger (ValueError)            bad trigger name or kwargs in fire()
    ├── InvalidArgument (ValueError)           any other bad argument to a public call
    ├── InstanceNotFound (KeyError)            no such task instance in the session
    ├── InvalidInstanceStatus (ValueError)     operation not allowed in the instance's status
    ├── UnknownRegistryKey (RegistryKeyError)  unknown manager / storage / runner key
    ├── UnknownTask (LookupError)              ``run`` names no registered TriggerTask
    ├── InvalidTaskResult (TypeError)          ``_run`` returned something unusable
    ├── InvalidTaskKwargs (ValueError)         TaskContext.filter_kwargs rejected the kwargs
    ├── MaxRetriesExceeded                     retry asked past ``max_retries``
    ├── DispatchError (RuntimeError)           a runner could not hand an instance over
    └── StorageError (RuntimeError)            the storage backend failed
        ├── CorruptSessionState (ValueError)   a stored value is not valid session state
        └── LockError
            ├── LockTimeout (TimeoutError)     the session lock could not be acquired in time
            └── LockNotReentrant               the same thread asked twice for one session lock

Errors carry their context as attributes (``session_uid``, ``task_name``,
``instance_name`` …) as well as in their message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from class_registry import RegistryKeyError

__all__ = [
    "ConfigurationError",
    "ConfigurationProblem",
    "CorruptSessionState",
    "DispatchError",
    "InstanceNotFound",
    "InvalidArgument",
    "InvalidInstanceStatus",
    "InvalidTaskKwargs",
    "InvalidTaskResult",
    "InvalidTrigger",
    "LockAcquisitionFailed",
    "LockError",
    "LockNotReentrant",
    "LockNotSupported",
    "LockTimeout",
    "MaxRetriesExceeded",
    "RetryInstance",
    "SkipInstance",
    "StorageError",
    "TriggersError",
    "UnknownRegistryKey",
    "UnknownTask",
    "with_context",
]

E = TypeVar("E", bound=BaseException)


class TriggersError(Exception):
    """Root of every exception raised by triggers."""

    #: Extra data attached with :func:`with_context`; recorded on failed instances.
    context: dict[str, Any]

    def __init__(self, message: str = "", **context: Any) -> None:
        super().__init__(message)
        self.message = message
        for key, value in context.items():
            setattr(self, key, value)


class ConfigurationProblem:
    """One problem found while validating a trigger configuration."""

    __slots__ = ("directive", "message", "task_name")

    def __init__(self, task_name: str | None, directive: str | None, message: str) -> None:
        self.task_name = task_name
        self.directive = directive
        self.message = message

    def __str__(self) -> str:
        where = []
        if self.task_name is not None:
            where.append(f"task {self.task_name!r}")
        if self.directive is not None:
            where.append(f"directive {self.directive!r}")
        prefix = ", ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message

    def __repr__(self) -> str:
        return f"ConfigurationProblem({self.task_name!r}, {self.directive!r}, {self.message!r})"


class ConfigurationError(TriggersError, ValueError):
    """The trigger configuration is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: Sequence[ConfigurationProblem], session_uid: str | None = None):
        self.problems = list(problems)
        count = len(self.problems)
        where = f" for session {session_uid!r}" if session_uid is not None else ""
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(
            f"Invalid trigger configuration{where} ({count} problem{'s' * (count != 1)}); "
            f"nothing was stored:\n{lines}",
            session_uid=session_uid,
        )


class InvalidTrigger(TriggersError, ValueError):
    """A trigger name or its kwargs cannot be fired."""


class InvalidArgument(TriggersError, ValueError):
    """An argument to a public call is not acceptable."""


class InstanceNotFound(TriggersError, KeyError):
    """The session holds no task instance of that name."""

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return self.message


class InvalidInstanceStatus(TriggersError, ValueError):
    """The instance's status does not allow the requested operation."""


class UnknownRegistryKey(TriggersError, RegistryKeyError):  # type: ignore[misc]
    """No manager, storage or runner is registered under that key."""

    def __str__(self) -> str:
        return self.message


class UnknownTask(TriggersError, LookupError):
    """A ``run`` directive names no Celery task that is a registered TriggerTask."""


class InvalidTaskResult(TriggersError, TypeError):
    """A task's ``_run`` returned a value that cannot be a cascade's kwargs."""


class InvalidTaskKwargs(TriggersError, ValueError):
    """:meth:`TaskContext.filter_kwargs` found invalid trigger kwargs."""


class MaxRetriesExceeded(TriggersError):
    """A task asked to retry more often than its ``max_retries`` allows."""


class DispatchError(TriggersError, RuntimeError):
    """A runner could not hand a scheduled instance over for execution."""


class StorageError(TriggersError, RuntimeError):
    """The storage backend failed to read or write session state.

    ``step_token`` is set when the step may or may not have been applied (the reply
    of its commit was lost, and the store could not say in time):
    :meth:`~triggers.storages.base.BaseTriggerStorage.step_applied` tells later.
    """

    step_token: str | None = None


class CorruptSessionState(StorageError, ValueError):
    """A stored value is not valid session state; nothing was executed."""


class LockError(StorageError):
    """The session lock failed."""


class LockTimeout(LockError, TimeoutError):
    """The session lock could not be acquired within the allowed wait."""


class LockNotReentrant(LockError):
    """A thread asked for a session lock it already holds (that would deadlock)."""


class LockAcquisitionFailed(LockError, RuntimeError):
    """:func:`triggers.locking.acquire_lock` could not take its lock (the original's name)."""


class LockNotSupported(LockError, TypeError):
    """The cache cannot hold distributed locks (it is not a Redis cache)."""


def with_context(exc: E, context: Mapping[str, Any]) -> E:
    """Attach ``context`` to ``exc`` (merged into ``exc.context``) and return ``exc``.

    The context is recorded in a failed instance's metadata and logged with the
    exception::

        raise with_context(ValueError("bad subject"), {"subject_id": 42})
    """
    if not isinstance(context, Mapping):
        raise InvalidArgument(
            f"with_context() expects a mapping as context, got {type(context).__name__}"
        )
    existing = getattr(exc, "context", None)
    merged = dict(existing) if isinstance(existing, Mapping) else {}
    merged.update(context)
    exc.context = merged  # type: ignore[attr-defined]
    return exc


class RetryInstance(TriggersError):  # noqa: N818 - a control-flow signal, like celery's Retry
    """Raised (via ``raise self.retry(...)`` in a task) to replay the running instance later."""

    def __init__(self, exc: BaseException | None, cooldown: float | None,
                 replacement_kwargs: dict[str, dict[str, Any]] | None,
                 metadata: dict[str, Any]) -> None:
        super().__init__(f"Retry requested{f' after {exc!r}' if exc else ''}")
        self.exc = exc
        self.cooldown = cooldown
        self.replacement_kwargs = replacement_kwargs
        self.metadata = metadata


class SkipInstance(TriggersError):  # noqa: N818 - a control-flow signal
    """Raised (via ``raise self.skip(...)`` in a task) to mark the running instance skipped."""

    def __init__(self, metadata: dict[str, Any]) -> None:
        super().__init__("Skip requested")
        self.metadata = metadata
