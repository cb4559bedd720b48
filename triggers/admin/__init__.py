"""Django admin of trigger sessions: the database storage's tables, and the sessions of
the configured storage (a cache, Redis) read through the storage contract.

Everything is read-only: statuses change only through the trigger manager, so the admin
offers the manager's own operations — replay (with edited kwargs), skip (with a cascade)
and recover — which need the ``change`` permission on trigger instances. A session's
page shows its workflow graph and timeline (``triggers.admin.pages``).
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import router
from django.db.models import Count, Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html
from django.utils.safestring import mark_safe

from triggers.admin import pages
from triggers.exceptions import TriggersError
from triggers.graph import STATUS_COLOURS
from triggers.models import TriggerInstance, TriggerSession


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    def viewable(self, request: HttpRequest, object_id: str) -> Any:
        """The object ``object_id`` that the user may view, or 404 / 403."""
        found = self.get_object(request, object_id)
        if found is None:
            raise Http404(f"No {self.opts.verbose_name} with primary key {object_id!r}.")
        if not self.has_view_or_change_permission(request, found):
            raise PermissionDenied
        return found

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Viewing only: the change permission is what the actions require.
        return False if obj is not None else super().has_change_permission(request, obj)


@admin.register(TriggerSession)
class TriggerSessionAdmin(ReadOnlyAdmin):
    list_display = ["uid", "state_counts", "instance_count", "modified"]
    search_fields = ["uid"]
    date_hierarchy = "modified"
    change_list_template = "triggers/admin/change_list.html"

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # storage.delete() removes a session with its history and keys

    def get_queryset(self, request: HttpRequest) -> QuerySet[TriggerSession]:
        queryset: QuerySet[TriggerSession] = super().get_queryset(request)
        counted = {f"_{status}": Count("instances", filter=Q(instances__status=status))
                   for status in pages.COUNTED}
        annotated: QuerySet[TriggerSession] = queryset.annotate(
            _instances=Count("instances"), **counted)
        return annotated

    def get_urls(self) -> list[URLPattern]:
        site = self.admin_site

        def sessions(request: HttpRequest, storage: str) -> HttpResponse:
            return pages.sessions_page(request, site, storage)

        def session(request: HttpRequest, storage: str) -> HttpResponse:
            return pages.session_page(request, site, storage, request.GET.get("uid", ""))

        def instance(request: HttpRequest, storage: str) -> HttpResponse:
            return pages.instance_page(request, site, storage, request.GET.get("uid", ""),
                                       request.GET.get("name", ""))

        def action(request: HttpRequest, storage: str, action: str) -> HttpResponse:
            return pages.action_view(request, site, storage, action)

        own = [
            path("storage/<str:storage>/", site.admin_view(sessions),
                 name="triggers_storage_sessions"),
            path("storage/<str:storage>/session/", site.admin_view(session),
                 name="triggers_storage_session"),
            path("storage/<str:storage>/instance/", site.admin_view(instance),
                 name="triggers_storage_instance"),
            path("storage/<str:storage>/action/<str:action>/", site.admin_view(action),
                 name="triggers_storage_action"),
        ]
        return own + super().get_urls()

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None
                        ) -> HttpResponse:
        others = [key for key in pages.browsable_storages() if key != "db"]
        return super().changelist_view(request, {**(extra_context or {}),
                                                 "triggers_storages": others})

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "",
                    extra_context: dict[str, Any] | None = None) -> HttpResponse:
        found = self.viewable(request, object_id)
        return pages.session_page(request, self.admin_site, "db", found.uid,
                                  using=found._state.db)

    @admin.display(description="instances", ordering="_instances")
    def instance_count(self, obj: Any) -> int:
        return int(obj._instances)

    @admin.display(description="failed · waiting · scheduled · running")
    def state_counts(self, obj: Any) -> str:
        shown = [(status, getattr(obj, f"_{status}")) for status in pages.COUNTED]
        return mark_safe(" ".join(  # noqa: S308 - badges built by format_html
            pages.badge(f"{count} {status}", STATUS_COLOURS[status])
            for status, count in shown if count)) or "–"


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
    list_display = ["name", "session_link", "task_name", "coloured_status", "exception",
                    "modified"]
    list_filter = ["status", UnresolvedFilter, "task_name"]
    search_fields = ["name", "session__uid", "task_name"]
    actions = ["replay_failed", "skip_failed"]
    list_select_related = ["session"]

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # an instance's number belongs to the session's counter

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "",
                    extra_context: dict[str, Any] | None = None) -> HttpResponse:
        found = self.viewable(request, object_id)
        return pages.instance_page(request, self.admin_site, "db", found.session_id,
                                   found.name, using=found._state.db)

    @admin.display(description="session", ordering="session")
    def session_link(self, obj: TriggerInstance) -> str:
        url = reverse("admin:triggers_triggersession_change", args=[obj.session_id])
        return format_html('<a href="{}">{}</a>', url, obj.session_id)

    @admin.display(description="status", ordering="status")
    def coloured_status(self, obj: TriggerInstance) -> str:
        return mark_safe(pages.status_badge(  # noqa: S308 - built by format_html
            obj.status, bool((obj.metadata or {}).get("dispatch_error"))))

    @admin.display(description="exception")
    def exception(self, obj: TriggerInstance) -> str:
        meta = obj.metadata or {}
        if "exc_type" not in meta:
            return str(meta.get("dispatch_error", ""))[:100]
        text = f"{meta['exc_type']}: {meta.get('exc_message', '')}"
        return text if len(text) <= 100 else text[:99] + "…"

    def _act(self, request: HttpRequest, queryset: QuerySet[TriggerInstance], verb: str) -> None:
        done = 0
        for instance in queryset:
            if instance.status != "failed":
                self.message_user(request, f"Only failed instances can be {verb}; "
                                           f"{instance.name} is {instance.status}.",
                                  messages.WARNING)
                continue
            manager = pages.open_manager("db", instance.session_id,
                                         router.db_for_write(TriggerInstance))
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
