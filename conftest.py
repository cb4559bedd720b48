"""The examples of README.rst and docs/ run as tests (Sybil): every ``.. code-block::
python`` block and every ``>>>`` example; the blocks of a page run in order, in one
namespace, so that a page reads as one session at the shell. An
``.. invisible-code-block: python`` prepares what a page takes for granted (a session
UID, a task module); ``.. skip: next "reason"`` is for an example that cannot run here,
and says why."""

import pytest
from sybil import Sybil
from sybil.parsers.rest import DocTestParser, PythonCodeBlockParser, SkipParser

pytest_plugins = ["triggers.testing"]


@pytest.fixture
def docs_env(django_db_setup, django_db_blocker, trigger_threading_runner):
    """What a page's examples run with: the test project's databases and the threading
    runner (a page that wants Celery says so)."""
    with django_db_blocker.unblock():
        yield


pytest_collect_file = Sybil(
    parsers=[DocTestParser(), PythonCodeBlockParser(), SkipParser()],
    patterns=["README.rst", "docs/*.rst"],
    fixtures=["docs_env"],
).pytest()
