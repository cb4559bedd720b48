"""Django application configuration."""

from __future__ import annotations

from django.apps import AppConfig


class TriggersConfig(AppConfig):
    name = "triggers"
    verbose_name = "Triggers"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registers the system checks and the built-in task triggers.noop. (The flow
        # API's step task registers itself when a program imports triggers.flow.)
        from triggers import checks, tasks  # noqa: F401
