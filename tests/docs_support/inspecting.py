"""The questionnaire session that docs/inspecting.rst inspects and repairs.

Its tasks fail the way the page's examples need: the subject import without a
name on the first page, a page without answers, a page without a user agent.
"""

from triggers import get_trigger_manager
from triggers.runners import ThreadingTaskRunner
from triggers.task import TriggerTask


class ImportSubject(TriggerTask):
    name = "docs.inspecting.ImportSubject"

    def _run(self, context):
        first_page = context.trigger_kwargs["firstPageReceived"]
        name = first_page["responses"]["name"]  # KeyError: 'name' if the page has none
        with context.get_logger_context() as logger:
            logger.info("importing subject %s", name)
        return {"subject_id": 42}


class ImportResponses(TriggerTask):
    name = "docs.inspecting.ImportResponses"

    def _run(self, context):
        page = context.trigger_kwargs["pageReceived"]
        if not page.get("answers"):
            raise ValueError(f"page {page['page']} has no answers")
        subject = context.trigger_kwargs["t_importSubject"]
        return {"page": page["page"], "subject_id": subject["subject_id"]}


class ImportBrowserMetadata(TriggerTask):
    name = "docs.inspecting.ImportBrowserMetadata"

    def _run(self, context):
        return {"browser": context.trigger_kwargs["pageReceived"]["user_agent"]}


CONFIGURATION = {
    "t_importSubject": {
        "after": ["firstPageReceived", "questionnaireComplete"],
        "run": ImportSubject.name,
    },
    "t_importResponses": {
        "after": ["t_importSubject"],
        "andEvery": "pageReceived",
        "run": ImportResponses.name,
    },
    "t_importBrowserMetadata": {
        "after": ["t_importSubject", "pageReceived"],
        "run": ImportBrowserMetadata.name,
        "onRecovery": "skip",
    },
}

GOOD_PAGES = [
    {"page": 1, "answers": [3, 1], "user_agent": "Firefox"},
    {"page": 2, "answers": [2, 2], "user_agent": "Firefox"},
    {"page": 3, "answers": [5], "user_agent": "Firefox"},
]


def questionnaire(uid, name="Jane Doe", pages=GOOD_PAGES):
    """Session ``uid`` anew: configured, the pages and the questionnaire received, every
    run over. Without ``name`` the subject import fails."""
    manager = get_trigger_manager(uid)
    manager.storage.delete()
    manager.update_configuration(CONFIGURATION)
    manager.fire("firstPageReceived", {"responses": {"name": name} if name else {}})
    for page in pages:
        manager.fire("pageReceived", page)
    manager.fire("questionnaireComplete")
    ThreadingTaskRunner.join_all(timeout=30)
    return manager


def statuses(manager):
    """Instance name -> status value, for the checks of the page."""
    ThreadingTaskRunner.join_all(timeout=30)
    return {instance.name: instance.status.value for instance in manager.storage}
