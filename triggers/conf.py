"""The ``TRIGGERS`` setting: one dict in Django settings, read lazily.

::

    TRIGGERS = {
        "STORAGE": "cache",          # registry key of the storage backend
        "CACHE": "triggers",         # cache alias of the cache storage
        "TIMEOUT": None,             # keep sessions forever (Redis)
        "RUNNER": "celery",
    }

Every key is optional; :data:`DEFAULTS` lists them. Values are read when used,
never at import time, and re-read when tests change them with
``override_settings``.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

__all__ = ["DEFAULTS", "TriggersSettings", "setting", "triggers_settings"]

#: Every key of the ``TRIGGERS`` setting, with its default.
DEFAULTS: dict[str, Any] = {
    # Registry key of the trigger manager class (entry-point group triggers.managers).
    "MANAGER": "default",
    # Registry key of the storage backend (triggers.storages): "db" or "cache".
    "STORAGE": "db",
    # Extra keyword arguments for the storage backend.
    "STORAGE_OPTIONS": {},
    # Database alias of the database storage.
    "DATABASE": "default",
    # Cache alias of the cache storage.
    "CACHE": "default",
    # Seconds a cache storage key lives after the session's last change; None: forever.
    "TIMEOUT": 3600,
    # Registry key of the default task runner; None: triggers.runners.DEFAULT_TASK_RUNNER.
    "RUNNER": None,
    # Seconds after which a session lock whose holder died expires.
    "LOCK_EXPIRE": 30,
    # Seconds a step waits for a session lock before LockTimeout.
    "LOCK_TIMEOUT": 60,
    # Seconds an instance must be stuck (scheduled or running) before recovery takes it.
    "RECOVER_AFTER": 300,
    # Seconds a running instance's lease lasts; a heartbeat renews it every third of that
    # while _run executes. Only an instance whose lease expired can be taken over.
    "LEASE": 60,
    # Seconds a scheduled instance may take to start before the sweep sends it again (its
    # message was lost?); later sends wait twice as long each time.
    "DISPATCH_GRACE": 10,
    # The longest countdown a message is sent with: a later start is kept in the store and
    # sent by the sweep that much before it (brokers cap how long a message may wait).
    "MAX_COUNTDOWN": 600,
    # Seconds between two passes of ``manage.py triggers sweep --loop``.
    "SWEEP_INTERVAL": 5,
    # Seconds a run keeps retrying to record its outcome through transient storage errors
    # before it spools the outcome locally (see triggers.run).
    "OUTCOME_RETRY": 60,
    # Directory of spooled outcomes; None: <tempdir>/triggers-outcomes.
    "OUTCOME_SPOOL": None,
    # Idempotency keys of fire(..., idempotency_key=...) kept per session (the newest).
    "IDEMPOTENCY_KEYS": 1000,
    # History events kept per session (the oldest are dropped); 0: keep no history.
    "HISTORY_LIMIT": 1000,
    # Accept 'run' names this process's Celery app does not know (tasks that only the
    # workers import); a worker that does not know one either fails the instance.
    "ALLOW_UNKNOWN_TASKS": False,
}


class TriggersSettings:
    """Attribute access to the ``TRIGGERS`` setting with defaults: ``triggers_settings.STORAGE``."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] | None = None

    @property
    def user_settings(self) -> dict[str, Any]:
        value = getattr(settings, "TRIGGERS", None) or {}
        return dict(value) if isinstance(value, dict) else {}

    def __getattr__(self, name: str) -> Any:
        if name not in DEFAULTS:
            raise AttributeError(f"Unknown TRIGGERS setting {name!r}; settings: "
                                 f"{', '.join(sorted(DEFAULTS))}")
        if self._cache is None:
            self._cache = {**DEFAULTS, **self.user_settings}
        return self._cache[name]

    def reload(self) -> None:
        self._cache = None

    def storage_options(self, storage: str | None = None) -> dict[str, Any]:
        """Keyword arguments for a storage backend (default: the configured one).

        ``STORAGE_OPTIONS`` apply to the configured backend only.
        """
        storage = storage or self.STORAGE
        options: dict[str, Any] = {"lock_expire": self.LOCK_EXPIRE,
                                   "lock_timeout": self.LOCK_TIMEOUT}
        if storage == "cache":
            options.update(cache=self.CACHE, timeout=self.TIMEOUT)
        elif storage == "redis":
            options.update(timeout=self.TIMEOUT)
        elif storage == "db":
            options.update(using=self.DATABASE)
        if storage == self.STORAGE:
            options.update(self.STORAGE_OPTIONS or {})
        return options


#: The settings object.
triggers_settings = TriggersSettings()


def setting(name: str) -> Any:
    """``TRIGGERS[name]``, or its default where Django settings are not configured (the
    library used without a project)."""
    if settings.configured:
        return getattr(triggers_settings, name)
    return DEFAULTS[name]


@receiver(setting_changed)
def _reload(setting: str, **kwargs: Any) -> None:
    if setting == "TRIGGERS":
        triggers_settings.reload()
