"""The cookbook's FinalizingTriggerManager, copied as written, finalizes exactly once.

The recipe checks ``latest_kwargs`` and ``get_unresolved_tasks()`` in
``_post_fire`` and then fires ``sessionFinalized``: a check-then-act that only
works because a session's hooks run one at a time (across threads and
processes), each reading state at least as new as its own step. Pages and
cascades finish at the same moment here, on the threading runner and on a real
worker, and ``sessionFinalized`` must fire exactly once per session.
"""

import threading
import time

import pytest

from tests.helpers import make_storage
from tests.workers import Worker, wait_for
from triggers.manager import trigger_managers
from triggers.runners import ThreadingTaskRunner

TASKS = 10
PAGE_THREADS = 4
PAGES_PER_THREAD = 3
SLEEP = 0.05  # every task sleeps as long, so that they finish together


def configuration():
    config = {f"t_{n}": {"after": ["go"], "run": "tests.Count"} for n in range(TASKS)}
    config["t_chain"] = {"after": ["t_0", "t_1"], "run": "tests.Count"}
    config["t_page"] = {"after": ["go"], "andEvery": "page", "run": "tests.Count"}
    # One instance per firing of sessionFinalized: counts how often it fired.
    config["t_final"] = {"after": [], "andEvery": "sessionFinalized", "run": "tests.Echo"}
    return config


def fire_concurrently(managers):
    """Each session: 'go', then pages from several threads at once."""
    for manager in managers:
        manager.fire("go", {"sleep": SLEEP})
    barrier = threading.Barrier(PAGE_THREADS)

    def pages(index):
        from django.db import connections

        try:
            barrier.wait(10)
            for n in range(PAGES_PER_THREAD):
                for manager in managers:
                    manager.fire("page", {"sleep": SLEEP, "thread": index, "n": n})
        finally:
            connections.close_all()

    threads = [threading.Thread(target=pages, args=(i,)) for i in range(PAGE_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def finalized_once(storage):
    finals = storage.instances_of_task("t_final")
    return [i.name for i in finals], storage.latest_kwargs.get("sessionFinalized")


def cookbook_managers(kind, count, key="cookbook"):
    managers = []
    for n in range(count):
        storage = make_storage(kind, f"fin-{kind}-{n}-{threading.get_ident()}-{id(managers)}")
        manager = trigger_managers.get(key, storage)
        manager.update_configuration(configuration())
        managers.append(manager)
    return managers


@pytest.mark.usefixtures("trigger_threading_runner")
@pytest.mark.parametrize("key", ["cookbook", "cookbook_slow"])
@pytest.mark.parametrize("kind", ["django_redis", "builtin_redis", "db_sqlite", "db_postgres"])
def test_cookbook_finalizes_once_on_the_threading_runner(kind, key):
    """The recipe as written, and with a slow check (a race would surely show)."""
    managers = cookbook_managers(kind, 4, key)
    fire_concurrently(managers)
    ThreadingTaskRunner.join_all(timeout=120)
    for manager in managers:
        storage = manager.storage
        assert finalized_once(storage) == (["t_final#0"], {}), storage.debug_repr()
        assert storage["t_final#0"].status == "finished"
        assert not manager.get_unresolved_instances()


@pytest.mark.parametrize("key", ["cookbook", "cookbook_slow"])
def test_cookbook_finalizes_once_on_a_real_worker(key):
    """Four tasks finish in four worker processes at once; their hooks race there."""
    worker = Worker(concurrency=4).start()
    try:
        for round_ in range(3):
            storage = make_storage("django_redis", f"fin-worker-{key}-{round_}-{id(worker)}")
            manager = trigger_managers.get(key, storage)
            config = {f"t_{n}": {"after": ["go"], "run": "tests.Count"} for n in range(4)}
            config["t_final"] = {"after": [], "andEvery": "sessionFinalized", "run": "tests.Echo"}
            manager.update_configuration(config)
            manager.fire("go", {"sleep": 0.3})
            wait_for(lambda m=manager: "sessionFinalized" in m.storage.latest_kwargs
                     and not m.get_unresolved_instances(), timeout=60,
                     message="the session to finalize")
            time.sleep(0.3)  # a duplicate finalization would show by now
            wait_for(lambda m=manager: not m.get_unresolved_instances(), timeout=30)
            assert finalized_once(storage) == (["t_final#0"], {}), storage.debug_repr()
    finally:
        worker.stop()
