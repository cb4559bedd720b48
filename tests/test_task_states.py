"""The Celery state a trigger task ends in, as result backends and Flower see it.

The task runs through Celery's own tracer (``Task.apply``), as a worker runs it.
"""

import pytest
from celery import current_app

from triggers import CacheStorageBackend, TriggerManager
from triggers.runners import ThreadingTaskRunner


@pytest.fixture
def scheduled(uid, monkeypatch):
    """A session whose instances are scheduled but not sent (the test runs them)."""
    monkeypatch.setattr(ThreadingTaskRunner, "run", lambda self, manager, instance: None)
    manager = TriggerManager(CacheStorageBackend(uid))
    manager.update_configuration({
        "t_ok": {"after": ["go"], "run": "tests.Echo"},
        "t_fail": {"after": ["go"], "run": "tests.Fail"},
        "t_skip": {"after": ["go"], "run": "tests.Skip"},
    })
    manager.fire("go", {"n": 1})
    return manager


def run_through_celery(manager, name):
    instance = manager.storage[name]
    task = current_app.tasks[instance.config.run]
    return task.apply(kwargs=manager.build_task_message(instance))


def test_a_failed_instance_ends_its_celery_task_in_failure(scheduled):
    result = run_through_celery(scheduled, "t_fail#0")
    assert result.state == "FAILURE"
    assert isinstance(result.result, ValueError)
    assert str(result.result) == "the subject is invalid"
    instance = scheduled.storage["t_fail#0"]  # recorded on the instance all the same
    assert instance.status.value == "failed"
    assert instance.metadata["exc_type"] == "builtins.ValueError"


def test_finished_and_skipped_instances_end_in_success(scheduled):
    finished = run_through_celery(scheduled, "t_ok#0")
    assert finished.state == "SUCCESS"
    assert finished.result == {"seen": {"go": {"n": 1}}}
    skipped = run_through_celery(scheduled, "t_skip#0")
    assert skipped.state == "SUCCESS" and skipped.result is None
    assert scheduled.storage["t_skip#0"].status.value == "skipped"


def test_a_duplicate_delivery_ends_in_success_and_changes_nothing(scheduled):
    run_through_celery(scheduled, "t_fail#0")
    again = run_through_celery(scheduled, "t_fail#0")  # the instance is failed already
    assert again.state == "SUCCESS" and again.result is None


def test_the_celery_task_id_is_kept_with_the_instance(scheduled):
    from io import StringIO

    from django.core.management import call_command

    result = run_through_celery(scheduled, "t_ok#0")
    assert scheduled.storage["t_ok#0"].metadata["task_id"] == result.id
    out = StringIO()
    call_command("triggers", "inspect", scheduled.storage.uid, "--storage", "cache", stdout=out)
    assert f"task_id={result.id}" in out.getvalue()
