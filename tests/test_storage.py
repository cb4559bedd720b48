"""The cache storage on real Redis: layout, JSON, expiry, locks, concurrent fires."""

import json
import pickle
import threading
import time

import pytest
from django.core.cache import caches

from tests.helpers import STORAGE_KINDS, make_storage
from triggers import CacheStorageBackend, TriggerManager
from triggers.exceptions import LockNotReentrant, LockTimeout
from triggers.runners import ThreadingTaskRunner

CONFIG = {
    "t_pages": {"after": ["start"], "andEvery": "page", "run": "tests.Echo"},
    "t_once": {"after": ["start", "page"], "run": "tests.Echo"},
}


def close_thread_connections():
    from django.db import connections

    connections.close_all()


def raw_redis(storage):
    return storage.engine.client


def key(storage, suffix):
    return storage.engine.key(suffix)


@pytest.mark.parametrize("alias", ["default", "builtin_redis"])
def test_state_is_json_under_one_hash_tag(alias, uid):
    """On Redis every key of a session shares the hash tag {uid} and holds JSON text."""
    storage = CacheStorageBackend(uid, cache=alias)
    assert storage.uses_redis
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["a"], "run": "tests.Echo"}})
    manager.update_instance_status(storage.create_instance("t"), "finished")
    client = raw_redis(storage)
    keys = sorted(k.decode() for k in client.keys(f"*{{{uid}}}*")
                  if not k.startswith(b"lock"))
    assert keys == sorted(key(storage, suffix) for suffix in ("s", "c", "d", "h", "t"))
    session = client.hgetall(key(storage, "s"))
    values = [client.get(key(storage, "c")), client.hget(key(storage, "d"), "t#0"),
              *(value for field, value in session.items()
                if field.startswith((b"k:", b"m:", b"i:", b"tasks"))),
              *client.lrange(key(storage, "h"), 0, -1)]
    for raw in values:
        assert not raw.startswith(b"\x80")  # not a pickle
        json.loads(raw)
    config = json.loads(client.get(key(storage, "c")))
    assert config["tasks"]["t"] == {"after": ["a"], "run": "tests.Echo"}
    assert client.hget(key(storage, "s"), "v").decode() == config["v"]
    assert json.loads(client.hget(key(storage, "d"), "t#0"))["status"] == "finished"


def test_locmem_is_not_redis(uid):
    """On a non-Redis cache the backend uses the cache API and the cache.add lock."""
    storage = CacheStorageBackend(uid, cache="locmem")
    assert not storage.uses_redis
    TriggerManager(storage).update_configuration(CONFIG)
    assert json.loads(caches["locmem"].get(f"triggers:{{{uid}}}:c"))["t_once"]


@pytest.mark.parametrize("alias", ["default", "builtin_redis"])
def test_timeout(alias, uid):
    """Keys live `timeout` seconds once the session is idle, forever while it has open work;
    timeout=None keeps them forever."""
    limited = CacheStorageBackend(uid, cache=alias, timeout=120)
    manager = TriggerManager(limited)
    manager.update_configuration(CONFIG)
    client = raw_redis(limited)
    assert 0 < client.ttl(key(limited, "s")) <= 120
    assert 0 < client.ttl(key(limited, "c")) <= 120
    instance = limited.create_instance("t_once")  # open: nothing expires
    assert client.ttl(key(limited, "s")) == -1
    assert client.ttl(key(limited, "c")) == -1
    assert client.ttl(key(limited, "w:t_once")) == -1
    manager.update_instance_status(instance, "finished")  # idle again
    for suffix in ("s", "c", "d", "h"):
        assert 0 < client.ttl(key(limited, suffix)) <= 120, suffix
    forever = CacheStorageBackend(uid + "f", cache=alias, timeout=None)
    manager = TriggerManager(forever)
    manager.update_configuration(CONFIG)
    manager.update_instance_status(forever.create_instance("t_once"), "finished")
    for suffix in ("s", "c", "d", "h"):
        assert raw_redis(forever).ttl(key(forever, suffix)) == -1, suffix


def test_resolved_instances_are_stored_apart(uid):
    """Waiting, active and done instances are kept apart; a fire reads only the waiting ones."""
    storage = CacheStorageBackend(uid)
    manager = TriggerManager(storage)
    manager.update_configuration(CONFIG)
    client = raw_redis(storage)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("triggers.runners.DEFAULT_TASK_RUNNER", "threading")
        manager.fire("page", {"n": -1})
        assert client.hkeys(key(storage, "w:t_pages")) == [b"t_pages#0"]
        assert client.hkeys(key(storage, "w:t_once")) == [b"t_once#0"]
        manager.fire("start")
        for n in range(4):
            manager.fire("page", {"n": n})
        ThreadingTaskRunner.join_all()
    assert client.hlen(key(storage, "a")) == 0
    assert not client.exists(key(storage, "w:t_pages"))
    assert client.hlen(key(storage, "d")) == 6
    assert client.hget(key(storage, "s"), "n:t_pages") == b"5"
    assert len(storage.instances) == 6
    # Moving a resolved instance back to an open status moves it out of the done hash.
    manager.update_instance_status("t_pages#2", "failed")
    assert client.hkeys(key(storage, "a")) == [b"t_pages#2"]
    assert client.hget(key(storage, "d"), "t_pages#2") is None
    assert storage["t_pages#2"].status.value == "failed"


def test_lock_is_not_reentrant(uid):
    """Asking for a session lock the thread already holds raises at once."""
    storage = CacheStorageBackend(uid)
    with storage.acquire_lock():
        with pytest.raises(LockNotReentrant, match=uid):
            with storage.acquire_lock():
                pass
    with storage.acquire_lock():  # released properly
        pass


@pytest.mark.parametrize("kind", ["django_redis", "builtin_redis", "locmem", "db_sqlite",
                                  "db_postgres", "dict"])
def test_lock_wait_is_bounded(kind, uid):
    """A waiter gives up after lock_timeout with LockTimeout naming the session."""
    holder = make_storage(kind, uid)
    waiter = make_storage(kind, uid)
    waiter.lock_timeout = 1
    acquired = threading.Event()
    release = threading.Event()

    def hold():
        try:
            with holder.acquire_lock():
                acquired.set()
                release.wait(10)
        finally:
            close_thread_connections()

    thread = threading.Thread(target=hold)
    thread.start()
    assert acquired.wait(5), "the holder thread could not take the lock"
    started = time.monotonic()
    try:
        with pytest.raises(LockTimeout, match=uid):
            with waiter.acquire_lock():
                pass
    finally:
        release.set()
        thread.join()
    assert time.monotonic() - started < 5
    with waiter.acquire_lock():
        pass


def test_abandoned_redis_lock_expires(uid):
    """A lock whose holder vanished without releasing blocks only until it expires."""
    import redis_lock

    storage = CacheStorageBackend(uid, lock_expire=2, lock_timeout=10)
    client = raw_redis(storage)
    # A holder that died: its lock key exists and nobody renews or releases it.
    stale = redis_lock.Lock(client, storage.engine.lock_name, expire=2)
    assert stale.acquire(blocking=False)
    started = time.monotonic()
    with storage.acquire_lock():
        waited = time.monotonic() - started
    assert 0.5 < waited < 5


@pytest.mark.parametrize("kind", STORAGE_KINDS)
def test_concurrent_fires_lose_nothing(kind, uid, trigger_threading_runner):
    """Threads firing into one session at once: every andEvery firing gives one instance."""
    manager = TriggerManager(make_storage(kind, uid))
    manager.update_configuration(CONFIG)
    barrier = threading.Barrier(8)
    errors = []

    def worker(index):
        try:
            own = TriggerManager(make_storage(kind, uid))
            barrier.wait()
            for n in range(10):
                own.fire("page", {"thread": index, "n": n})
                if index == 0 and n == 5:
                    own.fire("start")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            close_thread_connections()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ThreadingTaskRunner.join_all()
    assert errors == []
    pages = manager.storage.instances_of_task("t_pages")
    assert len(pages) == 80
    assert {i.status.value for i in pages} == {"finished"}
    seen = sorted((i.kwargs["page"]["thread"], i.kwargs["page"]["n"]) for i in pages)
    assert seen == sorted((t, n) for t in range(8) for n in range(10))
    assert [i.status.value for i in manager.storage.instances_of_task("t_once")] == ["finished"]


def test_pickled_value_is_never_unpickled(uid):
    """A pickle planted at the state key raises CorruptSessionState; it is never loaded."""
    from triggers.exceptions import CorruptSessionState

    storage = CacheStorageBackend(uid)

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    manager = TriggerManager(storage)
    manager.update_configuration(CONFIG)
    manager.fire("page")
    for where, field in (("c", None), ("w:t_pages", "t_pages#0"), ("s", "k:start")):
        if field is None:
            raw_redis(storage).hset(key(storage, "s"), "v", "f" * 16)
            raw_redis(storage).set(key(storage, where), pickle.dumps(Boom()))
        else:
            raw_redis(storage).hset(key(storage, where), field, pickle.dumps(Boom()))
        with pytest.raises(CorruptSessionState, match=uid):
            TriggerManager(storage).fire("start")


def test_held_lock_is_renewed(uid):
    """A holder that keeps the lock longer than its expiry keeps it (automatic renewal)."""
    holder = CacheStorageBackend(uid, lock_expire=1)
    waiter = CacheStorageBackend(uid, lock_expire=1, lock_timeout=2.5)
    with holder.acquire_lock():
        with pytest.raises(LockTimeout):
            errors = []

            def wait():
                try:
                    with waiter.acquire_lock():
                        pass
                except LockTimeout as exc:
                    errors.append(exc)

            thread = threading.Thread(target=wait)
            thread.start()
            thread.join()
            raise errors[0]
    with waiter.acquire_lock():
        pass


def test_late_message_for_a_replayed_instance_is_ignored(uid, trigger_threading_runner):
    """A late delivery for an instance that was replayed starts nothing and changes nothing."""
    from triggers.runners import CeleryTaskRunner

    manager = TriggerManager(CacheStorageBackend(uid))
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Retry"}})
    manager.fire("go", {"succeed_at": 1})
    ThreadingTaskRunner.join_all()
    before = manager.storage.debug_repr()
    task = CeleryTaskRunner.resolve("tests.Retry")
    for name in ("t#0", "t#1"):
        assert task.execute_in_thread(TriggerManager(CacheStorageBackend(uid)), name) is None
    assert manager.storage.debug_repr() == before
