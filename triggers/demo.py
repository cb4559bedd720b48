"""The questionnaire workflow of the getting-started guide, end to end.

Run it with ``python -m triggers.demo``: no Redis and no Celery worker are
needed (local-memory cache, threading runner). It prints a timeline of
triggers, scheduled and finished instances and cascades, then the final state
of the session, finalized by the cookbook's FinalizingTriggerManager.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from typing import Any, TextIO

from triggers.task import TaskContext, TriggerTask

__all__ = ["main", "run_demo"]

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

#: What the web application fires, in the order requests happen to arrive.
EVENTS: list[tuple[str, dict[str, Any]]] = [
    ("pageReceived", {"page": 1, "responses": {"age": 36}, "user_agent": "Firefox/140"}),
    ("firstPageReceived", {"name": "Ada", "email": "ada@example.org"}),
    ("pageReceived", {"page": 2, "responses": {"colour": "green"}, "user_agent": "Firefox/140"}),
    ("pageReceived", {"page": 3, "responses": {"pets": 2}, "user_agent": "Firefox/140"}),
    ("questionnaireComplete", {}),
]

_output: TextIO = sys.stdout
_started = time.monotonic()
_print_lock = threading.Lock()


def say(message: str) -> None:
    with _print_lock:
        _output.write(f"[{time.monotonic() - _started:6.3f}s] {message}\n")
        _output.flush()


class ImportSubject(TriggerTask):
    name = "triggers.demo.ImportSubject"

    def _run(self, context: TaskContext) -> dict[str, Any]:
        subject = context.trigger_kwargs["firstPageReceived"]
        say(f"  running {context.task_instance.name}: importing subject {subject['name']}")
        return {"subject_id": 1001}


class ImportResponses(TriggerTask):
    name = "triggers.demo.ImportResponses"

    def _run(self, context: TaskContext) -> dict[str, Any]:
        page = context.trigger_kwargs["pageReceived"]
        subject_id = context.trigger_kwargs["t_importSubject"]["subject_id"]
        say(f"  running {context.task_instance.name}: page {page['page']} of subject {subject_id}")
        return {"page": page["page"]}


class ImportBrowserMetadata(TriggerTask):
    name = "triggers.demo.ImportBrowserMetadata"

    def _run(self, context: TaskContext) -> dict[str, Any]:
        agent = context.trigger_kwargs["pageReceived"]["user_agent"]
        say(f"  running {context.task_instance.name}: user agent {agent}")
        return {"browser": agent.split("/")[0]}


class MarkComplete(TriggerTask):
    name = "triggers.demo.MarkComplete"

    def _run(self, context: TaskContext) -> dict[str, Any]:
        say(f"  running {context.task_instance.name}: questionnaire marked complete")
        return {"complete": True}


def _manager_class() -> type:
    from triggers.manager import TriggerManager

    class DemoManager(TriggerManager):
        """The cookbook's FinalizingTriggerManager, telling what happens."""

        TRIGGER_SESSION_FINALIZED = "sessionFinalized"

        def _post_fire(self, trigger_name: str, tasks_scheduled: list[Any]) -> None:
            scheduled = ", ".join(i.name for i in tasks_scheduled) or "nothing"
            kind = "cascade" if trigger_name in CONFIGURATION else "trigger"
            say(f"{kind} {trigger_name!r} fired -> scheduled {scheduled}")
            if trigger_name == self.TRIGGER_SESSION_FINALIZED:
                return
            if self.TRIGGER_SESSION_FINALIZED in self.storage.latest_kwargs:
                return
            for config in self.get_unresolved_tasks():
                if self.TRIGGER_SESSION_FINALIZED not in config.after:
                    return
            self.fire(self.TRIGGER_SESSION_FINALIZED)

    return DemoManager


def _configure_django() -> None:
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            INSTALLED_APPS=["triggers"],
            CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}},
            USE_TZ=True,
        )
        django.setup()


def run_demo(output: TextIO = sys.stdout, cache: str = "default") -> bool:
    """Run the questionnaire workflow; return whether the session was finalized."""
    global _output, _started
    _output, _started = output, time.monotonic()
    _configure_django()
    from unittest import mock

    from triggers import runners
    from triggers.runners import ThreadingTaskRunner
    from triggers.storages.cache import CacheStorageBackend

    with mock.patch.object(runners, "DEFAULT_TASK_RUNNER", ThreadingTaskRunner.name):
        manager = _manager_class()(CacheStorageBackend(f"demo-{uuid.uuid4().hex[:8]}", cache))
        say(f"session {manager.storage.uid}: configuring {len(CONFIGURATION)} tasks")
        manager.update_configuration(CONFIGURATION)
        for trigger_name, kwargs in EVENTS:
            manager.fire(trigger_name, kwargs)
            time.sleep(0.05)
        ThreadingTaskRunner.join_all()

    output.write("\nFinal state of the session:\n")
    for instance in manager.storage:
        result = instance.metadata.get("result")
        output.write(f"  {instance.name:<28} {instance.status.value:<10} {result}\n")
    unresolved = manager.get_unresolved_tasks()
    finalized = "sessionFinalized" in manager.storage.latest_kwargs and not unresolved
    output.write(f"\nsession finalized: {'yes' if finalized else 'no'}; "
                 f"unresolved tasks: {[c.name for c in unresolved] or 'none'}\n")
    return finalized


def main() -> int:
    return 0 if run_demo() else 1


if __name__ == "__main__":
    raise SystemExit(main())
