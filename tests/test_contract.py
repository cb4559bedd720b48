"""The storage contract, run over every bundled backend and the whole-session adapter.

Kinds: the cache storage on django-redis, on Django's RedisCache and on LocMem;
the redis storage on a standalone Redis and on a real 3-master Redis Cluster;
the memory storage; the database storage on SQLite and PostgreSQL; a custom
backend written against the original's ``_load_from_backend()`` / ``_save()``.
"""

import json
import threading

import pytest

from tests.helpers import STORAGE_KINDS, make_storage
from triggers import TriggerManager
from triggers.runners import ThreadingTaskRunner
from triggers.storages import storage_backends
from triggers.storages.base import BaseTriggerStorage, SessionStep, StorageContract, Want

pytestmark = pytest.mark.usefixtures("trigger_threading_runner")

CONFIG = {
    "t_pages": {"after": ["start"], "andEvery": "page", "run": "tests.Echo"},
    "t_once": {"after": ["start", "other"], "run": "tests.Echo"},
    "t_late": {"after": ["never"], "run": "tests.Echo"},
}


@pytest.fixture(params=STORAGE_KINDS)
def kind(request):
    return request.param


@pytest.fixture
def storage(kind, uid):
    return make_storage(kind, uid)


def fresh(storage):
    """Another storage object of the same backend and session (as another process builds)."""
    key = storage_backends.key_for(type(storage))
    return storage_backends.get(key, storage.uid, **storage.get_options())


def test_implements_the_contract(storage):
    assert isinstance(storage, StorageContract)
    assert isinstance(storage, BaseTriggerStorage)
    json.dumps(storage.get_options())


def test_a_step_reads_what_it_wants_and_writes_what_changed(storage):
    manager = TriggerManager(storage)
    manager.update_configuration(CONFIG)
    manager.fire("page", {"n": 1})

    def look(step: SessionStep):
        return ([i.name for i in step.waiting("t_pages")], step.count("t_pages"),
                step.latest("page"), step.latest("start"), [c.name for c in step.reacting("page")])

    assert fresh(storage).transact(look, Want(triggers=["page"])) == (
        ["t_pages#0"], 1, {"n": 1}, None, ["t_pages"])
    manager.fire("start")
    assert fresh(storage).transact(look, Want(triggers=["page"]))[:2] == ([], 1)
    ThreadingTaskRunner.join_all()
    assert fresh(storage)["t_pages#0"].status == "finished"
    assert fresh(storage).instances_of_task("t_pages")[0].kwargs == {
        "page": {"n": 1}, "start": {}}


def test_nothing_is_written_when_a_step_raises(storage):
    TriggerManager(storage).update_configuration(CONFIG)
    before = fresh(storage).debug_repr()

    def failing(step: SessionStep):
        step.new_instance(step.tasks["t_late"])
        step.set_latest_kwargs("x", {})
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        storage.transact(failing)
    assert fresh(storage).debug_repr() == before


def test_history_is_appended_in_the_step_and_read_oldest_first(storage):
    manager = TriggerManager(storage)
    manager.update_configuration(CONFIG)
    manager.fire("start", {"a": 1})
    manager.fire("page", {"n": 1})
    ThreadingTaskRunner.join_all()
    events = fresh(storage).history()
    kinds = [(e["event"], e.get("trigger") or e.get("instance")) for e in events]
    assert kinds[:2] == [("configured", None), ("fired", "start")]
    assert sorted(kinds[2:4]) == [("created", "t_once#0"), ("created", "t_pages#0")]
    assert ("fired", "page") in kinds
    assert [k for k in kinds if k[1] == "t_pages#0"] == [
        ("created", "t_pages#0"), ("scheduled", "t_pages#0"), ("started", "t_pages#0"),
        ("finished", "t_pages#0")]
    assert all(e["at"] > 0 and ":" in e["process"] for e in events)
    assert [e["at"] for e in events] == sorted(e["at"] for e in events)
    started = next(e for e in events if e["event"] == "started")
    assert started["run"]
    fired = next(e for e in events if e.get("trigger") == "start")
    assert fired["size"] == len('{"a":1}')
    assert fresh(storage).history(limit=2) == events[-2:]


def test_history_is_bounded(storage, settings):
    settings.TRIGGERS = {"HISTORY_LIMIT": 5}
    manager = TriggerManager(storage)
    manager.update_configuration(CONFIG)
    for n in range(10):
        manager.fire("other", {"n": n})
    events = fresh(storage).history()
    assert len(events) == 5
    assert [e["trigger"] for e in events if e["event"] == "fired"][-1] == "other"


def test_no_history_when_disabled(storage, settings):
    settings.TRIGGERS = {"HISTORY_LIMIT": 0}
    manager = TriggerManager(storage)
    manager.update_configuration(CONFIG)
    manager.fire("other")
    assert fresh(storage).history() == []


def test_sessions_are_listed_and_deleted(storage, kind):
    manager = TriggerManager(storage)
    if kind == "dict":
        # A custom whole-session backend lists and deletes only if it says how.
        with pytest.raises(NotImplementedError, match="DictStorage"):
            list(type(storage).session_uids())
        with pytest.raises(NotImplementedError, match="DictStorage"):
            storage.delete()
        return
    manager.update_configuration(CONFIG)
    manager.fire("page", {"n": 1})
    cls = type(storage)
    assert storage.uid in set(cls.session_uids(**storage.get_options()))
    storage.delete()
    gone = fresh(storage)
    assert gone.tasks == {} and gone.instances == {} and gone.history() == []
    assert storage.uid not in set(cls.session_uids(**storage.get_options()))


def test_hook_lock_is_reentrant_and_exclusive(storage):
    order = []
    with storage.hook_lock():
        with storage.hook_lock():  # re-entrant in the thread that holds it
            pass

        def other():
            try:
                with fresh(storage).hook_lock():
                    order.append("other")
            finally:
                from django.db import connections

                connections.close_all()

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(0.3)
        order.append("holder")
    thread.join(10)
    assert order == ["holder", "other"]


def test_other_tasks_backlog_is_not_read_by_fire(storage, kind):
    """A fire reads the waiting instances of the tasks its trigger names, nothing else."""
    manager = TriggerManager(storage)
    manager.update_configuration(CONFIG)
    for _n in range(5):
        manager.update_instance_status(storage.create_instance("t_late"), "failed",
                                       metadata={"exc_traceback": "x" * 1000})
    loaded = []
    original = type(storage).load

    def spy(self, step, want):
        loaded.append(want)
        return original(self, step, want)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(storage), "load", spy)
        manager.fire("page", {"n": 1})
    if kind == "dict":
        return  # the whole-session adapter reads everything, by definition
    assert not any(want.open or want.everything for want in loaded)
    assert all("t_late" not in want.waiting and not any(
        name.startswith("t_late") for name in want.instances) for want in loaded)


def test_sessions_spread_over_the_cluster_masters(redis_cluster):
    """Each session's keys share its hash tag, and sessions land on all three masters."""
    masters = set()
    for n in range(30):
        storage = make_storage("redis_cluster", f"spread-{n}-{id(redis_cluster)}")
        manager = TriggerManager(storage)
        manager.update_configuration(CONFIG)
        manager.fire("page", {"n": n})
        keys = [storage.engine.key(suffix) for suffix in ("s", "c", "w:t_pages", "h")]
        nodes = {redis_cluster.node_for_key(key) for key in keys}
        assert len(nodes) == 1, keys
        masters |= nodes
    assert masters == set(redis_cluster.ports)


def _release_1_session(client, prefix, uid):
    """Write a session the way release 1 stored it: one JSON state value and a done hash."""
    state = {
        "v": 1, "cfg": "abc",
        "tasks": {"t": {"after": ["a", "b"], "run": "tests.Echo"},
                  "t_every": {"after": ["a"], "andEvery": "page", "run": "tests.Echo"}},
        "kwargs": {"a": {"x": 1}, "page": {"n": 1}},
        "counters": {"t": 1, "t_every": 2},
        "open": {"t#0": {"status": "unstarted", "kwargs": {"a": {"x": 1}},
                         "meta": {"created": 1.0, "modified": 1.0}}},
        "meta": {"note": "old"},
    }
    client.set(f"{prefix}{{{uid}}}:state", json.dumps(state))
    client.hset(f"{prefix}{{{uid}}}:done", mapping={
        "t_every#0": json.dumps({"status": "finished", "kwargs": {"a": {"x": 1}, "page": {"n": 0}},
                                 "meta": {"result": {"ok": 0}}}),
        "t_every#1": json.dumps({"status": "finished", "kwargs": {"a": {"x": 1}, "page": {"n": 1}},
                                 "meta": {"result": {"ok": 1}}}),
    })


@pytest.mark.parametrize("kind", ["django_redis", "redis"])
def test_a_session_of_release_1_is_read_and_upgraded(kind, uid, redis_server):
    storage = make_storage(kind, uid)
    client = storage.engine.client
    prefix = storage.engine.prefix[:-len(f"{{{uid}}}:")]
    _release_1_session(client, prefix, uid)
    assert uid in set(type(storage).session_uids(**storage.get_options()))
    manager = TriggerManager(storage)
    assert sorted(storage.instances) == ["t#0", "t_every#0", "t_every#1"]
    assert storage["t_every#1"].metadata["result"] == {"ok": 1}
    assert storage.latest_kwargs == {"a": {"x": 1}, "page": {"n": 1}}
    assert storage.metadata["note"] == "old"
    # Upgraded: the old keys are gone, and the session goes on.
    assert not client.exists(f"{prefix}{{{uid}}}:state", f"{prefix}{{{uid}}}:done")
    manager.fire("b", {"y": 2})
    manager.fire("page", {"n": 2})
    ThreadingTaskRunner.join_all()
    assert storage["t#0"].status == "finished"
    assert storage["t_every#2"].status == "finished"
    assert storage["t_every#2"].kwargs == {"a": {"x": 1}, "page": {"n": 2}}


@pytest.mark.django_db(transaction=True, databases=["default", "postgres"])
@pytest.mark.parametrize("alias", ["default", "postgres"])
def test_database_sessions_of_release_1_are_migrated(alias, uid):
    """The migration that introduces the records layout converts release 1's session rows."""
    import importlib

    from django.apps import apps
    from django.db import connections

    from triggers.models import TriggerInstance, TriggerSession
    from triggers.storages.database import DatabaseStorageBackend

    migration = importlib.import_module("triggers.migrations.0005_records_layout")
    TriggerSession.objects.using(alias).create(uid=uid, state={
        "v": 1, "cfg": "abc",
        "tasks": {"t": {"after": ["a", "b"], "run": "tests.Echo"},
                  "t_d": {"after": ["a"], "run": "tests.Echo", "delay": 3600}},
        "kwargs": {"a": {"x": 1}}, "counters": {"t": 1, "t_d": 1}, "meta": {}})
    for name, status, meta in (("t#0", "unstarted", {}),
                               ("t_d#0", "scheduled", {"start_after": 9e9})):
        TriggerInstance.objects.using(alias).create(
            session_id=uid, name=name, task_name=name[:-2], number=0, status=status,
            kwargs={"a": {"x": 1}}, metadata=meta)

    class Editor:
        connection = connections[alias]

    migration.to_records(apps, Editor())
    storage = DatabaseStorageBackend(uid, using=alias)
    manager = TriggerManager(storage)
    assert sorted(storage.tasks) == ["t", "t_d"]
    assert storage.latest_kwargs == {"a": {"x": 1}}
    assert [i.name for i in manager.get_unresolved_instances()] == ["t#0", "t_d#0"]
    manager.fire("b", {"y": 2})
    ThreadingTaskRunner.join_all()
    assert storage["t#0"].status == "finished"


def test_delayed_instances_are_read_only_by_unless_triggers(storage, kind):
    """Instances waiting out a delay are not read by other fires; unless still abandons them."""
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["a"], "andEvery": "page", "delay": 3600,
                                        "unless": ["stop"], "run": "tests.Echo"}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("triggers.runners.ThreadingTaskRunner.run", lambda self, m, i: None)
        manager.fire("a")
        for n in range(3):
            manager.fire("page", {"n": n})
        loaded = []
        original = type(storage).load

        def spy(self, step, want):
            loaded.append(want)
            return original(self, step, want)

        patch.setattr(type(storage), "load", spy)
        manager.fire("page", {"n": 3})
        if kind != "dict":  # the whole-session adapter reads everything, by definition
            assert all(not want.delayed for want in loaded)
        manager.fire("stop")
    assert {i.name: i.status.value for i in fresh(storage).instances.values()} == {
        f"t#{n}": "abandoned" for n in range(4)}
