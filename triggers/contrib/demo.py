"""The questionnaire workflow of the getting-started guide, end to end.

``python -m triggers.demo`` runs it on the embedded default — the database
storage on a fresh SQLite file and the threading runner: no Redis, no Celery
worker. ``python -m triggers.demo --celery`` runs the same flow on the cache
storage over Redis with a real Celery worker (Redis as the broker too), which
it starts and stops; it needs the redis extra (``pip install 'triggers[redis]'``).
Inside a Django project: ``manage.py triggers demo``.

The standalone demo leaves nothing behind: its temporary SQLite file (and
directory) is removed at exit. With ``--celery`` its tasks go to a queue of its
own (``triggers-demo-<random>``) that only its worker consumes, so another
worker on the same broker cannot take them; ``TRIGGERS_DEMO_REDIS_URL`` chooses
the Redis database (default ``redis://127.0.0.1:6379/11``).

It prints a timeline (trigger fired → instance scheduled → started → finished →
cascade) and the final state of the session, which the
:class:`~triggers.manager.FinalizingTriggerManager` finalizes.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

from celery import Celery

from triggers.task import TaskContext, TriggerTask

__all__ = ["CONFIGURATION", "EVENTS", "app", "main", "run_demo"]

REDIS_URL = os.environ.get("TRIGGERS_DEMO_REDIS_URL", "redis://127.0.0.1:6379/11")
#: The demo's own Celery queue: a worker started by this demo run consumes it, and
#: no other worker on the broker does (its worker gets the name in the environment).
QUEUE = os.environ.get("TRIGGERS_DEMO_QUEUE") or f"triggers-demo-{uuid.uuid4().hex[:12]}"

CONFIGURATION: dict[str, dict[str, Any]] = {
    "t_importSubject": {
        "after": ["firstPageReceived", "questionnaireComplete"],
        "run": "triggers.demo.ImportSubject",
    },
    "t_importResponses": {
        "after": ["t_importSubject"],
        "andEvery": "pageReceived",
        "run": "triggers.demo.ImportResponses",
    },
    "t_importBrowserMetadata": {
        "after": ["t_importSubject", "pageReceived"],
        "unless": ["isEmbeddedApplication"],
        "run": "triggers.demo.ImportBrowserMetadata",
    },
    "t_markComplete": {
        "after": ["sessionFinalized"],
        "run": "triggers.demo.MarkComplete",
    },
}

#: What the web application fires, in the order its requests happen to arrive.
EVENTS: list[tuple[str, dict[str, Any]]] = [
    ("pageReceived", {"page": 1, "responses": {"age": 36}, "user_agent": "Firefox/140"}),
    ("firstPageReceived", {"name": "Ada", "email": "ada@example.org"}),
    ("pageReceived", {"page": 2, "responses": {"colour": "green"}, "user_agent": "Firefox/140"}),
    ("questionnaireComplete", {}),
    ("pageReceived", {"page": 3, "responses": {"pets": 2}, "user_agent": "Firefox/140"}),
]


class ImportSubject(TriggerTask):
    name = "triggers.demo.ImportSubject"

    def _run(self, context: TaskContext) -> dict[str, Any]:
        subject = context.trigger_kwargs["firstPageReceived"]
        return {"subject_id": 1001, "name": subject["name"]}


class ImportResponses(TriggerTask):
    name = "triggers.demo.ImportResponses"

    def _run(self, context: TaskContext) -> dict[str, Any]:
        page = context.trigger_kwargs["pageReceived"]
        subject_id = context.trigger_kwargs["t_importSubject"]["subject_id"]
        return {"page": page["page"], "subject_id": subject_id}


class ImportBrowserMetadata(TriggerTask):
    name = "triggers.demo.ImportBrowserMetadata"

    def _run(self, context: TaskContext) -> dict[str, Any]:
        agent = context.trigger_kwargs["pageReceived"]["user_agent"]
        return {"browser": agent.split("/")[0]}


class MarkComplete(TriggerTask):
    name = "triggers.demo.MarkComplete"

    def _run(self, context: TaskContext) -> dict[str, Any]:
        return {"complete": True}


#: The demo's Celery app (``celery -A triggers.contrib.demo worker``); Redis is its broker.
app = Celery("triggers-demo", set_as_current=False)
app.conf.update(broker_url=REDIS_URL, task_ignore_result=True, task_default_queue=QUEUE,
                broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)

#: The temporary directory of the standalone demo's SQLite file (removed at exit).
_temporary_directory: Path | None = None


def remove_temporary_files() -> None:
    """Remove the standalone demo's temporary SQLite file and its directory (at exit)."""
    global _temporary_directory
    directory, _temporary_directory = _temporary_directory, None
    if directory is None:
        return
    try:
        from django.db import connections

        connections.close_all()
    except Exception:  # noqa: BLE001 - removing the files matters more
        pass
    shutil.rmtree(directory, ignore_errors=True)


def configure(celery: bool = False) -> None:
    """Configure Django for a standalone demo (no project needed)."""
    import django
    from django.conf import settings

    if settings.configured:
        return
    common: dict[str, Any] = {
        "INSTALLED_APPS": ["django.contrib.contenttypes", "django.contrib.auth", "triggers"],
        "USE_TZ": True,
        "LOGGING_CONFIG": None,
    }
    if celery:
        settings.configure(
            **common,
            DATABASES={},
            CACHES={"default": {"BACKEND": "django_redis.cache.RedisCache",
                                "LOCATION": REDIS_URL}},
            TRIGGERS={"MANAGER": "finalizing", "STORAGE": "cache", "TIMEOUT": 3600,
                      "RUNNER": "celery"},
        )
        django.setup()
        return
    global _temporary_directory
    directory = Path(tempfile.mkdtemp(prefix="triggers-demo-"))
    _temporary_directory = directory
    atexit.register(remove_temporary_files)
    settings.configure(
        **common,
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                               "NAME": str(directory / "demo.sqlite3"),
                               "OPTIONS": {"timeout": 30}}},
        TRIGGERS={"MANAGER": "finalizing", "STORAGE": "db", "RUNNER": "threading"},
    )
    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


if os.environ.get("TRIGGERS_DEMO_WORKER"):
    # Imported by `celery -A triggers.contrib.demo worker` started by run_demo(celery=True).
    configure(celery=True)
    app.set_current()


class _Worker:
    """A `celery -A triggers.contrib.demo worker` process, started and stopped by PID."""

    def __init__(self, output: TextIO) -> None:
        self.output = output
        handle, path = tempfile.mkstemp(prefix="triggers-demo-worker-", suffix=".log")
        os.close(handle)
        self.log = Path(path)
        env = dict(os.environ, TRIGGERS_DEMO_WORKER="1", TRIGGERS_DEMO_REDIS_URL=REDIS_URL,
                   TRIGGERS_DEMO_QUEUE=QUEUE)
        env.pop("DJANGO_SETTINGS_MODULE", None)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "triggers.contrib.demo", "worker", "--pool",
                 "prefork", "--concurrency", "2", "--loglevel", "INFO", "--without-gossip",
                 "--without-mingle", "--without-heartbeat", "--queues", QUEUE],
                env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None or " ready." in self.log.read_text(errors="replace"):
                break
            time.sleep(0.2)
        text = self.log.read_text(errors="replace")
        if " ready." not in text:
            self.stop()
            raise RuntimeError(f"The demo's Celery worker did not start:\n{text}")
        self.output.write(f"Celery worker started (pid {self.process.pid}, broker {REDIS_URL}, "
                          f"queue {QUEUE})\n")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self.log.unlink(missing_ok=True)
        _delete_queue()
        self.output.write(f"Celery worker stopped (pid {self.process.pid})\n")


def _delete_queue() -> None:
    """Remove the demo's queue (and its binding) from the broker; best effort."""
    try:
        with app.connection_for_write() as connection:
            # Declared on this channel first: the channel then knows the queue's binding
            # and deletes it with the queue.
            queue = app.amqp.queues[QUEUE].bind(connection.default_channel)
            queue.declare()
            queue.delete()
    except Exception:  # noqa: BLE001 - an empty queue left behind does no harm
        pass


def _require_redis() -> None:
    """The Celery demo runs on Redis: the redis extra must be installed."""
    from triggers.locking import require_redis

    for module in ("redis", "redis_lock", "django_redis"):
        require_redis(module)


def _timeline(manager: Any, fired: list[tuple[float, str, dict[str, Any]]]) -> list[tuple[float, str]]:
    events: list[tuple[float, int, str]] = [
        (at, 0, f"trigger {name!r} fired {kwargs or ''}".rstrip()) for at, name, kwargs in fired]
    for instance in manager.storage:
        meta = instance.metadata
        waiting = ", ".join(instance.missing_triggers)
        events.append((meta["created"], 1, f"{instance.name} created"
                       + (f", waiting for {waiting}" if waiting and "scheduled" not in meta else "")))
        if instance.name == "t_markComplete#0":
            events.append((meta["created"], 0,
                           "trigger 'sessionFinalized' fired by FinalizingTriggerManager"))
        if "scheduled" in meta:
            events.append((meta["scheduled"], 2,
                           f"{instance.name} scheduled ({meta.get('runner')})"))
        if "started" in meta:
            events.append((meta["started"], 3, f"{instance.name} started"))
        if instance.status.value == "finished":
            events.append((meta["finished"], 4, f"{instance.name} finished {meta.get('result')} "
                                                f"-> cascade {instance.task_name!r} fired"))
        elif instance.status.value == "abandoned":
            events.append((meta["modified"], 4, f"{instance.name} abandoned"))
        elif instance.status.value == "failed":
            events.append((meta["modified"], 4,
                           f"{instance.name} failed: {meta.get('exc_message')}"))
    return [(at, text) for at, _, text in sorted(events)]


def run_demo(output: TextIO = sys.stdout, celery: bool = False, manager: Any = None) -> bool:
    """Run the questionnaire workflow; return whether the session was finalized.

    ``manager``: a trigger manager to use (default: the finalizing manager over the
    configured storage of a fresh session).
    """
    if celery:
        _require_redis()
    configure(celery)
    from triggers.manager import build_manager
    from triggers.runners import ThreadingTaskRunner
    from triggers.testing import use_threading_runner

    worker = None
    if celery:
        app.set_current()
        worker = _Worker(output)
        worker.wait_ready()
    try:
        if manager is None:
            from triggers.conf import triggers_settings

            manager = build_manager("finalizing", triggers_settings.STORAGE,
                                    f"demo-{uuid.uuid4().hex[:8]}",
                                    triggers_settings.storage_options())
        storage = manager.storage
        output.write(f"Session {storage.uid} on {type(storage).__name__} "
                     f"({'Celery worker' if celery else 'threading runner'})\n")
        manager.update_configuration(CONFIGURATION)
        fired: list[tuple[float, str, dict[str, Any]]] = []
        patch = None if celery else use_threading_runner()
        if patch is not None:
            patch.start()
        try:
            for trigger_name, kwargs in EVENTS:
                fired.append((time.time(), trigger_name, kwargs))
                manager.fire(trigger_name, kwargs)
                time.sleep(0.05)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                ThreadingTaskRunner.join_all()
                if not manager.get_unresolved_tasks():
                    break
                time.sleep(0.1)
        finally:
            if patch is not None:
                patch.stop()
        started = fired[0][0]
        output.write("\nTimeline:\n")
        for at, text in _timeline(manager, fired):
            output.write(f"  {at - started:7.3f}s  {text}\n")
        output.write("\nFinal state of the session:\n")
        for instance in storage:
            result = instance.metadata.get("result")
            output.write(f"  {instance.name:<28} {instance.status.value:<10} {result}\n")
        unresolved = [config.name for config in manager.get_unresolved_tasks()]
        finalized = "sessionFinalized" in storage.latest_kwargs and not unresolved
        output.write(f"\nSession finalized: {'yes' if finalized else 'no'}; unresolved tasks: "
                     f"{', '.join(unresolved) or 'none'}\n")
        return finalized
    finally:
        if worker is not None:
            worker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m triggers.demo", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--celery", action="store_true",
                        help=f"run on Redis with a real Celery worker ({REDIS_URL})")
    options = parser.parse_args(argv)
    if options.celery:
        try:
            _require_redis()
        except ImportError as exc:
            parser.error(str(exc))
    # Stopped with SIGTERM, exit normally: the temporary files are removed and the
    # worker is stopped on the way out.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        return 0 if run_demo(celery=options.celery) else 1
    finally:
        remove_temporary_files()


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    raise SystemExit(main())
