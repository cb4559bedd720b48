"""A new user's mistakes get clear answers: misspelt directives, missing tables, wrong
setting types, and `manage.py triggers` errors on one line (no traceback)."""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from io import StringIO

import pytest
from django.core import checks
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections, transaction
from django.test import override_settings

from tests.workers import ROOT
from triggers import CacheStorageBackend, DatabaseStorageBackend, TriggerManager
from triggers.checks import check_settings
from triggers.config import near_miss_directive, validate_configuration
from triggers.exceptions import ConfigurationError, StorageError
from triggers.runners import ThreadingTaskRunner
from triggers.storages.memory import MemoryStorageBackend
from triggers.types import DIRECTIVES, TaskConfig

ECHO = "tests.Echo"
TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"


def closed_port():
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------
# 1. Misspelt directives
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("key, meant", [
    ("unles", "unless"), ("andevery", "andEvery"), ("withparams", "withParams"),
    ("afterr", "after"), ("Run", "run"), ("Using", "using"), ("onSucess", "onSuccess"),
    ("with_params", "withParams"), ("dealy", "delay"), ("rnu", "run"),
])
def test_near_miss_directive_is_refused_with_a_suggestion(key, meant, uid):
    """A key one or two edits from a directive (or differing in case) is refused, naming
    the directive it probably misspells; nothing is stored."""
    manager = TriggerManager(MemoryStorageBackend(uid))
    entry = {"after": ["go"], "run": ECHO, key: ["x"] if meant != "withParams" else {}}
    if meant in ("after", "run"):
        del entry[meant]
    with pytest.raises(ConfigurationError) as caught:
        manager.update_configuration({"t": entry})
    assert [(p.task_name, p.directive) for p in caught.value.problems] == [("t", key)]
    assert f"unknown directive {key!r}; did you mean {meant!r}?" in str(caught.value)
    assert manager.storage.tasks == {}


def test_near_misses_are_found_for_every_directive_and_not_for_the_directives():
    assert all(near_miss_directive(directive) is None for directive in DIRECTIVES)
    for directive in DIRECTIVES:
        assert near_miss_directive(directive.upper()) == directive
        assert near_miss_directive(directive + "s") == directive
    # Far enough from every directive: kept for custom managers.
    for key in ("notifyOnFailure", "priority", "queue", "url", "timeout", "owner", "tags"):
        assert near_miss_directive(key) is None


def test_a_misspelt_required_directive_is_one_problem(uid):
    """`Run` instead of `run` is reported once, as the misspelling (not also as missing)."""
    manager = TriggerManager(MemoryStorageBackend(uid))
    with pytest.raises(ConfigurationError) as caught:
        manager.update_configuration({"t": {"afterr": ["go"], "Run": ECHO},
                                      "u": {"after": ["go"], "unles": ["stop"], "run": ECHO}})
    assert sorted((p.task_name, p.directive) for p in caught.value.problems) == [
        ("t", "Run"), ("t", "afterr"), ("u", "unles")]


def test_other_unknown_keys_are_kept_as_extras(uid, trigger_threading_runner):
    """Keys far from every directive still reach TaskConfig.extras for custom managers."""
    manager = TriggerManager(MemoryStorageBackend(uid))
    manager.update_configuration({"t": {"after": ["go"], "run": ECHO,
                                        "notifyOnFailure": "data-team@example.com",
                                        "priority": 3}})
    assert manager.storage.tasks["t"].extras == {"notifyOnFailure": "data-team@example.com",
                                                 "priority": 3}


def test_custom_directives_accept_only_the_declared_keys():
    entry = {"after": ["go"], "run": ECHO, "priority": 3}
    configs = validate_configuration({"t": entry}, None, custom_directives=frozenset({"priority"}))
    assert configs["t"].extras == {"priority": 3}
    with pytest.raises(ConfigurationError) as caught:
        validate_configuration({"t": {**entry, "queue": "fast"}}, None,
                               custom_directives=frozenset({"priority"}))
    assert [(p.directive, p.message) for p in caught.value.problems] == [
        ("queue", "unknown directive 'queue'; besides the built-in directives, this manager "
                  "accepts only 'priority'")]
    with pytest.raises(ConfigurationError, match="this manager accepts none"):
        validate_configuration({"t": entry}, None, custom_directives=frozenset())
    # A declared custom directive is accepted even when it looks like a misspelling.
    configs = validate_configuration({"t": {"after": ["go"], "run": ECHO, "delays": [1, 2]}},
                                     None, custom_directives={"delays"})
    assert configs["t"].extras == {"delays": [1, 2]}
    # Without custom_directives (None), any key far from the directives is accepted.
    assert validate_configuration({"t": {**entry, "queue": "fast"}}, None)["t"].extras == {
        "priority": 3, "queue": "fast"}


def test_a_manager_declares_its_custom_directives(uid):
    class PriorityManager(TriggerManager):
        custom_directives = frozenset({"priority"})

    assert TriggerManager.custom_directives is None
    manager = PriorityManager(MemoryStorageBackend(uid))
    manager.update_configuration({"t": {"after": ["go"], "run": ECHO, "priority": 1}})
    assert manager.storage.tasks["t"].extras == {"priority": 1}
    with pytest.raises(ConfigurationError, match="unknown directive 'queue'"):
        manager.update_configuration({"u": {"after": ["go"], "run": ECHO, "queue": "fast"}})
    assert set(manager.storage.tasks) == {"t"}
    # The bundled manager still accepts any key far from the directives.
    TriggerManager(MemoryStorageBackend(uid)).update_configuration(
        {"u": {"after": ["go"], "run": ECHO, "queue": "fast"}})


def test_stored_configuration_with_a_near_miss_key_keeps_loading(uid, trigger_threading_runner):
    """A configuration an earlier release stored with `unles` (kept as an extra then) still
    loads and runs; only new configurations are refused."""
    from triggers.storages import _records

    raw = {"t": {"after": ["go"], "run": ECHO, "unles": ["stop"]}}
    assert validate_configuration(raw, None, stored=True)["t"].extras == {"unles": ["stop"]}
    with pytest.raises(ConfigurationError, match="did you mean 'unless'"):
        validate_configuration(raw, None)

    storage = MemoryStorageBackend(uid)
    storage.update_configuration({"t": TaskConfig.from_dict("t", raw["t"])})  # as stored then
    _records._parsed.clear()  # read back as a fresh process would: validated again
    manager = TriggerManager(MemoryStorageBackend(uid))
    assert manager.storage.tasks["t"].extras == {"unles": ["stop"]}
    manager.update_configuration({"u": {"after": ["t"], "run": ECHO}})  # other tasks can join
    manager.fire("go", {"n": 1})
    ThreadingTaskRunner.join_all()
    assert manager.storage["t#0"].status.value == "finished"
    assert manager.storage["u#0"].status.value == "finished"


# ---------------------------------------------------------------------------
# 2. Missing tables
# ---------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True, databases=["default", "postgres"])
@pytest.mark.parametrize("alias", ["default", "postgres"])
def test_missing_table_says_to_migrate(alias, uid):
    """A database without the triggers tables: StorageError says to run migrate."""
    command = "manage.py migrate" + ("" if alias == "default" else f" --database {alias}")
    with pytest.raises(StorageError) as caught:  # noqa: PT012 - the table comes back on rollback
        with transaction.atomic(using=alias):
            with connections[alias].cursor() as cursor:
                cursor.execute("ALTER TABLE triggers_triggersession RENAME TO triggers_away")
            DatabaseStorageBackend(uid, using=alias).tasks  # noqa: B018
    message = str(caught.value)
    assert f"run `{command}`" in message and uid in message
    assert "\n" not in message  # PostgreSQL's "LINE 1: SELECT …" is left out
    assert DatabaseStorageBackend(uid, using=alias).tasks == {}  # the table is back


@pytest.mark.django_db(transaction=True)
def test_a_failed_step_on_sqlite_keeps_its_own_error(uid):
    """A step (not a read) on SQLite without the tables: the error that says to migrate,
    not one from setting back the connection's busy timeout after the step."""
    from triggers import TriggerManager

    with connections["default"].cursor() as cursor:
        cursor.execute("ALTER TABLE triggers_triggersession RENAME TO triggers_away")
    try:
        with pytest.raises(StorageError, match=r"run `manage.py migrate`"):
            TriggerManager(DatabaseStorageBackend(uid)).update_configuration(
                {"t": {"after": ["go"], "run": ECHO}})
    finally:
        with connections["default"].cursor() as cursor:
            cursor.execute("ALTER TABLE triggers_away RENAME TO triggers_triggersession")
    assert DatabaseStorageBackend(uid).tasks == {}


@pytest.mark.parametrize("error, hint", [
    ('relation "triggers_triggersession" does not exist\nLINE 1: SELECT ...', True),
    ('column triggers_triggerinstance.waiting does not exist', True),
    ("no such column: triggers_triggerinstance.waiting", True),
    ("(1146, \"Table 'app.triggers_triggersession' doesn't exist\")", True),
    ("disk I/O error", False),
    ("database is locked", False),
])
def test_only_missing_tables_get_the_migrate_hint(error, hint):
    from django.db import OperationalError

    # What the storage raises when the database fails (reading, or in a step).
    failed = DatabaseStorageBackend("s1", using="postgres")._failed(OperationalError(error),
                                                                    "reading")
    assert isinstance(failed, StorageError)
    assert ("run `manage.py migrate --database postgres`" in str(failed)) is hint
    assert str(failed).startswith("Database 'postgres' failed while reading session 's1'")


# ---------------------------------------------------------------------------
# 3. System checks of the TRIGGERS values
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("setting, expected", [
    ({"TIMEOUT": None}, []),
    ({"TIMEOUT": 60}, []),
    ({"TIMEOUT": 0}, ["triggers.E009"]),
    ({"TIMEOUT": -5}, ["triggers.E009"]),
    ({"TIMEOUT": 1.5}, ["triggers.E009"]),
    ({"TIMEOUT": "3600"}, ["triggers.E009"]),
    ({"TIMEOUT": True}, ["triggers.E009"]),
    ({"MANAGER": 1}, ["triggers.E010"]),
    ({"STORAGE": ["db"]}, ["triggers.E010"]),
    ({"RUNNER": None}, []),
    ({"RUNNER": 5}, ["triggers.E010"]),
    ({"RUNNER": ""}, ["triggers.E010"]),
    ({"STORAGE_OPTIONS": [("using", "default")]}, ["triggers.E010"]),
    ({"STORAGE_OPTIONS": {1: "x"}}, ["triggers.E010"]),
    ({"STORAGE_OPTIONS": {"lock_expire": 5}}, []),
    ({"STORAGE": "cache", "CACHE": None}, ["triggers.E010"]),
    ({"STORAGE": "cache", "CACHE": ["default"]}, ["triggers.E010"]),
    ({"DATABASE": 0}, ["triggers.E010"]),
    ({"DATABASE": {"default"}}, ["triggers.E010"]),
    ({"ALLOW_UNKNOWN_TASKS": "yes"}, ["triggers.E010"]),
    ({"ALLOW_UNKNOWN_TASKS": 1}, ["triggers.E010"]),
    ({"ALLOW_UNKNOWN_TASKS": True}, []),
    ({"HISTORY_LIMIT": -1}, ["triggers.E008"]),
    ({"HISTORY_LIMIT": 0}, []),
    ({"IDEMPOTENCY_KEYS": -1}, ["triggers.E008"]),
    ({"IDEMPOTENCY_KEYS": 10.5}, ["triggers.E008"]),
    ({"IDEMPOTENCY_KEYS": "1000"}, ["triggers.E008"]),
    ({"OUTCOME_RETRY": 0}, ["triggers.E007"]),
    ({"OUTCOME_RETRY": "60"}, ["triggers.E007"]),
    ({"OUTCOME_RETRY": float("nan")}, ["triggers.E007"]),
    ({"OUTCOME_RETRY": 0.5}, []),
    ({"LOCK_TIMEOUT": True}, ["triggers.E007"]),
    ({"LEASE": 0}, ["triggers.E007"]),
    ({"LEASE": 30}, []),
    ({"OUTCOME_SPOOL": 5}, ["triggers.E010"]),
    ({"OUTCOME_SPOOL": "/var/spool/triggers"}, []),
    ({"OUTCOME_SPOOL": None}, []),
    ({"TIMEOUT": "x", "MANAGER": 3, "HISTORY_LIMIT": None},
     ["triggers.E008", "triggers.E009", "triggers.E010"]),
])
def test_checks_validate_the_types_of_the_values(setting, expected):
    with override_settings(TRIGGERS=setting):
        messages = check_settings()
    assert sorted(message.id for message in messages) == expected
    for message in messages:
        assert isinstance(message, checks.Error) and message.msg.startswith("TRIGGERS[")


def test_manage_py_check_reports_a_wrong_timeout():
    """`manage.py check` fails on a wrong value (the checks are registered)."""
    from django.core.management.base import SystemCheckError

    with override_settings(TRIGGERS={"TIMEOUT": "forever"}), \
            pytest.raises(SystemCheckError, match=r"triggers\.E009.*TIMEOUT"):
        call_command("check", "--tag", "triggers", stdout=StringIO(), stderr=StringIO())


# ---------------------------------------------------------------------------
# 4. `manage.py triggers …`
# ---------------------------------------------------------------------------

def run(*args):
    out, err = StringIO(), StringIO()
    call_command("triggers", *args, stdout=out, stderr=err)
    return out.getvalue()


@pytest.fixture
def project(tmp_path, settings):
    """Runs `manage.py triggers …` in a child process, on this test run's databases and
    Redis (the child's settings are the test settings with the test database names)."""
    from django.conf import settings as live

    port = closed_port()
    module = tmp_path / "cli_settings.py"
    module.write_text(textwrap.dedent(f"""
        from tests.settings import *  # noqa: F403
        DATABASES["default"]["NAME"] = {live.DATABASES["default"]["NAME"]!r}
        DATABASES["postgres"]["NAME"] = {live.DATABASES["postgres"]["NAME"]!r}
        DATABASES["closed"] = {{**DATABASES["postgres"], "PORT": "{port}"}}
        DATABASES["empty"] = {{"ENGINE": "django.db.backends.sqlite3",
                               "NAME": {str(tmp_path / "empty.sqlite3")!r}}}
        CACHES["closed"] = {{"BACKEND": "django_redis.cache.RedisCache",
                             "LOCATION": "redis://127.0.0.1:{port}/0",
                             "OPTIONS": {{"SOCKET_CONNECT_TIMEOUT": 2, "SOCKET_TIMEOUT": 2}}}}
        TRIGGERS = {{"OUTCOME_SPOOL": {str(tmp_path / "spool")!r}}}
    """))

    def manage(*args):
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "cli_settings",
               "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
        result = subprocess.run([sys.executable, "manage.py", "triggers", *args], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=120)
        assert "Traceback" not in result.stdout + result.stderr, result.stderr
        return result

    settings.TRIGGERS = {"OUTCOME_SPOOL": str(tmp_path / "spool")}
    manage.settings_file = str(module)
    return manage


def one_error_line(result, status=1):
    """The child exited with ``status`` and printed exactly one line on stderr."""
    assert result.returncode == status, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def session(uid, trigger_threading_runner):
    """A session on the database storage with a finished cascade."""
    manager = TriggerManager(DatabaseStorageBackend(uid))
    manager.update_configuration({"t_a": {"after": ["go"], "run": ECHO},
                                  "t_b": {"after": ["t_a"], "run": ECHO}})
    manager.fire("go", {"n": 1})
    ThreadingTaskRunner.join_all()
    assert manager.storage["t_b#0"].status.value == "finished"
    return manager


@pytest.mark.django_db(transaction=True)
def test_inspect_of_an_unknown_session_is_one_line(project, uid):
    result = project("inspect", uid)
    line = one_error_line(result)
    assert line.startswith(f"CommandError: No session {uid!r} in database 'default'")
    assert result.stdout == ""
    with pytest.raises(CommandError, match=f"No session {uid!r}"):
        run("inspect", uid, "--json")
    with pytest.raises(CommandError, match=f"No session {uid!r} in cache 'default'"):
        run("inspect", uid, "--storage", "cache")


@pytest.mark.django_db(transaction=True)
def test_django_options_are_accepted_after_the_subcommand(project, uid):
    """``--settings`` (and Django's other options) work after the subcommand too."""
    result = project("inspect", uid, "--settings", "cli_settings", "-v", "2")
    assert one_error_line(result).startswith(f"CommandError: No session {uid!r}")
    result = project("--settings", "cli_settings", "inspect", uid)
    assert one_error_line(result).startswith(f"CommandError: No session {uid!r}")
    # Given after the subcommand, they take effect: the settings (their "closed" cache)…
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(project.settings_file), str(ROOT)])}
    result = subprocess.run(
        [sys.executable, "manage.py", "triggers", "inspect", uid, "--storage", "cache",
         "--cache", "closed", "--settings", "cli_settings"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "Connection refused" in one_error_line(result)
    # … and --traceback.
    result = subprocess.run(
        [sys.executable, "manage.py", "triggers", "inspect", uid, "--storage", "cache",
         "--cache", "closed", "--settings", "cli_settings", "--traceback"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
    assert project("inspect", uid, "-v", "7").returncode == 2


@pytest.mark.django_db(transaction=True)
def test_a_session_with_only_fired_triggers_is_known(uid):
    TriggerManager(DatabaseStorageBackend(uid)).fire("go", {"n": 1})
    assert f"Session {uid}" in run("inspect", uid)


@pytest.mark.django_db(transaction=True)
def test_bad_json_is_one_line(project, session):
    uid = session.storage.uid
    before = session.storage.debug_repr()
    line = one_error_line(project("replay", uid, "t_a#0", "--kwargs", "{nope"))
    assert line.startswith("CommandError: Not valid JSON for --kwargs: '{nope'")
    line = one_error_line(project("skip", uid, "t_a#0", "--result", "[1,"))
    assert line.startswith("CommandError: Not valid JSON for --result: '[1,'")
    with pytest.raises(CommandError, match="Not valid JSON for --kwargs"):
        run("replay", uid, "t_a#0", "--kwargs", "{nope")
    with pytest.raises(CommandError, match="Not valid JSON for --result"):
        run("skip", uid, "t_a#0", "--cascade", "--result", "{")
    assert session.storage.debug_repr() == before


@pytest.mark.django_db(transaction=True)
def test_a_bad_timeout_and_usage_errors_are_one_line(project, uid):
    line = one_error_line(project("inspect", uid, "--storage", "cache", "--timeout", "soon"))
    assert line == "CommandError: --timeout takes a number of seconds or 'none', got 'soon'"
    line = one_error_line(project("inspect"), status=2)
    assert "error: the following arguments are required: uid" in line
    line = one_error_line(project(), status=2)
    assert "error: the following arguments are required: action" in line
    line = one_error_line(project("inspect", uid, "--bogus"), status=2)
    assert "unrecognized arguments: --bogus" in line
    with pytest.raises(CommandError, match="required: uid"):
        run("inspect")


@pytest.mark.django_db(transaction=True)
def test_an_unreachable_store_is_one_line(project, uid):
    for args in (("inspect", uid), ("skip", uid, "t#0"), ("replay", uid, "t#0"),
                 ("recover", uid)):
        line = one_error_line(project(*args, "--storage", "cache", "--cache", "closed"))
        assert line.startswith("CommandError: ") and uid in line and "ConnectionError" in line
    line = one_error_line(project("recover", "--all", "--storage", "cache", "--cache", "closed"))
    assert line.startswith("CommandError: Could not list the sessions of storage 'cache'")
    # PostgreSQL's connection error spans lines: the command prints it on one.
    line = one_error_line(project("inspect", uid, "--database", "closed"))
    assert line.startswith("CommandError: Database 'closed' failed while reading session")
    port = closed_port()
    caches = {"closed": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                         "LOCATION": f"redis://127.0.0.1:{port}/0"}}
    with override_settings(CACHES=caches), \
            pytest.raises(CommandError, match=f"Redis failed for session {uid!r}") as caught:
        run("inspect", uid, "--storage", "cache", "--cache", "closed")
    assert "\n" not in str(caught.value)


@pytest.mark.django_db(transaction=True)
def test_missing_tables_are_one_line_that_says_to_migrate(project, uid):
    line = one_error_line(project("inspect", uid, "--database", "empty"))
    assert "no such table" in line
    assert line.endswith("run `manage.py migrate --database empty`")
    line = one_error_line(project("recover", "--all", "--database", "empty"))
    assert line.startswith("CommandError: Could not list the sessions of storage 'db'")
    assert line.endswith("run `manage.py migrate --database empty`")


def test_multi_line_messages_are_joined():
    from triggers.management.commands.triggers import one_line

    assert one_line("Invalid (2 problems); nothing was stored:\n  - task 'a': x\n  - task 'b': y"
                    ) == "Invalid (2 problems); nothing was stored: task 'a': x; task 'b': y"
    assert one_line("connection refused\n\tIs the server running?") == (
        "connection refused; Is the server running?")


@pytest.mark.django_db(transaction=True)
def test_inspect_timeline(project, session):
    """--timeline prints the history, oldest first, with readable times."""
    uid = session.storage.uid
    history = session.storage.history()
    result = project("inspect", uid, "--timeline")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.index("Instances:") < text.index("Timeline (oldest first):")
    lines = text.split("Timeline (oldest first):\n", 1)[1].splitlines()
    assert len(lines) == len(history)
    pattern = re.compile(rf"^  {TIME} \S+ +\+\d+\.\d{{3}}s  (\w+)\s+(.*?)\s+(\S+:\d+)$")
    parsed = [pattern.match(line) for line in lines]
    assert all(parsed), lines
    assert [match.group(1) for match in parsed] == [event["event"] for event in history]
    assert re.search(r"  \+0\.000s  ", lines[0]) and "  +0.000s  " not in lines[1:]
    assert parsed[0].group(1, 2) == ("configured", "2 task(s)")
    assert parsed[1].group(1) == "fired" and re.fullmatch(r"go \(\d+ bytes\)", parsed[1].group(2))
    assert [m.group(2).split()[0] for m in parsed if m.group(1) == "finished"] == [
        "t_a#0", "t_b#0"]
    assert "Timeline" not in project("inspect", uid).stdout

    data = json.loads(run("inspect", uid, "--json", "--timeline"))
    assert [event["event"] for event in data["history"]] == [e["event"] for e in history]
    assert all(re.fullmatch(rf"{TIME} \S+", event["time"]) for event in data["history"])
    assert "history" not in json.loads(run("inspect", uid, "--json"))


@pytest.mark.django_db(transaction=True)
def test_inspect_timeline_without_history(session):
    uid = session.storage.uid
    with override_settings(TRIGGERS={"HISTORY_LIMIT": 0}):
        other = TriggerManager(DatabaseStorageBackend(f"{uid}-nohistory"))
        other.update_configuration({"t": {"after": ["go"], "run": ECHO}})
        text = run("inspect", other.storage.uid, "--timeline")
    assert "(no events kept: TRIGGERS['HISTORY_LIMIT'] is 0)" in text


@pytest.mark.django_db(transaction=True)
def test_recover_says_what_it_skipped_as_too_recent(project, uid, trigger_threading_runner,
                                                    monkeypatch):
    manager = TriggerManager(DatabaseStorageBackend(uid))
    manager.update_configuration({"t": {"after": ["go"], "run": ECHO},
                                  "t_later": {"after": ["go"], "run": ECHO, "delay": 3600}})
    with monkeypatch.context() as patch:  # the messages are on their way (or lost)
        patch.setattr(ThreadingTaskRunner, "run", lambda self, manager, instance: None)
        assert [i.name for i in manager.fire("go")] == ["t#0", "t_later#0"]
    result = project("recover", uid)
    assert result.returncode == 0, result.stderr
    # "scheduled for N s": N is however long the command took to start.
    assert re.search(rf"{uid}: not yet stuck: t#0 \(scheduled for \d+ s, less than "
                     r"--older-than 300\)", result.stdout), result.stdout
    assert re.search(rf"{uid}: not yet due: t_later#0 \(scheduled, waiting out its delay or "
                     r"cooldown: due in 3\d\d\d s\)", result.stdout), result.stdout
    assert "Recovered 0 instance(s) in 1 session(s)." in result.stdout
    assert ("Skipped 1 instance(s) scheduled or running for less than 300 s (--older-than)"
            in result.stdout)
    assert result.stdout.rstrip().endswith("--older-than 0")

    text = run("recover", uid, "--older-than", "0")
    assert f"{uid}: re-dispatched t#0 (was scheduled)" in text
    assert "Skipped" not in text and "not yet stuck" not in text
    assert "not yet due: t_later#0 (scheduled, waiting out its delay" in text
    ThreadingTaskRunner.join_all()
    assert manager.storage["t#0"].status.value == "finished"
    assert manager.storage["t_later#0"].status.value == "scheduled"
    assert "not yet stuck" not in run("recover", uid)


@pytest.mark.django_db(transaction=True)
def test_recover_rerun_failed_also_says_what_it_skipped(uid, trigger_threading_runner, settings,
                                                        tmp_path):
    settings.TRIGGERS = {"OUTCOME_SPOOL": str(tmp_path)}  # not the machine's shared spool
    manager = TriggerManager(DatabaseStorageBackend(uid))
    manager.update_configuration({"t": {"after": ["go"], "run": ECHO},
                                  "t_fail": {"after": ["go"], "run": "tests.FailUnlessFixed"}})
    manager.storage.create_instance("t", status="running")
    manager.fire("go", {"fixed": False})
    ThreadingTaskRunner.join_all()
    assert manager.storage["t_fail#0"].status.value == "failed"
    text = run("recover", uid, "--rerun-failed", "--older-than", "60")
    assert re.search(rf"{uid}: not yet stuck: t#0 \(running for \d+ s, less than "
                     r"--older-than 60\)", text), text
    assert f"{uid}: replayed t_fail#0" in text
    assert "t_fail#1" not in text  # the replay just scheduled is not reported as recent
    assert "Skipped 1 instance(s)" in text and "--older-than 0" in text


def test_recover_refuses_a_negative_age():
    with pytest.raises(CommandError, match="--older-than takes a number of seconds >= 0"):
        run("recover", "x", "--older-than", "-1")


def test_cache_session_unknown_inspect_uses_timeout_flag(uid):
    """--timeout none still works (parsed by the command now, not by argparse)."""
    manager = TriggerManager(CacheStorageBackend(uid))
    manager.update_configuration({"t": {"after": ["go"], "run": ECHO}})
    assert f"Session {uid}" in run("inspect", uid, "--storage", "cache", "--timeout", "none")


def test_an_unknown_setting_gets_a_suggestion():
    with override_settings(TRIGGERS={"TIMEOT": 60, "storage": "db", "NOTHING_LIKE_IT": 1}):
        [message] = check_settings()
    assert message.id == "triggers.E002"
    assert message.msg == ("Unknown TRIGGERS setting(s): NOTHING_LIKE_IT, TIMEOT (did you mean "
                           "TIMEOUT?), storage (did you mean STORAGE?).")


def test_an_unknown_task_says_to_import_the_project_app_when_none_is_loaded(monkeypatch):
    """Without the project's Celery app (proj/__init__.py does not import it) the message
    points at that import, not at autodiscover_tasks()."""
    from celery import current_app

    from triggers.exceptions import UnknownTask
    from triggers.runners import BaseTaskRunner

    with pytest.raises(UnknownTask, match=r"through autodiscover_tasks\(\)"):
        BaseTaskRunner.resolve("tests.NoSuchTask")
    monkeypatch.setattr(current_app, "main", "default")
    with pytest.raises(UnknownTask, match=r"import it in your project package's __init__.py "
                                          r"\(from \.celery import app as celery_app\)"):
        BaseTaskRunner.resolve("tests.NoSuchTask")
