"""The guarantees under faults: expiry, finalization, outcomes (see docs/guarantees.rst)."""

import json
import threading
import time

import pytest
import redis

from tests.helpers import make_storage, statuses
from triggers import CacheStorageBackend, TriggerManager
from triggers.manager import FinalizingTriggerManager
from triggers.runners import ThreadingTaskRunner

pytestmark = pytest.mark.usefixtures("trigger_threading_runner")


# -- 1. A session with open work never expires ---------------------------------------------


@pytest.mark.parametrize("kind", ["django_redis", "redis"])
def test_a_session_with_open_work_outlives_its_timeout(kind, uid):
    storage = make_storage(kind, uid)
    storage.engine.timeout = storage.timeout = 2
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["a", "b"], "run": "tests.Echo"}})
    manager.fire("a", {"n": 1})
    time.sleep(3)  # longer than the timeout, while t#0 waits for "b"
    assert [i.name for i in manager.fire("b")] == ["t#0"]
    ThreadingTaskRunner.join_all()
    assert statuses(storage) == {"t#0": "finished"}
    # Idle now: every key of the session goes, together, once the timeout has passed.
    client = storage.engine.client
    pattern = f"*{{{uid}}}*"
    assert [k for k in client.scan_iter(match=pattern) if not k.startswith(b"lock")]
    time.sleep(3)
    assert [k for k in client.scan_iter(match=pattern) if not k.startswith(b"lock")] == []


def test_a_task_running_longer_than_the_timeout_records_its_outcome(uid):
    storage = CacheStorageBackend(uid, timeout=1)
    manager = TriggerManager(storage)
    manager.update_configuration({
        "t": {"after": ["go"], "run": "tests.Count"},
        "t_next": {"after": ["t"], "run": "tests.Echo"},
    })
    manager.fire("go", {"sleep": 2.5})
    ThreadingTaskRunner.join_all()
    assert statuses(storage) == {"t#0": "finished", "t_next#0": "finished"}


def test_an_outcome_for_a_missing_session_is_a_clear_logged_error(uid, caplog):
    from triggers.exceptions import InstanceNotFound

    storage = CacheStorageBackend(uid)
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Count"}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("triggers.runners.ThreadingTaskRunner.run", lambda self, m, i: None)
        manager.fire("go")
    storage.delete()  # the session vanished (deleted, or expired on a store without it)
    task = __import__("triggers.runners", fromlist=["x"]).BaseTaskRunner.resolve("tests.Count")
    with pytest.raises(InstanceNotFound, match=uid):
        task.execute_in_thread(TriggerManager(CacheStorageBackend(uid)), "t#0")
    assert any(uid in record.getMessage() and "t#0" in record.getMessage()
               for record in caplog.records if record.levelname == "ERROR")
    assert CacheStorageBackend(uid).tasks == {}  # not silently recreated


# -- 5. Finalization checks and fires in one step -------------------------------------------


def test_finalizing_checks_and_fires_atomically(uid):
    """A page fired by another process between the hook's check and its fire is seen."""
    storage = CacheStorageBackend(uid)
    manager = FinalizingTriggerManager(storage)
    manager.update_configuration({
        "t": {"after": ["go"], "run": "tests.Echo"},
        "t_page": {"after": ["go"], "andEvery": "page", "run": "tests.Echo"},
        "t_final": {"after": ["sessionFinalized"], "run": "tests.Echo"},
    })
    other = TriggerManager(CacheStorageBackend(uid))
    original = FinalizingTriggerManager.get_unresolved_tasks
    calls = []

    def racing_get_unresolved_tasks(self):
        found = original(self)
        # After the check saw nothing open, another process fires a page: open work again.
        if not [c for c in found if "sessionFinalized" not in c.after_names] and not calls:
            calls.append(1)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr("triggers.runners.ThreadingTaskRunner.run",
                              lambda runner, m, i: None)
                other.fire("page", {"n": 99})
        return found

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FinalizingTriggerManager, "get_unresolved_tasks",
                      racing_get_unresolved_tasks)
        manager.fire("go")
        manager.fire("page", {"n": 1})
        ThreadingTaskRunner.join_all()
    assert calls == [1]
    assert "sessionFinalized" not in storage.latest_kwargs  # t_page#? is still scheduled


# -- 2. A successful run is never recorded as failed, and its result is never lost -------


def test_a_lock_timeout_while_recording_does_not_fail_a_successful_run(uid):
    """The session lock is held 1.6 s while the task finishes (lock_timeout 1 s)."""
    storage = CacheStorageBackend(uid, lock_timeout=1)
    manager = TriggerManager(storage)
    manager.update_configuration({
        "t": {"after": ["go"], "run": "tests.Count"},
        "t_next": {"after": ["t"], "run": "tests.Echo"},
    })
    holding = threading.Event()

    def hold_the_lock():
        with CacheStorageBackend(uid).acquire_lock():
            holding.set()
            time.sleep(1.6)

    holder = threading.Thread(target=hold_the_lock)
    manager.fire("go", {"sleep": 0.3})
    holder.start()
    assert holding.wait(5)
    holder.join()
    ThreadingTaskRunner.join_all()
    assert statuses(storage) == {"t#0": "finished", "t_next#0": "finished"}
    assert storage["t#0"].metadata["result"] == {"instance": "t#0"}
    assert executions(uid, "t#0") == 1


def executions(uid, name):
    import redis
    from django.conf import settings

    from tests.app.tasks import execution_key

    return int(redis.Redis.from_url(settings.REDIS_URL).get(execution_key(uid, name)) or 0)


def test_an_outcome_the_store_cannot_take_is_spooled_and_recorded_later(
        own_redis, uid, settings, tmp_path):
    """Redis dies while the task runs and stays down past the retry bound: the result is
    spooled, recorded once Redis is back, and _run never runs again."""
    from triggers.run import flush_spool

    settings.TRIGGERS = {"OUTCOME_RETRY": 1, "OUTCOME_SPOOL": str(tmp_path)}
    storage = CacheStorageBackend(uid, cache="restartable", lock_expire=2, lock_timeout=2)
    manager = TriggerManager(storage)
    manager.update_configuration({
        "t": {"after": ["go"], "run": "tests.Count"},
        "t_next": {"after": ["t"], "run": "tests.Echo"},
    })
    manager.fire("go", {"sleep": 1})
    time.sleep(0.5)  # the task has started and sleeps
    own_redis.kill()
    ThreadingTaskRunner.join_all()
    spooled = list(tmp_path.glob("*.json"))
    assert len(spooled) == 1
    own_redis.start()  # the append-only file kept the session
    assert storage["t#0"].status == "running"
    assert flush_spool() == 1
    ThreadingTaskRunner.join_all()
    assert statuses(storage) == {"t#0": "finished", "t_next#0": "finished"}
    assert storage["t#0"].metadata["result"] == {"instance": "t#0"}
    assert executions(uid, "t#0") == 1
    assert list(tmp_path.iterdir()) == []


# -- 3. Ambiguous commits resolve themselves; idempotency keys -------------------------------


IDEM_CONFIG = {"t_page": {"after": [], "andEvery": "page", "run": "tests.Echo"}}


@pytest.mark.parametrize("kind", ["django_redis", "redis", "locmem", "memory", "db_sqlite",
                                  "db_postgres", "dict"])
def test_a_fire_repeated_with_its_idempotency_key_is_applied_once(kind, uid):
    manager = TriggerManager(make_storage(kind, uid))
    manager.update_configuration(IDEM_CONFIG)
    first = manager.fire("page", {"n": 1}, idempotency_key="request-1")
    again = TriggerManager(make_storage(kind, uid)).fire("page", {"n": 1},
                                                         idempotency_key="request-1")
    assert [i.name for i in first] == [i.name for i in again] == ["t_page#0"]
    manager.fire("page", {"n": 2}, idempotency_key="request-2")
    ThreadingTaskRunner.join_all()
    assert statuses(manager.storage) == {"t_page#0": "finished", "t_page#1": "finished"}
    fired = [e["trigger"] for e in manager.storage.history() if e["event"] == "fired"]
    assert fired.count("page") == 2


@pytest.mark.parametrize("kind", ["redis", "db_sqlite", "memory"])
def test_idempotency_keys_are_bounded(kind, uid, settings):
    settings.TRIGGERS = {"IDEMPOTENCY_KEYS": 3}
    manager = TriggerManager(make_storage(kind, uid))
    manager.update_configuration(IDEM_CONFIG)
    for n in range(5):
        manager.fire("page", {"n": n}, idempotency_key=f"k{n}")
    manager.fire("page", {"n": 4}, idempotency_key="k4")  # kept: applied once
    manager.fire("page", {"n": 0}, idempotency_key="k0")  # forgotten: applied again
    ThreadingTaskRunner.join_all()
    assert len(manager.storage.instances_of_task("t_page")) == 6


@pytest.mark.parametrize("key", ["", "   ", 42, "x" * 256])
def test_a_bad_idempotency_key_is_refused_and_changes_nothing(key, uid):
    from triggers.exceptions import InvalidArgument

    manager = TriggerManager(make_storage("redis", uid))
    manager.update_configuration(IDEM_CONFIG)
    before = manager.storage.debug_repr()
    with pytest.raises(InvalidArgument, match="idempotency_key"):
        manager.fire("page", idempotency_key=key)
    assert manager.storage.debug_repr() == before


@pytest.mark.parametrize("applied", [True, False])
def test_a_commit_whose_reply_is_lost_resolves_itself(applied, uid):
    """The connection breaks after the commit was sent (applied) or before (not applied):
    fire() returns normally either way and the andEvery fire is applied exactly once."""
    import redis

    storage = make_storage("redis", uid)
    manager = TriggerManager(storage)
    manager.update_configuration(IDEM_CONFIG)
    real = storage.engine._commit_indexed
    broken = []

    def lose_the_reply(keys, args, due):
        if not broken:
            broken.append(1)
            if applied:
                real(keys, args, due)
            raise redis.ConnectionError("Connection closed by server (simulated).")
        return real(keys, args, due)

    storage.engine._commit_indexed = lose_the_reply
    scheduled = manager.fire("page", {"n": 1})
    storage.engine._commit_indexed = real
    ThreadingTaskRunner.join_all()
    assert broken == [1]
    assert [i.name for i in scheduled] == ["t_page#0"]
    assert statuses(storage) == {"t_page#0": "finished"}


def test_a_commit_still_in_flight_after_the_check_is_refused(uid):
    """Once the check found a step's token absent, that step's commit can never apply."""
    storage = make_storage("redis", uid)
    manager = TriggerManager(storage)
    manager.update_configuration(IDEM_CONFIG)
    engine = storage.engine
    sent = {}
    real = engine._commit_indexed

    def capture(keys, args, due):
        sent.update(keys=keys, args=args)
        return real(keys, args, due)

    engine._commit_indexed = capture
    manager.fire("page", {"n": 1})
    engine._commit_indexed = real
    token = "f" * 16
    request = json.loads(sent["args"][0])
    request[1] = token
    args = [json.dumps(request)]
    assert engine._resolve(keys=[engine.key("t")],
                           args=[token, engine.token_window_ms()]) == b"absent"
    assert engine._commit(keys=sent["keys"], args=args) == b"aborted"


@pytest.mark.usefixtures("trigger_threading_runner")
def test_a_lost_reply_is_resolved_however_many_steps_followed(uid, monkeypatch):
    """The token of an applied step is kept for a time, not for a number of steps: a hot
    session does not push it out before the client that lost the reply checks."""
    monkeypatch.setattr("triggers.runners.ThreadingTaskRunner.run", lambda self, m, i: None)
    storage = make_storage("redis", uid)
    manager = TriggerManager(storage)
    manager.update_configuration(IDEM_CONFIG)
    others = TriggerManager(make_storage("redis", uid))
    real = storage.engine._commit_indexed
    broken = []

    def lose_the_reply(keys, args, due):
        if not broken:
            broken.append(1)
            real(keys, args, due)
            for n in range(300):  # other processes keep firing meanwhile
                others.fire("page", {"other": n})
            raise redis.ConnectionError("reply lost (simulated)")
        return real(keys, args, due)

    storage.engine._commit_indexed = lose_the_reply
    manager.fire("page", {"mine": 1})
    pages = [instance.kwargs["page"] for instance in storage.instances_of_task("t_page")]
    assert len([page for page in pages if "mine" in page]) == 1
    assert len(pages) == 301


@pytest.mark.usefixtures("trigger_threading_runner")
def test_a_commit_a_cluster_client_sends_again_is_applied_once(uid, monkeypatch):
    """redis-py's RedisCluster sends a command again after a connection error: a commit
    that was applied, whose reply was lost, must not be applied a second time."""
    from redis.cluster import RedisCluster

    monkeypatch.setattr("triggers.runners.ThreadingTaskRunner.run", lambda self, m, i: None)
    storage = make_storage("redis_cluster", uid)
    manager = TriggerManager(storage)
    manager.update_configuration(IDEM_CONFIG)
    commit_sha = storage.engine._commit.sha
    real = RedisCluster._execute_command
    lost = []

    def execute(self, node, *args, **kwargs):
        if args[:2] == ("EVALSHA", commit_sha) and not lost:
            lost.append(1)
            real(self, node, *args, **kwargs)  # applied on the server ...
            raise redis.ConnectionError("Connection closed by server.")  # ... reply lost
        return real(self, node, *args, **kwargs)

    monkeypatch.setattr(RedisCluster, "_execute_command", execute)
    manager.fire("page", {"mine": 1})
    assert lost == [1]
    assert len(storage.instances_of_task("t_page")) == 1
