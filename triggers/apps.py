"""Django application configuration."""

from __future__ import annotations

from django.apps import AppConfig


class TriggersConfig(AppConfig):
    name = "triggers"
    verbose_name = "Triggers"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registers the system checks and the built-in tasks (triggers.noop, triggers.flow.step).
        from triggers import checks, flow, tasks  # noqa: F401
