"""The TRIGGERS setting, get_trigger_manager() and the system checks."""

import pytest
from django.core import checks
from django.test import override_settings

from triggers import CacheStorageBackend, DatabaseStorageBackend, TriggerManager, get_trigger_manager, runners
from triggers.checks import check_settings
from triggers.conf import DEFAULTS, triggers_settings


def ids(messages):
    return sorted(message.id for message in messages)


def test_defaults():
    """Without a TRIGGERS setting every key has its documented default."""
    for key, value in DEFAULTS.items():
        assert getattr(triggers_settings, key) == value
    with pytest.raises(AttributeError, match="Unknown TRIGGERS setting 'NOPE'"):
        triggers_settings.NOPE  # noqa: B018


def test_get_trigger_manager_database_default(uid):
    """By default get_trigger_manager() builds a TriggerManager over the database storage."""
    manager = get_trigger_manager(uid)
    assert type(manager) is TriggerManager
    assert type(manager.storage) is DatabaseStorageBackend
    assert manager.storage.using == "default" and manager.storage.uid == uid


@override_settings(TRIGGERS={"MANAGER": "cookbook", "STORAGE": "cache", "CACHE": "builtin_redis",
                             "TIMEOUT": None, "LOCK_EXPIRE": 7})
def test_get_trigger_manager_from_settings(uid):
    """get_trigger_manager() follows TRIGGERS (override_settings reloads it)."""
    from triggers_testdist import FinalizingTriggerManager

    manager = get_trigger_manager(uid)
    assert type(manager) is FinalizingTriggerManager
    assert type(manager.storage) is CacheStorageBackend
    assert manager.storage.cache_alias == "builtin_redis"
    assert manager.storage.timeout is None and manager.storage.lock_expire == 7


def test_runner_setting():
    """TRIGGERS['RUNNER'] sets the default runner; the testing helpers override it."""
    from triggers.testing import use_threading_runner

    with override_settings(TRIGGERS={"RUNNER": "threading"}):
        assert TriggerManager(CacheStorageBackend("x")).default_task_runner_name == "threading"
    assert runners.default_runner_name() == runners.DEFAULT_TASK_RUNNER == "celery"
    with override_settings(TRIGGERS={"RUNNER": "celery"}), use_threading_runner():
        assert runners.default_runner_name() == "threading"


def test_checks_pass_on_the_test_project():
    """The test project's settings pass the checks."""
    assert check_settings() == []


@pytest.mark.parametrize("setting, expected", [
    ("not a dict", ["triggers.E001"]),
    ({"STORAGE": "db", "NOPE": 1}, ["triggers.E002"]),
    ({"MANAGER": "nope"}, ["triggers.E003"]),
    ({"STORAGE": "nope"}, ["triggers.E003"]),
    ({"RUNNER": "celry"}, ["triggers.E003"]),
    ({"STORAGE": "cache", "CACHE": "nope"}, ["triggers.E004"]),
    ({"STORAGE": "cache", "CACHE": "dummy"}, ["triggers.E005"]),
    ({"STORAGE": "cache", "CACHE": "locmem"}, ["triggers.W001"]),
    ({"STORAGE": "cache", "CACHE": "locmem", "RUNNER": "threading"}, []),
    ({"STORAGE": "cache", "CACHE": "files"}, ["triggers.W002"]),
    ({"STORAGE": "db", "DATABASE": "nope"}, ["triggers.E006"]),
    ({"LOCK_EXPIRE": 0}, ["triggers.E007"]),
])
def test_checks_find_misconfiguration(setting, expected, tmp_path):
    """Each misconfiguration gets a check message with its id and a hint."""
    caches = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "locmem": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "dummy": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"},
        "files": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
                  "LOCATION": str(tmp_path)},
    }
    with override_settings(TRIGGERS=setting, CACHES=caches):
        messages = check_settings()
    assert ids(messages) == expected
    for message in messages:
        assert isinstance(message, checks.CheckMessage) and message.msg


def test_checks_are_registered():
    """The checks run with manage.py check (registered by the app config)."""
    with override_settings(TRIGGERS={"RUNNER": "celry"}):
        messages = checks.run_checks(tags=["triggers"])
    assert "triggers.E003" in ids(messages)
