"""Cost of TriggerManager.fire() on the cache storage over a real Redis.

Run from the repository root, with the README's set-up:

    .venv/bin/python benchmarks/fire.py [--quick] [--redis-url redis://127.0.0.1:6379/10]

It prints a table and writes benchmarks/results/fire.json. Ratios compare
figures measured in the same run, so a noisy machine affects both sides:

* fire p50 in a session holding K finished instances, K = 0 .. 10,000,
  relative to K = 0 (target: at most 1.5 at K = 10,000);
* fire p50 relative to the p50 of one Redis GET on the same connection
  settings (target: at most 5), and Redis round trips per fire;
* Redis memory per finished instance (MEMORY USAGE; target: at most 400 bytes);
* throughput: 4 processes x 100 sessions firing a 2-trigger task, and
  4 processes x 200 andEvery fires into one session (exactly 800 instances).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def setup(redis_url: str) -> None:
    os.environ["TRIGGERS_BENCH_REDIS_URL"] = redis_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import django

    django.setup()


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

        def counting(conn, command, check_health=True):  # type: ignore[no-untyped-def]
            counter.count += 1
            return original(conn, command, check_health)

        self._cls.send_packed_command = counting  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self._cls.send_packed_command = self._original  # type: ignore[method-assign]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


CONFIG = {
    # Every fire of 'page' adds one finished instance (andEvery), once 'start' fired.
    "t_pages": {"after": ["start"], "andEvery": "page", "run": "benchmarks.tasks.Noop"},
    # fire('advance') advances this one instance, which waits for 'never'.
    "t_wait": {"after": ["advance", "never"], "run": "benchmarks.tasks.Noop"},
}


def build_session(k: int) -> str:
    from triggers import CacheStorageBackend, TriggerManager
    from triggers.runners import ThreadingTaskRunner

    uid = f"bench-{uuid.uuid4().hex[:10]}"
    manager = TriggerManager(CacheStorageBackend(uid, cache="default"))
    manager.update_configuration(CONFIG)
    manager.fire("start")
    for n in range(k):
        manager.fire("page", {"n": n})
        if n % 200 == 199:
            ThreadingTaskRunner.join_all()
    ThreadingTaskRunner.join_all()
    finished = len(manager.storage.instances_of_task("t_pages"))
    assert finished == k, (finished, k)
    return uid


def time_fires(uid: str, repeat: int) -> tuple[list[float], float]:
    from triggers import CacheStorageBackend, TriggerManager

    manager = TriggerManager(CacheStorageBackend(uid, cache="default"))
    for _ in range(20):  # warm up connections and caches
        manager.fire("advance", {"x": 1})
    samples = []
    with RoundTrips() as trips:
        for n in range(repeat):
            started = time.perf_counter()
            manager.fire("advance", {"x": n})
            samples.append(time.perf_counter() - started)
    return samples, trips.count / repeat


def time_gets(repeat: int) -> list[float]:
    from django.core.cache import caches

    from triggers.locking import redis_client_for_cache

    client = redis_client_for_cache(caches["default"])
    client.set("bench:get", b"x" * 100)
    for _ in range(50):
        client.get("bench:get")
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        client.get("bench:get")
        samples.append(time.perf_counter() - started)
    return samples


def memory_per_instance(uid: str, k: int) -> dict[str, float]:
    from triggers import CacheStorageBackend

    storage = CacheStorageBackend(uid, cache="default")
    client = storage._redis
    keys = [key for key in client.scan_iter(match=f"*{{{uid}}}*") if not key.startswith(b"lock")]
    total = sum(client.memory_usage(key, samples=0) or 0 for key in keys)
    done = client.memory_usage(storage._done_key(), samples=0) or 0
    return {"keys": len(keys), "session_bytes": total, "done_hash_bytes": done,
            "bytes_per_finished_instance": round(done / k, 1) if k else 0.0}


# -- throughput (child processes) ---------------------------------------------


def _throughput_child(args: tuple[str, str, list[str], int, object]) -> tuple[int, float]:
    redis_url, mode, uids, fires, barrier = args
    setup(redis_url)
    from unittest import mock

    from triggers import CacheStorageBackend, TriggerManager, runners
    from triggers.runners import ThreadingTaskRunner

    with mock.patch.object(runners, "DEFAULT_TASK_RUNNER", "threading"):
        managers = [TriggerManager(CacheStorageBackend(uid, cache="default")) for uid in uids]
        barrier.wait()  # type: ignore[attr-defined]
        started = time.perf_counter()
        count = 0
        if mode == "sessions":
            for manager in managers:
                manager.fire("a", {"v": 1})
                manager.fire("b", {"v": 2})
                count += 2
        else:
            for n in range(fires):
                managers[0].fire("page", {"n": n})
                count += 1
        elapsed = time.perf_counter() - started
        ThreadingTaskRunner.join_all()
    return count, elapsed


def _run_children(redis_url: str, jobs: list[tuple[str, list[str], int]]) -> tuple[int, float]:
    context = multiprocessing.get_context("spawn")
    with context.Manager() as sync:
        barrier = sync.Barrier(len(jobs))
        with context.Pool(len(jobs)) as pool:
            results = pool.map(_throughput_child,
                               [(redis_url, mode, uids, fires, barrier) for mode, uids, fires in jobs])
    fired = sum(count for count, _ in results)
    wall = max(elapsed for _, elapsed in results)
    return fired, wall


def throughput(redis_url: str, processes: int, sessions: int, contended_fires: int) -> dict:
    from triggers import CacheStorageBackend, TriggerManager

    config = {"t_two": {"after": ["a", "b"], "run": "benchmarks.tasks.Noop"}}
    jobs = []
    for _ in range(processes):
        uids = [f"tp-{uuid.uuid4().hex[:10]}" for _ in range(sessions)]
        for uid in uids:
            TriggerManager(CacheStorageBackend(uid, cache="default")).update_configuration(config)
        jobs.append(("sessions", uids, 0))
    fired, wall = _run_children(redis_url, jobs)

    shared = f"contended-{uuid.uuid4().hex[:10]}"
    manager = TriggerManager(CacheStorageBackend(shared, cache="default"))
    manager.update_configuration(CONFIG)
    manager.fire("start")
    contended, contended_wall = _run_children(
        redis_url, [("contended", [shared], contended_fires) for _ in range(processes)])
    instances = len(manager.storage.instances_of_task("t_pages"))
    finished = sum(1 for i in manager.storage.instances_of_task("t_pages")
                   if i.status.value == "finished")
    return {
        "sessions": {"processes": processes, "sessions_per_process": sessions, "fires": fired,
                     "seconds": round(wall, 3), "fires_per_second": round(fired / wall, 1)},
        "contended": {"processes": processes, "fires": contended, "seconds": round(contended_wall, 3),
                      "fires_per_second": round(contended / contended_wall, 1),
                      "instances": instances, "finished": finished,
                      "exact": instances == processes * contended_fires},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/10")
    parser.add_argument("--quick", action="store_true", help="smaller K and fewer samples")
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    setup(args.redis_url)
    from unittest import mock

    from triggers import runners

    ks = [0, 100, 1000, 3000] + ([] if args.quick else [10000])
    repeat = 300 if args.quick else args.repeat
    results: dict = {"redis_url": args.redis_url, "repeat": repeat, "fire": {}}
    with mock.patch.object(runners, "DEFAULT_TASK_RUNNER", "threading"):
        sessions = {k: build_session(k) for k in ks}
        get_p50 = statistics.median(time_gets(repeat * 2))
        for k in ks:
            samples, trips = time_fires(sessions[k], repeat)
            results["fire"][k] = {
                "p50_us": round(statistics.median(samples) * 1e6, 1),
                "p90_us": round(percentile(samples, 0.9) * 1e6, 1),
                "p99_us": round(percentile(samples, 0.99) * 1e6, 1),
                "round_trips": round(trips, 2),
            }
        get_p50_after = statistics.median(time_gets(repeat * 2))
    get_p50 = min(get_p50, get_p50_after)
    base = results["fire"][0]["p50_us"]
    for k in ks:
        entry = results["fire"][k]
        entry["ratio_to_k0"] = round(entry["p50_us"] / base, 3)
        entry["ratio_to_get"] = round(entry["p50_us"] / (get_p50 * 1e6), 2)
    results["redis_get_p50_us"] = round(get_p50 * 1e6, 1)
    results["memory"] = memory_per_instance(sessions[ks[-1]], ks[-1])
    results["throughput"] = throughput(args.redis_url, 4, 100, 200)

    print(f"Redis GET p50: {results['redis_get_p50_us']} us")
    print(f"{'K finished':>10} {'p50 us':>8} {'p90 us':>8} {'p99 us':>8} {'x K=0':>6} "
          f"{'x GET':>6} {'RTs':>5}")
    for k in ks:
        e = results["fire"][k]
        print(f"{k:>10} {e['p50_us']:>8} {e['p90_us']:>8} {e['p99_us']:>8} "
              f"{e['ratio_to_k0']:>6} {e['ratio_to_get']:>6} {e['round_trips']:>5}")
    memory = results["memory"]
    print(f"Memory: {memory['bytes_per_finished_instance']} bytes per finished instance "
          f"(K={ks[-1]}; session total {memory['session_bytes']} bytes in {memory['keys']} keys)")
    tp = results["throughput"]
    print(f"Throughput, 4 processes x 100 sessions: {tp['sessions']['fires_per_second']} fires/s")
    c = tp["contended"]
    print(f"Contention, 4 processes x 200 andEvery fires into one session: "
          f"{c['fires_per_second']} fires/s, {c['instances']} instances "
          f"({'exact' if c['exact'] else 'WRONG'}), {c['finished']} finished")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fire.json").write_text(json.dumps(results, indent=2))
    print(f"Written to {RESULTS / 'fire.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
