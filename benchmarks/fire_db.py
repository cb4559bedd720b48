"""Cost of TriggerManager.fire() on the database storage (SQLite and PostgreSQL).

    .venv/bin/python benchmarks/fire_db.py [--quick]

Prints, per database, fire() p50/p90 in a session holding K finished instances
and the ratio to K = 0, plus the SQL queries per fire; writes
benchmarks/results/fire_db.json. The databases are those of
benchmarks/settings.py (a SQLite file in /tmp and PostgreSQL's ``test``
database on 127.0.0.1); their tables are created with ``migrate``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.fire import CONFIG, RESULTS, percentile, setup  # noqa: E402


def build(alias: str, k: int) -> str:
    from triggers import DatabaseStorageBackend, TriggerManager
    from triggers.runners import ThreadingTaskRunner

    uid = f"bench-{uuid.uuid4().hex[:10]}"
    manager = TriggerManager(DatabaseStorageBackend(uid, using=alias))
    manager.update_configuration(CONFIG)
    manager.fire("start")
    for n in range(k):
        manager.fire("page", {"n": n})
        if n % 100 == 99:
            ThreadingTaskRunner.join_all()
    ThreadingTaskRunner.join_all()
    assert len(manager.storage.instances_of_task("t_pages")) == k
    return uid


def time_fires(alias: str, uid: str, repeat: int) -> tuple[list[float], float]:
    from django.db import connections
    from django.test.utils import CaptureQueriesContext

    from triggers import DatabaseStorageBackend, TriggerManager

    manager = TriggerManager(DatabaseStorageBackend(uid, using=alias))
    for _ in range(20):
        manager.fire("advance", {"x": 1})
    with CaptureQueriesContext(connections[alias]) as queries:
        for n in range(50):
            manager.fire("advance", {"x": n})
    per_fire = len(queries) / 50
    samples = []
    for n in range(repeat):
        started = time.perf_counter()
        manager.fire("advance", {"x": n})
        samples.append(time.perf_counter() - started)
    return samples, per_fire


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    setup("redis://127.0.0.1:6379/10")
    from unittest import mock

    from django.core.management import call_command

    from triggers import runners

    ks = [0, 100, 1000] + ([] if args.quick else [3000, 10000])
    repeat = 200 if args.quick else 1000
    results: dict = {}
    for alias in ("default", "postgres"):
        call_command("migrate", database=alias, verbosity=0)
        with mock.patch.object(runners, "DEFAULT_TASK_RUNNER", "threading"):
            rows = {}
            for k in ks:
                samples, queries = time_fires(alias, build(alias, k), repeat)
                rows[k] = {"p50_us": round(statistics.median(samples) * 1e6, 1),
                           "p90_us": round(percentile(samples, 0.9) * 1e6, 1),
                           "queries": round(queries, 2)}
        base = rows[0]["p50_us"]
        for row in rows.values():
            row["ratio_to_k0"] = round(row["p50_us"] / base, 3)
        results[alias] = rows
        print(f"{alias}:")
        print(f"{'K finished':>10} {'p50 us':>9} {'p90 us':>9} {'x K=0':>6} {'queries':>8}")
        for k, row in rows.items():
            print(f"{k:>10} {row['p50_us']:>9} {row['p90_us']:>9} {row['ratio_to_k0']:>6} "
                  f"{row['queries']:>8}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fire_db.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
