"""Session locks.

Every lock expires (a holder that dies blocks a session for at most
``expire`` seconds), a holder renews it while it holds it, a waiter gives up
after ``timeout`` seconds with :class:`~triggers.exceptions.LockTimeout`, and
a thread that asks again for a session lock it already holds gets
:class:`~triggers.exceptions.LockNotReentrant` at once instead of waiting for
itself forever.

:class:`RedisSessionLock` wraps python-redis-lock; :class:`CacheSessionLock`
works on any Django cache through the atomic ``cache.add``;
:class:`LocalSessionLock` serves in-process storages.

redis-py, python-redis-lock and django-redis come with the ``redis`` extra
(``pip install 'triggers[redis]'``); they are imported where they are used, so
that nothing here needs them until a Redis lock is taken.
"""

from __future__ import annotations

import importlib
import logging
import random
import secrets
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from triggers.exceptions import (
    LockAcquisitionFailed,
    LockError,
    LockNotReentrant,
    LockNotSupported,
    LockTimeout,
)

__all__ = [
    "held_locks",
    "BaseLock",
    "DEFAULT_LOCK_EXPIRE",
    "DEFAULT_LOCK_TIMEOUT",
    "CacheSessionLock",
    "LocalSessionLock",
    "LockAcquisitionFailed",
    "Lockable",
    "NotSupported",
    "RedisSessionLock",
    "SessionLock",
    "acquire_lock",
    "redis_client_for_cache",
    "reentrant",
    "require_redis",
    "resolve_cache",
]

#: The original's name for :class:`~triggers.exceptions.LockNotSupported`.
NotSupported = LockNotSupported

#: Seconds after which a lock whose holder stopped renewing it expires.
DEFAULT_LOCK_EXPIRE = 30
#: Seconds a caller waits for a session lock before LockTimeout.
DEFAULT_LOCK_TIMEOUT = 60

logger = logging.getLogger(__name__)

_held = threading.local()


def held_locks() -> set[str]:
    """Names of the session locks the current thread holds."""
    return _held_set()


def _held_set() -> set[str]:
    held: set[str] | None = getattr(_held, "names", None)
    if held is None:
        held = _held.names = set()
    return held


class SessionLock(Protocol):
    def hold(self) -> Any: ...


class BaseLock:
    """An expiring lock held by one thread; subclasses implement ``_acquire`` / ``_release``."""

    def __init__(self, name: str, session_uid: str, expire: int, timeout: float) -> None:
        self.name = name
        self.session_uid = session_uid
        self.expire = max(int(expire), 1)
        self.timeout = timeout

    def _acquire(self) -> bool:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    @contextmanager
    def hold(self) -> Iterator[None]:
        held = _held_set()
        if self.name in held:
            raise LockNotReentrant(
                f"This thread already holds the lock of session {self.session_uid!r}; "
                "waiting for it again would deadlock. Do not fire triggers or change the "
                "session from code that runs while the session is locked.",
                session_uid=self.session_uid,
            )
        if not self._acquire():
            raise LockTimeout(
                f"Could not acquire the lock of session {self.session_uid!r} within "
                f"{self.timeout} s (lock {self.name!r}); another process holds it. A holder "
                f"that died releases it after at most {self.expire} s.",
                session_uid=self.session_uid,
            )
        held.add(self.name)
        try:
            yield
        finally:
            held.discard(self.name)
            try:
                self._release()
            except Exception:  # noqa: BLE001 - never mask the block's own outcome
                logger.warning(
                    "Could not release the lock of session %r (%s); it expires by itself "
                    "within %s s.", self.session_uid, self.name, self.expire, exc_info=True,
                )


#: What installs the Redis-specific packages.
REDIS_EXTRA = "pip install 'triggers[redis]'"

_REDIS_DISTRIBUTIONS = {"redis": "redis", "redis_lock": "python-redis-lock",
                        "django_redis": "django-redis"}


def require_redis(module: str = "redis") -> Any:
    """Import a Redis-specific module (``redis``, ``redis_lock``, ``django_redis`` or one of
    their submodules); if it is missing, an ImportError that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.partition(".")[0]
        distribution = _REDIS_DISTRIBUTIONS.get(top, top)
        raise ImportError(
            f"Redis support of triggers needs the {distribution!r} package, which is not "
            f"installed ({exc}). Install the redis extra: {REDIS_EXTRA}",
            name=module,
        ) from exc


_polling_lock_class: type[Any] | None = None


def _PollingRedisLock(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - stands for the class
    """A :func:`_polling_lock_type` lock (python-redis-lock is imported on first use)."""
    return _polling_lock_type()(*args, **kwargs)


def _polling_lock_type() -> type[Any]:
    global _polling_lock_class
    if _polling_lock_class is not None:
        return _polling_lock_class
    redis_lock = require_redis("redis_lock")

    class PollingRedisLock(redis_lock.Lock):  # type: ignore[misc,name-defined]
        """python-redis-lock's Lock, acquired by polling ``SET NX`` instead of ``BLPOP``.

        The library's waiters block in ``BLPOP`` on a signal list: each waiter holds
        a connection of the pool for as long as it waits (hundreds of waiting threads
        exhaust redis-py's default pool of 100 connections), a ``BLPOP`` longer than
        the client's socket timeout fails with a TimeoutError, and a holder that dies
        sends no signal at all. Polling with a short back-off holds no connection
        while waiting and notices an expired lock at once. Expiry, renewal and the
        atomic compare-and-delete release stay the library's.
        """

        @staticmethod
        def _lock_renewer(name: str, lockref: Any, interval: float, stop: Any) -> None:
            # The library's renewer ends at the first error, and renews every two thirds
            # of the expiry: one connection reset and the lock expires under its live
            # holder. This one renews every third, and goes on after an error.
            redis = require_redis("redis")
            while not stop.wait(timeout=interval / 2):
                lock = lockref()
                if lock is None:
                    return
                try:
                    lock.extend(expire=lock._expire)
                except (redis_lock.NotAcquired, redis_lock.NotExpirable):
                    logger.error("The Redis lock %r expired while held (taken by another "
                                 "holder meanwhile?)", name)
                    return
                except redis.RedisError as exc:
                    logger.warning("Could not renew the Redis lock %r (%s: %s); trying again",
                                   name, type(exc).__name__, exc)
                finally:
                    del lock

        def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
            deadline = None if timeout is None else time.monotonic() + timeout
            delay = 0.002
            while True:
                if self._client.set(self._name, self._id, nx=True, ex=self._expire):
                    if self._lock_renewal_interval is not None:
                        self._start_lock_renewer()
                    return True
                if not blocking or (deadline is not None and time.monotonic() >= deadline):
                    return False
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.05)

    _polling_lock_class = PollingRedisLock
    return PollingRedisLock


class RedisSessionLock(BaseLock):
    """python-redis-lock with expiry, automatic renewal and a bounded, polling wait."""

    def __init__(self, client: Any, name: str, session_uid: str,
                 expire: int = DEFAULT_LOCK_EXPIRE, timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        super().__init__(name, session_uid, expire, timeout)
        redis = require_redis("redis")
        self._lock = _PollingRedisLock(client, name, expire=self.expire, auto_renewal=True,
                                       strict=isinstance(client, redis.Redis))

    @property
    def owner_id(self) -> str:
        """The value stored at the lock's key while this object holds it."""
        return str(self._lock.id)

    def _acquire(self) -> bool:
        import redis

        try:
            acquired: bool = self._lock.acquire(blocking=True, timeout=self.timeout)
        except redis.RedisError as exc:
            raise LockError(
                f"Could not take the lock of session {self.session_uid!r}: Redis failed "
                f"({type(exc).__name__}: {exc}). Nothing was changed.",
                session_uid=self.session_uid,
            ) from exc
        return acquired

    def _release(self) -> None:
        import redis_lock

        try:
            self._lock.release()
        except redis_lock.NotAcquired:
            # It expired while we held it (renewal failed); nothing to release.
            pass


class CacheSessionLock(BaseLock):
    """A lock on any Django cache, built on the atomic ``cache.add``.

    Atomic across processes wherever ``cache.add`` is (Redis, Memcached, the
    database cache); on the local-memory cache it serialises threads of one
    process. Waiters poll with a short back-off.
    """

    def __init__(self, cache: Any, name: str, session_uid: str,
                 expire: int = DEFAULT_LOCK_EXPIRE, timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        super().__init__(name, session_uid, expire, timeout)
        self._cache = cache
        self._token = secrets.token_hex(8)
        #: Until when (monotonic) the key is surely ours: taken or renewed, plus expiry.
        self._ours_until = 0.0
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _acquire(self) -> bool:
        deadline = time.monotonic() + self.timeout
        delay = 0.001
        while True:
            taken_at = time.monotonic()
            if self._cache.add(self.name, self._token, timeout=self.expire):
                self._ours_until = taken_at + self.expire
                self._stop.clear()
                self._renewer = threading.Thread(target=self._renew, daemon=True,
                                                 name=f"triggers-lock-renewer:{self.name}")
                self._renewer.start()
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.05)

    def _still_ours(self) -> bool:
        # The cache has no compare-and-set: the key is ours for as long as it cannot have
        # expired since we wrote it (with a margin for the round trip).
        return time.monotonic() < self._ours_until - 0.1

    def _renew(self) -> None:
        while not self._stop.wait(self.expire / 3):
            renewed_at = time.monotonic()
            if not self._still_ours():
                logger.warning("The lock %r of session %r expired before it could be renewed.",
                               self.name, self.session_uid)
                return
            try:
                if self._cache.touch(self.name, self.expire):
                    self._ours_until = renewed_at + self.expire
            except Exception:  # noqa: BLE001 - it then expires by itself
                logger.warning("Could not renew the lock %r of session %r", self.name,
                               self.session_uid, exc_info=True)

    def _release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        # Delete only a key that is surely still ours: never another holder's.
        if self._still_ours() and self._cache.get(self.name) == self._token:
            self._cache.delete(self.name)


@contextmanager
def reentrant(lock: BaseLock) -> Iterator[None]:
    """Hold ``lock``, unless this thread holds it already (then just run the block)."""
    if lock.name in _held_set():
        yield
        return
    with lock.hold():
        yield


class _Lock:
    """A threading.Lock that a weak registry can refer to."""

    __slots__ = ("__weakref__", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def acquire(self, timeout: float = -1) -> bool:
        return self._lock.acquire(timeout=timeout)

    def release(self) -> None:
        self._lock.release()


class LocalSessionLock(BaseLock):
    """A lock within one process, for storages that live in this process only.

    Locks are shared by name while anyone uses them (a weak registry: it does not
    grow with the number of sessions ever locked).
    """

    _locks: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
    _guard = threading.Lock()

    def __init__(self, name: str, session_uid: str,
                 expire: int = DEFAULT_LOCK_EXPIRE, timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        super().__init__(name, session_uid, expire, timeout)
        with self._guard:
            lock = self._locks.get(name)
            if lock is None:
                lock = self._locks[name] = _Lock()
            self._lock = lock

    def _acquire(self) -> bool:
        return self._lock.acquire(timeout=self.timeout)

    def _release(self) -> None:
        self._lock.release()


def redis_client_for_cache(cache: Any) -> Any:
    """The raw redis-py client behind a Django Redis cache, or ``None`` for other caches.

    django-redis and Django's own ``RedisCache`` are recognised.
    """
    try:
        from django_redis.cache import RedisCache as DjangoRedisCache
    except ImportError:  # pragma: no cover - part of the redis extra
        DjangoRedisCache = None  # noqa: N806
    from django.core.cache.backends.redis import RedisCache as BuiltinRedisCache

    if DjangoRedisCache is not None and isinstance(cache, DjangoRedisCache):
        return cache.client.get_client(write=True)
    if isinstance(cache, BuiltinRedisCache):
        try:
            client = cache._cache  # Django imports redis-py here
        except ImportError as exc:
            if (exc.name or "").partition(".")[0] == "redis":
                require_redis("redis")  # raises an ImportError that says how to install it
            raise
        return client.get_client(write=True)
    return None


# -- the original's general-purpose locks -------------------------------------------


def resolve_cache(backend: Any) -> Any:
    """The Django cache called ``backend`` (or ``backend`` itself if it is a cache)."""
    from django.core.cache import caches
    from django.core.cache.backends.base import BaseCache

    return backend if isinstance(backend, BaseCache) else caches[backend]


@contextmanager
def acquire_lock(key: str, ttl: int | bool | None = True, cache: Any = "default",
                 block: bool = True) -> Iterator[None]:
    """Hold a distributed lock named ``key`` on a Redis cache (the original's helper).

    ``ttl``: seconds until the lock expires (``True``: the cache's default timeout;
    ``None``: never; ``False``: take no lock at all). ``block=False`` raises
    :class:`LockAcquisitionFailed` at once if another holder has it. Raises
    :class:`~triggers.exceptions.LockNotSupported` (``NotSupported``) for a cache that
    is not Redis.
    """
    backend = resolve_cache(cache)
    client = redis_client_for_cache(backend)
    if client is None:
        raise NotSupported(f"{type(backend).__name__} is not compatible with distributed locks; "
                           "use a Redis cache (django-redis or Django's RedisCache).")
    if ttl is False:
        yield
        return
    expire = backend.default_timeout if ttl is True else ttl
    import redis_lock

    lock = _PollingRedisLock(client, key, expire=expire, auto_renewal=expire is not None)
    if not lock.acquire(blocking=block):
        raise LockAcquisitionFailed(f"Failed to acquire lock on {key!r} (ttl={expire!r}, "
                                    f"block={block!r}).")
    try:
        yield
    finally:
        try:
            lock.release()
        except redis_lock.NotAcquired:
            pass


class Lockable:
    """Base for objects that take a distributed lock of their own (the original's mixin).

    :meth:`acquire_lock` is re-entrant within the thread that holds it.
    Subclasses implement ``get_lock_name()``.
    """

    @contextmanager
    def acquire_lock(self, ttl: int | bool | None = True, block: bool = True) -> Iterator[None]:
        if self.has_lock:
            yield
            return
        with acquire_lock(self.get_lock_name(), ttl, self.get_lock_backend(), block):
            self._has_lock: threading.Thread | None = threading.current_thread()
            try:
                yield
            finally:
                self._has_lock = None

    def get_lock_name(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} must implement get_lock_name()")

    def get_lock_backend(self) -> Any:
        """The cache (or its alias) that holds the lock."""
        return "default"

    @property
    def has_lock(self) -> bool:
        """Whether the current thread holds this object's lock."""
        return getattr(self, "_has_lock", None) is threading.current_thread()
