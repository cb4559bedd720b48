"""Trigger tasks that ship with triggers (registered when the app loads)."""

from __future__ import annotations

from typing import Any

from triggers.task import TaskContext, TriggerTask

__all__ = ["Noop"]


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
