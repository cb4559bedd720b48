"""Django admin for the database storage: browse sessions and instances; replay or skip.

Everything is read-only: statuses change only through the trigger manager, so
the admin offers the manager's own operations — replay and skip failed
instances — as actions, which need the ``change`` permission.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin, messages
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from triggers.exceptions import TriggersError
from triggers.models import TriggerInstance, TriggerSession
from triggers.types import OPEN_STATUSES

OPEN = [status.value for status in OPEN_STATUSES]


def _pretty(value: Any) -> str:
    return format_html("<pre>{}</pre>", json.dumps(value, indent=2, sort_keys=True, default=repr))


def _manager_for(instance: TriggerInstance, using: str) -> Any:
    from triggers.conf import triggers_settings
    from triggers.manager import build_manager

    options = {"using": using, "lock_expire": triggers_settings.LOCK_EXPIRE,
               "lock_timeout": triggers_settings.LOCK_TIMEOUT}
    return build_manager(triggers_settings.MANAGER, "db", instance.session_id, options)


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Viewing only: the change permission is what the actions require.
        return False if obj is not None else super().has_change_permission(request, obj)


class TriggerInstanceInline(admin.TabularInline):  # type: ignore[type-arg]
    model = TriggerInstance
    fields = ("link", "task_name", "status", "modified")
    readonly_fields = ("link", "task_name", "status", "modified")
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="instance")
    def link(self, obj: TriggerInstance) -> str:
        url = reverse("admin:triggers_triggerinstance_change", args=[obj.pk])
        return format_html('<a href="{}">{}</a>', url, obj.name)


@admin.register(TriggerSession)
class TriggerSessionAdmin(ReadOnlyAdmin):
    list_display = ["uid", "instance_count", "open_count", "modified"]
    search_fields = ["uid"]
    date_hierarchy = "modified"
    readonly_fields = ("uid", "created", "modified", "tasks", "latest_kwargs", "counters")
    fields = ("uid", "created", "modified", "tasks", "latest_kwargs", "counters")
    inlines = [TriggerInstanceInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[TriggerSession]:
        queryset: QuerySet[TriggerSession] = super().get_queryset(request)
        annotated: QuerySet[TriggerSession] = queryset.annotate(
            _instances=Count("instances"),
            _open=Count("instances", filter=Q(instances__resolved=False)),
        )
        return annotated

    @admin.display(description="instances", ordering="_instances")
    def instance_count(self, obj: Any) -> int:
        return int(obj._instances)

    @admin.display(description="unresolved", ordering="_open")
    def open_count(self, obj: Any) -> int:
        return int(obj._open)

    @admin.display(description="tasks (configuration)")
    def tasks(self, obj: TriggerSession) -> str:
        tasks = obj.config or {}
        rows = format_html_join("", "<tr><td>{}</td><td><code>{}</code></td></tr>",
                                ((name, json.dumps(entry)) for name, entry in tasks.items()))
        return format_html("<table><tr><th>task</th><th>directives</th></tr>{}</table>", rows)

    @admin.display(description="latest kwargs")
    def latest_kwargs(self, obj: TriggerSession) -> str:
        return _pretty((obj.state or {}).get("k") or {})

    @admin.display(description="instance counters")
    def counters(self, obj: TriggerSession) -> str:
        return _pretty((obj.state or {}).get("n") or {})


class UnresolvedFilter(admin.SimpleListFilter):
    title = "resolution"
    parameter_name = "unresolved"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "unresolved"), ("no", "resolved")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() in ("yes", "no"):
            filtered: QuerySet[Any] = queryset.filter(resolved=self.value() == "no")
            return filtered
        return queryset


@admin.register(TriggerInstance)
class TriggerInstanceAdmin(ReadOnlyAdmin):
    list_display = ["name", "session_link", "task_name", "status", "exception", "modified"]
    list_filter = ["status", UnresolvedFilter, "task_name"]
    search_fields = ["name", "session__uid", "task_name"]
    readonly_fields = ("name", "session_link", "task_name", "status", "exception",
                       "traceback", "pretty_kwargs", "pretty_metadata", "created", "modified")
    fields = readonly_fields
    actions = ["replay_failed", "skip_failed"]
    list_select_related = ["session"]

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # an instance's number belongs to the session's counter

    @admin.display(description="session", ordering="session")
    def session_link(self, obj: TriggerInstance) -> str:
        url = reverse("admin:triggers_triggersession_change", args=[obj.session_id])
        return format_html('<a href="{}">{}</a>', url, obj.session_id)

    @admin.display(description="exception")
    def exception(self, obj: TriggerInstance) -> str:
        meta = obj.metadata or {}
        if "exc_type" not in meta:
            return ""
        return f"{meta['exc_type']}: {meta.get('exc_message', '')}"

    @admin.display(description="traceback")
    def traceback(self, obj: TriggerInstance) -> str:
        text = (obj.metadata or {}).get("exc_traceback")
        return format_html("<pre>{}</pre>", text) if text else ""

    @admin.display(description="kwargs")
    def pretty_kwargs(self, obj: TriggerInstance) -> str:
        return _pretty(obj.kwargs)

    @admin.display(description="metadata")
    def pretty_metadata(self, obj: TriggerInstance) -> str:
        meta = {k: v for k, v in (obj.metadata or {}).items() if k != "exc_traceback"}
        return _pretty(meta)

    def _act(self, request: HttpRequest, queryset: QuerySet[TriggerInstance], verb: str) -> None:
        done = 0
        for instance in queryset:
            if instance.status != "failed":
                self.message_user(request, f"Only failed instances can be {verb}; "
                                           f"{instance.name} is {instance.status}.",
                                  messages.WARNING)
                continue
            manager = _manager_for(instance, queryset.db)
            try:
                if verb == "replayed":
                    manager.replay_failed_instance(instance.name)
                else:
                    manager.skip_failed_instance(instance.name)
            except TriggersError as exc:
                self.message_user(request, f"{instance.name}: {exc}", messages.ERROR)
                continue
            done += 1
        if done:
            self.message_user(request, f"{done} instance(s) {verb}.", messages.SUCCESS)

    @admin.action(description="Replay the selected failed instances", permissions=["change"])
    def replay_failed(self, request: HttpRequest, queryset: QuerySet[TriggerInstance]) -> None:
        self._act(request, queryset, "replayed")

    @admin.action(description="Skip the selected failed instances", permissions=["change"])
    def skip_failed(self, request: HttpRequest, queryset: QuerySet[TriggerInstance]) -> None:
        self._act(request, queryset, "skipped")
