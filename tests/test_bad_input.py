"""Bad input of every kind gets a clear exception and leaves the stored state unchanged.

Each test stores some state, records ``storage.debug_repr()`` (or the raw stored
value, when the stored value itself is the bad input), feeds bad input to a
public call, checks the exception type and that its message names what was
wrong, then checks that the stored state did not change.
"""

import json
import pickle
import re
from collections import Counter

import pytest
from class_registry import RegistryKeyError

import triggers.exceptions as exceptions_module
from triggers import runners
from triggers.exceptions import (
    ConfigurationError,
    CorruptSessionState,
    InstanceNotFound,
    InvalidArgument,
    InvalidInstanceStatus,
    InvalidTaskKwargs,
    InvalidTaskResult,
    InvalidTrigger,
    StorageError,
    TriggersError,
    UnknownRegistryKey,
    with_context,
)
from triggers.manager import TriggerManager, build_manager, trigger_managers
from triggers.runners import ThreadingTaskRunner, task_runners
from triggers.storages import storage_backends
from triggers.storages.cache import CacheStorageBackend
from triggers.task import TaskContext
from triggers.types import TaskConfig, TaskInstance

ECHO = "tests.Echo"

#: A valid configuration stored before each bad call, so "unchanged" means something.
BASE_CONFIGURATION = {
    "t_wait": {"after": ["a", "b"], "run": ECHO},
    "t_every": {"after": [], "andEvery": "page", "run": ECHO},
}


def _problem_keys(error):
    return Counter((p.task_name, p.directive) for p in error.problems)


@pytest.fixture
def storage(uid):
    """A django-redis cache storage for a fresh session."""
    return CacheStorageBackend(uid)


@pytest.fixture
def seeded(storage, trigger_threading_runner):
    """A session with a stored configuration, latest kwargs and an unstarted instance."""
    manager = TriggerManager(storage)
    manager.update_configuration(BASE_CONFIGURATION)
    manager.fire("a", {"x": 1})
    assert storage["t_wait#0"].status == "unstarted"
    return manager


@pytest.fixture
def ran(storage, trigger_threading_runner):
    """A session with one failed (t_fail#0) and one finished (t_done#0) instance."""
    manager = TriggerManager(storage)
    manager.update_configuration({
        "t_fail": {"after": ["go"], "run": "tests.Fail"},
        "t_done": {"after": ["go"], "run": ECHO},
        "t_wait": {"after": ["a", "b"], "run": ECHO},
    })
    manager.fire("go", {"n": 1})
    manager.fire("a")
    ThreadingTaskRunner.join_all()
    assert storage["t_fail#0"].status == "failed"
    assert storage["t_done#0"].status == "finished"
    assert storage["t_wait#0"].status == "unstarted"
    return manager


@pytest.fixture
def no_dispatch(monkeypatch):
    """Records every runner look-up; a test asserts that nothing was dispatched."""
    calls = []

    def get_runner(name):
        calls.append(name)
        raise AssertionError(f"nothing may be dispatched, but runner {name!r} was asked for")

    monkeypatch.setattr(runners, "get_runner", get_runner)
    return calls


# ---------------------------------------------------------------------------
# update_configuration
# ---------------------------------------------------------------------------

VALID = {"after": ["go"], "run": ECHO}

CONFIG_CASES = [
    # (configuration, task_name, directive, message regex)
    pytest.param(["t_a"], None, None, r"configuration must be a mapping.*got list",
                 id="not-a-mapping-list"),
    pytest.param("t_a", None, None, r"configuration must be a mapping.*got str",
                 id="not-a-mapping-str"),
    pytest.param(None, None, None, r"configuration must be a mapping.*got NoneType",
                 id="not-a-mapping-none"),
    pytest.param({"": VALID}, None, None, r"task name must be a non-empty string.*str ''",
                 id="task-name-empty"),
    pytest.param({"   ": VALID}, None, None, r"task name must be a non-empty string",
                 id="task-name-blank"),
    pytest.param({42: VALID}, None, None, r"task name must be a non-empty string.*int 42",
                 id="task-name-int"),
    pytest.param({None: VALID}, None, None, r"task name must be a non-empty string.*NoneType",
                 id="task-name-none"),
    pytest.param({"t#a": VALID}, "t#a", None, r"task 't#a'.*must not contain '#'",
                 id="task-name-hash"),
    pytest.param({"t_a": ["go"]}, "t_a", None,
                 r"task 't_a'.*expected a mapping of directives.*list", id="entry-list"),
    pytest.param({"t_a": "tests.Echo"}, "t_a", None, r"expected a mapping of directives.*str",
                 id="entry-str"),
    pytest.param({"t_a": None}, "t_a", None, r"expected a mapping of directives.*NoneType",
                 id="entry-none"),
    pytest.param({"t_a": {"run": ECHO}}, "t_a", "after",
                 r"task 't_a', directive 'after': required directive is missing",
                 id="after-missing"),
    pytest.param({"t_a": {"after": ["go"]}}, "t_a", "run",
                 r"task 't_a', directive 'run': required directive is missing",
                 id="run-missing"),
    pytest.param({"t_a": {"after": "go", "run": ECHO}}, "t_a", "after",
                 r"directive 'after': expected a list of trigger names, got str 'go'",
                 id="after-string"),
    pytest.param({"t_a": {"after": {"go": 1}, "run": ECHO}}, "t_a", "after",
                 r"directive 'after': expected a list of trigger names, got dict",
                 id="after-dict"),
    pytest.param({"t_a": {"after": ["go", 3], "run": ECHO}}, "t_a", "after",
                 r"directive 'after': a trigger name must be a string, got int 3",
                 id="after-non-string-item"),
    pytest.param({"t_a": {"after": ["go", ""], "run": ECHO}}, "t_a", "after",
                 r"directive 'after': a trigger name must not be empty",
                 id="after-empty-item"),
    pytest.param({"t_a": {"after": [], "run": ECHO}}, "t_a", "after",
                 r"directive 'after': expected at least one trigger name",
                 id="after-empty-without-andEvery"),
    pytest.param({"t_a": {"after": ["go"], "run": ""}}, "t_a", "run",
                 r"directive 'run': expected the name of a Celery task, got str ''",
                 id="run-empty"),
    pytest.param({"t_a": {"after": ["go"], "run": 42}}, "t_a", "run",
                 r"directive 'run': expected the name of a Celery task, got int 42",
                 id="run-int"),
    pytest.param({"t_a": {"after": ["go"], "run": None}}, "t_a", "run",
                 r"directive 'run': expected the name of a Celery task, got NoneType",
                 id="run-none"),
    pytest.param({"t_a": {"after": ["go"], "run": "tests.plain_celery_task"}}, "t_a", "run",
                 r"directive 'run': Celery task 'tests.plain_celery_task' is a .*not a TriggerTask",
                 id="run-plain-celery-task"),
    pytest.param({"t_a": {"after": [], "andEvery": ["page"], "run": ECHO}}, "t_a", "andEvery",
                 r"directive 'andEvery': expected ONE trigger name.*must be a string, got list",
                 id="andEvery-list"),
    pytest.param({"t_a": {"after": ["go"], "andEvery": 5, "run": ECHO}}, "t_a", "andEvery",
                 r"directive 'andEvery': expected ONE trigger name.*got int 5",
                 id="andEvery-int"),
    pytest.param({"t_a": {"after": ["go"], "unless": "stop", "run": ECHO}}, "t_a", "unless",
                 r"directive 'unless': expected a list of trigger names, got str 'stop'",
                 id="unless-string"),
    pytest.param({"t_a": {"after": ["go"], "unless": 1, "run": ECHO}}, "t_a", "unless",
                 r"directive 'unless': expected a list of trigger names, got int 1",
                 id="unless-int"),
    pytest.param({"t_a": {"after": ["go"], "unless": ["stop", None], "run": ECHO}}, "t_a",
                 "unless", r"directive 'unless': a trigger name must be a string, got NoneType",
                 id="unless-non-string-item"),
    pytest.param({"t_a": {"after": ["go"], "withParams": ["x"], "run": ECHO}}, "t_a",
                 "withParams",
                 r"directive 'withParams': expected a mapping of trigger name to kwargs, got list",
                 id="withParams-list"),
    pytest.param({"t_a": {"after": ["go"], "withParams": {"go": "x"}, "run": ECHO}}, "t_a",
                 "withParams",
                 r"directive 'withParams': value for 'go' must be a mapping of kwargs, got str",
                 id="withParams-value-not-dict"),
    pytest.param({"t_a": {"after": ["go"], "withParams": {"go": [1]}, "run": ECHO}}, "t_a",
                 "withParams", r"value for 'go' must be a mapping of kwargs, got list",
                 id="withParams-value-list"),
    pytest.param({"t_a": {"after": ["go"], "withParams": {"go": {1: "x"}}, "run": ECHO}}, "t_a",
                 "withParams", r"kwarg names for 'go' must be strings",
                 id="withParams-kwarg-name-int"),
    pytest.param({"t_a": {"after": ["go"], "using": "nope", "run": ECHO}}, "t_a", "using",
                 r"directive 'using': unknown runner 'nope'; available: .*celery.*threading",
                 id="using-unknown"),
    pytest.param({"t_a": {"after": ["go"], "using": 5, "run": ECHO}}, "t_a", "using",
                 r"directive 'using': unknown runner 5; available: .*celery.*threading",
                 id="using-int"),
    pytest.param({"t_a": {"after": ["go"], "run": ECHO, "extra": object()}}, "t_a", None,
                 r"task 't_a': the entry must be JSON-serialisable",
                 id="entry-not-json-object"),
    pytest.param({"t_a": {"after": ["go"], "run": ECHO, "extra": float("nan")}}, "t_a", None,
                 r"task 't_a': the entry must be JSON-serialisable",
                 id="entry-not-json-nan"),
    pytest.param({"t_a": {"after": ["go"], "run": ECHO, "withParams": {"go": {"x": {1, 2}}}}},
                 "t_a", None, r"task 't_a': the entry must be JSON-serialisable",
                 id="entry-not-json-set-in-withParams"),
]


@pytest.mark.parametrize("configuration, task_name, directive, message", CONFIG_CASES)
def test_update_configuration_rejects_bad_entry(seeded, storage, configuration, task_name,
                                                directive, message):
    """A bad configuration raises ConfigurationError naming task and directive; stores nothing."""
    before = storage.debug_repr()
    with pytest.raises(ConfigurationError, match=message) as info:
        seeded.update_configuration(configuration)
    error = info.value
    assert isinstance(error, ValueError)
    assert error.session_uid == storage.uid
    assert storage.uid in str(error)
    assert "nothing was stored" in str(error)
    assert len(error.problems) == 1, error.problems
    assert (error.problems[0].task_name, error.problems[0].directive) == (task_name, directive)
    assert storage.debug_repr() == before


def test_update_configuration_reports_all_problems_at_once(seeded, storage):
    """Several problems in one configuration are all reported in one ConfigurationError."""
    before = storage.debug_repr()
    configuration = {
        "t_ok": {"after": ["go"], "run": ECHO},
        "t_a": {"after": "go", "run": ""},
        "t_b": {"run": ECHO, "withParams": {"go": 1}, "using": "nope"},
        "t#c": {"after": ["go"], "run": ECHO},
        42: {"after": ["go"], "run": ECHO},
        "t_d": "not a mapping",
        "t_e": {"after": ["go"], "run": "tests.plain_celery_task", "andEvery": 7,
                "unless": "stop"},
    }
    with pytest.raises(ConfigurationError, match=r"\(11 problems\); nothing was stored") as info:
        seeded.update_configuration(configuration)
    assert _problem_keys(info.value) == Counter({
        ("t_a", "after"): 1,
        ("t_a", "run"): 1,
        ("t_b", "after"): 1,
        ("t_b", "withParams"): 1,
        ("t_b", "using"): 1,
        ("t#c", None): 1,
        (None, None): 1,
        ("t_d", None): 1,
        ("t_e", "andEvery"): 1,
        ("t_e", "run"): 1,
        ("t_e", "unless"): 1,
    })
    text = str(info.value)
    for fragment in ("task 't_a', directive 'after'", "task 't_a', directive 'run'",
                     "task 't_b', directive 'after'", "task 't_b', directive 'withParams'",
                     "task 't_b', directive 'using'", "task 't#c'", "int 42", "task 't_d'",
                     "task 't_e', directive 'andEvery'", "task 't_e', directive 'run'",
                     "task 't_e', directive 'unless'"):
        assert fragment in text
    # The valid task of the failed configuration was not stored either.
    assert "t_ok" not in storage.tasks
    assert storage.debug_repr() == before


def test_failed_update_keeps_previous_configuration(seeded, storage):
    """A failing update neither replaces nor adds tasks: the stored configuration is unchanged."""
    before = storage.debug_repr()
    tasks_before = storage.tasks
    with pytest.raises(ConfigurationError, match=r"task 't_new', directive 'after'"):
        seeded.update_configuration({
            "t_wait": {"after": ["other"], "run": ECHO},  # valid replacement of a stored task
            "t_new": {"after": "x", "run": ECHO},
        })
    assert storage.tasks == tasks_before
    assert storage.tasks["t_wait"].after == ["a", "b"]
    assert "t_new" not in storage.tasks
    assert storage.debug_repr() == before
    # The session still works as configured.
    seeded.fire("b")
    ThreadingTaskRunner.join_all()
    assert storage["t_wait#0"].status == "finished"


def test_update_configuration_on_empty_session_stores_nothing(storage):
    """A failing first configuration leaves a brand-new session empty."""
    manager = TriggerManager(storage)
    before = storage.debug_repr()
    with pytest.raises(ConfigurationError, match=r"directive 'run': required directive"):
        manager.update_configuration({"t_a": {"after": ["go"]}})
    assert storage.debug_repr() == before
    assert storage.tasks == {}


# ---------------------------------------------------------------------------
# fire
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("trigger_name, message", [
    pytest.param(42, r"a trigger name must be a string, got int 42", id="int"),
    pytest.param(None, r"a trigger name must be a string, got NoneType", id="none"),
    pytest.param(b"b", r"a trigger name must be a string, got bytes", id="bytes"),
    pytest.param(["b"], r"a trigger name must be a string, got list", id="list"),
    pytest.param("", r"a trigger name must not be empty", id="empty"),
    pytest.param("   ", r"a trigger name must not be empty", id="blank"),
])
def test_fire_rejects_bad_trigger_name(seeded, storage, no_dispatch, trigger_name, message):
    """fire() with a trigger name that is not a non-empty string raises InvalidTrigger."""
    before = storage.debug_repr()
    with pytest.raises(InvalidTrigger, match=message) as info:
        seeded.fire(trigger_name)
    assert storage.uid in str(info.value)
    assert isinstance(info.value, ValueError)
    assert storage.debug_repr() == before
    assert no_dispatch == []


@pytest.mark.parametrize("trigger_kwargs, message", [
    pytest.param(["x"], r"trigger_kwargs of 'b' must be a mapping.*got list", id="list"),
    pytest.param("x=1", r"trigger_kwargs of 'b' must be a mapping.*got str", id="str"),
    pytest.param(5, r"trigger_kwargs of 'b' must be a mapping.*got int", id="int"),
    pytest.param({1: "x"}, r"trigger_kwargs of 'b' must have string keys, got \[1\]",
                 id="int-key"),
    pytest.param({("a",): "x", "ok": 1}, r"must have string keys, got \[\('a',\)\]",
                 id="tuple-key"),
    pytest.param({"x": object()}, r"trigger_kwargs of 'b' must be JSON-serialisable",
                 id="object-value"),
    pytest.param({"x": {1, 2}}, r"trigger_kwargs of 'b' must be JSON-serialisable",
                 id="set-value"),
    pytest.param({"x": float("nan")}, r"trigger_kwargs of 'b' must be JSON-serialisable",
                 id="nan-value"),
    pytest.param({"x": {"deep": [object()]}}, r"trigger_kwargs of 'b' must be JSON-serialisable",
                 id="nested-object"),
])
def test_fire_rejects_bad_kwargs(seeded, storage, no_dispatch, trigger_kwargs, message):
    """fire() with kwargs that are not a JSON mapping with string keys raises InvalidTrigger."""
    before = storage.debug_repr()
    with pytest.raises(InvalidTrigger, match=message):
        # 'b' completes t_wait#0: if accepted, it would be scheduled and dispatched.
        seeded.fire("b", trigger_kwargs)
    assert storage.debug_repr() == before
    assert storage["t_wait#0"].status == "unstarted"
    assert no_dispatch == []


# ---------------------------------------------------------------------------
# replay_failed_instance / skip_failed_instance
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["replay", "skip"])
@pytest.mark.parametrize("name, status", [("t_wait#0", "unstarted"), ("t_done#0", "finished")])
def test_replay_or_skip_of_instance_that_is_not_failed(ran, storage, no_dispatch, action, name,
                                                       status):
    """Replaying or skipping an instance that is not failed raises InvalidInstanceStatus."""
    before = storage.debug_repr()
    verb = "replayed" if action == "replay" else "skipped"
    call = ran.replay_failed_instance if action == "replay" else ran.skip_failed_instance
    with pytest.raises(InvalidInstanceStatus,
                       match=rf"Cannot mark {re.escape(name)} of session '{storage.uid}' {verb}: "
                             rf"it is {status}; only failed instances") as info:
        call(name)
    assert info.value.instance_name == name
    assert info.value.status == status
    assert info.value.session_uid == storage.uid
    assert storage.debug_repr() == before
    assert no_dispatch == []


@pytest.mark.parametrize("action", ["replay", "skip"])
def test_replay_or_skip_of_instance_object_that_is_not_failed(ran, storage, action):
    """Passing the instance object (not its name) is checked the same way."""
    before = storage.debug_repr()
    instance = storage["t_done#0"]
    call = ran.replay_failed_instance if action == "replay" else ran.skip_failed_instance
    with pytest.raises(InvalidInstanceStatus, match=r"t_done#0 .* it is finished"):
        call(instance)
    assert storage.debug_repr() == before


def test_skip_with_cascade_of_unfailed_instance_fires_nothing(ran, storage, no_dispatch):
    """A refused skip with cascade=True does not fire the cascade."""
    before = storage.debug_repr()
    with pytest.raises(InvalidInstanceStatus, match=r"t_wait#0 .*it is unstarted"):
        ran.skip_failed_instance("t_wait#0", cascade=True, result={"x": 1})
    assert "t_wait" not in storage.latest_kwargs
    assert storage.debug_repr() == before
    assert no_dispatch == []


@pytest.mark.parametrize("action", ["replay", "skip"])
@pytest.mark.parametrize("name", ["t_fail#7", "t_nope#0", "t_fail"])
def test_replay_or_skip_of_missing_instance(ran, storage, action, name):
    """Replaying or skipping an instance the session does not hold raises InstanceNotFound."""
    before = storage.debug_repr()
    call = ran.replay_failed_instance if action == "replay" else ran.skip_failed_instance
    with pytest.raises(InstanceNotFound,
                       match=rf"Session '{storage.uid}' has no task instance "
                             rf"'{re.escape(name)}'") as info:
        call(name)
    assert isinstance(info.value, KeyError)
    assert info.value.instance_name == name
    assert storage.debug_repr() == before


@pytest.mark.parametrize("action", ["replay", "skip"])
@pytest.mark.parametrize("bad", [42, None, "", ["t_fail#0"]])
def test_replay_or_skip_with_bad_instance_argument(ran, storage, action, bad):
    """An instance argument that is neither a TaskInstance nor a name raises InvalidArgument."""
    before = storage.debug_repr()
    call = ran.replay_failed_instance if action == "replay" else ran.skip_failed_instance
    with pytest.raises(InvalidArgument, match=r"Expected a task instance or its name, got"):
        call(bad)
    assert storage.debug_repr() == before


@pytest.mark.parametrize("replacement, message", [
    pytest.param(["go"], r"replacement_kwargs must map trigger names to kwargs, got list",
                 id="list"),
    pytest.param("go", r"replacement_kwargs must map trigger names to kwargs, got str",
                 id="str"),
    pytest.param({"go": "x"}, r"replacement_kwargs\['go'\] must be a mapping", id="value-str"),
    pytest.param({"go": [1]}, r"replacement_kwargs\['go'\] must be a mapping", id="value-list"),
    pytest.param({"go": {1: "x"}}, r"replacement_kwargs\['go'\] must have string keys",
                 id="kwarg-int-key"),
    pytest.param({"go": {"x": object()}},
                 r"replacement_kwargs\['go'\] must be JSON-serialisable", id="not-json"),
    pytest.param({1: {"x": 1}}, r"replacement_kwargs.*1", id="trigger-name-int"),
])
def test_replay_with_bad_replacement_kwargs(ran, storage, no_dispatch, replacement, message):
    """Replacement kwargs that are not trigger name -> JSON kwargs raise InvalidArgument."""
    before = storage.debug_repr()
    with pytest.raises(InvalidArgument, match=message):
        ran.replay_failed_instance("t_fail#0", replacement_kwargs=replacement)
    assert storage["t_fail#0"].status == "failed"
    assert storage.debug_repr() == before
    assert no_dispatch == []


@pytest.mark.parametrize("result, message", [
    pytest.param(["x"], r"result must be a mapping \(or None\), got list", id="list"),
    pytest.param({1: 2}, r"result must have string keys", id="int-key"),
    pytest.param({"x": object()}, r"result must be JSON-serialisable", id="not-json"),
])
def test_skip_with_bad_result(ran, storage, no_dispatch, result, message):
    """A skip result that is not a JSON mapping raises InvalidArgument; nothing cascades."""
    before = storage.debug_repr()
    with pytest.raises(InvalidArgument, match=message):
        ran.skip_failed_instance("t_fail#0", cascade=True, result=result)
    assert storage["t_fail#0"].status == "failed"
    assert storage.debug_repr() == before
    assert no_dispatch == []


# ---------------------------------------------------------------------------
# update_instance_status / update_instance_metadata / mark_instance_logs_resolved
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["bogus", "", "FINISHED", 3, None])
def test_update_instance_status_with_unknown_status(seeded, storage, status):
    """An unknown status raises InvalidArgument listing every status."""
    before = storage.debug_repr()
    with pytest.raises(InvalidArgument,
                       match=rf"Unknown status {re.escape(repr(status))}; statuses: unstarted, "
                             r"scheduled, running, finished, failed, abandoned, replayed, "
                             r"skipped"):
        seeded.update_instance_status("t_wait#0", status)
    assert storage.debug_repr() == before


@pytest.mark.parametrize("kwargs, message", [
    pytest.param({"metadata": ["x"]}, r"metadata must be a mapping \(or None\), got list",
                 id="metadata-list"),
    pytest.param({"metadata": {"x": object()}}, r"metadata must be JSON-serialisable",
                 id="metadata-not-json"),
    pytest.param({"cascade": True, "cascade_kwargs": "x"},
                 r"cascade_kwargs must be a mapping \(or None\), got str", id="cascade-kwargs-str"),
    pytest.param({"cascade": True, "cascade_kwargs": {2: 1}},
                 r"cascade_kwargs must have string keys", id="cascade-kwargs-int-key"),
])
def test_update_instance_status_with_bad_metadata_or_cascade_kwargs(seeded, storage, no_dispatch,
                                                                    kwargs, message):
    """Bad metadata or cascade kwargs raise InvalidArgument; the status is not changed."""
    before = storage.debug_repr()
    with pytest.raises(InvalidArgument, match=message):
        seeded.update_instance_status("t_wait#0", "finished", **kwargs)
    assert storage["t_wait#0"].status == "unstarted"
    assert storage.debug_repr() == before
    assert no_dispatch == []


def test_update_instance_status_of_missing_instance(seeded, storage):
    """Setting the status of an instance the session does not hold raises InstanceNotFound."""
    before = storage.debug_repr()
    with pytest.raises(InstanceNotFound, match=rf"'{storage.uid}' has no task instance 't_wait#5'"):
        seeded.update_instance_status("t_wait#5", "finished", cascade=True)
    assert storage.debug_repr() == before


@pytest.mark.parametrize("metadata, message", [
    pytest.param(None, r"metadata must be a mapping, got None", id="none"),
    pytest.param(["x"], r"metadata must be a mapping.*got list", id="list"),
    pytest.param("x", r"metadata must be a mapping.*got str", id="str"),
    pytest.param(7, r"metadata must be a mapping.*got int", id="int"),
    pytest.param({1: "x"}, r"metadata must have string keys", id="int-key"),
    pytest.param({"x": object()}, r"metadata must be JSON-serialisable", id="not-json"),
])
def test_update_instance_metadata_with_bad_metadata(seeded, storage, metadata, message):
    """Metadata that is None or not a JSON mapping raises InvalidArgument."""
    before = storage.debug_repr()
    with pytest.raises(InvalidArgument, match=message):
        seeded.update_instance_metadata("t_wait#0", metadata)
    assert storage.debug_repr() == before


@pytest.mark.parametrize("call", ["update_instance_metadata", "mark_instance_logs_resolved"])
def test_metadata_of_missing_instance(seeded, storage, call):
    """Changing the metadata of a missing instance raises InstanceNotFound."""
    before = storage.debug_repr()
    args = ("t_gone#0", {"x": 1}) if call == "update_instance_metadata" else ("t_gone#0",)
    with pytest.raises(InstanceNotFound, match=r"has no task instance 't_gone#0'") as info:
        getattr(seeded, call)(*args)
    assert info.value.session_uid == storage.uid
    assert storage.debug_repr() == before


# ---------------------------------------------------------------------------
# Storage: construction and the storage's own public calls
# ---------------------------------------------------------------------------


def test_cache_storage_with_unknown_cache_alias(uid):
    """An unknown cache alias raises InvalidArgument listing the configured aliases."""
    with pytest.raises(InvalidArgument,
                       match=r"Unknown cache alias 'nope' for session .*; configured aliases: "
                             r"builtin_redis, default, locmem") as info:
        CacheStorageBackend(uid, cache="nope")
    assert info.value.session_uid == uid


@pytest.mark.parametrize("bad_uid", [42, None, "", b"abc", ["abc"]])
def test_cache_storage_with_bad_uid(bad_uid):
    """A session UID that is not a non-empty string raises InvalidArgument."""
    with pytest.raises(InvalidArgument, match=r"A session UID must be a non-empty string, got"):
        CacheStorageBackend(bad_uid)


@pytest.mark.parametrize("timeout", [0, -1, -3600, "60", "forever", [60]])
def test_cache_storage_with_bad_timeout(uid, timeout):
    """A timeout that is not a positive number of seconds (or None) raises InvalidArgument."""
    with pytest.raises(InvalidArgument,
                       match=rf"timeout must be a positive number of seconds or None, "
                             rf"got {re.escape(repr(timeout))}"):
        CacheStorageBackend(uid, timeout=timeout)


@pytest.mark.parametrize("bad", [None, "a-uid", object()])
def test_manager_needs_a_storage(bad):
    """TriggerManager with something that is not a storage backend raises InvalidArgument."""
    with pytest.raises(InvalidArgument, match=r"TriggerManager needs a storage backend"):
        TriggerManager(bad)


def test_storage_getitem_of_missing_instance(seeded, storage):
    """storage[name] of a missing instance raises InstanceNotFound (a KeyError)."""
    with pytest.raises(InstanceNotFound, match=r"has no task instance 't_wait#9'"):
        storage["t_wait#9"]
    with pytest.raises(KeyError):
        storage["nothing"]


def test_create_instance_of_unknown_task(seeded, storage):
    """create_instance() of a task the session does not configure raises InvalidArgument."""
    before = storage.debug_repr()
    with pytest.raises(InvalidArgument,
                       match=r"has no task 't_nope'; configured: t_every, t_wait"):
        storage.create_instance("t_nope")
    assert storage.debug_repr() == before


@pytest.mark.parametrize("kwargs, message", [
    pytest.param({"colour": "red"}, r"unexpected arguments \['colour'\]", id="unknown-argument"),
    pytest.param({"status": "bogus"}, r"bogus", id="unknown-status"),
    pytest.param({"kwargs": "x"}, r"kwargs", id="kwargs-not-mapping"),
    pytest.param({"kwargs": {"a": "x"}}, r"kwargs", id="kwargs-value-not-mapping"),
    pytest.param({"metadata": 5}, r"metadata", id="metadata-not-mapping"),
    pytest.param({"metadata": {"x": object()}}, r"metadata", id="metadata-not-json"),
])
def test_create_instance_with_bad_arguments(seeded, storage, kwargs, message):
    """create_instance() with bad arguments raises InvalidArgument; nothing is stored."""
    before = storage.debug_repr()
    with pytest.raises(InvalidArgument, match=message):
        storage.create_instance("t_wait", **kwargs)
    assert storage.debug_repr() == before


def test_clone_of_missing_instance(seeded, storage):
    """clone_instance() of a missing instance raises InstanceNotFound; nothing is stored."""
    before = storage.debug_repr()
    with pytest.raises(InstanceNotFound, match=r"has no task instance 't_wait#3'"):
        storage.clone_instance("t_wait#3")
    assert storage.debug_repr() == before


# ---------------------------------------------------------------------------
# Corrupt stored values
# ---------------------------------------------------------------------------


def _state(**changes):
    """A stored state that would schedule tests.Echo when 'go' fires, with ``changes``."""
    data = {
        "v": 1,
        "tasks": {"t_a": {"after": ["go"], "run": ECHO}},
        "kwargs": {},
        "counters": {},
        "open": {},
        "meta": {},
    }
    data.update(changes)
    return data


def _json(data):
    return json.dumps(data).encode()


_WITHOUT_V = _state()
del _WITHOUT_V["v"]

CORRUPT_VALUES = [
    pytest.param(b"not json", r"not valid JSON", id="not-json"),
    pytest.param(b"", r"not valid JSON", id="empty-bytes"),
    pytest.param(b"[1, 2, 3]", r"expected a JSON object, got list", id="json-list"),
    pytest.param(b'"a string"', r"expected a JSON object, got str", id="json-string"),
    pytest.param(b"5", r"expected a JSON object, got int", id="json-int"),
    pytest.param(b"null", r"expected a JSON object, got NoneType", id="json-null"),
    pytest.param(_json(_state(v=2)), r"unknown format version 2", id="version-2"),
    pytest.param(_json(_state(v="1")), r"unknown format version '1'", id="version-string"),
    pytest.param(_json(_state(v=None)), r"unknown format version None", id="version-null"),
    pytest.param(_json(_WITHOUT_V), r"unknown format version None", id="version-missing"),
    pytest.param(_json(_state(counters={"t_x": 1},
                              open={"t_x#0": {"task": "t_x", "status": "scheduled"}})),
                 r"instance 't_x#0' cannot be read", id="instance-of-unknown-task"),
    pytest.param(_json(_state(counters={"t_a": 1},
                              open={"t_a#0": {"task": "t_a", "status": "bogus"}})),
                 r"instance 't_a#0' cannot be read", id="instance-unknown-status"),
    pytest.param(_json(_state(counters={"t_a": 1},
                              open={"t_a#0": {"task": "t_a", "status": "unstarted",
                                              "kwargs": [1, 2]}})),
                 r"instance 't_a#0' cannot be read", id="instance-kwargs-list"),
    pytest.param(_json(_state(open=[])), r"is corrupt", id="open-list"),
    pytest.param(_json(_state(tasks=[])), r"is corrupt", id="tasks-list"),
    pytest.param(_json(_state(tasks={"t_a": "tests.Echo"})), r"is corrupt", id="task-entry-str"),
    pytest.param(_json(_state(tasks={"t_a": {"after": ["go"]}})), r"is corrupt",
                 id="task-entry-without-run"),
    pytest.param(_json(_state(tasks={"t_a": {"after": "go", "run": ECHO}})), r"is corrupt",
                 id="task-entry-after-string"),
    pytest.param(_json(_state(counters={"t_a": "many"})), r"is corrupt", id="counter-not-int"),
    pytest.param(_json(_state(kwargs=[])), r"is corrupt", id="kwargs-list"),
    pytest.param(pickle.dumps(_state()), r"not UTF-8 JSON text", id="pickle-binary"),
    pytest.param(pickle.dumps(_state(), protocol=0), r"not valid JSON", id="pickle-protocol-0"),
    pytest.param(b"\xff\xfe\x00garbage", r"not UTF-8 JSON text", id="not-utf8"),
]


def _assert_corrupt_everywhere(manager, storage, message, read_raw, garbage, no_dispatch):
    """Every entry point refuses the corrupt state, names the session, and executes nothing."""
    uid = storage.uid
    for attempt in range(2):  # twice: the first failure released the session lock
        with pytest.raises(CorruptSessionState, match=message) as info:
            manager.fire("go", {"n": attempt})
        assert info.value.session_uid == uid
        assert f"session '{uid}'" in str(info.value)
        assert "Nothing was executed" in str(info.value)
        assert isinstance(info.value, StorageError)
        assert isinstance(info.value, ValueError)
    with pytest.raises(CorruptSessionState, match=re.escape(uid)):
        _ = storage.instances
    with pytest.raises(CorruptSessionState, match=re.escape(uid)):
        storage.debug_repr()
    with pytest.raises(CorruptSessionState, match=re.escape(uid)):
        manager.update_configuration({"t_b": {"after": ["go"], "run": ECHO}})
    with pytest.raises(CorruptSessionState, match=re.escape(uid)):
        manager.get_unresolved_instances()
    assert no_dispatch == []
    assert read_raw() == garbage


@pytest.mark.parametrize("garbage, message", CORRUPT_VALUES)
def test_corrupt_state_in_redis(storage, redis_server, no_dispatch, trigger_threading_runner,
                                garbage, message):
    """A session of the previous layout (one state key) that holds garbage is refused.

    Sessions of release 1 are upgraded when first read; a corrupt one raises
    CorruptSessionState and stays as it was.
    """
    key = storage.cache.make_key("triggers:{" + storage.uid + "}:state")
    redis_server.set(key, garbage)
    manager = TriggerManager(storage)
    _assert_corrupt_everywhere(manager, storage, message, lambda: redis_server.get(key), garbage,
                               no_dispatch)


@pytest.mark.parametrize("garbage, message", [
    pytest.param(b"not json", r"not valid JSON", id="not-json"),
    pytest.param(_json(_state(v=2)), r"unknown format version 2", id="version-2"),
    pytest.param(pickle.dumps(_state()), r"not UTF-8 JSON text", id="pickle-binary"),
])
def test_corrupt_state_in_builtin_redis_cache(uid, redis_server, no_dispatch,
                                              trigger_threading_runner, garbage, message):
    """The same holds for Django's built-in Redis cache backend."""
    storage = CacheStorageBackend(uid, cache="builtin_redis")
    key = storage.cache.make_key("triggers:{" + uid + "}:state")
    redis_server.set(key, garbage)
    _assert_corrupt_everywhere(TriggerManager(storage), storage, message,
                               lambda: redis_server.get(key), garbage, no_dispatch)


_SESSION = {"fmt": 2, "v": None, "n": {}, "k": {}, "m": {}, "o": 0, "h": 0}


@pytest.mark.parametrize("garbage, message", [
    pytest.param(b"not json", r"not valid JSON", id="bytes-not-json"),
    pytest.param("not json", r"not valid JSON", id="str-not-json"),
    pytest.param("[1, 2]", r"not an object", id="json-list"),
    pytest.param(json.dumps({**_SESSION, "v": "0000000000000000"}), r"is corrupt",
                 id="unknown-configuration"),
    pytest.param(json.dumps({**_SESSION, "n": {"t_a": "many"}}), r"is corrupt",
                 id="counter-not-int"),
    pytest.param({**_SESSION}, r"is a dict, not JSON text", id="python-dict"),
    pytest.param(42, r"is a int, not JSON text", id="python-int"),
    pytest.param(pickle.dumps(_state()), r"not UTF-8 JSON text", id="pickle-bytes"),
])
def test_corrupt_state_in_locmem_cache(uid, no_dispatch, trigger_threading_runner, garbage,
                                       message):
    """Garbage at the session's LocMem record raises CorruptSessionState; it stays as it was."""
    storage = CacheStorageBackend(uid, cache="locmem")
    key = "triggers:{" + uid + "}:s"
    storage.cache.set(key, garbage, timeout=300)
    try:
        _assert_corrupt_everywhere(TriggerManager(storage), storage, message,
                                   lambda: storage.cache.get(key), garbage, no_dispatch)
    finally:
        storage.cache.delete(key)


@pytest.mark.parametrize("garbage", [b"not json", b"[]", pickle.dumps({"task": "t_done"})])
def test_corrupt_resolved_instance_in_redis(ran, storage, redis_server, no_dispatch, garbage):
    """Garbage at a resolved instance's record raises CorruptSessionState wherever it is read."""
    key = storage.engine.key("d")
    assert redis_server.hget(key, "t_done#0") is not None  # the finished instance is stored there
    redis_server.hset(key, "t_done#0", garbage)
    state_key = storage.engine.key("s")
    state_before = redis_server.hgetall(state_key)
    for read in (lambda: storage.instances, lambda: storage["t_done#0"],
                 lambda: storage.debug_repr(), lambda: storage.instances_of_task("t_done")):
        with pytest.raises(CorruptSessionState, match=re.escape(f"session '{storage.uid}'")):
            read()
    with pytest.raises(CorruptSessionState, match=re.escape(storage.uid)):
        ran.replay_failed_instance("t_done#0")
    with pytest.raises(CorruptSessionState, match=re.escape(storage.uid)):
        ran.update_instance_metadata("t_done#0", {"x": 1})
    assert redis_server.hget(key, "t_done#0") == garbage
    assert redis_server.hgetall(state_key) == state_before
    assert no_dispatch == []


@pytest.mark.parametrize("key, field, garbage, message", [
    pytest.param("c", None, b"not json", r"not valid JSON", id="configuration-not-json"),
    pytest.param("c", None, pickle.dumps({"v": 1}), r"not UTF-8 JSON text",
                 id="configuration-pickle"),
    pytest.param("c", None, json.dumps({"v": "0" * 16, "tasks": {"t_wait": "tests.Echo"}}),
                 r"stored configuration is invalid", id="configuration-invalid"),
    pytest.param("c", None, json.dumps({"v": "1" * 16, "tasks": {}}),
                 r"not version", id="configuration-other-version"),
    pytest.param("s", "n:t_wait", b"many", r"counter 'n:t_wait'", id="counter-not-int"),
    pytest.param("s", "k:b", b"not json", r"not valid JSON", id="latest-kwargs-not-json"),
    pytest.param("w:t_wait", "t_wait#0", b"not json", r"not valid JSON",
                 id="waiting-instance-not-json"),
    pytest.param("w:t_wait", "t_wait#0", json.dumps({"status": "bogus"}),
                 r"instance 't_wait#0' cannot be read", id="waiting-instance-bad-status"),
    pytest.param("w:t_wait", "t_wait#0", pickle.dumps({"status": "unstarted"}),
                 r"not UTF-8 JSON text", id="waiting-instance-pickle"),
])
def test_corrupt_records_in_redis(seeded, storage, redis_server, no_dispatch, key, field, garbage,
                                  message):
    """Garbage in a session's records raises CorruptSessionState naming the session; nothing
    is executed or overwritten."""
    full = storage.engine.key(key)
    if key == "c":
        # A configuration version this process has not parsed yet, so that it is read.
        redis_server.hset(storage.engine.key("s"), "v", "0" * 16)
        redis_server.set(full, garbage)
        read_back = lambda: redis_server.get(full)  # noqa: E731
    else:
        redis_server.hset(full, field, garbage)
        read_back = lambda: redis_server.hget(full, field)  # noqa: E731
    for _attempt in range(2):
        with pytest.raises(CorruptSessionState, match=message) as info:
            seeded.fire("b", {"n": 1})
        assert info.value.session_uid == storage.uid and storage.uid in str(info.value)
    with pytest.raises(CorruptSessionState, match=re.escape(storage.uid)):
        storage.debug_repr()
    assert read_back() == (garbage.encode() if isinstance(garbage, str) else garbage)
    assert no_dispatch == []


# ---------------------------------------------------------------------------
# Registries
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("lookup, registry, kind, bundled", [
    pytest.param(lambda storage: trigger_managers.get("nope", storage), trigger_managers,
                 "trigger manager", ["default"], id="managers"),
    pytest.param(lambda storage: storage_backends.get("nope", "some-uid"), storage_backends,
                 "storage backend", ["cache"], id="storages"),
    pytest.param(lambda storage: task_runners.get("nope"), task_runners, "task runner",
                 ["celery", "threading"], id="runners"),
    pytest.param(lambda storage: runners.get_runner("nope"), task_runners, "task runner",
                 ["celery", "threading"], id="get_runner"),
    pytest.param(lambda storage: trigger_managers.get_class("nope"), trigger_managers,
                 "trigger manager", ["default"], id="managers-get_class"),
])
def test_unknown_registry_key(storage, lookup, registry, kind, bundled):
    """An unknown registry key raises UnknownRegistryKey listing the available keys."""
    # Other installed distributions may register more keys: list whatever is registered.
    available = ", ".join(sorted(str(key) for key in registry.keys()))
    assert set(bundled) <= set(available.split(", "))
    with pytest.raises(UnknownRegistryKey,
                       match=rf"Unknown {kind} 'nope'; available: {re.escape(available)}\.",
                       ) as info:
        lookup(storage)
    error = info.value
    assert isinstance(error, RegistryKeyError)
    assert isinstance(error, KeyError)
    assert isinstance(error, TriggersError)
    assert error.key == "nope"
    assert error.group in str(error)


@pytest.mark.parametrize("manager_key, storage_key, kind", [
    ("nope", "cache", "trigger manager"),
    ("default", "nope", "storage backend"),
])
def test_build_manager_with_unknown_keys(uid, manager_key, storage_key, kind):
    """A worker asked to rebuild an unregistered manager or storage gets UnknownRegistryKey."""
    with pytest.raises(UnknownRegistryKey, match=rf"Unknown {kind} 'nope'; available:"):
        build_manager(manager_key, storage_key, uid)


def test_unknown_registry_key_is_caught_as_key_error():
    """Code catching KeyError or RegistryKeyError catches an unknown registry key."""
    with pytest.raises(KeyError):
        task_runners.get("nope")
    with pytest.raises(RegistryKeyError):
        storage_backends.get("nope", "uid")


# ---------------------------------------------------------------------------
# The exception hierarchy
# ---------------------------------------------------------------------------


def _exception_classes():
    return [
        getattr(exceptions_module, name) for name in exceptions_module.__all__
        if isinstance(getattr(exceptions_module, name), type)
        and issubclass(getattr(exceptions_module, name), BaseException)
    ]


@pytest.mark.parametrize("cls", _exception_classes(), ids=lambda cls: cls.__name__)
def test_every_exception_derives_from_triggers_error(cls):
    """Every exception class exported by triggers.exceptions derives from TriggersError."""
    assert issubclass(cls, TriggersError)


def test_every_exception_class_of_the_module_is_exported():
    """No exception class of triggers.exceptions is left out of its __all__."""
    defined = {
        name for name, value in vars(exceptions_module).items()
        if isinstance(value, type) and issubclass(value, BaseException)
        and value.__module__ == exceptions_module.__name__
    }
    assert defined <= set(exceptions_module.__all__)
    assert len(_exception_classes()) >= 15


def test_with_context_rejects_non_mapping():
    """with_context() with a context that is not a mapping raises InvalidArgument."""
    with pytest.raises(InvalidArgument, match=r"expects a mapping as context, got list"):
        with_context(ValueError("x"), ["not", "a", "mapping"])


# ---------------------------------------------------------------------------
# Task side: results, kwargs and TaskContext
# ---------------------------------------------------------------------------


def test_task_returning_non_mapping_fails_with_invalid_task_result(storage,
                                                                   trigger_threading_runner):
    """A task returning a non-mapping ends failed with InvalidTaskResult and cascades nothing."""
    manager = TriggerManager(storage)
    manager.update_configuration({
        "t_bad": {"after": ["go"], "run": "tests.BadResult"},
        "t_next": {"after": ["t_bad"], "run": ECHO},
    })
    manager.fire("go")
    ThreadingTaskRunner.join_all()
    instance = storage["t_bad#0"]
    assert instance.status == "failed"
    assert instance.metadata["exc_type"] == "triggers.exceptions.InvalidTaskResult"
    assert re.search(r"tests\.BadResult\._run\(\) returned list .*must return a mapping",
                     instance.metadata["exc_message"])
    assert "result" not in instance.metadata
    assert "t_bad" not in storage.latest_kwargs
    assert [i.name for i in storage.instances_of_task("t_next")] == []


def test_task_with_invalid_kwargs_fails_with_invalid_task_kwargs(storage,
                                                                 trigger_threading_runner):
    """filter_kwargs() rejecting the trigger kwargs fails the instance with InvalidTaskKwargs."""
    manager = TriggerManager(storage)
    manager.update_configuration({"t_filter": {"after": ["go"], "run": "tests.FilterKwargs"}})
    manager.fire("go", {"count": "many"})
    ThreadingTaskRunner.join_all()
    instance = storage["t_filter#0"]
    assert instance.status == "failed"
    assert instance.metadata["exc_type"] == "triggers.exceptions.InvalidTaskKwargs"
    assert "t_filter#0" in instance.metadata["exc_message"]
    assert "filter_errors" in instance.metadata["exc_context"]
    assert "t_filter" not in storage.latest_kwargs


@pytest.fixture
def context(seeded, storage):
    """A TaskContext for an instance of the seeded session."""
    instance = storage["t_wait#0"]
    return TaskContext(seeded, instance, {"a": {"x": 1}})


@pytest.mark.parametrize("bad", [["a"], "a", None])
def test_filter_kwargs_rejects_non_mapping(context, bad):
    """TaskContext.filter_kwargs() with a spec that is not a mapping raises InvalidArgument."""
    with pytest.raises(InvalidArgument, match=r"filter_kwargs\(\) expects a mapping"):
        context.filter_kwargs(bad)


def test_filter_kwargs_rejects_invalid_kwargs(context):
    """filter_kwargs() raises InvalidTaskKwargs naming the instance and the bad kwarg."""
    import filters as f

    with pytest.raises(InvalidTaskKwargs, match=r"Invalid trigger kwargs for t_wait#0: a") as info:
        context.filter_kwargs({"a": {"x": f.Required | f.Int | f.Min(5)}})
    assert info.value.instance_name == "t_wait#0"
    assert "filter_errors" in info.value.context


@pytest.mark.parametrize("bad", [["a"], "a", 3])
def test_get_logger_context_rejects_non_mapping(context, bad):
    """TaskContext.get_logger_context() with a non-mapping raises InvalidArgument."""
    with pytest.raises(InvalidArgument, match=r"get_logger_context\(\) expects a mapping"):
        context.get_logger_context(bad)


def test_task_control_flow_rejects_bad_arguments():
    """skip()/retry() with bad metadata, cooldown or replacement kwargs give InvalidArgument."""
    from celery import current_app

    task = current_app.tasks["tests.Retry"]
    with pytest.raises(InvalidArgument, match=r"metadata must be a mapping \(or None\), got str"):
        task.skip(metadata="done")
    with pytest.raises(InvalidArgument, match=r"metadata must be a mapping \(or None\), got list"):
        task.retry(metadata=["x"])
    with pytest.raises(InvalidArgument, match=r"replacement_kwargs must map trigger names"):
        task.retry(replacement_kwargs=["go"])
    for cooldown in (-1, "soon"):
        error = task.retry(cooldown=cooldown)
        assert isinstance(error, InvalidArgument)
        assert re.search(r"cooldown must be a number of seconds >= 0", str(error))


def test_result_that_is_not_json_fails_with_invalid_task_result():
    """A mapping result that is not JSON-serialisable is rejected with InvalidTaskResult."""
    from triggers.task import _result_kwargs

    instance = TaskInstance("t_a#0", TaskConfig("t_a", ["go"], ECHO))
    with pytest.raises(InvalidTaskResult, match=r"not JSON-serialisable"):
        _result_kwargs({"x": object()}, instance)
    with pytest.raises(InvalidTaskResult, match=r"returned dict .*string keys"):
        _result_kwargs({1: "x"}, instance)
