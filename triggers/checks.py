"""Django system checks for the ``TRIGGERS`` setting (``manage.py check``)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks

from triggers.conf import DEFAULTS, triggers_settings

__all__ = ["check_settings"]

LOCAL_CACHES = (
    "django.core.cache.backends.locmem.LocMemCache",
    "django.core.cache.backends.dummy.DummyCache",
)
#: Caches whose ``add`` is not atomic across processes.
NO_LOCKING_CACHES = ("django.core.cache.backends.filebased.FileBasedCache",)


def _keys(registry: Any) -> list[str]:
    return sorted(str(key) for key in registry.keys())


@checks.register("triggers")
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Check the TRIGGERS setting: known keys, registered plug-ins, usable cache/database."""
    from triggers.manager import trigger_managers
    from triggers.runners import DEFAULT_TASK_RUNNER, task_runners
    from triggers.storages import storage_backends

    errors: list[checks.CheckMessage] = []
    user = getattr(settings, "TRIGGERS", None)
    if user is not None and not isinstance(user, dict):
        return [checks.Error("TRIGGERS must be a dict.", hint="See the settings documentation.",
                             id="triggers.E001")]
    unknown = sorted(set(user or {}) - set(DEFAULTS))
    if unknown:
        errors.append(checks.Error(
            f"Unknown TRIGGERS setting(s): {', '.join(unknown)}.",
            hint=f"Known settings: {', '.join(sorted(DEFAULTS))}.", id="triggers.E002"))

    s = triggers_settings
    for setting, registry, value in (("MANAGER", trigger_managers, s.MANAGER),
                                     ("STORAGE", storage_backends, s.STORAGE),
                                     ("RUNNER", task_runners, s.RUNNER or DEFAULT_TASK_RUNNER)):
        if value not in registry:
            errors.append(checks.Error(
                f"TRIGGERS['{setting}'] is {value!r}, which is not registered.",
                hint=f"Registered under {registry.group!r}: {', '.join(_keys(registry))}.",
                id="triggers.E003"))
    runner = s.RUNNER or DEFAULT_TASK_RUNNER

    if s.STORAGE == "cache":
        caches = getattr(settings, "CACHES", {})
        backend = caches.get(s.CACHE, {}).get("BACKEND") if isinstance(caches, dict) else None
        if s.CACHE not in caches:
            errors.append(checks.Error(
                f"TRIGGERS['CACHE'] is {s.CACHE!r}, which is not in CACHES.",
                hint=f"Cache aliases: {', '.join(sorted(caches)) or '(none)'}.", id="triggers.E004"))
        elif backend == "django.core.cache.backends.dummy.DummyCache":
            errors.append(checks.Error(
                f"Cache {s.CACHE!r} is a DummyCache: trigger sessions would not be stored.",
                hint="Use a Redis cache, or the database storage (TRIGGERS['STORAGE'] = 'db').",
                id="triggers.E005"))
        elif backend in LOCAL_CACHES and runner != "threading":
            errors.append(checks.Warning(
                f"Cache {s.CACHE!r} is local to one process, but tasks run with the {runner!r} "
                "runner: workers in other processes will not see the sessions.",
                hint="Use a Redis cache (django-redis or Django's RedisCache), the database "
                     "storage, or the threading runner.", id="triggers.W001"))
        elif backend in NO_LOCKING_CACHES:
            errors.append(checks.Warning(
                f"Cache {s.CACHE!r} ({backend}) has no atomic add across processes, so session "
                "locks do not exclude each other.",
                hint="Use a Redis or Memcached cache, or the database storage.",
                id="triggers.W002"))
    elif s.STORAGE == "db":
        if s.DATABASE not in settings.DATABASES:
            errors.append(checks.Error(
                f"TRIGGERS['DATABASE'] is {s.DATABASE!r}, which is not in DATABASES.",
                hint=f"Database aliases: {', '.join(sorted(settings.DATABASES))}.",
                id="triggers.E006"))
        else:
            errors += _check_sqlite_transactions(s.DATABASE)
    if not isinstance(s.HISTORY_LIMIT, int) or isinstance(s.HISTORY_LIMIT, bool) \
            or s.HISTORY_LIMIT < 0:
        errors.append(checks.Error(f"TRIGGERS['HISTORY_LIMIT'] must be a number of events >= 0, "
                                   f"got {s.HISTORY_LIMIT!r}.", id="triggers.E008"))
    for setting in ("LOCK_EXPIRE", "LOCK_TIMEOUT", "RECOVER_AFTER"):
        value = getattr(s, setting)
        if not isinstance(value, (int, float)) or value <= 0:
            errors.append(checks.Error(f"TRIGGERS['{setting}'] must be a positive number of "
                                       f"seconds, got {value!r}.", id="triggers.E007"))
    return errors


def _check_sqlite_transactions(alias: str) -> list[checks.CheckMessage]:
    """SQLite with ATOMIC_REQUESTS needs transactions that take the write lock at BEGIN.

    With the default deferred ``BEGIN``, two requests that read and then write the
    same database both hold a read lock and neither can upgrade it: both fail with
    "database is locked" at once, whatever the timeout.
    """
    import django

    database: dict[str, Any] = dict(settings.DATABASES[alias])
    if database.get("ENGINE") != "django.db.backends.sqlite3" or not database.get(
            "ATOMIC_REQUESTS"):
        return []
    mode = (database.get("OPTIONS") or {}).get("transaction_mode")
    if mode in ("IMMEDIATE", "EXCLUSIVE"):
        return []
    hint = (f'Set DATABASES[{alias!r}]["OPTIONS"]["transaction_mode"] = "IMMEDIATE"'
            if django.VERSION >= (5, 1) else
            "Upgrade to Django 5.1 or later and set OPTIONS['transaction_mode'] = 'IMMEDIATE', "
            "or turn ATOMIC_REQUESTS off for this database")
    return [checks.Warning(
        f"Database {alias!r} is SQLite with ATOMIC_REQUESTS and deferred transactions: two "
        "requests that fire triggers at once can both fail with 'database is locked'.",
        hint=hint, id="triggers.W003")]
