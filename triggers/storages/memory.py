"""Session state in this process's memory (registry key ``memory``).

For flows and tests that live in one process: nothing is shared with other
processes and nothing survives the process. Records are kept as JSON text, so
they go through the same encoding as the other backends, in the same layout:
per-session fields, waiting instances per task, active and done instances, and
the history.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any, ClassVar

from triggers.storages import _records as records
from triggers.storages.base import (
    RecordStorage,
    SessionRecord,
    SessionStep,
    history_limit,
    idempotency_limit,
)

__all__ = ["MemoryStorageBackend"]


class _Session:
    __slots__ = ("active", "config", "delayed", "done", "history", "idempotency", "session",
                 "waiting")

    def __init__(self) -> None:
        self.session = ""
        self.config = ""
        self.waiting: dict[str, dict[str, str]] = {}
        self.delayed: dict[str, dict[str, str]] = {}
        self.active: dict[str, str] = {}
        self.done: dict[str, str] = {}
        self.history: list[str] = []
        self.idempotency: dict[str, str] = {}


class MemoryStorageBackend(RecordStorage):
    """Keeps sessions in a dict of this process (``namespace`` separates stores)."""

    name = "memory"

    _stores: ClassVar[dict[str, dict[str, _Session]]] = {}
    _guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, uid: str, namespace: str = "default", **options: Any) -> None:
        super().__init__(uid, **options)
        self.namespace = namespace
        with self._guard:
            self._store = self._stores.setdefault(namespace, {})

    def get_options(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "lock_expire": self.lock_expire,
                "lock_timeout": self.lock_timeout}

    def exclusive(self) -> Any:
        return self.session_lock()

    def _data(self) -> _Session | None:
        return self._store.get(self.uid)

    def _read_session(self) -> SessionRecord | None:
        data = self._data()
        if data is None or not data.session:
            return None
        return SessionRecord(records.decode(data.session, self.uid, "memory"))

    def _read_config(self) -> Any:
        data = self._data()
        return records.decode(data.config, self.uid, "memory") if data and data.config else None

    def _read_waiting(self, tasks: Iterable[str], place: str = records.PLACE_WAITING
                      ) -> dict[str, list[tuple[str, Any]]]:
        data = self._data()
        where = (data.waiting if place == records.PLACE_WAITING else data.delayed) if data else {}
        return {task: list((where.get(task) or {}).items()) for task in tasks}

    def _read_instances(self, names: Iterable[str]) -> dict[str, tuple[Any, str]]:
        data = self._data()
        found: dict[str, tuple[Any, str]] = {}
        if data is None:
            return found
        for name in names:
            task = name.rsplit("#", 1)[0]
            for place, where in ((records.PLACE_WAITING, data.waiting.get(task) or {}),
                                 (records.PLACE_DELAYED, data.delayed.get(task) or {}),
                                 (records.PLACE_ACTIVE, data.active),
                                 (records.PLACE_DONE, data.done)):
                if name in where:
                    found[name] = (where[name], place)
                    break
        return found

    def _read_open(self, everything: bool) -> list[tuple[str, Any, str]]:
        data = self._data()
        if data is None:
            return []
        rows = [(name, raw, place)
                for place, per_task in ((records.PLACE_WAITING, data.waiting),
                                        (records.PLACE_DELAYED, data.delayed))
                for instances in per_task.values() for name, raw in instances.items()]
        rows += [(name, raw, records.PLACE_ACTIVE) for name, raw in data.active.items()]
        if everything:
            rows += [(name, raw, records.PLACE_DONE) for name, raw in data.done.items()]
        return rows

    def _read_idempotency(self, keys: Iterable[str]) -> dict[str, list[str]]:
        data = self._data()
        if data is None:
            return {}
        return {key: records.decode(data.idempotency[key], self.uid, "memory")
                for key in keys if key in data.idempotency}

    def _write(self, step: SessionStep, session: SessionRecord,
               events: list[dict[str, Any]]) -> None:
        # Encode everything first: a value JSON cannot hold changes nothing.
        config = records.dumps(step.new_config.raw) if step.new_config is not None else None
        moves = [(instance, before, after, records.instance_to_json(instance))
                 for instance, before, after in step.moves()]
        encoded_events = [records.dumps(e) for e in events]
        encoded_session = records.dumps(session.to_json())
        remembered = {key: records.dumps(names) for key, names in step.new_idempotency.items()}
        data = self._data() or _Session()
        if config is not None:
            data.config = config
        def where(place: str, task: str) -> dict[str, str]:
            if place == records.PLACE_WAITING:
                return data.waiting.setdefault(task, {})
            if place == records.PLACE_DELAYED:
                return data.delayed.setdefault(task, {})
            return data.active if place == records.PLACE_ACTIVE else data.done

        for instance, before, after, text in moves:
            if before is not None and before != after:
                where(before, instance.task_name).pop(instance.name, None)
            where(after, instance.task_name)[instance.name] = text
        limit = history_limit()
        if limit:
            data.history = (data.history + encoded_events)[-limit:]
        if remembered:
            data.idempotency.update(remembered)
            for key in list(data.idempotency)[:-idempotency_limit()]:
                del data.idempotency[key]
        data.session = encoded_session
        self._store[self.uid] = data

    def read_history(self, limit: int | None) -> list[dict[str, Any]]:
        data = self._data()
        events = data.history if data else []
        return [records.decode(e, self.uid, "memory") for e in (events[-limit:] if limit
                                                                   else events)]

    @classmethod
    def session_uids(cls, namespace: str = "default", **_options: Any) -> list[str]:
        return sorted(cls._stores.get(namespace, {}))

    def delete(self) -> None:
        self._store.pop(self.uid, None)
