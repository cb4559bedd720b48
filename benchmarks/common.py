"""What the benchmark scripts share: set-up, the sessions they build, the timing loop.

The fire that is measured everywhere is ``fire('page')`` of a task configured
``{"after": ["start"], "andEvery": "page"}``: each one creates an instance and
schedules it (three history events: ``fired``, ``created``, ``scheduled``).
Runners are replaced by a :class:`Recorder` that only notes what was dispatched,
so a timed fire costs the storage and the manager, not a broker or a thread; the
benchmark then runs the recorded instance itself, untimed (its start and its
finish are two more steps, as in a worker), or leaves it scheduled (a worker
that lags).

Session variants, each compared with the base one *in the same run*, their
timed fires interleaved round by round in a random order:

* ``base`` — nothing open but what the timed fires create (and finish);
* ``open`` — N open instances of *another* task, created by firing with a
  runner that does not run them: half of them left ``scheduled``, half marked
  ``failed`` with a ~5 KB traceback in their metadata;
* ``lag`` — N scheduled instances of the fired task itself (its worker lags;
  the timed fires' instances are not run either, so the backlog keeps growing);
* ``delayed`` — the same lagging worker, but t_pages has a ``delay``: its N
  scheduled instances stay among the task's *waiting* records (they wait out
  the delay there, and stay there until a worker starts them), which every
  fire of 'page' reads; the timed fires' own instances are run, so N stays;
* ``done`` — K finished instances of the fired task, each one fired, started
  and finished through the manager (realistic records; the history is full).
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
REFERENCE = ROOT / "benchmarks" / "reference"

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"
DEFAULT_PG_NAME = "bench_triggers"
NOOP = "benchmarks.tasks.Noop"

CONFIG = {
    # Once 'start' fired, every fire of 'page' creates and schedules one instance.
    "t_pages": {"after": ["start"], "andEvery": "page", "run": NOOP},
    # The other task of the 'open' backlog: every fire of 'job' schedules one instance.
    "t_backlog": {"after": ["job"], "andEvery": "job", "run": NOOP},
}

#: The same with a delayed t_pages: its scheduled instances wait out the delay among the
#: task's *waiting* records, which a fire of 'page' reads (see the ``delayed`` variant).
CONFIG_DELAYED = {**CONFIG, "t_pages": {**CONFIG["t_pages"], "delay": 1}}

#: Instances per lock block when building a backlog (one commit each).
BLOCK = 20


def setup(redis_url: str = DEFAULT_REDIS_URL, pg_name: str | None = None) -> None:
    """Configure Django with benchmarks/settings.py (Redis database and PostgreSQL name)."""
    os.environ["TRIGGERS_BENCH_REDIS_URL"] = redis_url
    if pg_name:
        os.environ["TRIGGERS_BENCH_PG_NAME"] = pg_name
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def traceback_text(size: int = 5000) -> str:
    """A traceback-like text of about ``size`` characters."""
    frame = ('  File "/srv/app/importers/pages.py", line {n}, in parse_page\n'
             '    value = converters[kind](raw, strict=True)\n')
    lines = ["Traceback (most recent call last):\n"]
    n = 0
    while sum(map(len, lines)) < size - 60:
        lines.append(frame.format(n=100 + n))
        n += 1
    lines.append("ValueError: page 17: field 'birth_date' is not a date\n")
    return "".join(lines)[:size]


# -- runners ----------------------------------------------------------------------


class Recorder:
    """Replaces the runners: dispatching an instance only records it.

    While active, the default runner is ``threading`` and
    ``ThreadingTaskRunner.run`` appends ``(manager, instance name)`` to
    :attr:`dispatched` instead of starting a thread.
    """

    def __init__(self) -> None:
        self.dispatched: list[tuple[Any, str]] = []
        self._patches: list[Any] = []

    def __enter__(self) -> Recorder:
        from unittest import mock

        from triggers import runners

        recorder = self

        def record(_runner: Any, manager: Any, task_instance: Any) -> None:
            recorder.dispatched.append((manager, task_instance.name))

        self._patches = [mock.patch.object(runners, "DEFAULT_TASK_RUNNER", "threading"),
                         mock.patch.object(runners.ThreadingTaskRunner, "run", record)]
        for patch in self._patches:
            patch.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for patch in reversed(self._patches):
            patch.stop()

    def take(self) -> list[tuple[Any, str]]:
        taken, self.dispatched = self.dispatched, []
        return taken


def run_instance(manager: Any, name: str) -> None:
    """Run a dispatched instance here and now, as a worker would (start, run, finish)."""
    from triggers.runners import BaseTaskRunner

    task = BaseTaskRunner.resolve(NOOP)
    task.execute_in_thread(manager, name)


# -- building sessions --------------------------------------------------------------


def new_manager(make_storage: Callable[[str], Any], label: str,
                config: dict[str, Any] | None = None) -> Any:
    """A manager of a new session with :data:`CONFIG` (or ``config``), 'start' fired."""
    from triggers import TriggerManager

    uid = f"bench-{label}-{uuid.uuid4().hex[:8]}"
    manager = TriggerManager(make_storage(uid))
    manager.update_configuration(config or CONFIG)
    manager.fire("start")
    return manager


@contextmanager
def _block(manager: Any) -> Iterator[None]:
    with manager.storage.acquire_lock():
        yield


def dispatched_names(recorder: Recorder) -> list[str]:
    """What was dispatched since the last take, each name once.

    Inside ``acquire_lock()`` every ``fire()`` dispatches again what the earlier
    fires of the block scheduled (the block's step keeps one ``fired`` list, and
    ``fire()`` returns the block's first fire's instances), so names repeat.
    """
    return list(dict.fromkeys(name for _manager, name in recorder.take()))


def add_finished(manager: Any, recorder: Recorder, k: int, block: int = BLOCK) -> None:
    """K more finished instances of t_pages: fired, started and finished by the manager.

    Steps are grouped ``block`` at a time in lock blocks (one commit per block);
    the records and the history are those of one step each.
    """
    done = 0
    while done < k:
        size = min(block, k - done)
        recorder.take()
        with _block(manager):
            for n in range(size):
                manager.fire("page", {"n": done + n})
        names = dispatched_names(recorder)
        with _block(manager):
            for name in names:
                run_instance(manager, name)
        recorder.take()
        done += size


def add_open_backlog(manager: Any, recorder: Recorder, n: int, block: int = BLOCK) -> None:
    """N open instances of t_backlog, fired and never run; every other one marked failed."""
    traceback = traceback_text()
    made = 0
    while made < n:
        size = min(block, n - made)
        recorder.take()
        with _block(manager):
            for i in range(size):
                manager.fire("job", {"n": made + i, "file": f"upload-{made + i}.csv"})
        names = dispatched_names(recorder)
        with _block(manager):
            for name in names[1::2]:
                manager.update_instance_status(name, "failed", metadata={
                    "exc_type": "ValueError",
                    "exc_message": "page 17: field 'birth_date' is not a date",
                    "exc_traceback": traceback})
        made += size


def add_lagging(manager: Any, recorder: Recorder, n: int, block: int = BLOCK) -> None:
    """N scheduled instances of t_pages itself: fired, never run (the worker lags)."""
    made = 0
    while made < n:
        size = min(block, n - made)
        with _block(manager):
            for i in range(size):
                manager.fire("page", {"n": made + i})
        recorder.take()
        made += size


def count_open(manager: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for instance in manager.get_unresolved_instances():
        key = f"{instance.task_name}:{instance.status.value}"
        counts[key] = counts.get(key, 0) + 1
    return counts


# -- timing ----------------------------------------------------------------------------


@dataclass
class Variant:
    """A session to time fires in."""

    name: str
    manager: Any
    #: Run what the timed fire scheduled (untimed), or leave it scheduled.
    run_after: bool = True
    samples: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(samples: list[float]) -> dict[str, float]:
    return {"p50_us": round(statistics.median(samples) * 1e6, 1),
            "p90_us": round(percentile(samples, 0.9) * 1e6, 1),
            "p99_us": round(percentile(samples, 0.99) * 1e6, 1),
            "samples": len(samples)}


def fire_once(variant: Variant, recorder: Recorder, n: int) -> float:
    """One timed ``fire('page')``; then run (untimed) what it scheduled, or not."""
    recorder.take()
    started = time.perf_counter()
    scheduled = variant.manager.fire("page", {"n": n})
    elapsed = time.perf_counter() - started
    assert len(scheduled) == 1, scheduled
    dispatched = recorder.take()
    if variant.run_after:
        for manager, name in dispatched:
            run_instance(manager, name)
    return elapsed


def interleaved(variants: list[Variant], recorder: Recorder, rounds: int,
                extra: dict[str, Callable[[], float]] | None = None) -> dict[str, list[float]]:
    """Time ``rounds`` fires per variant, one per variant per round in a random order.

    ``extra`` adds other timed operations (a Redis GET) to each round.
    """
    extra = extra or {}
    others: dict[str, list[float]] = {name: [] for name in extra}
    order: list[Any] = [*variants, *extra]
    for variant in variants:  # warm up connections, scripts, caches
        for n in range(20):
            fire_once(variant, recorder, -1 - n)
    for timed in extra.values():
        for _ in range(50):
            timed()
    rng = random.Random(1)
    for n in range(rounds):
        rng.shuffle(order)
        for item in order:
            if isinstance(item, Variant):
                item.samples.append(fire_once(item, recorder, n))
            else:
                others[item].append(extra[item]())
    return others


def block_ratios(samples: list[float], base: list[float], block: int = 100) -> dict[str, float]:
    """p50 ratio of two interleaved sample lists, block by block of ``block`` rounds.

    The spread of the per-block ratios shows how much the machine's load moved the
    ratio during the run.
    """
    ratios = [statistics.median(samples[i:i + block]) / statistics.median(base[i:i + block])
              for i in range(0, min(len(samples), len(base)) - block + 1, block)]
    if not ratios:
        return {}
    return {"blocks": len(ratios), "median": round(statistics.median(ratios), 3),
            "min": round(min(ratios), 3), "max": round(max(ratios), 3)}


def environment() -> dict[str, Any]:
    import django
    import redis

    return {"python": platform.python_version(), "django": django.get_version(),
            "redis_py": redis.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "at": time.strftime("%Y-%m-%d %H:%M:%S"), **_source_state()}


def _source_state() -> dict[str, Any]:
    """The commit measured, and the files of triggers/ changed since (read-only git)."""
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10, check=False).stdout.rstrip("\n")
        except OSError:
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--", "triggers").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "triggers_changed": changed}


def write_results(name: str, results: dict[str, Any], reference: bool) -> Path:
    """benchmarks/results/<name>.json, and benchmarks/reference/<name>-python-svc.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    text = json.dumps(results, indent=2) + "\n"
    path.write_text(text)
    if reference:
        REFERENCE.mkdir(parents=True, exist_ok=True)
        (REFERENCE / f"{name}-python-svc.json").write_text(text)
    return path


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"
