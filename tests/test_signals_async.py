"""triggers.signals (sent after commit) and the manager's async methods in async views."""

import json
import threading
from urllib.parse import quote

import pytest
from asgiref.sync import async_to_sync
from django.db import transaction
from django.test import AsyncClient, override_settings

from tests import urls_async
from tests.helpers import make_storage, statuses
from triggers import TriggerManager
from triggers.manager import FinalizingTriggerManager
from triggers.runners import ThreadingTaskRunner
from triggers.signals import instance_status_changed, trigger_fired
from triggers.types import TaskInstance, TaskStatus

pytestmark = pytest.mark.usefixtures("trigger_threading_runner")

CONFIG = {"t": {"after": ["a"], "run": "tests.Echo"}}
#: Storages of every family: in-process, cache on Redis, redis-py, SQLite, PostgreSQL.
KINDS = ["memory", "django_redis", "redis", "db_sqlite", "db_postgres"]


#: Tests that open transactions themselves need the (transactional) test databases.
in_transactions = pytest.mark.django_db(transaction=True, databases=["default", "postgres"])


class RolledBack(Exception):
    pass


def alias_of(kind):
    return "postgres" if kind == "db_postgres" else "default"


class Recorder:
    """Every signal sent, in the order it was sent (from any thread)."""

    def __init__(self):
        self.events = []
        self.threads = []
        self._lock = threading.Lock()

    def on_fired(self, sender, signal=None, **kwargs):
        with self._lock:
            self.events.append(("fired", sender, kwargs))
            self.threads.append(threading.get_ident())

    def on_status(self, sender, signal=None, **kwargs):
        with self._lock:
            self.events.append(("status", sender, kwargs))
            self.threads.append(threading.get_ident())

    def of(self, uid):
        return [event for event in self.events if event[2]["session"] == uid]

    def triggers(self, uid):
        return [(kw["trigger_name"], kw["trigger_kwargs"], [i.name for i in kw["scheduled"]])
                for kind, _, kw in self.of(uid) if kind == "fired"]

    def statuses(self, uid, name=None):
        return [(kw["instance"].name, kw["old_status"] and kw["old_status"].value,
                 kw["new_status"].value)
                for kind, _, kw in self.of(uid)
                if kind == "status" and (name is None or kw["instance"].name == name)]

    def timeline(self, uid):
        """Short names of the events in order: 'a' (fired), 't#0:running' (status)."""
        return [kw["trigger_name"] if kind == "fired"
                else f"{kw['instance'].name}:{kw['new_status'].value}"
                for kind, _, kw in self.of(uid)]


@pytest.fixture
def recorder():
    recorder = Recorder()
    trigger_fired.connect(recorder.on_fired, weak=False, dispatch_uid="test-recorder-fired")
    instance_status_changed.connect(recorder.on_status, weak=False,
                                    dispatch_uid="test-recorder-status")
    yield recorder
    ThreadingTaskRunner.join_all()
    trigger_fired.disconnect(dispatch_uid="test-recorder-fired")
    instance_status_changed.disconnect(dispatch_uid="test-recorder-status")


def new_manager(kind, uid, config=CONFIG, manager_class=TriggerManager):
    manager = manager_class(make_storage(kind, uid))
    manager.update_configuration(config)
    return manager


# -- signals ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_fire_and_its_run_send_signals_in_causal_order(kind, uid, recorder):
    manager = new_manager(kind, uid)
    manager.fire("a", {"n": 1})
    ThreadingTaskRunner.join_all()
    assert statuses(manager.storage) == {"t#0": "finished"}
    assert recorder.triggers(uid) == [("a", {"n": 1}, ["t#0"]),
                                      ("t", {"seen": {"a": {"n": 1}}}, [])]
    assert recorder.statuses(uid) == [("t#0", None, "scheduled"), ("t#0", "scheduled", "running"),
                                      ("t#0", "running", "finished")]
    # The step's status changes, then its triggers; the worker's only after the dispatch.
    assert recorder.timeline(uid) == ["t#0:scheduled", "a", "t#0:running", "t#0:finished", "t"]
    for _, sender, kwargs in recorder.of(uid):
        assert sender is TriggerManager
        assert isinstance(kwargs["manager"], TriggerManager)
        assert kwargs["manager"].storage.uid == uid
    for _, _, kwargs in recorder.of(uid):
        if "instance" in kwargs:
            assert isinstance(kwargs["instance"], TaskInstance)
            assert isinstance(kwargs["new_status"], TaskStatus)
            assert kwargs["instance"].status == kwargs["new_status"]


@pytest.mark.parametrize("kind", ["memory", "redis", "db_sqlite"])
def test_unstarted_and_abandoned_instances(kind, uid, recorder):
    manager = new_manager(kind, uid, {"t": {"after": ["a", "b"], "unless": ["x"],
                                            "run": "tests.Echo"}})
    manager.fire("a", {"page": 1})
    manager.fire("x")
    assert recorder.statuses(uid) == [("t#0", None, "unstarted"), ("t#0", "unstarted", "abandoned")]
    assert recorder.triggers(uid) == [("a", {"page": 1}, []), ("x", {}, [])]


@pytest.mark.parametrize("kind", ["memory", "redis", "db_sqlite"])
def test_failure_replay_skip_status_and_recovery(kind, uid, recorder):
    manager = new_manager(kind, uid, {"f": {"after": ["go"], "run": "tests.FailUnlessFixed"},
                                      "g": {"after": ["stop"], "run": "tests.Fail"}})
    manager.fire("go")
    ThreadingTaskRunner.join_all()
    assert recorder.statuses(uid, "f#0")[-1] == ("f#0", "running", "failed")

    manager.replay_failed_instance("f#0", {"go": {"fixed": True}})
    ThreadingTaskRunner.join_all()
    assert recorder.statuses(uid, "f#0")[-1] == ("f#0", "failed", "replayed")
    assert recorder.statuses(uid, "f#1") == [("f#1", None, "scheduled"),
                                             ("f#1", "scheduled", "running"),
                                             ("f#1", "running", "finished")]
    assert recorder.triggers(uid)[-1] == ("f", {"fixed": True}, [])

    manager.fire("stop")
    ThreadingTaskRunner.join_all()
    manager.skip_failed_instance("g#0", cascade=True, result={"ok": 1})
    assert recorder.statuses(uid, "g#0")[-1] == ("g#0", "failed", "skipped")
    assert recorder.triggers(uid)[-1] == ("g", {"ok": 1}, [])

    manager.update_instance_status("g#0", "running")
    assert recorder.statuses(uid, "g#0")[-1] == ("g#0", "skipped", "running")
    before = len(recorder.events)
    manager.update_instance_metadata("g#0", {"note": "no status change"})
    assert len(recorder.events) == before

    # Recovery sends the running instance back to scheduled and runs it again.
    assert [i.name for i in manager.recover(older_than=0)] == ["g#0"]
    ThreadingTaskRunner.join_all()
    assert recorder.statuses(uid, "g#0")[-3:] == [("g#0", "running", "scheduled"),
                                                  ("g#0", "scheduled", "running"),
                                                  ("g#0", "running", "failed")]


@in_transactions
@pytest.mark.parametrize("kind", ["memory", "django_redis", "redis", "db_sqlite", "db_postgres"])
def test_signals_wait_for_the_commit(kind, uid, recorder):
    manager = new_manager(kind, uid)
    with transaction.atomic(using=alias_of(kind)):
        manager.fire("a", {"n": 1})
        assert recorder.of(uid) == []
    ThreadingTaskRunner.join_all()
    assert recorder.timeline(uid) == ["t#0:scheduled", "a", "t#0:running", "t#0:finished", "t"]


@in_transactions
@pytest.mark.parametrize("kind", ["memory", "django_redis", "redis", "db_sqlite", "db_postgres"])
def test_a_rolled_back_transaction_sends_nothing(kind, uid, recorder):
    manager = new_manager(kind, uid)
    with pytest.raises(RolledBack), transaction.atomic(using=alias_of(kind)):
        manager.fire("a", {"n": 1})
        raise RolledBack()
    ThreadingTaskRunner.join_all()
    assert recorder.of(uid) == []
    assert manager.storage.instances == {}


@in_transactions
@pytest.mark.parametrize("kind", ["db_sqlite", "db_postgres"])
def test_database_steps_in_a_transaction_send_at_its_commit_in_order(kind, uid, recorder):
    """Two fires in one transaction: nothing before the commit, then each step's signals."""
    manager = new_manager(kind, uid, {**CONFIG, "u": {"after": ["b"], "run": "tests.Echo"}})
    with transaction.atomic(using=alias_of(kind)):
        manager.fire("a")
        manager.fire("b")
        assert recorder.of(uid) == []
    ThreadingTaskRunner.join_all()
    timeline = recorder.timeline(uid)
    assert timeline[:4] == ["t#0:scheduled", "a", "u#0:scheduled", "b"]
    assert sorted(timeline[4:]) == sorted(["t#0:running", "t#0:finished", "t",
                                           "u#0:running", "u#0:finished", "u"])


@pytest.mark.parametrize("kind", ["memory", "db_sqlite"])
def test_a_lock_block_sends_each_change_once_after_the_block(kind, uid, recorder):
    manager = new_manager(kind, uid, {"t": {"after": ["a", "b"], "run": "tests.Echo"}})
    with manager.storage.acquire_lock():
        manager.fire("a")
        manager.fire("b")
        assert recorder.of(uid) == []
    ThreadingTaskRunner.join_all()
    assert recorder.statuses(uid) == [("t#0", None, "unstarted"), ("t#0", "unstarted", "scheduled"),
                                      ("t#0", "scheduled", "running"),
                                      ("t#0", "running", "finished")]
    assert [name for name, _, _ in recorder.triggers(uid)] == ["a", "b", "t"]


def test_a_failing_receiver_stops_neither_other_receivers_nor_the_dispatch(uid, recorder):
    def broken(sender, **kwargs):
        raise RuntimeError("a receiver failed")

    trigger_fired.connect(broken, weak=False, dispatch_uid="test-broken-fired")
    instance_status_changed.connect(broken, weak=False, dispatch_uid="test-broken-status")
    try:
        manager = new_manager("memory", uid)
        manager.fire("a")
        ThreadingTaskRunner.join_all()
    finally:
        trigger_fired.disconnect(dispatch_uid="test-broken-fired")
        instance_status_changed.disconnect(dispatch_uid="test-broken-status")
    assert statuses(manager.storage) == {"t#0": "finished"}
    assert recorder.timeline(uid) == ["t#0:scheduled", "a", "t#0:running", "t#0:finished", "t"]


def test_the_sender_is_the_managers_class(uid, recorder):
    """Receivers can listen to one manager class; outcome triggers and a hook's fire count."""
    mine = []

    def only_finalizing(sender, trigger_name, **kwargs):
        mine.append(trigger_name)

    trigger_fired.connect(only_finalizing, sender=FinalizingTriggerManager, weak=False,
                          dispatch_uid="test-finalizing")
    try:
        plain = new_manager("memory", uid)
        plain.fire("a")
        ThreadingTaskRunner.join_all()
        other = f"{uid}-finalizing"
        finalizing = new_manager("memory", other, {
            "t": {"after": ["a"], "run": "tests.Echo", "onReady": ["ready"]},
            "last": {"after": ["sessionFinalized"], "run": "tests.Echo"}},
            FinalizingTriggerManager)
        finalizing.fire("a")
        ThreadingTaskRunner.join_all()
    finally:
        trigger_fired.disconnect(dispatch_uid="test-finalizing")
    assert mine == ["a", "ready", "t", "sessionFinalized", "last"]
    assert {sender for _, sender, _ in recorder.of(uid)} == {TriggerManager}
    assert {sender for _, sender, _ in recorder.of(other)} == {FinalizingTriggerManager}


def test_nothing_is_sent_for_an_idempotent_repeat(uid, recorder):
    manager = new_manager("memory", uid)
    manager.fire("a", idempotency_key="k")
    manager.fire("a", idempotency_key="k")
    ThreadingTaskRunner.join_all()
    assert [name for name, _, _ in recorder.triggers(uid)] == ["a", "t"]


def test_a_task_that_skips_itself_sends_its_status_change(uid, recorder):
    manager = new_manager("memory", uid, {"s": {"after": ["a"], "run": "tests.Skip"}})
    manager.fire("a")
    ThreadingTaskRunner.join_all()
    assert statuses(manager.storage) == {"s#0": "skipped"}
    assert recorder.statuses(uid)[-1] == ("s#0", "running", "skipped")


# -- async methods, in async views ---------------------------------------------------------


def call(method, path, body=None, **extra):
    client = AsyncClient()
    if method == "get":
        response = async_to_sync(client.get)(path, **extra)
    else:
        data = json.dumps(body) if body is not None else ""
        response = async_to_sync(getattr(client, method))(
            path, data=data, content_type="application/json", **extra)
    assert response.status_code == 200, response.content
    return json.loads(response.content)


@pytest.mark.parametrize("kind", ["memory", "django_redis", "db_sqlite", "db_postgres"])
def test_async_views_drive_a_session(kind, uid, recorder, monkeypatch):
    monkeypatch.setattr(urls_async, "storage_kind", kind)
    with override_settings(ROOT_URLCONF="tests.urls_async"):
        config = {"t": {"after": ["a", "b"], "run": "tests.Echo"},
                  "f": {"after": ["go"], "run": "tests.FailUnlessFixed"}}
        assert call("post", f"/configure/{uid}/", config) == {"configured": True}

        answer = call("post", f"/fire/{uid}/a/", {"n": 1})
        assert answer == {"scheduled": [], "unresolved_tasks": ["f", "t"],
                          "unresolved_instances": ["t#0"]}
        answer = call("post", f"/fire/{uid}/b/?key=once", {"n": 2})
        assert answer["scheduled"] == ["t#0"]
        assert call("post", f"/fire/{uid}/b/?key=once", {"n": 2})["scheduled"] == ["t#0"]
        ThreadingTaskRunner.join_all()
        storage = make_storage(kind, uid)
        assert storage["t#0"].metadata["result"] == {"seen": {"a": {"n": 1}, "b": {"n": 2}}}

        call("post", f"/fire/{uid}/go/")
        ThreadingTaskRunner.join_all()
        assert storage["f#0"].status.value == "failed"

        def instance(name, action, body=None):
            return call("post", f"/instance/{uid}/{quote(name)}/{action}/", body)

        replayed = instance("f#0", "replay", {"replacement_kwargs": {"go": {"fixed": True}}})
        assert (replayed["name"], replayed["status"]) == ("f#1", "scheduled")
        ThreadingTaskRunner.join_all()
        assert statuses(storage) == {"t#0": "finished", "f#0": "replayed", "f#1": "finished"}

        assert instance("f#1", "metadata", {"metadata": {"note": "checked"}})["metadata"][
            "note"] == "checked"
        assert instance("f#1", "logs_resolved")["metadata"]["logs_resolved"] is True
        assert instance("f#1", "status", {"status": "failed"})["status"] == "failed"
        skipped = instance("f#1", "skip", {"cascade": True, "result": {"ok": 1}})
        assert skipped["status"] == "skipped"
        answer = call("get", f"/fire/{uid}/c/")
        assert answer["unresolved_tasks"] == [] and answer["unresolved_instances"] == []

    # The signals of the views' steps were sent as for synchronous calls.
    assert [name for name, _, _ in recorder.triggers(uid)] == [
        "a", "b", "t", "go", "f", "f", "c"]
    assert ("f#1", "failed", "skipped") in recorder.statuses(uid)


def test_async_methods_run_in_the_thread_sensitive_thread(uid, recorder):
    """sync_to_async(thread_sensitive=True): under async_to_sync the work runs in the
    calling thread (Django's rule for code that uses database connections)."""
    manager = new_manager("memory", uid)
    scheduled = async_to_sync(manager.afire)("a", {"n": 1})
    assert [instance.name for instance in scheduled] == ["t#0"]
    assert recorder.threads[0] == threading.get_ident()
    ThreadingTaskRunner.join_all()
    tasks = async_to_sync(manager.aget_unresolved_tasks)()
    assert tasks == []
