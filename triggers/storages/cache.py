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

import random
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, ExitStack
from typing import Any, TypeVar, cast

from triggers import _json as stored_json
from triggers.exceptions import (
    CorruptSessionState,
    InvalidArgument,
    LockNotReentrant,
    LockTimeout,
    StorageError,
)
from triggers.locking import (
    DEFAULT_LOCK_EXPIRE,
    DEFAULT_LOCK_TIMEOUT,
    BaseLock,
    CacheSessionLock,
    RedisSessionLock,
    held_locks,
    redis_client_for_cache,
)
from triggers.storages.base import (
    BaseTriggerStorage,
    SessionState,
    SessionStep,
    StateChanges,
    dumps,
    instance_from_json,
)
from triggers.types import TaskConfig, TaskInstance

__all__ = ["CacheStorageBackend"]

_NOT_GIVEN: Any = object()
T = TypeVar("T")

# Outcomes of one optimistic attempt.
_DONE, _CONFLICT, _LOCKED = object(), object(), object()
#: Conflicts after which a step takes the session lock, so that it cannot starve.
_CONFLICTS_BEFORE_LOCKING = 8


def _reply(connection: Any) -> Any:
    """Read one reply; an error reply is returned (as the exception), not raised."""
    from redis.exceptions import ResponseError

    try:
        return connection.read_response()
    except ResponseError as exc:
        return exc


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


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
        self._redis = redis_client_for_cache(self.cache)
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

    def _hook_lock(self) -> BaseLock:
        name = self._key("hooks")
        if self._redis is not None:
            return RedisSessionLock(self._redis, name, self.uid, self.lock_expire,
                                    self.lock_timeout)
        return CacheSessionLock(self.cache, name, self.uid, self.lock_expire, self.lock_timeout)

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
            return stored_json.loads(raw)
        except ValueError as exc:
            raise CorruptSessionState(
                f"Stored state of session {self.uid!r} ({where}) is not valid JSON ({exc}). "
                "Nothing was executed.",
                session_uid=self.uid,
            ) from exc

    def _read_state(self) -> SessionState:
        key = self._state_key()
        if self._redis is not None:
            from redis.exceptions import ResponseError

            try:
                raw = self._redis.get(key)
            except ResponseError as exc:
                raise CorruptSessionState(
                    f"Stored state of session {self.uid!r} is corrupt: {key} holds a value of "
                    f"another type ({exc}). Nothing was executed.", session_uid=self.uid,
                ) from exc
            except Exception as exc:  # noqa: BLE001 - any client error becomes a StorageError
                raise self._redis_failed(exc) from exc
        else:
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

    def _write_commands(self, changes: StateChanges) -> list[tuple[Any, ...]]:
        """The Redis commands that persist one step's changes (run inside MULTI/EXEC)."""
        state_value = dumps(changes.state.to_json())
        done = self._done_key()
        expire = self._expire_for(changes)
        commands: list[tuple[Any, ...]] = [
            ("SET", self._state_key(), state_value)
            + (("EX", expire) if expire is not None else ()),
        ]
        if changes.resolved:
            fields: list[Any] = []
            for name, instance in changes.resolved.items():
                fields += [name, dumps(instance.to_dict())]
            commands.append(("HSET", done, *fields))
        if changes.unresolved:
            commands.append(("HDEL", done, *changes.unresolved))
        if expire is not None:
            commands.append(("EXPIRE", done, expire))
        return commands

    def _expire_for(self, changes: StateChanges) -> int | None:
        """The keys' time to live: ``timeout``, stretched to outlive any pending delay."""
        if self.timeout is None:
            return None
        waits = [instance.start_after for instance in changes.state.open.values()
                 if instance.start_after is not None]
        if not waits:
            return self.timeout
        return max(self.timeout, int(max(waits) - time.time()) + 60)

    def _write_state(self, changes: StateChanges) -> None:
        try:
            if self._redis is not None:
                pipe = self._redis.pipeline(transaction=True)
                for command in self._write_commands(changes):
                    pipe.execute_command(*command)
                pipe.execute()
            else:
                values = {self._state_key(): dumps(changes.state.to_json())}
                values.update({self._instance_key(name): dumps(instance.to_dict())
                               for name, instance in changes.resolved.items()})
                expire = self._expire_for(changes)
                # Instances first: a state that names them must not outlive them.
                state_key = self._state_key()
                state_value = values.pop(state_key)
                failed = list(self.cache.set_many(values, timeout=expire) or []) if values else []
                if not failed:
                    failed = list(self.cache.set_many({state_key: state_value}, timeout=expire)
                                  or [])
                if failed:
                    raise StorageError(f"the cache did not store {', '.join(failed)}")
                if changes.unresolved:
                    self.cache.delete_many([self._instance_key(n) for n in changes.unresolved])
        except Exception as exc:  # noqa: BLE001 - any client error becomes a StorageError
            raise StorageError(
                f"Could not write session {self.uid!r} to cache {self.cache_alias!r}: {exc}. "
                "The step was not applied.",
                session_uid=self.uid,
            ) from exc

    # -- optimistic atomic steps (Redis) -------------------------------------

    def _transact(self, step_function: Callable[[SessionStep], T]) -> T:
        """One atomic step; on Redis an optimistic transaction of two round trips.

        Round trip 1 sends ``WATCH state done lock`` and ``MGET state lock``;
        round trip 2 sends ``MULTI``, the writes and ``EXEC``. If another process
        changed the session in between, ``EXEC`` does nothing and the step runs
        again on the new state. While anyone holds the session lock
        (:meth:`acquire_lock`) steps wait for it; a step that keeps losing the
        race takes the lock itself, so no step starves. Waiting ends with
        LockTimeout after ``lock_timeout`` seconds.
        """
        if self._redis is None:
            return super()._transact(step_function)
        lock_name = self._key("lock")
        if lock_name in held_locks():
            raise LockNotReentrant(
                f"This thread holds the lock of session {self.uid!r}; a step on that session "
                "would wait for it forever.", session_uid=self.uid,
            )
        deadline = time.monotonic() + self.lock_timeout
        conflicts = 0
        delay = 0.001
        with ExitStack() as stack:
            own_lock_id: str | None = None
            while True:
                outcome, result = self._try_step(step_function, own_lock_id)
                if outcome is _DONE:
                    return cast(T, result)
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        f"Could not apply a step to session {self.uid!r} within "
                        f"{self.lock_timeout} s: its lock stayed taken or the step kept "
                        "conflicting with other processes.", session_uid=self.uid,
                    )
                if outcome is _CONFLICT:
                    conflicts += 1
                    if conflicts >= _CONFLICTS_BEFORE_LOCKING and own_lock_id is None:
                        lock = RedisSessionLock(self._redis, lock_name, self.uid, self.lock_expire,
                                                max(deadline - time.monotonic(), 0.001))
                        stack.enter_context(lock.hold())
                        own_lock_id = lock.owner_id
                    continue
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.05)

    def _try_step(self, step_function: Callable[[SessionStep], T], own_lock_id: str | None
                  ) -> tuple[object, T | None]:
        assert self._redis is not None
        pool = self._redis.connection_pool
        state_key, done_key = self._state_key(), self._done_key()
        lock_key = "lock:" + self._key("lock")
        try:
            connection = pool.get_connection()
        except Exception as exc:  # noqa: BLE001 - any client error becomes a StorageError
            raise self._redis_failed(exc) from exc
        try:
            try:
                connection.send_packed_command(connection.pack_commands([
                    ("WATCH", state_key, done_key, lock_key), ("GET", state_key),
                    ("TYPE", done_key), ("GET", lock_key),
                ]))
                replies = [_reply(connection) for _ in range(4)]
            except Exception as exc:  # noqa: BLE001
                connection.disconnect()
                raise self._redis_failed(exc) from exc
            _, raw, done_type, owner = replies
            if isinstance(raw, Exception) or _text(done_type) not in ("hash", "none"):
                self._unwatch(connection)
                found = raw if isinstance(raw, Exception) else _text(done_type)
                raise CorruptSessionState(
                    f"Stored state of session {self.uid!r} is corrupt: {state_key} or "
                    f"{done_key} holds a value of another type ({found}). Nothing was executed.",
                    session_uid=self.uid)
            if owner is not None and _text(owner) != own_lock_id:
                self._unwatch(connection)
                return _LOCKED, None
            try:
                state = SessionState() if raw is None else SessionState.from_json(
                    self._decode(raw, state_key), self.uid, state_key)
                step = SessionStep(self, state)
                result = step_function(step)
                if not step.changed:
                    self._unwatch(connection)
                    return _DONE, result
                commands = [("MULTI",), *self._write_commands(step.changes()), ("EXEC",)]
            except BaseException:
                self._unwatch(connection)
                raise
            try:
                # No health check here: a silent reconnect would drop the WATCH.
                connection.send_packed_command(connection.pack_commands(commands),
                                               check_health=False)
                for _ in commands[:-1]:
                    connection.read_response()
                executed = connection.read_response()
            except Exception as exc:  # noqa: BLE001
                connection.disconnect()
                raise self._redis_failed(
                    exc, " The step may or may not have been applied.") from exc
            if executed is None:
                return _CONFLICT, None
            errors = [reply for reply in executed if isinstance(reply, Exception)]
            if errors:
                raise StorageError(
                    f"Redis refused part of a step of session {self.uid!r}: {errors[0]}. "
                    "Inspect the session; it may be partly updated.", session_uid=self.uid)
            return _DONE, result
        finally:
            pool.release(connection)

    def _unwatch(self, connection: Any) -> None:
        try:
            connection.send_command("UNWATCH")
            connection.read_response()
        except Exception:  # noqa: BLE001 - a broken connection must not be reused
            connection.disconnect()

    def _redis_failed(self, exc: BaseException, more: str = "") -> StorageError:
        return StorageError(
            f"Redis failed for session {self.uid!r} (cache {self.cache_alias!r}): "
            f"{type(exc).__name__}: {exc}.{more}",
            session_uid=self.uid,
        )

    @classmethod
    def session_uids(cls, cache: str = "default") -> list[str]:
        """UIDs of every session stored in a Redis cache alias (SCAN; not the hot path)."""
        from django.core.cache import caches

        backend = caches[cache]
        client = redis_client_for_cache(backend)
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
