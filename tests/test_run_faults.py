"""The run protocol when a store's reply is lost, or recording an outcome takes a while."""

import time

import pytest
import redis

from tests.helpers import make_storage, statuses
from triggers import TriggerManager
from triggers.exceptions import StorageError
from triggers.run import Run


def _lose_one_reply(storage, down_for: float) -> dict:
    """The next commit is applied but its reply lost; resolving it fails for ``down_for`` s."""
    engine = storage.engine
    real_commit, real_resolve = engine._commit_indexed, engine._resolve
    state: dict = {"until": None}

    def commit(keys, args, due):
        if state["until"] is None:
            real_commit(keys, args, due)
            state["until"] = time.monotonic() + down_for
            raise redis.ConnectionError("reply lost (simulated)")
        return real_commit(keys, args, due)

    def resolve(keys, args):
        if time.monotonic() < state["until"]:
            raise redis.ConnectionError("still unreachable (simulated)")
        return real_resolve(keys=keys, args=args)

    engine._commit_indexed, engine._resolve = commit, resolve
    state["restore"] = lambda: (setattr(engine, "_commit_indexed", real_commit),
                                setattr(engine, "_resolve", real_resolve))
    return state


@pytest.fixture
def dispatched(monkeypatch):
    sent: list[str] = []
    monkeypatch.setattr("triggers.runners.ThreadingTaskRunner.run",
                        lambda self, manager, instance: sent.append(instance.name))
    return sent


@pytest.mark.usefixtures("trigger_threading_runner")
def test_a_finish_applied_whose_reply_was_lost_still_dispatches_its_cascade(uid, settings,
                                                                            dispatched):
    settings.TRIGGERS = {"OUTCOME_RETRY": 20}
    storage = make_storage("redis", uid)
    storage.lock_timeout = 0.3  # the store gives up resolving after 1 s; the run retries
    manager = TriggerManager(storage)
    manager.update_configuration({
        "t": {"after": ["go"], "run": "tests.Echo"},
        "t_next": {"after": ["t"], "run": "tests.Echo"},
    })
    manager.fire("go")
    run = Run.start(manager, "t#0")
    fault = _lose_one_reply(storage, 1.5)
    try:
        run.finish({"ok": 1})
    finally:
        fault["restore"]()
    assert statuses(storage) == {"t#0": "finished", "t_next#0": "scheduled"}
    assert dispatched == ["t#0", "t_next#0"]


@pytest.mark.usefixtures("trigger_threading_runner")
def test_a_start_applied_whose_reply_was_lost_still_runs(uid, settings, dispatched):
    settings.TRIGGERS = {"OUTCOME_RETRY": 20}
    storage = make_storage("redis", uid)
    storage.lock_timeout = 0.3
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Echo"}})
    manager.fire("go")
    fault = _lose_one_reply(storage, 1.5)
    try:
        run = Run.start(manager, "t#0")
    finally:
        fault["restore"]()
    assert run is not None and run.instance.status.value == "running"
    assert run.token == storage["t#0"].metadata["run"]


@pytest.mark.usefixtures("trigger_threading_runner")
def test_a_retry_that_was_spooled_dispatches_nothing(uid, settings, tmp_path, monkeypatch,
                                                     dispatched):
    settings.TRIGGERS = {"OUTCOME_RETRY": 0.3, "OUTCOME_SPOOL": str(tmp_path)}
    storage = make_storage("redis", uid)
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Echo"}})
    manager.fire("go")
    run = Run.start(manager, "t#0")
    real_commit = storage.commit

    def down(step):
        raise StorageError("Redis unreachable (simulated)")

    monkeypatch.setattr(storage, "commit", down)
    assert run.retry(cooldown=0) is None
    monkeypatch.setattr(storage, "commit", real_commit)
    assert dispatched == ["t#0"]  # no clone that was never stored
    assert statuses(storage) == {"t#0": "running"}
    assert len(list(tmp_path.glob("*.json"))) == 1


@pytest.mark.usefixtures("trigger_threading_runner")
def test_the_lease_is_renewed_while_an_outcome_is_being_retried(uid, settings, monkeypatch,
                                                               dispatched):
    settings.TRIGGERS = {"LEASE": 0.6, "OUTCOME_RETRY": 10}
    storage = make_storage("redis", uid)
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Echo"}})
    manager.fire("go")
    run = Run.start(manager, "t#0")
    real = storage.transact
    until = time.monotonic() + 1.5
    attempts = []

    def transact(step_function, want=None):
        # Recording the outcome keeps failing for a while (heartbeats get through).
        if step_function.__name__ == "step_function" and time.monotonic() < until:
            attempts.append(1)
            other = Run.start(TriggerManager(make_storage("redis", uid)), "t#0")
            assert other is None, "the lease lapsed while the outcome was being retried"
            raise StorageError("lock timeout (simulated)")
        return real(step_function, want)

    monkeypatch.setattr(storage, "transact", transact)
    run.finish({"ok": 1})
    assert len(attempts) >= 3
    assert statuses(storage) == {"t#0": "finished"}


def _terminate_backend(alias: str) -> None:
    """Kill the PostgreSQL backend serving this thread's connection (a restart, a failover)."""
    import psycopg
    from django.conf import settings as django_settings
    from django.db import connections

    connection = connections[alias]
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    db = django_settings.DATABASES[alias]
    with psycopg.connect(host=db["HOST"], port=db["PORT"], user=db["USER"],
                         dbname=connection.settings_dict["NAME"], autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [pid])


@pytest.mark.usefixtures("trigger_threading_runner")
@pytest.mark.django_db(transaction=True, databases=["default", "postgres"])
def test_an_outcome_is_recorded_after_the_database_connection_dropped(uid, settings, tmp_path,
                                                                      dispatched):
    from triggers.storages.database import DatabaseStorageBackend

    settings.TRIGGERS = {"OUTCOME_RETRY": 10, "OUTCOME_SPOOL": str(tmp_path)}
    storage = DatabaseStorageBackend(uid, using="postgres")
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Echo"},
                                  "t_next": {"after": ["t"], "run": "tests.Echo"}})
    manager.fire("go")
    run = Run.start(manager, "t#0")
    _terminate_backend("postgres")
    run.finish({"ok": 1})
    assert statuses(storage) == {"t#0": "finished", "t_next#0": "scheduled"}
    assert dispatched == ["t#0", "t_next#0"]
    assert not list(tmp_path.iterdir())  # recorded by a retry, not spooled


@pytest.mark.usefixtures("trigger_threading_runner")
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("key", [None, "order-42"])
def test_a_fire_deferred_to_the_commit_survives_a_connection_reset(uid, dispatched, key):
    from django.db import transaction

    storage = make_storage("redis", uid)
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Echo"}})
    engine = storage.engine
    real_read, real_commit = engine._read, engine._commit_indexed
    calls = []

    def read(keys, args):
        calls.append("read")
        if len(calls) == 1:  # a failover just as the transaction commits
            raise redis.ConnectionError("Connection reset by peer (simulated)")
        return real_read(keys=keys, args=args)

    def commit(keys, args, due):
        calls.append("commit")
        if calls.count("commit") == 1:  # and the reply of the first commit is lost
            real_commit(keys, args, due)
            raise redis.ConnectionError("reply lost (simulated)")
        return real_commit(keys, args, due)

    engine._read, engine._commit_indexed = read, commit
    engine._resolve = lambda keys, args: (_ for _ in ()).throw(
        redis.ConnectionError("still unreachable (simulated)"))
    storage.lock_timeout = 0.2
    with transaction.atomic():
        assert manager.fire("go", {"order": 42}, idempotency_key=key) == []
    assert storage.latest_kwargs["go"] == {"order": 42}
    assert statuses(storage) == {"t#0": "scheduled"}  # applied once
    assert dispatched == ["t#0"]


@pytest.mark.usefixtures("trigger_threading_runner")
def test_a_spooled_outcome_that_cannot_be_recorded_is_kept_aside(uid, settings, tmp_path,
                                                                 monkeypatch, dispatched):
    import os

    from triggers.run import flush_spool

    settings.TRIGGERS = {"OUTCOME_RETRY": 0.2, "OUTCOME_SPOOL": str(tmp_path)}
    storage = make_storage("redis", uid)
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Echo"}})
    manager.fire("go")
    run = Run.start(manager, "t#0")
    real_commit = storage.commit

    def down(step):
        raise StorageError("Redis unreachable (simulated)")

    monkeypatch.setattr(storage, "commit", down)
    run.finish({"ok": 1})
    monkeypatch.setattr(storage, "commit", real_commit)
    [spooled] = tmp_path.glob("*.json")
    storage.delete()  # the session is gone before the store is back
    assert flush_spool() == 0
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*.claimed"))
    assert [path.name for path in (tmp_path / "failed").iterdir()] == [spooled.name]
    # A claim whose flusher died is taken back after a while.
    claimed = tmp_path / "1-abandoned.claimed"
    claimed.write_text((tmp_path / "failed" / spooled.name).read_text())
    os.utime(claimed, (time.time() - 3600, time.time() - 3600))
    flush_spool()
    assert not claimed.exists()
    assert len(list((tmp_path / "failed").iterdir())) == 2  # tried again, kept aside again
