"""The storage base class: session state, atomic steps and the inspection surface.

A session's state has four parts, split by how they are used:

* the configuration (``tasks``: name → :class:`~triggers.types.TaskConfig`),
* session metadata, including ``latest_kwargs`` (trigger → its last kwargs)
  and a per-task instance counter,
* the *open* instances (unstarted, scheduled, running, failed),
* the *resolved* instances (finished, abandoned, replayed, skipped), which
  only grow and are not read when a trigger fires.

Everything the manager does happens in one *atomic step*
(:meth:`BaseTriggerStorage.atomic`): lock the session, read the configuration,
metadata and open instances, decide, write what changed, unlock. Its cost does
not depend on how many resolved instances the session holds.

Backends implement that step at one of two depths:

* the documented extension point — :meth:`~BaseTriggerStorage._load_from_backend`
  and :meth:`~BaseTriggerStorage._save` over the whole session — which the
  base class adapts (simple; cost grows with the session);
* the fine-grained primitives :meth:`~BaseTriggerStorage._read_state`,
  :meth:`~BaseTriggerStorage._read_instances`,
  :meth:`~BaseTriggerStorage._write_state` and
  :meth:`~BaseTriggerStorage._session_lock`, as the bundled backends do.
"""

from __future__ import annotations

import copy
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any, ClassVar, TypeVar, cast

from triggers import _json as stored_json
from triggers.config import check_kwargs_map, check_metadata, check_status, validate_configuration
from triggers.exceptions import (
    ConfigurationError,
    CorruptSessionState,
    InstanceNotFound,
    InvalidArgument,
    LockNotReentrant,
    StorageError,
)
from triggers.locking import (
    DEFAULT_LOCK_EXPIRE,
    DEFAULT_LOCK_TIMEOUT,
    BaseLock,
    LocalSessionLock,
    reentrant,
)
from triggers.registry import TriggersRegistry
from triggers.types import (
    RESOLVED_STATUSES,
    STATUS_UNSTARTED,
    TaskConfig,
    TaskInstance,
    TaskStatus,
    instance_name,
    now,
    task_name_of,
)

__all__ = ["BaseTriggerStorage", "SessionState", "SessionStep", "StateChanges", "storage_backends"]

T = TypeVar("T")

#: Parsed configurations by configuration id (see SessionState.config_id).
_parsed_configs: dict[str, tuple[Any, dict[str, TaskConfig]]] = {}

#: Version of the stored JSON layout.
FORMAT_VERSION = 1


dumps = stored_json.dumps


class SessionState:
    """What an atomic step reads: configuration, metadata and the open instances."""

    __slots__ = ("config_id", "counters", "latest_kwargs", "metadata", "open", "tasks")

    def __init__(
        self,
        tasks: dict[str, TaskConfig] | None = None,
        latest_kwargs: dict[str, dict[str, Any]] | None = None,
        counters: dict[str, int] | None = None,
        open: dict[str, TaskInstance] | None = None,  # noqa: A002 - the open instances
        metadata: dict[str, Any] | None = None,
        config_id: str | None = None,
    ) -> None:
        #: Identifies this configuration; a new one gets a new id (parsed configurations
        #: are cached per process by id).
        self.config_id = config_id
        self.tasks = tasks or {}
        self.latest_kwargs = latest_kwargs or {}
        self.counters = counters or {}
        self.open = open or {}
        self.metadata = metadata or {}

    # -- JSON ---------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "cfg": self.config_id,
            "tasks": {name: config.to_dict() for name, config in self.tasks.items()},
            "kwargs": self.latest_kwargs,
            "counters": self.counters,
            "open": {name: instance.to_dict() for name, instance in self.open.items()},
            "meta": self.metadata,
        }

    @classmethod
    def from_json(cls, data: Any, session_uid: str, where: str) -> SessionState:
        def corrupt(reason: str) -> CorruptSessionState:
            return CorruptSessionState(
                f"Stored state of session {session_uid!r} ({where}) is corrupt: {reason}. "
                "Nothing was executed; inspect or delete the stored value.",
                session_uid=session_uid,
            )

        if not isinstance(data, Mapping):
            raise corrupt(f"expected a JSON object, got {type(data).__name__}")
        if data.get("v") != FORMAT_VERSION:
            raise corrupt(f"unknown format version {data.get('v')!r}")
        for part in ("tasks", "kwargs", "counters", "open", "meta"):
            if not isinstance(data.get(part, {}), Mapping):
                raise corrupt(f"{part!r} is a {type(data[part]).__name__}, not an object")
        config_id = data.get("cfg")
        cached = _parsed_configs.get(config_id) if isinstance(config_id, str) else None
        tasks = cached[1] if cached is not None and cached[0] == data.get("tasks") else None
        if tasks is None:
            try:
                tasks = validate_configuration(data.get("tasks"), None, session_uid=session_uid,
                                               stored=True)
            except ConfigurationError as exc:
                raise corrupt(f"the stored configuration is invalid: {exc}") from exc
            if isinstance(config_id, str):
                if len(_parsed_configs) >= 1024:
                    _parsed_configs.clear()
                _parsed_configs[config_id] = (data["tasks"], tasks)
        try:
            if not all(isinstance(v, Mapping) for v in data["kwargs"].values()):
                raise ValueError("latest kwargs must be objects")
            state = cls(
                tasks=dict(tasks),
                config_id=config_id if isinstance(config_id, str) else None,
                latest_kwargs=dict(data["kwargs"]),
                counters={name: int(n) for name, n in data["counters"].items()},
                metadata=dict(data.get("meta") or {}),
            )
            state.open = {
                name: instance_from_json(name, entry, tasks, session_uid, where)
                for name, entry in data["open"].items()
            }
        except CorruptSessionState:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise corrupt(f"{type(exc).__name__}: {exc}") from exc
        return state


def instance_from_json(
    name: str, data: Any, tasks: Mapping[str, TaskConfig], session_uid: str, where: str
) -> TaskInstance:
    try:
        config = tasks[data.get("task") or task_name_of(name)]
        return TaskInstance(
            name=name,
            config=config,
            kwargs=data.get("kwargs") or {},
            status=TaskStatus(data["status"]),
            metadata=data.get("meta") or {},
            abandon_state=data.get("unless") or (),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptSessionState(
            f"Stored state of session {session_uid!r} ({where}) is corrupt: instance {name!r} "
            f"cannot be read ({type(exc).__name__}: {exc}). Nothing was executed.",
            session_uid=session_uid,
        ) from exc


class StateChanges:
    """What one atomic step changed, handed to :meth:`BaseTriggerStorage._write_state`."""

    __slots__ = ("dirty", "resolved", "state", "unresolved")

    def __init__(self, state: SessionState, resolved: dict[str, TaskInstance],
                 unresolved: set[str], dirty: dict[str, TaskInstance] | None = None) -> None:
        #: Every instance this step created or changed.
        self.dirty = dirty if dirty is not None else {}
        #: The new state (configuration, metadata, open instances).
        self.state = state
        #: Instances written to the resolved store by this step (new or changed).
        self.resolved = resolved
        #: Names that moved from the resolved store back to the open instances.
        self.unresolved = unresolved


class SessionStep:
    """The working view of one atomic step; see :meth:`BaseTriggerStorage.atomic`."""

    def __init__(self, storage: BaseTriggerStorage, state: SessionState) -> None:
        self.storage = storage
        self.state = state
        self._resolved_loaded: dict[str, TaskInstance] = {}
        self._dirty: dict[str, TaskInstance] = {}
        self._changed = False
        #: Triggers applied in this step, in order, with the instances each scheduled.
        self.fired: list[tuple[str, list[TaskInstance]]] = []

    # -- reading ------------------------------------------------------------

    @property
    def tasks(self) -> dict[str, TaskConfig]:
        return self.state.tasks

    @property
    def latest_kwargs(self) -> dict[str, dict[str, Any]]:
        return self.state.latest_kwargs

    def count(self, task_name: str) -> int:
        """How many instances of the task were ever created."""
        return self.state.counters.get(task_name, 0)

    def open_instances_of(self, task_name: str) -> list[TaskInstance]:
        found = [i for i in self.state.open.values() if i.config.name == task_name]
        return sorted(found, key=lambda i: i.number)

    def instance(self, name: str) -> TaskInstance:
        """The instance called ``name``, open or resolved (one extra read if resolved)."""
        if name in self.state.open:
            return self.state.open[name]
        if name in self._resolved_loaded:
            return self._resolved_loaded[name]
        found = self.storage._read_instances([name], self.state.tasks).get(name)
        if found is None:
            raise InstanceNotFound(
                f"Session {self.storage.uid!r} has no task instance {name!r}.",
                session_uid=self.storage.uid,
                instance_name=name,
            )
        self._resolved_loaded[name] = found
        return found

    # -- writing ------------------------------------------------------------

    def set_latest_kwargs(self, trigger_name: str, kwargs: dict[str, Any]) -> None:
        self.state.latest_kwargs[trigger_name] = kwargs
        self._changed = True

    def set_tasks(self, tasks: Mapping[str, TaskConfig]) -> None:
        self.state.tasks.update(tasks)
        self.state.config_id = secrets.token_hex(8)
        self._changed = True

    def set_metadata(self, key: str, value: Any) -> None:
        self.state.metadata[key] = value
        self._changed = True

    def new_instance(
        self,
        config: TaskConfig,
        kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        status: TaskStatus | str = STATUS_UNSTARTED,
        metadata: Mapping[str, Any] | None = None,
        abandon_state: Iterable[str] | None = None,
    ) -> TaskInstance:
        number = self.count(config.name)
        self.state.counters[config.name] = number + 1
        stamp = now()
        meta = {"created": stamp, "modified": stamp}
        meta.update(metadata or {})
        instance = TaskInstance(instance_name(config.name, number), config, kwargs, status, meta,
                                abandon_state)
        self.save(instance)
        return instance

    def save(self, instance: TaskInstance) -> None:
        """Record that ``instance`` changed (status, kwargs or metadata)."""
        self._changed = True
        self._dirty[instance.name] = instance
        if instance.status in RESOLVED_STATUSES:
            self.state.open.pop(instance.name, None)
        else:
            self.state.open[instance.name] = instance

    @property
    def changed(self) -> bool:
        return self._changed

    def checkpoint(self) -> tuple[Any, ...]:
        """A copy of the working state, to :meth:`restore` if a nested step fails."""
        state = self.state
        return (
            SessionState(dict(state.tasks), copy.deepcopy(state.latest_kwargs),
                         dict(state.counters), {n: _clone(i) for n, i in state.open.items()},
                         copy.deepcopy(state.metadata), state.config_id),
            {n: _clone(i) for n, i in self._resolved_loaded.items()},
            {n: _clone(i) for n, i in self._dirty.items()},
            self._changed, list(self.fired),
        )

    def restore(self, checkpoint: tuple[Any, ...]) -> None:
        self.state, self._resolved_loaded, self._dirty, self._changed, self.fired = checkpoint

    def changes(self) -> StateChanges:
        resolved = {n: i for n, i in self._dirty.items() if i.status in RESOLVED_STATUSES}
        unresolved = {
            n for n, i in self._dirty.items()
            if i.status not in RESOLVED_STATUSES and n in self._resolved_loaded
        }
        return StateChanges(self.state, resolved, unresolved, dict(self._dirty))


class _Held:
    """A lock block (``with storage.acquire_lock()``) of one thread."""

    __slots__ = ("callbacks", "handed", "step", "thread")

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.step: SessionStep | None = None
        self.callbacks: list[Callable[[], None]] = []
        #: Instances the block read, by name, with what they were when read.
        self.handed: dict[str, tuple[TaskInstance, dict[str, Any]]] = {}

    def hand(self, instance: TaskInstance) -> TaskInstance:
        if instance.name not in self.handed:
            self.handed[instance.name] = (instance, copy.deepcopy(instance.to_dict()))
        return instance

    def save_handed(self) -> None:
        """Record the changes the block made to instances it read."""
        assert self.step is not None
        for name, (instance, before) in list(self.handed.items()):
            after = instance.to_dict()
            if after != before:
                self.step.save(instance)
                self.handed[name] = (instance, copy.deepcopy(after))


class BaseTriggerStorage:
    """Base class of storage backends; one object serves one session (``uid``).

    Subclasses set ``name`` (their registry key) and implement either the
    whole-session pair :meth:`_load_from_backend` / :meth:`_save`, or the
    fine-grained primitives (see the module documentation).

    The inspection surface (``tasks``, ``instances``, ``latest_kwargs``,
    ``storage[name]``, iteration …) reads the stored state afresh on every
    access, so it always shows what other processes wrote.
    """

    #: Registry key under the ``triggers.storages`` entry-point group.
    name: ClassVar[str] = ""

    def __init__(self, uid: str, lock_expire: int = DEFAULT_LOCK_EXPIRE,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        if not isinstance(uid, str) or not uid:
            raise InvalidArgument(
                f"A session UID must be a non-empty string, got {type(uid).__name__} {uid!r}"
            )
        self.uid = uid
        self.lock_expire = lock_expire
        self.lock_timeout = lock_timeout
        self._held: _Held | None = None
        # Used by the whole-session adapter.
        self._configs: dict[str, TaskConfig] = {}
        self._instances: dict[str, TaskInstance] = {}
        self._metadata: dict[str, Any] = {}

    # ------------------------------------------------------------------
    # Options: how a worker rebuilds an equivalent storage object.
    # ------------------------------------------------------------------

    def get_options(self) -> dict[str, Any]:
        """JSON-ready keyword arguments that rebuild this storage (besides ``uid``).

        A task message carries them, with the storage's registry key, so that the
        worker uses the same backend with the same settings.
        """
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(uid={self.uid!r})"

    # ------------------------------------------------------------------
    # Atomic steps.
    # ------------------------------------------------------------------

    def on_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the step just taken is durable (now, for most backends).

        The manager dispatches instances and calls its hooks through this, so that
        a backend whose steps can join an outer transaction dispatches only after
        that transaction commits. Inside :meth:`acquire_lock` callbacks wait for
        the end of the block.
        """
        held = self._held_here()
        if held is not None:
            held.callbacks.append(callback)
            return
        callback()

    @contextmanager
    def acquire_lock(self) -> Iterator[BaseTriggerStorage]:
        """Hold this session's lock and yield the storage itself, writable (the original API).

        ::

            with storage.acquire_lock() as writable_storage:
                failed = writable_storage["t_import#0"]
                clone = writable_storage.clone_instance(failed)
                writable_storage.save()

        Inside the block (in this thread) reads show the working state,
        ``create_instance``, ``clone_instance``, ``update_configuration``, manager
        calls on this storage and changes made to instances read from it are
        collected, and the block's changes are written together, atomically,
        when it ends; an exception discards them all. :meth:`save` is accepted
        for compatibility. Dispatches and hooks run after the block.
        """
        if self._held_here() is not None:
            raise LockNotReentrant(
                f"This thread already holds the lock of session {self.uid!r} through this "
                "storage object; use the storage the outer block yielded.",
                session_uid=self.uid,
            )
        held = _Held()
        with self.atomic() as step:
            held.step = step
            self._held = held
            try:
                yield self
                held.save_handed()
            finally:
                self._held = None
        for callback in held.callbacks:
            callback()

    def save(self) -> None:
        """Accepted inside :meth:`acquire_lock` (the block's changes are written at its end)."""
        held = self._held_here()
        if held is None:
            raise InvalidArgument(
                f"save() of session {self.uid!r} outside 'with storage.acquire_lock()': every "
                "change made through the manager or the storage is saved already; to change "
                "instances by hand, do it inside the lock block."
            )
        held.save_handed()

    def invalidate_cache(self) -> None:
        """Accepted for compatibility: reads are never cached (each one is fresh)."""

    def _held_here(self) -> _Held | None:
        """The lock block this thread holds on this storage object, if any."""
        held = self._held
        if held is not None and held.thread == threading.get_ident():
            return held
        return None

    def transact(self, step_function: Callable[[SessionStep], T]) -> T:
        """Run ``step_function(step)`` as one atomic step and return what it returns.

        The function reads and changes the session through ``step``; its changes
        are written when it returns, nothing is written if it raises. A backend
        may run it more than once (optimistic transactions retry on conflict), so
        it must have no other side effects. Inside :meth:`acquire_lock` it runs on
        the block's working state.
        """
        held = self._held_here()
        if held is not None:
            assert held.step is not None
            checkpoint = held.step.checkpoint()
            try:
                return step_function(held.step)
            except BaseException:
                held.step.restore(checkpoint)
                raise
        return self._transact(step_function)

    def _transact(self, step_function: Callable[[SessionStep], T]) -> T:
        with self.atomic() as step:
            return step_function(step)

    @contextmanager
    def atomic(self) -> Iterator[SessionStep]:
        """Lock the session, read its working state, and write what changed on exit.

        If the block raises, nothing is written.
        """
        with self._session_lock():
            step = SessionStep(self, self._read_state())
            yield step
            if step.changed:
                self._write_state(step.changes())

    # -- fine-grained primitives (defaults adapt the whole-session pair) ----

    def _session_lock(self) -> AbstractContextManager[Any]:
        lock = LocalSessionLock(f"triggers:{type(self).__name__}:{self.uid}", self.uid,
                                self.lock_expire, self.lock_timeout)
        return lock.hold()

    def hook_lock(self) -> AbstractContextManager[Any]:
        """The lock under which a manager runs this session's hooks, one at a time.

        Re-entrant within the thread that holds it (a hook may fire triggers whose
        hooks run nested). Shared by every process that shares the storage: Redis
        or the cache for the cache storage, a row for the database storage; this
        default serialises the threads of one process only.
        """
        return reentrant(self._hook_lock())

    def _hook_lock(self) -> BaseLock:
        return LocalSessionLock(f"triggers:hooks:{type(self).__name__}:{self.uid}", self.uid,
                                self.lock_expire, self.lock_timeout)

    def _read_state(self) -> SessionState:
        """Read configuration, metadata and open instances (one round trip)."""
        self._load()
        meta = dict(self._metadata)
        latest = meta.pop("latest_kwargs", {}) or {}
        counters = meta.pop("counters", None)
        if counters is None:
            counters = {}
            for name in self._instances:
                task = task_name_of(name)
                counters[task] = max(counters.get(task, 0), int(name.rsplit("#", 1)[1]) + 1)
        open_ = {n: i.copy() for n, i in self._instances.items() if not i.is_resolved}
        return SessionState(dict(self._configs), dict(latest), dict(counters), open_, meta)

    def _read_instances(self, names: Iterable[str],
                        tasks: Mapping[str, TaskConfig]) -> dict[str, TaskInstance]:
        """Read the named instances (resolved or not); missing names are left out."""
        self._load()
        return {n: self._instances[n].copy() for n in names if n in self._instances}

    def _read_all_instances(self, state: SessionState) -> dict[str, TaskInstance]:
        names = [instance_name(task, n) for task, count in state.counters.items()
                 for n in range(count) if instance_name(task, n) not in state.open]
        found = self._read_instances(names, state.tasks)
        found.update(state.open)
        return found

    def _write_state(self, changes: StateChanges) -> None:
        """Persist one atomic step's changes (one round trip)."""
        state = changes.state
        self._configs = dict(state.tasks)
        for name in list(self._instances):
            if not self._instances[name].is_resolved and name not in state.open:
                del self._instances[name]
        self._instances.update(changes.resolved)
        self._instances.update(state.open)
        self._metadata = dict(state.metadata)
        self._metadata["latest_kwargs"] = state.latest_kwargs
        self._metadata["counters"] = state.counters
        self._save()

    # -- the documented whole-session extension point -----------------------

    def _load(self) -> None:
        try:
            configs, instances, metadata = self._load_from_backend()
        except StorageError:
            raise
        except (TypeError, ValueError) as exc:
            raise CorruptSessionState(
                f"Stored state of session {self.uid!r} is corrupt: {exc}", session_uid=self.uid
            ) from exc
        try:
            self._configs = {
                name: value if isinstance(value, TaskConfig) else TaskConfig.from_dict(name, value)
                for name, value in (configs or {}).items()
            }
            self._instances = {
                name: value if isinstance(value, TaskInstance)
                else instance_from_json(name, stored_json.from_plain(value), self._configs,
                                        self.uid, "backend")
                for name, value in (instances or {}).items()
            }
            self._metadata = stored_json.from_plain(dict(metadata or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptSessionState(
                f"Stored state of session {self.uid!r} is corrupt: {type(exc).__name__}: {exc}",
                session_uid=self.uid,
            ) from exc

    def _load_from_backend(self) -> tuple[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]]:
        """Return ``(configs, instances, metadata)`` for the whole session.

        Each is a mapping keyed by name; values may be JSON-like dicts as
        produced by :meth:`serialize` or ready objects. Return empty mappings
        for a session that has nothing stored yet.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement _load_from_backend() and _save(), "
            "or the fine-grained primitives _read_state/_read_instances/_write_state."
        )

    def _save(self) -> None:
        """Persist the whole session: typically ``store(self.uid, self.serialize())``."""
        raise NotImplementedError(f"{type(self).__name__} must implement _save()")

    def delete(self) -> None:
        """Remove everything this session stored (bundled backends implement it)."""
        raise NotImplementedError(f"{type(self).__name__} cannot delete sessions")

    def serialize(self) -> dict[str, Any]:
        """The whole session (as last loaded or saved) as plain JSON data.

        Datetimes, decimals and UUIDs in kwargs and metadata are tagged the way
        Celery's JSON serializer tags them (``{"__type__": ..., "__value__": ...}``);
        :meth:`_load_from_backend` may return the data as it was serialized.
        """
        data: dict[str, Any] = stored_json.to_plain({
            "tasks": {name: config.to_dict() for name, config in self._configs.items()},
            "instances": {name: inst.to_dict() for name, inst in self._instances.items()},
            "metadata": dict(self._metadata),
        })
        return data

    _serialize = serialize

    # ------------------------------------------------------------------
    # Inspection (fresh reads; not the hot path).
    # ------------------------------------------------------------------

    def _current_state(self) -> SessionState:
        """The stored state, or the working state of this thread's lock block."""
        held = self._held_here()
        if held is not None:
            assert held.step is not None
            return held.step.state
        return self._read_state()

    def _current_instances(self, names: Iterable[str] | None = None) -> dict[str, TaskInstance]:
        """Instances by name (all of them, or the named ones that exist), fresh or working."""
        held = self._held_here()
        if held is None:
            state = self._read_state()
            if names is None:
                return self._read_all_instances(state)
            wanted = list(names)
            found = self._read_instances([n for n in wanted if n not in state.open], state.tasks)
            found.update({n: state.open[n] for n in wanted if n in state.open})
            return found
        step = held.step
        assert step is not None
        if names is None:
            names = [instance_name(task, n) for task, count in step.state.counters.items()
                     for n in range(count)]
        found = {}
        for name in names:
            try:
                found[name] = held.hand(step.instance(name))
            except InstanceNotFound:
                continue
        return found

    @property
    def tasks(self) -> dict[str, TaskConfig]:
        return self._current_state().tasks

    @property
    def latest_kwargs(self) -> dict[str, dict[str, Any]]:
        return self._current_state().latest_kwargs

    @property
    def metadata(self) -> dict[str, Any]:
        """Session metadata, including ``latest_kwargs`` and the instance ``counters``."""
        state = self._current_state()
        meta = dict(state.metadata)
        meta["latest_kwargs"] = state.latest_kwargs
        meta["counters"] = state.counters
        return meta

    @property
    def instances(self) -> dict[str, TaskInstance]:
        """Every instance of the session, by name, in task and number order."""
        found = self._current_instances()
        return {name: found[name] for name in sorted(found, key=_instance_sort_key)}

    def iter_instances(self) -> Iterator[TaskInstance]:
        return iter(list(self.instances.values()))

    def __iter__(self) -> Iterator[TaskInstance]:
        return self.iter_instances()

    def __len__(self) -> int:
        return len(self.instances)

    def __contains__(self, name: object) -> bool:
        if isinstance(name, TaskInstance):
            name = name.name
        if not isinstance(name, str):
            return False
        return bool(self._current_instances([name]))

    def __getitem__(self, name: str) -> TaskInstance:
        return self.get_instance(name)

    def get_instance(self, name: str | TaskInstance) -> TaskInstance:
        if isinstance(name, TaskInstance):
            name = name.name
        found = self._current_instances([name]).get(name)
        if found is None:
            raise InstanceNotFound(
                f"Session {self.uid!r} has no task instance {name!r}.",
                session_uid=self.uid,
                instance_name=name,
            )
        return found

    def instances_of_task(self, task: str | TaskConfig) -> list[TaskInstance]:
        """Every instance of one task, in number order."""
        task_name = task.name if isinstance(task, TaskConfig) else task
        state = self._current_state()
        names = [instance_name(task_name, n) for n in range(state.counters.get(task_name, 0))]
        found = self._current_instances(names)
        return [found[n] for n in names if n in found]

    def get_unresolved_tasks(self) -> list[TaskConfig]:
        """Tasks with no instance yet, or with at least one unresolved instance."""
        state = self._current_state()
        open_tasks = {instance.config.name for instance in state.open.values()}
        return [
            config for name, config in state.tasks.items()
            if state.counters.get(name, 0) == 0 or name in open_tasks
        ]

    def get_unresolved_instances(self) -> list[TaskInstance]:
        state = self._current_state()
        names = sorted(state.open, key=_instance_sort_key)
        found = self._current_instances(names)
        return [found[n] for n in names if n in found]

    def get_instances_with_unresolved_logs(self) -> list[TaskInstance]:
        """Instances that logged a warning or worse whose logs are not marked resolved."""
        return [i for i in self.instances.values() if i.has_unresolved_logs]

    def debug_repr(self) -> dict[str, Any]:
        """The whole session as JSON-ready data, for logs and debugging."""
        state = self._current_state()
        return {
            "uid": self.uid,
            "backend": type(self).__name__,
            "tasks": {name: config.to_dict() for name, config in state.tasks.items()},
            "instances": {name: instance.to_dict() for name, instance in self.instances.items()},
            "metadata": {**state.metadata, "latest_kwargs": state.latest_kwargs,
                         "counters": state.counters},
        }

    # -- changes outside the manager ----------------------------------------

    def update_configuration(self, configs: Mapping[str, TaskConfig | Mapping[str, Any]]) -> None:
        """Store task configurations (merging by task name).

        Takes :class:`TaskConfig` objects or a configuration as written (validated
        here, as :meth:`TriggerManager.update_configuration` does).
        """
        if isinstance(configs, Mapping) and all(
                isinstance(value, TaskConfig) for value in configs.values()):
            validated = cast("Mapping[str, TaskConfig]", configs)
        else:
            validated = validate_configuration(configs, None, session_uid=self.uid)
        self.transact(lambda step: step.set_tasks(validated))

    def create_instance(self, task_config: TaskConfig | str, **kwargs: Any) -> TaskInstance:
        """Create and store a new instance of a task.

        Keyword arguments: ``kwargs`` (trigger → kwargs), ``status`` and ``metadata``.
        """
        unknown = set(kwargs) - {"kwargs", "status", "metadata", "abandon_state", "abandonState"}
        if unknown:
            raise InvalidArgument(
                f"create_instance() got unexpected arguments {sorted(unknown)}; "
                "accepted: kwargs, status, metadata, abandon_state (or abandonState)"
            )
        status = check_status(kwargs.get("status", STATUS_UNSTARTED))
        trigger_kwargs = check_kwargs_map(kwargs.get("kwargs") or {}, "kwargs")
        metadata = check_metadata(kwargs.get("metadata"))
        abandon_state = kwargs.get("abandon_state", kwargs.get("abandonState")) or ()
        if isinstance(abandon_state, (str, bytes)) or not all(
                isinstance(name, str) for name in abandon_state):
            raise InvalidArgument(
                f"create_instance() abandon_state must be a collection of trigger names, got "
                f"{abandon_state!r}")
        return self._handed(self.transact(lambda step: step.new_instance(
            self._resolve_config(step, task_config), trigger_kwargs, status, metadata,
            set(abandon_state))))

    def clone_instance(self, task_instance: TaskInstance | str) -> TaskInstance:
        """Store an unstarted copy of an instance (new number; ``parent`` names the original)."""
        name = task_instance.name if isinstance(task_instance, TaskInstance) else task_instance
        def clone(step: SessionStep) -> TaskInstance:
            original = step.instance(name)
            return step.new_instance(original.config, original.kwargs, STATUS_UNSTARTED,
                                     {"parent": original.name}, original.abandon_state)

        return self._handed(self.transact(clone))

    def _handed(self, instance: TaskInstance) -> TaskInstance:
        """Inside a lock block, the instance is live: changes made to it are saved."""
        held = self._held_here()
        return held.hand(instance) if held is not None else instance

    def _resolve_config(self, step: SessionStep, task_config: TaskConfig | str) -> TaskConfig:
        name = task_config.name if isinstance(task_config, TaskConfig) else task_config
        try:
            return step.tasks[name]
        except KeyError:
            raise InvalidArgument(
                f"Session {self.uid!r} has no task {name!r}; configured: "
                f"{', '.join(sorted(step.tasks)) or '(none)'}",
                session_uid=self.uid, task_name=name,
            ) from None


#: Registry of storage backends: ``storage_backends.get('cache', uid)`` (also importable
#: from :mod:`triggers.storages`).
storage_backends = TriggersRegistry("triggers.storages", "storage backend")


def _clone(instance: TaskInstance) -> TaskInstance:
    return TaskInstance(instance.name, instance.config, copy.deepcopy(instance.kwargs),
                        instance.status, copy.deepcopy(instance.metadata), instance.abandon_state)


def _instance_sort_key(name: str) -> tuple[str, int]:
    task, _, number = name.rpartition("#")
    return task, int(number) if number.isdigit() else -1
