"""`manage.py triggers …` and the demo, on the database storage (the embedded default)."""

import json
import subprocess
import sys
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from tests.workers import ROOT
from triggers import DatabaseStorageBackend, TriggerManager
from triggers.runners import ThreadingTaskRunner

pytestmark = [pytest.mark.django_db(transaction=True),
              pytest.mark.usefixtures("trigger_threading_runner")]


def run(*args):
    out, err = StringIO(), StringIO()
    call_command("triggers", *args, stdout=out, stderr=err)
    return out.getvalue()


@pytest.fixture
def failed_session(uid):
    manager = TriggerManager(DatabaseStorageBackend(uid))
    manager.update_configuration({
        "t_fail": {"after": ["go"], "run": "tests.FailUnlessFixed"},
        "t_next": {"after": ["t_fail"], "run": "tests.Echo"},
    })
    manager.fire("go", {"fixed": False})
    ThreadingTaskRunner.join_all()
    return manager


def test_inspect_shows_tasks_instances_and_tracebacks(failed_session):
    """inspect prints tasks, instances, statuses and the failure with its traceback."""
    text = run("inspect", failed_session.storage.uid)
    assert f"Session {failed_session.storage.uid}" in text
    assert "t_next" in text and "unresolved" in text
    assert "t_fail#0" in text and "failed" in text and "ValueError: not fixed yet" in text
    assert "Traceback (most recent call last)" in text


def test_inspect_json(failed_session):
    """inspect --json prints the session as JSON."""
    data = json.loads(run("inspect", failed_session.storage.uid, "--json"))
    assert data["uid"] == failed_session.storage.uid
    assert data["instances"]["t_fail#0"]["status"] == "failed"


def test_replay_command(failed_session):
    """replay replays a failed instance, with replacement kwargs."""
    text = run("replay", failed_session.storage.uid, "t_fail#0", "--kwargs", '{"go": {"fixed": true}}')
    assert "t_fail#0 replayed as t_fail#1" in text
    ThreadingTaskRunner.join_all()
    storage = failed_session.storage
    assert storage["t_fail#1"].status.value == "finished"
    assert storage["t_next#0"].status.value == "finished"


def test_skip_command(failed_session):
    """skip skips a failed instance, with a cascade and its result."""
    text = run("skip", failed_session.storage.uid, "t_fail#0", "--cascade", "--result", '{"ok": 1}')
    assert "t_fail#0 skipped (cascade fired)" in text
    ThreadingTaskRunner.join_all()
    assert failed_session.storage["t_next#0"].metadata["result"] == {"seen": {"t_fail": {"ok": 1}}}


def test_commands_report_bad_input_clearly(failed_session):
    """Bad input ends with a CommandError naming the problem; nothing changes."""
    uid = failed_session.storage.uid
    before = failed_session.storage.debug_repr()
    with pytest.raises(CommandError, match="has no task instance 't_next#0'"):
        run("skip", uid, "t_next#0")
    with pytest.raises(CommandError, match="Not valid JSON"):
        run("replay", uid, "t_fail#0", "--kwargs", "{nope")
    with pytest.raises(CommandError, match="Unknown storage backend 'nope'"):
        run("inspect", uid, "--storage", "nope")
    with pytest.raises(CommandError, match="Name the session UIDs"):
        run("recover")
    assert failed_session.storage.debug_repr() == before


def test_recover_all_on_the_database(failed_session):
    """recover --all lists the database's sessions."""
    text = run("recover", "--all", "--older-than", "0")
    assert "Recovered 0 instance(s)" in text


def test_demo_command_on_the_project_database():
    """manage.py triggers demo runs the questionnaire and finalizes the session."""
    from triggers.models import TriggerSession

    text = run("demo")
    assert "Session finalized: yes; unresolved tasks: none" in text
    assert "trigger 'sessionFinalized' fired by FinalizingTriggerManager" in text
    assert "t_importSubject#0 finished" in text
    assert "Deleted session demo-" in text
    assert not TriggerSession.objects.filter(uid__startswith="demo-").exists()
    text = run("demo", "--keep")
    kept = text.split("Kept session ", 1)[1].split(":")[0]
    assert TriggerSession.objects.filter(uid=kept).exists()
    with pytest.raises(CommandError, match="--keep keeps the demo's session"):
        run("demo", "--celery", "--keep")


def test_a_demo_that_fails_keeps_its_session(monkeypatch):
    from triggers.models import TriggerSession

    def stops_halfway(out, manager):
        manager.fire("firstPageReceived")
        return False

    monkeypatch.setattr("triggers.contrib.demo.run_demo", stops_halfway)
    with pytest.raises(CommandError, match=r"did not finish its workflow; its session is kept: "
                                           r"manage.py triggers inspect (demo-\w+)") as caught:
        run("demo")
    kept = str(caught.value).split("inspect ", 1)[1].split()[0]
    assert TriggerSession.objects.filter(uid=kept).exists()


def test_readme_demo_runs_standalone_without_redis(tmp_path):
    """`python -m triggers.demo` needs no project, no Redis and no worker."""
    env = {"PATH": "/usr/bin:/bin", "TRIGGERS_DEMO_REDIS_URL": "redis://127.0.0.1:1/0",
           "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "triggers.demo"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "DatabaseStorageBackend (threading runner)" in result.stdout
    assert "Session finalized: yes; unresolved tasks: none" in result.stdout
    for task in ("t_importSubject#0", "t_importResponses#2", "t_importBrowserMetadata#0",
                 "t_markComplete#0"):
        assert f"{task}" in result.stdout
    assert ROOT.exists()


def test_recovery_run_command(failed_session):
    """recover --rerun-failed replays failed instances and keeps finished ones."""
    uid = failed_session.storage.uid
    text = run("recover", uid, "--rerun-failed", "--older-than", "0")
    assert f"{uid}: replayed t_fail#0" in text
    assert "Recovered 0, replayed 1 and skipped 0 instance(s) in 1 session(s)." in text
    ThreadingTaskRunner.join_all()
    storage = failed_session.storage
    assert storage["t_fail#0"].status.value == "replayed"
    assert storage["t_fail#1"].status.value == "failed"  # same kwargs: fails again


def test_demo_with_celery_starts_and_stops_its_worker(tmp_path):
    """`python -m triggers.demo --celery` runs the flow on Redis with a real worker it stops."""
    import os

    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "triggers.demo", "--celery"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Celery worker started (pid" in result.stdout
    assert "CacheStorageBackend (Celery worker)" in result.stdout
    assert "t_importSubject#0 scheduled (celery)" in result.stdout
    assert "Session finalized: yes; unresolved tasks: none" in result.stdout
    assert "Celery worker stopped (pid" in result.stdout


def test_replay_says_when_its_copy_could_not_be_sent(failed_session, monkeypatch):
    """A replay whose message cannot be sent (the broker is down) says so on one line,
    not '(scheduled)' as if all were well; the sweep sends it later."""
    def broker_down(self, manager, instance):
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    monkeypatch.setattr(ThreadingTaskRunner, "run", broker_down)
    out, err = StringIO(), StringIO()
    call_command("triggers", "replay", failed_session.storage.uid, "t_fail#0",
                 stdout=out, stderr=err)
    assert out.getvalue().strip() == "t_fail#0 replayed as t_fail#1 (scheduled, not sent)"
    assert err.getvalue().startswith("t_fail#1 is scheduled but could not be sent: ")
    assert "Connection refused" in err.getvalue() and len(err.getvalue().splitlines()) == 1
    text = run("inspect", failed_session.storage.uid, "--timeline")
    assert "dispatch_error=" in text
    assert any(" unsent " in line and "t_fail#1" in line for line in text.splitlines())


def test_bad_replacement_kwargs_are_named_as_the_option(failed_session):
    with pytest.raises(CommandError, match=r"^--kwargs must map trigger names to kwargs"):
        run("replay", failed_session.storage.uid, "t_fail#0", "--kwargs", "[1, 2]")
    with pytest.raises(CommandError, match=r"^--result must be a mapping"):
        run("skip", failed_session.storage.uid, "t_fail#0", "--result", "[1, 2]")
    assert failed_session.storage["t_fail#0"].status.value == "failed"
