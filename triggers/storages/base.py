"""The storage contract, the atomic step, and the inspection surface.

A session is stored as records (``triggers.storages._records``): the
configuration (cached per process by version), per-session fields (counters,
the latest kwargs of each trigger, metadata), each instance as its own record —
*waiting* ones indexed per task, *active* ones, *done* ones — and a bounded
history.

Everything the manager does happens in one **atomic step**
(:meth:`BaseTriggerStorage.transact`): a :class:`SessionStep` reads what it
needs — for a fired trigger, the configuration, the counters and waiting
instances of the tasks that react to it and the latest kwargs of their
triggers, prefetched together — decides, and the backend writes what changed,
with the step's history events, atomically.

A backend implements the :class:`StorageContract`: :meth:`~StorageContract.load`
(fill a step with the records it wants), :meth:`~StorageContract.commit` (write
a step's changes; an optimistic backend refuses them if what the step read
changed meanwhile, and the step runs again), :meth:`~StorageContract.exclusive`
(a pessimistic backend's lock or transaction around a step),
:meth:`~StorageContract.read_history`, :meth:`~StorageContract.delete`,
:meth:`~StorageContract.session_uids`, :meth:`~StorageContract.get_options` and
:meth:`~StorageContract.hook_lock`. :class:`BaseTriggerStorage` implements it
for custom backends written against the original's whole-session pair
:meth:`~BaseTriggerStorage._load_from_backend` / :meth:`~BaseTriggerStorage._save`
(simple; each step reads and writes the whole session).
"""

from __future__ import annotations

import copy
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any, ClassVar, Protocol, TypeVar, cast, runtime_checkable

from triggers import _json as stored_json
from triggers.config import check_kwargs_map, check_metadata, check_status, validate_configuration
from triggers.exceptions import (
    CorruptSessionState,
    InstanceNotFound,
    InvalidArgument,
    LockNotReentrant,
    LockTimeout,
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
from triggers.storages import _records as records
from triggers.types import (
    STATUS_RUNNING,
    STATUS_UNSTARTED,
    TaskConfig,
    TaskInstance,
    TaskStatus,
    instance_name,
    now,
    task_name_of,
)

__all__ = ["BaseTriggerStorage", "SessionStep", "StorageContract", "Want", "storage_backends"]

T = TypeVar("T")

#: Registry of storage backends: ``storage_backends.get('cache', uid)`` (also importable
#: from :mod:`triggers.storages`).
storage_backends = TriggersRegistry("triggers.storages", "storage backend")

dumps = stored_json.dumps
FORMAT_VERSION = records.FORMAT_VERSION

#: Default of ``TRIGGERS['HISTORY_LIMIT']``: events kept per session.
DEFAULT_HISTORY_LIMIT = 1000

_MISSING: Any = object()

#: History event names of the statuses an instance moves to.
_STATUS_EVENTS = {
    "unstarted": "reset", "scheduled": "scheduled", "running": "started",
    "finished": "finished", "failed": "failed", "abandoned": "abandoned",
    "replayed": "replayed", "skipped": "skipped",
}


#: Default of ``TRIGGERS['IDEMPOTENCY_KEYS']``: idempotency keys kept per session.
DEFAULT_IDEMPOTENCY_KEYS = 1000


def idempotency_limit() -> int:
    """``TRIGGERS['IDEMPOTENCY_KEYS']``: the newest keys kept per session."""
    from django.conf import settings

    if settings.configured:
        from triggers.conf import triggers_settings

        return int(triggers_settings.IDEMPOTENCY_KEYS)
    return DEFAULT_IDEMPOTENCY_KEYS


def history_limit() -> int:
    """``TRIGGERS['HISTORY_LIMIT']`` (events kept per session; 0: no history)."""
    from django.conf import settings

    if settings.configured:
        from triggers.conf import triggers_settings

        return int(triggers_settings.HISTORY_LIMIT)
    return DEFAULT_HISTORY_LIMIT


class Want:
    """What a step wants read: the parts of a session a backend loads at once."""

    __slots__ = ("counters", "delayed", "everything", "idempotency", "instances", "latest",
                 "meta", "open", "session", "triggers", "waiting")

    def __init__(self, triggers: Iterable[str] = (), instances: Iterable[str] = (),
                 counters: Iterable[str] = (), latest: Iterable[str] = (),
                 waiting: Iterable[str] = (), meta: Iterable[str] = (), open: bool = False,  # noqa: A002
                 everything: bool = False, session: bool = False,
                 idempotency: Iterable[str] = (), delayed: Iterable[str] = ()) -> None:
        #: Fired triggers: the counters and waiting instances of the tasks that react
        #: to them and the latest kwargs of those tasks' triggers (the index says which).
        self.triggers = set(triggers)
        #: Instances by name, wherever they are.
        self.instances = set(instances)
        self.counters = set(counters)
        self.latest = set(latest)
        #: Tasks whose waiting instances are wanted (their counters come too).
        self.waiting = set(waiting)
        self.meta = set(meta)
        #: Every open (waiting or active) instance.
        self.open = open
        #: The whole session (inspection).
        self.everything = everything
        #: Every per-session field (counters, latest kwargs, metadata), no instances.
        self.session = session or everything
        #: Idempotency keys whose records are wanted.
        self.idempotency = set(idempotency)
        #: Tasks whose delayed instances are wanted.
        self.delayed = set(delayed)

    def expand(self, config: records.ParsedConfig) -> Want:
        """The same with ``triggers`` replaced by what the index says they need."""
        want = Want(instances=self.instances, counters=self.counters, latest=self.latest,
                    waiting=self.waiting, meta=self.meta, open=self.open,
                    everything=self.everything, session=self.session,
                    idempotency=self.idempotency, delayed=self.delayed)
        for trigger in self.triggers:
            want.latest.add(trigger)
            entry = config.index.get(trigger)
            if entry:
                want.waiting.update(entry[0])
                want.latest.update(entry[1])
                want.delayed.update(entry[2])
        want.counters |= want.waiting
        return want

    def __bool__(self) -> bool:
        return bool(self.triggers or self.instances or self.counters or self.latest
                    or self.waiting or self.meta or self.open or self.everything or self.session
                    or self.idempotency or self.delayed)


@runtime_checkable
class StorageContract(Protocol):
    """What a storage backend implements; one contract test suite runs over every backend."""

    uid: str

    def get_options(self) -> dict[str, Any]:
        """JSON-ready keyword arguments that rebuild an equivalent storage (besides ``uid``)."""

    def exclusive(self) -> AbstractContextManager[Any]:
        """Held around a step by a pessimistic backend (a lock, a transaction); else a no-op."""

    def load(self, step: SessionStep, want: Want) -> None:
        """Fill ``step`` with the records ``want`` names (and the configuration)."""

    def commit(self, step: SessionStep) -> bool:
        """Write the step's changes and history atomically; ``False`` if what it read changed."""

    def read_history(self, limit: int | None) -> list[dict[str, Any]]:
        """The session's history events, oldest first (the last ``limit`` ones)."""

    def delete(self) -> None:
        """Remove everything this session stored."""

    @classmethod
    def session_uids(cls, **options: Any) -> Iterable[str]:
        """UIDs of the sessions stored with these options (housekeeping; not the hot path)."""

    def hook_lock(self) -> AbstractContextManager[Any]:
        """The lock under which a manager runs this session's hooks."""

    @classmethod
    def due_sessions(cls, until: float, limit: int, **options: Any) -> Iterable[str]:
        """UIDs of sessions with time-driven work due by ``until`` (see
        :mod:`triggers.timers`), at most ``limit``, claimed for one sweep: a concurrent
        sweep does not get them again until :meth:`swept` (or a claim period) passes."""

    def swept(self, dues: dict[str, float], until: float) -> None:
        """After a sweep of this session claimed by ``due_sessions(until, …)``: the due
        time of each of its open instances that has one."""


class SessionStep:
    """The working view of one atomic step.

    Reads load what they need from the backend (most of it prefetched with the
    step), writes are collected and committed together. The manager reads the
    configuration (``tasks``, ``reacting()``), ``count()``, ``latest()``,
    ``waiting()``, ``instance()``, and writes with ``save()``,
    ``new_instance()``, ``set_latest_kwargs()``, ``set_tasks()``,
    ``set_metadata()`` and ``note()``.
    """

    def __init__(self, storage: BaseTriggerStorage, uid: str) -> None:
        self.storage = storage
        self.uid = uid
        #: The configuration as loaded (``None`` until the backend loaded it).
        self.config: records.ParsedConfig | None = None
        self._counters: dict[str, int] = {}
        self._latest: dict[str, Any] = {}  # trigger -> kwargs, or None if never fired
        self._meta: dict[str, Any] = {}
        self._waiting: dict[str, dict[str, TaskInstance]] = {}
        self._delayed: dict[str, dict[str, TaskInstance]] = {}
        self._found: dict[str, TaskInstance | None] = {}
        self._places: dict[str, str | None] = {}
        self._was: dict[str, TaskStatus | None] = {}
        self._open: dict[str, TaskInstance] | None = None
        self._all_latest = False
        self._all_meta = False
        self._all_counters = False
        self._remembered: dict[str, list[str] | None] = {}
        #: A token written with the step's changes: after an unknown outcome the backend
        #: can tell whether they were applied.
        self.token = f"{random.getrandbits(64):016x}"
        #: What an optimistic backend checks at commit (its own format).
        self.observed: dict[Any, Any] = {}
        # Writes.
        self._new_config: records.ParsedConfig | None = None
        self._set_counters: dict[str, int] = {}
        self._set_latest: dict[str, dict[str, Any]] = {}
        self._set_meta: dict[str, Any] = {}
        self._dirty: dict[str, TaskInstance] = {}
        self._notes: dict[str, str] = {}
        self._idem_new: dict[str, list[str]] = {}
        self._events: list[dict[str, Any]] = []
        #: Triggers applied in this step, in order, with the instances each scheduled.
        self.fired: list[tuple[str, list[TaskInstance]]] = []
        #: A sweep's step: on a storage whose due index is written apart from the step
        #: (``commits_sweeps``) it commits even when it changed nothing, so that a step
        #: that ran alongside it and indexed due work must run again (see
        #: triggers.storages.redis.DueIndex).
        self.swept = False

    # -- loading (called by backends) -----------------------------------------

    def need(self, want: Want) -> None:
        """Load what ``want`` names and is not loaded yet (one backend read).

        Until the configuration is loaded ``want`` goes to the backend as it is
        (with its ``triggers`` to expand through the configuration's index).
        """
        missing = self._missing(want)
        if self.config is None or missing:
            self.storage.load(self, missing)

    def _missing(self, want: Want) -> Want:
        if self.config is None:
            return want
        want = want.expand(self.config)
        return Want(
            instances={n for n in want.instances if n not in self._found},
            counters={t for t in want.counters if t not in self._counters},
            latest=set() if self._all_latest else {t for t in want.latest
                                                    if t not in self._latest},
            waiting={t for t in want.waiting if t not in self._waiting},
            meta=set() if self._all_meta else {k for k in want.meta if k not in self._meta},
            open=want.open and self._open is None,
            everything=want.everything,
            session=want.session and not (self._all_latest and self._all_meta
                                          and self._all_counters),
            idempotency={k for k in want.idempotency if k not in self._remembered},
            delayed={t for t in want.delayed if t not in self._delayed},
        )

    def loaded_config(self, config: records.ParsedConfig) -> None:
        if self.config is None:
            self.config = config

    def loaded_counter(self, task: str, value: int, complete: bool = False) -> None:
        if task:
            self._counters.setdefault(task, value)
        self._all_counters = self._all_counters or complete

    def loaded_latest(self, trigger: str, kwargs: Any, complete: bool = False) -> None:
        if trigger:
            self._latest.setdefault(trigger, kwargs)
        self._all_latest = self._all_latest or complete

    def loaded_meta(self, key: str, value: Any, complete: bool = False) -> None:
        if key:
            self._meta.setdefault(key, value)
        self._all_meta = self._all_meta or complete

    def loaded_idempotency(self, key: str, names: list[str] | None) -> None:
        self._remembered.setdefault(key, names)

    def loaded_waiting(self, task: str, instances: Iterable[TaskInstance],
                       place: str = records.PLACE_WAITING) -> None:
        """The instances of one task kept in a per-task place (waiting, or delayed)."""
        where = self._waiting if place == records.PLACE_WAITING else self._delayed
        if task in where:
            return
        found = {}
        for instance in instances:
            found[instance.name] = self._remember(instance, place)
        where[task] = found

    def loaded_instance(self, name: str, instance: TaskInstance | None,
                        place: str | None) -> None:
        if name not in self._found:
            self._remember(instance, place, name)

    def loaded_open(self, instances: Iterable[TaskInstance]) -> None:
        if self._open is None:
            self._open = {i.name: self._remember(i, records.place_of(i)) for i in instances}

    def _remember(self, instance: TaskInstance | None, place: str | None,
                  name: str | None = None) -> Any:
        name = name or (instance.name if instance is not None else "")
        known = self._found.get(name, _MISSING)
        if known is not _MISSING:
            return known
        self._found[name] = instance
        self._places[name] = place
        self._was[name] = instance.status if instance is not None else None
        return instance

    # -- reading ------------------------------------------------------------------

    @property
    def tasks(self) -> dict[str, TaskConfig]:
        """The configuration: task name → TaskConfig."""
        config = self._new_config or self._config()
        return config.tasks

    def _config(self) -> records.ParsedConfig:
        if self.config is None:
            self.storage.load(self, Want())
        assert self.config is not None
        return self.config

    def reacting(self, trigger_name: str) -> list[TaskConfig]:
        """The tasks whose ``after``, ``andEvery`` or ``unless`` mention the trigger."""
        return (self._new_config or self._config()).reacting(trigger_name)

    def count(self, task_name: str) -> int:
        """How many instances of the task were ever created."""
        if task_name in self._set_counters:
            return self._set_counters[task_name]
        if task_name not in self._counters:
            self.need(Want(counters=[task_name]))
        return self._counters.get(task_name, 0)

    def latest(self, trigger_name: str) -> dict[str, Any] | None:
        """The kwargs the trigger was last fired with, or ``None`` if it never fired."""
        if trigger_name in self._set_latest:
            return self._set_latest[trigger_name]
        if trigger_name not in self._latest and not self._all_latest:
            self.need(Want(latest=[trigger_name]))
        value: dict[str, Any] | None = self._latest.get(trigger_name)
        return value

    @property
    def latest_kwargs(self) -> dict[str, dict[str, Any]]:
        """Every trigger's latest kwargs (reads them all: not for the hot path)."""
        if not self._all_latest:
            self.need(Want(session=True))
        merged = {name: kwargs for name, kwargs in self._latest.items() if kwargs is not None}
        merged.update(self._set_latest)
        return merged

    @property
    def counters(self) -> dict[str, int]:
        if not self._all_counters:
            self.need(Want(session=True))
        return {**self._counters, **self._set_counters}

    def metadata(self, key: str, default: Any = None) -> Any:
        if key in self._set_meta:
            return self._set_meta[key]
        if key not in self._meta and not self._all_meta:
            self.need(Want(meta=[key]))
        value = self._meta.get(key, _MISSING)
        return default if value is _MISSING or value is None else value

    @property
    def session_metadata(self) -> dict[str, Any]:
        if not self._all_meta:
            self.need(Want(session=True))
        merged = {key: value for key, value in self._meta.items() if value is not None}
        merged.update(self._set_meta)
        return merged

    def waiting(self, task_name: str) -> list[TaskInstance]:
        """The task's unstarted instances, by number."""
        if task_name not in self._waiting:
            self.need(Want(waiting=[task_name]))
        return self._per_task(self._waiting, task_name, records.PLACE_WAITING)

    def delayed(self, task_name: str) -> list[TaskInstance]:
        """The task's scheduled instances that have a delay (``start_after``), by number."""
        if task_name not in self._delayed:
            self.need(Want(delayed=[task_name]))
        return self._per_task(self._delayed, task_name, records.PLACE_DELAYED)

    def _per_task(self, where: dict[str, dict[str, TaskInstance]], task_name: str,
                  place: str) -> list[TaskInstance]:
        found = dict(where.get(task_name, {}))
        for name, instance in self._dirty.items():
            if instance.task_name == task_name:
                if records.place_of(instance) == place:
                    found[name] = instance
                else:
                    found.pop(name, None)
        return sorted(found.values(), key=lambda i: i.number)

    def open_instances(self) -> list[TaskInstance]:
        """Every unresolved instance of the session (reads them all: not the hot path)."""
        if self._open is None:
            self.need(Want(open=True))
        found = dict(self._open or {})
        for name, instance in self._dirty.items():
            if instance.is_resolved:
                found.pop(name, None)
            else:
                found[name] = instance
        return sorted(found.values(), key=lambda i: (i.task_name, i.number))

    def instance(self, name: str) -> TaskInstance:
        """The instance called ``name``, wherever it is."""
        if name in self._dirty:
            return self._dirty[name]
        if name not in self._found:
            self.need(Want(instances=[name]))
        found = self._found.get(name)
        if found is None:
            raise InstanceNotFound(
                f"Session {self.uid!r} has no task instance {name!r}.",
                session_uid=self.uid, instance_name=name,
            )
        return found

    def remembered(self, key: str) -> list[str] | None:
        """What the step that used idempotency key ``key`` scheduled, or ``None``."""
        if key in self._idem_new:
            return self._idem_new[key]
        if key not in self._remembered:
            self.need(Want(idempotency=[key]))
        return self._remembered.get(key)

    def remember(self, key: str, names: list[str]) -> None:
        """Record that this step used idempotency key ``key`` and scheduled ``names``."""
        self._idem_new[key] = list(names)

    @property
    def new_idempotency(self) -> dict[str, list[str]]:
        return self._idem_new

    def find(self, name: str) -> TaskInstance | None:
        try:
            return self.instance(name)
        except InstanceNotFound:
            return None

    def all_instances(self) -> dict[str, TaskInstance]:
        """Every instance of the session (inspection)."""
        self.need(Want(everything=True))
        found = {n: i for n, i in self._found.items() if i is not None}
        found.update(self._dirty)
        return found

    def place_before(self, name: str) -> str | None:
        """Where the instance's record was when the step read it (``None``: new)."""
        return self._places.get(name)

    # -- writing ------------------------------------------------------------------

    def set_latest_kwargs(self, trigger_name: str, kwargs: dict[str, Any]) -> None:
        self._set_latest[trigger_name] = kwargs
        self._events.append(_event("fired", trigger=trigger_name,
                                   size=len(dumps(kwargs)) if kwargs else 0))

    def set_tasks(self, tasks: Mapping[str, TaskConfig]) -> None:
        merged = dict(self.tasks)
        merged.update(tasks)
        self._new_config = records.remember_config(records.ParsedConfig(merged))
        self._events.append(_event("configured", size=len(tasks)))

    def set_metadata(self, key: str, value: Any) -> None:
        self._set_meta[key] = value

    def new_instance(
        self,
        config: TaskConfig,
        kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        status: TaskStatus | str = STATUS_UNSTARTED,
        metadata: Mapping[str, Any] | None = None,
        abandon_state: Iterable[str] | None = None,
    ) -> TaskInstance:
        number = self.count(config.name)
        self._set_counters[config.name] = number + 1
        stamp = now()
        meta = {"created": stamp, "modified": stamp}
        meta.update(metadata or {})
        instance = TaskInstance(instance_name(config.name, number), config, kwargs, status, meta,
                                abandon_state)
        self._places[instance.name] = None
        self._found[instance.name] = None
        self._was[instance.name] = None
        self.save(instance)
        return instance

    def save(self, instance: TaskInstance) -> None:
        """Record that ``instance`` changed (status, kwargs or metadata)."""
        self._dirty[instance.name] = instance
        if self._open is not None and instance.is_resolved:
            self._open.pop(instance.name, None)

    def note(self, instance: TaskInstance, event: str) -> None:
        """Name the history event of this step's change to ``instance`` (``recovered`` …)."""
        self._notes[instance.name] = event

    @property
    def changed(self) -> bool:
        return bool(self._dirty or self._set_latest or self._set_counters or self._set_meta
                    or self._idem_new or self._new_config is not None
                    or (self.swept and self.storage.commits_sweeps))

    # -- what a backend commits ---------------------------------------------------

    @property
    def new_config(self) -> records.ParsedConfig | None:
        return self._new_config

    @property
    def new_counters(self) -> dict[str, int]:
        return self._set_counters

    @property
    def new_latest(self) -> dict[str, dict[str, Any]]:
        return self._set_latest

    @property
    def new_meta(self) -> dict[str, Any]:
        return self._set_meta

    @property
    def dirty(self) -> dict[str, TaskInstance]:
        return self._dirty

    def status_before(self, name: str) -> TaskStatus | None:
        """The status an instance had when the step read it (``None``: the step created it)."""
        return self._was.get(name)

    def moves(self) -> Iterator[tuple[TaskInstance, str | None, str]]:
        """Each changed instance with its place before (``None``: new) and after."""
        for name, instance in self._dirty.items():
            yield instance, self._places.get(name), records.place_of(instance)

    def open_delta(self) -> int:
        """How many more open (waiting or active) instances the session has after the step."""
        delta = 0
        for _instance, before, after in self.moves():
            delta += (after != records.PLACE_DONE) - (before not in (None, records.PLACE_DONE))
        return delta

    def history(self) -> list[dict[str, Any]]:
        """The history events of this step, in order."""
        events = list(self._events)
        for name, instance in self._dirty.items():
            if self._places.get(name) is None:
                events.append(_event("created", instance=name))
                if instance.status != STATUS_UNSTARTED:
                    events.append(self._status_event(instance))
            elif self._was.get(name) != instance.status or name in self._notes:
                events.append(self._status_event(instance))
        return events

    def _status_event(self, instance: TaskInstance) -> dict[str, Any]:
        event = self._notes.get(instance.name) or _STATUS_EVENTS[instance.status.value]
        return _event(event, instance=instance.name,
                      run=instance.metadata.get("run") if instance.status == STATUS_RUNNING
                      else None)

    # -- nested steps (inside a lock block) ----------------------------------------

    def checkpoint(self) -> tuple[Any, ...]:
        """A copy of what the step wrote, to :meth:`restore` if a nested call fails."""
        return (self._new_config, dict(self._set_counters), copy.deepcopy(self._set_latest),
                copy.deepcopy(self._set_meta), {n: _clone(i) for n, i in self._dirty.items()},
                dict(self._places), dict(self._was), dict(self._notes), list(self._events),
                list(self.fired), dict(self._idem_new))

    def restore(self, checkpoint: tuple[Any, ...]) -> None:
        """Back to :meth:`checkpoint`; what was read is read again (the session is locked)."""
        (self._new_config, self._set_counters, self._set_latest, self._set_meta, self._dirty,
         places, was, self._notes, self._events, self.fired, self._idem_new) = checkpoint
        self._remembered = {}
        self._counters, self._latest, self._meta = {}, {}, {}
        self._waiting, self._delayed, self._open = {}, {}, None
        self._all_latest = self._all_meta = False
        # What was read is read again, but where each changed instance was stored (and
        # its status then) is kept: its record moves from there when the block commits.
        self._found = {name: (self._dirty.get(name) if place is not None else None)
                       for name, place in places.items()
                       if place is None or name in self._dirty}
        self._places = {name: places[name] for name in self._found}
        self._was = {name: was.get(name) for name in self._found}


def _event(kind: str, **data: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"t": now(), "e": kind, "p": records.process_name()}
    for key, short in (("instance", "i"), ("trigger", "g"), ("size", "n"), ("run", "r")):
        value = data.get(key)
        if value is not None:
            event[short] = value
    return event


def expand_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """A stored history event with readable keys."""
    names = {"t": "at", "e": "event", "p": "process", "i": "instance", "g": "trigger",
             "n": "size", "r": "run"}
    return {names.get(key, key): value for key, value in event.items()}


def _clone(instance: TaskInstance) -> TaskInstance:
    return TaskInstance(instance.name, instance.config, copy.deepcopy(instance.kwargs),
                        instance.status, copy.deepcopy(instance.metadata), instance.abandon_state)


class _Held:
    """A lock block (``with storage.acquire_lock()``) of one thread."""

    __slots__ = ("callbacks", "handed", "step", "thread")

    def __init__(self, step: SessionStep) -> None:
        self.thread = threading.get_ident()
        self.step = step
        self.callbacks: list[Callable[[], None]] = []
        #: Instances the block read, by name, with what they were when read.
        self.handed: dict[str, tuple[TaskInstance, dict[str, Any]]] = {}

    def hand(self, instance: TaskInstance) -> TaskInstance:
        tracked = self.handed.get(instance.name)
        if tracked is None or tracked[0] is not instance:
            if tracked is not None:
                # A fresh copy (after a failed nested call): keep what was changed on the
                # old one, then follow the new one.
                self.save_handed()
            self.handed[instance.name] = (instance, copy.deepcopy(instance.to_dict()))
        return instance

    def save_handed(self) -> None:
        """Record the changes the block made to instances it read."""
        for name, (instance, before) in list(self.handed.items()):
            after = instance.to_dict()
            if after != before:
                self.step.save(instance)
                self.handed[name] = (instance, copy.deepcopy(after))


class BaseTriggerStorage:
    """Base class of storage backends; one object serves one session (``uid``).

    Subclasses set ``name`` (their registry key) and implement the
    :class:`StorageContract` — or only the original's whole-session pair
    :meth:`_load_from_backend` / :meth:`_save`, which this class adapts.

    The inspection surface (``tasks``, ``instances``, ``latest_kwargs``,
    ``storage[name]``, iteration …) reads the stored state afresh on every
    access, so it always shows what other processes wrote.
    """

    #: Registry key under the ``triggers.storages`` entry-point group.
    name: ClassVar[str] = ""
    #: Whether :meth:`commit` can refuse a step whose reads changed (optimistic backends);
    #: pessimistic ones hold :meth:`exclusive` around the whole step instead.
    optimistic: bool = False

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

    #: Whether steps join the caller's database transaction (the database storage);
    #: other storages' fires wait for it to commit (see :meth:`caller_transaction`).
    joins_transactions: bool = False

    #: Whether a sweep's step must commit even when it changed nothing (see SessionStep.swept).
    commits_sweeps = False

    def step_applied(self, token: str) -> bool | None:
        """Whether the step whose commit raised a :class:`StorageError` with this
        ``step_token`` was applied (``None``: this storage cannot tell). A step found not
        applied never will be."""
        return None

    def joins_transaction(self, alias: str) -> bool:
        """Whether this storage's steps join a transaction of database ``alias``: then a
        fire inside it is applied at once, and undone if it rolls back."""
        return False

    def on_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the step just taken is durable.

        The manager dispatches instances and calls its hooks through this. Inside
        the caller's ``transaction.atomic()`` (``ATOMIC_REQUESTS`` included) the
        callback waits for that transaction to commit (``transaction.on_commit``,
        robust: a failing callback of anyone's does not cancel it); inside
        :meth:`acquire_lock` it waits for the end of the block; otherwise it runs now.
        """
        held = self._held_here()
        if held is not None:
            held.callbacks.append(callback)
            return
        alias = self.caller_transaction()
        if alias is not None:
            from django.db import transaction

            transaction.on_commit(callback, using=alias, robust=True)
            return
        callback()

    @staticmethod
    def caller_transaction() -> str | None:
        """The alias of a database whose ``transaction.atomic()`` block the caller is in.

        The blocks that wrap a ``django.test.TestCase`` do not count: they never
        commit, and a test sees what happens as if they had.
        """
        if not _django_ready():
            return None
        from django.db import connections

        for connection in connections.all(initialized_only=True):
            if connection.in_atomic_block and any(
                    not getattr(block, "_from_testcase", False)
                    for block in getattr(connection, "atomic_blocks", [None])):
                return str(connection.alias)
        return None

    def transact(self, step_function: Callable[[SessionStep], T],
                 want: Want | None = None) -> T:
        """Run ``step_function(step)`` as one atomic step and return what it returns.

        The function reads and changes the session through ``step``; its changes
        are written when it returns, nothing is written if it raises. ``want``
        names what to prefetch (the fired triggers, the instances). An optimistic
        backend runs the function again if what it read changed meanwhile, so it
        must have no other side effects. Inside :meth:`acquire_lock` it runs on
        the block's working state.
        """
        held = self._held_here()
        if held is not None:
            step = held.step
            checkpoint = step.checkpoint()
            # Each nested call reports only what it fired itself (its caller dispatches that).
            earlier, step.fired = step.fired, []
            try:
                result = step_function(step)
            except BaseException:
                step.restore(checkpoint)
                step.fired = earlier
                raise
            step.fired = earlier + step.fired
            return result
        if not self.optimistic:
            with self.exclusive():
                step = self._new_step(want)
                result = step_function(step)
                if step.changed:
                    self._commit_or_fail(step)
                return result
        return self._optimistic(step_function, want)

    def _new_step(self, want: Want | None) -> SessionStep:
        step = SessionStep(self, self.uid)
        step.need(want or Want())
        return step

    def _commit_or_fail(self, step: SessionStep) -> None:
        if not self.commit(step):
            raise StorageError(f"Session {self.uid!r} changed during an exclusive step.",
                               session_uid=self.uid)

    def _optimistic(self, step_function: Callable[[SessionStep], T], want: Want | None) -> T:
        """Read, decide, commit if unchanged; on a conflict run again (then under the lock)."""
        deadline = time.monotonic() + self.lock_timeout
        conflicts = 0
        delay = 0.0005
        while True:
            step = self._new_step(want)
            result = step_function(step)
            if not step.changed or self.commit(step):
                return result
            if time.monotonic() >= deadline:
                raise LockTimeout(
                    f"Could not apply a step to session {self.uid!r} within "
                    f"{self.lock_timeout} s: its lock stayed taken or the step kept "
                    "conflicting with other processes.", session_uid=self.uid,
                )
            if step.observed.get("locked"):
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.05)
                continue
            conflicts += 1
            if conflicts >= 32:
                # Starving: take the session lock, which makes other steps wait.
                with self.step_lock(max(deadline - time.monotonic(), 0.001)) as owner:
                    while True:
                        step = self._new_step(want)
                        step.observed["lock_owner"] = owner
                        result = step_function(step)
                        if not step.changed or self.commit(step):
                            return result
                        if time.monotonic() >= deadline:
                            raise LockTimeout(
                                f"Could not apply a step to session {self.uid!r} within "
                                f"{self.lock_timeout} s, even holding its lock.",
                                session_uid=self.uid)
            time.sleep(random.random() * 0.0001 * conflicts)

    def step_lock(self, timeout: float) -> AbstractContextManager[str | None]:
        """An optimistic backend's session lock for one starving step; yields its owner id."""
        raise NotImplementedError(f"{type(self).__name__} is not an optimistic backend")

    @contextmanager
    def atomic(self) -> Iterator[SessionStep]:
        """A step as a ``with`` block: changes are written on exit, nothing if it raises."""
        with self.exclusive_step() as step:
            yield step

    @contextmanager
    def exclusive_step(self) -> Iterator[SessionStep]:
        """A step that holds the session lock (or transaction) from its first read to its write."""
        with self.session_lock():
            step = self._new_step(None)
            yield step
            if step.changed:
                self._commit_or_fail(step)

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
        with self.exclusive_step() as step:
            held = _Held(step)
            self._held = held
            try:
                yield self
                held.save_handed()
            finally:
                self._held = None
        # Inside the caller's transaction the dispatches wait for its commit (a rollback
        # leaves what the block scheduled to recovery, never runs it for nothing).
        self.on_commit(lambda: _run_all(held.callbacks))

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

    def in_lock_block(self) -> bool:
        """Whether this thread is inside ``with storage.acquire_lock()`` on this object."""
        return self._held_here() is not None

    def _held_here(self) -> _Held | None:
        """The lock block this thread holds on this storage object, if any."""
        held = self._held
        if held is not None and held.thread == threading.get_ident():
            return held
        return None

    # ------------------------------------------------------------------
    # Locks.
    # ------------------------------------------------------------------

    def session_lock(self) -> AbstractContextManager[Any]:
        """The session lock (expiring, non-reentrant): what :meth:`acquire_lock` holds.

        Backends provide it as ``_session_lock()`` (the original's extension point);
        this default serialises the threads of one process only.
        """
        return self._session_lock()

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

    # ------------------------------------------------------------------
    # The contract, adapted to the whole-session pair (custom backends).
    # ------------------------------------------------------------------

    def exclusive(self) -> AbstractContextManager[Any]:
        return self.session_lock()

    def load(self, step: SessionStep, want: Want) -> None:
        """Whole-session adapter: load everything, hand the step what it wants."""
        self._load()
        meta = dict(self._metadata)
        latest = meta.pop("latest_kwargs", {}) or {}
        counters = meta.pop("counters", None)
        meta.pop("history", None)
        idempotency = meta.pop("idempotency", None) or {}
        for key in want.idempotency:
            step.loaded_idempotency(key, idempotency.get(key))
        if counters is None:
            counters = {}
            for name in self._instances:
                task = task_name_of(name)
                counters[task] = max(counters.get(task, 0), int(name.rsplit("#", 1)[1]) + 1)
        step.loaded_config(records.remember_config(records.ParsedConfig(dict(self._configs))))
        for task in step.tasks:
            step.loaded_counter(task, int(counters.get(task, 0)))
        for trigger, kwargs in latest.items():
            step.loaded_latest(trigger, kwargs)
        step.loaded_latest("", None, complete=True)
        for key, value in meta.items():
            step.loaded_meta(key, value)
        step.loaded_meta("", None, complete=True)
        by_place: dict[str, dict[str, list[TaskInstance]]] = {
            place: {task: [] for task in step.tasks} for place in records.TASK_PLACES}
        for instance in self._instances.values():
            copy_ = _clone(instance)
            place = records.place_of(copy_)
            if place in by_place:
                by_place[place].setdefault(copy_.task_name, []).append(copy_)
            step.loaded_instance(copy_.name, copy_, place)
        for place, by_task in by_place.items():
            for task, instances in by_task.items():
                step.loaded_waiting(task, instances, place)
        step.loaded_open(i for i in self._instances.values() if not i.is_resolved)
        for name in want.instances:
            step.loaded_instance(name, None, None)

    def commit(self, step: SessionStep) -> bool:
        """Whole-session adapter: apply the changes to the loaded session and save it all."""
        if step.new_config is not None:
            self._configs = dict(step.new_config.tasks)
        for name, instance in step.dirty.items():
            self._instances[name] = instance
        meta = dict(self._metadata)
        latest = dict(meta.get("latest_kwargs") or {})
        latest.update(step.new_latest)
        counters = dict(meta.get("counters") or {})
        counters.update(step.new_counters)
        meta.update(step.new_meta)
        meta["latest_kwargs"] = latest
        meta["counters"] = counters
        limit = history_limit()
        if limit:
            meta["history"] = (list(meta.get("history") or []) + step.history())[-limit:]
        if step.new_idempotency:
            kept = dict(meta.get("idempotency") or {})
            kept.update(step.new_idempotency)
            meta["idempotency"] = dict(list(kept.items())[-idempotency_limit():])
        self._metadata = meta
        self._save()
        return True

    def read_history(self, limit: int | None) -> list[dict[str, Any]]:
        self._load()
        events = list(self._metadata.get("history") or [])
        return events[-limit:] if limit else events

    @classmethod
    def session_uids(cls, **options: Any) -> Iterable[str]:
        raise NotImplementedError(f"{cls.__name__} cannot list its sessions")

    @classmethod
    def due_sessions(cls, until: float, limit: int, **options: Any) -> Iterable[str]:
        """Without a due index: every session (the sweep looks at each of them; its cost
        grows with the number of sessions). The bundled database and Redis storages
        keep an index: their cost is that of the work that is due."""
        return cls.session_uids(**options)

    def swept(self, dues: dict[str, float], until: float) -> None:
        """Nothing to do without a due index (or with one kept in the steps' writes)."""

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
                else records.instance_from_json(name, stored_json.from_plain(value),
                                                self._configs, self.uid, "backend")
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
            "or the storage contract (load, commit, exclusive …)."
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

    def _view(self, want: Want) -> SessionStep:
        """A step to read from: the lock block's working state, or a fresh read."""
        held = self._held_here()
        if held is not None:
            held.step.need(want)
            return held.step
        return self._new_step(want)

    def history(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The session's history, oldest first: the last ``limit`` events (default: all kept).

        Each event has ``at`` (epoch seconds), ``event`` (``fired``, ``created``,
        ``scheduled``, ``started``, ``finished``, ``failed``, ``retried``,
        ``replayed``, ``skipped``, ``abandoned``, ``recovered``, ``unsent`` …), ``process``
        (``host:pid``) and, as they apply, ``trigger`` with ``size`` (bytes of its
        kwargs), ``instance`` and ``run`` (the run token).
        """
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise InvalidArgument(f"history() limit must be a number >= 0 or None, got {limit!r}")
        return [expand_event(event) for event in self.read_history(limit)]

    @property
    def tasks(self) -> dict[str, TaskConfig]:
        return dict(self._view(Want()).tasks)

    @property
    def latest_kwargs(self) -> dict[str, dict[str, Any]]:
        return self._view(Want(session=True)).latest_kwargs

    @property
    def metadata(self) -> dict[str, Any]:
        """Session metadata, including ``latest_kwargs`` and the instance ``counters``."""
        step = self._view(Want(session=True))
        meta = dict(step.session_metadata)
        meta["latest_kwargs"] = step.latest_kwargs
        meta["counters"] = step.counters
        return meta

    def _handed(self, instance: TaskInstance) -> TaskInstance:
        """Inside a lock block, the instance is live: changes made to it are saved."""
        held = self._held_here()
        return held.hand(instance) if held is not None else instance

    @property
    def instances(self) -> dict[str, TaskInstance]:
        """Every instance of the session, by name, in task and number order."""
        found = self._view(Want(everything=True)).all_instances()
        return {name: self._handed(found[name])
                for name in sorted(found, key=_instance_sort_key)}

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
        return self._view(Want(instances=[name])).find(name) is not None

    def __getitem__(self, name: str) -> TaskInstance:
        return self.get_instance(name)

    def get_instance(self, name: str | TaskInstance) -> TaskInstance:
        if isinstance(name, TaskInstance):
            name = name.name
        return self._handed(self._view(Want(instances=[name])).instance(name))

    def instances_of_task(self, task: str | TaskConfig) -> list[TaskInstance]:
        """Every instance of one task, in number order."""
        task_name = task.name if isinstance(task, TaskConfig) else task
        step = self._view(Want(counters=[task_name]))
        names = [instance_name(task_name, n) for n in range(step.count(task_name))]
        step.need(Want(instances=names))
        return [self._handed(found) for found in map(step.find, names) if found is not None]

    def get_unresolved_tasks(self) -> list[TaskConfig]:
        """Tasks with no instance yet, or with at least one unresolved instance."""
        step = self._view(Want(open=True))
        step.need(Want(counters=step.tasks))
        open_tasks = {instance.task_name for instance in step.open_instances()}
        return [config for name, config in step.tasks.items()
                if step.count(name) == 0 or name in open_tasks]

    def get_unresolved_instances(self) -> list[TaskInstance]:
        return [self._handed(i) for i in self._view(Want(open=True)).open_instances()]

    def get_instances_with_unresolved_logs(self) -> list[TaskInstance]:
        """Instances that logged a warning or worse whose logs are not marked resolved."""
        return [i for i in self.instances.values() if i.has_unresolved_logs]

    def debug_repr(self) -> dict[str, Any]:
        """The whole session as JSON-ready data, for logs and debugging."""
        step = self._view(Want(everything=True))
        found = step.all_instances()
        return {
            "uid": self.uid,
            "backend": type(self).__name__,
            "tasks": {name: config.to_dict() for name, config in step.tasks.items()},
            "instances": {name: found[name].to_dict()
                          for name in sorted(found, key=_instance_sort_key)},
            "metadata": {**step.session_metadata, "latest_kwargs": step.latest_kwargs,
                         "counters": step.counters},
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

        return self._handed(self.transact(clone, Want(instances=[name])))

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


_ready = False


def _django_ready() -> bool:
    """Whether Django settings are configured (remembered once they are)."""
    global _ready
    if not _ready:
        from django.conf import settings

        _ready = settings.configured
    return _ready


def _run_all(callbacks: list[Callable[[], None]]) -> None:
    """Run every callback even if some fail (logged); then raise the first failure."""
    import logging

    first: BaseException | None = None
    for callback in callbacks:
        try:
            callback()
        except Exception as exc:
            logging.getLogger(__name__).exception("A callback after a lock block failed")
            first = first or exc
    if first is not None:
        raise first


def _instance_sort_key(name: str) -> tuple[str, int]:
    task, _, number = name.rpartition("#")
    return task, int(number) if number.isdigit() else -1




class SessionRecord:
    """The per-session fields as one record (pessimistic backends keep it whole)."""

    __slots__ = ("counters", "history_seq", "latest", "meta", "open", "version")

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        data = data or {}
        if "fmt" not in data and data:
            raise ValueError("it is not a session record of this release")
        for part in ("n", "k", "m"):
            if not isinstance(data.get(part) or {}, Mapping):
                raise ValueError(f"{part!r} is a {type(data[part]).__name__}, not an object")
        if not all(isinstance(n, int) and not isinstance(n, bool)
                   for n in (data.get("n") or {}).values()):
            raise ValueError("a counter is not an integer")
        if not all(kwargs is None or isinstance(kwargs, Mapping)
                   for kwargs in (data.get("k") or {}).values()):
            raise ValueError("latest kwargs must be objects")
        self.version: str | None = data.get("v")
        self.counters: dict[str, int] = dict(data.get("n") or {})
        self.latest: dict[str, Any] = dict(data.get("k") or {})
        self.meta: dict[str, Any] = dict(data.get("m") or {})
        self.open: int = int(data.get("o") or 0)
        self.history_seq: int = int(data.get("h") or 0)

    def to_json(self) -> dict[str, Any]:
        return {"fmt": FORMAT_VERSION, "v": self.version, "n": self.counters, "k": self.latest,
                "m": self.meta, "o": self.open, "h": self.history_seq}

    def apply(self, step: SessionStep) -> list[dict[str, Any]]:
        """Apply the step's session-level changes; returns its history events."""
        if step.new_config is not None:
            self.version = step.new_config.version
        self.counters.update(step.new_counters)
        self.latest.update(step.new_latest)
        self.meta.update(step.new_meta)
        self.open += step.open_delta()
        events = step.history()
        self.history_seq += len(events)
        return events


class RecordStorage(BaseTriggerStorage):
    """Base of the pessimistic backends that keep a session as records (database, memory, cache).

    A step holds ``exclusive()`` (a transaction, a lock) from its first read to
    its write; subclasses read and write records with the primitives below.
    """

    def _read_session(self) -> SessionRecord | None:
        raise NotImplementedError

    def _read_config(self) -> Any:
        raise NotImplementedError

    def _read_waiting(self, tasks: Iterable[str], place: str = records.PLACE_WAITING
                      ) -> dict[str, list[tuple[str, Any]]]:
        """Raw records of the instances of each task kept in a per-task place."""
        raise NotImplementedError

    def _read_instances(self, names: Iterable[str]) -> dict[str, tuple[Any, str]]:
        """Raw record and place of each named instance that exists."""
        raise NotImplementedError

    def _read_open(self, everything: bool) -> list[tuple[str, Any, str]]:
        """Raw records and places of the open instances (of every instance if ``everything``)."""
        raise NotImplementedError

    def _read_idempotency(self, keys: Iterable[str]) -> dict[str, list[str]]:
        """The recorded result (scheduled instance names) of each idempotency key found."""
        raise NotImplementedError

    def _write(self, step: SessionStep, session: SessionRecord,
               events: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def _where(self) -> str:
        return type(self).__name__

    def _session_of(self, step: SessionStep) -> SessionRecord | None:
        if "session" not in step.observed:
            try:
                step.observed["session"] = self._read_session()
            except (TypeError, ValueError, AttributeError) as exc:
                if isinstance(exc, CorruptSessionState):
                    raise
                raise records.corrupt(self.uid, self._where(), str(exc)) from exc
        session: SessionRecord | None = step.observed["session"]
        return session

    def _instance(self, name: str, raw: Any, config: records.ParsedConfig) -> TaskInstance:
        data = records.decode(raw, self.uid, self._where()) if isinstance(raw, (str, bytes)) \
            else raw
        return records.instance_from_json(name, data, config.tasks, self.uid, self._where())

    def load(self, step: SessionStep, want: Want) -> None:
        session = self._session_of(step)
        if step.config is None:
            parsed = records.EMPTY_CONFIG
            if session is not None and session.version:
                parsed = records.cached_config(session.version) or records.parse_config(
                    self._read_config(), self.uid, self._where(), session.version)
            step.loaded_config(parsed)
        config = step.config
        assert config is not None
        want = want.expand(config)
        session = session or SessionRecord()
        if want.session:
            want.counters |= set(config.tasks) | set(session.counters)
            for trigger, kwargs in session.latest.items():
                step.loaded_latest(trigger, kwargs)
            step.loaded_latest("", None, complete=True)
            for key, value in session.meta.items():
                step.loaded_meta(key, value)
            step.loaded_meta("", None, complete=True)
        for task in want.counters:
            step.loaded_counter(task, int(session.counters.get(task, 0)))
        if want.session:
            step.loaded_counter("", 0, complete=True)
        for trigger in want.latest:
            step.loaded_latest(trigger, session.latest.get(trigger))
        for key in want.meta:
            step.loaded_meta(key, session.meta.get(key))
        for place, tasks in ((records.PLACE_WAITING, want.waiting),
                             (records.PLACE_DELAYED, want.delayed)):
            if tasks:
                for task, found in self._read_waiting(sorted(tasks), place).items():
                    step.loaded_waiting(task, [self._instance(n, raw, config) for n, raw in found],
                                        place)
        if want.instances:
            found_by_name = self._read_instances(sorted(want.instances))
            for name in want.instances:
                raw_place = found_by_name.get(name)
                step.loaded_instance(
                    name, self._instance(name, raw_place[0], config) if raw_place else None,
                    raw_place[1] if raw_place else None)
        if want.idempotency:
            found_keys = self._read_idempotency(sorted(want.idempotency))
            for key in want.idempotency:
                step.loaded_idempotency(key, found_keys.get(key))
        if want.open or want.everything:
            rows = self._read_open(want.everything)
            instances = [self._instance(name, raw, config) for name, raw, _place in rows]
            for instance, (_name, _raw, place) in zip(instances, rows, strict=True):
                step.loaded_instance(instance.name, instance, place)
            step.loaded_open(i for i in instances if not i.is_resolved)
            for task in config.tasks:
                for place in records.TASK_PLACES:
                    step.loaded_waiting(task, [i for i in instances if i.task_name == task
                                               and records.place_of(i) == place], place)

    def commit(self, step: SessionStep) -> bool:
        session = self._session_of(step) or SessionRecord()
        events = session.apply(step)
        self._write(step, session, events)
        step.observed.pop("session", None)
        return True
