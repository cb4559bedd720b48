"""The admin's session and instance pages: graph, timeline, times, repair operations with
confirmation, and sessions of the cache and Redis storages browsed through the contract."""

import re

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.test import override_settings
from django.urls import reverse

from tests.helpers import make_storage
from triggers import DatabaseStorageBackend, TriggerManager
from triggers.admin.pages import instance_url, session_url
from triggers.models import TriggerInstance
from triggers.runners import ThreadingTaskRunner

pytestmark = [pytest.mark.django_db(transaction=True),
              pytest.mark.usefixtures("trigger_threading_runner")]

CONFIG = {
    "t_fail": {"after": ["go"], "run": "tests.FailUnlessFixed"},
    "t_ok": {"after": ["go"], "run": "tests.Echo"},
    "t_next": {"after": ["t_fail"], "run": "tests.Echo"},
    "t_wait": {"after": ["go", "later"], "unless": ["cancel"], "run": "tests.Echo"},
}
HUMAN_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \w+")


def build(storage):
    manager = TriggerManager(storage)
    manager.update_configuration(CONFIG)
    manager.fire("go", {"fixed": False, "order": 42})
    ThreadingTaskRunner.join_all()
    return manager


@pytest.fixture
def session(uid):
    return build(DatabaseStorageBackend(uid))


def page(client, url, status=200):
    response = client.get(url)
    assert response.status_code == status, response.content.decode()[:2000]
    return response.content.decode()


def test_session_page_has_graph_timeline_and_counts(session, admin_client_):
    uid = session.storage.uid
    text = page(admin_client_, reverse("admin:triggers_triggersession_change", args=[uid]))
    svg = text[text.index("<svg xmlns"):]
    svg = svg[:svg.index("</svg>")]
    # Tasks are nodes coloured by their latest instance; the application's trigger a pill.
    for node in ("t_fail", "t_ok", "t_next", "t_wait", "go", "later", "cancel"):
        assert f'data-node="{node}"' in svg
    assert 'fill="#c62828"' in svg and 'fill="#2e7d32"' in svg  # failed, finished
    assert "waits for later" in svg  # the unstarted instance says what it waits for
    assert "no instance yet" in svg  # t_next: t_fail never finished
    assert "t_fail → t_next (after)" in svg  # the cascade edge
    assert "cancel → t_wait (unless)" in svg
    assert instance_url("db", uid, "t_fail#0").replace("&", "&amp;") in svg
    # Counts, coloured statuses, the timeline with kwargs and durations.
    assert "1 failed" in text and "1 unstarted" in text and "1 finished" in text
    timeline = text[text.index("<h2>Timeline</h2>"):]
    assert "fired" in timeline and "go" in timeline
    assert "&quot;order&quot;: 42" in timeline  # the trigger's kwargs
    assert re.search(r"ran \d+\.\d{3} s", timeline)  # started → failed / finished
    assert "ValueError: not fixed yet" in text
    assert HUMAN_TIME.search(timeline)


def test_session_list_shows_counts(session, admin_client_):
    text = page(admin_client_, reverse("admin:triggers_triggersession_changelist"))
    row = text[text.index(session.storage.uid):]
    assert "1 failed" in row and "1 unstarted" in row


def test_instance_page_times_exception_and_actions(session, admin_client_):
    pk = TriggerInstance.objects.get(session_id=session.storage.uid, name="t_fail#0").pk
    text = page(admin_client_, reverse("admin:triggers_triggerinstance_change", args=[pk]))
    head = text[text.index('id="content-main"'):]
    # The exception and traceback come first, prominently; times are readable.
    assert head.index("ValueError: not fixed yet") < head.index("<h2>Actions</h2>")
    assert "triggers-error" in head and "Traceback (most recent call last)" in head
    assert HUMAN_TIME.search(head) and " ago)" in head
    times = head[head.index("<h2>Times</h2>"):head.index("<h2>Kwargs</h2>")]
    assert not re.search(r"\d{10}\.\d+", times)  # no epoch floats
    assert "Replay…" in head and "Skip…" in head and "Recover…" not in head
    assert "&quot;order&quot;: 42" in head  # the kwargs editor holds the kwargs


def test_replay_with_edited_kwargs_is_confirmed_then_done(session, admin_client_):
    storage = session.storage
    url = reverse("admin:triggers_storage_action", args=["db", "replay"])
    form = {"uid": storage.uid, "name": "t_fail#0", "kwargs": '{"go": {"fixed": true}}'}
    confirm = admin_client_.post(url, form)
    assert confirm.status_code == 200
    assert "Are you sure?" in confirm.content.decode()
    assert storage["t_fail#0"].status.value == "failed"  # nothing happened yet
    response = admin_client_.post(url, {**form, "confirmed": "yes"}, follow=True)
    assert "Replayed t_fail#0: t_fail#1 is scheduled." in response.content.decode()
    ThreadingTaskRunner.join_all()
    assert storage["t_fail#0"].status.value == "replayed"
    assert storage["t_fail#1"].status.value == "finished"
    assert storage["t_fail#1"].kwargs == {"go": {"fixed": True}}
    assert storage["t_next#0"].status.value == "finished"  # the cascade went on


@pytest.mark.parametrize("field, value, message", [
    ("kwargs", "{not json", "Not valid JSON"),
    ("kwargs", "[1, 2]", "must map trigger names to kwargs"),
    ("kwargs", '{"go": 3}', "must be a mapping of kwargs"),
])
def test_replay_with_bad_kwargs_changes_nothing(session, admin_client_, field, value, message):
    storage = session.storage
    before = storage.debug_repr()
    response = admin_client_.post(
        reverse("admin:triggers_storage_action", args=["db", "replay"]),
        {"uid": storage.uid, "name": "t_fail#0", field: value, "confirmed": "yes"})
    assert response.status_code == 400
    assert message in response.content.decode()
    storage.invalidate_cache()
    assert storage.debug_repr()["instances"] == before["instances"]


def test_skip_with_cascade_and_result(session, admin_client_):
    storage = session.storage
    url = reverse("admin:triggers_storage_action", args=["db", "skip"])
    form = {"uid": storage.uid, "name": "t_fail#0", "cascade": "on", "result": '{"n": 7}'}
    assert "Are you sure?" in admin_client_.post(url, form).content.decode()
    bad = admin_client_.post(url, {**form, "result": "7", "confirmed": "yes"})
    assert bad.status_code == 400 and "result must be a mapping" in bad.content.decode()
    assert storage["t_fail#0"].status.value == "failed"
    response = admin_client_.post(url, {**form, "confirmed": "yes"}, follow=True)
    assert "Skipped t_fail#0 and fired its task (cascade)." in response.content.decode()
    ThreadingTaskRunner.join_all()
    assert storage["t_fail#0"].status.value == "skipped"
    assert storage["t_next#0"].status.value == "finished"
    assert storage["t_next#0"].kwargs["t_fail"] == {"n": 7}


class SilentManager(TriggerManager):
    """Commits, then dies before sending: its instances stay scheduled, unsent."""

    def dispatch(self, instances):
        pass


def test_recover_an_instance_or_the_session(uid, admin_client_):
    """Recover on an instance's page sends that instance only; on the session's page
    every stuck one; the page says when nothing was stuck."""
    storage = DatabaseStorageBackend(uid)
    manager = SilentManager(storage)
    manager.update_configuration({"t": {"after": ["go"], "run": "tests.Echo"},
                                  "u": {"after": ["go"], "run": "tests.Echo"}})
    manager.fire("go")
    assert storage["t#0"].status.value == storage["u#0"].status.value == "scheduled"
    text = page(admin_client_, instance_url("db", uid, "t#0"))
    assert "Recover</strong> this instance" in text and "Replay…" not in text
    assert 'value="300"' in text  # TRIGGERS['RECOVER_AFTER'] to start with
    url = reverse("admin:triggers_storage_action", args=["db", "recover"])
    bad = admin_client_.post(url, {"uid": uid, "name": "t#0", "older_than": "-1",
                                   "confirmed": "yes"})
    assert bad.status_code == 400 and "Give a number of seconds" in bad.content.decode()
    response = admin_client_.post(url, {"uid": uid, "name": "t#0", "older_than": "3600",
                                        "confirmed": "yes"}, follow=True)
    assert "Nothing was recovered: t#0 was not stuck" in response.content.decode()
    assert storage["t#0"].status.value == "scheduled"
    confirm = admin_client_.post(url, {"uid": uid, "name": "t#0", "older_than": "0"})
    assert "The instance t#0, if it is scheduled or running" in confirm.content.decode()
    response = admin_client_.post(url, {"uid": uid, "name": "t#0", "older_than": "0",
                                        "confirmed": "yes"}, follow=True)
    assert "Recovered (sent again): t#0." in response.content.decode()
    ThreadingTaskRunner.join_all()
    assert storage["t#0"].status.value == "finished"
    assert storage["u#0"].status.value == "scheduled"  # not this instance's business
    response = admin_client_.post(url, {"uid": uid, "older_than": "0", "confirmed": "yes"},
                                  follow=True)  # from the session's page: no name
    assert "Recovered (sent again): u#0." in response.content.decode()
    ThreadingTaskRunner.join_all()
    assert storage["u#0"].status.value == "finished"


def test_replay_with_empty_kwargs_confirms_what_it_does(session, admin_client_):
    storage = session.storage
    url = reverse("admin:triggers_storage_action", args=["db", "replay"])
    confirm = admin_client_.post(url, {"uid": storage.uid, "name": "t_fail#0", "kwargs": "{}"})
    text = confirm.content.decode()
    shown = text[text.index("Are you sure?"):]
    shown = shown[:shown.index("<form")]
    assert '<pre class="triggers-pre">{}</pre>' in shown and "order" not in shown
    admin_client_.post(url, {"uid": storage.uid, "name": "t_fail#0", "kwargs": "{}",
                             "confirmed": "yes"})
    ThreadingTaskRunner.join_all()
    assert storage["t_fail#1"].kwargs == {}


def test_an_unreachable_store_is_a_clear_page(admin_client_):
    unreachable = {"STORAGE": "redis", "STORAGE_OPTIONS": {"url": "redis://127.0.0.1:1/0"}}
    with override_settings(TRIGGERS=unreachable):
        for url in (reverse("admin:triggers_storage_sessions", args=["redis"]),
                    session_url("redis", "s1"), instance_url("redis", "s1", "t#0")):
            response = admin_client_.get(url)
            assert response.status_code == 503, url
            text = response.content.decode()
            assert "The trigger storage could not be read" in text
            assert "Connection refused" in text or "Error" in text


def test_the_session_page_needs_the_instance_view_permission(session, client):
    viewer = User.objects.create_user("viewer", password="secret-password", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_triggersession"))
    client.force_login(viewer)
    assert client.get(session_url("db", session.storage.uid)).status_code == 403
    viewer.user_permissions.add(Permission.objects.get(codename="view_triggerinstance"))
    assert client.get(session_url("db", session.storage.uid)).status_code == 200


def test_dispatch_error_and_task_id_are_shown(session, admin_client_):
    uid = session.storage.uid
    row = TriggerInstance.objects.get(session_id=uid, name="t_ok#0")
    row.metadata = {**row.metadata, "task_id": "5f1c-task-id",
                    "dispatch_error": "OperationalError: [Errno 111] Connection refused"}
    row.save()
    text = page(admin_client_, instance_url("db", uid, "t_ok#0"))
    assert "Celery task id <code>5f1c-task-id</code>" in text
    assert "Not sent: its message could not be handed to the runner." in text
    assert "Connection refused" in text and "not sent" in text
    listing = page(admin_client_, reverse("admin:triggers_triggerinstance_changelist"))
    assert "finished · not sent" in listing


def test_actions_need_the_change_permission(session, client):
    storage = session.storage
    viewer = User.objects.create_user("viewer", password="secret-password", is_staff=True)
    viewer.user_permissions.add(*Permission.objects.filter(
        codename__in=["view_triggerinstance", "view_triggersession"]))
    client.force_login(viewer)
    text = page(client, instance_url("db", storage.uid, "t_fail#0"))
    assert "ValueError: not fixed yet" in text and "Replay…" not in text
    response = client.post(reverse("admin:triggers_storage_action", args=["db", "replay"]),
                           {"uid": storage.uid, "name": "t_fail#0", "confirmed": "yes"})
    assert response.status_code == 403
    assert storage["t_fail#0"].status.value == "failed"
    client.logout()
    assert client.get(session_url("db", storage.uid)).status_code == 302  # to the login


def test_unknown_session_instance_and_storage_are_404(session, admin_client_):
    page(admin_client_, session_url("db", "no-such-session"), status=404)
    page(admin_client_, instance_url("db", session.storage.uid, "t_fail#9"), status=404)
    page(admin_client_, reverse("admin:triggers_storage_sessions", args=["memory"]), status=404)


@pytest.mark.parametrize("kind", ["django_redis", "redis"])
def test_sessions_of_cache_and_redis_storages_are_browsable(uid, admin_client_, kind):
    key, options = {
        "django_redis": ("cache", {"CACHE": "default"}),
        "redis": ("redis", {"STORAGE_OPTIONS": {"url": settings.REDIS_URL,
                                                "prefix": "triggers-tests-redis:"}}),
    }[kind]
    storage = make_storage(kind, uid)
    build(storage)
    with override_settings(TRIGGERS={"STORAGE": key, **options}):
        listing = reverse("admin:triggers_triggersession_changelist")
        assert f"Sessions in storage {key}" in page(admin_client_, listing)
        text = page(admin_client_, reverse("admin:triggers_storage_sessions", args=[key])
                    + "?q=" + uid)
        assert uid in text and "1 failed" in text and "1 unstarted" in text
        text = page(admin_client_, session_url(key, uid))
        assert 'data-node="t_wait"' in text and "waits for later" in text
        text = page(admin_client_, instance_url(key, uid, "t_fail#0"))
        assert "ValueError: not fixed yet" in text and "Replay…" in text
        response = admin_client_.post(
            reverse("admin:triggers_storage_action", args=[key, "replay"]),
            {"uid": uid, "name": "t_fail#0", "kwargs": '{"go": {"fixed": true}}',
             "confirmed": "yes"}, follow=True)
        assert "Replayed t_fail#0: t_fail#1 is scheduled." in response.content.decode()
    ThreadingTaskRunner.join_all()
    assert storage["t_fail#1"].status.value == "finished"
    storage.delete()


def test_an_action_whose_message_is_not_sent_says_so(session, admin_client_, monkeypatch):
    """Replay with the broker down: a warning naming the copy and the error, not a success;
    the refused form of another action keeps the values of the others."""
    def broker_down(self, manager, instance):
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    storage = session.storage
    url = reverse("admin:triggers_storage_action", args=["db", "replay"])
    bad = admin_client_.post(url, {"uid": storage.uid, "name": "t_fail#0", "kwargs": "{bad",
                                   "confirmed": "yes"}).content.decode()
    assert "{bad</textarea>" in bad and 'id="id_result">{}</textarea>' in bad
    monkeypatch.setattr(ThreadingTaskRunner, "run", broker_down)
    response = admin_client_.post(url, {"uid": storage.uid, "name": "t_fail#0",
                                        "confirmed": "yes"}, follow=True)
    text = response.content.decode()
    assert 'class="warning">Replayed t_fail#0: t_fail#1 is scheduled. Not sent: t_fail#1' in text
    assert "Connection refused" in text and "The sweep sends them again" in text
    assert "scheduled · not sent" in text  # the copy's page
    history = [event["event"] for event in storage.history()
               if event.get("instance") == "t_fail#1"]
    assert history == ["created", "scheduled", "unsent"]
