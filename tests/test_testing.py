"""The testing toolbox itself: the mixin's assertions and the pytest fixtures."""

from django.test import SimpleTestCase

from tests.helpers import QUESTIONNAIRE
from triggers import CacheStorageBackend, TriggerManager
from triggers import runners as runners_module
from triggers.exceptions import MaxRetriesExceeded
from triggers.testing import TriggerManagerTestCaseMixin


class MixinTest(TriggerManagerTestCaseMixin, SimpleTestCase):
    """Every assertion, passing and failing, on a real session."""

    databases = set()

    def setUp(self):
        super().setUp()
        import uuid

        self.manager = TriggerManager(CacheStorageBackend(f"mixin-{uuid.uuid4().hex}"))
        self.manager.update_configuration(dict(
            QUESTIONNAIRE,
            t_fail={"after": ["boom"], "run": "tests.Fail"},
            t_retry={"after": ["retry"], "run": "tests.Retry"},
        ))

    def test_threading_runner_is_default(self):
        """Inside the mixin's tests the threading runner is the default."""
        self.assertEqual(runners_module.DEFAULT_TASK_RUNNER, "threading")

    def test_passing_assertions(self):
        """Each assertion passes on the status it names (no explicit join needed)."""
        self.manager.fire("pageReceived", {"page": 1})
        self.assertInstanceUnstarted("t_importResponses#0")
        self.assertInstanceMissing("t_importSubject#1")
        self.assertUnresolvedTasks(["t_importSubject", "t_importResponses",
                                    "t_importBrowserMetadata", "t_fail", "t_retry"])
        self.manager.fire("isEmbeddedApplication")
        self.assertInstanceAbandoned("t_importBrowserMetadata#0")
        self.manager.fire("firstPageReceived", {"subject_id": 5})
        self.manager.fire("questionnaireComplete")
        self.assertInstanceFinished("t_importSubject#0", {"subject_id": 5, "name": None})
        self.assertInstanceFinished("t_importResponses#0")
        self.manager.fire("boom")
        self.assertInstanceFailed("t_fail#0", ValueError)
        self.assertUnresolvedInstances(["t_fail#0"])
        self.manager.replay_failed_instance("t_fail#0")
        self.assertInstanceReplayed("t_fail#0")
        self.manager.skip_failed_instance("t_fail#1")
        self.assertInstanceSkipped("t_fail#1")
        self.manager.fire("retry", {"succeed_at": 99})
        self.assertInstanceFailed("t_retry#2", MaxRetriesExceeded)
        self.assertUnresolvedTasks(["t_retry"])

    def test_failure_messages_show_metadata_and_traceback(self):
        """A wrong status fails with the instance's metadata, traceback included."""
        self.manager.fire("boom")
        with self.assertRaises(AssertionError) as caught:
            self.assertInstanceFinished("t_fail#0")
        message = str(caught.exception)
        self.assertIn("Expected t_fail#0 to be finished", message)
        self.assertIn("t_fail#0 is failed", message)
        self.assertIn('"exc_message": "the subject is invalid"', message)
        self.assertIn("Traceback (most recent call last)", message)
        self.assertIn("subject_id", message)

    def test_failure_messages_for_the_other_assertions(self):
        """Every assertion fails with a message naming what it expected."""
        self.manager.fire("boom")
        cases = [
            (lambda: self.assertInstanceFailed("t_fail#0", KeyError), "fail with KeyError"),
            (lambda: self.assertInstanceMissing("t_fail#0"), "not to exist"),
            (lambda: self.assertInstanceUnstarted("t_nope#0"), "does not exist"),
            (lambda: self.assertInstanceAbandoned("t_fail#0"), "to be abandoned"),
            (lambda: self.assertInstanceReplayed("t_fail#0"), "to be replayed"),
            (lambda: self.assertInstanceSkipped("t_fail#0"), "to be skipped"),
            (lambda: self.assertUnresolvedTasks([]), "Expected unresolved tasks []"),
            (lambda: self.assertUnresolvedInstances([]), "Expected unresolved instances []"),
        ]
        for call, text in cases:
            with self.subTest(text=text):
                with self.assertRaises(AssertionError) as caught:
                    call()
                self.assertIn(text, str(caught.exception))

    def test_finished_with_another_result(self):
        """assertInstanceFinished compares the result when one is given."""
        self.manager.fire("firstPageReceived", {"subject_id": 5})
        self.manager.fire("questionnaireComplete")
        with self.assertRaises(AssertionError) as caught:
            self.assertInstanceFinished("t_importSubject#0", {"subject_id": 6})
        self.assertIn("to finish with result {'subject_id': 6}", str(caught.exception))


def test_pytest_fixtures(trigger_manager, trigger_assertions, trigger_session_uid):
    """The pytest fixtures give a manager on a fresh session and the same assertions."""
    assert trigger_manager.storage.uid == trigger_session_uid
    assert runners_module.DEFAULT_TASK_RUNNER == "threading"
    trigger_manager.update_configuration(QUESTIONNAIRE)
    trigger_manager.fire("firstPageReceived")
    trigger_manager.fire("questionnaireComplete")
    trigger_assertions.assertInstanceFinished("t_importSubject#0")
    trigger_assertions.assertUnresolvedTasks(["t_importResponses", "t_importBrowserMetadata"])


def test_pytest_fixture_assertions_fail_through_pytest(trigger_manager, trigger_assertions):
    """A failing fixture assertion fails the test with pytest's failure."""
    import pytest

    trigger_manager.update_configuration(QUESTIONNAIRE)
    with pytest.raises(pytest.fail.Exception, match="does not exist"):
        trigger_assertions.assertInstanceFinished("t_importSubject#0")
