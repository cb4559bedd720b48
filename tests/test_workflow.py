"""Workflows on the threading runner, over every storage kind."""

import itertools

import pytest

from tests.helpers import QUESTIONNAIRE, STORAGE_KINDS, make_storage, statuses
from triggers import TriggerManager
from triggers.exceptions import MaxRetriesExceeded
from triggers.runners import ThreadingTaskRunner

pytestmark = pytest.mark.usefixtures("trigger_threading_runner")


@pytest.fixture(params=STORAGE_KINDS)
def manager(request, uid):
    manager = TriggerManager(make_storage(request.param, uid))
    manager.update_configuration(QUESTIONNAIRE)
    return manager


def fire_all(manager, events):
    for name, kwargs in events:
        manager.fire(name, kwargs)
    ThreadingTaskRunner.join_all()


QUESTIONNAIRE_EVENTS = [
    ("firstPageReceived", {"subject_id": 7, "name": "Ada"}),
    ("pageReceived", {"page": 1, "user_agent": "firefox"}),
    ("pageReceived", {"page": 2, "user_agent": "firefox"}),
    ("questionnaireComplete", {}),
]


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_questionnaire_in_every_order(order, uid):
    """Whatever order the triggers arrive in, each task runs the right number of times."""
    manager = TriggerManager(make_storage("django_redis", uid))
    manager.update_configuration(QUESTIONNAIRE)
    fire_all(manager, [QUESTIONNAIRE_EVENTS[i] for i in order])
    result = statuses(manager.storage)
    assert result == {
        "t_importSubject#0": "finished",
        "t_importResponses#0": "finished",
        "t_importResponses#1": "finished",
        "t_importBrowserMetadata#0": "finished",
    }
    subject = manager.storage["t_importSubject#0"]
    assert subject.metadata["result"] == {"subject_id": 7, "name": "Ada"}
    pages = sorted(manager.storage[f"t_importResponses#{n}"].metadata["result"]["page"]
                   for n in range(2))
    assert pages == [1, 2]
    assert manager.get_unresolved_tasks() == []


def test_questionnaire_on_every_storage(manager):
    """The questionnaire workflow behaves the same on every storage backend."""
    fire_all(manager, QUESTIONNAIRE_EVENTS)
    assert set(statuses(manager.storage).values()) == {"finished"}
    assert len(manager.storage.instances) == 4


def test_and_every_pages_before_and_after_the_cascade(manager):
    """Pages received before and after t_importSubject finished are each imported once."""
    fire_all(manager, [("pageReceived", {"page": n}) for n in range(1, 4)])
    assert [i.status.value for i in manager.storage.instances_of_task("t_importResponses")] == [
        "unstarted"] * 3
    fire_all(manager, [("firstPageReceived", {"subject_id": 3}), ("questionnaireComplete", {})])
    fire_all(manager, [("pageReceived", {"page": n}) for n in range(4, 8)])
    instances = manager.storage.instances_of_task("t_importResponses")
    assert len(instances) == 7
    assert sorted(i.metadata["result"]["page"] for i in instances) == list(range(1, 8))
    assert {i.metadata["result"]["subject_id"] for i in instances} == {3}
    # The one-shot task ran once, for the first page that reached it.
    assert len(manager.storage.instances_of_task("t_importBrowserMetadata")) == 1


def test_and_every_count_is_exact(manager):
    """N firings of the andEvery trigger give exactly N instances, each run once."""
    fire_all(manager, [("firstPageReceived", {}), ("questionnaireComplete", {})])
    fire_all(manager, [("pageReceived", {"page": n}) for n in range(25)])
    instances = manager.storage.instances_of_task("t_importResponses")
    assert [i.name for i in instances] == [f"t_importResponses#{n}" for n in range(25)]
    assert {i.status.value for i in instances} == {"finished"}


def test_unless_before(manager):
    """unless fired first: the task is abandoned and never scheduled."""
    fire_all(manager, [("isEmbeddedApplication", {})] + QUESTIONNAIRE_EVENTS)
    instance = manager.storage["t_importBrowserMetadata#0"]
    assert instance.status.value == "abandoned"
    assert instance.metadata["abandoned_by"] == "isEmbeddedApplication"
    assert len(manager.storage.instances_of_task("t_importBrowserMetadata")) == 1
    assert manager.get_unresolved_tasks() == []


def test_unless_after_an_unstarted_instance(manager):
    """unless fired while the instance waits: the waiting instance is abandoned."""
    fire_all(manager, [("pageReceived", {"page": 1}), ("isEmbeddedApplication", {})])
    fire_all(manager, [("firstPageReceived", {}), ("questionnaireComplete", {})])
    assert manager.storage["t_importBrowserMetadata#0"].status.value == "abandoned"
    assert manager.storage["t_importSubject#0"].status.value == "finished"


def test_unless_after_the_task_ran(manager):
    """unless fired after the task finished changes nothing."""
    fire_all(manager, QUESTIONNAIRE_EVENTS)
    fire_all(manager, [("isEmbeddedApplication", {})])
    assert manager.storage["t_importBrowserMetadata#0"].status.value == "finished"


def test_unless_needs_all_its_triggers(uid):
    """A task is abandoned only once every unless trigger has fired."""
    manager = TriggerManager(make_storage("django_redis", uid))
    manager.update_configuration({"t": {"after": ["a", "b"], "unless": ["x", "y"],
                                        "run": "tests.Echo"}})
    fire_all(manager, [("a", {}), ("x", {})])
    assert manager.storage["t#0"].status.value == "unstarted"
    fire_all(manager, [("y", {}), ("b", {})])
    assert manager.storage["t#0"].status.value == "abandoned"


def test_with_params_are_merged(uid):
    """withParams are deep-merged beneath the fired kwargs: fired values win."""
    manager = TriggerManager(make_storage("django_redis", uid))
    manager.update_configuration({"t_echo": {
        "after": ["a", "b"], "run": "tests.Echo",
        "withParams": {"a": {"extra": 1, "x": "param", "deep": {"p": 1, "both": "param"},
                             "items": [1, 2]},
                       "c": {"only": "param"}},
    }})
    fire_all(manager, [("a", {"x": "fired", "y": 2, "deep": {"f": 2, "both": "fired"},
                              "items": [3]}),
                       ("b", {"z": 3})])
    seen = manager.storage["t_echo#0"].metadata["result"]["seen"]
    assert seen == {"a": {"x": "fired", "y": 2, "extra": 1,
                          "deep": {"p": 1, "f": 2, "both": "fired"}, "items": [3]},
                    "b": {"z": 3}, "c": {"only": "param"}}
    # The stored kwargs are what was fired.
    assert manager.storage["t_echo#0"].kwargs == {
        "a": {"x": "fired", "y": 2, "deep": {"f": 2, "both": "fired"}, "items": [3]},
        "b": {"z": 3}}


def test_extras_are_kept(uid):
    """Unknown directives are kept verbatim in TaskConfig.extras."""
    manager = TriggerManager(make_storage("django_redis", uid))
    manager.update_configuration({"t": {"after": ["a"], "run": "tests.Echo",
                                        "priority": 5, "owner": {"team": "data"}}})
    config = manager.storage.tasks["t"]
    assert config.extras == {"priority": 5, "owner": {"team": "data"}}
    assert config.to_dict()["priority"] == 5


def test_update_configuration_merges_and_does_not_reapply(uid):
    """Tasks of the same name are replaced, others kept; earlier triggers are not re-applied."""
    manager = TriggerManager(make_storage("django_redis", uid))
    manager.update_configuration({"t1": {"after": ["a"], "run": "tests.Echo"},
                                  "t2": {"after": ["b"], "run": "tests.Echo"}})
    fire_all(manager, [("c", {})])
    manager.update_configuration({"t2": {"after": ["c"], "run": "tests.Echo"},
                                  "t3": {"after": ["c"], "run": "tests.Echo"}})
    ThreadingTaskRunner.join_all()
    assert sorted(manager.storage.tasks) == ["t1", "t2", "t3"]
    assert manager.storage.tasks["t2"].after == ["c"]
    assert len(manager.storage) == 0
    fire_all(manager, [("c", {"again": True})])
    assert manager.storage["t3#0"].metadata["result"] == {"seen": {"c": {"again": True}}}


def test_cascade_chain_with_using(uid):
    """Cascades chain tasks; each uses its own runner rules (using)."""
    manager = TriggerManager(make_storage("django_redis", uid))
    manager.update_configuration({
        "t1": {"after": ["start"], "run": "tests.Echo", "using": "threading"},
        "t2": {"after": ["t1"], "run": "tests.Echo", "using": "threading"},
        "t3": {"after": ["t2", "t1"], "run": "tests.Echo"},
    })
    fire_all(manager, [("start", {"n": 1})])
    assert statuses(manager.storage) == {"t1#0": "finished", "t2#0": "finished",
                                         "t3#0": "finished"}
    assert manager.storage["t1#0"].metadata["runner"] == "threading"
    assert manager.storage["t2#0"].kwargs == {"t1": {"seen": {"start": {"n": 1}}}}


def test_failure_is_recorded(manager):
    """A task that raises ends failed with type, message, traceback and context."""
    manager.update_configuration({"t_fail": {"after": ["go"], "run": "tests.Fail"}})
    fire_all(manager, [("go", {})])
    instance = manager.storage["t_fail#0"]
    assert instance.status.value == "failed"
    assert instance.metadata["exc_type"] == "builtins.ValueError"
    assert instance.metadata["exc_message"] == "the subject is invalid"
    assert "Traceback" in instance.metadata["exc_traceback"]
    assert instance.metadata["exc_context"] == {"subject_id": 42}
    assert instance.can_replay and instance.can_skip and not instance.is_resolved
    assert [i.name for i in manager.get_unresolved_instances()] == ["t_fail#0"]


def test_replay_with_original_kwargs(manager):
    """Replaying a failed instance marks it replayed and runs a copy with the same kwargs."""
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.FailUnlessFixed"}})
    fire_all(manager, [("go", {"fixed": False})])
    clone = manager.replay_failed_instance("t#0")
    ThreadingTaskRunner.join_all()
    assert clone.name == "t#1"
    assert manager.storage["t#0"].status.value == "replayed"
    assert manager.storage["t#0"].metadata["replaced_by"] == "t#1"
    replayed = manager.storage["t#1"]
    assert replayed.status.value == "failed"
    assert replayed.metadata["parent"] == "t#0"
    assert replayed.kwargs == {"go": {"fixed": False}}


def test_replay_with_replacement_kwargs(manager):
    """Replacement kwargs replace the original ones (no merge) and the copy succeeds."""
    manager.update_configuration({"t": {"after": ["go", "other"], "run": "tests.FailUnlessFixed"}})
    fire_all(manager, [("go", {"fixed": False, "keep": 1}), ("other", {})])
    manager.replay_failed_instance(manager.storage["t#0"], {"go": {"fixed": True}})
    ThreadingTaskRunner.join_all()
    replayed = manager.storage["t#1"]
    assert replayed.status.value == "finished"
    assert replayed.kwargs == {"go": {"fixed": True}}
    # The cascade of the replayed copy happened.
    assert manager.storage.latest_kwargs["t"] == {"fixed": True}


def test_skip_without_cascade(manager):
    """Skipping a failed instance resolves it without a cascade."""
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Fail"},
                                  "t_next": {"after": ["t"], "run": "tests.Echo"}})
    fire_all(manager, [("go", {})])
    manager.skip_failed_instance("t#0")
    ThreadingTaskRunner.join_all()
    assert manager.storage["t#0"].status.value == "skipped"
    assert "t" not in manager.storage.latest_kwargs
    unresolved = {c.name for c in manager.get_unresolved_tasks()}
    assert "t_next" in unresolved and "t" not in unresolved


def test_skip_with_cascade(manager):
    """Skipping with cascade fires the task's name with the given result."""
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Fail"},
                                  "t_next": {"after": ["t"], "run": "tests.Echo"}})
    fire_all(manager, [("go", {})])
    manager.skip_failed_instance("t#0", cascade=True, result={"fake": True})
    ThreadingTaskRunner.join_all()
    assert manager.storage["t#0"].status.value == "skipped"
    assert manager.storage["t_next#0"].metadata["result"] == {"seen": {"t": {"fake": True}}}


def test_retries_up_to_max(manager):
    """Retries replay the instance with depth + 1 until it succeeds."""
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Retry"}})
    fire_all(manager, [("go", {"succeed_at": 2})])
    assert statuses(manager.storage) == {"t#0": "replayed", "t#1": "replayed", "t#2": "finished"}
    assert manager.storage["t#2"].metadata["result"] == {"retries": 2}
    assert manager.storage["t#2"].metadata["depth"] == 2
    assert manager.storage["t#1"].metadata["parent"] == "t#0"
    assert manager.storage["t#0"].metadata["attempt"] == 0
    assert "RuntimeError: attempt 0" in manager.storage["t#0"].metadata["retry_reason"]


def test_retries_past_max(manager):
    """Past max_retries the instance fails with MaxRetriesExceeded."""
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Retry"}})
    fire_all(manager, [("go", {"succeed_at": 99})])
    assert statuses(manager.storage) == {"t#0": "replayed", "t#1": "replayed", "t#2": "failed"}
    failed = manager.storage["t#2"]
    assert failed.metadata["exc_type"] == "triggers.exceptions.MaxRetriesExceeded"
    assert issubclass(MaxRetriesExceeded, Exception)
    assert "attempt 2" in failed.metadata["exc_message"]


def test_retry_with_replacement_kwargs(manager):
    """A retry may replace the kwargs of the next attempt."""
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.RetryWithReplacement"}})
    fire_all(manager, [("go", {"value": "original"})])
    assert manager.storage["t#1"].metadata["result"] == {"value": "replaced", "depth": 1}


def test_task_skip(manager):
    """raise self.skip(metadata) marks the instance skipped with the metadata merged."""
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Skip"}})
    fire_all(manager, [("go", {})])
    instance = manager.storage["t#0"]
    assert instance.status.value == "skipped"
    assert instance.metadata["reason"] == "nothing to do"


def test_log_level_recorded_and_resolved(manager):
    """The highest level logged is recorded; marking logs resolved clears it for inspection."""
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Logs"}})
    fire_all(manager, [("go", {"level": 30})])
    instance = manager.storage["t#0"]
    assert instance.log_level == 30 and instance.log_level_name == "WARNING"
    assert [i.name for i in manager.storage.get_instances_with_unresolved_logs()] == ["t#0"]
    manager.mark_instance_logs_resolved("t#0")
    assert manager.storage.get_instances_with_unresolved_logs() == []
    assert manager.storage["t#0"].metadata["logs_resolved"] is True


def test_log_level_notset_before_running(manager):
    """An instance that has not run has log level NOTSET."""
    manager.update_configuration({"t": {"after": ["go", "other"], "run": "tests.Logs"}})
    fire_all(manager, [("go", {})])
    assert manager.storage["t#0"].log_level_name == "NOTSET"


def test_update_instance_status_and_metadata(manager):
    """Status and metadata can be changed by hand, with an optional cascade."""
    manager.update_configuration({"t": {"after": ["go", "other"], "run": "tests.Echo"},
                                  "t_next": {"after": ["t"], "run": "tests.Echo"}})
    fire_all(manager, [("go", {})])
    manager.update_instance_metadata("t#0", {"note": "checked"})
    manager.update_instance_status("t#0", "finished", metadata={"by": "hand"}, cascade=True,
                                   cascade_kwargs={"manual": 1})
    ThreadingTaskRunner.join_all()
    instance = manager.storage["t#0"]
    assert instance.status.value == "finished"
    assert instance.metadata["note"] == "checked" and instance.metadata["by"] == "hand"
    assert manager.storage["t_next#0"].metadata["result"] == {"seen": {"t": {"manual": 1}}}


def test_filter_kwargs(uid):
    """TaskContext.filter_kwargs converts valid kwargs and rejects invalid ones."""
    manager = TriggerManager(make_storage("django_redis", uid))
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.FilterKwargs", "x": 1}})
    fire_all(manager, [("go", {"count": "3"})])
    assert manager.storage["t#0"].metadata["result"] == {"count": 3}
    manager.update_configuration({"u": {"after": ["go2"], "run": "tests.FilterKwargs"},
                                  "v": {"after": ["go"], "run": "tests.FilterKwargs"}})
    fire_all(manager, [("go", {"count": "zero"})])
    failed = manager.storage["v#0"]
    assert failed.metadata["exc_type"] == "triggers.exceptions.InvalidTaskKwargs"
    assert "go.count" in failed.metadata["exc_context"]["filter_errors"]


def test_inspection_surface(manager):
    """The storage's inspection surface reads what the workers wrote."""
    fire_all(manager, QUESTIONNAIRE_EVENTS[:2])
    storage = manager.storage
    assert storage.uid
    assert set(storage.tasks) == set(QUESTIONNAIRE)
    assert storage.latest_kwargs["pageReceived"] == {"page": 1, "user_agent": "firefox"}
    assert "t_importSubject#0" in storage
    assert [i.name for i in storage] == list(storage.instances)
    assert [i.name for i in storage.instances_of_task(storage.tasks["t_importResponses"])] == [
        "t_importResponses#0"]
    assert sorted(c.name for c in storage.get_unresolved_tasks()) == sorted(QUESTIONNAIRE)
    debug = storage.debug_repr()
    assert debug["uid"] == storage.uid and "t_importSubject#0" in debug["instances"]
    created = storage.create_instance(storage.tasks["t_importSubject"], metadata={"by": "hand"})
    assert created.name == "t_importSubject#1" and storage[created.name].metadata["by"] == "hand"
    clone = storage.clone_instance("t_importResponses#0")
    assert clone.name == "t_importResponses#1" and clone.metadata["parent"] == "t_importResponses#0"


def test_retry_accepts_celerys_argument_names(manager):
    """``raise self.retry(exc=..., countdown=..., max_retries=...)`` as in Celery."""
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.RetryCeleryStyle"}})
    fire_all(manager, [("go", {"countdown": 0, "max_retries": 2})])
    assert statuses(manager.storage) == {"t#0": "replayed", "t#1": "replayed", "t#2": "failed"}
    failed = manager.storage["t#2"].metadata
    assert failed["exc_type"].endswith("MaxRetriesExceeded")
    assert "max_retries is 2" in failed["exc_message"]
    assert "ValueError: flaky" in failed["exc_message"]


def test_retry_refuses_a_countdown_that_contradicts_the_cooldown(manager):
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.RetryCeleryStyle"}})
    fire_all(manager, [("go", {"countdown": 1, "cooldown": 2})])
    assert statuses(manager.storage) == {"t#0": "failed"}
    assert "pass one" in manager.storage["t#0"].metadata["exc_message"]
