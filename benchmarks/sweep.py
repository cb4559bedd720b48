"""Cost of one sweep pass: does it grow with the number of idle sessions?

Run from the repository root (Redis on 127.0.0.1:6379, database 13 by default)::

    .venv/bin/python benchmarks/sweep.py            # 100,000 idle sessions (a few minutes)
    .venv/bin/python benchmarks/sweep.py --quick    # 10,000 idle sessions (< 1 minute)

Each round makes 100 sessions due (a fire whose message was lost: the runner only
records it) and times one pass of :func:`triggers.sweep.sweep`, which must send
exactly those 100. It does so beside ``S`` idle sessions: half wait for a trigger
(an unstarted instance, no due time), half have a running instance whose lease is
current (in the due index, due in an hour) — the index is large, almost nothing in
it is due.

* ``redis`` storage: S = 100 and S = 100,000 under two key prefixes, rounds
  alternated; ratio of the median pass times (target: near 1).
* ``db`` storage (SQLite): S = 100, then idle rows added up to S = 100,000
  (bulk-inserted rows of the same shape), same rounds; ratio of the medians.

It prints the figures and writes ``benchmarks/results/sweep.json``
(``--reference``: also ``benchmarks/reference/sweep-python-svc.json``). Nothing
here asserts a time: misses are reported, the script exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    DEFAULT_REDIS_URL,
    NOOP,
    Recorder,
    environment,
    ratio,
    run_instance,
    setup,
    verdict,
    write_results,
)

DUE = 100
CONFIG = {"t": {"after": ["go"], "run": NOOP}, "t_wait": {"after": ["never"], "andEvery": "x",
                                                          "run": NOOP}}


def _idle_redis(options: dict[str, Any], count: int) -> None:
    """``count`` idle sessions through the API: fires and a start with a far lease."""
    from triggers import TriggerManager
    from triggers.storages.redis import RedisStorageBackend
    from triggers.types import STATUS_RUNNING, now

    with Recorder():
        for n in range(count):
            manager = TriggerManager(RedisStorageBackend(f"idle-{n}", **options))
            manager.update_configuration(CONFIG)
            if n % 2:
                manager.fire("x")  # unstarted: waits for "never"
                continue
            manager.fire("go")

            def start(step: Any) -> None:
                instance = step.instance("t#0")
                instance.set_status(STATUS_RUNNING, run="r", lease=now() + 3600)
                step.save(instance)

            manager.storage.transact(start)


def _idle_db(start: int, count: int) -> None:
    """Idle sessions as rows of the same shape the storage writes (bulk, for speed)."""
    from triggers.models import TriggerInstance, TriggerSession
    from triggers.types import now

    stamp = now()
    for first in range(start, start + count, 5000):
        uids = [f"idle-{n}" for n in range(first, min(first + 5000, start + count))]
        TriggerSession.objects.bulk_create([TriggerSession(uid=uid, state={}, config={})
                                            for uid in uids])
        rows = []
        for n, uid in enumerate(uids):
            running = n % 2 == 0
            rows.append(TriggerInstance(
                session_id=uid, name="t#0" if running else "t_wait#0",
                task_name="t" if running else "t_wait", number=0,
                status="running" if running else "unstarted", waiting=not running,
                metadata={"run": "r", "lease": stamp + 3600} if running else {},
                due=stamp + 3600 if running else None))
        TriggerInstance.objects.bulk_create(rows)


def _make_due(storage: str, options: dict[str, Any]) -> list[str]:
    """DUE sessions whose dispatch was lost, due now (DISPATCH_GRACE is 1 ms here)."""
    from triggers import TriggerManager
    from triggers.storages import storage_backends

    uids = []
    with Recorder():
        for _ in range(DUE):
            uid = f"due-{uuid.uuid4().hex[:10]}"
            manager = TriggerManager(storage_backends.get(storage, uid, **options))
            manager.update_configuration(CONFIG)
            manager.fire("go")
            uids.append(uid)
    time.sleep(0.01)
    return uids


def _one_pass(storage: str, options: dict[str, Any]) -> float:
    from triggers.sweep import sweep

    with Recorder() as recorder:
        started = time.perf_counter()
        report = sweep(storage, limit=10 * DUE, **options)
        took = time.perf_counter() - started
    sent = recorder.take()
    if report.sessions != DUE or len(sent) != DUE or report.errors:
        raise SystemExit(f"the pass did not do exactly the due work: {report} "
                         f"(sent {len(sent)})")
    for manager, name in sent:  # as the workers would: nothing of it is due any more
        run_instance(manager, name)
    # Redis's index still names the sessions (at the time of the next send): an untimed
    # pass finds nothing to do there and drops them.
    time.sleep(0.01)
    with Recorder() as recorder:
        sweep(storage, limit=10 * DUE, **options)
    if recorder.take():
        raise SystemExit("a finished instance was sent again")
    return took


def _report(label: str, small_times: list[float], large_times: list[float],
            large: int) -> dict[str, Any]:
    """Print and return the medians of the passes beside few and many idle sessions."""
    small, big = statistics.median(small_times), statistics.median(large_times)
    print(f"{label}: pass with {DUE} due: {small * 1000:.1f} ms beside 100 idle sessions, "
          f"{big * 1000:.1f} ms beside {large:,}: ratio {ratio(big, small)} "
          f"({verdict(ratio(big, small) <= 1.5)})", flush=True)
    return {"pass_ms_idle_100": round(small * 1000, 2),
            f"pass_ms_idle_{large}": round(big * 1000, 2), "ratio": ratio(big, small)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 idle sessions, 5 rounds")
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    args = parser.parse_args()
    setup(args.redis_url)

    from django.conf import settings
    from django.core.management import call_command

    from triggers.conf import triggers_settings

    settings.TRIGGERS = {"DISPATCH_GRACE": 0.001}
    triggers_settings.reload()
    large, rounds = (10_000, 5) if args.quick else (100_000, 9)
    results: dict[str, Any] = {"environment": environment(), "due": DUE, "idle_large": large}

    # -- redis ----------------------------------------------------------------------
    run = uuid.uuid4().hex[:6]
    small_options = {"url": args.redis_url, "prefix": f"bench-sweep-{run}-small:"}
    large_options = {"url": args.redis_url, "prefix": f"bench-sweep-{run}-large:"}
    print(f"redis: making {DUE} + {large} idle sessions ...", flush=True)
    _idle_redis(small_options, DUE)
    _idle_redis(large_options, large)
    times: dict[str, list[float]] = {"small": [], "large": []}
    for _ in range(rounds):
        for name, options in (("small", small_options), ("large", large_options)):
            _make_due("redis", options)
            times[name].append(_one_pass("redis", options))
    results["redis"] = _report("redis", times["small"], times["large"], large)
    from triggers.storages.redis import client_for

    client = client_for(args.redis_url, False)
    for prefix in (small_options["prefix"], large_options["prefix"]):
        for key in client.scan_iter(match=f"{prefix}*", count=5000):
            client.unlink(key)
        for key in client.scan_iter(match=f"lock:{prefix}*", count=5000):
            client.unlink(key)

    # -- db (SQLite) --------------------------------------------------------------------
    print(f"db: making {DUE} + {large} idle sessions ...", flush=True)
    call_command("migrate", verbosity=0)
    from triggers.models import TriggerSession

    TriggerSession.objects.all().delete()
    _idle_db(0, DUE)
    db_small = [(_make_due("db", {}), _one_pass("db", {}))[1] for _ in range(rounds)]
    _idle_db(DUE, large - DUE)
    db_large = [(_make_due("db", {}), _one_pass("db", {}))[1] for _ in range(rounds)]
    results["db_sqlite"] = _report("db (SQLite)", db_small, db_large, large)
    TriggerSession.objects.all().delete()
    path = write_results("sweep", results, args.reference)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
