"""Trigger tasks of the test project (the questionnaire of the getting-started guide)."""

import filters as f
from celery import shared_task

from triggers.exceptions import with_context
from triggers.task import TriggerTask


class ImportSubject(TriggerTask):
    """Imports the subject from the first page, once the questionnaire is complete."""

    name = "app.tasks.ImportSubject"

    def _run(self, context):
        first_page = context.trigger_kwargs["firstPageReceived"]
        return {"subject_id": first_page.get("subject_id", 1), "name": first_page.get("name")}


class ImportResponses(TriggerTask):
    """Imports one page of responses, for a subject that was imported already."""

    name = "app.tasks.ImportResponses"

    def _run(self, context):
        page = context.trigger_kwargs["pageReceived"]
        subject = context.trigger_kwargs["t_importSubject"]
        return {"page": page.get("page"), "subject_id": subject["subject_id"]}


class ImportBrowserMetadata(TriggerTask):
    """Reads the user agent of any one page."""

    name = "app.tasks.ImportBrowserMetadata"

    def _run(self, context):
        page = context.trigger_kwargs["pageReceived"]
        return {"user_agent": page.get("user_agent"), "page": page.get("page")}


class Echo(TriggerTask):
    """Returns the trigger kwargs it received (withParams merged)."""

    name = "tests.Echo"

    def _run(self, context):
        return {"seen": context.trigger_kwargs}


class Fail(TriggerTask):
    """Always fails, with context attached to the exception."""

    name = "tests.Fail"

    def _run(self, context):
        raise with_context(ValueError("the subject is invalid"), {"subject_id": 42})


class FailUnlessFixed(TriggerTask):
    """Fails unless the kwargs of trigger ``go`` say ``fixed: True``."""

    name = "tests.FailUnlessFixed"

    def _run(self, context):
        if not context.trigger_kwargs.get("go", {}).get("fixed"):
            raise ValueError("not fixed yet")
        return {"fixed": True}


class Retry(TriggerTask):
    """Retries until its retry depth reaches ``succeed_at`` (from trigger ``go``)."""

    name = "tests.Retry"
    max_retries = 2

    def _run(self, context):
        succeed_at = context.trigger_kwargs.get("go", {}).get("succeed_at", 99)
        if self.request.retries < succeed_at:
            raise self.retry(exc=RuntimeError(f"attempt {self.request.retries}"), cooldown=0,
                             metadata={"attempt": self.request.retries})
        return {"retries": self.request.retries}


class RetryWithReplacement(TriggerTask):
    """Retries once with replacement kwargs, then returns what it got."""

    name = "tests.RetryWithReplacement"

    def _run(self, context):
        if self.request.retries == 0:
            raise self.retry(replacement_kwargs={"go": {"value": "replaced"}})
        return {"value": context.trigger_kwargs["go"]["value"], "depth": self.request.retries}


class Skip(TriggerTask):
    """Marks itself skipped."""

    name = "tests.Skip"

    def _run(self, context):
        raise self.skip(metadata={"reason": "nothing to do"})


class BadResult(TriggerTask):
    """Returns something that cannot be a cascade's kwargs."""

    name = "tests.BadResult"

    def _run(self, context):
        return ["not", "a", "mapping"]


class Logs(TriggerTask):
    """Logs at the level given by trigger ``go`` (default WARNING), with context."""

    name = "tests.Logs"

    def _run(self, context):
        level = context.trigger_kwargs.get("go", {}).get("level", 30)
        with context.get_logger_context({"block": "outer"}) as logger:
            logger.info("starting", extras={"context": {"step": 1}})
            logger.log(level, "something to look at")
            if context.trigger_kwargs.get("go", {}).get("raise"):
                raise with_context(RuntimeError("boom"), {"detail": "inside"})
        return {"logged": level}


class FilterKwargs(TriggerTask):
    """Validates and converts its kwargs with phx-filters."""

    name = "tests.FilterKwargs"

    def _run(self, context):
        cleaned = context.filter_kwargs({"go": {"count": f.Required | f.Int | f.Min(1)}})
        return {"count": cleaned["go"]["count"]}


@shared_task(name="tests.plain_celery_task")
def plain_celery_task():
    """A plain Celery task: trigger configurations must refuse it."""
    return None


def _redis():
    import redis
    from django.conf import settings

    return redis.Redis.from_url(settings.REDIS_URL)


def execution_key(uid, instance_name):
    return f"executions:{uid}:{instance_name}"


class Count(TriggerTask):
    """Counts its executions in Redis (per session and instance), optionally sleeping first."""

    name = "tests.Count"

    def _run(self, context):
        import time

        client = _redis()
        client.incr(execution_key(context.session_uid, context.task_instance.name))
        client.incr(f"executions:{context.session_uid}")
        seconds = 0
        for kwargs in context.trigger_kwargs.values():
            seconds = max(seconds, kwargs.get("sleep", 0) if isinstance(kwargs, dict) else 0)
        if seconds:
            client.set(f"started:{context.session_uid}:{context.task_instance.name}", 1)
            time.sleep(seconds)
        return {"instance": context.task_instance.name}


class CountAlone(Count):
    """Count, routed to a queue of its own (only the workers a test starts for it consume it)."""

    name = "tests.CountAlone"


class Routed(TriggerTask):
    """Returns the queue its message came through (routing applies)."""

    name = "tests.Routed"

    def _run(self, context):
        return {"routing_key": (self.request.delivery_info or {}).get("routing_key")}


class RetryLater(TriggerTask):
    """Retries once, two seconds later."""

    name = "tests.RetryLater"

    def _run(self, context):
        if self.request.retries == 0:
            raise self.retry(cooldown=2)
        return {"depth": self.request.retries}


class RetryCeleryStyle(TriggerTask):
    """Always retries, with Celery's argument names (countdown, max_retries)."""

    name = "tests.RetryCeleryStyle"

    def _run(self, context):
        options = context.trigger_kwargs.get("go", {})
        raise self.retry(exc=ValueError("flaky"), **options)


class PassThru(TriggerTask):
    """Returns the kwargs it received under ``kwargs`` (the original's PassThruTask)."""

    name = "tests.PassThru"

    def _run(self, context):
        return {"kwargs": context.trigger_kwargs}


class Hacked(TriggerTask):
    """Returns ``{'kwargs': {'hacked': True}}``."""

    name = "tests.Hacked"

    def _run(self, context):
        return {"kwargs": {"hacked": True}}


class Types(TriggerTask):
    """Returns the Python type names of the kwargs it received, and the values themselves."""

    name = "tests.Types"

    def _run(self, context):
        kwargs = context.trigger_kwargs["typed"]
        return {"types": {key: type(value).__name__ for key, value in kwargs.items()},
                "values": kwargs}


class ChargeCard(TriggerTask):
    """Fails unless the kwargs of trigger ``order_placed`` say ``card_ok: True``."""

    name = "tests.ChargeCard"

    def _run(self, context):
        order = context.trigger_kwargs.get("order_placed", {})
        if not order.get("card_ok"):
            raise ValueError(f"card declined for order {order.get('order')}")
        return {"charged": order.get("order")}
