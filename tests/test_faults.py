"""Faults: a killed lock holder, the broker down, Redis stopped or restarted mid-fire."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from io import StringIO

import pytest
from django.core.management import call_command

from tests.workers import ROOT, Worker, wait_for
from triggers import CacheStorageBackend, TriggerManager
from triggers.exceptions import StorageError

RESTART_PORT = 6391


def child_env(**extra):
    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_child(code, **env):
    script = "import django\ndjango.setup()\n" + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=child_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_killed_lock_holder_blocks_for_at_most_the_expiry(uid):
    """A process SIGKILLed while holding a session lock blocks it no longer than the expiry."""
    holder = run_child(f"""
        import time
        from triggers import CacheStorageBackend
        storage = CacheStorageBackend({uid!r}, lock_expire=3)
        with storage.acquire_lock():
            print("locked", flush=True)
            time.sleep(600)
    """)
    assert holder.stdout.readline().strip() == "locked", holder.stdout.read()
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait(10)
    killed_at = time.monotonic()
    storage = CacheStorageBackend(uid, lock_timeout=20)
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["a", "b"], "run": "tests.Echo"}})
    waited = time.monotonic() - killed_at
    assert waited <= 3.5
    manager.fire("a")
    assert storage["t#0"].kwargs == {"a": {}}


def test_broker_down_at_dispatch_records_and_recovers(uid):
    """With the broker unreachable fire() records the trigger, the instance stays scheduled
    with the dispatch error; recovery dispatches it once the broker is back."""
    child = run_child(f"""
        from triggers import CacheStorageBackend, TriggerManager
        manager = TriggerManager(CacheStorageBackend({uid!r}))
        manager.update_configuration({{"t": {{"after": ["go"], "run": "tests.Echo"}}}})
        print("scheduled:", [i.name for i in manager.fire("go", {{"n": 1}})], flush=True)
    """, TRIGGERS_TEST_BROKER_URL="amqp://guest:guest@127.0.0.1:1//")
    output, _ = child.communicate(timeout=120)
    assert child.returncode == 0, output
    assert "scheduled: ['t#0']" in output
    storage = CacheStorageBackend(uid)
    instance = storage["t#0"]
    assert instance.status.value == "scheduled"
    assert "OperationalError" in instance.metadata["dispatch_error"]
    assert storage.latest_kwargs["go"] == {"n": 1}
    worker = Worker().start()
    try:
        out = StringIO()
        call_command("triggers", "recover", uid, "--storage", "cache", "--older-than", "0",
                     stdout=out)
        assert f"{uid}: re-dispatched t#0 (was scheduled)" in out.getvalue()
        wait_for(lambda: storage["t#0"].status.value == "finished", message="recovered t#0")
    finally:
        worker.stop()
    assert "dispatch_error" not in storage["t#0"].metadata


def test_redis_stopped_and_restarted_around_fire(own_redis, uid, trigger_threading_runner):
    """Redis down: fire() raises a clear StorageError; after a restart the state is consistent."""
    storage = CacheStorageBackend(uid, cache="restartable", lock_expire=2, lock_timeout=10)
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["a", "b"], "run": "tests.Echo"}})
    manager.fire("a", {"x": 1})
    before = storage.debug_repr()

    own_redis.kill()
    with pytest.raises(StorageError, match=uid):
        manager.fire("b", {"y": 2})

    # Connection lost in the middle of fire(): after the read, before the write.
    own_redis.start()
    original = storage.engine.commit

    def crash_then_write(step):
        own_redis.kill()
        return original(step)

    storage.engine.commit = crash_then_write
    with pytest.raises(StorageError, match=uid):
        manager.fire("b", {"y": 2})
    storage.engine.commit = original

    own_redis.start()
    assert storage.debug_repr() == before
    manager.fire("b", {"y": 2})
    from triggers.runners import ThreadingTaskRunner

    ThreadingTaskRunner.join_all()
    assert storage["t#0"].status.value == "finished"
    assert storage["t#0"].metadata["result"] == {"seen": {"a": {"x": 1}, "b": {"y": 2}}}


def test_recover_command_lists_sessions(uid, redis_server):
    """`triggers recover --all` scans the Redis cache, reports a corrupt session, goes on."""
    from django.core.management.base import CommandError

    manager = TriggerManager(CacheStorageBackend(uid))
    manager.update_configuration({"t": {"after": ["a", "b"], "run": "tests.Echo"}})
    corrupt = CacheStorageBackend(f"{uid}-corrupt")
    redis_server.set(corrupt.engine.key("state"), b"not json")  # the layout of release 1
    assert {uid, corrupt.uid} <= set(CacheStorageBackend.session_uids("default"))
    out, err = StringIO(), StringIO()
    with pytest.raises(CommandError, match=f"could not be recovered: .*{corrupt.uid}"):
        call_command("triggers", "recover", "--all", "--storage", "cache", "--older-than",
                     "3600", stdout=out, stderr=err)
    assert f"{corrupt.uid}: not recovered: Stored state of session" in err.getvalue()
    assert "Recovered 0 instance(s)" in out.getvalue()
