"""Django system checks for the ``TRIGGERS`` setting (``manage.py check``)."""

from __future__ import annotations

import difflib
import os
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
    unknown = sorted(str(key) for key in set(user or {}) - set(DEFAULTS))
    if unknown:
        named = []
        for key in unknown:
            close = difflib.get_close_matches(key.upper(), DEFAULTS, n=1)
            named.append(f"{key} (did you mean {close[0]}?)" if close else key)
        errors.append(checks.Error(
            f"Unknown TRIGGERS setting(s): {', '.join(named)}.",
            hint=f"Known settings: {', '.join(sorted(DEFAULTS))}.", id="triggers.E002"))

    s = triggers_settings
    bad = _check_types(s, errors)
    for setting, registry in (("MANAGER", trigger_managers), ("STORAGE", storage_backends),
                              ("RUNNER", task_runners)):
        value = getattr(s, setting) or (DEFAULT_TASK_RUNNER if setting == "RUNNER" else None)
        if setting not in bad and value not in registry:
            errors.append(checks.Error(
                f"TRIGGERS['{setting}'] is {value!r}, which is not registered.",
                hint=f"Registered under {registry.group!r}: {', '.join(_keys(registry))}.",
                id="triggers.E003"))
    runner = s.RUNNER or DEFAULT_TASK_RUNNER

    if s.STORAGE == "cache" and "CACHE" not in bad:
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
    elif s.STORAGE == "db" and "DATABASE" not in bad:
        if s.DATABASE not in settings.DATABASES:
            errors.append(checks.Error(
                f"TRIGGERS['DATABASE'] is {s.DATABASE!r}, which is not in DATABASES.",
                hint=f"Database aliases: {', '.join(sorted(settings.DATABASES))}.",
                id="triggers.E006"))
        else:
            errors += _check_sqlite_transactions(s.DATABASE)
    for setting in ("HISTORY_LIMIT", "IDEMPOTENCY_KEYS"):
        value = getattr(s, setting)
        if not _is_int(value) or value < 0:
            errors.append(checks.Error(
                f"TRIGGERS['{setting}'] must be a whole number >= 0, got {value!r}.",
                hint=f"The default is {DEFAULTS[setting]!r}.", id="triggers.E008"))
    for setting in ("LOCK_EXPIRE", "LOCK_TIMEOUT", "RECOVER_AFTER", "LEASE", "OUTCOME_RETRY",
                    "DISPATCH_GRACE", "MAX_COUNTDOWN", "SWEEP_INTERVAL"):
        if setting not in DEFAULTS:
            continue
        value = getattr(s, setting)
        if not _is_number(value) or not value > 0:
            errors.append(checks.Error(
                f"TRIGGERS['{setting}'] must be a positive number of seconds, got {value!r}.",
                hint=f"The default is {DEFAULTS[setting]!r}.", id="triggers.E007"))
    if s.TIMEOUT is not None and (not _is_int(s.TIMEOUT) or s.TIMEOUT <= 0):
        errors.append(checks.Error(
            f"TRIGGERS['TIMEOUT'] must be a positive whole number of seconds or None, "
            f"got {s.TIMEOUT!r}.",
            hint="None keeps sessions forever (on Redis); the default is 3600.",
            id="triggers.E009"))
    return errors


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: Settings whose value must be of one type: setting → (accepted types, what to say).
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "MANAGER": ((str,), "a registry key (a string)"),
    "STORAGE": ((str,), "a registry key (a string)"),
    "RUNNER": ((str, type(None)), "a registry key (a string) or None"),
    "STORAGE_OPTIONS": ((dict,), "a dict of keyword arguments"),
    "CACHE": ((str,), "a cache alias (a string)"),
    "DATABASE": ((str,), "a database alias (a string)"),
    "ALLOW_UNKNOWN_TASKS": ((bool,), "True or False"),
    "OUTCOME_SPOOL": ((str, os.PathLike, type(None)), "a directory (a string) or None"),
}


def _check_types(s: Any, errors: list[checks.CheckMessage]) -> set[str]:
    """triggers.E010 for each setting of the wrong type; returns their names."""
    bad: set[str] = set()
    for setting, (types, expected) in _TYPES.items():
        value = getattr(s, setting)
        wrong = not isinstance(value, types) or (isinstance(value, str) and not value.strip())
        if not wrong and setting == "STORAGE_OPTIONS":
            wrong = not all(isinstance(key, str) for key in value)
            expected += " with string keys"
        if wrong:
            bad.add(setting)
            errors.append(checks.Error(
                f"TRIGGERS['{setting}'] must be {expected}, got {type(value).__name__} "
                f"{value!r}.", hint=f"The default is {DEFAULTS[setting]!r}.", id="triggers.E010"))
    return bad


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
    if str(mode).upper() in ("IMMEDIATE", "EXCLUSIVE"):  # Django accepts any case
        return []
    hint = (f'Set DATABASES[{alias!r}]["OPTIONS"]["transaction_mode"] = "IMMEDIATE"'
            if django.VERSION >= (5, 1) else
            "Upgrade to Django 5.1 or later and set OPTIONS['transaction_mode'] = 'IMMEDIATE', "
            "or turn ATOMIC_REQUESTS off for this database")
    return [checks.Warning(
        f"Database {alias!r} is SQLite with ATOMIC_REQUESTS and deferred transactions: two "
        "requests that fire triggers at once can both fail with 'database is locked'.",
        hint=hint, id="triggers.W003")]
