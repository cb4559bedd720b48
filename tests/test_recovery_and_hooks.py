"""Recovery that respects leases, hooks that survive a busy hook lock, the finalizer after
a skip, and dispatches that wait for the caller's transaction."""

import threading
import time

import pytest
import redis
from django.conf import settings as django_settings
from django.db import transaction

from tests.app.tasks import execution_key
from tests.helpers import make_storage, statuses
from triggers import TriggerManager
from triggers.manager import FinalizingTriggerManager
from triggers.run import lease_expired
from triggers.runners import ThreadingTaskRunner
from triggers.storages.database import DatabaseStorageBackend


@pytest.fixture
def sent(monkeypatch):
    names: list[str] = []
    monkeypatch.setattr("triggers.runners.ThreadingTaskRunner.run",
                        lambda self, manager, instance: names.append(instance.name))
    return names


@pytest.mark.usefixtures("trigger_threading_runner")
def test_recover_leaves_a_live_run_alone_and_takes_a_dead_one(uid, settings):
    settings.TRIGGERS = {"LEASE": 0.6}
    client = redis.Redis.from_url(django_settings.REDIS_URL)
    storage = make_storage("django_redis", uid)
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Count"}})
    manager.fire("go", {"sleep": 2})
    while not client.get(f"started:{uid}:t#0"):
        time.sleep(0.01)
    time.sleep(1)  # running for longer than older_than and than one lease: heartbeats renew it
    assert not lease_expired(storage["t#0"])
    assert manager.recover(older_than=0.5) == []
    ThreadingTaskRunner.join_all()
    assert int(client.get(execution_key(uid, "t#0")) or 0) == 1
    assert statuses(storage) == {"t#0": "finished"}


@pytest.mark.usefixtures("trigger_threading_runner")
def test_recover_restarts_a_run_whose_lease_expired(uid, settings, sent):
    from triggers.run import Run

    settings.TRIGGERS = {"LEASE": 0.3}
    storage = make_storage("redis", uid)
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Echo"}})
    manager.fire("go")
    assert Run.start(manager, "t#0") is not None  # its worker then dies: no heartbeat
    assert manager.recover(older_than=0) == []  # the lease is still current
    time.sleep(0.4)
    assert [instance.name for instance in manager.recover(older_than=0)] == ["t#0"]
    assert sent == ["t#0", "t#0"]


@pytest.mark.usefixtures("trigger_threading_runner")
def test_a_task_that_skips_itself_as_the_last_work_finalizes_the_session(uid):
    manager = FinalizingTriggerManager(make_storage("redis", uid))
    manager.update_configuration({
        "t": {"after": ["go"], "run": "tests.Skip"},
        "t_final": {"after": ["sessionFinalized"], "run": "tests.Echo"},
    })
    manager.fire("go")
    ThreadingTaskRunner.join_all()
    assert statuses(manager.storage) == {"t#0": "skipped", "t_final#0": "finished"}


@pytest.mark.usefixtures("trigger_threading_runner")
def test_skipping_the_last_failure_finalizes_the_session(uid):
    manager = FinalizingTriggerManager(make_storage("redis", uid))
    manager.update_configuration({
        "t": {"after": ["go"], "run": "tests.Fail"},
        "t_final": {"after": ["sessionFinalized"], "run": "tests.Echo"},
    })
    manager.fire("go")
    ThreadingTaskRunner.join_all()
    assert statuses(manager.storage) == {"t#0": "failed"}
    manager.skip_failed_instance("t#0")
    ThreadingTaskRunner.join_all()
    assert statuses(manager.storage) == {"t#0": "skipped", "t_final#0": "finished"}


class SlowHooks(TriggerManager):
    def _post_fire(self, trigger_name, tasks_scheduled):
        if trigger_name == "slow":
            time.sleep(1.5)


@pytest.mark.usefixtures("trigger_threading_runner")
def test_a_hook_holding_the_hook_lock_neither_fails_a_fire_nor_holds_its_dispatch(uid, sent,
                                                                                  caplog):
    storage = make_storage("redis", uid)
    storage.lock_timeout = 0.3
    SlowHooks(storage).update_configuration({"t": {"after": ["go"], "run": "tests.Echo"}})
    slow = threading.Thread(target=SlowHooks(make_storage("redis", uid)).fire, args=("slow",))
    slow.start()
    time.sleep(0.2)
    scheduled = SlowHooks(storage).fire("go")  # no LockTimeout for a fire that was applied
    assert [instance.name for instance in scheduled] == ["t#0"]
    assert sent == ["t#0"]
    slow.join()
    assert "run without the session's hook lock" in caplog.text


@pytest.mark.parametrize("kind", ["redis", "django_redis", "memory"])
@pytest.mark.usefixtures("trigger_threading_runner")
@pytest.mark.django_db(transaction=True)
def test_a_lock_block_in_a_rolled_back_transaction_sends_nothing(kind, uid, sent):
    storage = make_storage(kind, uid)
    TriggerManager(storage).update_configuration({"t": {"after": ["go"], "run": "tests.Echo"},
                                                  "u": {"after": ["go2"], "run": "tests.Echo"}})
    with pytest.raises(RuntimeError), transaction.atomic():
        with storage.acquire_lock() as locked:
            TriggerManager(locked).fire("go")
        assert sent == []  # not before the commit
        raise RuntimeError("rolled back")
    assert sent == []
    # What the block wrote stays (it is not a database storage): recovery dispatches it.
    assert statuses(storage) == {"t#0": "scheduled"}
    with transaction.atomic():
        with storage.acquire_lock() as locked:
            TriggerManager(locked).fire("go2")
        assert sent == []
    assert sent == ["u#0"]


@pytest.mark.usefixtures("trigger_threading_runner")
@pytest.mark.django_db(transaction=True, databases=["default", "postgres"])
def test_a_database_storage_on_another_database_waits_for_the_callers_transaction(uid, sent):
    storage = DatabaseStorageBackend(uid, using="postgres")
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Echo"}})
    with pytest.raises(RuntimeError), transaction.atomic(using="default"):
        manager.fire("go")
        assert sent == []
        raise RuntimeError("the view fails: rolled back")
    assert sent == [] and statuses(storage) == {}
    with transaction.atomic(using="default"):
        manager.fire("go")
        assert statuses(storage) == {}
    assert sent == ["t#0"] and statuses(storage) == {"t#0": "scheduled"}


@pytest.mark.usefixtures("trigger_threading_runner")
def test_recover_only_the_named_instances(uid, sent):
    """recover(instances=[...]) takes the named stuck instances only; a bad list is refused
    and changes nothing."""
    from triggers.exceptions import InvalidArgument

    storage = make_storage("django_redis", uid)
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Echo"},
                                  "u": {"after": ["go"], "run": "tests.Echo"}})
    manager.fire("go")
    sent.clear()  # both scheduled, never started: stuck
    for bad in ("t#0", [1], [None]):
        with pytest.raises(InvalidArgument, match="instances must be a list of instance names"):
            manager.recover(0, instances=bad)
    assert "recoveries" not in storage["t#0"].metadata
    assert [i.name for i in manager.recover(0, instances=["t#0", "x#9"])] == ["t#0"]
    assert sent == ["t#0"]
    assert storage["t#0"].metadata["recoveries"] == 1
    assert "recoveries" not in storage["u#0"].metadata
