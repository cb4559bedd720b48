"""Session state in a Django cache (Redis in production).

Layout, every key sharing the hash tag ``{uid}`` so that a session's keys live
on one Redis Cluster shard::

    triggers:{<uid>}:state      configuration, latest kwargs, counters, open instances
    triggers:{<uid>}:done       hash: resolved instance name -> instance (Redis caches)
    triggers:{<uid>}:i:<name>   one resolved instance (other caches)
    lock:triggers:{<uid>}:lock  the session lock (python-redis-lock)

Values are compact JSON. On a Redis cache (django-redis, or Django's built-in
``RedisCache``) the backend talks to Redis directly with the cache's
connection, so values are stored as JSON text rather than through the cache's
pickling serializer, and a write is one pipelined ``MULTI/EXEC`` that also
renews the expiry of the resolved-instances hash, so a session expires as a
whole ``timeout`` seconds after its last change. On any other cache it goes
through the cache API (``get``/``set_many``; each resolved instance is a key of
its own, with its own expiry) and locks with the atomic ``cache.add``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any

from triggers.exceptions import CorruptSessionState, InvalidArgument, StorageError
from triggers.locking import (
    DEFAULT_LOCK_EXPIRE,
    DEFAULT_LOCK_TIMEOUT,
    CacheSessionLock,
    RedisSessionLock,
)
from triggers.storages.base import (
    BaseTriggerStorage,
    SessionState,
    StateChanges,
    dumps,
    instance_from_json,
)
from triggers.types import TaskConfig, TaskInstance

__all__ = ["CacheStorageBackend"]

_NOT_GIVEN: Any = object()


class CacheStorageBackend(BaseTriggerStorage):
    """Keeps a session's state in a Django cache alias.

    :param uid: the session UID.
    :param cache: the alias in ``settings.CACHES``.
    :param timeout: seconds each written key lives; ``None`` keeps keys forever on
        Redis (a key's time restarts whenever it is written).
    """

    name = "cache"

    def __init__(self, uid: str, cache: str = "default", timeout: int | None = _NOT_GIVEN,
                 lock_expire: int = DEFAULT_LOCK_EXPIRE,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        super().__init__(uid, lock_expire=lock_expire, lock_timeout=lock_timeout)
        if timeout is _NOT_GIVEN:
            timeout = 3600
        if timeout is not None and (not isinstance(timeout, int) or timeout <= 0):
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
        self._redis = _redis_client(self.cache)
        self._prefix = f"triggers:{{{uid}}}:"

    def get_options(self) -> dict[str, Any]:
        return {"cache": self.cache_alias, "timeout": self.timeout,
                "lock_expire": self.lock_expire, "lock_timeout": self.lock_timeout}

    @property
    def uses_redis(self) -> bool:
        """Whether this backend talks to Redis directly (JSON values, python-redis-lock)."""
        return self._redis is not None

    # -- keys ---------------------------------------------------------------

    def _key(self, suffix: str) -> str:
        key = self._prefix + suffix
        if self._redis is not None:
            return str(self.cache.make_key(key))
        return key

    def _state_key(self) -> str:
        return self._key("state")

    def _instance_key(self, name: str) -> str:
        return self._key("i:" + name)

    def _done_key(self) -> str:
        return self._key("done")

    # -- primitives ---------------------------------------------------------

    def _session_lock(self) -> AbstractContextManager[Any]:
        name = self._key("lock")
        if self._redis is not None:
            return RedisSessionLock(self._redis, name, self.uid, self.lock_expire,
                                    self.lock_timeout).hold()
        return CacheSessionLock(self.cache, name, self.uid, self.lock_expire,
                                self.lock_timeout).hold()

    def _get_raw(self, keys: list[str]) -> list[Any]:
        try:
            if self._redis is not None:
                return list(self._redis.mget(keys))
            found = self.cache.get_many(keys)
            return [found.get(key) for key in keys]
        except Exception as exc:  # noqa: BLE001 - any client error becomes a StorageError
            raise StorageError(
                f"Could not read session {self.uid!r} from cache {self.cache_alias!r}: {exc}",
                session_uid=self.uid,
            ) from exc

    def _decode(self, raw: Any, where: str) -> Any:
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CorruptSessionState(
                    f"Stored state of session {self.uid!r} ({where}) is not UTF-8 JSON text; "
                    "it may have been written by another program. Nothing was executed.",
                    session_uid=self.uid,
                ) from exc
        if not isinstance(raw, str):
            raise CorruptSessionState(
                f"Stored state of session {self.uid!r} ({where}) is a {type(raw).__name__}, "
                "not JSON text. Nothing was executed.",
                session_uid=self.uid,
            )
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise CorruptSessionState(
                f"Stored state of session {self.uid!r} ({where}) is not valid JSON ({exc}). "
                "Nothing was executed.",
                session_uid=self.uid,
            ) from exc

    def _read_state(self) -> SessionState:
        key = self._state_key()
        (raw,) = self._get_raw([key])
        if raw is None:
            return SessionState()
        return SessionState.from_json(self._decode(raw, key), self.uid, key)

    def _read_instances(self, names: Iterable[str],
                        tasks: Mapping[str, TaskConfig]) -> dict[str, TaskInstance]:
        names = list(names)
        if not names:
            return {}
        if self._redis is not None:
            where = self._done_key()
            try:
                raws = self._redis.hmget(where, names)
            except Exception as exc:  # noqa: BLE001 - any client error becomes a StorageError
                raise StorageError(
                    f"Could not read session {self.uid!r} from cache {self.cache_alias!r}: {exc}",
                    session_uid=self.uid,
                ) from exc
            wheres = [f"{where}[{name}]" for name in names]
        else:
            wheres = [self._instance_key(name) for name in names]
            raws = self._get_raw(wheres)
        found = {}
        for name, key, raw in zip(names, wheres, raws, strict=True):
            if raw is not None:
                found[name] = instance_from_json(name, self._decode(raw, key), tasks, self.uid, key)
        return found

    def _write_state(self, changes: StateChanges) -> None:
        state_value = dumps(changes.state.to_json())
        resolved = {name: dumps(instance.to_dict()) for name, instance in changes.resolved.items()}
        try:
            if self._redis is not None:
                done = self._done_key()
                pipe = self._redis.pipeline(transaction=True)
                pipe.set(self._state_key(), state_value, ex=self.timeout)
                if resolved:
                    pipe.hset(done, mapping=resolved)
                if changes.unresolved:
                    pipe.hdel(done, *changes.unresolved)
                if self.timeout is not None:
                    pipe.expire(done, self.timeout)
                pipe.execute()
            else:
                values = {self._state_key(): state_value}
                values.update({self._instance_key(n): v for n, v in resolved.items()})
                self.cache.set_many(values, timeout=self.timeout)
                if changes.unresolved:
                    self.cache.delete_many([self._instance_key(n) for n in changes.unresolved])
        except Exception as exc:  # noqa: BLE001 - any client error becomes a StorageError
            raise StorageError(
                f"Could not write session {self.uid!r} to cache {self.cache_alias!r}: {exc}. "
                "The step was not applied.",
                session_uid=self.uid,
            ) from exc

    @classmethod
    def session_uids(cls, cache: str = "default") -> list[str]:
        """UIDs of every session stored in a Redis cache alias (SCAN; not the hot path)."""
        from django.core.cache import caches

        backend = caches[cache]
        client = _redis_client(backend)
        if client is None:
            raise InvalidArgument(
                f"Cache {cache!r} is not a Redis cache: its sessions cannot be listed; "
                "name the session UIDs explicitly."
            )
        pattern = str(backend.make_key("triggers:{*}:state"))
        uids = set()
        for key in client.scan_iter(match=pattern, count=1000):
            text = key.decode() if isinstance(key, bytes) else key
            start = text.index("triggers:{") + len("triggers:{")
            uids.add(text[start:text.rindex("}:state")])
        return sorted(uids)

    def delete(self) -> None:
        """Remove everything this session stored."""
        if self._redis is not None:
            self._redis.delete(self._state_key(), self._done_key())
            return
        state = self._read_state()
        keys = [self._state_key()]
        keys += [self._instance_key(f"{task}#{n}")
                 for task, count in state.counters.items() for n in range(count)]
        self.cache.delete_many(keys)


def _cache_aliases() -> list[str]:
    from django.conf import settings

    return list(getattr(settings, "CACHES", {}) or {})


def _redis_client(cache: Any) -> Any:
    """The raw redis-py client behind a Redis cache, or ``None`` for other caches."""
    try:
        from django_redis.cache import RedisCache as DjangoRedisCache
    except ImportError:  # pragma: no cover - django-redis is a dependency
        DjangoRedisCache = ()  # noqa: N806
    from django.core.cache.backends.redis import RedisCache as BuiltinRedisCache

    if DjangoRedisCache and isinstance(cache, DjangoRedisCache):
        return cache.client.get_client(write=True)
    if isinstance(cache, BuiltinRedisCache):
        return cache._cache.get_client(write=True)
    return None
