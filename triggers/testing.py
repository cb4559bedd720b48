"""Helpers for testing workflows: a unittest mixin and pytest fixtures.

unittest / Django::

    class QuestionnaireTest(TriggerManagerTestCaseMixin, TestCase):
        def setUp(self):
            super().setUp()
            self.manager = TriggerManager(CacheStorageBackend(uuid4().hex, cache='triggers'))

        def test_subject_imported(self):
            self.manager.update_configuration({...})
            self.manager.fire('firstPageReceived')
            self.manager.fire('questionnaireComplete')
            self.assertInstanceFinished('t_importSubject#0')

pytest (``pytest_plugins = ['triggers.testing']`` in a conftest)::

    def test_subject_imported(trigger_manager, trigger_assertions):
        ...
        trigger_assertions.assertInstanceFinished('t_importSubject#0')

Inside these tests the threading runner is the default. Every assertion first
waits for the runner threads (:meth:`ThreadingTaskRunner.join_all`), then reads
the session's stored state afresh. A failure message shows the instance's
metadata, traceback included.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NoReturn, TypeVar
from unittest import mock

from triggers import runners
from triggers.exceptions import InstanceNotFound
from triggers.manager import TriggerManager
from triggers.runners import ThreadingTaskRunner
from triggers.task import TaskContext, TriggerTask
from triggers.types import (
    STATUS_ABANDONED,
    STATUS_FAILED,
    STATUS_FINISHED,
    STATUS_REPLAYED,
    STATUS_SKIPPED,
    STATUS_UNSTARTED,
    TaskInstance,
    TaskStatus,
)

__all__ = [
    "DevNullTask",
    "FailingTask",
    "PassThruTask",
    "SelfRetryingTask",
    "SelfSkippingTask",
    "TriggerAssertions",
    "TriggerManagerTestCaseMixin",
    "name_matches_classpath",
    "use_threading_runner",
]

T = TypeVar("T", bound=type)


def name_matches_classpath(cls: T) -> T:
    """Class decorator: the task's Celery name is its class path (``module.Class``).

    TriggerTask subclasses are named that way already unless they set ``name``.
    """
    cls.name = f"{cls.__module__}.{cls.__name__}"  # type: ignore[attr-defined]
    return cls


# The original's ready-made tasks for tests.


@name_matches_classpath
class PassThruTask(TriggerTask):
    """Returns the kwargs it received (``{'kwargs': context.trigger_kwargs}``)."""

    def _run(self, context: TaskContext) -> Mapping[str, Any] | None:
        return {"kwargs": context.trigger_kwargs}


@name_matches_classpath
class DevNullTask(TriggerTask):
    """Returns an empty result."""

    def _run(self, context: TaskContext) -> Mapping[str, Any] | None:
        return {}


@name_matches_classpath
class FailingTask(TriggerTask):
    """Raises a RuntimeError."""

    def _run(self, context: TaskContext) -> Mapping[str, Any] | None:
        raise RuntimeError("You weren't supposed to see that.")


@name_matches_classpath
class SelfSkippingTask(TriggerTask):
    """Marks itself skipped, with its kwargs in the metadata."""

    def _run(self, context: TaskContext) -> Mapping[str, Any] | None:
        raise self.skip({"kwargs": context.trigger_kwargs})


@name_matches_classpath
class SelfRetryingTask(TriggerTask):
    """Retries itself ``retries.max`` times (default ``max_retries``), then returns the count."""

    def _run(self, context: TaskContext) -> Mapping[str, Any] | None:
        import filters as f

        params = context.filter_kwargs({
            "retries": {"max": f.Type(int) | f.Optional(default=self.max_retries) | f.Min(1)},
        })
        if self.request.retries < params["retries"]["max"]:
            raise self.retry()
        return {"count": self.request.retries}


class use_threading_runner:  # noqa: N801 - used like a function, as mock.patch is
    """Make the threading runner the default runner, whatever the settings say.

    A context manager, or ``start()`` / ``stop()`` like a ``mock.patch`` patcher.
    """

    def __init__(self) -> None:
        self._patchers = [
            mock.patch.object(runners, "DEFAULT_TASK_RUNNER", ThreadingTaskRunner.name),
            mock.patch.object(runners, "_forced_runner", ThreadingTaskRunner.name),
        ]

    def start(self) -> None:
        for patcher in self._patchers:
            patcher.start()

    def stop(self) -> None:
        for patcher in reversed(self._patchers):
            patcher.stop()

    def __enter__(self) -> use_threading_runner:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _describe(instance: TaskInstance) -> str:
    meta = dict(instance.metadata)
    traceback = meta.pop("exc_traceback", None)
    text = (f"{instance.name} is {instance.status.value}\n"
            f"kwargs: {json.dumps(instance.kwargs, indent=2, sort_keys=True, default=repr)}\n"
            f"metadata: {json.dumps(meta, indent=2, sort_keys=True, default=repr)}")
    if traceback:
        text += f"\ntraceback:\n{traceback}"
    return text


class TriggerAssertions:
    """The assertions, bound to a manager (``manager`` may be a callable returning it)."""

    def __init__(self, manager: TriggerManager | Callable[[], TriggerManager],
                 fail: Callable[[str], NoReturn]) -> None:
        self._manager = manager
        self._fail = fail

    @property
    def manager(self) -> TriggerManager:
        return self._manager() if callable(self._manager) else self._manager

    def _current(self, name: str) -> TaskInstance:
        ThreadingTaskRunner.join_all()
        try:
            return self.manager.storage[name]
        except InstanceNotFound:
            existing = ", ".join(i.name for i in self.manager.storage) or "(none)"
            self._fail(f"Instance {name} does not exist; the session has: {existing}")

    def _status(self, name: str, status: TaskStatus) -> TaskInstance:
        instance = self._current(name)
        if instance.status != status:
            self._fail(f"Expected {name} to be {status.value}, but {_describe(instance)}")
        return instance

    def assertInstanceAbandoned(self, instance_name: str) -> TaskInstance:  # noqa: N802
        return self._status(instance_name, STATUS_ABANDONED)

    def assertInstanceFailed(self, instance_name: str, exc_type: type[BaseException]  # noqa: N802
                             ) -> TaskInstance:
        instance = self._status(instance_name, STATUS_FAILED)
        stored = str(instance.metadata.get("exc_type", ""))
        wanted = {exc_type.__qualname__, f"{exc_type.__module__}.{exc_type.__qualname__}"}
        if stored not in wanted:
            self._fail(f"Expected {instance_name} to fail with {exc_type.__qualname__}, but "
                       f"{_describe(instance)}")
        return instance

    def assertInstanceFinished(self, instance_name: str,  # noqa: N802
                               expected_result: Mapping[str, Any] | None = None) -> TaskInstance:
        instance = self._status(instance_name, STATUS_FINISHED)
        if expected_result is not None and instance.metadata.get("result") != expected_result:
            self._fail(f"Expected {instance_name} to finish with result {expected_result!r}, "
                       f"but {_describe(instance)}")
        return instance

    def assertInstanceMissing(self, instance_name: str) -> None:  # noqa: N802
        ThreadingTaskRunner.join_all()
        try:
            instance = self.manager.storage[instance_name]
        except InstanceNotFound:
            return
        self._fail(f"Expected {instance_name} not to exist, but {_describe(instance)}")

    def assertInstanceReplayed(self, instance_name: str) -> TaskInstance:  # noqa: N802
        return self._status(instance_name, STATUS_REPLAYED)

    def assertInstanceSkipped(self, instance_name: str) -> TaskInstance:  # noqa: N802
        return self._status(instance_name, STATUS_SKIPPED)

    def assertInstanceUnstarted(self, instance_name: str) -> TaskInstance:  # noqa: N802
        return self._status(instance_name, STATUS_UNSTARTED)

    def assertUnresolvedTasks(self, task_names: Iterable[str]) -> None:  # noqa: N802
        ThreadingTaskRunner.join_all()
        actual = sorted(config.name for config in self.manager.get_unresolved_tasks())
        if actual != sorted(task_names):
            self._fail(f"Expected unresolved tasks {sorted(task_names)}, got {actual}")

    def assertUnresolvedInstances(self, instance_names: Iterable[str]) -> None:  # noqa: N802
        ThreadingTaskRunner.join_all()
        unresolved = self.manager.get_unresolved_instances()
        actual = sorted(instance.name for instance in unresolved)
        if actual != sorted(instance_names):
            details = "\n".join(_describe(instance) for instance in unresolved)
            self._fail(f"Expected unresolved instances {sorted(instance_names)}, got {actual}"
                       + (f"\n{details}" if details else ""))


class TriggerManagerTestCaseMixin:
    """Assertions for unittest / Django test cases; set ``self.manager`` in ``setUp``.

    Put it before ``TestCase`` in the bases. The threading runner is the default
    runner inside each test; pending runner threads are joined at the end.
    """

    manager: TriggerManager

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        patcher = use_threading_runner()
        patcher.start()
        self.addCleanup(patcher.stop)  # type: ignore[attr-defined]
        self.addCleanup(ThreadingTaskRunner.join_all)  # type: ignore[attr-defined]
        self._trigger_assertions = TriggerAssertions(lambda: self.manager, self.fail)  # type: ignore[attr-defined]

    def assertInstanceAbandoned(self, instance_name: str) -> TaskInstance:  # noqa: N802
        return self._trigger_assertions.assertInstanceAbandoned(instance_name)

    def assertInstanceFailed(self, instance_name: str, exc_type: type[BaseException]  # noqa: N802
                             ) -> TaskInstance:
        return self._trigger_assertions.assertInstanceFailed(instance_name, exc_type)

    def assertInstanceFinished(self, instance_name: str,  # noqa: N802
                               expected_result: Mapping[str, Any] | None = None) -> TaskInstance:
        return self._trigger_assertions.assertInstanceFinished(instance_name, expected_result)

    def assertInstanceMissing(self, instance_name: str) -> None:  # noqa: N802
        self._trigger_assertions.assertInstanceMissing(instance_name)

    def assertInstanceReplayed(self, instance_name: str) -> TaskInstance:  # noqa: N802
        return self._trigger_assertions.assertInstanceReplayed(instance_name)

    def assertInstanceSkipped(self, instance_name: str) -> TaskInstance:  # noqa: N802
        return self._trigger_assertions.assertInstanceSkipped(instance_name)

    def assertInstanceUnstarted(self, instance_name: str) -> TaskInstance:  # noqa: N802
        return self._trigger_assertions.assertInstanceUnstarted(instance_name)

    def assertUnresolvedTasks(self, task_names: Iterable[str]) -> None:  # noqa: N802
        self._trigger_assertions.assertUnresolvedTasks(task_names)

    def assertUnresolvedInstances(self, instance_names: Iterable[str]) -> None:  # noqa: N802
        self._trigger_assertions.assertUnresolvedInstances(instance_names)


# ---------------------------------------------------------------------------
# pytest fixtures: ``pytest_plugins = ["triggers.testing"]``.
# ---------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - pytest is optional
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def trigger_threading_runner() -> Iterator[type[ThreadingTaskRunner]]:
        """Make the threading runner the default; join its threads afterwards."""
        with use_threading_runner():
            yield ThreadingTaskRunner
            ThreadingTaskRunner.join_all()

    @pytest.fixture
    def trigger_session_uid() -> str:
        """A fresh session UID."""
        return f"test-{uuid.uuid4().hex}"

    @pytest.fixture
    def trigger_cache_alias() -> str:
        """The cache alias used by ``trigger_storage``; override to use another."""
        return "default"

    @pytest.fixture
    def trigger_storage(trigger_session_uid: str, trigger_cache_alias: str) -> Any:
        """A CacheStorageBackend for a fresh session."""
        from triggers.storages.cache import CacheStorageBackend

        return CacheStorageBackend(trigger_session_uid, cache=trigger_cache_alias)

    @pytest.fixture
    def trigger_manager(trigger_storage: Any, trigger_threading_runner: Any) -> TriggerManager:
        """A TriggerManager over ``trigger_storage``, with the threading runner as default."""
        return TriggerManager(trigger_storage)

    @pytest.fixture
    def trigger_assertions(trigger_manager: TriggerManager) -> TriggerAssertions:
        """The nine assertions of TriggerManagerTestCaseMixin, bound to ``trigger_manager``."""
        return TriggerAssertions(trigger_manager, pytest.fail)
