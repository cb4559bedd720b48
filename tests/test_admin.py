"""The Django admin of the database storage, through the test client and a real browser."""

import os
import shutil
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse

from triggers import DatabaseStorageBackend, TriggerManager
from triggers.models import TriggerInstance
from triggers.runners import ThreadingTaskRunner

pytestmark = [pytest.mark.django_db(transaction=True),
              pytest.mark.usefixtures("trigger_threading_runner")]

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture
def session(uid):
    manager = TriggerManager(DatabaseStorageBackend(uid))
    manager.update_configuration({
        "t_fail": {"after": ["go"], "run": "tests.FailUnlessFixed"},
        "t_ok": {"after": ["go"], "run": "tests.Echo"},
        "t_next": {"after": ["t_fail"], "run": "tests.Echo"},
    })
    manager.fire("go", {"fixed": False})
    ThreadingTaskRunner.join_all()
    return manager


def failed_pk(manager):
    return TriggerInstance.objects.get(session_id=manager.storage.uid, name="t_fail#0").pk


def test_instances_filterable_by_status(session, admin_client_):
    """The instance list filters by status and shows the exception."""
    url = reverse("admin:triggers_triggerinstance_changelist")
    page = admin_client_.get(url, {"status__exact": "failed"}).content.decode()
    assert "t_fail#0" in page and "t_ok#0" not in page
    assert "ValueError: not fixed yet" in page
    page = admin_client_.get(url, {"status__exact": "finished"}).content.decode()
    assert "t_ok#0" in page and "t_fail#0" not in page
    page = admin_client_.get(url, {"unresolved": "yes"}).content.decode()
    assert "t_fail#0" in page and "t_ok#0" not in page


def test_failed_instance_shows_exception_and_traceback(session, admin_client_):
    """A failed instance's page shows its exception and traceback, read-only."""
    url = reverse("admin:triggers_triggerinstance_change", args=[failed_pk(session)])
    page = admin_client_.get(url).content.decode()
    assert "ValueError: not fixed yet" in page
    assert "Traceback (most recent call last)" in page
    assert 'name="_save"' not in page  # nothing to edit


def test_session_page_lists_tasks_and_instances(session, admin_client_):
    """A session's page shows its configuration, latest kwargs and instances."""
    url = reverse("admin:triggers_triggersession_change", args=[session.storage.uid])
    page = admin_client_.get(url).content.decode()
    assert "t_next" in page and "tests.FailUnlessFixed" in page
    assert "t_fail#0" in page and "t_ok#0" in page
    listing = admin_client_.get(reverse("admin:triggers_triggersession_changelist")).content.decode()
    assert session.storage.uid in listing


def test_replay_and_skip_actions(session, admin_client_):
    """The replay and skip actions go through the manager."""
    url = reverse("admin:triggers_triggerinstance_changelist")
    response = admin_client_.post(url, {"action": "replay_failed",
                                        "_selected_action": [failed_pk(session)]}, follow=True)
    assert "1 instance(s) replayed." in response.content.decode()
    ThreadingTaskRunner.join_all()
    storage = session.storage
    assert storage["t_fail#0"].status.value == "replayed"
    assert storage["t_fail#1"].status.value == "failed"  # same kwargs, fails again
    new_pk = TriggerInstance.objects.get(session_id=storage.uid, name="t_fail#1").pk
    ok_pk = TriggerInstance.objects.get(session_id=storage.uid, name="t_ok#0").pk
    response = admin_client_.post(url, {"action": "skip_failed",
                                        "_selected_action": [new_pk, ok_pk]}, follow=True)
    text = response.content.decode()
    assert "1 instance(s) skipped." in text
    assert "Only failed instances can be skipped; t_ok#0 is finished." in text
    assert storage["t_fail#1"].status.value == "skipped"


def test_nothing_is_writable_without_permissions(session, client):
    """Anonymous users are sent to the login page; view-only staff cannot run actions."""
    url = reverse("admin:triggers_triggerinstance_changelist")
    assert client.get(url).status_code == 302
    assert client.post(url, {"action": "replay_failed",
                             "_selected_action": [failed_pk(session)]}).status_code == 302
    viewer = User.objects.create_user("viewer", password="secret-password", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_triggerinstance"))
    client.force_login(viewer)
    page = client.get(url).content.decode()
    assert "t_fail#0" in page and "replay_failed" not in page
    client.post(url, {"action": "replay_failed", "_selected_action": [failed_pk(session)]})
    assert session.storage["t_fail#0"].status.value == "failed"
    add_url = reverse("admin:triggers_triggerinstance_add")
    assert client.get(add_url).status_code == 403


SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "_static"


def test_admin_pages_in_a_real_browser(uid, live_server, monkeypatch):
    """Headless Chromium logs in, reads the session list at 1,400 px, the session page
    (graph, timeline) and a failed instance's page, then replays it with edited kwargs
    through the confirmation page. The screenshots of the two pages are the ones in
    docs/admin.rst (TRIGGERS_TEST_UPDATE_SCREENSHOTS=1 writes them there)."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("Chromium is not installed; install Debian's package: "
                    "apt-get install -y chromium")
    uid = "order-20261202-0042"
    manager = TriggerManager(DatabaseStorageBackend(uid))
    manager.update_configuration({
        "charge_card": {"after": ["order_placed"], "run": "tests.ChargeCard"},
        "reserve_stock": {"after": ["order_placed"], "run": "tests.Echo"},
        "notify_warehouse": {"after": ["reserve_stock"], "run": "tests.Echo"},
        "ship_order": {"after": ["charge_card", "notify_warehouse"], "unless": ["cancelled"],
                       "run": "tests.Echo"},
        "send_receipt": {"after": ["ship_order", "address_confirmed"], "run": "tests.Echo"},
    })
    manager.fire("address_confirmed", {"address": "1 Main St"})
    manager.fire("order_placed", {"order": 42, "card_ok": False})
    ThreadingTaskRunner.join_all()
    User.objects.create_superuser("admin", "admin@example.org", "secret-password")
    update = os.environ.get("TRIGGERS_TEST_UPDATE_SCREENSHOTS") == "1"
    shots = SCREENSHOTS if update else ARTIFACTS
    shots.mkdir(exist_ok=True)
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(live_server.url + reverse("admin:triggers_triggersession_changelist"))
            page.fill("#id_username", "admin")
            page.fill("#id_password", "secret-password")
            page.click("input[type=submit]")
            page.wait_for_selector(f"text={uid}")
            for listing in ("triggersession", "triggerinstance"):
                page.goto(live_server.url + reverse(f"admin:triggers_{listing}_changelist"))
                overflow = page.evaluate("document.documentElement.scrollWidth")
                assert overflow <= 1400, f"the {listing} list is {overflow} px wide"
            page.goto(live_server.url + reverse("admin:triggers_triggersession_change",
                                                args=[uid]))
            assert page.locator("svg.triggers-graph g.node").count() == 8  # 5 tasks, 3 triggers
            assert "waits for charge_card" in page.locator("svg.triggers-graph").inner_html()
            page.screenshot(path=str(shots / "admin-session.png"), full_page=True)
            page.click('svg.triggers-graph g[data-node="charge_card"]')
            page.wait_for_selector("text=Traceback (most recent call last)")
            assert "ValueError: card declined for order 42" in page.content()
            page.screenshot(path=str(shots / "admin-instance.png"), full_page=True)
            page.fill("#id_kwargs", '{"order_placed": {"order": 42, "card_ok": true}}')
            page.click("input[value='Replay…']")
            page.wait_for_selector("text=Are you sure?")
            page.click("input[value^='Yes, replay']")
            page.wait_for_selector("text=Replayed charge_card#0: charge_card#1 is scheduled.")
        finally:
            browser.close()
    ThreadingTaskRunner.join_all()
    storage = manager.storage
    assert storage["charge_card#1"].status.value == "finished"
    assert storage["send_receipt#0"].status.value == "finished"  # the workflow went on
    assert (shots / "admin-session.png").stat().st_size > 20_000
    assert (shots / "admin-instance.png").stat().st_size > 20_000
    storage.delete()
