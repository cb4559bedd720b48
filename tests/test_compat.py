"""The original Triggers 2.0 semantics that its users rely on, on every storage kind."""

import datetime
import decimal
import uuid

import pytest

from tests.helpers import STORAGE_KINDS, make_storage, statuses
from triggers import TriggerManager
from triggers.exceptions import InvalidArgument, LockNotReentrant
from triggers.runners import ThreadingTaskRunner
from triggers.types import TaskConfig, TaskInstance, merge_dict

pytestmark = pytest.mark.usefixtures("trigger_threading_runner")


@pytest.fixture(params=STORAGE_KINDS)
def manager(request, uid):
    return TriggerManager(make_storage(request.param, uid))


def fire_all(manager, *events):
    for event in events:
        name, kwargs = event if isinstance(event, tuple) else (event, None)
        manager.fire(name, kwargs)
        ThreadingTaskRunner.join_all()


# -- withParams -----------------------------------------------------------------


def test_merge_dict_fired_values_win_nested_dicts_merge_lists_replace():
    assert merge_dict({"a": {"x": 1, "l": [1, 2], "d": {"p": 1}}, "b": 2},
                      {"a": {"y": 2, "l": [3], "d": {"q": 2}}}) == {
        "a": {"x": 1, "y": 2, "l": [3], "d": {"p": 1, "q": 2}}, "b": 2}
    # A mapping over a non-mapping (and the reverse) replaces it.
    assert merge_dict({"a": 1}, {"a": {"x": 1}}) == {"a": {"x": 1}}
    assert merge_dict({"a": {"x": 1}}, {"a": 5}) == {"a": 5}


def test_with_params_deep_merged_beneath_fired_kwargs(manager):
    """The original's example: fired values win, nested dicts merge, extras are added."""
    manager.update_configuration({"t_clone": {
        "after": ["_finishStep"], "run": "tests.PassThru",
        "withParams": {"_finishStep": {"name": "observations", "status": "clone"},
                       "extra": {"stuff": "arbitrary"}},
    }})
    fire_all(manager, ("_finishStep", {"name": "Dolly", "greeting": "Hello"}))
    assert manager.storage["t_clone#0"].metadata["result"] == {"kwargs": {
        "_finishStep": {"greeting": "Hello", "name": "Dolly", "status": "clone"},
        "extra": {"stuff": "arbitrary"},
    }}


def test_with_params_merge_under_a_cascade(manager):
    """A cascade's kwargs are merged over withParams the same way."""
    manager.update_configuration({
        "t_alpha": {"after": ["dataReceived"], "run": "tests.Hacked"},
        "t_bravo": {"after": ["t_alpha"], "run": "tests.PassThru",
                    "withParams": {"t_alpha": {"kwargs": {"dataReceived": {}}}}},
    })
    fire_all(manager, "dataReceived")
    assert manager.storage["t_bravo#0"].metadata["result"] == {"kwargs": {
        "t_alpha": {"kwargs": {"dataReceived": {}, "hacked": True}}}}


# -- when instances are created -----------------------------------------------------


def test_and_every_applies_to_the_waiting_instance_first(manager):
    """after=[dataReceived], andEvery=creditsDepleted: dataReceived creates t#0, unstarted."""
    manager.update_configuration({"t": {
        "after": ["dataReceived"], "andEvery": "creditsDepleted", "run": "tests.PassThru"}})
    fire_all(manager, ("dataReceived", {"n": 1}))
    assert statuses(manager.storage) == {"t#0": "unstarted"}
    assert manager.storage["t#0"].kwargs == {"dataReceived": {"n": 1}}
    assert manager.storage["t#0"].missing_triggers == ["creditsDepleted"]

    fire_all(manager, ("creditsDepleted", {"c": 1}))
    assert statuses(manager.storage) == {"t#0": "finished"}
    assert manager.storage["t#0"].metadata["result"]["kwargs"] == {
        "dataReceived": {"n": 1}, "creditsDepleted": {"c": 1}}

    fire_all(manager, ("dataReceived", {"n": 2}), ("creditsDepleted", {"c": 2}),
             ("creditsDepleted", {"c": 3}))
    assert statuses(manager.storage) == {"t#0": "finished", "t#1": "finished",
                                         "t#2": "finished"}
    # Each new instance inherits the latest kwargs of the after triggers.
    assert manager.storage["t#1"].metadata["result"]["kwargs"] == {
        "dataReceived": {"n": 2}, "creditsDepleted": {"c": 2}}
    assert manager.storage["t#2"].metadata["result"]["kwargs"] == {
        "dataReceived": {"n": 2}, "creditsDepleted": {"c": 3}}


def test_and_every_before_after_waits_then_each_runs_once(manager):
    manager.update_configuration({"t": {
        "after": ["dataReceived"], "andEvery": "creditsDepleted", "run": "tests.PassThru"}})
    fire_all(manager, ("creditsDepleted", {"c": 1}), ("creditsDepleted", {"c": 2}))
    assert statuses(manager.storage) == {"t#0": "unstarted", "t#1": "unstarted"}
    fire_all(manager, ("dataReceived", {"n": 1}))
    assert statuses(manager.storage) == {"t#0": "finished", "t#1": "finished"}
    assert [manager.storage[f"t#{n}"].metadata["result"]["kwargs"]["creditsDepleted"]
            for n in range(2)] == [{"c": 1}, {"c": 2}]


def test_a_trigger_reaches_an_instance_once(manager):
    """A second firing of an after trigger does not overwrite what a waiting instance holds."""
    manager.update_configuration({"t": {"after": ["a", "b"], "run": "tests.PassThru"}})
    fire_all(manager, ("a", {"n": 1}), ("a", {"n": 2}))
    assert manager.storage["t#0"].kwargs == {"a": {"n": 1}}
    assert manager.storage.latest_kwargs["a"] == {"n": 2}
    fire_all(manager, ("b", {}))
    assert statuses(manager.storage) == {"t#0": "finished"}


def test_unless_first_creates_the_unstarted_instance_that_records_it(manager):
    manager.update_configuration({"t": {
        "after": ["a"], "unless": ["x", "y"], "run": "tests.PassThru"}})
    fire_all(manager, "x")
    instance = manager.storage["t#0"]
    assert instance.status == TaskInstance.STATUS_UNSTARTED
    assert instance.abandon_state == {"x"}
    assert not instance.can_abandon
    fire_all(manager, "y")
    assert statuses(manager.storage) == {"t#0": "abandoned"}
    # Later triggers create nothing.
    fire_all(manager, "a")
    assert statuses(manager.storage) == {"t#0": "abandoned"}


def test_unless_is_recorded_per_instance(manager):
    """An unless trigger reaches waiting instances; the instance abandons once all reached it."""
    manager.update_configuration({"t": {
        "after": ["a", "b"], "unless": ["x", "y"], "run": "tests.PassThru"}})
    fire_all(manager, "a", "y")
    assert manager.storage["t#0"].abandon_state == {"y"}
    fire_all(manager, "x")
    assert statuses(manager.storage) == {"t#0": "abandoned"}


def test_and_every_after_unless_holds_creates_abandoned_instances(manager):
    manager.update_configuration({"t": {
        "after": ["a"], "andEvery": "page", "unless": ["stop"], "run": "tests.PassThru"}})
    fire_all(manager, "a", "page")
    assert statuses(manager.storage) == {"t#0": "finished"}
    fire_all(manager, "stop")
    fire_all(manager, "page", "page")
    assert statuses(manager.storage) == {"t#0": "finished", "t#1": "abandoned",
                                         "t#2": "abandoned"}


def test_clone_copies_kwargs_and_recorded_unless(manager):
    manager.update_configuration({"t": {
        "after": ["a", "b"], "unless": ["x", "y"], "run": "tests.PassThru"}})
    fire_all(manager, ("a", {"n": 1}), "x")
    clone = manager.storage.clone_instance("t#0")
    assert clone.name == "t#1"
    stored = manager.storage["t#1"]
    assert stored.kwargs == {"a": {"n": 1}}
    assert stored.abandon_state == {"x"}
    assert stored.metadata["parent"] == "t#0"


# -- the original's lock block ----------------------------------------------------------


def test_acquire_lock_yields_the_writable_storage(manager):
    storage = manager.storage
    manager.update_configuration({"t": {"after": ["a", "b"], "run": "tests.PassThru"}})
    fire_all(manager, ("a", {"n": 1}))
    with storage.acquire_lock() as writable_storage:
        assert writable_storage is storage
        created = writable_storage.create_instance(
            task_config=writable_storage.tasks["t"], kwargs={"a": {"n": 9}},
            abandonState=["x"])
        assert created.name == "t#1"
        clone = writable_storage.clone_instance(writable_storage["t#0"])
        assert clone.name == "t#2"
        # Changes made to instances read in the block are saved with it.
        writable_storage["t#0"].metadata["note"] = "by hand"
        writable_storage["t#0"].status = TaskInstance.STATUS_ABANDONED
        # Reads inside the block see the working state.
        assert sorted(writable_storage.instances) == ["t#0", "t#1", "t#2"]
        writable_storage.save()
    assert statuses(storage) == {"t#0": "abandoned", "t#1": "unstarted", "t#2": "unstarted"}
    assert storage["t#0"].metadata["note"] == "by hand"
    assert storage["t#1"].kwargs == {"a": {"n": 9}}
    assert storage["t#1"].abandon_state == {"x"}
    assert storage["t#2"].kwargs == {"a": {"n": 1}}


def test_acquire_lock_block_is_all_or_nothing(manager):
    storage = manager.storage
    manager.update_configuration({"t": {"after": ["a", "b"], "run": "tests.PassThru"}})
    fire_all(manager, "a")
    with pytest.raises(RuntimeError), storage.acquire_lock() as writable_storage:
        writable_storage.clone_instance("t#0")
        writable_storage.save()
        raise RuntimeError("boom")
    assert statuses(storage) == {"t#0": "unstarted"}


def test_manager_calls_inside_the_lock_block_join_it(manager):
    """The original's manager took the lock and called itself; such calls join the block."""
    storage = manager.storage
    manager.update_configuration({"t": {"after": ["a"], "run": "tests.PassThru"}})
    with storage.acquire_lock() as writable_storage:
        manager.update_configuration({"u": {"after": ["a"], "run": "tests.PassThru"}})
        scheduled = manager.fire("a", {"n": 1})
        assert sorted(i.name for i in scheduled) == ["t#0", "u#0"]
        # Nothing is dispatched while the lock is held.
        assert writable_storage["t#0"].status == "scheduled"
    ThreadingTaskRunner.join_all()
    assert statuses(storage) == {"t#0": "finished", "u#0": "finished"}


def test_a_failed_call_inside_the_block_leaves_the_block_unchanged(manager):
    storage = manager.storage
    manager.update_configuration({"t": {"after": ["a", "b"], "run": "tests.PassThru"}})
    with storage.acquire_lock():
        manager.fire("a", {"n": 1})
        with pytest.raises(InvalidArgument):
            storage.create_instance("t", kwargs={"a": {"n": 1}}, bogus=1)
        with pytest.raises(Exception):  # noqa: B017 - any error of the nested step
            manager.replay_failed_instance("t#0")
    assert statuses(storage) == {"t#0": "unstarted"}


def test_acquire_lock_is_not_reentrant_and_save_needs_it(manager):
    storage = manager.storage
    with storage.acquire_lock(), pytest.raises(LockNotReentrant):
        with storage.acquire_lock():
            pass
    with pytest.raises(InvalidArgument, match="acquire_lock"):
        storage.save()


# -- the original's names ----------------------------------------------------------------


def test_original_constants_and_attributes():
    config = TaskConfig("t", after={"b", "a"}, run="tests.PassThru", unless=["z", "y"])
    assert config.after_sorted == ["a", "b"]
    assert config.unless_sorted == ["y", "z"]
    assert config.uses_trigger("a") and config.uses_trigger("y") and not config.uses_trigger("q")
    for status in ("unstarted", "scheduled", "running", "finished", "failed", "abandoned",
                   "replayed", "skipped"):
        assert getattr(TaskInstance, f"STATUS_{status.upper()}") == status
    instance = TaskInstance("t#0", config, metadata={
        TaskInstance.TIMESTAMP_CREATED: 0.0, TaskInstance.TIMESTAMP_LAST_MODIFIED: 60.0})
    assert instance.last_modified.timestamp() == 60.0
    assert instance.created.timestamp() == 0.0
    instance.status = "failed"
    assert instance.status == TaskInstance.STATUS_FAILED and instance.can_replay


# -- values Celery's JSON round-trips ------------------------------------------------


TYPED = {
    "when": datetime.datetime(2026, 12, 2, 9, 30, 15, 123456, tzinfo=datetime.timezone.utc),
    "naive": datetime.datetime(2026, 12, 2, 9, 30),
    "day": datetime.date(2026, 12, 2),
    "at": datetime.time(9, 30, 15),
    "amount": decimal.Decimal("12.50"),
    "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "nested": {"list": [decimal.Decimal("1.1"), datetime.date(2020, 1, 1)]},
}


def test_celery_json_types_round_trip(manager):
    """datetime, date, time, Decimal and UUID in kwargs, results and metadata come back as such."""
    manager.update_configuration({
        "t_types": {"after": ["typed"], "run": "tests.Types"},
        "t_next": {"after": ["t_types"], "run": "tests.PassThru"},
    })
    fire_all(manager, ("typed", TYPED))
    storage = manager.storage
    assert storage.latest_kwargs["typed"] == TYPED
    assert storage["t_types#0"].kwargs["typed"] == TYPED
    result = storage["t_types#0"].metadata["result"]
    assert result["types"] == {"when": "datetime", "naive": "datetime", "day": "date",
                               "at": "time", "amount": "Decimal", "id": "UUID",
                               "nested": "dict"}
    # The cascade carries them on, into the next task.
    assert storage["t_next#0"].metadata["result"]["kwargs"]["t_types"]["values"] == TYPED
    manager.update_instance_metadata("t_next#0", {"checked_at": TYPED["when"],
                                                  "ref": TYPED["id"]})
    meta = storage["t_next#0"].metadata
    assert meta["checked_at"] == TYPED["when"] and meta["ref"] == TYPED["id"]


@pytest.mark.parametrize("bad", [object(), {1, 2}, 1j, float("nan")])
def test_other_values_are_refused_and_nothing_changes(manager, bad):
    from triggers.exceptions import InvalidTrigger

    manager.update_configuration({"t": {"after": ["a", "b"], "run": "tests.PassThru"}})
    fire_all(manager, ("a", {"n": 1}))
    before = manager.storage.debug_repr()
    with pytest.raises(InvalidTrigger, match="JSON"):
        manager.fire("b", {"value": bad})
    with pytest.raises(InvalidArgument, match="JSON"):
        manager.update_instance_metadata("t#0", {"value": bad})
    assert manager.storage.debug_repr() == before


# -- the original's modules and helpers ------------------------------------------------


def test_original_import_paths():
    from triggers.storages import storage_backends as from_package
    from triggers.storages.base import storage_backends

    assert storage_backends is from_package
    assert storage_backends.get("memory", "x").uid == "x"


def test_default_task_runner_may_be_a_runner_class(uid):
    """The original's test helpers patch DEFAULT_TASK_RUNNER with a runner class."""
    from triggers import runners
    from triggers.patcher import AttrPatcher

    manager = TriggerManager(make_storage("django_redis", uid))
    before = runners.DEFAULT_TASK_RUNNER
    with AttrPatcher(runners, DEFAULT_TASK_RUNNER=runners.ThreadingTaskRunner, _forced_runner=None):
        assert runners.default_runner_name() == "threading"
        assert manager.default_task_runner_name == "threading"
    assert runners.DEFAULT_TASK_RUNNER == before


def test_attr_patcher_restores_and_deletes():
    from triggers.patcher import AttrPatcher

    class Target:
        present = 1

    with AttrPatcher(Target, present=2, absent=3):
        assert (Target.present, Target.absent) == (2, 3)
    assert Target.present == 1 and not hasattr(Target, "absent")


def test_original_testing_tasks(uid):
    from triggers.testing import (
        DevNullTask,
        FailingTask,
        PassThruTask,
        SelfRetryingTask,
        SelfSkippingTask,
        name_matches_classpath,
    )

    assert PassThruTask.name == "triggers.testing.PassThruTask"

    @name_matches_classpath
    class Named:
        name = "other"

    assert Named.name == f"{__name__}.Named"
    manager = TriggerManager(make_storage("django_redis", uid))
    manager.update_configuration({
        "t_pass": {"after": ["a"], "run": PassThruTask.name},
        "t_null": {"after": ["a"], "run": DevNullTask.name},
        "t_fail": {"after": ["a"], "run": FailingTask.name},
        "t_skip": {"after": ["a"], "run": SelfSkippingTask.name},
        "t_retry": {"after": ["retries"], "run": SelfRetryingTask.name},
    })
    fire_all(manager, ("a", {"retries": {"max": 2}}), ("retries", {"max": 2}))
    storage = manager.storage
    assert storage["t_pass#0"].metadata["result"] == {"kwargs": {"a": {"retries": {"max": 2}}}}
    assert storage["t_null#0"].metadata["result"] == {}
    assert storage["t_fail#0"].metadata[TaskInstance.META_EXCEPTION_TYPE] == "builtins.RuntimeError"
    assert storage["t_skip#0"].status == "skipped"
    assert storage["t_skip#0"].metadata["kwargs"] == {"a": {"retries": {"max": 2}}}
    assert {n: s for n, s in statuses(storage).items() if n.startswith("t_retry")} == {
        "t_retry#0": "replayed", "t_retry#1": "replayed", "t_retry#2": "finished"}
    assert storage["t_retry#2"].metadata["result"] == {"count": 2}


def test_skip_records_cascade_and_result(uid):
    manager = TriggerManager(make_storage("django_redis", uid))
    manager.update_configuration({"t": {"after": ["a"], "run": "tests.Fail"}})
    fire_all(manager, "a")
    manager.skip_failed_instance("t#0")
    assert manager.storage["t#0"].metadata["cascade"] is False
    assert manager.storage["t#0"].metadata["result"] == {}


def test_update_instance_metadata_bumps_last_modified(uid):
    import time

    manager = TriggerManager(make_storage("django_redis", uid))
    manager.update_configuration({"t": {"after": ["a", "b"], "run": "tests.PassThru"}})
    fire_all(manager, "a")
    before = manager.storage["t#0"].last_modified
    time.sleep(0.01)
    manager.update_instance_metadata("t#0", {"foo": "bar"})
    instance = manager.storage["t#0"]
    assert instance.last_modified > before
    assert instance.created == manager.storage["t#0"].created


def test_invalidate_cache_is_accepted(manager):
    manager.storage.invalidate_cache()


class TestOriginalLockHelpers:
    """triggers.locking's acquire_lock / Lockable, as the original offered them."""

    def test_blocking_lock_serialises_threads(self, uid):
        import threading

        from triggers.locking import acquire_lock

        inside, overlaps = [], []

        def work():
            with acquire_lock(f"k-{uid}", ttl=30):
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(1)
                inside.pop()

        threads = [threading.Thread(target=work) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert overlaps == []

    def test_non_blocking_lock_fails_at_once(self, uid):
        from triggers.locking import LockAcquisitionFailed, acquire_lock

        with acquire_lock(f"k-{uid}", ttl=30), pytest.raises(LockAcquisitionFailed), \
                acquire_lock(f"k-{uid}", ttl=30, block=False):
            pass
        with acquire_lock(f"k-{uid}", ttl=30, block=False):
            pass

    def test_lockable_is_reentrant_per_thread(self, uid):
        from triggers.locking import Lockable, LockAcquisitionFailed

        class Locker(Lockable):
            def get_lock_name(self):
                return f"k-{uid}"

        first, second = Locker(), Locker()
        with first.acquire_lock(block=False):
            with first.acquire_lock(block=False):
                assert first.has_lock
            assert first.has_lock
            with pytest.raises(LockAcquisitionFailed), second.acquire_lock(block=False):
                pass
        assert not first.has_lock

    def test_not_a_redis_cache(self):
        from triggers.locking import NotSupported, acquire_lock

        with pytest.raises(NotSupported, match="Redis"), acquire_lock("k", cache="locmem"):
            pass


# -- run names that no worker knows ------------------------------------------------------


def test_unknown_run_is_refused_with_the_app_loaded(manager):
    from triggers.exceptions import ConfigurationError

    manager.update_configuration({"t": {"after": ["a"], "run": "tests.PassThru"}})
    with pytest.raises(ConfigurationError) as caught:
        manager.update_configuration({"t2": {"after": ["a"], "run": "tests.NoSuchTask"}})
    message = str(caught.value)
    assert "t2" in message and "run" in message and "tests.NoSuchTask" in message
    assert "ALLOW_UNKNOWN_TASKS" in message
    assert list(manager.storage.tasks) == ["t"]


def test_allowed_unknown_run_fails_the_instance_on_the_threading_runner(manager, settings):
    settings.TRIGGERS = {"ALLOW_UNKNOWN_TASKS": True}
    manager.update_configuration({
        "t": {"after": ["a"], "run": "tests.NoSuchTask", "onFailure": ["t_failed"]},
        "t_alert": {"after": ["t_failed"], "run": "tests.PassThru"},
    })
    fire_all(manager, "a")
    instance = manager.storage["t#0"]
    assert instance.status == "failed"
    assert instance.metadata["exc_type"] == "triggers.exceptions.UnknownTask"
    assert "tests.NoSuchTask" in instance.metadata["exc_message"]
    assert "dispatch_error" not in instance.metadata
    # It failed like any failure: onFailure fired, and it can be replayed or skipped.
    assert manager.storage["t_alert#0"].status == "finished"
    assert instance.can_replay


# -- layout ---------------------------------------------------------------------------------


def test_core_imports_nothing_from_contrib_when_django_starts():
    import subprocess
    import sys

    code = ("import django, sys; django.setup(); import triggers.manager, triggers.storages.cache, "
            "triggers.storages.database, triggers.task, triggers.admin; "
            "print(sorted(m for m in sys.modules if m.startswith('triggers.contrib') "
            "or m in ('triggers.flow', 'triggers.demo')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**__import__("os").environ, "DJANGO_SETTINGS_MODULE": "tests.settings"},
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_only_contrib_configures_django_or_migrates():
    from pathlib import Path

    import triggers

    root = Path(triggers.__file__).parent
    offenders = [str(path.relative_to(root)) for path in root.rglob("*.py")
                 if "contrib" not in path.parts and "migrations" not in path.parts
                 and ("settings.configure(" in path.read_text()
                      or 'call_command("migrate"' in path.read_text())]
    assert offenders == []


def test_flow_and_demo_aliases():
    from triggers import flow
    from triggers.contrib import flow as contrib_flow

    assert flow is contrib_flow
    assert flow.Eventor is flow.Flow
    import triggers.demo

    assert callable(triggers.demo.main)
