"""Leases and heartbeats: a live run is never started twice; a dead one is taken over."""

import threading
import time

import pytest

from tests.helpers import make_storage, statuses
from triggers import TriggerManager
from triggers.run import Run, lease_expired
from triggers.runners import ThreadingTaskRunner

pytestmark = pytest.mark.usefixtures("trigger_threading_runner")


def executions(uid, name):
    import redis
    from django.conf import settings

    from tests.app.tasks import execution_key

    return int(redis.Redis.from_url(settings.REDIS_URL).get(execution_key(uid, name)) or 0)


@pytest.mark.parametrize("kind", ["django_redis", "memory"])
def test_a_run_three_times_longer_than_its_lease_is_never_started_twice(kind, uid, settings):
    settings.TRIGGERS = {"LEASE": 1}
    storage = make_storage(kind, uid)
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Count"}})
    manager.fire("go", {"sleep": 3})
    deadline = time.monotonic() + 10
    while storage["t#0"].status != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    redelivered = []
    while storage["t#0"].status == "running":
        # A redelivered message (or another worker) tries to start it, again and again.
        redelivered.append(Run.start(TriggerManager(make_storage(kind, uid)), "t#0"))
        time.sleep(0.2)
    ThreadingTaskRunner.join_all()
    assert redelivered and all(run is None for run in redelivered)
    assert statuses(storage) == {"t#0": "finished"}
    assert executions(uid, "t#0") == 1


@pytest.mark.parametrize("kind", ["django_redis", "db_sqlite"])
def test_a_run_whose_lease_expired_is_taken_over(kind, uid, settings, caplog):
    settings.TRIGGERS = {"LEASE": 0.5}
    storage = make_storage(kind, uid)
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Echo"}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("triggers.runners.ThreadingTaskRunner.run", lambda self, m, i: None)
        manager.fire("go")
    dead = Run.start(manager, "t#0")  # a worker that starts it, then dies: no heartbeat
    assert dead is not None and Run.start(manager, "t#0") is None  # the lease is current
    time.sleep(0.7)
    assert lease_expired(storage["t#0"])
    alive = Run.start(manager, "t#0")
    assert alive is not None and alive.token != dead.token
    assert "Taking over t#0" in caplog.text
    dead.finish({"from": "the dead run"})  # a late outcome of the old run: ignored
    alive.finish({"from": "the new run"})
    assert storage["t#0"].metadata["result"] == {"from": "the new run"}
    assert storage["t#0"].metadata["attempts"] == 2
    events = [e["event"] for e in storage.history() if e.get("instance") == "t#0"]
    assert events[-3:] == ["started", "recovered", "finished"]


def test_context_heartbeat_reports_a_stale_run(uid, settings):
    settings.TRIGGERS = {"LEASE": 0.3}
    storage = make_storage("django_redis", uid)
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Echo"}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("triggers.runners.ThreadingTaskRunner.run", lambda self, m, i: None)
        manager.fire("go")
    first = Run.start(manager, "t#0")
    assert first.heartbeat() is True
    time.sleep(0.5)
    assert Run.start(manager, "t#0") is not None  # taken over
    assert first.heartbeat() is False


def test_the_heartbeat_thread_stops_with_the_run(uid, settings):
    settings.TRIGGERS = {"LEASE": 0.3}
    storage = make_storage("django_redis", uid)
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Echo"}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("triggers.runners.ThreadingTaskRunner.run", lambda self, m, i: None)
        manager.fire("go")
    run = Run.start(manager, "t#0")
    with run.keep_alive():
        time.sleep(0.8)
        assert not lease_expired(storage["t#0"])
    assert not [t for t in threading.enumerate() if t.name.startswith("triggers-heartbeat:")]
