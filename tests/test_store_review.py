"""Regressions found by a review of the session store (each failed before its fix)."""

import json
import time

import pytest

from tests.helpers import make_storage, statuses
from triggers import TriggerManager
from triggers.exceptions import CorruptSessionState, InvalidInstanceStatus
from triggers.runners import ThreadingTaskRunner

CONFIG = {
    "t_a": {"after": ["go"], "run": "tests.Echo"},
    "t_b": {"after": ["go", "more"], "run": "tests.Echo"},
}


class QuietManager(TriggerManager):
    """Dispatches nothing; records what it would have dispatched."""

    def __init__(self, storage):
        super().__init__(storage)
        self.dispatched = []

    def dispatch(self, instances):
        self.dispatched.extend(i.name for i in instances)


@pytest.mark.parametrize("kind", ["memory", "redis", "locmem", "db_sqlite"])
def test_a_refused_call_in_a_lock_block_keeps_earlier_changes_in_place(kind, uid):
    storage = make_storage(kind, uid)
    manager = QuietManager(storage)
    manager.update_configuration(CONFIG)
    manager.fire("go")
    manager.update_instance_status("t_a#0", "failed")
    with storage.acquire_lock():
        manager.skip_failed_instance("t_a#0")
        with pytest.raises(InvalidInstanceStatus):
            manager.replay_failed_instance("t_b#0")
    fresh = make_storage(kind, uid)
    assert statuses(fresh) == {"t_a#0": "skipped", "t_b#0": "unstarted"}
    assert [i.name for i in fresh.get_unresolved_instances()] == ["t_b#0"]
    assert [e["event"] for e in fresh.history() if e.get("instance") == "t_a#0"][-1] == "skipped"
    assert ("created", "t_a#0") not in [(e["event"], e.get("instance"))
                                        for e in fresh.history()][-2:]
    if kind == "redis":
        client = storage.engine.client
        assert client.hkeys(storage.engine.key("a")) == []
        assert client.hget(storage.engine.key("s"), "o") == b"1"


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_an_instance_read_again_after_a_refused_call_is_saved(kind, uid):
    storage = make_storage(kind, uid)
    manager = QuietManager(storage)
    manager.update_configuration(CONFIG)
    manager.fire("go")
    with storage.acquire_lock() as locked:
        _ = locked["t_b#0"]
        with pytest.raises(InvalidInstanceStatus):
            manager.replay_failed_instance("t_b#0")
        locked["t_b#0"].metadata["note"] = "set by hand"
    assert make_storage(kind, uid)["t_b#0"].metadata.get("note") == "set by hand"


def test_fires_inside_a_django_testcase_are_applied(uid):
    """A TestCase's own transaction never commits; fires are not deferred to it."""
    import unittest

    from django.test import TestCase

    from triggers.testing import TriggerManagerTestCaseMixin

    class Example(TriggerManagerTestCaseMixin, TestCase):
        databases = {"default"}

        def test_subject_imported(self):
            self.manager = TriggerManager(make_storage("django_redis", uid))
            self.manager.update_configuration({"t": {"after": ["a", "b"], "run": "tests.Echo"}})
            self.manager.fire("a")
            self.manager.fire("b")
            self.assertInstanceFinished("t#0")

    result = unittest.TestResult()
    Example("test_subject_imported").run(result)
    assert result.errors == [] and result.failures == [], result.errors + result.failures


@pytest.mark.django_db(transaction=True, databases=["default", "postgres"])
def test_a_fire_inside_a_lock_block_in_a_transaction_joins_the_block(uid):
    from django.db import transaction

    storage = make_storage("redis", uid)
    manager = QuietManager(storage)
    manager.update_configuration(CONFIG)
    with transaction.atomic(), storage.acquire_lock() as locked:
        assert [i.name for i in manager.fire("go")] == ["t_a#0"]
        assert "t_a#0" in locked.instances


def test_the_redis_commit_writes_nothing_if_any_write_would_fail(uid):
    storage = make_storage("redis", uid)
    manager = QuietManager(storage)
    manager.update_configuration(CONFIG)
    client = storage.engine.client
    client.set(storage.engine.key("a"), "a string where a hash belongs")
    before = client.hgetall(storage.engine.key("s"))
    with pytest.raises(CorruptSessionState, match=uid):
        manager.fire("go")
    assert client.hgetall(storage.engine.key("s")) == before
    client.delete(storage.engine.key("a"))
    manager.fire("go")
    assert statuses(storage) == {"t_a#0": "scheduled", "t_b#0": "unstarted"}


def test_non_redis_cache_keys_expire_together(uid):
    storage = make_storage("locmem", uid)
    storage.timeout = 1
    manager = QuietManager(storage)
    manager.update_configuration(CONFIG)
    manager.fire("go")  # open work: nothing expires
    time.sleep(1.5)
    fresh = make_storage("locmem", uid)
    assert set(fresh.tasks) == {"t_a", "t_b"}
    manager.fire("more")
    for name in ("t_a#0", "t_b#0"):
        manager.update_instance_status(name, "finished")  # idle now
    time.sleep(1.5)
    gone = make_storage("locmem", uid)
    assert gone.tasks == {} and gone.instances == {}


def test_a_release_1_session_on_another_cache_is_refused_clearly(uid):
    storage = make_storage("locmem", uid)
    storage.cache.set(f"triggers:{{{uid}}}:state", json.dumps({"v": 1, "tasks": {}}))
    with pytest.raises(CorruptSessionState, match="release 1"):
        TriggerManager(storage).fire("go")


def test_a_configuration_replaced_between_two_reads_is_read_again(uid, monkeypatch):
    from triggers.storages import _records as records
    from triggers.storages.redis import RedisEngine

    storage = make_storage("redis", uid)
    manager = QuietManager(storage)
    manager.update_configuration(CONFIG)
    replaced = []
    original = RedisEngine.config

    def racing(self, version):
        if not replaced:
            replaced.append(1)
            QuietManager(make_storage("redis", uid)).update_configuration(
                {"t_c": {"after": ["go"], "run": "tests.Echo"}})
            records._parsed.clear()
        return original(self, version)

    records._parsed.clear()
    monkeypatch.setattr(RedisEngine, "config", racing)
    assert sorted(i.name for i in manager.fire("go")) == ["t_a#0", "t_c#0"]


def test_a_task_cannot_change_the_cached_configuration(uid):
    storage = make_storage("memory", uid)
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Echo",
                                         "withParams": {"opts": {"limit": {"n": 10}}}}})
    from triggers.task import _merged_kwargs  # noqa: PLC2701 - the function under test

    merged = _merged_kwargs(storage.tasks["t"] and make_storage("memory", uid).transact(
        lambda step: step.new_instance(step.tasks["t"])))
    merged["opts"]["limit"]["n"] = 0
    assert storage.tasks["t"].with_params == {"opts": {"limit": {"n": 10}}}


def test_latest_kwargs_do_not_read_the_history(uid):
    storage = make_storage("redis", uid)
    manager = QuietManager(storage)
    manager.update_configuration(CONFIG)
    for _n in range(20):
        storage.create_instance("t_a", status="finished")
    read = []
    original = type(storage).load

    def spy(self, step, want):
        read.append(want.everything)
        return original(self, step, want)

    type(storage).load = spy
    try:
        assert storage.latest_kwargs == {}
        assert storage.metadata["counters"]["t_a"] == 20
    finally:
        type(storage).load = original
    assert read and not any(read)


@pytest.mark.django_db(transaction=True, databases=["default", "postgres"])
def test_an_empty_configuration_is_not_missing(uid):
    from triggers.storages import _records as records

    storage = make_storage("db_sqlite", uid)
    TriggerManager(storage).update_configuration({})
    records._parsed.clear()
    assert make_storage("db_sqlite", uid).tasks == {}
    ThreadingTaskRunner.join_all()


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_fires_in_a_lock_block_dispatch_each_instance_once(kind, uid):
    storage = make_storage(kind, uid)
    manager = QuietManager(storage)
    manager.update_configuration({"t": {"after": [], "andEvery": "page", "run": "tests.Echo"}})
    with storage.acquire_lock():
        returned = [[i.name for i in manager.fire("page", {"n": n})] for n in range(3)]
    assert returned == [["t#0"], ["t#1"], ["t#2"]]
    assert sorted(manager.dispatched) == ["t#0", "t#1", "t#2"]


def test_done_records_are_compact_and_read_back_whole(uid, trigger_threading_runner):
    storage = make_storage("redis", uid)
    manager = TriggerManager(storage)
    manager.update_configuration(CONFIG)
    manager.fire("go")
    ThreadingTaskRunner.join_all()
    raw = json.loads(storage.engine.client.hget(storage.engine.key("d"), "t_a#0"))
    assert "modified" not in raw["meta"]
    assert make_storage("redis", uid)["t_a#0"].metadata["modified"] == \
        make_storage("redis", uid)["t_a#0"].metadata["finished"]


@pytest.mark.usefixtures("trigger_threading_runner")
def test_idempotency_records_of_a_non_redis_cache_expire_with_the_session(uid):
    from django.core.cache import caches

    from triggers.storages.cache import CacheStorageBackend

    storage = CacheStorageBackend(uid, cache="locmem", timeout=1)
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["a", "b"], "run": "tests.Echo"}})
    manager.fire("a", idempotency_key="k1")  # written while t#0 is open: no expiry yet
    manager.fire("b")
    ThreadingTaskRunner.join_all()
    time.sleep(2.2)
    assert caches["locmem"].get(f"triggers:{{{uid}}}:y:k1") is None
    storage.delete()


@pytest.mark.usefixtures("trigger_threading_runner")
def test_idempotency_records_of_a_non_redis_cache_live_as_long_as_the_session(uid):
    from triggers.storages.cache import CacheStorageBackend

    storage = CacheStorageBackend(uid, cache="locmem", timeout=1)
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Echo"}})
    manager.fire("ping", {"n": 1}, idempotency_key="webhook-1")
    for _ in range(4):  # used every 0.4 s: the session (and its records) do not expire
        time.sleep(0.4)
        manager.fire("other")
    manager.fire("ping", {"n": 1}, idempotency_key="webhook-1")
    fired = [event["trigger"] for event in storage.history() if event["event"] == "fired"]
    assert fired.count("ping") == 1
    storage.delete()
