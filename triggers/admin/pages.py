"""The admin's session and instance pages, read through the storage contract.

They show a session of any browsable storage — the database, and the configured
``TRIGGERS['STORAGE']`` (a cache or Redis) — the same way: the workflow graph
(:mod:`triggers.graph`), the timeline of the session's history, the instances with
their state; an instance with its times, exception, traceback and kwargs, and the
manager's repair operations (replay with edited kwargs, skip with a cascade and a
result, recover) behind a confirmation page.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.admin import AdminSite
from django.core.exceptions import PermissionDenied
from django.db import router
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.safestring import mark_safe
from django.utils.timesince import timesince

from triggers.config import check_kwargs, check_kwargs_map
from triggers.exceptions import InstanceNotFound, InvalidArgument, TriggersError
from triggers.graph import DISPATCH_ERROR_COLOUR, STATUS_COLOURS, workflow_svg
from triggers.manager import TriggerManager, build_manager, unsent_instances
from triggers.timers import format_time
from triggers.types import (
    STATUS_FAILED,
    STATUS_RUNNING,
    STATUS_SCHEDULED,
    STATUS_UNSTARTED,
    TaskInstance,
    now,
)

__all__ = ["ACTIONS", "COUNTED", "badge", "browsable_storages", "instance_page", "instance_url",
           "open_manager", "session_page", "session_url", "sessions_page", "status_badge",
           "when"]

logger = logging.getLogger("triggers.admin")
View = TypeVar("View", bound=Callable[..., HttpResponse])

#: The repair operations an instance page offers (``triggers.change_triggerinstance``).
ACTIONS = ("replay", "skip", "recover")
#: The statuses counted per session in the lists of sessions.
COUNTED = ("failed", "unstarted", "scheduled", "running")
#: Sessions listed per page for a storage without a database table.
PAGE_SIZE = 50
#: The most session UIDs such a list reads (to sort them); a search narrows it.
MAX_LISTED = 10_000
#: The most instances a session's page lists (the latest of each task come first).
MAX_INSTANCES = 500
#: Metadata keys that the instance page shows in their own places.
_SHOWN = {"exc_type", "exc_message", "exc_traceback", "dispatch_error", "result", "task_id",
          "created", "modified", "scheduled", "started", "finished", "start_after"}
#: Colours of the history events that are not named after a status.
_EVENT_COLOURS = {"fired": "#f9a825", "configured": "#455a64", "created": "#78909c",
                  "started": "#ef6c00", "recovered": "#00838f", "redispatched": "#00838f",
                  "takeover": "#00838f", "timer": "#00838f", "unsent": DISPATCH_ERROR_COLOUR}
_TIMES = (("created", "created"), ("scheduled", "scheduled"), ("start_after", "may start at"),
          ("started", "started"), ("finished", "finished"), ("modified", "last changed"))


def browsable_storages() -> list[str]:
    """Registry keys of the storages the admin browses: ``db`` and the configured one."""
    from triggers.conf import triggers_settings

    keys = ["db"]
    if triggers_settings.STORAGE not in keys:
        keys.append(str(triggers_settings.STORAGE))
    return keys


def storage_errors(view: View) -> View:
    """A store that cannot be read (down, unreachable, corrupt) is a page saying so (503),
    with the error on one line, not a server error."""

    @functools.wraps(view)
    def wrapper(request: HttpRequest, site: AdminSite, *args: Any, **kwargs: Any
                ) -> HttpResponse:
        try:
            return view(request, site, *args, **kwargs)
        except (Http404, PermissionDenied):
            raise
        except Exception as exc:  # noqa: BLE001 - any store or client error: shown, logged
            logger.exception("The admin could not read the trigger storage")
            storage = args[0] if args else ""
            return TemplateResponse(request, "triggers/admin/error.html", _context(
                request, site, "The trigger storage could not be read", storage=storage,
                error=f"{type(exc).__name__}: {exc}"), status=503)

    return wrapper  # type: ignore[return-value]


def _options(storage: str, using: str | None = None) -> dict[str, Any]:
    from triggers.conf import triggers_settings
    from triggers.models import TriggerSession

    if storage not in browsable_storages():
        raise Http404(f"The admin does not browse storage {storage!r}; it browses "
                      f"{', '.join(browsable_storages())} (TRIGGERS['STORAGE'] and 'db').")
    options = triggers_settings.storage_options(storage)
    if storage == "db":
        options["using"] = using or router.db_for_read(TriggerSession)
    return options


def open_manager(storage: str, uid: str, using: str | None = None) -> TriggerManager:
    """The configured manager over session ``uid`` of a browsable storage."""
    from triggers.conf import triggers_settings

    if not uid:
        raise Http404("Which session? Give its UID (?uid=…).")
    return build_manager(triggers_settings.MANAGER, storage, uid, _options(storage, using))


def session_url(storage: str, uid: str) -> str:
    return (reverse("admin:triggers_storage_session", args=[storage]) + "?"
            + urlencode({"uid": uid}))


def instance_url(storage: str, uid: str, name: str) -> str:
    return (reverse("admin:triggers_storage_instance", args=[storage]) + "?"
            + urlencode({"uid": uid, "name": name}))


def when(at: Any) -> str:
    """Epoch seconds as ``2026-12-02 15:40:01.123 UTC (3 minutes ago)``."""
    import datetime

    if not isinstance(at, (int, float)) or isinstance(at, bool):
        return ""
    moment = datetime.datetime.fromtimestamp(float(at), tz=datetime.timezone.utc)
    current = datetime.datetime.now(tz=datetime.timezone.utc)
    relative = (f"in {timesince(current, moment)}" if moment > current
                else f"{timesince(moment, current)} ago")
    return f"{format_time(at)} ({relative})"


def badge(label: str, colour: str) -> str:
    """A coloured label (HTML, styled inline: it shows on any admin page)."""
    from django.utils.html import format_html

    return str(format_html(
        '<span class="triggers-status" style="background:{};color:#fff;padding:1px 7px;'
        'border-radius:9px;font-weight:bold;font-size:11px;white-space:nowrap">{}</span>',
        colour, label))


def status_badge(status: str, dispatch_error: bool = False) -> str:
    """A status as a coloured label (HTML); a scheduled instance not sent says so."""
    if dispatch_error:
        return badge(f"{status} · not sent", DISPATCH_ERROR_COLOUR)
    return badge(status, STATUS_COLOURS.get(status, "#607d8b"))


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=repr)


def _sort_key(instance: TaskInstance) -> tuple[str, int]:
    return instance.task_name, instance.number


def _can_view(request: HttpRequest, model: str) -> bool:
    user: Any = request.user
    return bool(user.is_active and user.is_staff and (
        user.has_perm(f"triggers.view_{model}") or user.has_perm(f"triggers.change_{model}")))


def _can_change(request: HttpRequest) -> bool:
    user: Any = request.user
    return bool(user.is_active and user.is_staff
                and user.has_perm("triggers.change_triggerinstance"))


def _load(manager: TriggerManager) -> dict[str, Any]:
    storage = manager.storage
    tasks = storage.tasks
    instances = sorted(storage.iter_instances(), key=_sort_key)
    latest = storage.latest_kwargs
    history = storage.history()
    if not tasks and not instances and not latest and not history:
        raise Http404(f"No session {storage.uid!r} in this storage: nothing is stored under "
                      "this UID.")
    return {"tasks": tasks, "instances": instances, "latest": latest, "history": history}


def timeline(history: list[dict[str, Any]], latest: dict[str, dict[str, Any]],
             link: Callable[[str], str]) -> list[dict[str, Any]]:
    """Rows of the timeline: time, offset from the first event, event, subject, details
    (a trigger's kwargs when they are the latest ones kept, a run's duration)."""
    if not history:
        return []
    first = float(history[0]["at"])
    last_fire = {event.get("trigger"): index for index, event in enumerate(history)
                 if event.get("event") == "fired"}
    started: dict[str, float] = {}
    rows = []
    for index, event in enumerate(history):
        kind, at = str(event.get("event", "?")), float(event["at"])
        instance, trigger = event.get("instance"), event.get("trigger")
        detail = ""
        if kind == "fired" and trigger is not None:
            if last_fire.get(trigger) == index and trigger in latest:
                detail = "kwargs " + json.dumps(latest[trigger], sort_keys=True, default=str)
            elif event.get("size") is not None:
                detail = f"kwargs of {event['size']} bytes (later fires replaced them)"
        elif kind == "configured" and event.get("size") is not None:
            detail = f"{event['size']} task(s)"
        elif kind == "started" and instance is not None:
            started[instance] = at
        elif kind in ("finished", "failed", "retried") and instance in started:
            detail = f"ran {at - started.pop(instance):.3f} s"
        if event.get("run"):
            detail = f"{detail} run {event['run']}".strip()
        rows.append({
            "time": format_time(at), "offset": f"+{at - first:.3f} s", "event": kind,
            "colour": _EVENT_COLOURS.get(kind) or STATUS_COLOURS.get(kind, "#607d8b"),
            "trigger": trigger,
            "instance": instance, "url": link(instance) if instance else None,
            "detail": detail, "process": event.get("process", ""),
        })
    return rows


def _context(request: HttpRequest, site: AdminSite, title: str, **extra: Any) -> dict[str, Any]:
    return {**site.each_context(request), "title": title, "opts": _session_opts(),
            "storages": browsable_storages(), **extra}


def _session_opts() -> Any:
    from triggers.models import TriggerSession

    return TriggerSession._meta


@storage_errors
def sessions_page(request: HttpRequest, site: AdminSite, storage: str) -> HttpResponse:
    """The sessions of a storage, through ``session_uids`` (a page of ``PAGE_SIZE``), with
    their failed / waiting / scheduled / running counts."""
    import itertools

    if not _can_view(request, "triggersession"):
        raise PermissionDenied
    from triggers.storages import storage_backends

    options = _options(storage)
    try:
        page = max(int(request.GET.get("page", 1)), 1)
    except ValueError:
        page = 1
    wanted = request.GET.get("q", "").strip()
    uids = (uid for uid in storage_backends.get_class(storage).session_uids(**options)
            if wanted in uid)
    found = sorted(itertools.islice(uids, MAX_LISTED + 1))
    truncated = len(found) > MAX_LISTED
    chunk = found[(page - 1) * PAGE_SIZE:page * PAGE_SIZE + 1]
    rows = []
    for uid in chunk[:PAGE_SIZE]:
        try:
            counts = Counter(instance.status.value for instance in
                             open_manager(storage, uid).storage.get_unresolved_instances())
        except TriggersError as exc:  # one unreadable session does not hide the others
            rows.append({"uid": uid, "url": session_url(storage, uid), "counts": [],
                         "error": f"{type(exc).__name__}: {exc}"})
            continue
        rows.append({"uid": uid, "url": session_url(storage, uid), "counts": [
            (status, counts[status], STATUS_COLOURS[status])
            for status in COUNTED if counts[status]]})
    return TemplateResponse(request, "triggers/admin/sessions.html", _context(
        request, site, f"Trigger sessions in storage {storage!r}", storage=storage, rows=rows,
        page=page, query=wanted, has_next=len(chunk) > PAGE_SIZE, truncated=truncated,
        max_listed=MAX_LISTED))


@storage_errors
def session_page(request: HttpRequest, site: AdminSite, storage: str, uid: str,
                 using: str | None = None) -> HttpResponse:
    """A session: counts, workflow graph, instances, timeline, configuration."""
    if not (_can_view(request, "triggersession") and _can_view(request, "triggerinstance")):
        raise PermissionDenied  # the page shows the instances' kwargs, results, exceptions
    manager = open_manager(storage, uid, using)
    data = _load(manager)
    instances: list[TaskInstance] = data["instances"]

    def link(name: str) -> str:
        return instance_url(storage, uid, name)

    counts = Counter(instance.status.value for instance in instances)
    listed = sorted(instances, key=lambda i: (-i.number, i.task_name))[:MAX_INSTANCES]
    listed.sort(key=_sort_key)
    return TemplateResponse(request, "triggers/admin/session.html", _context(
        request, site, f"Trigger session {uid}", storage=storage, uid=uid,
        graph=mark_safe(workflow_svg(data["tasks"], instances, fired=set(data["latest"]),  # noqa: S308 - escaped by workflow_svg
                                     link=lambda instance: link(instance.name))),
        counts=[(status, counts[status], STATUS_COLOURS[status])
                for status in STATUS_COLOURS if counts[status]],
        instances=[{
            "name": instance.name, "url": link(instance.name), "task": instance.task_name,
            "badge": mark_safe(status_badge(instance.status.value,  # noqa: S308 - format_html
                                            bool(instance.metadata.get("dispatch_error")))),
            "note": _note(instance), "modified": when(instance.metadata.get("modified")),
        } for instance in listed],
        hidden=len(instances) - len(listed),
        timeline=timeline(data["history"], data["latest"], link),
        tasks=[(name, json.dumps(config.to_dict(), sort_keys=True))
               for name, config in data["tasks"].items()],
        latest=_pretty(data["latest"]), can_change=_can_change(request),
        recover_after=_recover_after()))


def _recover_after() -> float:
    from triggers.conf import triggers_settings

    return float(triggers_settings.RECOVER_AFTER)


def _note(instance: TaskInstance) -> str:
    meta = instance.metadata
    if instance.status == STATUS_FAILED:
        return f"{meta.get('exc_type', '')}: {meta.get('exc_message', '')}"
    if meta.get("dispatch_error"):
        return f"not sent: {meta['dispatch_error']}"
    if instance.status == STATUS_UNSTARTED:
        return "waits for " + ", ".join(instance.missing_triggers)
    if "result" in meta:
        return "result " + json.dumps(meta["result"], sort_keys=True, default=str)[:120]
    return ""


def _get_instance(manager: TriggerManager, name: str) -> TaskInstance:
    try:
        return manager.storage.get_instance(name)
    except (InstanceNotFound, KeyError) as exc:
        raise Http404(f"No instance {name!r} in session {manager.storage.uid!r}.") from exc


@storage_errors
def instance_page(request: HttpRequest, site: AdminSite, storage: str, uid: str, name: str,
                  using: str | None = None, errors: dict[str, str] | None = None,
                  values: dict[str, str] | None = None) -> HttpResponse:
    """An instance: status, exception and traceback first, times, kwargs, metadata, and
    the repair operations it allows."""
    if not _can_view(request, "triggerinstance"):
        raise PermissionDenied
    manager = open_manager(storage, uid, using)
    instance = _get_instance(manager, name)
    meta = instance.metadata
    times = [(label, when(meta[key])) for key, label in _TIMES
             if isinstance(meta.get(key), (int, float))]
    if isinstance(meta.get("started"), (int, float)) and isinstance(
            meta.get("finished"), (int, float)):
        times.append(("ran for", f"{float(meta['finished']) - float(meta['started']):.3f} s"))
    values = {"kwargs": _pretty(instance.kwargs), "result": "{}", "cascade": "",
              "older_than": f"{_recover_after():g}", **(values or {})}
    status = instance.status
    return TemplateResponse(request, "triggers/admin/instance.html", _context(
        request, site, f"Trigger instance {name}", storage=storage, uid=uid, name=name,
        session_url=session_url(storage, uid), instance=instance, task=instance.task_name,
        badge=mark_safe(status_badge(status.value,  # noqa: S308 - built by format_html
                                     bool(meta.get("dispatch_error")))),
        exception=(f"{meta.get('exc_type', '')}: {meta.get('exc_message', '')}"
                   if "exc_type" in meta else ""),
        traceback=meta.get("exc_traceback") or "", dispatch_error=meta.get("dispatch_error"),
        task_id=meta.get("task_id"), times=times,
        waits_for=instance.missing_triggers if status == STATUS_UNSTARTED else [],
        kwargs=_pretty(instance.kwargs),
        result=_pretty(meta["result"]) if "result" in meta else None,
        metadata=_pretty({k: v for k, v in meta.items() if k not in _SHOWN}),
        can_change=_can_change(request),
        allowed={"replay": instance.can_replay, "skip": instance.can_skip,
                 "recover": status in (STATUS_SCHEDULED, STATUS_RUNNING)},
        errors=errors or {}, values=values,
        actions={action: reverse("admin:triggers_storage_action", args=[storage, action])
                 for action in ACTIONS},
        recover_after=_recover_after()), status=400 if errors else 200)


def _parse(action: str, post: Any) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """The arguments of an action from its form, the errors by field, and what the
    confirmation page says will happen."""
    arguments: dict[str, Any] = {}
    errors: dict[str, str] = {}
    plan: list[str] = []
    if action == "replay":
        text = post.get("kwargs", "").strip()
        try:
            kwargs = json.loads(text) if text else None
            arguments["replacement_kwargs"] = (
                None if kwargs is None else check_kwargs_map(kwargs, "kwargs"))
        except InvalidArgument as exc:
            errors["kwargs"] = str(exc)
        except ValueError as exc:
            errors["kwargs"] = f"Not valid JSON: {exc}. Write an object: trigger → kwargs."
        plan.append("The instance becomes replayed and a copy of it is scheduled at once, "
                    "with these kwargs:")
    elif action == "skip":
        arguments["cascade"] = post.get("cascade") in ("on", "1", "true", "yes")
        text = post.get("result", "").strip()
        try:
            arguments["result"] = check_kwargs(json.loads(text) if text else None, "result")
        except InvalidArgument as exc:
            errors["result"] = str(exc)
        except ValueError as exc:
            errors["result"] = f"Not valid JSON: {exc}. Write an object, e.g. {{}}."
        plan.append("The instance becomes skipped" + (
            ", and its task fires as if it had finished (a cascade), with this result:"
            if arguments["cascade"] else "; nothing cascades."))
    elif action == "recover":
        try:
            older_than = float(post.get("older_than", ""))
            if older_than < 0 or older_than != older_than:
                raise ValueError
            arguments["older_than"] = older_than
        except ValueError:
            errors["older_than"] = (f"Give a number of seconds >= 0, got "
                                    f"{post.get('older_than', '')!r}.")
        subject = (f"The instance {post['name']}, if it is" if post.get("name")
                   else "Every instance of the session")
        plan.append(f"{subject} scheduled or running for longer than "
                    f"{post.get('older_than', '')} s, whose lease (if any) expired, is sent "
                    "again (a running one goes back to scheduled first).")
    else:
        raise Http404(f"No action {action!r}; actions: {', '.join(ACTIONS)}.")
    return arguments, errors, plan


@storage_errors
def action_view(request: HttpRequest, site: AdminSite, storage: str, action: str
                ) -> HttpResponse:
    """Run a repair operation on an instance: validate the form, confirm, then do it."""
    if request.method != "POST":
        raise Http404("Actions are posted from an instance's page.")
    if not _can_change(request):
        raise PermissionDenied
    from triggers.models import TriggerInstance

    uid, name = request.POST.get("uid", ""), request.POST.get("name", "")
    manager = open_manager(storage, uid, router.db_for_write(TriggerInstance)
                           if storage == "db" else None)
    # Recover also applies to a whole session (posted from its page, without a name).
    whole_session = action == "recover" and not name
    instance = None if whole_session else _get_instance(manager, name)
    if instance is None:
        _load(manager)  # a session that does not exist is a 404
    arguments, errors, plan = _parse(action, request.POST)
    # What the user wrote is shown again; the other forms keep their own values.
    values = {key: request.POST[key] for key in ("kwargs", "result", "cascade", "older_than")
              if key in request.POST}
    if errors and whole_session:
        messages.error(request, errors["older_than"])
        return HttpResponseRedirect(session_url(storage, uid))
    if errors:
        return instance_page(request, site, storage, uid, name, errors=errors, values=values)
    back = session_url(storage, uid) if whole_session else instance_url(storage, uid, name)
    if request.POST.get("confirmed") != "yes":
        replacement = arguments.get("replacement_kwargs")
        shown = {"replay": replacement if replacement is not None else (
                     instance.kwargs if instance is not None else None),
                 "skip": arguments.get("result") if arguments.get("cascade") else None,
                 "recover": None}[action]
        return TemplateResponse(request, "triggers/admin/confirm.html", _context(
            request, site, f"{action.capitalize()} {name}?", storage=storage, uid=uid,
            name=name, action=action, plan=plan,
            shown=None if shown is None else _pretty(shown), values=values, back=back,
            session_url=session_url(storage, uid), instance_link=back,
            post_url=reverse("admin:triggers_storage_action", args=[storage, action])))
    before = unsent_instances(manager.storage)
    sent: list[str] = []  # what the action just handed to the runner
    try:
        if action == "replay":
            copy = manager.replay_failed_instance(name, arguments["replacement_kwargs"])
            done, sent = f"Replayed {name}: {copy.name} is scheduled.", [copy.name]
            back = instance_url(storage, uid, copy.name)
        elif action == "skip":
            manager.skip_failed_instance(name, cascade=arguments["cascade"],
                                         result=arguments["result"])
            done = f"Skipped {name}" + (
                " and fired its task (cascade)." if arguments["cascade"] else ".")
        else:
            since = now()
            recovered = [found.name for found in manager.recover(
                arguments["older_than"], instances=None if whole_session else [name])]
            done, sent = f"Recovered (sent again): {', '.join(recovered)}.", recovered
            if not recovered:
                what = "no instance of the session was" if whole_session else f"{name} was not"
                messages.warning(request, f"Nothing was recovered: {what} "
                                 f"stuck for longer than {arguments['older_than']:g} s "
                                 "with its lease expired (checked at "
                                 f"{format_time(since)}).")
                return HttpResponseRedirect(back)
    except TriggersError as exc:
        messages.error(request, f"Could not {action} {name or uid}: {exc}")
        return HttpResponseRedirect(back)
    # A message the broker did not take is not a success: say which, and what happens.
    unsent = {found: error for found, error in unsent_instances(manager.storage).items()
              if found in sent or error != before.get(found)}
    if unsent:
        messages.warning(request, done + " Not sent: " + "; ".join(
            f"{found} ({error})" for found, error in sorted(unsent.items()))
            + ". The sweep sends them again once the broker is reachable.")
    else:
        messages.success(request, done)
    return HttpResponseRedirect(back)
