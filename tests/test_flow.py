"""Eventor's example flows through triggers.flow, with the same observable outcome."""

import threading
import time
import uuid

import pytest

from triggers import flow as evr


def unique():
    return f"flow-{uuid.uuid4().hex[:8]}"


class Recorder:
    """Step functions that record their calls (in order, thread-safe)."""

    def __init__(self):
        self.calls = []
        self.times = {}
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0

    def prog(self, progname, sleep=0.0, fail=False):
        with self.lock:
            self.calls.append(progname)
            self.times[progname] = time.time()
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if sleep:
                time.sleep(sleep)
            if fail:
                raise ValueError(f"bad parameter for {progname}")
            return progname
        finally:
            with self.lock:
                self.active -= 1


def chain(ev, rec, fail_s2=False):
    ev1s = ev.add_event("run_step1")
    ev2s = ev.add_event("run_step2")
    ev3s = ev.add_event("run_step3")
    s1 = ev.add_step("s1", func=rec.prog, kwargs={"progname": "prog1"},
                     triggers={evr.StepTriggers.at_success: (ev2s,)})
    s2 = ev.add_step("s2", func=rec.prog, kwargs={"progname": "prog2", "fail": fail_s2},
                     triggers={evr.StepTriggers.at_success: (ev3s,)})
    s3 = ev.add_step("s3", func=rec.prog, kwargs={"progname": "prog3"})
    ev.add_assoc(ev1s, s1)
    ev.add_assoc(ev2s, s2)
    ev.add_assoc(ev3s, s3)
    return ev1s


def test_three_step_chain():
    """s1 → s2 → s3 run in order, each once (Eventor's simple example)."""
    rec = Recorder()
    ev = evr.Eventor(name=unique(), store=":memory:")
    start = chain(ev, rec)
    ev.trigger_event(start, 1)
    assert ev() is True
    assert rec.calls == ["prog1", "prog2", "prog3"]
    storage = ev.manager(1).storage
    assert storage["s3#0"].metadata["result"] == {"result": "prog3"}
    assert {i.status.value for i in storage} == {"finished"}


def test_and_join_of_two_completed_steps():
    """A step after an AND of two steps' success events runs once, after both."""
    rec = Recorder()
    ev = evr.Flow(name=unique(), store=":memory:", config={"max_concurrent": 2})
    go = ev.add_event("go")
    done1, done2 = ev.add_event("done1"), ev.add_event("done2")
    join = ev.add_event("join", expr=(done1, done2))
    s1 = ev.add_step("s1", rec.prog, kwargs={"progname": "a", "sleep": 0.2},
                     triggers={evr.StepTriggers.at_success: (done1,)})
    s2 = ev.add_step("s2", rec.prog, kwargs={"progname": "b"},
                     triggers={evr.StepTriggers.at_success: (done2,)})
    s3 = ev.add_step("s3", rec.prog, kwargs={"progname": "joined"})
    ev.add_assoc(go, s1, s2)
    ev.add_assoc(join, s3)
    ev.trigger_event(go, 7)
    assert ev()
    assert sorted(rec.calls[:2]) == ["a", "b"] and rec.calls[2:] == ["joined"]
    assert rec.times["joined"] >= rec.times["a"] + 0.2


def test_recovery_run_reruns_the_failed_step_only():
    """Step 2 fails with a bad parameter; the recovery run reruns it, not step 1, then s3."""
    name = unique()
    rec = Recorder()
    first = evr.Eventor(name=name, store=":memory:", config={"stop_on_exception": True})
    start = chain(first, rec, fail_s2=True)
    first.trigger_event(start, 1)
    assert first() is False
    assert rec.calls == ["prog1", "prog2"]
    assert first.manager(1).storage["s2#0"].status.value == "failed"

    second = evr.Eventor(name=name, store=":memory:", run_mode=evr.RunMode.recover)
    chain(second, rec, fail_s2=False)  # the parameter is fixed
    assert second() is True
    assert rec.calls == ["prog1", "prog2", "prog2", "prog3"]
    storage = second.manager(1).storage
    assert [i.status.value for i in storage.instances_of_task("s2")] == ["replayed", "finished"]
    assert [i.status.value for i in storage.instances_of_task("s1")] == ["finished"]


def test_recovery_policy_skip():
    """A step whose failure recovery policy is skip is skipped by the recovery run."""
    name = unique()
    rec = Recorder()
    ev = evr.Flow(name=name, store=":memory:")
    go = ev.add_event("go")
    ev.add_assoc(go, ev.add_step("s", rec.prog, kwargs={"progname": "s", "fail": True},
                                 recovery={evr.StepStatus.failure: evr.StepReplay.skip}))
    ev.trigger_event(go)
    assert ev() is False
    again = evr.Flow(name=name, store=":memory:", run_mode="recover")
    again.add_assoc(again.add_event("go"),
                    again.add_step("s", rec.prog, kwargs={"progname": "s"},
                                   recovery={evr.StepStatus.failure: evr.StepReplay.skip}))
    assert again() is True
    assert rec.calls == ["s"]
    assert again.manager(0).storage["s#0"].status.value == "skipped"


def test_delayed_association():
    """A delayed association starts the step no earlier than the delay."""
    rec = Recorder()
    ev = evr.Flow(name=unique(), store=":memory:")
    go = ev.add_event("go")
    ev.add_assoc(go, ev.add_step("late", rec.prog, kwargs={"progname": "late"}), delay=0.5)
    fired = time.time()
    ev.trigger_event(go, "x")
    instance = ev.manager("x").storage["late#0"]
    assert instance.status.value == "scheduled" and instance.metadata["delay"] == 0.5
    assert ev()
    assert rec.times["late"] - fired >= 0.45


def test_or_condition_with_one_side_fired():
    """An event raised by or_(a, b) fires when only one side fired (Eventor's defect fixed)."""
    rec = Recorder()
    ev = evr.Flow(name=unique(), store=":memory:")
    a, b = ev.add_event("a"), ev.add_event("b")
    either = ev.add_event("either", expr=evr.or_(a, b))
    ev.add_assoc(either, ev.add_step("s", rec.prog, kwargs={"progname": "s"}))
    ev.trigger_event(b, 1)
    assert ev()
    assert rec.calls == ["s"]


def test_sequences_never_combine():
    """Events fired in different sequences do not satisfy one expression together."""
    rec = Recorder()
    ev = evr.Flow(name=unique(), store=":memory:")
    a, b = ev.add_event("a"), ev.add_event("b")
    both = ev.add_event("both", expr=(a, b))
    ev.add_assoc(both, ev.add_step("s", rec.prog, kwargs={"progname": "s"}))
    ev.trigger_event(a, 1)
    ev.trigger_event(b, 2)
    assert ev()
    assert rec.calls == []
    ev.trigger_event(b, 1)
    assert ev()
    assert rec.calls == ["s"]


def test_failure_with_a_handler_counts_as_handled():
    """A failed step whose failure triggers a handler step counts as handled."""
    rec = Recorder()
    ev = evr.Flow(name=unique(), store=":memory:")
    go, failed = ev.add_event("go"), ev.add_event("failed")
    ev.add_assoc(go, ev.add_step("s", rec.prog, kwargs={"progname": "s", "fail": True},
                                 triggers={evr.StepTriggers.at_failure: (failed,)}))
    ev.add_assoc(failed, ev.add_step("handler", rec.prog, kwargs={"progname": "handler"}))
    ev.trigger_event(go)
    assert ev() is True
    assert rec.calls == ["s", "handler"]


def test_unhandled_failure_and_stop_on_exception():
    """A failure that fires no event makes the run return False and stops new steps."""
    rec = Recorder()
    ev = evr.Flow(name=unique(), store=":memory:", config={"stop_on_exception": True})
    go = ev.add_event("go")
    ev.add_assoc(go, ev.add_step("bad", rec.prog, kwargs={"progname": "bad", "fail": True}))
    ev.add_assoc(go, ev.add_step("later", rec.prog, kwargs={"progname": "later"}), delay=0.3)
    ev.trigger_event(go)
    assert ev() is False
    assert rec.calls == ["bad"]
    assert ev.manager(0).storage["later#0"].status.value == "scheduled"


def test_max_concurrent_is_per_step():
    """max_concurrent limits the instances of one step (Eventor); different steps run together."""
    rec = Recorder()
    ev = evr.Flow(name=unique(), store=":memory:", config={"max_concurrent": 1})
    go = ev.add_event("go")
    for n in range(4):
        ev.add_assoc(go, ev.add_step(f"s{n}", rec.prog, kwargs={"progname": n, "sleep": 0.2}))
    ev.trigger_event(go)
    assert ev()
    assert sorted(rec.calls) == list(range(4))
    assert rec.max_active == 4


@pytest.mark.parametrize("flow_limit, step_limit, expected_max", [
    (None, None, 4), (1, None, 1), (None, 2, 2), (1, 3, 3), (3, -1, 4)])
def test_max_concurrent_across_sequences(flow_limit, step_limit, expected_max):
    """One step in four sequences: the flow's max_concurrent is each step's default limit,
    a step's own max_concurrent overrides it; below 1 (the default) there is no limit."""
    rec = Recorder()
    config = {} if flow_limit is None else {"max_concurrent": flow_limit}
    ev = evr.Flow(name=unique(), store=":memory:", config=config)
    go = ev.add_event("go")
    step_config = {} if step_limit is None else {"max_concurrent": step_limit}
    ev.add_assoc(go, ev.add_step("s", rec.prog, kwargs={"progname": "s", "sleep": 0.15},
                                 config=step_config))
    for sequence in range(4):
        ev.trigger_event(go, sequence)
    assert ev()
    assert rec.calls == ["s"] * 4
    assert rec.max_active == expected_max


@pytest.mark.parametrize("workers, expected_max", [(2, 2), (0, 6)])
def test_max_workers_limits_the_whole_flow(workers, expected_max):
    """max_workers: at most that many steps of the flow run at once (below 1: no limit)."""
    rec = Recorder()
    ev = evr.Flow(name=unique(), store=":memory:", config={"max_workers": workers})
    go = ev.add_event("go")
    for n in range(6):
        # Long enough that all six overlap even on a loaded machine.
        ev.add_assoc(go, ev.add_step(f"s{n}", rec.prog, kwargs={"progname": n, "sleep": 0.5}))
    ev.trigger_event(go)
    assert ev()
    assert sorted(rec.calls) == list(range(6))
    assert rec.max_active == expected_max


@pytest.mark.django_db(transaction=True)
def test_flow_on_the_project_database():
    """store='db' keeps the flow's sessions in the project's database; inspectable as usual."""
    rec = Recorder()
    ev = evr.Flow(name=unique(), store="db")
    start = chain(ev, rec)
    ev.trigger_event(start, 1)
    assert ev()
    storage = ev.manager(1).storage
    assert type(storage).__name__ == "DatabaseStorageBackend"
    assert storage.tasks["s2"].to_dict()["onSuccess"] == ["run_step3"]
    assert rec.calls == ["prog1", "prog2", "prog3"]


def test_path_store_needs_an_unconfigured_django(tmp_path):
    """A SQLite path as store inside a configured project is refused clearly."""
    from triggers.exceptions import InvalidArgument

    with pytest.raises(InvalidArgument, match="use store='db'"):
        evr.Flow(name=unique(), store=str(tmp_path / "flow.db"))


RECOVERY_SCRIPT = """
import sys
from triggers import flow as evr

store, mode, fail = sys.argv[1], sys.argv[2], sys.argv[3] == "fail"
calls = []

def prog(progname, fail=False):
    calls.append(progname)
    if fail:
        raise ValueError("bad parameter")
    return progname

ev = evr.Eventor(name="recovery", store=store, run_mode=mode)
e1, e2, e3 = ev.add_event("e1"), ev.add_event("e2"), ev.add_event("e3")
ev.add_assoc(e1, ev.add_step("s1", prog, kwargs={"progname": "s1"},
                             triggers={evr.StepTriggers.at_success: (e2,)}))
ev.add_assoc(e2, ev.add_step("s2", prog, kwargs={"progname": "s2", "fail": fail},
                             triggers={evr.StepTriggers.at_success: (e3,)}))
ev.add_assoc(e3, ev.add_step("s3", prog, kwargs={"progname": "s3"}))
if mode == "restart":
    ev.trigger_event(e1, 1)
print("ok" if ev() else "failed", ",".join(calls))
"""


def test_recovery_across_processes_with_a_sqlite_store(tmp_path):
    """A SQLite store survives the process: a second process's recovery run finishes the flow."""
    import subprocess
    import sys

    script = tmp_path / "flow.py"
    script.write_text(RECOVERY_SCRIPT)
    store = str(tmp_path / "flow.db")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def run(mode, fail):
        result = subprocess.run([sys.executable, str(script), store, mode, fail], env=env,
                                capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert run("restart", "fail") == "failed s1,s2"
    assert run("recover", "fixed") == "ok s2,s3"


def test_step_config_stop_on_exception_overrides_the_flow():
    """A step's own stop_on_exception=False lets the run go on after its unhandled failure."""
    rec = Recorder()
    ev = evr.Flow(name=unique(), store=":memory:", config={"stop_on_exception": True})
    go = ev.add_event("go")
    ev.add_assoc(go, ev.add_step("bad", rec.prog, kwargs={"progname": "bad", "fail": True},
                                 config={"stop_on_exception": False}))
    ev.add_assoc(go, ev.add_step("later", rec.prog, kwargs={"progname": "later"}), delay=0.2)
    ev.trigger_event(go)
    assert ev() is False
    assert rec.calls == ["bad", "later"]
