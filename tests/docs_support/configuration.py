"""The tasks of docs/configuration.rst that tests/app/tasks.py lacks, under the names the
page's configurations run (``app.tasks.<Name>``). Each returns what it received."""

from triggers.task import TriggerTask


class _Received(TriggerTask):
    abstract = True

    def _run(self, context):
        return {"received": context.trigger_kwargs}


class Notify(_Received):
    name = "app.tasks.Notify"


class Refill(_Received):
    name = "app.tasks.Refill"


class ImportPage(_Received):
    name = "app.tasks.ImportPage"


class Clone(_Received):
    name = "app.tasks.Clone"


class AlertOperators(_Received):
    name = "app.tasks.AlertOperators"


class SendWelcomeEmail(_Received):
    name = "app.tasks.SendWelcomeEmail"


class SendReminder(_Received):
    name = "app.tasks.SendReminder"


class A(_Received):
    name = "app.tasks.A"


class B(_Received):
    name = "app.tasks.B"
