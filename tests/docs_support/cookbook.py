"""What docs/cookbook.rst takes for granted: the tasks its configurations run."""

from triggers.task import TriggerTask


class MarkQuestionnaireDone(TriggerTask):
    """Waits for ``sessionFinalized``; marks the questionnaire done."""

    name = "docs.cookbook.MarkQuestionnaireDone"

    def _run(self, context):
        return {"done": True}


class CompareResponses(TriggerTask):
    """Compares the responses of two questionnaires of one applicant."""

    name = "docs.cookbook.CompareResponses"

    def _run(self, context):
        return {"compared": sorted(context.trigger_kwargs)}
