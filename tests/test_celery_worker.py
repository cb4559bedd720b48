"""The Celery runner against a real worker process (prefork pool) and RabbitMQ."""

import time

import pytest
import redis
from django.conf import settings

from tests.app.tasks import execution_key
from tests.helpers import QUESTIONNAIRE
from tests.workers import Worker, wait_for
from triggers import CacheStorageBackend, TriggerManager
from triggers.manager import trigger_managers
from triggers.runners import CeleryTaskRunner
from triggers.types import lease_expired


@pytest.fixture(scope="module")
def worker():
    worker = Worker().start()
    yield worker
    worker.stop()


@pytest.fixture
def counts():
    client = redis.Redis.from_url(settings.REDIS_URL)

    def count(uid, instance_name):
        return int(client.get(execution_key(uid, instance_name)) or 0)

    return count


def status_of(storage, name):
    try:
        return storage[name].status.value
    except KeyError:
        return None


def test_questionnaire_on_a_real_worker(worker, uid):
    """The questionnaire runs on the worker; cascades go through the broker too."""
    manager = trigger_managers.get("cookbook", CacheStorageBackend(uid))
    manager.update_configuration(dict(
        QUESTIONNAIRE, t_final={"after": ["sessionFinalized"], "run": "tests.Echo"}))
    manager.fire("pageReceived", {"page": 1, "user_agent": "ua"})
    manager.fire("firstPageReceived", {"subject_id": 9})
    manager.fire("questionnaireComplete")
    storage = manager.storage
    # sessionFinalized is fired by the manager's hook *inside the worker*: the worker
    # rebuilt the same manager class from its registry key.
    wait_for(lambda: status_of(storage, "t_final#0") == "finished", message="finalization")
    assert {i.status.value for i in storage} == {"finished"}
    assert storage["t_importResponses#0"].metadata["result"] == {"page": 1, "subject_id": 9}
    assert storage["t_importSubject#0"].metadata["runner"] == "celery"


def test_duplicate_delivery_runs_once(worker, uid, counts):
    """The same message delivered twice more starts _run only once; the rest are no-ops."""
    manager = TriggerManager(CacheStorageBackend(uid))
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Count"}})
    manager.fire("go")
    storage = manager.storage
    wait_for(lambda: status_of(storage, "t#0") == "finished", message="t#0 finished")
    before = storage.debug_repr()
    message = manager.build_task_message(storage["t#0"])
    task = CeleryTaskRunner.resolve("tests.Count")
    task.apply_async(kwargs=message)
    task.apply_async(kwargs=message)
    wait_for(lambda: worker.log().count("Ignoring a delivery of t#0") >= 2,
             message="the duplicates to be logged")
    assert counts(uid, "t#0") == 1
    assert storage.debug_repr() == before


def test_duplicate_while_running_is_ignored(worker, uid, counts):
    """A duplicate that arrives while the instance runs does not start it again."""
    manager = TriggerManager(CacheStorageBackend(uid))
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Count"}})
    manager.fire("go", {"sleep": 1.5})
    storage = manager.storage
    wait_for(lambda: status_of(storage, "t#0") == "running", message="t#0 running")
    CeleryTaskRunner.resolve("tests.Count").apply_async(
        kwargs=manager.build_task_message(storage["t#0"]))
    wait_for(lambda: status_of(storage, "t#0") == "finished", message="t#0 finished")
    wait_for(lambda: "Ignoring a delivery of t#0" in worker.log(), message="duplicate logged")
    assert counts(uid, "t#0") == 1


def test_retry_cooldown_is_the_countdown(worker, uid):
    """A retry's cooldown delays the next attempt (Celery countdown)."""
    manager = TriggerManager(CacheStorageBackend(uid))
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.RetryLater"}})
    manager.fire("go")
    storage = manager.storage
    wait_for(lambda: status_of(storage, "t#1") == "finished", message="the delayed retry")
    first, second = storage["t#0"], storage["t#1"]
    assert first.status.value == "replayed"
    assert second.metadata["cooldown"] == 2 and second.metadata["depth"] == 1
    assert second.metadata["started"] - first.metadata["modified"] >= 1.9


def test_celery_routing_applies(worker, uid):
    """task_routes decide the queue of a trigger task's message."""
    manager = TriggerManager(CacheStorageBackend(uid))
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Routed"}})
    manager.fire("go")
    storage = manager.storage
    wait_for(lambda: status_of(storage, "t#0") == "finished", message="routed task")
    assert storage["t#0"].metadata["result"] == {"routing_key": f"{settings.TEST_QUEUE}-routed"}


def test_killed_worker_leaves_running_and_recovery_reruns(uid, counts):
    """A worker SIGKILLed mid-task leaves the instance running; once its lease expired,
    recover() runs it again."""
    alone = [f"{settings.TEST_QUEUE}-alone"]  # no other worker takes the task
    doomed = Worker(concurrency=1, lease=3, queues=alone).start()
    manager = TriggerManager(CacheStorageBackend(uid))
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.CountAlone"},
                                  "t_next": {"after": ["t"], "run": "tests.Echo"}})
    manager.fire("go", {"sleep": 5})
    storage = manager.storage
    try:
        wait_for(lambda: status_of(storage, "t#0") == "running", message="t#0 running")
        doomed.kill()
    finally:
        doomed.stop()
    time.sleep(0.5)
    assert status_of(storage, "t#0") == "running"
    assert manager.recover(older_than=3600) == []  # not stuck long enough yet
    assert manager.recover(older_than=0) == []  # its lease is still current
    wait_for(lambda: lease_expired(storage["t#0"]), timeout=10, message="the lease expires")
    rescuer = Worker(queues=[*alone, settings.TEST_QUEUE]).start()
    try:
        recovered = manager.recover(older_than=0)
        assert [i.name for i in recovered] == ["t#0"]
        assert storage["t#0"].metadata["recovered_from"] == "running"
        wait_for(lambda: status_of(storage, "t_next#0") == "finished", timeout=60,
                 message="recovered run and its cascade")
    finally:
        rescuer.stop()
    assert counts(uid, "t#0") == 2
    assert storage["t#0"].metadata["attempts"] == 2


def test_unregistered_task_fails_the_instance(worker, uid, settings):
    """A run name only 'the workers' were to know, unknown to the worker too: failed, not stuck."""
    settings.TRIGGERS = {"ALLOW_UNKNOWN_TASKS": True}
    manager = TriggerManager(CacheStorageBackend(uid))
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.OnlyOnOtherWorkers",
                                        "using": "celery"}})
    manager.fire("go")
    storage = manager.storage
    wait_for(lambda: status_of(storage, "t#0") == "failed", message="t#0 to fail")
    instance = storage["t#0"]
    assert instance.metadata["exc_type"] == "triggers.exceptions.UnknownTask"
    assert "tests.OnlyOnOtherWorkers" in instance.metadata["exc_message"]
    assert "unregistered task" in worker.log().lower()
