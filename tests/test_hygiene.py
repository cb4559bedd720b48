"""Connection and lock hygiene: a step leaves shared connections and locks as it found them."""

import gc
import threading
import time

import pytest
from django.db import connections, transaction

from triggers import TriggerManager
from triggers.locking import CacheSessionLock, LocalSessionLock
from triggers.storages.database import DatabaseStorageBackend

pytestmark = pytest.mark.usefixtures("trigger_threading_runner")

CONFIG = {"t": {"after": ["a", "b"], "run": "tests.Echo"}}


@pytest.mark.django_db(transaction=True, databases=["default", "postgres"])
def test_sqlite_busy_timeout_is_restored(uid):
    connection = connections["default"]
    connection.ensure_connection()
    before = connection.connection.execute("PRAGMA busy_timeout").fetchone()[0]
    assert before == 30000  # OPTIONS timeout=30 in the test settings
    manager = TriggerManager(DatabaseStorageBackend(uid, lock_timeout=0.05))
    manager.update_configuration(CONFIG)
    manager.fire("a")
    assert connection.connection.execute("PRAGMA busy_timeout").fetchone()[0] == before


@pytest.mark.django_db(transaction=True, databases=["default", "postgres"])
def test_postgres_lock_timeout_does_not_outlive_the_step(uid):
    connection = connections["postgres"]
    manager = TriggerManager(DatabaseStorageBackend(uid, using="postgres", lock_timeout=0.05))
    manager.update_configuration(CONFIG)

    def lock_timeout():
        with connection.cursor() as cursor:
            cursor.execute("SHOW lock_timeout")
            return cursor.fetchone()[0]

    with transaction.atomic(using="postgres"):
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL lock_timeout = '7s'")
        manager.fire("a")
        assert lock_timeout() == "7s"  # the caller's own setting, not the step's 50ms
    assert lock_timeout() == "0"  # and nothing is left on the connection afterwards
    manager.fire("b")
    assert lock_timeout() == "0"


def test_cache_lock_never_deletes_another_holders_key(uid):
    from django.core.cache import caches

    cache = caches["locmem"]
    name = f"lock-{uid}"
    first = CacheSessionLock(cache, name, uid, expire=1, timeout=1)
    second = CacheSessionLock(cache, name, uid, expire=30, timeout=1)
    taken, release = threading.Event(), threading.Event()

    def other_holder():
        with second.hold():
            taken.set()
            release.wait(10)

    with first.hold():
        first._stop.set()  # its renewal stops: the key expires under the holder
        first._renewer.join()
        time.sleep(1.2)
        thread = threading.Thread(target=other_holder)
        thread.start()
        assert taken.wait(5)
    # first's release did not delete the key that the other holder now owns
    assert cache.get(name) == second._token
    release.set()
    thread.join()
    assert cache.get(name) is None


def test_cache_lock_is_renewed_while_held(uid):
    from django.core.cache import caches

    from triggers.exceptions import LockTimeout

    cache = caches["locmem"]
    name = f"lock-{uid}"
    holder = CacheSessionLock(cache, name, uid, expire=1, timeout=1)
    outcome = []

    def wait():
        try:
            with CacheSessionLock(cache, name, uid, expire=1, timeout=0.3).hold():
                outcome.append("taken")
        except LockTimeout:
            outcome.append("timeout")

    with holder.hold():
        time.sleep(2.5)  # past two expiries: renewed meanwhile
        thread = threading.Thread(target=wait)
        thread.start()
        thread.join()
    assert outcome == ["timeout"]
    with CacheSessionLock(cache, name, uid, expire=1, timeout=1).hold():
        pass


def test_local_lock_registry_does_not_grow():
    for n in range(2000):
        with LocalSessionLock(f"bounded-{n}", "x").hold():
            pass
    gc.collect()
    assert len([name for name in LocalSessionLock._locks if name.startswith("bounded-")]) < 10


def test_sqlite_atomic_requests_without_immediate_transactions_is_checked(settings):
    from unittest import mock

    from triggers.checks import check_settings

    settings.TRIGGERS = {"STORAGE": "db"}
    database = settings.DATABASES["default"]
    with mock.patch.dict(database, {"ATOMIC_REQUESTS": True}):
        assert "triggers.W003" in [m.id for m in check_settings()]
        for mode in ("IMMEDIATE", "immediate"):  # Django accepts either
            with mock.patch.dict(database, {"OPTIONS": {**database["OPTIONS"],
                                                        "transaction_mode": mode}}):
                assert "triggers.W003" not in [m.id for m in check_settings()]
    assert "triggers.W003" not in [m.id for m in check_settings()]
