"""Processes that fire into many sessions at once (used by test_concurrency.py).

Run in child processes started with the ``spawn`` method: nothing is shared
with the parent but the arguments.
"""

import os
import random

PROCESSES = 8
SESSIONS = 50
PAGES_PER_PROCESS = 2


def configuration():
    return {
        # Runs once every process has fired its own trigger.
        "t_join": {"after": [f"a{n}" for n in range(PROCESSES)], "run": "tests.Count"},
        # One instance per page, in every process, before and after t_join finished.
        "t_every": {"after": ["t_join"], "andEvery": "page", "run": "tests.Count"},
        # One-shot, after any page and the first process's trigger.
        "t_once": {"after": ["page", "a0"], "run": "tests.Count"},
    }


def expected_instances():
    pages = PROCESSES * PAGES_PER_PROCESS
    return {"t_join": 1, "t_every": pages, "t_once": 1}


def fire_process(index, uids, runner, barrier, seed, kind="django_redis"):
    """Fire this process's share of triggers into every session, then wait for threads."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()
    from unittest import mock

    from django.db import connections

    from tests.helpers import make_storage
    from triggers import TriggerManager, runners
    from triggers.runners import ThreadingTaskRunner

    rng = random.Random(seed + index)
    events = [(uid, f"a{index}", {"process": index}) for uid in uids]
    events += [(uid, "page", {"process": index, "n": n})
               for uid in uids for n in range(PAGES_PER_PROCESS)]
    rng.shuffle(events)
    with mock.patch.object(runners, "DEFAULT_TASK_RUNNER", runner):
        managers = {uid: TriggerManager(make_storage(kind, uid)) for uid in uids}
        barrier.wait(60)
        for uid, trigger, kwargs in events:
            managers[uid].fire(trigger, kwargs)
        if runner == "threading":
            ThreadingTaskRunner.join_all(timeout=120)
    connections.close_all()
    return len(events)


def run_in_child(index, uids, runner, barrier, seed, results, kind="django_redis"):
    """Process target: report the number of fires, or the error as text."""
    import traceback

    try:
        results.put(fire_process(index, uids, runner, barrier, seed, kind))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put(traceback.format_exc())
