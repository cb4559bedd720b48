"""Trigger tasks that ship with triggers (registered when the app loads)."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, signals

from triggers.exceptions import UnknownTask
from triggers.task import TaskContext, TriggerTask, register_with_apps

__all__ = ["Noop", "Sweep"]

logger = logging.getLogger(__name__)


class Noop(TriggerTask):
    """Does nothing and succeeds, so that its cascade fires the task's name.

    With ``delay`` and ``unless`` it makes a deadline: "fire X if Y has not fired
    within N seconds after Z"::

        "questionnaireAbandoned": {
            "after": ["questionnaireStarted"],
            "unless": ["questionnaireComplete"],
            "delay": 3600,
            "run": "triggers.noop",
        }
    """

    name = "triggers.noop"

    def _run(self, context: TaskContext) -> dict[str, Any]:
        return {}


@signals.task_unknown.connect
def fail_unregistered_instance(sender: Any = None, message: Any = None, name: str | None = None,
                               **_: Any) -> None:
    """A worker got a message for a task it does not know: fail the instance it was for.

    Only messages that triggers sent (their kwargs name a session, an instance and
    registered manager and storage keys) are considered; without this the
    instance would stay ``scheduled`` forever.
    """
    from triggers.manager import build_manager

    try:
        _args, kwargs, _embed = message.decode()
        fields = {key: kwargs[key] for key in ("uid", "instance", "manager", "storage")}
        options = kwargs.get("storage_options") or {}
    except Exception:  # noqa: BLE001 - not a message of ours
        return
    if not all(isinstance(value, str) for value in fields.values()) or not isinstance(
            options, dict):
        return
    try:
        manager = build_manager(fields["manager"], fields["storage"], fields["uid"], options)
        manager.fail_scheduled_instance(fields["instance"], UnknownTask(
            f"No Celery task named {name!r} is registered with the worker that received "
            f"{fields['instance']} (session {fields['uid']!r}); define it as a TriggerTask in "
            "a module the workers import, then replay the instance.", task_name=name))
    except Exception:  # noqa: BLE001 - never break the worker's consumer
        logger.exception("Could not record that %s of session %r has no registered task %r",
                         fields["instance"], fields["uid"], name)



class Sweep(Task):  # type: ignore[type-arg]
    """``triggers.sweep``: one pass of :func:`triggers.sweep.sweep`, to schedule with Celery
    beat (see :mod:`triggers.sweep`)."""

    name = "triggers.sweep"
    ignore_result = True

    def run(self, storage: str | None = None, limit: int = 1000) -> dict[str, Any]:
        from triggers.sweep import sweep

        report = sweep(storage, limit=limit)
        return {"sessions": report.sessions, "sent": len(report.sent),
                "outcomes": report.outcomes, "errors": len(report.errors)}


register_with_apps(Sweep)
