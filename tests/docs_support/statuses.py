"""What docs/statuses.rst takes for granted: a subject import that fails without a name."""

from triggers.exceptions import with_context
from triggers.task import TriggerTask


class ImportSubject(TriggerTask):
    """Fails when the first page has no name; returns the subject's id otherwise."""

    name = "docs.statuses.ImportSubject"

    def _run(self, context):
        first_page = context.trigger_kwargs["firstPageReceived"]
        if not first_page.get("name"):
            raise with_context(ValueError("first page has no name"), {"fields": ["email"]})
        return {"subject_id": first_page["subject_id"]}
