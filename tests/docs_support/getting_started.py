"""The questionnaire project of docs/getting_started.rst, as the pages that build on it
(README.rst, getting_started, testing, tasks, cookbook, index) take it for granted.

The tasks are those of the guide's ``app/tasks.py``; ``Subject`` and ``Questionnaire``
stand in for the reader's models, ``QuestionnaireResponsesForm`` for their form.
:class:`ReaderProject` makes them what the pages' names point at, for one page:
the ``triggers`` cache alias, the modules ``app.models``, ``app.forms``,
``app.tasks`` and the Celery names ``app.tasks.ImportSubject`` etc.
"""

import itertools
import sys
import threading
import uuid
from types import ModuleType, SimpleNamespace

from celery import current_app
from django import forms
from django.conf import settings
from django.db import connection
from django.test import override_settings

from triggers.task import TriggerTask


class _Objects:
    """``Model.objects.create(**fields)``: an object with a ``pk`` and the fields.

    It queries the database, as a model's ``create()`` does: a test whose tasks
    create subjects needs database access in the runner threads.
    """

    def __init__(self, first=1):
        self._pks = itertools.count(first)
        self._guard = threading.Lock()
        self.created = []

    def create(self, **fields):
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        with self._guard:
            created = SimpleNamespace(pk=next(self._pks), **fields)
            self.created.append(created)
        return created


class Subject:
    objects = _Objects()


class Questionnaire:
    # Primary keys unique across runs: they are session UIDs in a shared Redis.
    objects = _Objects(first=uuid.uuid4().int >> 80)


class QuestionnaireResponsesForm(forms.Form):
    questionnaire_id = forms.IntegerField()
    page = forms.IntegerField(required=False)
    name = forms.CharField(required=False)
    user_agent = forms.CharField(required=False)


STORED_RESPONSES = []


def store_responses(subject_id, page):
    STORED_RESPONSES.append((subject_id, page))


def lookup_browser(subject_id, user_agent):
    return user_agent.split("/")[0]


class ImportSubject(TriggerTask):
    name = "docs.getting_started.ImportSubject"

    def _run(self, context):
        first_page = context.trigger_kwargs["firstPageReceived"]["responses"]
        subject = Subject.objects.create(name=first_page["name"])
        return {"subject_id": subject.pk}


class ImportResponses(TriggerTask):
    name = "docs.getting_started.ImportResponses"

    def _run(self, context):
        subject_id = context.trigger_kwargs["t_importSubject"]["subject_id"]
        page = context.trigger_kwargs["pageReceived"]["responses"]
        store_responses(subject_id, page)


class ImportBrowserMetadata(TriggerTask):
    name = "docs.getting_started.ImportBrowserMetadata"

    def _run(self, context):
        subject_id = context.trigger_kwargs["t_importSubject"]["subject_id"]
        user_agent = context.trigger_kwargs["pageReceived"]["responses"]["user_agent"]
        return {"browser": lookup_browser(subject_id, user_agent)}


TASKS = {f"app.tasks.{task.__name__}": task
         for task in (ImportSubject, ImportResponses, ImportBrowserMetadata)}


class ReaderProject:
    """What a reader's project has, for one page: ``start()`` in the page's first
    invisible block, ``stop()`` in its last one.

    ``modules`` maps the module names the page imports (``app.models`` …) to modules;
    ``triggers`` is the page's ``TRIGGERS`` setting, if it gives one.
    """

    def __init__(self, modules=None, tasks=True, triggers=None):
        package = ModuleType("app")
        package.__path__ = []
        self.modules = {"app": package, **(modules or {})}
        self.tasks = TASKS if tasks else {}
        overrides = {"CACHES": {**settings.CACHES, "triggers": settings.CACHES["default"]}}
        if triggers is not None:
            overrides["TRIGGERS"] = triggers
        self._settings = override_settings(**overrides)
        self._saved_modules = {}
        self._saved_tasks = {}

    def start(self):
        self._settings.enable()
        self._saved_modules = {name: sys.modules.get(name) for name in self.modules}
        sys.modules.update(self.modules)
        registry = current_app.tasks
        self._saved_tasks = {name: registry.get(name) for name in self.tasks}
        for name, task in self.tasks.items():
            registry[name] = current_app.tasks[task.name]

    def use_tasks(self, *classes):
        """Run these classes (of the page) for ``app.tasks.<ClassName>``."""
        for cls in classes:
            name = f"app.tasks.{cls.__name__}"
            self._saved_tasks.setdefault(name, current_app.tasks.get(name))
            current_app.tasks[name] = current_app.tasks[cls.name]

    def provide(self, name, module):
        """Make ``module`` importable as ``name`` until :meth:`stop`."""
        self._saved_modules.setdefault(name, sys.modules.get(name))
        sys.modules[name] = module

    def stop(self):
        registry = current_app.tasks
        for name, task in self._saved_tasks.items():
            if task is None:
                registry.pop(name, None)
            else:
                registry[name] = task
        for name, module in self._saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        self._settings.disable()
