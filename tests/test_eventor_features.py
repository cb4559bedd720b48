"""OR conditions, outcome triggers, delays, deadlines and recovery runs (configuration)."""

import time

import pytest

from tests.helpers import make_storage
from triggers import TriggerManager
from triggers.exceptions import ConfigurationError, InvalidTrigger
from triggers.runners import ThreadingTaskRunner

pytestmark = pytest.mark.usefixtures("trigger_threading_runner")


@pytest.fixture(params=["django_redis", "db_sqlite"])
def manager(request, uid):
    return TriggerManager(make_storage(request.param, uid))


def run(manager, *events):
    for name, kwargs in events:
        manager.fire(name, kwargs)
    ThreadingTaskRunner.join_all()


def status(manager, name):
    try:
        return manager.storage[name].status.value
    except KeyError:
        return None


# -- OR and nesting ------------------------------------------------------------


def test_or_runs_with_one_side_fired(manager):
    """a AND (b OR c): runs once a and either b or c fired; gets only what fired."""
    manager.update_configuration({"t": {"after": ["a", {"any": ["b", "c"]}], "run": "tests.Echo"}})
    run(manager, ("c", {"from": "c"}))
    assert status(manager, "t#0") == "unstarted"
    assert manager.storage["t#0"].missing_triggers == ["a"]
    run(manager, ("a", {"from": "a"}))
    assert manager.storage["t#0"].metadata["result"] == {"seen": {"a": {"from": "a"},
                                                                  "c": {"from": "c"}}}
    run(manager, ("b", {}))
    assert len(manager.storage.instances_of_task("t")) == 1


def test_nested_conditions(manager):
    """(a AND b) OR c, nested inside a list: any side satisfies it."""
    manager.update_configuration({
        "t_ab": {"after": [{"any": [{"all": ["a", "b"]}, "c"]}], "run": "tests.Echo"},
        "t_c": {"after": [{"any": [{"all": ["a", "b"]}, "c"]}], "run": "tests.Echo"},
    })
    run(manager, ("a", {}))
    assert manager.storage["t_ab#0"].missing_triggers == ["((a & b) | c)"]
    run(manager, ("b", {}))
    assert status(manager, "t_ab#0") == "finished"
    assert status(manager, "t_c#0") == "finished"


def test_or_in_unless(manager):
    """unless with an OR: either trigger abandons the task."""
    manager.update_configuration({"t": {"after": ["a", "b"], "unless": [{"any": ["x", "y"]}],
                                        "run": "tests.Echo"}})
    run(manager, ("a", {}), ("y", {}), ("b", {}))
    assert status(manager, "t#0") == "abandoned"


def test_and_every_with_or(manager):
    """andEvery + OR: each andEvery firing is one instance; it runs once the OR holds."""
    manager.update_configuration({"t": {"after": [{"any": ["a", "b"]}], "andEvery": "page",
                                        "run": "tests.Echo"}})
    run(manager, ("page", {"n": 1}), ("page", {"n": 2}))
    assert [i.status.value for i in manager.storage.instances_of_task("t")] == ["unstarted"] * 2
    run(manager, ("b", {"side": "b"}))
    run(manager, ("page", {"n": 3}))
    instances = manager.storage.instances_of_task("t")
    assert [i.status.value for i in instances] == ["finished"] * 3
    assert instances[2].kwargs == {"b": {"side": "b"}, "page": {"n": 3}}


@pytest.mark.parametrize("after, message", [
    ([{"either": ["a"]}], "must be {'any': [...]} or {'all': [...]}"),
    ([{"any": []}], "'any' takes a non-empty list"),
    ([{"any": "a"}], "'any' takes a non-empty list"),
    ([{"any": ["a"], "all": ["b"]}], "must be {'any': [...]} or {'all': [...]}"),
    ([{"any": [5]}], "a trigger name must be a string"),
])
def test_bad_conditions_are_rejected(manager, after, message):
    """Malformed conditions are configuration errors naming the task and directive."""
    with pytest.raises(ConfigurationError) as caught:
        manager.update_configuration({"t": {"after": after, "run": "tests.Echo"}})
    problem = caught.value.problems[0]
    assert (problem.task_name, problem.directive) == ("t", "after")
    assert message in problem.message
    assert manager.storage.tasks == {}


# -- outcome triggers -----------------------------------------------------------


def test_outcome_triggers_on_success(manager):
    """onReady, onStart, onSuccess and onComplete fire; onFailure does not."""
    manager.update_configuration({
        "t": {"after": ["go"], "run": "tests.Echo", "onReady": ["ready"], "onStart": ["started"],
              "onSuccess": ["ok"], "onFailure": ["failed"], "onComplete": ["done"]},
        "t_done": {"after": ["done", "ok"], "run": "tests.Echo"},
    })
    run(manager, ("go", {"v": 1}))
    latest = manager.storage.latest_kwargs
    assert latest["ready"] == {"instance": "t#0"} and latest["started"] == {"instance": "t#0"}
    assert latest["ok"] == latest["done"] == {"seen": {"go": {"v": 1}}}
    assert "failed" not in latest
    assert status(manager, "t_done#0") == "finished"


def test_outcome_triggers_on_failure(manager):
    """onFailure and onComplete fire when the task fails, with the exception's description."""
    manager.update_configuration({
        "t": {"after": ["go"], "run": "tests.Fail", "onSuccess": ["ok"],
              "onFailure": ["failed"], "onComplete": ["done"]},
        "t_handler": {"after": ["failed"], "run": "tests.Echo"},
    })
    run(manager, ("go", {}))
    latest = manager.storage.latest_kwargs
    assert latest["failed"] == latest["done"] == {
        "instance": "t#0", "exc_type": "builtins.ValueError", "exc_message": "the subject is invalid"}
    assert "ok" not in latest
    assert status(manager, "t_handler#0") == "finished"


def test_on_failure_waits_for_retries_to_be_exhausted(manager):
    """A retried instance fires onFailure only when the last retry fails."""
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Retry",
                                        "onFailure": ["failed"]}})
    run(manager, ("go", {"succeed_at": 99}))
    assert manager.storage.latest_kwargs["failed"]["instance"] == "t#2"
    assert manager.storage.latest_kwargs["failed"]["exc_type"].endswith("MaxRetriesExceeded")


def test_outcome_loop_is_refused(manager):
    """Outcome triggers that loop raise a clear error and change nothing."""
    manager.update_configuration({
        "t1": {"after": ["x"], "andEvery": "go", "run": "tests.Echo", "onReady": ["go"]},
    })
    manager.fire("x")
    before = manager.storage.debug_repr()
    with pytest.raises(InvalidTrigger, match="form a loop"):
        manager.fire("go")
    assert manager.storage.debug_repr() == before


@pytest.mark.parametrize("entry, directive", [
    ({"onFailure": "x"}, "onFailure"),
    ({"onReady": [1]}, "onReady"),
    ({"delay": -1}, "delay"),
    ({"delay": "soon"}, "delay"),
    ({"onRecovery": "retry"}, "onRecovery"),
])
def test_bad_new_directives(manager, entry, directive):
    """New directives are validated like the others."""
    with pytest.raises(ConfigurationError) as caught:
        manager.update_configuration({"t": {"after": ["a"], "run": "tests.Echo", **entry}})
    assert caught.value.problems[0].directive == directive


# -- delays and deadlines -------------------------------------------------------


def test_delay_is_visible_and_honoured(manager):
    """A delayed task is scheduled with start_after and starts no earlier."""
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Echo", "delay": 1}})
    fired_at = time.time()
    manager.fire("go")
    instance = manager.storage["t#0"]
    assert instance.status.value == "scheduled"
    assert instance.metadata["delay"] == 1
    assert instance.start_after == pytest.approx(fired_at + 1, abs=0.2)
    ThreadingTaskRunner.join_all()
    finished = manager.storage["t#0"]
    assert finished.status.value == "finished"
    assert finished.metadata["started"] >= instance.start_after - 0.01


def test_deadline_fires_when_the_expected_trigger_is_late(manager):
    """Deadline recipe: 'abandoned' fires unless 'complete' fires within the delay."""
    manager.update_configuration({
        "questionnaireAbandoned": {"after": ["questionnaireStarted"], "delay": 0.5,
                                   "unless": ["questionnaireComplete"], "run": "triggers.noop"},
        "t_remind": {"after": ["questionnaireAbandoned"], "run": "tests.Echo"},
    })
    run(manager, ("questionnaireStarted", {"user": 1}))
    assert status(manager, "questionnaireAbandoned#0") == "finished"
    assert "questionnaireAbandoned" in manager.storage.latest_kwargs
    assert status(manager, "t_remind#0") == "finished"


def test_deadline_cancelled_when_the_expected_trigger_arrives(manager):
    """The expected trigger within the delay abandons the waiting deadline: nothing fires."""
    manager.update_configuration({
        "questionnaireAbandoned": {"after": ["questionnaireStarted"], "delay": 1,
                                   "unless": ["questionnaireComplete"], "run": "triggers.noop"},
    })
    manager.fire("questionnaireStarted")
    manager.fire("questionnaireComplete")
    ThreadingTaskRunner.join_all()
    assert status(manager, "questionnaireAbandoned#0") == "abandoned"
    assert "questionnaireAbandoned" not in manager.storage.latest_kwargs


def test_overdue_deadline_survives_a_restart(manager, uid):
    """A deadline whose process died is found by recover() once due, and fires once."""
    manager.update_configuration({
        "late": {"after": ["start"], "delay": 0.3, "run": "triggers.noop"},
    })
    # Schedule it with a runner that loses the timer (as a process that died would).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("triggers.runners.ThreadingTaskRunner.run", lambda self, m, i: None)
        manager.fire("start")
    assert manager.recover(older_than=0) == []  # not due yet
    time.sleep(0.4)
    recovered = manager.recover(older_than=0)
    assert [i.name for i in recovered] == ["late#0"]
    ThreadingTaskRunner.join_all()
    assert status(manager, "late#0") == "finished"
    assert manager.recover(older_than=0) == []
    assert manager.storage["late#0"].metadata["attempts"] == 1


# -- recovery runs ----------------------------------------------------------------


def test_recovery_run_reruns_failures_and_keeps_finished(manager):
    """recovery_run() replays failed instances (or skips them by policy), keeps the rest."""
    manager.update_configuration({
        "t_ok": {"after": ["go"], "run": "tests.Echo"},
        "t_bad": {"after": ["go"], "run": "tests.FailUnlessFixed"},
        "t_skip": {"after": ["go"], "run": "tests.Fail", "onRecovery": "skip"},
        "t_after": {"after": ["t_bad"], "run": "tests.Echo"},
    })
    run(manager, ("go", {"fixed": False}))
    manager.fire("go", {"fixed": True})  # now the kwargs would succeed
    ThreadingTaskRunner.join_all()
    # The replay keeps the failed instance's own kwargs; fix them the way a user would:
    report = manager.recovery_run(replacement_kwargs={"t_bad": {"go": {"fixed": True}}})
    ThreadingTaskRunner.join_all()
    assert report["replayed"] == ["t_bad#0"] and report["skipped"] == ["t_skip#0"]
    assert status(manager, "t_ok#0") == "finished"
    assert manager.storage.instances_of_task("t_ok")[-1].name == "t_ok#0"
    assert status(manager, "t_bad#1") == "finished"
    assert status(manager, "t_skip#0") == "skipped"
    assert status(manager, "t_after#0") == "finished"


def test_refused_cascade_fails_the_instance(manager):
    """If a finished task's cascade is refused (an outcome loop), the instance ends failed."""
    manager.update_configuration({
        "t": {"after": ["go"], "run": "tests.Echo"},
        "t_loop": {"after": ["x"], "andEvery": "t", "run": "tests.Echo", "onReady": ["t"]},
    })
    run(manager, ("x", {}), ("go", {}))
    instance = manager.storage["t#0"]
    assert instance.status.value == "failed"
    assert instance.metadata["exc_type"] == "triggers.exceptions.InvalidTrigger"
