"""The sweep: owed dispatches, timers and expired leases, found through the due index.

The first tests run over every bundled storage (the threading runner); the rest
kill, delay or disconnect real processes: the firing process, Celery workers,
the broker, and ``manage.py triggers sweep --loop`` processes, started and
stopped by PID.
"""

import json
import threading
import time
from io import StringIO

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command

from tests.app.tasks import execution_key
from tests.helpers import STORAGE_KINDS, make_storage
from tests.test_faults import run_child
from tests.workers import Sweeper, Worker, wait_for
from triggers import CacheStorageBackend, TriggerManager
from triggers.exceptions import InvalidArgument
from triggers.runners import CeleryTaskRunner, ThreadingTaskRunner
from triggers.sweep import sweep
from triggers.timers import due_at, sent_later
from triggers.types import lease_expired, now

INDEXED = {"django_redis", "builtin_redis", "redis", "redis_cluster", "db_sqlite", "db_postgres"}
CLAIMING = INDEXED


def _due(storage, until=None, limit=100_000):
    cls = type(storage)
    return set(cls.due_sessions(until or now(), limit, **storage.get_options()))


def _events(storage):
    return [event["event"] for event in storage.history()]


@pytest.fixture
def short_grace(settings):
    settings.TRIGGERS = {**getattr(settings, "TRIGGERS", {}), "DISPATCH_GRACE": 0.3}


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.parametrize("kind", [k for k in STORAGE_KINDS if k != "dict"])
def test_a_lost_dispatch_is_owed_and_swept(kind, uid, short_grace, trigger_threading_runner,
                                           monkeypatch):
    """A scheduled instance whose message never left is indexed as due after the grace
    period; the sweep sends it again, records it, and the session leaves the index."""
    storage = make_storage(kind, uid)
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Echo"},
                                  "t_idle": {"after": ["never"], "run": "tests.Echo"}})
    with monkeypatch.context() as patch:  # the process "died" before sending
        patch.setattr(ThreadingTaskRunner, "run", lambda self, manager, instance: None)
        manager.fire("go", {"n": 1})
    assert storage["t#0"].status.value == "scheduled"
    if kind in INDEXED:
        assert uid not in _due(storage)  # not owed before the grace period
    time.sleep(0.4)
    until = now()
    assert uid in _due(storage, until)
    if kind in CLAIMING:
        assert uid not in _due(storage)  # claimed: a second sweep does not get it
    sent, dues = manager.sweep()
    assert [(instance.name, what) for instance, what in sent] == [("t#0", "redispatched")]
    assert list(dues) == ["t#0"]  # owed again if this send is lost too (backing off)
    storage.swept(dues, until)
    ThreadingTaskRunner.join_all()
    assert storage["t#0"].status.value == "finished"
    assert "redispatched" in _events(storage)
    assert storage["t#0"].metadata.get("redispatches") is None  # struck off when it started
    # Nothing open is time-driven any more: the indexes no longer hold the session.
    time.sleep(max(dues["t#0"] - now(), 0) + 0.05)
    if kind in INDEXED:
        assert uid not in _due(storage, until=now() + 3600)
    assert manager.sweep() == ([], {})


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.parametrize("kind", ["redis", "db_postgres"])
def test_two_sweeps_at_once_send_each_instance_once(kind, uid, short_grace,
                                                    trigger_threading_runner, monkeypatch):
    storage = make_storage(kind, uid)
    manager = TriggerManager(storage)
    manager.update_configuration({f"t{n}": {"after": ["go"], "run": "tests.Echo"}
                                  for n in range(5)})
    sends = []
    guard = threading.Lock()

    def record(self, manager, instance):
        with guard:
            sends.append(instance.name)

    monkeypatch.setattr(ThreadingTaskRunner, "run", lambda self, manager, instance: None)
    manager.fire("go")
    time.sleep(0.4)
    monkeypatch.setattr(ThreadingTaskRunner, "run", record)
    barrier = threading.Barrier(4)
    errors = []

    def one_sweep():
        from django.db import connections

        try:
            barrier.wait()
            other = TriggerManager(type(storage)(uid, **storage.get_options()))
            other.sweep()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=one_sweep) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sorted(sends) == [f"t{n}#0" for n in range(5)]


@pytest.mark.django_db(transaction=True)
def test_due_times(uid, settings, trigger_threading_runner, monkeypatch):
    """Due by time: an owed dispatch, a start too far for a countdown, a lease's end."""
    settings.TRIGGERS = {"MAX_COUNTDOWN": 60, "DISPATCH_GRACE": 5}
    monkeypatch.setattr(ThreadingTaskRunner, "run", lambda self, manager, instance: None)
    storage = make_storage("redis", uid)
    manager = TriggerManager(storage)
    manager.update_configuration({"t_far": {"after": ["go"], "run": "tests.Echo", "delay": 3600},
                                  "t_near": {"after": ["go"], "run": "tests.Echo", "delay": 30}})
    stamp = now()
    manager.fire("go")
    far, near = storage["t_far#0"], storage["t_near#0"]
    assert sent_later(far) and not sent_later(near)
    assert due_at(far) == pytest.approx(stamp + 3600 - 60, abs=2)
    assert due_at(near) == pytest.approx(stamp + 30 + 5, abs=2)
    # A running instance is due when its lease ends.
    far.set_status("running", lease=stamp + 7, run="r1")
    assert due_at(far) == stamp + 7
    far.set_status("failed")
    assert due_at(far) is None  # failed instances wait for a human


def test_the_celery_runner_keeps_a_far_start_in_the_store(uid, settings, monkeypatch):
    """A start further than MAX_COUNTDOWN is never sent with a countdown above it."""
    settings.TRIGGERS = {"MAX_COUNTDOWN": 60}
    sent = []
    monkeypatch.setattr("celery.app.task.Task.apply_async",
                        lambda self, *args, **kwargs: sent.append(kwargs.get("countdown")))
    manager = TriggerManager(CacheStorageBackend(uid))
    manager.update_configuration({
        "t_far": {"after": ["go"], "run": "tests.Echo", "delay": 3600, "using": "celery"},
        "t_near": {"after": ["go"], "run": "tests.Echo", "delay": 30, "using": "celery"}})
    manager.fire("go")
    assert len(sent) == 1 and 0 < sent[0] <= 30
    # The sweep hands the far one over once it is MAX_COUNTDOWN away, with a countdown
    # below the cap.
    instance = manager.storage["t_far#0"]
    instance.metadata["redispatch_at"] = instance.start_after + 5
    assert not sent_later(instance)
    CeleryTaskRunner().run(manager, instance)
    assert len(sent) == 2 and sent[1] > 60  # sent directly: the sweep only does it when due


@pytest.mark.usefixtures("trigger_threading_runner")
def test_the_command_and_the_celery_task_sweep(uid, short_grace, monkeypatch):
    from celery import current_app

    manager = TriggerManager(CacheStorageBackend(uid))
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Echo"}})
    with monkeypatch.context() as patch:
        patch.setattr(ThreadingTaskRunner, "run", lambda self, manager, instance: None)
        manager.fire("go")
    time.sleep(0.4)
    out = StringIO()
    call_command("triggers", "sweep", "--storage", "cache", stdout=out)
    assert f"{uid}: t#0 redispatched" in out.getvalue()
    assert out.getvalue().startswith("Swept ")
    ThreadingTaskRunner.join_all()
    assert manager.storage["t#0"].status.value == "finished"
    result = current_app.tasks["triggers.sweep"].apply(kwargs={"storage": "cache"}).get()
    assert set(result) == {"sessions", "sent", "outcomes", "errors"}
    assert result["errors"] == 0


def test_sweep_refuses_bad_input():
    with pytest.raises(InvalidArgument, match="limit"):
        sweep("memory", limit=0)
    out = StringIO()
    with pytest.raises(Exception, match="interval"):
        call_command("triggers", "sweep", "--interval", "0", stdout=out)


# -- real processes -------------------------------------------------------------------

FAST = json.dumps({"DISPATCH_GRACE": 1})


@pytest.fixture
def counts():
    import redis

    client = redis.Redis.from_url(django_settings.REDIS_URL)
    return lambda uid, name: int(client.get(execution_key(uid, name)) or 0)


def _fire_and_die_before_sending(uid):
    """A process fires, and is SIGKILLed right after its commit, before it sends."""
    child = run_child(f"""
        import os, signal
        from triggers import CacheStorageBackend, TriggerManager
        manager = TriggerManager(CacheStorageBackend({uid!r}))
        manager.update_configuration({{"t": {{"after": ["go"], "run": "tests.CountAlone"}}}})
        TriggerManager.dispatch = lambda self, instances: os.kill(os.getpid(), signal.SIGKILL)
        manager.fire("go")
        print("not reached", flush=True)
    """, TRIGGERS_TEST_SETTINGS=FAST)
    output, _ = child.communicate(timeout=120)
    assert child.returncode == -9, output


def test_a_process_killed_between_commit_and_send_loses_nothing(uid, counts):
    """The firing process dies right after its commit, before it sends the message: the
    sweep sends it within the grace period, and it runs exactly once (two sweep
    processes run at once)."""
    _fire_and_die_before_sending(uid)
    storage = CacheStorageBackend(uid)
    alone = [f"{django_settings.TEST_QUEUE}-alone"]
    worker = Worker(queues=alone).start()
    sweepers = []
    try:
        time.sleep(1.5)  # past the grace period: no message was ever sent
        assert storage["t#0"].status.value == "scheduled" and counts(uid, "t#0") == 0
        sweepers = [Sweeper(interval=0.2, settings_json=FAST).start() for _ in range(2)]
        wait_for(lambda: storage["t#0"].status.value == "finished", timeout=30,
                 message=f"the sweep to send t#0\n{sweepers[0].log()}")
        time.sleep(2.5)  # a doubled send would have run by now
    finally:
        for sweeper in sweepers:
            sweeper.stop()
        worker.stop()
    assert counts(uid, "t#0") == 1
    assert "redispatched" in _events(storage)


@pytest.mark.parametrize("acks_late", [False, True], ids=["acks_early", "acks_late"])
def test_a_killed_worker_is_taken_over_automatically(uid, counts, acks_late):
    """A worker SIGKILLed mid-task: with a sweep running, the instance runs again exactly
    once, within about a lease, with no command run by hand (with Celery's acks_late the
    broker also redelivers the message: still once)."""
    alone = [f"{django_settings.TEST_QUEUE}-alone"]
    doomed = Worker(concurrency=1, lease=3, queues=alone, acks_late=acks_late).start()
    manager = TriggerManager(CacheStorageBackend(uid))
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.CountAlone"},
                                  "t_next": {"after": ["t"], "run": "tests.Echo"}})
    manager.fire("go", {"sleep": 4})
    storage = manager.storage
    try:
        wait_for(lambda: storage["t#0"].status.value == "running", message="t#0 running")
        doomed.kill()
    finally:
        doomed.stop()
    killed_at = time.monotonic()
    sweeper = Sweeper(settings_json=FAST).start()
    rescuer = Worker(queues=[*alone, django_settings.TEST_QUEUE], acks_late=acks_late).start()
    try:
        wait_for(lambda: storage.instances.get("t_next#0") is not None
                 and storage["t_next#0"].status.value == "finished", timeout=60,
                 message=f"the takeover and its cascade\n{sweeper.log()}")
        took = time.monotonic() - killed_at
        time.sleep(2)  # a doubled start would have counted by now
    finally:
        sweeper.stop()
        rescuer.stop()
    assert counts(uid, "t#0") == 2  # the killed run, and one more
    assert storage["t#0"].metadata["attempts"] == 2
    assert "takeover" in _events(storage) or acks_late  # acks_late: the redelivery may win
    assert took < 3 + 4 + 30  # lease + the task + worker start-up and sweep interval


@pytest.mark.parametrize("broker", ["rabbitmq", "redis"])
def test_a_delay_longer_than_the_countdown_cap_runs_once_at_its_time(uid, counts, broker):
    """MAX_COUNTDOWN 1 s and a 5 s delay: the message is not sent at fire time (a broker
    would drop or deliver again a message waiting past its limit: a Redis broker does
    after ``visibility_timeout``, 2 s here); the sweep hands it over when due, and it
    runs once, not before its start."""
    env = {} if broker == "rabbitmq" else {
        "TRIGGERS_TEST_BROKER_URL": django_settings.REDIS_URL,
        "TRIGGERS_TEST_BROKER_OPTIONS": json.dumps({"visibility_timeout": 2})}
    settings_json = json.dumps({"DISPATCH_GRACE": 1, "MAX_COUNTDOWN": 1})
    child = run_child(f"""
        from triggers import CacheStorageBackend, TriggerManager
        manager = TriggerManager(CacheStorageBackend({uid!r}))
        manager.update_configuration({{"t": {{"after": ["go"], "run": "tests.CountAlone",
                                              "delay": 5}}}})
        manager.fire("go")
    """, TRIGGERS_TEST_SETTINGS=settings_json, **env)
    output, _ = child.communicate(timeout=120)
    assert child.returncode == 0, output
    storage = CacheStorageBackend(uid)
    alone = [f"{django_settings.TEST_QUEUE}-alone"]
    worker = Worker(queues=alone, env=env).start()
    sweeper = Sweeper(settings_json=settings_json, env=env).start()
    try:
        wait_for(lambda: storage["t#0"].status.value == "finished", timeout=40,
                 message=f"the timer\n{sweeper.log()}\n{worker.log()}")
        time.sleep(3)  # a message delivered again would have run by now
    finally:
        sweeper.stop()
        worker.stop()
    instance = storage["t#0"]
    assert instance.metadata["started"] >= instance.start_after - 0.05
    assert counts(uid, "t#0") == 1 and instance.metadata["attempts"] == 1
    assert "timer" in _events(storage)
    assert ("redis://" if broker == "redis" else "amqp://") in worker.log()


def test_broker_down_during_a_sweep_is_retried(uid, counts):
    """The sweep cannot reach the broker: the send is recorded as failed and owed again;
    a later sweep (broker back) sends it, once."""
    _fire_and_die_before_sending(uid)
    storage = CacheStorageBackend(uid)
    time.sleep(1.2)
    down = Sweeper(settings_json=FAST,
                   env={"TRIGGERS_TEST_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//"}).start()
    try:
        wait_for(lambda: "dispatch_error" in storage["t#0"].metadata, timeout=120,
                 message=f"the failed send\n{down.log()}")
    finally:
        down.stop()
    assert storage["t#0"].status.value == "scheduled"
    alone = [f"{django_settings.TEST_QUEUE}-alone"]
    worker = Worker(queues=alone).start()
    sweeper = Sweeper(settings_json=FAST).start()
    try:
        wait_for(lambda: storage["t#0"].status.value == "finished", timeout=60,
                 message=f"the send once the broker is back\n{sweeper.log()}")
        time.sleep(2)
    finally:
        sweeper.stop()
        worker.stop()
    assert counts(uid, "t#0") == 1


# -- the sweep as a service ----------------------------------------------------------


def test_the_loop_survives_an_unreachable_store():
    """A store that cannot be reached fails a pass, not the loop: the next pass runs."""
    from triggers.sweep import sweep_forever

    outcomes = []
    sweep_forever(0.05, "cache", passes=3, cache="restartable", on_pass=outcomes.append)
    assert len(outcomes) == 3 and all(isinstance(o, Exception) for o in outcomes)


@pytest.mark.django_db(transaction=True, databases=["default", "postgres"])
def test_the_loop_reconnects_after_its_database_connection_dropped():
    import psycopg
    from django.db import connections

    from triggers.sweep import sweep_forever

    sweep("db", using="postgres")
    pid = connections["postgres"].connection.info.backend_pid
    db = connections["postgres"].settings_dict
    with psycopg.connect(host=db["HOST"], port=db["PORT"], user=db["USER"], dbname=db["NAME"],
                         autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [pid])
    time.sleep(0.3)
    outcomes = []
    sweep_forever(0.05, "db", passes=3, using="postgres", on_pass=outcomes.append)
    assert sum(isinstance(o, Exception) for o in outcomes) <= 1, outcomes
    assert not isinstance(outcomes[-1], Exception)


@pytest.mark.usefixtures("trigger_threading_runner")
def test_sweeping_does_not_keep_an_idle_session_alive(uid):
    """On a cache without a due index the sweep looks at every session: a look that
    changes nothing writes nothing, so an idle session still expires."""
    storage = CacheStorageBackend(uid, cache="locmem", timeout=2)
    TriggerManager(storage).update_configuration({"t": {"after": ["go"], "run": "tests.Echo"}})
    for _ in range(4):
        sweep("cache", cache="locmem", timeout=2)
        time.sleep(0.8)
    assert uid not in set(CacheStorageBackend.session_uids(cache="locmem"))


@pytest.mark.usefixtures("trigger_threading_runner")
@pytest.mark.parametrize("kind", ["redis", "redis_cluster"])
def test_a_step_that_raced_a_sweep_leaves_the_index_exact(kind, uid, short_grace, monkeypatch):
    """A worker starts an instance while a sweep commits its step: the sweep's step runs
    again and finds nothing due; the index then holds the lease's end, not later."""
    from triggers.run import Run
    from triggers.storages.redis import RedisEngine

    storage = make_storage(kind, uid)
    manager = TriggerManager(storage)
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Echo"}})
    monkeypatch.setattr(ThreadingTaskRunner, "run", lambda self, manager, instance: None)
    manager.fire("go")

    def owed_long_ago(step):  # sent 8 times already: the next send is far away
        instance = step.instance("t#0")
        instance.metadata["redispatches"] = 8
        instance.metadata["redispatch_at"] = round(time.time() - 0.1, 3)
        step.save(instance)

    storage.transact(owed_long_ago)
    original = RedisEngine._commit_indexed
    raced = []

    def racing(self, keys, args, index):
        if not raced:
            raced.append(1)
            worker = TriggerManager(type(storage)(uid, **storage.get_options()))
            assert Run.start(worker, "t#0") is not None  # the late message arrives
        return original(self, keys, args, index)

    monkeypatch.setattr(RedisEngine, "_commit_indexed", racing)
    sent, dues = manager.sweep()
    assert raced and sent == []
    lease = float(storage["t#0"].metadata["lease"])
    index = storage.engine.index
    assert index.client.zscore(index.key_of(uid), index.member(uid, "t#0")) == \
        pytest.approx(lease, abs=0.01)


@pytest.mark.parametrize("lease_state", ["expired", "current"])
def test_a_redelivered_message_of_a_killed_worker(uid, counts, lease_state):
    """With acks_late and reject_on_worker_lost the broker delivers a killed worker's
    message again (no sweep runs here): once the lease expired it starts a new run;
    while the lease is current it is a logged no-op."""
    alone = [f"{django_settings.TEST_QUEUE}-alone"]
    doomed = Worker(concurrency=1, lease=3, queues=alone, acks_late=True).start()
    manager = TriggerManager(CacheStorageBackend(uid))
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.CountAlone"}})
    # Long enough to be still running once a second worker has started.
    manager.fire("go", {"sleep": 2 if lease_state == "expired" else 15})
    storage = manager.storage
    rescuer = None
    try:
        wait_for(lambda: storage["t#0"].status.value == "running", message="t#0 running")
        if lease_state == "current":
            rescuer = Worker(queues=alone, acks_late=True).start()
        doomed.kill()
        if lease_state == "expired":
            wait_for(lambda: lease_expired(storage["t#0"]), timeout=10, message="the lease ends")
            rescuer = Worker(queues=alone, acks_late=True).start()
            wait_for(lambda: storage["t#0"].status.value == "finished", timeout=30,
                     message=f"the redelivered run\n{rescuer.log()}")
            assert "Taking over t#0" in rescuer.log()
            assert counts(uid, "t#0") == 2 and storage["t#0"].metadata["attempts"] == 2
        else:
            wait_for(lambda: "Ignoring a delivery of t#0" in rescuer.log(), timeout=30,
                     message=f"the redelivery to be ignored\n{rescuer.log()}")
            assert storage["t#0"].status.value == "running"
            assert counts(uid, "t#0") == 1
    finally:
        doomed.stop()
        if rescuer is not None:
            rescuer.stop()


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.parametrize("kind", ["redis", "db_sqlite"])
def test_a_session_that_cannot_be_swept_does_not_hold_up_the_others(kind, uid, short_grace,
                                                                     trigger_threading_runner,
                                                                     monkeypatch):
    """Claimed work a sweep could not do comes back after the claim, not first every pass."""
    monkeypatch.setattr(ThreadingTaskRunner, "run", lambda self, manager, instance: None)
    from triggers.storages.redis import RedisStorageBackend

    def make(session):  # on Redis, an index of its own: only these two sessions are due
        if kind == "redis":
            return RedisStorageBackend(session, url=django_settings.REDIS_URL,
                                       prefix=f"triggers-tests-{uid}:")
        return make_storage(kind, session)

    managers = []
    for suffix in ("broken", "fine"):
        manager = TriggerManager(make(f"{uid}-{suffix}"))
        manager.update_configuration({"t": {"after": ["go"], "run": "tests.Echo"}})
        manager.fire("go")
        managers.append(manager)
        time.sleep(0.05)  # the broken one is due first
    time.sleep(0.4)
    options = managers[0].storage.get_options()
    storage_key = "redis" if kind == "redis" else "db"
    failing = {f"{uid}-broken"}
    real_sweep = TriggerManager.sweep

    def sweep_or_fail(self):
        if self.storage.uid in failing:
            raise RuntimeError("this session cannot be swept (simulated)")
        return real_sweep(self)

    monkeypatch.setattr(TriggerManager, "sweep", sweep_or_fail)
    # One session per pass. The database takes the soonest due first (the broken one);
    # Redis's shards come in a random order.
    reports = [sweep(storage_key, limit=1, **options) for _ in range(3)]
    assert [(u, n) for r in reports for u, n, _kind in r.sent] == [(f"{uid}-fine", "t#0")]
    assert [u for r in reports for u, _error in r.errors] == [f"{uid}-broken"]
    if kind == "db_sqlite":
        assert reports[0].errors


def test_a_live_run_three_times_its_lease_is_never_taken_over(uid, counts):
    """On the prefork pool the heartbeat renews the lease: a sweep running all along
    (and a second worker) never start the instance again, however long it runs."""
    alone = [f"{django_settings.TEST_QUEUE}-alone"]
    worker = Worker(concurrency=1, lease=1, queues=alone).start()
    spare = Worker(concurrency=1, lease=1, queues=alone).start()
    sweeper = Sweeper(interval=0.2, settings_json=FAST).start()
    manager = TriggerManager(CacheStorageBackend(uid))
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.CountAlone"}})
    try:
        manager.fire("go", {"sleep": 3.5})
        storage = manager.storage
        wait_for(lambda: storage["t#0"].status.value == "finished", timeout=60,
                 message=f"the long run\n{sweeper.log()}")
    finally:
        sweeper.stop()
        spare.stop()
        worker.stop()
    assert counts(uid, "t#0") == 1 and storage["t#0"].metadata["attempts"] == 1
    assert "takeover" not in _events(storage)
