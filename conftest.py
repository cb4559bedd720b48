"""The examples of README.rst and docs/ run as tests (Sybil): every ``.. code-block::
python`` block and every ``>>>`` example; the blocks of a page run in order, in one
namespace, so that a page reads as one session at the shell. An
``.. invisible-code-block: python`` prepares what a page takes for granted (a session
UID, a task module); ``.. skip: next "reason"`` is for an example that cannot run here,
and says why."""

import sys

import pytest
from sybil import Sybil
from sybil.parsers.rest import DocTestParser, PythonCodeBlockParser, SkipParser

pytest_plugins = ["triggers.testing"]


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker, request):
    """The test databases, also when only the examples run: pytest-django sets up those
    that marked tests ask for, and the examples carry no mark (a page's examples share
    one database state, which a per-test transaction or flush would undo)."""
    from django.db import connections
    from django.test.utils import setup_databases, teardown_databases

    default = connections["default"].settings_dict
    if default["NAME"] == default["TEST"]["NAME"]:
        yield  # already set up for the marked tests
        return
    with django_db_blocker.unblock():
        config = setup_databases(verbosity=request.config.option.verbose, interactive=False,
                                 aliases={"default"})  # the examples' database
    yield
    with django_db_blocker.unblock():
        teardown_databases(config, verbosity=request.config.option.verbose)


@pytest.fixture
def docs_env(django_db_setup, django_db_blocker, trigger_threading_runner):
    """What a page's examples run with: the test project's databases and the threading
    runner (a page that wants Celery says so); the runner's threads end inside."""
    with django_db_blocker.unblock():
        yield
        trigger_threading_runner.join_all()


def _page_setup(namespace):
    """What a page may change, noted before its first example."""
    from celery import current_app

    from triggers import signals

    namespace["_page_state"] = (
        set(sys.modules), current_app._get_current_object(),
        {name: list(signal.receivers) for name, signal in vars(signals).items()
         if hasattr(signal, "receivers")})


def _page_teardown(namespace):
    """Put back what a page changed, also when one of its examples failed before the
    page's own last block could: its settings overrides and reader projects, the modules
    it made up, the Celery app and signal receivers."""
    from triggers import signals

    modules, app, receivers = namespace.pop("_page_state")
    for value in list(namespace.values())[::-1]:
        settings_override = getattr(value, "_settings", value)
        if hasattr(settings_override, "wrapped") and hasattr(settings_override, "disable"):
            (value.stop if settings_override is not value else value.disable)()
    for name in set(sys.modules) - modules:
        if getattr(sys.modules[name], "__spec__", None) is None:  # made up by the page
            del sys.modules[name]
    app.set_current()
    for name, saved in receivers.items():
        signal = getattr(signals, name)
        signal.receivers = saved
        signal.sender_receivers_cache.clear()


pytest_collect_file = Sybil(
    parsers=[DocTestParser(), PythonCodeBlockParser(), SkipParser()],
    patterns=["README.rst", "docs/*.rst"],
    fixtures=["docs_env"],
    setup=_page_setup,
    teardown=_page_teardown,
).pytest()
