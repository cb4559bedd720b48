"""Where the time of one fire() goes: cProfile of the fire alone, and Redis's own time.

    .venv/bin/python benchmarks/profile_fire.py [--storage redis|cache|sqlite|postgres]
                                                [--fires 3000] [--top 30]

It builds a base session (benchmarks/common.py), times ``--fires`` fires of
``page`` (each one schedules an instance; runners only record, and what a fire
scheduled is run afterwards, outside the profile) and prints:

* the wall-clock p50 of the fire without the profiler;
* for Redis, a decomposition of the fire against floors timed in the same
  rounds (a GET, EVALSHA of an empty script with the same arguments), see
  :func:`decompose`;
* the functions with the most own time (tottime) and cumulative time under
  cProfile, as shares of the profiled fires' total.

For a sampling view of the same loop, run it under py-spy::

    .venv/bin/py-spy record -o /tmp/fire.svg -- .venv/bin/python benchmarks/profile_fire.py --no-cprofile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
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
    add_lagging,
    fire_once,
    new_manager,
    run_instance,
    setup,
)


def commandstats(client: Any) -> dict[str, tuple[int, int]]:
    stats = client.info("commandstats")
    return {name: (int(v["calls"]), int(v["usec"])) for name, v in stats.items()}


def server_time(variant: Variant, recorder: Recorder, client: Any, count: int) -> list[str]:
    """Redis's own µs per read script and per commit script (INFO commandstats).

    Meaningful on a Redis server nobody else uses (``calls seen`` says whether
    other clients ran EVALSHA meanwhile): start one with
    ``redis-server --port 6390 --save '' --appendonly no`` and pass
    ``--redis-url redis://127.0.0.1:6390/0``.
    """
    from redis.commands.core import Script

    original = Script.__call__
    calls: list[tuple[Any, list[Any], list[Any]]] = []

    def capture(self: Any, keys: Any = (), args: Any = (), client: Any = None) -> Any:
        calls.append((self, list(keys), list(args)))
        return original(self, keys=keys, args=args, client=client)

    Script.__call__ = capture  # type: ignore[method-assign]
    try:
        recorder.take()
        variant.manager.fire("page", {"n": -1})
    finally:
        Script.__call__ = original  # type: ignore[method-assign]
    recorder.take()
    read, read_keys, read_args = calls[0]
    key = "cmdstat_evalsha"
    before = commandstats(client)[key]
    for _ in range(count):
        original(read, keys=read_keys, args=read_args)
    middle = commandstats(client)[key]
    for n in range(count):  # fires only: what they schedule stays scheduled
        variant.manager.fire("page", {"n": n})
        recorder.take()
    after = commandstats(client)[key]
    read_usec = (middle[1] - before[1]) / count
    commit_usec = (after[1] - middle[1] - read_usec * count) / count
    get_calls, get_usec = commandstats(client).get("cmdstat_get", (1, 0))
    return [f"Redis server time: read script {read_usec:.1f} us, commit script "
            f"{commit_usec:.1f} us (EVALSHA calls seen {after[0] - before[0]}, "
            f"made {3 * count}; GET: {get_usec / max(1, get_calls):.1f} us per call)"]


def decompose(variant: Variant, recorder: Recorder, client: Any, rounds: int) -> list[str]:
    """Split the fire's wall time, with floors timed in the same rounds (medians, µs).

    Each round times: one GET; EVALSHA of ``return 1`` with no argument, with the
    read script's arguments, and with the commit script's arguments (what
    redis-py and the round trip cost before any script work); then one fire,
    timing its two script calls from the inside (the rest of the fire is the
    Python of triggers: the manager, building the step, decoding the reply,
    building the commit's arguments).
    """
    from redis.commands.core import Script

    original = Script.__call__
    calls: list[tuple[list[Any], list[Any], float]] = []

    def timed(self: Any, keys: Any = (), args: Any = (), client: Any = None) -> Any:
        began = time.perf_counter()
        try:
            return original(self, keys=keys, args=args, client=client)
        finally:
            calls.append((list(keys), list(args), time.perf_counter() - began))

    nop = client.register_script("return 1")
    client.set("bench:get", b"x" * 100)
    Script.__call__ = timed  # type: ignore[method-assign]
    try:
        recorder.take()
        variant.manager.fire("page", {"n": -1})
        (read_keys, read_args, _), (commit_keys, commit_args, _) = calls[:2]
        for manager, name in recorder.take():
            run_instance(manager, name)
        samples: dict[str, list[float]] = {name: [] for name in (
            "GET", "EVALSHA nop", "EVALSHA nop + read args", "EVALSHA nop + commit args",
            "read script", "commit script", "rest of fire (triggers Python)", "fire")}

        def clock(name: str, call: Any) -> None:
            began = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - began)

        for n in range(rounds):
            clock("GET", lambda: client.get("bench:get"))
            clock("EVALSHA nop", lambda: original(nop, keys=[], args=[]))
            clock("EVALSHA nop + read args",
                  lambda: original(nop, keys=read_keys, args=read_args))
            clock("EVALSHA nop + commit args",
                  lambda: original(nop, keys=commit_keys, args=commit_args))
            calls.clear()
            recorder.take()
            began = time.perf_counter()
            variant.manager.fire("page", {"n": n})
            total = time.perf_counter() - began
            samples["fire"].append(total)
            samples["read script"].append(calls[0][2])
            samples["commit script"].append(calls[1][2])
            samples["rest of fire (triggers Python)"].append(total - calls[0][2] - calls[1][2])
            for manager, name in recorder.take():
                run_instance(manager, name)
    finally:
        Script.__call__ = original  # type: ignore[method-assign]
    get = statistics.median(samples["GET"])
    lines = [f"{'median of ' + str(rounds) + ' interleaved rounds':<40} {'us':>7} {'x GET':>6}"]
    for name, values in samples.items():
        median = statistics.median(values)
        lines.append(f"{name:<40} {median * 1e6:>7.1f} {median / get:>6.2f}")
    lines.append(f"(read: {len(read_keys)} keys + {len(read_args)} args; commit: "
                 f"{len(commit_keys)} keys + {len(commit_args)} args, "
                 f"{sum(len(str(a)) for a in commit_keys + commit_args)} bytes)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", default="redis",
                        choices=("redis", "cache", "sqlite", "postgres"))
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--fires", type=int, default=3000)
    parser.add_argument("--variant", choices=("base", "delayed"), default="base",
                        help="delayed: N scheduled instances of the fired task, delayed and "
                             "not run (benchmarks/common.py)")
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--no-cprofile", action="store_true",
                        help="only the timed loop (to run under py-spy)")
    args = parser.parse_args()
    setup(args.redis_url, DEFAULT_PG_NAME)
    from triggers import CacheStorageBackend, DatabaseStorageBackend, RedisStorageBackend

    client = None
    if args.storage == "redis":
        from triggers.storages.redis import client_for

        def make(uid: str) -> Any:
            return RedisStorageBackend(uid, url=args.redis_url)
        client = client_for(args.redis_url, False)
    elif args.storage == "cache":
        from django.core.cache import caches

        from triggers.locking import redis_client_for_cache

        def make(uid: str) -> Any:
            return CacheStorageBackend(uid, cache="default")
        client = redis_client_for_cache(caches["default"])
    else:
        from django.core.management import call_command

        alias = "default" if args.storage == "sqlite" else "postgres"
        if alias == "postgres":
            from benchmarks.fire_db import ensure_postgres_database

            ensure_postgres_database()
        call_command("migrate", database=alias, verbosity=0)

        def make(uid: str) -> Any:
            return DatabaseStorageBackend(uid, using=alias)

    with Recorder() as recorder:
        if args.variant == "delayed":
            variant = Variant("delayed", new_manager(make, f"profile-{args.storage}",
                                                     CONFIG_DELAYED))
            add_lagging(variant.manager, recorder, args.n)
        else:
            variant = Variant("base", new_manager(make, f"profile-{args.storage}"))
        for n in range(50):
            fire_once(variant, recorder, n)
        plain = [fire_once(variant, recorder, n) for n in range(min(args.fires, 1000))]
        print(f"{args.storage}: fire p50 {statistics.median(plain) * 1e6:.1f} us (no profiler)")
        if client is not None and args.variant == "base":
            print("\n".join(decompose(variant, recorder, client, 2000)))
            print("\n".join(server_time(variant, recorder, client, 1000)))
        if args.no_cprofile:
            for n in range(args.fires):
                fire_once(variant, recorder, n)
            return 0
        profile = cProfile.Profile()
        total = 0.0
        for n in range(args.fires):
            recorder.take()
            began = time.perf_counter()
            profile.enable()
            variant.manager.fire("page", {"n": n})
            profile.disable()
            total += time.perf_counter() - began
            for manager, name in recorder.take():
                run_instance(manager, name)
        print(f"profiled: {total / args.fires * 1e6:.1f} us per fire (with profiler overhead)")
        for order in ("tottime", "cumulative"):
            out = io.StringIO()
            stats = pstats.Stats(profile, stream=out)
            stats.sort_stats(order).print_stats(args.top)
            print(f"--- by {order} ---")
            print(out.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
