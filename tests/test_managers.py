"""Custom managers, hooks, registries and the cookbook recipes."""


import pytest
from celery import current_app

from tests.helpers import QUESTIONNAIRE, make_storage
from triggers import CacheStorageBackend, TriggerManager
from triggers.exceptions import DispatchError
from triggers.manager import build_manager, trigger_managers
from triggers.runners import ThreadingTaskRunner, task_runners
from triggers.storages import storage_backends

pytestmark = pytest.mark.usefixtures("trigger_threading_runner")


def test_bundled_registry_keys():
    """The bundled plug-ins are registered under their documented keys."""
    assert trigger_managers.get_class("default") is TriggerManager
    assert storage_backends.get_class("cache") is CacheStorageBackend
    assert {"celery", "threading"} <= set(task_runners.keys())
    assert task_runners.get("threading").name == "threading"


def test_cookbook_get_trigger_manager(uid):
    """The cookbook's get_trigger_manager() works as written, with the registries."""
    TRIGGER_MANAGER_TYPE = "default"  # noqa: N806
    TRIGGER_STORAGE_TYPE = "cache"  # noqa: N806

    def get_trigger_manager(uid):
        # type: (Text) -> TriggerManager
        storage = storage_backends.get(TRIGGER_STORAGE_TYPE, uid)
        manager = trigger_managers.get(TRIGGER_MANAGER_TYPE, storage)
        return manager

    manager = get_trigger_manager(uid)
    assert type(manager) is TriggerManager and type(manager.storage) is CacheStorageBackend
    manager.update_configuration(QUESTIONNAIRE)
    manager.fire("firstPageReceived")
    manager.fire("questionnaireComplete")
    ThreadingTaskRunner.join_all()
    assert get_trigger_manager(uid).storage["t_importSubject#0"].status.value == "finished"


def test_custom_manager_from_an_installed_distribution(uid):
    """A manager registered through a real entry point is found by its key."""
    from triggers_testdist import FinalizingTriggerManager

    manager = trigger_managers.get("cookbook", CacheStorageBackend(uid))
    assert type(manager) is FinalizingTriggerManager
    assert trigger_managers.key_for(FinalizingTriggerManager) == "cookbook"


def test_finalizing_manager_fires_once(uid):
    """The cookbook's FinalizingTriggerManager finalizes a session exactly once."""
    from triggers_testdist import FinalizingTriggerManager

    manager = FinalizingTriggerManager(CacheStorageBackend(uid))
    config = dict(QUESTIONNAIRE)
    config["t_finalize"] = {"after": ["sessionFinalized"], "run": "tests.Echo"}
    manager.update_configuration(config)
    for name, kwargs in [("firstPageReceived", {}), ("pageReceived", {"page": 1}),
                         ("questionnaireComplete", {})]:
        manager.fire(name, kwargs)
    ThreadingTaskRunner.join_all()
    storage = manager.storage
    assert "sessionFinalized" in storage.latest_kwargs
    assert [i.name for i in storage.instances_of_task("t_finalize")] == ["t_finalize#0"]
    assert storage["t_finalize#0"].status.value == "finished"
    # More triggers do not finalize again.
    manager.fire("pageReceived", {"page": 2})
    ThreadingTaskRunner.join_all()
    assert len(storage.instances_of_task("t_finalize")) == 1


def test_worker_rebuilds_the_same_manager_class(uid):
    """Cascades run by worker threads use the manager class that scheduled them (hooks too)."""
    from triggers_testdist import RecordingTriggerManager

    RecordingTriggerManager.calls.clear()
    manager = RecordingTriggerManager(CacheStorageBackend(uid))
    manager.update_configuration({"t1": {"after": ["a"], "run": "tests.Echo"},
                                  "t2": {"after": ["t1"], "run": "tests.Echo"}})
    manager.fire("a", {"x": 1})
    ThreadingTaskRunner.join_all()
    assert RecordingTriggerManager.calls == [
        ("fire", uid, "a", ["t1#0"]),
        ("fire", uid, "t1", ["t2#0"]),
        ("fire", uid, "t2", []),
    ]


def test_hooks_replay_and_skip_arguments_and_order(uid):
    """_post_replay gets the new instance; _post_skip comes after the cascade's _post_fire."""
    from triggers_testdist import RecordingTriggerManager

    RecordingTriggerManager.calls.clear()
    manager = RecordingTriggerManager(CacheStorageBackend(uid))
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Fail"},
                                  "t_next": {"after": ["t"], "run": "tests.Echo"}})
    manager.fire("go")
    ThreadingTaskRunner.join_all()
    new = manager.replay_failed_instance("t#0")
    ThreadingTaskRunner.join_all()
    manager.skip_failed_instance(new, cascade=True, result={"ok": 1})
    ThreadingTaskRunner.join_all()
    calls = RecordingTriggerManager.calls
    assert calls[0] == ("fire", uid, "go", ["t#0"])
    assert calls[1] == ("replay", uid, "t#1", "t#0")
    skip_at = calls.index(("skip", uid, "t#1", True))
    assert ("fire", uid, "t", ["t_next#0"]) in calls[:skip_at]


def test_post_replay_seed_example(uid):
    """The managers guide's _post_replay finds the failed instance through metadata['parent']."""
    found = []

    class CustomManager(TriggerManager):
        def _post_replay(self, task_instance):
            parent_name = task_instance.metadata["parent"]
            parent_instance = self.storage[parent_name]
            found.append((task_instance.name, parent_instance.name,
                          parent_instance.status.value))

    manager = CustomManager(CacheStorageBackend(uid))
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Fail"}})
    manager.fire("go")
    ThreadingTaskRunner.join_all()
    manager.replay_failed_instance("t#0")
    assert found == [("t#1", "t#0", "replayed")]


def test_default_task_runner_name_override(uid):
    """A manager's default_task_runner_name applies to its tasks and cascades."""

    class ThreadedManager(TriggerManager):
        @property
        def default_task_runner_name(self):
            return "threading"

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("triggers.runners.DEFAULT_TASK_RUNNER", "celery")
        manager = ThreadedManager(CacheStorageBackend(uid))
        manager.update_configuration({"t1": {"after": ["a"], "run": "tests.Echo"},
                                      "t2": {"after": ["t1"], "run": "tests.Echo"}})
        manager.fire("a")
        ThreadingTaskRunner.join_all()
    assert manager.storage["t2#0"].status.value == "finished"
    assert manager.storage["t2#0"].metadata["runner"] == "threading"


def test_namespaced_session_uids(uid):
    """A "super session" keyed by applicant combines triggers from two questionnaires."""
    applicant = f"applicant:{uid}"
    flora = TriggerManager(storage=CacheStorageBackend(uid=f"flora-{uid}"))
    flora.update_configuration(QUESTIONNAIRE)
    super_manager = TriggerManager(storage=CacheStorageBackend(uid=applicant))
    super_manager.update_configuration({
        "t_compareResponses": {"after": ["flora_page3", "fauna_page6"], "run": "tests.Echo"},
    })
    for questionnaire, page in [("fauna", 6), ("flora", 3)]:
        TriggerManager(storage=CacheStorageBackend(uid=applicant)).fire(
            trigger_name=f"{questionnaire}_page{page}",
            trigger_kwargs={"responses": {"page": page}},
        )
    ThreadingTaskRunner.join_all()
    result = super_manager.storage["t_compareResponses#0"].metadata["result"]
    assert result == {"seen": {"flora_page3": {"responses": {"page": 3}},
                               "fauna_page6": {"responses": {"page": 6}}}}
    assert len(flora.storage) == 0


def test_getting_started_snippet(uid):
    """The getting-started code (keyword arguments included) works as written."""
    storage_backend = CacheStorageBackend(uid=uid, cache="default", timeout=3600)
    trigger_manager = TriggerManager(storage_backend)
    trigger_manager.update_configuration(QUESTIONNAIRE)
    trigger_manager.fire("firstPageReceived")
    trigger_manager = TriggerManager(storage=CacheStorageBackend(uid=uid, cache="default",
                                                                 timeout=3600))
    trigger_manager.fire(trigger_name="pageReceived", trigger_kwargs={"responses": {"q1": "a"}})
    ThreadingTaskRunner.join_all()
    assert trigger_manager.storage.latest_kwargs["pageReceived"] == {"responses": {"q1": "a"}}


def test_task_message_carries_registry_keys_only(uid):
    """A Celery message names the session, the instance and registry keys (JSON only)."""
    manager = TriggerManager(CacheStorageBackend(uid, cache="builtin_redis", timeout=None))
    manager.update_configuration({"t": {"after": ["a", "b"], "run": "tests.Echo"}})
    manager.fire("a")
    message = manager.build_task_message(manager.storage["t#0"])
    assert message == {"uid": uid, "instance": "t#0", "manager": "default", "storage": "cache",
                       "storage_options": {"cache": "builtin_redis", "timeout": None,
                                           "lock_expire": 30, "lock_timeout": 60}}
    rebuilt = build_manager(message["manager"], message["storage"], uid,
                            message["storage_options"])
    assert rebuilt.storage.cache_alias == "builtin_redis" and rebuilt.storage.timeout is None


def test_unregistered_manager_cannot_use_celery(uid):
    """An unregistered manager class cannot be sent to a worker: a clear error is recorded."""

    class Unregistered(TriggerManager):
        pass

    manager = Unregistered(CacheStorageBackend(uid))
    manager.update_configuration({"t": {"after": ["a"], "run": "tests.Echo", "using": "celery"}})
    with pytest.raises(DispatchError, match="register the manager class"):
        manager.build_task_message(manager.storage.create_instance("t"))
    manager.fire("a")
    instance = manager.storage["t#0"]
    assert instance.status.value == "scheduled"
    assert "register the manager class" in instance.metadata["dispatch_error"]


def test_celery_message_path_in_eager_mode(uid):
    """Through Celery (eager), the task rebuilds manager and storage from the message."""
    from triggers_testdist import RecordingTriggerManager

    RecordingTriggerManager.calls.clear()
    manager = RecordingTriggerManager(make_storage("django_redis", uid))
    manager.update_configuration({"t1": {"after": ["a"], "run": "tests.Echo", "using": "celery"},
                                  "t2": {"after": ["t1"], "run": "tests.Echo", "using": "celery"}})
    current_app.conf.task_always_eager = True
    try:
        manager.fire("a", {"n": 1})
    finally:
        current_app.conf.task_always_eager = False
    assert manager.storage["t2#0"].status.value == "finished"
    assert [call[2] for call in RecordingTriggerManager.calls] == ["t2", "t1", "a"]
