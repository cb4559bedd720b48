"""Fires inside the caller's database transaction, on every kind of storage."""

import pytest
from django.db import connections, transaction

from tests.helpers import make_storage, statuses
from triggers import TriggerManager
from triggers.runners import ThreadingTaskRunner

pytestmark = [pytest.mark.usefixtures("trigger_threading_runner"),
              pytest.mark.django_db(transaction=True, databases=["default", "postgres"])]

CONFIG = {"t": {"after": ["a"], "run": "tests.Echo"}}

NON_DB_KINDS = ["django_redis", "redis", "locmem", "memory"]
DB_KINDS = ["db_sqlite", "db_postgres"]


@pytest.fixture
def sent(monkeypatch):
    """Every instance handed to a runner, in order."""
    from triggers import runners

    calls = []
    original = runners.ThreadingTaskRunner.run

    def run(self, manager, instance):
        calls.append(instance.name)
        return original(self, manager, instance)

    monkeypatch.setattr(runners.ThreadingTaskRunner, "run", run)
    return calls


def alias_of(kind):
    return "postgres" if kind == "db_postgres" else "default"


@pytest.mark.parametrize("kind", NON_DB_KINDS + DB_KINDS)
def test_nothing_is_sent_before_the_commit(kind, uid, sent):
    manager = TriggerManager(make_storage(kind, uid))
    manager.update_configuration(CONFIG)
    with transaction.atomic(using=alias_of(kind)):
        manager.fire("a", {"n": 1})
        assert sent == []
    ThreadingTaskRunner.join_all()
    assert sent == ["t#0"]
    assert statuses(manager.storage) == {"t#0": "finished"}


@pytest.mark.parametrize("kind", NON_DB_KINDS + DB_KINDS)
def test_a_rolled_back_transaction_leaves_nothing(kind, uid, sent):
    manager = TriggerManager(make_storage(kind, uid))
    manager.update_configuration(CONFIG)
    with pytest.raises(RuntimeError), transaction.atomic(using=alias_of(kind)):
        manager.fire("a", {"n": 1})
        raise RuntimeError("rolled back")
    ThreadingTaskRunner.join_all()
    assert sent == []
    assert manager.storage.instances == {}
    assert manager.storage.latest_kwargs == {}
    assert manager.get_unresolved_instances() == []


@pytest.mark.parametrize("kind", NON_DB_KINDS)
def test_non_database_storages_apply_the_fire_at_commit(kind, uid, sent):
    manager = TriggerManager(make_storage(kind, uid))
    manager.update_configuration(CONFIG)
    with transaction.atomic():
        assert manager.fire("a", {"n": 1}) == []  # applied when the transaction commits
        assert manager.storage.latest_kwargs == {}
    assert manager.storage.latest_kwargs["a"] == {"n": 1}


@pytest.mark.parametrize("kind", DB_KINDS)
def test_a_failing_callback_does_not_drop_later_dispatches(kind, uid, sent):
    """Robust on_commit: the app's (or a hook's) failing callback cancels no dispatch."""
    manager = TriggerManager(make_storage(kind, uid))
    manager.update_configuration({**CONFIG, "u": {"after": ["b"], "run": "tests.Echo"}})
    alias = alias_of(kind)

    def broken():
        raise RuntimeError("an on_commit callback of the application failed")

    with transaction.atomic(using=alias):
        manager.fire("a")
        transaction.on_commit(broken, using=alias, robust=True)
        manager.fire("b")
    ThreadingTaskRunner.join_all()
    assert sorted(sent) == ["t#0", "u#0"]
    assert statuses(manager.storage) == {"t#0": "finished", "u#0": "finished"}


@pytest.mark.parametrize("kind", ["django_redis", "db_sqlite"])
def test_atomic_requests(kind, uid, sent):
    """With ATOMIC_REQUESTS a view's fire is sent after the response's transaction commits,
    and a view that fails leaves nothing."""
    from unittest import mock

    from django.test import Client

    from tests import urls

    client = Client(raise_request_exception=False)
    manager = TriggerManager(make_storage(kind, uid))
    manager.update_configuration(CONFIG)
    urls.fire_kind = kind
    with mock.patch.dict(connections["default"].settings_dict, {"ATOMIC_REQUESTS": True}):
        response = client.get(f"/fire/{uid}/?fail=1")
        assert response.status_code == 500
        ThreadingTaskRunner.join_all()
        assert sent == [] and manager.storage.instances == {}
        response = client.get(f"/fire/{uid}/")
        assert response.status_code == 200
    ThreadingTaskRunner.join_all()
    assert sent == ["t#0"]
    assert statuses(manager.storage) == {"t#0": "finished"}
