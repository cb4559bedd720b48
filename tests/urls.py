from django.contrib import admin
from django.http import HttpResponse
from django.urls import path

#: Storage kind the fire view uses (set by the tests).
fire_kind = "django_redis"


def fire_view(request, uid):
    """Fires 'a' in session ``uid``; with ?fail=1 the view fails afterwards."""
    from tests.helpers import make_storage
    from triggers import TriggerManager
    from triggers.models import TriggerLock

    TriggerManager(make_storage(fire_kind, uid)).fire("a", {"from": "view"})
    # A write of the request's own, in the same transaction.
    TriggerLock.objects.update_or_create(name=f"view:{uid}", defaults={"owner": "v",
                                                                       "expires": 0})
    if request.GET.get("fail"):
        raise RuntimeError("the view failed after firing")
    return HttpResponse("ok")


urlpatterns = [path("admin/", admin.site.urls), path("fire/<str:uid>/", fire_view)]
