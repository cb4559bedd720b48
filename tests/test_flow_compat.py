"""Eventor programs behave as in Eventor through triggers.flow (public API only)."""

import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

from triggers import flow as evr
from triggers.exceptions import InvalidArgument


def unique():
    return f"compat-{uuid.uuid4().hex[:8]}"


class Calls:
    """Records step calls, thread-safely."""

    def __init__(self):
        self.calls = []
        self.lock = threading.Lock()

    def prog(self, progname, fail=False, sleep=0.0):
        with self.lock:
            self.calls.append(progname)
        if sleep:
            time.sleep(sleep)
        if fail:
            raise ValueError(f"bad parameter for {progname}")
        return progname


# -- 1. at_complete events handle a failure ----------------------------------------


@pytest.mark.parametrize("complete_key", [evr.StepTriggers.at_complete, evr.StepStatus.complete])
def test_complete_events_handle_a_failure(complete_key):
    """With stop_on_exception, a failed step whose complete events fired neither stops
    the run nor makes ev() return False (Eventor copies at_complete into at_failure)."""
    rec = Calls()
    ev = evr.Eventor(name=unique(), store=":memory:", config={"stop_on_exception": True})
    go, done = ev.add_event("go"), ev.add_event("done")
    ev.add_assoc(go, ev.add_step("bad", rec.prog, kwargs={"progname": "bad", "fail": True},
                                 triggers={complete_key: (done,)}))
    ev.add_assoc(go, ev.add_step("later", rec.prog, kwargs={"progname": "later"}), delay=0.2)
    ev.add_assoc(done, ev.add_step("next", rec.prog, kwargs={"progname": "next"}))
    ev.trigger_event(go, 1)
    assert ev() is True
    assert sorted(rec.calls) == ["bad", "later", "next"]
    assert rec.calls[0] == "bad"
    assert ev.manager(1).storage["bad#0"].status.value == "failed"


def test_failure_without_events_still_stops():
    """The same flow without the complete event stops: the delayed step never starts."""
    rec = Calls()
    ev = evr.Eventor(name=unique(), store=":memory:")
    go = ev.add_event("go")
    ev.add_assoc(go, ev.add_step("bad", rec.prog, kwargs={"progname": "bad", "fail": True}))
    ev.add_assoc(go, ev.add_step("later", rec.prog, kwargs={"progname": "later"}), delay=0.2)
    ev.trigger_event(go, 1)
    assert ev() is False
    assert rec.calls == ["bad"]


def test_eventor_status_keys_as_triggers():
    """Eventor's own spelling, StepStatus.success, works as a triggers key."""
    rec = Calls()
    ev = evr.Eventor(name=unique(), store=":memory:")
    e1, e2 = ev.add_event("e1"), ev.add_event("e2")
    ev.add_assoc(e1, ev.add_step("s1", rec.prog, kwargs={"progname": "s1"},
                                 triggers={evr.StepStatus.success: (e2,)}))
    ev.add_assoc(e2, ev.add_step("s2", rec.prog, kwargs={"progname": "s2"}))
    ev.trigger_event(e1, 1)
    assert ev() is True
    assert rec.calls == ["s1", "s2"]


# -- 2. StepReplay.skip marks a failed step succeeded -------------------------------


def skip_flow(name, rec, fail, run_mode="restart"):
    ev = evr.Eventor(name=name, store=":memory:", run_mode=run_mode)
    e1, e2, e3, e4 = (ev.add_event(n) for n in ("e1", "e2", "e3", "e4"))
    ev.add_assoc(e1, ev.add_step("s1", rec.prog, kwargs={"progname": "s1"},
                                 triggers={evr.StepStatus.success: (e2,)}))
    ev.add_assoc(e2, ev.add_step("s2", rec.prog, kwargs={"progname": "s2", "fail": fail},
                                 triggers={evr.StepStatus.success: (e3,),
                                           evr.StepStatus.complete: (e4,)},
                                 recovery={evr.StepStatus.failure: evr.StepReplay.skip}))
    ev.add_assoc(e3, ev.add_step("s3", rec.prog, kwargs={"progname": "s3"}))
    ev.add_assoc(e4, ev.add_step("s4", rec.prog, kwargs={"progname": "s4"}))
    return ev, e1


def test_skip_policy_marks_the_failed_step_succeeded():
    """In recovery, a failed step with StepReplay.skip is not run again; its success (and
    complete) events fire, so the flow goes on, and the run succeeds."""
    name, rec = unique(), Calls()
    first, e1 = skip_flow(name, rec, fail=True)
    first.trigger_event(e1, 1)
    assert first() is True  # s2's complete event fired: handled
    assert rec.calls == ["s1", "s2", "s4"]
    rec.calls.clear()

    second, _ = skip_flow(name, rec, fail=True, run_mode=evr.RunMode.recover)
    assert second() is True
    assert rec.calls == ["s3"]  # neither s1 nor s2 ran; s4 ran already
    storage = second.manager(1).storage
    assert [i.status.value for i in storage.instances_of_task("s2")] == ["skipped"]
    assert [i.status.value for i in storage.instances_of_task("s3")] == ["finished"]
    assert storage.get_unresolved_instances() == []


def test_skip_policy_of_an_unhandled_failure():
    """An unhandled failure (False, stop) with StepReplay.skip: recovery goes on from it."""
    name, rec = unique(), Calls()

    def build(run_mode="restart"):
        ev = evr.Eventor(name=name, store=":memory:", run_mode=run_mode)
        e1, e2 = ev.add_event("e1"), ev.add_event("e2")
        ev.add_assoc(e1, ev.add_step("s1", rec.prog, kwargs={"progname": "s1", "fail": True},
                                     triggers={evr.StepStatus.success: (e2,)},
                                     recovery={evr.StepStatus.failure: evr.StepReplay.skip}))
        ev.add_assoc(e2, ev.add_step("s2", rec.prog, kwargs={"progname": "s2"}))
        return ev, e1

    first, e1 = build()
    first.trigger_event(e1, 3)
    assert first() is False
    assert build(evr.RunMode.recover)[0]() is True
    assert rec.calls == ["s1", "s2"]


def test_ready_policy_skip_for_a_step_left_ready():
    """A step left ready by a stopped run, with recovery {ready: skip}, is not run by the
    recovery run but counts as succeeded; the failed step is rerun (default policy)."""
    name, rec = unique(), Calls()

    def build(fail, run_mode="restart"):
        ev = evr.Eventor(name=name, store=":memory:", run_mode=run_mode)
        go, after = ev.add_event("go"), ev.add_event("after")
        ev.add_assoc(go, ev.add_step("bad", rec.prog, kwargs={"progname": "bad", "fail": fail}))
        ev.add_assoc(go, ev.add_step("later", rec.prog, kwargs={"progname": "later"},
                                     triggers={evr.StepStatus.success: (after,)},
                                     recovery={evr.StepStatus.ready: evr.StepReplay.skip}),
                     delay=0.2)
        ev.add_assoc(after, ev.add_step("last", rec.prog, kwargs={"progname": "last"}))
        return ev, go

    first, go = build(fail=True)
    first.trigger_event(go)
    assert first() is False
    assert rec.calls == ["bad"]
    assert build(fail=False, run_mode="recover")[0]() is True
    assert sorted(rec.calls) == ["bad", "bad", "last"]


# -- 4. func=None, the step's environment, max_loops -----------------------------------


def test_step_without_function_succeeds():
    """func=None is a step that does nothing and succeeds (its success events fire)."""
    rec = Calls()
    ev = evr.Eventor(name=unique(), store=":memory:")
    e1, e2 = ev.add_event("e1"), ev.add_event("e2")
    ev.add_assoc(e1, ev.add_step("noop", triggers={evr.StepTriggers.at_success: (e2,)}))
    ev.add_assoc(e2, ev.add_step("s2", func=rec.prog, kwargs={"progname": "s2"}))
    ev.trigger_event(e1, 1)
    assert ev() is True
    assert rec.calls == ["s2"]
    storage = ev.manager(1).storage
    assert storage["noop#0"].status.value == "finished"
    assert storage["noop#0"].metadata["result"] == {"result": True}


def test_each_step_sees_its_own_variables_while_steps_run_together():
    """evr.environ (and ev.get_step_name/get_step_sequence) are per step, in threads."""
    seen = {}
    ev = evr.Eventor(name=unique(), store=":memory:")

    def probe(tag):
        first = (evr.environ["EVENTOR_STEP_NAME"], evr.environ["EVENTOR_STEP_SEQUENCE"],
                 evr.environ["EVENTOR_STEP_RECOVERY"])
        time.sleep(0.15)  # the other steps start meanwhile
        again = (ev.get_step_name(), ev.get_step_sequence(), ev.get_step_recovery())
        seen[(tag, first[1])] = (first, again, "PATH" in evr.environ)

    go = ev.add_event("go")
    ev.add_assoc(go, ev.add_step("a", probe, kwargs={"tag": "a"}),
                 ev.add_step("b", probe, kwargs={"tag": "b"}))
    ev.trigger_event(go, 1)
    ev.trigger_event(go, 2)
    assert ev() is True
    assert len(seen) == 4
    for (tag, sequence), (first, again, has_path) in seen.items():
        assert first == (tag, sequence, "0") == again
        assert has_path
    assert ev.get_step_name() == ""  # outside any step


def test_os_environ_in_a_chain_and_restored_after_the_run():
    """Steps that run one after another see their variables in os.environ too; the run
    restores os.environ afterwards."""
    assert "EVENTOR_STEP_NAME" not in os.environ
    seen = []
    ev = evr.Eventor(name=unique(), store=":memory:")
    e1, e2 = ev.add_event("e1"), ev.add_event("e2")

    def probe():
        seen.append((os.environ["EVENTOR_STEP_NAME"], os.environ["EVENTOR_STEP_SEQUENCE"]))

    ev.add_assoc(e1, ev.add_step("s1", probe, triggers={evr.StepStatus.success: (e2,)}))
    ev.add_assoc(e2, ev.add_step("s2", probe))
    ev.trigger_event(e1, "x")
    assert ev() is True
    assert seen == [("s1", "x"), ("s2", "x")]
    assert "EVENTOR_STEP_NAME" not in os.environ


def test_recovery_number_prefix_and_sequence_argument():
    """EVENTOR_STEP_RECOVERY counts recovery runs; envvar_prefix and sequence_arg_name."""
    name, seen = unique(), []

    def build(fail, run_mode="restart"):
        ev = evr.Eventor(name=name, store=":memory:", run_mode=run_mode,
                         config={"envvar_prefix": "MY_", "sequence_arg_name": "seq"})

        def prog(seq, fail):
            seen.append((evr.environ["MY_STEP_NAME"], seq, evr.environ["MY_STEP_RECOVERY"]))
            if fail:
                raise ValueError("bad")

        go = ev.add_event("go")
        ev.add_assoc(go, ev.add_step("s", prog, kwargs={"fail": fail}))
        return ev, go

    first, go = build(fail=True)
    first.trigger_event(go, 5)
    assert first() is False
    assert build(fail=True, run_mode="recover")[0]() is False
    assert build(fail=False, run_mode="recover")[0]() is True
    assert seen == [("s", "5", "0"), ("s", "5", "1"), ("s", "5", "2")]


def test_max_loops():
    """run(max_loops=n) is accepted: 0 runs nothing, 1 stops once nothing is running or due
    (a delayed step is left for a later run), -1 runs to the end."""
    rec = Calls()
    ev = evr.Eventor(name=unique(), store=":memory:")
    go = ev.add_event("go")
    ev.add_assoc(go, ev.add_step("now", rec.prog, kwargs={"progname": "now"}))
    ev.add_assoc(go, ev.add_step("late", rec.prog, kwargs={"progname": "late"}), delay=0.3)
    ev.trigger_event(go)
    assert ev.run(max_loops=0) is True
    assert rec.calls == []
    assert ev(max_loops=1) is True
    assert rec.calls == ["now"]
    assert ev(max_loops=-1) is True
    assert rec.calls == ["now", "late"]
    with pytest.raises(InvalidArgument, match="max_loops"):
        ev(max_loops="1")


def test_adding_the_same_step_or_event_again_returns_it():
    ev = evr.Eventor(name=unique(), store=":memory:")
    event = ev.add_event("e")
    assert ev.add_event("e") is event
    step = ev.add_step("s")
    assert ev.add_step("s", func=print) is step and step.func is None
    with pytest.raises(InvalidArgument, match="resources"):
        ev.add_step("r", acquires=[("pool", 1)])


# -- 5. looking at a stored sequence never empties it --------------------------------


def test_inspecting_a_failed_run_keeps_it_for_recovery():
    """A second flow object in restart mode (another script) that only looks at sequence 1
    leaves it as it was; the recovery run still finds and finishes it."""
    name, rec = unique(), Calls()

    def build(fail, run_mode="restart"):
        ev = evr.Eventor(name=name, store=":memory:", run_mode=run_mode)
        e1, e2 = ev.add_event("e1"), ev.add_event("e2")
        ev.add_assoc(e1, ev.add_step("s1", rec.prog, kwargs={"progname": "s1"},
                                     triggers={evr.StepStatus.success: (e2,)}))
        ev.add_assoc(e2, ev.add_step("s2", rec.prog, kwargs={"progname": "s2", "fail": fail}))
        return ev, e1

    first, e1 = build(fail=True)
    first.trigger_event(e1, 1)
    assert first() is False

    inspector, _ = build(fail=True)
    for _ in range(2):
        storage = inspector.manager(1).storage
        assert {i.name: i.status.value for i in storage} == {"s1#0": "finished",
                                                              "s2#0": "failed"}
    assert inspector() is True  # it ran nothing: no sequence of its own
    assert {i.name for i in inspector.manager(1).storage} == {"s1#0", "s2#0"}

    assert build(fail=False, run_mode="recover")[0]() is True
    assert rec.calls == ["s1", "s2", "s2"]


def test_trigger_event_in_restart_mode_starts_the_sequence_anew():
    """Restarting is explicit: the first trigger_event of a sequence in restart mode."""
    name, rec = unique(), Calls()

    def build():
        ev = evr.Eventor(name=name, store=":memory:")
        go = ev.add_event("go")
        ev.add_assoc(go, ev.add_step("s", rec.prog, kwargs={"progname": "s"}))
        return ev, go

    first, go = build()
    first.trigger_event(go, 1)
    first.trigger_event(go, 2)
    assert first()
    second, go = build()
    assert len(second.manager(1).storage.instances_of_task("s")) == 1
    second.trigger_event(go, 1)
    assert second()
    assert rec.calls == ["s", "s", "s"]
    assert [i.name for i in second.manager(1).storage] == ["s#0"]
    assert [i.name for i in second.manager(2).storage] == ["s#0"]


INSPECT_SCRIPT = """
import sys
from triggers import flow as evr

store, mode, fail = sys.argv[1], sys.argv[2], sys.argv[3] == "fail"

def prog(progname, fail=False):
    if fail:
        raise ValueError("bad parameter")
    return progname

run_mode = "recover" if mode == "recover" else "restart"
ev = evr.Eventor(name="inspected", store=store, run_mode=run_mode)
e1, e2 = ev.add_event("e1"), ev.add_event("e2")
ev.add_assoc(e1, ev.add_step("s1", prog, kwargs={"progname": "s1"},
                             triggers={evr.StepStatus.success: (e2,)}))
ev.add_assoc(e2, ev.add_step("s2", prog, kwargs={"progname": "s2", "fail": fail}))
if mode == "inspect":
    print(sorted((i.name, i.status.value) for i in ev.manager(1).storage))
else:
    if mode == "restart":
        ev.trigger_event(e1, 1)
    print("ok" if ev() else "failed")
"""


def test_inspecting_a_sqlite_store_from_another_script(tmp_path):
    """The issue's case: restart fails, another script inspects (default mode), recover works."""
    script = tmp_path / "flow.py"
    script.write_text(INSPECT_SCRIPT)
    store = str(tmp_path / "flow.db")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def run(mode, fail="fail"):
        result = subprocess.run([sys.executable, str(script), store, mode, fail], env=env,
                                capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert run("restart") == "failed"
    expected = "[('s1#0', 'finished'), ('s2#0', 'failed')]"
    assert run("inspect") == expected
    assert run("inspect") == expected
    assert run("recover", "fixed") == "ok"


def test_complete_recovery_policy_and_name_clashes():
    """recovery {complete: skip} stands for failure (and success); a step may not take the
    name of an event that is a task of the configuration."""
    ev = evr.Eventor(name=unique(), store=":memory:")
    go = ev.add_event("go")
    ev.add_assoc(go, ev.add_step("s", recovery={evr.StepStatus.complete: evr.StepReplay.skip}))
    assert ev.configuration()["s"]["onRecovery"] == "skip"
    ev.add_event("joined", expr=(go,))
    ev.add_assoc(go, ev.add_step("joined"))
    with pytest.raises(InvalidArgument, match="name of an event"):
        ev.configuration()


# -- 6. the documentation's log lines are the ones logged -----------------------------


def documented_messages(start, end):
    """The triggers.flow messages of the text between two markers of docs/eventor.rst."""
    import pathlib
    import re

    text = pathlib.Path(__file__).resolve().parent.parent.joinpath("docs", "eventor.rst").read_text()
    block = text[text.index(start):text.index(end, text.index(start))]
    return re.findall(r"\]\[ \w+ \]\[ (.*) \]\[ triggers\.flow \]", block)


def logged_messages(caplog):
    messages = [r.getMessage() for r in caplog.records if r.name == "triggers.flow"]
    caplog.clear()
    return messages


def test_documented_log_lines(caplog):
    """docs/eventor.rst shows the exact messages of its two examples."""
    caplog.set_level("INFO", logger="triggers.flow")

    def prog(progname, fail=False):
        if fail:
            raise ValueError(f"bad parameter for {progname}")
        return progname

    def build(name, store, mode, fail):
        ev = evr.Eventor(name=name, store=store, run_mode=mode)
        e1, e2, e3 = ev.add_event("run_step1"), ev.add_event("run_step2"), ev.add_event("run_step3")
        ev.add_assoc(e1, ev.add_step("s1", func=prog, kwargs={"progname": "prog1"},
                                     triggers={evr.StepTriggers.at_success: (e2,)}))
        ev.add_assoc(e2, ev.add_step("s2", func=prog, kwargs={"progname": "prog2", "fail": fail},
                                     triggers={evr.StepTriggers.at_success: (e3,)}))
        ev.add_assoc(e3, ev.add_step("s3", func=prog, kwargs={"progname": "prog3"}))
        if mode == "restart":
            ev.trigger_event(e1, 1)
        return ev

    build("example", ":memory:", "restart", False)()
    assert logged_messages(caplog) == documented_messages("Saved as ``example.py``",
                                                          "The messages are")
    build("nightly", ":memory:", "restart", True)()
    build("nightly", ":memory:", "recover", False)()
    documented = documented_messages("$ python nightly.py restart", "(The traceback")
    assert logged_messages(caplog) == [m.replace("nightly.db", ":memory:") for m in documented]
