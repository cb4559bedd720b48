"""A held lock keeps being renewed after a failed renewal (a busy database, a connection
reset): it never expires under a live holder."""

import threading
import time

import pytest
import redis
from django.db import OperationalError
from django.db.models.query import QuerySet

from tests.helpers import make_storage
from triggers.exceptions import LockTimeout
from triggers.storages.database import DatabaseLock


def _try_to_take(take) -> list[str]:
    outcome: list[str] = []

    def other():
        try:
            with take():
                outcome.append("taken while held")
        except LockTimeout:
            outcome.append("timeout")

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    return outcome


@pytest.mark.django_db(transaction=True, databases=["default", "postgres"])
def test_a_database_lock_is_renewed_after_a_failed_renewal(uid, monkeypatch):
    real_update = QuerySet.update
    failures = []

    def update(self, **kwargs):
        if threading.current_thread().name.startswith("triggers-lock-renewer") and not failures:
            failures.append(1)
            raise OperationalError("database is locked (simulated)")
        return real_update(self, **kwargs)

    monkeypatch.setattr(QuerySet, "update", update)
    with DatabaseLock("postgres", f"hooks:{uid}", uid, expire=1, timeout=1).hold():
        time.sleep(2.5)  # a hook that runs 2.5 s, more than twice the expiry
        outcome = _try_to_take(
            lambda: DatabaseLock("postgres", f"hooks:{uid}", uid, expire=1, timeout=0.2).hold())
    assert failures == [1]
    assert outcome == ["timeout"]


def test_a_redis_lock_is_renewed_after_a_failed_renewal(uid, monkeypatch):
    import redis_lock

    real_extend = redis_lock.Lock.extend
    failures = []

    def extend(self, expire=None):
        if not failures:
            failures.append(1)
            raise redis.ConnectionError("Connection reset by peer (simulated)")
        return real_extend(self, expire=expire)

    monkeypatch.setattr(redis_lock.Lock, "extend", extend)
    storage = make_storage("redis", uid)
    storage.lock_expire = 1
    other = make_storage("redis", uid)
    other.lock_expire, other.lock_timeout = 1, 0.2
    with storage.hook_lock():
        time.sleep(2.5)
        outcome = _try_to_take(other.hook_lock)
    assert failures == [1]
    assert outcome == ["timeout"]
