"""The operator console in a real browser: Debian's Chromium driven by Playwright."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from compliance.models import AuditEvent
from compliance.services import record_event, seal_all_pending
from tests.conftest import PASSWORD, ROOT, make_user

pytestmark = pytest.mark.services

# Under var/ so a test run never dirties the checkout; docs/console.png is a copy of it.
SCREENSHOT = ROOT / "var" / "screenshots" / "console.png"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@contextmanager
def console_page(chromium: str) -> Iterator[Page]:
    """A fresh Chromium page on the console.

    Playwright's sync API keeps an event loop running in this thread while it is open. Django
    then refuses ORM calls here, and with DJANGO_ALLOW_ASYNC_UNSAFE it would keep those
    connections apart from the thread's own, never closed (PostgreSQL then cannot drop the
    test database). So tests seed before opening the browser and check the data after closing.
    """
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_FLAGS
        )
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(15_000)
        try:
            yield context.new_page()
        finally:
            context.close()
            browser.close()


def log_in(page: Page, base_url: str, username: str, password: str) -> None:
    page.goto(f"{base_url}/admin/")
    expect(page).to_have_url(f"{base_url}/admin/login/?next=/admin/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("input[type=submit]")


def figures_of(page: Page, panel: str) -> dict[str, int]:
    """A panel's figures as {label: number}, e.g. {"events": 4, "sealed": 3}."""
    cells = page.locator(f"{panel} .bridge-figures > div").all()
    figures = {}
    for cell in cells:
        number = cell.locator("b").inner_text().strip()
        label = cell.inner_text().strip().removeprefix(number).strip()
        figures[label] = int(number)
    return figures


def test_operator_logs_into_the_console_and_sees_the_dashboard(chromium, live_server):
    # given a superuser and a few audit events, all sealed into the chain
    make_user("root", superuser=True)
    seeded = 3
    for _ in range(seeded):
        record_event(action="custom.x")
    assert seal_all_pending() == seeded

    with console_page(chromium) as page:
        # when the operator opens the console and logs in
        log_in(page, live_server.url, "root", PASSWORD)

        # then the dashboard shows its three panels with real content
        expect(page).to_have_url(f"{live_server.url}/admin/")
        expect(page.locator("#site-name")).to_contain_text("Bridge console")
        for panel in ("#panel-compliance", "#panel-security", "#panel-recovery"):
            expect(page.locator(panel)).to_be_visible()
        expect(page.locator("#panel-compliance")).to_contain_text("Compliance · audit trail")
        expect(page.locator("#panel-compliance")).to_contain_text("events")
        expect(page.locator("#panel-security")).to_contain_text("active sessions")
        expect(page.locator("#panel-recovery")).to_contain_text("Database")
        expect(page.locator("#panel-recovery li", has_text="Database")).to_contain_text("up")

        # and the audit figures count what was seeded: all sealed, and the login still unsealed
        audit = figures_of(page, "#panel-compliance")
        assert audit["sealed"] == seeded
        assert audit["events"] > seeded
        assert audit["unsealed"] == audit["events"] - seeded
        assert figures_of(page, "#panel-security")["failed logins 24 h"] == 0

        # and the chart draws one bar per hour of the last day
        assert page.locator("#panel-compliance svg.bridge-chart rect").count() == 24

        # and a full-page screenshot is saved for the README
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)

    image = SCREENSHOT.read_bytes()
    assert image.startswith(PNG_SIGNATURE)
    assert len(image) > 10_000


def test_wrong_password_in_the_console_shows_an_error_and_is_audited(chromium, live_server):
    # given a superuser
    make_user("root", superuser=True)

    with console_page(chromium) as page:
        # when someone tries to log into the console with a wrong password
        log_in(page, live_server.url, "root", "not-the-password")

        # then the login page stays, with Django's error note and no dashboard
        expect(page).to_have_url(f"{live_server.url}/admin/login/?next=/admin/")
        expect(page.locator(".errornote")).to_be_visible()
        expect(page.locator(".errornote")).to_contain_text("Please enter the correct username")
        expect(page.locator("#panel-compliance")).to_have_count(0)

    # and the failure is in the audit trail, naming the username tried, via the admin
    failed = AuditEvent.objects.get(action="auth.login.failed")
    assert failed.details_data["username"] == "root"
    assert failed.details_data["channel"] == "admin"
