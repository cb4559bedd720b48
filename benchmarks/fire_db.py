"""Cost of TriggerManager.fire() on the database storage: SQLite and PostgreSQL.

Run from the repository root (PostgreSQL on 127.0.0.1:5432, user postgres)::

    .venv/bin/python benchmarks/fire_db.py            # N = 1,000, K = 10,000 (a few minutes)
    .venv/bin/python benchmarks/fire_db.py --quick    # K = 2,000, fewer samples (< 1 minute)

The databases are the ``default`` (SQLite, a file in /tmp, made anew each run)
and ``postgres`` aliases of benchmarks/settings.py; PostgreSQL's database is
``bench_triggers`` (``--pg-name``), created if missing; both are migrated.
After the sessions are built, PostgreSQL's tables are ANALYZEd (what
autovacuum does on its own in production); SQLite is left as Django leaves it.

Same sessions and interleaved rounds as benchmarks/fire.py (see
benchmarks/common.py); for each database it prints, and writes to
``benchmarks/results/fire_db.json`` (``--reference``: also
``benchmarks/reference/fire_db-python-svc.json``):

* fire p50 with N = 1,000 open instances of another task / N = 0, and with
  N = 1,000 scheduled instances of the fired task / N = 0 (target: at most 1.3);
* fire p50 with K = 10,000 finished instances / K = 0 (target: at most 1.3);
* SQL statements per fire (CaptureQueriesContext), which must be the same in
  every session whatever N and K.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    CONFIG_DELAYED,
    DEFAULT_PG_NAME,
    DEFAULT_REDIS_URL,
    Recorder,
    Variant,
    add_finished,
    add_lagging,
    add_open_backlog,
    block_ratios,
    count_open,
    environment,
    interleaved,
    new_manager,
    ratio,
    run_instance,
    setup,
    summary,
    verdict,
    write_results,
)

ALIASES = {"sqlite": "default", "postgresql": "postgres"}


def ensure_postgres_database() -> None:
    """Create the benchmark's PostgreSQL database if it does not exist."""
    import psycopg
    from django.conf import settings

    params = settings.DATABASES["postgres"]
    with psycopg.connect(host=str(params["HOST"]), user=str(params["USER"]), dbname="postgres",
                         autocommit=True) as connection:
        exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                    [params["NAME"]]).fetchone()
        if not exists:
            connection.execute(f'CREATE DATABASE "{params["NAME"]}"')


def prepare(alias: str) -> None:
    from django.core.management import call_command
    from django.db import connections

    if alias == "postgres":
        ensure_postgres_database()
    call_command("migrate", database=alias, verbosity=0)
    from triggers.models import TriggerLock, TriggerSession

    TriggerSession.objects.using(alias).filter(uid__startswith="bench-").delete()
    TriggerLock.objects.using(alias).filter(name__startswith="hooks:bench-").delete()
    connections[alias].close()


def analyze(alias: str) -> None:
    from django.db import connections

    if alias == "postgres":
        with connections[alias].cursor() as cursor:
            cursor.execute("ANALYZE triggers_triggersession, triggers_triggerinstance, "
                           "triggers_triggerevent")


def _shape(sql: str) -> str:
    """A statement's kind: its verb and its table (``DELETE triggers_triggerevent``)."""
    words = sql.replace('"', "").split()
    table = next((w for w in words if w.startswith("triggers_")), "")
    return f"{words[0].upper()} {table}".strip() if words else ""


def statements(alias: str, variant: Variant, recorder: Recorder, fires: int = 100
               ) -> dict[str, Any]:
    """SQL statements of the fire alone: the usual count, the mean, and the occasional ones.

    One fire in about 33 (100 history events) also trims the session's history.
    """
    from collections import Counter

    from django.db import connections
    from django.test.utils import CaptureQueriesContext

    counts: list[int] = []
    shapes: Counter[str] = Counter()
    sample: list[str] = []
    for n in range(fires):
        recorder.take()
        with CaptureQueriesContext(connections[alias]) as queries:
            variant.manager.fire("page", {"n": n})
        counts.append(len(queries))
        found = [query["sql"] for query in queries.captured_queries]
        shapes.update({_shape(sql) for sql in found})
        if not sample or len(found) < len(sample):
            sample = found
        if variant.run_after:
            for manager, name in recorder.take():
                run_instance(manager, name)
    usual = Counter(counts).most_common(1)[0][0]
    return {"usual": usual, "mean": round(sum(counts) / fires, 2), "max": max(counts),
            "occasional": {shape: seen for shape, seen in shapes.items() if seen < fires},
            "sample": sample}


def explain(alias: str, uid: str) -> list[str]:
    """The plan of the hot read: the waiting instances of the fired trigger's tasks."""
    from triggers.models import TriggerInstance

    rows = (TriggerInstance.objects.using(alias)
            .filter(session_id=uid, waiting=True, task_name__in=["t_pages"]).order_by()
            .values_list("name", "status", "kwargs", "metadata", "unless", "waiting",
                         "resolved"))
    plan: str = rows.explain()
    return plan.splitlines()


def measure(database: str, n: int, k: int, rounds: int, counted: int = 100) -> dict[str, Any]:
    from triggers import DatabaseStorageBackend

    alias = ALIASES[database]
    prepare(alias)

    def make(uid: str) -> Any:
        return DatabaseStorageBackend(uid, using=alias)

    result: dict[str, Any] = {"alias": alias, "n": n, "k": k, "rounds": rounds}
    with Recorder() as recorder:
        started = time.perf_counter()
        base = new_manager(make, f"{database}-base")
        backlog = new_manager(make, f"{database}-open")
        add_open_backlog(backlog, recorder, n)
        lagging = new_manager(make, f"{database}-lag")
        add_lagging(lagging, recorder, n)
        delayed = new_manager(make, f"{database}-delayed", CONFIG_DELAYED)
        add_lagging(delayed, recorder, n)
        finished = new_manager(make, f"{database}-done")
        add_finished(finished, recorder, k)
        analyze(alias)
        result["build_seconds"] = round(time.perf_counter() - started, 1)
        result["open_backlog"] = count_open(backlog)
        result["lag_backlog"] = count_open(lagging)
        result["delayed_backlog"] = count_open(delayed)
        variants = [Variant("base", base), Variant("open", backlog),
                    Variant("lag", lagging, run_after=False), Variant("delayed", delayed),
                    Variant("done", finished)]
        interleaved(variants, recorder, rounds)
        result["fire"] = {v.name: summary(v.samples) for v in variants}
        base_samples = variants[0].samples
        result["block_ratios"] = {f"{v.name}_to_base": block_ratios(v.samples, base_samples)
                                  for v in variants[1:]}
        for variant in variants:
            found = statements(alias, variant, recorder, counted)
            result["fire"][variant.name]["statements"] = found["usual"]
            result["fire"][variant.name]["statements_detail"] = {
                key: found[key] for key in ("mean", "max", "occasional")}
            if variant.name == "base":
                result["statements_of_one_fire"] = found["sample"]
        result["plan_waiting_read"] = explain(alias, finished.storage.uid)
    fire = result["fire"]
    base_p50 = fire["base"]["p50_us"]
    result["ratios"] = {f"{name}_to_base": ratio(fire[name]["p50_us"], base_p50)
                        for name in ("open", "lag", "delayed", "done")}
    # Constant: the same statements in every session; the only occasional one is the
    # history trim (a DELETE of the session's oldest events), whatever N and K are.
    result["statements_constant"] = (
        len({entry["statements"] for entry in fire.values()}) == 1
        and all(set(entry["statements_detail"]["occasional"]) <= {"DELETE triggers_triggerevent"}
                for entry in fire.values()))
    return result


def report(results: dict[str, Any], databases: tuple[str, ...]) -> list[str]:
    lines = []
    for database in databases:
        r = results[database]
        lines.append(f"== {database} ==")
        lines.append(f"{'session':>30} {'p50 us':>9} {'p90 us':>9} {'p99 us':>9} {'ratio':>6} "
                     f"{'SQL':>5}")
        labels = {"base": "base (N=0, K=0)", "open": f"open N={r['n']} other task",
                  "lag": f"lag N={r['n']} scheduled, same",
                  "delayed": f"lag N={r['n']} delayed, same", "done": f"done K={r['k']}"}
        for name, label in labels.items():
            entry = r["fire"][name]
            rel = 1.0 if name == "base" else r["ratios"][f"{name}_to_base"]
            lines.append(f"{label:>30} {entry['p50_us']:>9} {entry['p90_us']:>9} "
                         f"{entry['p99_us']:>9} {rel:>6} {entry['statements']:>5}")
        for name in ("open", "lag", "delayed", "done"):
            value = r["ratios"][f"{name}_to_base"]
            b = r["block_ratios"].get(f"{name}_to_base") or {}
            extra = f"   [per {b['blocks']} blocks of 100 rounds: {b['min']}..{b['max']}]" if b \
                else ""
            lines.append(f"  {name} / base   {value:>7}  (<= 1.3)  {verdict(value <= 1.3)}{extra}")
        occasional = sorted({shape for entry in r["fire"].values()
                             for shape in entry["statements_detail"]["occasional"]})
        lines.append(f"  SQL statements per fire constant in N and K: "
                     f"{'yes' if r['statements_constant'] else 'NO'} "
                     f"({r['fire']['base']['statements']} per fire"
                     + (f"; now and then also: {', '.join(occasional)}" if occasional else "")
                     + ")")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="K = 2,000 and fewer samples")
    parser.add_argument("--rounds", type=int, help="timed fires per session variant")
    parser.add_argument("-n", type=int, default=1000, help="open instances (default 1,000)")
    parser.add_argument("-k", type=int, help="finished instances (default 10,000)")
    parser.add_argument("--database", choices=tuple(ALIASES), action="append",
                        help="only this database (repeatable)")
    parser.add_argument("--pg-name", default=DEFAULT_PG_NAME)
    parser.add_argument("--reference", action="store_true",
                        help="also write benchmarks/reference/fire_db-python-svc.json")
    args = parser.parse_args()
    sqlite_path = os.environ.setdefault("TRIGGERS_BENCH_SQLITE", "/tmp/triggers-bench.sqlite3")
    for suffix in ("", "-journal", "-wal", "-shm"):
        if os.path.exists(sqlite_path + suffix):
            os.remove(sqlite_path + suffix)
    setup(DEFAULT_REDIS_URL, args.pg_name)
    k = args.k or (2000 if args.quick else 10000)
    rounds = args.rounds or (100 if args.quick else 600)
    databases = tuple(args.database or ALIASES)
    results: dict[str, Any] = {"quick": args.quick, "pg_name": args.pg_name,
                               "sqlite": sqlite_path, "environment": environment(),
                               "targets": {"open_to_base": 1.3, "lag_to_base": 1.3,
                                           "delayed_to_base": 1.3, "done_to_base": 1.3}}
    for database in databases:
        print(f"[{database}] building sessions (N={args.n}, K={k}) and timing {rounds} "
              "rounds…", flush=True)
        results[database] = measure(database, args.n, k, rounds, 40 if args.quick else 100)
    lines = report(results, databases)
    print("\n".join(lines))
    results["report"] = lines
    path = write_results("fire_db", results, args.reference)
    print(f"Written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
