"""Edge cases: bad metadata from tasks, foreign Redis values, fire_once, long delays, flows."""

import json
import threading
import time

import pytest

from tests.helpers import make_storage
from triggers import CacheStorageBackend, TriggerManager
from triggers.exceptions import CorruptSessionState, InvalidArgument
from triggers.manager import FinalizingTriggerManager
from triggers.runners import ThreadingTaskRunner
from triggers.task import TriggerTask

pytestmark = pytest.mark.usefixtures("trigger_threading_runner")


class BadRetryMetadata(TriggerTask):
    name = "tests.BadRetryMetadata"

    def _run(self, context):
        raise self.retry(metadata={"when": object()})


class NanContext(TriggerTask):
    name = "tests.NanContext"

    def _run(self, context):
        from triggers.exceptions import with_context

        raise with_context(ValueError("nan inside"), {"ratio": float("nan"), "ok": 1})


def test_bad_task_metadata_and_nan_context_end_failed(uid):
    """Unstorable retry metadata or a NaN exception context never leave an instance running."""
    manager = TriggerManager(CacheStorageBackend(uid))
    manager.update_configuration({"a": {"after": ["go"], "run": "tests.BadRetryMetadata"},
                                  "b": {"after": ["go"], "run": "tests.NanContext"}})
    manager.fire("go")
    ThreadingTaskRunner.join_all()
    first, second = manager.storage["a#0"], manager.storage["b#0"]
    assert first.status.value == "failed"
    assert "JSON-serialisable" in first.metadata["exc_message"]
    assert second.status.value == "failed"
    assert second.metadata["exc_context"] == {"ratio": "nan", "ok": "1"}


@pytest.mark.parametrize("key", ["start_after", "log_level", "run", "depth"])
def test_reserved_metadata_is_refused(uid, key):
    """Public calls cannot overwrite the metadata keys the engine relies on."""
    manager = TriggerManager(CacheStorageBackend(uid))
    manager.update_configuration({"t": {"after": ["a", "b"], "run": "tests.Echo"}})
    manager.fire("a")
    before = manager.storage.debug_repr()
    with pytest.raises(InvalidArgument, match=f"may not set {key}"):
        manager.update_instance_metadata("t#0", {key: "x"})
    with pytest.raises(InvalidArgument, match=f"may not set {key}"):
        manager.update_instance_status("t#0", "failed", metadata={key: "x"})
    assert manager.storage.debug_repr() == before


@pytest.mark.parametrize("which", ["s", "w:t", "d"])
def test_foreign_redis_types_are_corrupt_not_overwritten(uid, which):
    """A string where a session's hash belongs is reported, never overwritten."""
    storage = CacheStorageBackend(uid)
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["a", "b"], "run": "tests.Echo"}})
    client = storage.engine.client
    key = storage.engine.key(which)
    client.delete(key)
    client.set(key, "not a hash")
    with pytest.MonkeyPatch.context() as patch, pytest.raises(CorruptSessionState, match=uid):
        patch.setattr("triggers.runners.ThreadingTaskRunner.run", lambda self, m, i: None)
        manager.fire("a")
        manager.fire("b")
        storage.debug_repr()
    assert client.get(key) == b"not a hash"


@pytest.mark.parametrize("kind", ["django_redis", "db_sqlite"])
def test_fire_once_fires_once_under_concurrency(kind, uid):
    """fire_once() from many threads at once fires the trigger exactly once."""
    manager = TriggerManager(make_storage(kind, uid))
    manager.update_configuration({"t": {"after": ["x"], "andEvery": "done", "run": "tests.Echo"}})
    barrier = threading.Barrier(6)
    results = []

    def worker():
        from django.db import connections

        try:
            own = TriggerManager(make_storage(kind, uid))
            barrier.wait()
            results.append(own.fire_once("done", {"by": threading.get_ident()}))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(result is not None for result in results) == 1
    assert len(manager.storage.instances_of_task("t")) == 1


def test_finalizing_manager_uses_nested_after(uid):
    """FinalizingTriggerManager ignores tasks waiting for sessionFinalized inside an OR."""
    manager = FinalizingTriggerManager(CacheStorageBackend(uid))
    manager.update_configuration({
        "t": {"after": ["go"], "run": "tests.Echo"},
        "t_end": {"after": [{"any": ["sessionFinalized", "never"]}], "run": "tests.Echo"},
    })
    manager.fire("go")
    ThreadingTaskRunner.join_all()
    assert manager.storage["t_end#0"].status.value == "finished"


def test_long_delay_outlives_the_cache_timeout(uid):
    """Keys of a session with a pending delay live until the delay is over (open work)."""
    storage = CacheStorageBackend(uid, timeout=60)
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Echo", "delay": 3600}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("triggers.runners.ThreadingTaskRunner.run", lambda self, m, i: None)
        manager.fire("go")
    assert storage.engine.client.ttl(storage.engine.key("s")) == -1
    assert storage.engine.client.ttl(storage.engine.key("l:t")) == -1


def test_recovery_clears_a_past_start_after(uid):
    """A recovered delayed instance is not taken as stuck again right away."""
    manager = TriggerManager(CacheStorageBackend(uid))
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Echo", "delay": 0.2}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("triggers.runners.ThreadingTaskRunner.run", lambda self, m, i: None)
        manager.fire("go")
        time.sleep(0.3)
        assert [i.name for i in manager.recover(older_than=0.1)] == ["t#0"]
        assert manager.storage["t#0"].start_after is None
        assert manager.recover(older_than=0.1) == []


def test_celery_runner_refuses_unknown_tasks(uid):
    """A configuration may only run registered TriggerTasks; an unknown name is refused."""
    from triggers.exceptions import ConfigurationError

    manager = TriggerManager(CacheStorageBackend(uid))
    with pytest.raises(ConfigurationError, match=r"t.*run.*tests\.nothing_here"):
        manager.update_configuration({"t": {"after": ["go"], "run": "tests.nothing_here",
                                            "using": "celery"}})
    assert manager.storage.tasks == {}


def test_flow_restart_is_a_new_run_and_names_are_checked():
    """Restarting a flow on the same store runs it again; ':' in a name is refused."""
    import uuid

    from triggers import flow as evr

    name = f"restart-{uuid.uuid4().hex[:6]}"
    calls = []

    def build():
        ev = evr.Flow(name=name, store=":memory:")
        go = ev.add_event("go")
        ev.add_assoc(go, ev.add_step("s", lambda: calls.append(1)))
        ev.trigger_event(go, 1)
        return ev

    assert build()() and build()()
    assert calls == [1, 1]
    with pytest.raises(InvalidArgument, match="may not contain ':'"):
        evr.Flow(name="a:b", store=":memory:")
    assert json.dumps(calls)
