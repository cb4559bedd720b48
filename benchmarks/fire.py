"""Cost of TriggerManager.fire() on Redis: the ``cache`` storage (django-redis) and the ``redis`` storage.

Run from the repository root (Redis on 127.0.0.1:6379; database 13 by default)::

    .venv/bin/python benchmarks/fire.py            # N = 1,000, K = 10,000 (about 2 minutes)
    .venv/bin/python benchmarks/fire.py --quick    # K = 2,000, fewer samples (< 1 minute)

For each storage it prints, and writes to ``benchmarks/results/fire.json``
(``--reference`` also to ``benchmarks/reference/fire-python-svc.json``), ratios
of figures measured in the same run (see benchmarks/common.py for the sessions):

* fire p50 (a fire that creates and schedules an instance) / the p50 of one
  redis-py ``GET`` on the storage's own client, timed in the same rounds
  (target: at most 4);
* fire p50 with N = 1,000 open instances of another task (half scheduled, half
  failed with 5 KB tracebacks) / N = 0, and with N = 1,000 scheduled instances
  of the fired task (a lagging worker) / N = 0 (target: at most 1.3);
* fire p50 with K = 10,000 finished instances / K = 0 (target: at most 1.3);
* Redis round trips per fire (redis-py ``send_packed_command`` calls; target: 2);
* Redis bytes per finished instance: ``MEMORY USAGE`` of every key of the
  K session (history at its default limit included) / K (target: at most 300);
* throughput: 4 processes x 200 ``andEvery`` fires into one session / the same
  4 processes spread over 100 sessions (fires/s, medians of 5 runs of each,
  alternated; target: at least 0.25), with exactly 800 instances created each
  time. Runners only record (the fire alone); a second measurement runs every
  instance in a thread (fire, start and finish: three steps per fire on the
  session).

Nothing here asserts a time: misses are reported, the script exits 0.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    CONFIG,
    CONFIG_DELAYED,
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

KINDS = ("cache", "redis")


class RoundTrips:
    """Counts what is sent to Redis: one packed send is one round trip."""

    def __init__(self) -> None:
        from redis.connection import AbstractConnection

        self.count = 0
        self._cls = AbstractConnection
        self._original = AbstractConnection.send_packed_command

    def __enter__(self) -> RoundTrips:
        counter = self
        original = self._original

        def counting(conn: Any, command: Any, check_health: bool = True) -> Any:
            counter.count += 1
            return original(conn, command, check_health)  # type: ignore[no-untyped-call]

        self._cls.send_packed_command = counting  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self._cls.send_packed_command = self._original  # type: ignore[method-assign]


def storage_factory(kind: str, redis_url: str) -> Any:
    from triggers import CacheStorageBackend, RedisStorageBackend

    if kind == "cache":
        return lambda uid: CacheStorageBackend(uid, cache="default")
    return lambda uid: RedisStorageBackend(uid, url=redis_url)


def client_of(kind: str, redis_url: str) -> Any:
    """The redis-py client the storage talks through."""
    if kind == "cache":
        from django.core.cache import caches

        from triggers.locking import redis_client_for_cache

        return redis_client_for_cache(caches["default"])
    from triggers.storages.redis import client_for

    return client_for(redis_url, False)


def session_keys(client: Any, uid: str) -> list[bytes]:
    return sorted(client.scan_iter(match=f"*{{{uid}}}*", count=1000))


def memory(client: Any, uid: str, k: int) -> dict[str, Any]:
    """MEMORY USAGE (every element sampled) of each key of the session."""
    by_key: dict[str, int] = {}
    for key in session_keys(client, uid):
        suffix = key.decode().rsplit("}:", 1)[-1]
        by_key[suffix] = int(client.memory_usage(key, samples=0) or 0)
    total = sum(by_key.values())
    record = client.hget(next(key for key in session_keys(client, uid) if key.endswith(b"}:d")),
                         "t_pages#1")
    history = client.llen(next(key for key in session_keys(client, uid)
                               if key.endswith(b"}:h")))
    return {"k": k, "keys": by_key, "session_bytes": total, "history_events": history,
            "bytes_per_finished_instance": round(total / k, 1),
            "done_hash_bytes_per_instance": round(by_key.get("d", 0) / k, 1),
            "record_json_bytes": len(record or b""), "record": (record or b"").decode()}


def delete_bench_keys(client: Any) -> int:
    """Remove the keys of earlier benchmark sessions (and only those) from this database."""
    deleted = 0
    for pattern in ("*{bench-*", "*{tp-*", "bench:get"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(keys), 500):
            deleted += client.delete(*keys[start:start + 500])
    return deleted


def per_fire(variant: Variant, recorder: Recorder, fires: int = 30) -> float:
    """Redis round trips of the fire alone (what it scheduled runs outside the count)."""
    sent = 0
    with RoundTrips() as trips:
        for n in range(fires):
            recorder.take()
            before = trips.count
            variant.manager.fire("page", {"n": n})
            sent += trips.count - before
            if variant.run_after:
                for manager, name in recorder.take():
                    run_instance(manager, name)
    return sent / fires


# -- latency, memory, round trips --------------------------------------------------------


def latency(kind: str, redis_url: str, n: int, k: int, rounds: int) -> dict[str, Any]:
    make = storage_factory(kind, redis_url)
    client = client_of(kind, redis_url)
    result: dict[str, Any] = {"n": n, "k": k, "rounds": rounds}
    with Recorder() as recorder:
        started = time.perf_counter()
        base = new_manager(make, f"{kind}-base")
        backlog = new_manager(make, f"{kind}-open")
        add_open_backlog(backlog, recorder, n)
        lagging = new_manager(make, f"{kind}-lag")
        add_lagging(lagging, recorder, n)
        delayed = new_manager(make, f"{kind}-delayed", CONFIG_DELAYED)
        add_lagging(delayed, recorder, n)
        finished = new_manager(make, f"{kind}-done")
        add_finished(finished, recorder, k)
        result["build_seconds"] = round(time.perf_counter() - started, 1)
        result["open_backlog"] = count_open(backlog)
        result["lag_backlog"] = count_open(lagging)
        result["delayed_backlog"] = count_open(delayed)
        time.sleep(1.5)  # the lock blocks' signal keys expire after a second
        result["memory"] = memory(client, finished.storage.uid, k)

        client.set("bench:get", b"x" * 100)
        variants = [Variant("base", base), Variant("open", backlog),
                    Variant("lag", lagging, run_after=False), Variant("delayed", delayed),
                    Variant("done", finished)]

        def get() -> float:
            began = time.perf_counter()
            client.get("bench:get")
            return time.perf_counter() - began

        others = interleaved(variants, recorder, rounds, {"get": get})
        result["get"] = summary(others["get"])
        # For comparison only: GETs back to back (Redis never idles in between).
        result["get_back_to_back"] = summary([get() for _ in range(rounds)])
        result["fire"] = {v.name: summary(v.samples) for v in variants}
        base_samples = variants[0].samples
        result["block_ratios"] = {"fire_to_get": block_ratios(base_samples, others["get"])}
        for variant in variants[1:]:
            result["block_ratios"][f"{variant.name}_to_base"] = block_ratios(variant.samples,
                                                                             base_samples)
        for variant in variants:
            result["fire"][variant.name]["round_trips"] = per_fire(variant, recorder)
        result["lag_backlog_after"] = count_open(lagging)
    fire, get_p50 = result["fire"], result["get"]["p50_us"]
    base_p50 = fire["base"]["p50_us"]
    result["ratios"] = {
        "fire_to_get": ratio(base_p50, get_p50),
        "open_to_base": ratio(fire["open"]["p50_us"], base_p50),
        "lag_to_base": ratio(fire["lag"]["p50_us"], base_p50),
        "delayed_to_base": ratio(fire["delayed"]["p50_us"], base_p50),
        "done_to_base": ratio(fire["done"]["p50_us"], base_p50),
    }
    return result


# -- throughput (child processes) ---------------------------------------------------------


def _throughput_child(args: tuple[Any, ...]) -> tuple[int, float]:
    kind, redis_url, uids, fires, runner, barrier = args
    from unittest import mock

    from triggers import TriggerManager, runners
    from triggers.runners import ThreadingTaskRunner

    make = storage_factory(kind, redis_url)
    managers = [TriggerManager(make(uid)) for uid in uids]
    # "record": runners only record (the fire alone); "threading": every instance starts
    # and finishes in a thread of this process (three steps per fire).
    runs = mock.patch.object(runners, "DEFAULT_TASK_RUNNER", "threading") \
        if runner == "threading" else Recorder()
    with runs:
        barrier.wait()
        started = time.perf_counter()
        for n in range(fires):
            managers[n % len(managers)].fire("page", {"n": n})
        ThreadingTaskRunner.join_all()
        elapsed = time.perf_counter() - started
    return fires, elapsed


class Children:
    """A pool of spawned processes (Django set up once each) that start jobs together."""

    def __init__(self, redis_url: str, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.processes = processes
        self.sync = context.Manager()
        self.pool = context.Pool(processes, initializer=setup, initargs=(redis_url,))

    def run(self, jobs: list[tuple[Any, ...]]) -> tuple[int, float]:
        """One job per process, released together; fires and the slowest one's seconds."""
        assert len(jobs) == self.processes
        barrier = self.sync.Barrier(len(jobs))
        results = self.pool.map(_throughput_child, [(*job, barrier) for job in jobs],
                                chunksize=1)
        return sum(count for count, _ in results), max(elapsed for _, elapsed in results)

    def close(self) -> None:
        self.pool.close()
        self.pool.join()
        self.sync.shutdown()


def throughput(kind: str, redis_url: str, runner: str, children: Children, repeat: int,
               fires: int = 200, sessions: int = 100) -> dict[str, Any]:
    """Fires/s of the processes x ``fires`` into one session, and spread over ``sessions``.

    ``repeat`` times each, alternating which goes first; new sessions every time.
    """
    from triggers import TriggerManager

    make = storage_factory(kind, redis_url)
    processes = children.processes
    per_process = sessions // processes

    def prepared(uid: str) -> Any:
        manager = TriggerManager(make(uid))
        manager.update_configuration(CONFIG)
        with Recorder():
            manager.fire("start")
            manager.fire("page", {"n": -1})  # t_pages#0 scheduled: from now on one per fire
        return manager

    def created(managers: list[Any]) -> tuple[int, int]:
        counts = [m.storage.instances_of_task("t_pages") for m in managers]
        return (sum(len(c) - 1 for c in counts),  # t_pages#0 was there before
                sum(1 for c in counts for i in c[1:] if i.status.value == "finished"))

    def spread_once() -> dict[str, Any]:
        groups = [[prepared(f"tp-{uuid.uuid4().hex[:10]}") for _ in range(per_process)]
                  for _ in range(processes)]
        fired, wall = children.run([(kind, redis_url, [m.storage.uid for m in group], fires,
                                     runner) for group in groups])
        new, finished = created([m for group in groups for m in group])
        return {"fires": fired, "seconds": round(wall, 3),
                "fires_per_second": round(fired / wall, 1), "new_instances": new,
                "finished": finished}

    def one_once() -> dict[str, Any]:
        shared = prepared(f"tp-{uuid.uuid4().hex[:10]}")
        fired, wall = children.run([(kind, redis_url, [shared.storage.uid], fires, runner)
                                    for _ in range(processes)])
        new, finished = created([shared])
        return {"fires": fired, "seconds": round(wall, 3),
                "fires_per_second": round(fired / wall, 1), "new_instances": new,
                "finished": finished, "exact": new == processes * fires}

    repetitions: list[dict[str, Any]] = []
    for rep in range(repeat):
        if rep % 2 == 0:
            spread = spread_once()
            one = one_once()
        else:
            one = one_once()
            spread = spread_once()
        repetitions.append({"spread": spread, "one_session": one,
                            "ratio": ratio(one["fires_per_second"], spread["fires_per_second"])})
    spread_rate = statistics.median(r["spread"]["fires_per_second"] for r in repetitions)
    one_rate = statistics.median(r["one_session"]["fires_per_second"] for r in repetitions)
    ratios = [r["ratio"] for r in repetitions]
    return {
        "runner": runner, "processes": processes, "fires_per_process": fires,
        "repeat": repeat, "repetitions": repetitions,
        "spread": {"sessions": per_process * processes,
                   "fires_per_second": round(spread_rate, 1),
                   "new_instances": [r["spread"]["new_instances"] for r in repetitions]},
        "one_session": {"fires_per_second": round(one_rate, 1),
                        "new_instances": [r["one_session"]["new_instances"] for r in repetitions],
                        "finished": [r["one_session"]["finished"] for r in repetitions],
                        "exact": all(r["one_session"]["exact"] for r in repetitions)},
        "ratio": ratio(one_rate, spread_rate),
        "ratio_range": [min(ratios), max(ratios)],
    }


# -- report ---------------------------------------------------------------------------------


TARGETS = {"fire_to_get": 4.0, "open_to_base": 1.3, "lag_to_base": 1.3, "delayed_to_base": 1.3,
           "done_to_base": 1.3,
           "bytes_per_finished_instance": 300.0, "round_trips": 2.0, "throughput_ratio": 0.25}


def report(results: dict[str, Any], kinds: tuple[str, ...]) -> list[str]:
    lines = []
    for kind in kinds:
        r = results[kind]
        lat, mem = r["latency"], r["latency"]["memory"]
        ratios = lat["ratios"]
        lines.append(f"== {kind} storage ==")
        lines.append(f"redis-py GET p50: {lat['get']['p50_us']} us, timed in the same rounds as the "
                     f"fires ({lat['get_back_to_back']['p50_us']} us back to back)")
        lines.append(f"{'session':>30} {'p50 us':>8} {'p90 us':>8} {'p99 us':>8} {'ratio':>6} "
                     f"{'RTs':>5}")
        labels = {"base": "base (N=0, K=0)", "open": f"open N={lat['n']} other task",
                  "lag": f"lag N={lat['n']} scheduled, same",
                  "delayed": f"lag N={lat['n']} delayed, same", "done": f"done K={lat['k']}"}
        for name, label in labels.items():
            entry = lat["fire"][name]
            rel = 1.0 if name == "base" else ratios[f"{name}_to_base"]
            lines.append(f"{label:>30} {entry['p50_us']:>8} {entry['p90_us']:>8} "
                         f"{entry['p99_us']:>8} {rel:>6} {entry['round_trips']:>5}")
        trips = max(e["round_trips"] for e in lat["fire"].values())
        blocks = lat["block_ratios"]

        def block_range(name: str, blocks: dict[str, Any] = blocks) -> str:
            b = blocks.get(name) or {}
            return f"   [per {b['blocks']} blocks of 100 rounds: {b['min']}..{b['max']}]" if b else ""

        lines.append(f"  fire / GET            {ratios['fire_to_get']:>7}  (<= 4)    "
                     f"{verdict(ratios['fire_to_get'] <= 4)}{block_range('fire_to_get')}")
        for name in ("open", "lag", "delayed", "done"):
            value = ratios[f"{name}_to_base"]
            lines.append(f"  {name} / base          {value:>7}  (<= 1.3)  {verdict(value <= 1.3)}"
                         f"{block_range(name + '_to_base')}")
        lines.append(f"  round trips per fire  {trips:>7}  (<= 2)    {verdict(trips <= 2)}")
        per = mem["bytes_per_finished_instance"]
        lines.append(f"  bytes per finished    {per:>7}  (<= 300)  {verdict(per <= 300)}   "
                     f"[{mem['session_bytes']} B in {len(mem['keys'])} keys: "
                     + ", ".join(f"{key} {size}" for key, size in mem["keys"].items())
                     + f"; history {mem['history_events']} events]")
        for tp in r["throughput"]:
            one, spread = tp["one_session"], tp["spread"]
            low, high = tp["ratio_range"]
            lines.append(f"  throughput ({tp['runner']:>9}, median of {tp['repeat']}): one session "
                         f"{one['fires_per_second']} fires/s, 100 sessions "
                         f"{spread['fires_per_second']} fires/s, ratio {tp['ratio']} (>= 0.25) "
                         f"{verdict(tp['ratio'] >= 0.25)} [each run: {low}..{high}]; instances "
                         f"{'/'.join(map(str, one['new_instances']))} "
                         f"({'exact' if one['exact'] else 'WRONG'}), finished "
                         f"{'/'.join(map(str, one['finished']))}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--quick", action="store_true",
                        help="K = 2,000, 200 rounds, throughput with the recording runner only")
    parser.add_argument("--rounds", type=int, help="timed fires per session variant")
    parser.add_argument("-n", type=int, default=1000, help="open instances (default 1,000)")
    parser.add_argument("-k", type=int, help="finished instances (default 10,000)")
    parser.add_argument("--storage", choices=KINDS, action="append",
                        help="only this storage (repeatable)")
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--reference", action="store_true",
                        help="also write benchmarks/reference/fire-python-svc.json")
    parser.add_argument("--keep", action="store_true", help="leave the sessions in Redis")
    args = parser.parse_args()
    setup(args.redis_url)
    k = args.k or (2000 if args.quick else 10000)
    rounds = args.rounds or (200 if args.quick else 2000)
    kinds = tuple(args.storage or KINDS)
    cleaner = client_of("redis", args.redis_url)
    delete_bench_keys(cleaner)
    results: dict[str, Any] = {"redis_url": args.redis_url, "quick": args.quick,
                               "environment": environment(), "targets": TARGETS}
    try:
        for kind in kinds:
            print(f"[{kind}] building sessions (N={args.n}, K={k}) and timing {rounds} rounds…",
                  flush=True)
            entry: dict[str, Any] = {"latency": latency(kind, args.redis_url, args.n, k, rounds)}
            runners = ("record",) if args.quick else ("record", "threading")
            entry["throughput"] = []
            if not args.no_throughput:
                children = Children(args.redis_url, 4)
                try:
                    entry["throughput"] = [
                        throughput(kind, args.redis_url, runner, children,
                                   2 if args.quick else 5) for runner in runners]
                finally:
                    children.close()
            results[kind] = entry
    finally:
        if not args.keep:
            delete_bench_keys(cleaner)
    lines = report(results, kinds)
    print("\n".join(lines))
    results["report"] = lines
    path = write_results("fire", results, args.reference)
    print(f"Written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
