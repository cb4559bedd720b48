"""Many OS processes fire into many sessions at once: every task runs exactly once."""

import multiprocessing
import time
import uuid

import pytest
import redis
from django.conf import settings

from tests import concurrency
from tests.helpers import make_storage
from tests.workers import Worker, wait_for
from triggers import TriggerManager


def run_processes(runner, uids, kind):
    """Start the firing processes (spawned), wait for them; return how many fires they made."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(concurrency.PROCESSES)
    results = context.Queue()
    processes = [context.Process(target=concurrency.run_in_child,
                                 args=(n, uids, runner, barrier, 1234, results, kind))
                 for n in range(concurrency.PROCESSES)]
    for process in processes:
        process.start()
    try:
        outcomes = [results.get(timeout=240) for _ in processes]
    finally:
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
    errors = [outcome for outcome in outcomes if isinstance(outcome, str)]
    assert not errors, errors
    assert all(process.exitcode == 0 for process in processes)
    return sum(outcomes)


def check_sessions(uids, timeout, kind):
    """Every session ends with the expected instances, all finished, each run exactly once."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    expected = concurrency.expected_instances()
    total = sum(expected.values())

    def all_finished():
        return all(int(client.get(f"executions:{uid}") or 0) >= total for uid in uids) and all(
            not TriggerManager(make_storage(kind, uid)).get_unresolved_instances()
            for uid in uids)

    wait_for(all_finished, timeout=timeout, interval=0.5, message="every session to finish")
    for uid in uids:
        storage = make_storage(kind, uid)
        for task, count in expected.items():
            instances = storage.instances_of_task(task)
            assert len(instances) == count, (uid, task, [i.name for i in instances])
            assert {i.status.value for i in instances} == {"finished"}, storage.debug_repr()
            for instance in instances:
                runs = int(client.get(f"executions:{uid}:{instance.name}") or 0)
                assert runs == 1, (uid, instance.name, runs)
        pages = sorted((i.kwargs["page"]["process"], i.kwargs["page"]["n"])
                       for i in storage.instances_of_task("t_every"))
        assert pages == sorted((p, n) for p in range(concurrency.PROCESSES)
                               for n in range(concurrency.PAGES_PER_PROCESS))
        assert int(client.get(f"executions:{uid}")) == total


def prepare_sessions(kind):
    uids = [f"c-{uuid.uuid4().hex[:10]}" for _ in range(concurrency.SESSIONS)]
    for uid in uids:
        TriggerManager(make_storage(kind, uid)).update_configuration(concurrency.configuration())
    return uids


@pytest.mark.parametrize("runner, kind", [
    ("threading", "django_redis"),
    ("celery", "django_redis"),
    ("celery", "redis_cluster"),
    ("celery", "db_postgres"),
])
def test_processes_fire_into_fifty_sessions(runner, kind, monkeypatch):
    """8 processes behind a barrier, 50 sessions: exactly-once runs, exact andEvery counts."""
    if kind == "db_postgres":
        from django.db import connections

        # Child processes and the worker use the test database of this run.
        monkeypatch.setenv("TRIGGERS_TEST_PG_NAME", connections["postgres"].settings_dict["NAME"])
    worker = Worker(concurrency=4).start() if runner == "celery" else None
    try:
        uids = prepare_sessions(kind)
        started = time.monotonic()
        fired = run_processes(runner, uids, kind)
        assert fired == concurrency.PROCESSES * concurrency.SESSIONS * (
            1 + concurrency.PAGES_PER_PROCESS)
        check_sessions(uids, timeout=180, kind=kind)
        elapsed = time.monotonic() - started
        assert elapsed < 240
    finally:
        if worker is not None:
            worker.stop()
