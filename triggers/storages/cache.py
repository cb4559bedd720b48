"""Session state in a Django cache (Redis in production).

On a Redis cache (django-redis, or Django's built-in ``RedisCache``) the
storage talks to Redis directly with the cache's connection and shares its
layout and its optimistic two-round-trip steps with the ``redis`` storage
(:mod:`triggers.storages.redis`), under the cache's key prefix: values are
JSON text, not the cache's pickles.

On any other cache it keeps the same records as cache keys (the per-session
record, the configuration, the waiting instances of each task, the active
instances, one key per done instance, the history) and a step holds the
session lock (the atomic ``cache.add``) from its first read to its write.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from triggers.exceptions import InvalidArgument, StorageError
from triggers.locking import (
    DEFAULT_LOCK_EXPIRE,
    DEFAULT_LOCK_TIMEOUT,
    BaseLock,
    CacheSessionLock,
    redis_client_for_cache,
)
from triggers.storages import _records as records
from triggers.storages.base import (
    RecordStorage,
    SessionRecord,
    SessionStep,
    Want,
    history_limit,
    idempotency_limit,
)
from triggers.storages.redis import DueIndex, RedisEngine, locked_step, scan_uids

__all__ = ["CacheStorageBackend"]

_NOT_GIVEN: Any = object()
#: On caches other than Redis: the number of session slots (see session_uids).
_SLOTS_KEY = "triggers:sessions"


class CacheStorageBackend(RecordStorage):
    """Keeps a session's state in a Django cache alias.

    :param uid: the session UID.
    :param cache: the alias in ``settings.CACHES``.
    :param timeout: seconds a session's keys live after it became idle (nothing
        unstarted, scheduled, running or failed); ``None``: forever.
    """

    name = "cache"

    def __init__(self, uid: str, cache: str = "default", timeout: int | None = _NOT_GIVEN,
                 lock_expire: int = DEFAULT_LOCK_EXPIRE,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        super().__init__(uid, lock_expire=lock_expire, lock_timeout=lock_timeout)
        if timeout is _NOT_GIVEN:
            timeout = 3600
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int)
                                    or timeout <= 0):
            raise InvalidArgument(
                f"CacheStorageBackend timeout must be a positive number of seconds or None, "
                f"got {timeout!r}"
            )
        from django.core.cache import caches
        from django.core.cache.backends.base import InvalidCacheBackendError

        try:
            self.cache = caches[cache]
        except InvalidCacheBackendError as exc:
            raise InvalidArgument(
                f"Unknown cache alias {cache!r} for session {uid!r}; configured aliases: "
                f"{', '.join(sorted(_cache_aliases()))}",
                session_uid=uid,
            ) from exc
        self.cache_alias = cache
        self.timeout = timeout
        self._prefix = f"triggers:{{{uid}}}:"
        client = redis_client_for_cache(self.cache)
        self.engine: RedisEngine | None = None
        if client is not None:
            self.engine = RedisEngine(self, client, str(self.cache.make_key(self._prefix)),
                                      timeout, f"cache {cache!r}",
                                      str(self.cache.make_key("triggers:")))
        #: On Redis, steps are optimistic (see triggers.storages.redis).
        self.optimistic = self.engine is not None
        self.commits_sweeps = self.engine is not None

    def get_options(self) -> dict[str, Any]:
        return {"cache": self.cache_alias, "timeout": self.timeout,
                "lock_expire": self.lock_expire, "lock_timeout": self.lock_timeout}

    @property
    def uses_redis(self) -> bool:
        """Whether this backend talks to Redis directly (JSON values, python-redis-lock)."""
        return self.engine is not None

    def _where(self) -> str:
        return f"cache {self.cache_alias!r}"

    # -- locks ------------------------------------------------------------------

    def _session_lock(self) -> Any:
        if self.engine is not None:
            return self.engine.lock(self.lock_expire, self.lock_timeout).hold()
        return CacheSessionLock(self.cache, self._prefix + "lock", self.uid, self.lock_expire,
                                self.lock_timeout).hold()


    def exclusive(self) -> Any:
        return self.session_lock()

    def exclusive_step(self) -> Any:
        if self.engine is not None:
            return locked_step(self, self.engine)
        return super().exclusive_step()

    def step_lock(self, timeout: float) -> Any:
        assert self.engine is not None
        return self.engine.step_lock(self.lock_expire, timeout)

    def _hook_lock(self) -> BaseLock:
        if self.engine is not None:
            return self.engine.hook_lock(self.lock_expire, self.lock_timeout)
        return CacheSessionLock(self.cache, self._prefix + "hooks", self.uid, self.lock_expire,
                                self.lock_timeout)

    # -- the contract: Redis ------------------------------------------------------

    def load(self, step: SessionStep, want: Want) -> None:
        if self.engine is not None:
            self.engine.load(step, want)
        else:
            super().load(step, want)

    def commit(self, step: SessionStep) -> bool:
        if self.engine is not None:
            return self.engine.commit(step)
        return super().commit(step)

    def read_history(self, limit: int | None) -> list[dict[str, Any]]:
        if self.engine is not None:
            return self.engine.read_history(limit)
        events: list[dict[str, Any]] = self._get(["h"]).get("h") or []
        return events[-limit:] if limit else events

    def step_applied(self, token: str) -> bool | None:
        return self.engine.step_applied(token) if self.engine is not None else None

    def delete(self) -> None:
        """Remove everything this session stored."""
        if self.engine is not None:
            self.engine.delete()
            return
        session = self._read_session()
        keys = ["s", "c", "a", "h", "yl"]
        if session is not None:
            keys = self._session_keys(session, self._config_of(session))
        else:
            keys += ["y:" + key for key in self._get(["yl"]).get("yl") or []]
        self.cache.delete_many([self._prefix + key for key in keys])

    @classmethod
    def due_sessions(cls, until: float, limit: int, cache: str = "default",
                     **options: Any) -> Iterable[str]:
        """On Redis, the sessions with work due by ``until`` from the due index; on other
        caches, every session (they keep no index)."""
        from django.core.cache import caches

        backend = caches[cache]
        client = redis_client_for_cache(backend)
        if client is None:
            return cls.session_uids(cache=cache, **options)
        return DueIndex(client, str(backend.make_key("triggers:"))).claim(until, limit)

    def swept(self, dues: dict[str, float], until: float) -> None:
        if self.engine is not None:
            self.engine.index.swept(self.uid, dues, until)

    @classmethod
    def session_uids(cls, cache: str = "default", **_options: Any) -> Iterator[str]:
        """UIDs of every session stored in a Redis cache alias (SCAN; not the hot path)."""
        from django.core.cache import caches

        backend = caches[cache]
        client = redis_client_for_cache(backend)
        if client is not None:
            yield from scan_uids(client, str(backend.make_key("triggers:")))
            return
        # Other caches cannot list keys: sessions register in numbered slots (cache.incr
        # is atomic); a slot whose session is gone is skipped.
        count = backend.get(_SLOTS_KEY) or 0
        slots = backend.get_many([f"{_SLOTS_KEY}:{n}" for n in range(1, int(count) + 1)])
        uids = sorted(set(slots.values()))
        present = backend.get_many([f"triggers:{{{uid}}}:s" for uid in uids])
        yield from (uid for uid in uids if f"triggers:{{{uid}}}:s" in present)

    # -- the contract: any other cache (records as cache keys, under the lock) ----

    def _get(self, keys: list[str]) -> dict[str, Any]:
        try:
            found = self.cache.get_many([self._prefix + key for key in keys])
        except Exception as exc:  # noqa: BLE001 - any client error becomes a StorageError
            raise StorageError(f"Could not read session {self.uid!r} from cache "
                               f"{self.cache_alias!r}: {exc}", session_uid=self.uid) from exc
        values = {}
        for key in keys:
            raw = found.get(self._prefix + key)
            if raw is not None:
                values[key] = records.decode(raw, self.uid, self._prefix + key)
        return values

    def _read_session(self) -> SessionRecord | None:
        found = self._get(["s", "state"])
        data = found.get("s")
        if data is None:
            if "state" in found:
                raise records.corrupt(
                    self.uid, self._prefix + "state",
                    "it was stored by release 1 of triggers, whose sessions are upgraded on "
                    "Redis only; finish it with release 1, or delete it")
            return None
        if not isinstance(data, dict):
            raise records.corrupt(self.uid, self._prefix + "s", "not an object")
        try:
            return SessionRecord(data)
        except ValueError as exc:
            raise records.corrupt(self.uid, self._prefix + "s", str(exc)) from exc

    def _read_config(self) -> Any:
        return self._get(["c"]).get("c")

    def _config_of(self, session: SessionRecord) -> records.ParsedConfig:
        if not session.version:
            return records.EMPTY_CONFIG
        return records.cached_config(session.version) or records.parse_config(
            self._read_config(), self.uid, self._where(), session.version)

    @staticmethod
    def _task_key(place: str, task: str) -> str:
        return f"{place}:{task}"

    def _read_waiting(self, tasks: Iterable[str], place: str = records.PLACE_WAITING
                      ) -> dict[str, list[tuple[str, Any]]]:
        tasks = list(tasks)
        found = self._get([self._task_key(place, task) for task in tasks])
        return {task: list((found.get(self._task_key(place, task)) or {}).items())
                for task in tasks}

    def _read_instances(self, names: Iterable[str]) -> dict[str, tuple[Any, str]]:
        names = list(names)
        keys = {"a"} | {self._task_key(place, name.rsplit("#", 1)[0])
                        for name in names for place in records.TASK_PLACES}
        keys |= {"d:" + name for name in names}
        values = self._get(sorted(keys))
        found: dict[str, tuple[Any, str]] = {}
        for name in names:
            task = name.rsplit("#", 1)[0]
            for place in records.TASK_PLACES:
                per_task = values.get(self._task_key(place, task)) or {}
                if name in per_task:
                    found[name] = (per_task[name], place)
                    break
            else:
                if name in (values.get("a") or {}):
                    found[name] = (values["a"][name], records.PLACE_ACTIVE)
                elif "d:" + name in values:
                    found[name] = (values["d:" + name], records.PLACE_DONE)
        return found

    def _read_open(self, everything: bool) -> list[tuple[str, Any, str]]:
        session = self._read_session()
        if session is None:
            return []
        config = self._config_of(session)
        keys = ["a"] + [self._task_key(place, task) for task in config.tasks
                        for place in records.TASK_PLACES]
        if everything:
            keys += [f"d:{task}#{n}" for task, count in session.counters.items()
                     for n in range(count)]
        values = self._get(keys)
        rows = [(name, raw, place) for task in config.tasks for place in records.TASK_PLACES
                for name, raw in (values.get(self._task_key(place, task)) or {}).items()]
        rows += [(name, raw, records.PLACE_ACTIVE) for name, raw in (values.get("a") or {}).items()]
        rows += [(key[2:], raw, records.PLACE_DONE) for key, raw in values.items()
                 if key.startswith("d:")]
        return rows

    def _read_idempotency(self, keys: Iterable[str]) -> dict[str, list[str]]:
        found = self._get(["y:" + key for key in keys])
        return {key[2:]: value for key, value in found.items()}

    def _write(self, step: SessionStep, session: SessionRecord,
               events: list[dict[str, Any]]) -> None:
        config = step.new_config or step.config
        assert config is not None
        def container(place: str, task: str) -> str | None:
            if place in records.TASK_PLACES:
                return self._task_key(place, task)
            return "a" if place == records.PLACE_ACTIVE else None

        touched = {container(place, instance.task_name)
                   for instance, before, after in step.moves() for place in (before, after)
                   if place is not None}
        touched.discard(None)
        current = self._get(sorted(k for k in touched if k) + (["h"] if events else []))
        values: dict[str, Any] = {}
        deletes: list[str] = []
        for instance, before, after in step.moves():
            name, task = instance.name, instance.task_name
            for place in (before, after):
                key = container(place, task) if place is not None else None
                if key is not None:
                    current.setdefault(key, {}).pop(name, None)
                elif place == records.PLACE_DONE and place != after:
                    deletes.append("d:" + name)
            key = container(after, task)
            if key is not None:
                current.setdefault(key, {})[name] = instance.to_dict()
            else:
                values["d:" + name] = instance.to_dict()
        limit = history_limit()
        if events and limit:
            current["h"] = (list(current.get("h") or []) + events)[-limit:]
        values.update(current)
        if step.new_idempotency:
            order = [*(self._get(["yl"]).get("yl") or []), *step.new_idempotency]
            keep = idempotency_limit()
            deletes += ["y:" + key for key in order[:-keep]]
            values["yl"] = order[-keep:]
            values.update({"y:" + key: names for key, names in step.new_idempotency.items()})
        if step.new_config is not None:
            values["c"] = step.new_config.raw
        values["s"] = session.to_json()
        # Keys live forever while the session has open work, and expire together
        # ``timeout`` seconds after its last step once it is idle.
        idle = session.open <= 0
        was_idle = session.open - step.open_delta() <= 0
        expire = self.timeout if idle else None
        encoded = {self._prefix + key: records.dumps(value) for key, value in values.items()}
        try:
            failed = list(self.cache.set_many(encoded, timeout=expire) or [])
            if deletes:
                self.cache.delete_many([self._prefix + key for key in deletes])
            if (idle or was_idle) and self.timeout is not None:
                for key in self._session_keys(session, config, values.get("yl")):
                    if self._prefix + key not in encoded:
                        self.cache.touch(self._prefix + key, expire)
        except Exception as exc:  # noqa: BLE001 - any client error becomes a StorageError
            raise StorageError(
                f"Could not write session {self.uid!r} to cache {self.cache_alias!r}: {exc}. "
                "The step was not applied.", session_uid=self.uid) from exc
        if failed:
            raise StorageError(f"The cache {self.cache_alias!r} did not store "
                               f"{', '.join(failed)} of session {self.uid!r}.",
                               session_uid=self.uid)
        if step.observed.get("session") is None:
            self._register()

    def _session_keys(self, session: SessionRecord, config: records.ParsedConfig,
                      idempotency: list[str] | None = None) -> list[str]:
        """Every key of the session (without the prefix): they expire together."""
        keys = ["s", "c", "a", "h", "yl"]
        keys += [self._task_key(place, task) for task in config.tasks
                 for place in records.TASK_PLACES]
        keys += [f"d:{task}#{n}" for task, count in session.counters.items()
                 for n in range(count)]
        if idempotency is None:
            idempotency = self._get(["yl"]).get("yl") or []
        keys += ["y:" + key for key in idempotency]
        return keys

    def _register(self) -> None:
        """List a new session (see session_uids)."""
        self.cache.add(_SLOTS_KEY, 0, timeout=None)
        slot = self.cache.incr(_SLOTS_KEY)
        self.cache.set(f"{_SLOTS_KEY}:{slot}", self.uid, timeout=None)


def _cache_aliases() -> list[str]:
    from django.conf import settings

    return list(getattr(settings, "CACHES", {}) or {})
