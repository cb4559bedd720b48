"""Async views that drive a trigger manager with its async methods (tests/test_signals_async.py)."""

import json

from django.http import HttpRequest, JsonResponse
from django.urls import path

#: Storage kind the views use (set by the tests).
storage_kind = "memory"


def _manager(uid):
    from tests.helpers import make_storage
    from triggers import TriggerManager

    return TriggerManager(make_storage(storage_kind, uid))


async def configure_view(request: HttpRequest, uid: str) -> JsonResponse:
    """Stores the JSON body as the session's configuration."""
    await _manager(uid).aupdate_configuration(json.loads(request.body))
    return JsonResponse({"configured": True})


async def fire_view(request: HttpRequest, uid: str, trigger: str) -> JsonResponse:
    """Fires ``trigger`` with the JSON body as its kwargs; answers what it scheduled and what
    is unresolved."""
    manager = _manager(uid)
    kwargs = json.loads(request.body) if request.body else None
    key = request.GET.get("key")
    scheduled = await manager.afire(trigger, kwargs, idempotency_key=key)
    tasks = await manager.aget_unresolved_tasks()
    instances = await manager.aget_unresolved_instances()
    return JsonResponse({"scheduled": [instance.name for instance in scheduled],
                         "unresolved_tasks": sorted(config.name for config in tasks),
                         "unresolved_instances": sorted(i.name for i in instances)})


async def instance_view(request: HttpRequest, uid: str, name: str, action: str) -> JsonResponse:
    """Acts on one instance: replay, skip, status, metadata or logs_resolved."""
    manager = _manager(uid)
    body = json.loads(request.body) if request.body else {}
    if action == "replay":
        instance = await manager.areplay_failed_instance(name, body.get("replacement_kwargs"))
    elif action == "skip":
        instance = await manager.askip_failed_instance(name, body.get("cascade", False),
                                                       body.get("result"))
    elif action == "status":
        instance = await manager.aupdate_instance_status(
            name, body["status"], body.get("metadata"), body.get("cascade", False),
            body.get("cascade_kwargs"))
    elif action == "metadata":
        instance = await manager.aupdate_instance_metadata(name, body["metadata"])
    elif action == "logs_resolved":
        instance = await manager.amark_instance_logs_resolved(name)
    else:
        return JsonResponse({"error": action}, status=404)
    return JsonResponse({"name": instance.name, "status": instance.status.value,
                         "metadata": instance.metadata})


urlpatterns = [
    path("configure/<str:uid>/", configure_view),
    path("fire/<str:uid>/<str:trigger>/", fire_view),
    path("instance/<str:uid>/<str:name>/<str:action>/", instance_view),
]
