"""The operator console in a real browser: Debian's Chromium driven by Playwright."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from playwright.sync_api import Page, expect, sync_playwright

from bridge.choices import JobStatus
from bridge.jobs import run_job
from bridge.models import Job
from compliance import verification
from compliance.audit import AuditContext, record_event
from compliance.chain import seal_all_pending
from compliance.choices import VERIFY_JOB_KIND, AuditAction, VerificationSource
from compliance.models import AuditEvent
from security.models import TokenFamily
from tests.conftest import PASSWORD, ROOT, make_user

pytestmark = pytest.mark.services

# Under var/ so a test run never dirties the checkout. The README's images in docs/ are copies:
# BRIDGE_UPDATE_DOCS=1 makes the run refresh them.
SCREENSHOTS = ROOT / "var" / "screenshots"
DOCS = ROOT / "docs"
# The smallest laptop screen the console is designed for.
SCREEN = {"width": 1366, "height": 768}
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
    """A fresh Chromium page on the console, on a 1366x768 screen.

    Playwright's sync API keeps an event loop running in this thread while it is open. Django
    then refuses ORM calls here, and with DJANGO_ALLOW_ASYNC_UNSAFE it would keep those
    connections apart from the thread's own, never closed (PostgreSQL then cannot drop the
    test database). So tests seed before opening the browser and check the data after closing.
    """
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_FLAGS
        )
        context = browser.new_context(viewport=SCREEN)
        context.set_default_timeout(15_000)
        try:
            yield context.new_page()
        finally:
            context.close()
            browser.close()


def log_in(page: Page, base_url: str, username: str, password: str, then: str = "/admin/") -> None:
    page.goto(f"{base_url}{then}")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.press("#id_password", "Enter")


def screenshot(page: Page, name: str) -> Path:
    """A full-page screenshot under var/screenshots (and docs/ with BRIDGE_UPDATE_DOCS=1)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    # The window made as tall as the page first: unfold's sticky footer (pagination, buttons)
    # then sits at the end, where a full-page capture of a short window would paint it mid-page.
    height = page.evaluate("document.documentElement.scrollHeight")
    page.set_viewport_size({"width": SCREEN["width"], "height": max(SCREEN["height"], height)})
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(SCREEN)
    if os.environ.get("BRIDGE_UPDATE_DOCS") == "1":
        shutil.copyfile(path, DOCS / name)
    return path


def assert_png(path: Path) -> None:
    image = path.read_bytes()
    assert image.startswith(PNG_SIGNATURE)
    assert len(image) > 10_000


def figures_of(page: Page, panel: str) -> dict[str, str]:
    """A panel's figures as {label: value}, e.g. {"events": "4", "sealed": "3"}."""
    figures = {}
    for cell in page.locator(f"{panel} .bridge-figure").all():
        label = cell.locator(".bridge-figure-label").inner_text().strip()
        figures[label] = cell.locator(".bridge-figure-value").inner_text().strip()
    return figures


def no_horizontal_overflow(page: Page) -> dict[str, int]:
    """The page's and the result table's widths: nothing may need a horizontal scrollbar."""
    return page.evaluate(
        """() => {
          const table = document.querySelector("#result_list");
          const box = table ? table.parentElement : document.body;
          return {
            page: document.documentElement.scrollWidth,
            table: table ? table.scrollWidth : 0,
            room: box.clientWidth,
          };
        }"""
    )


# unfold's "Filters" button, which slides the filter sheet in.
OPEN_FILTERS = '#changelist a[x-on\\:click="filterOpen = true"]'

API = AuditContext(actor_username="carla", client_ip="203.0.113.7", request_id="a1b2c3d4e5f6")


def seed_a_day_of_events() -> int:
    """Events spread over the last 24 hours (busier in the afternoon), all sealed."""
    now = timezone.now()
    seeded = 0
    for hours_ago in range(24):
        hour = (now - timedelta(hours=hours_ago)).hour
        for n in range(2 + (hour % 7) + (6 if 13 <= hour <= 17 else 0)):
            record_event(
                action=AuditAction.API_REQUEST,
                context=API,
                method="GET" if n % 3 else "POST",
                path="/api/compliance/audit/events?page=2&page_size=100&actor=carla"
                if n % 2
                else "/api/compliance/audit/log",
                status_code=(200, 200, 201, 404, 200, 503)[n % 6],
                latency_ms=3.14159 * (n + 1),
                occurred_at=now - timedelta(hours=hours_ago, minutes=n),
            )
            seeded += 1
    return seeded


def verify_inline() -> None:
    job = verification.start_verification(
        context=AuditContext.system(), source=VerificationSource.SCHEDULE, enqueue=False
    )
    run_job(job.pk, verification.verify_chain_job)


def test_operator_logs_into_the_console_and_sees_the_dashboard(chromium, live_server):
    # given a superuser, a day of audit events, all sealed and verified, and a running job
    make_user("root", superuser=True)
    seeded = seed_a_day_of_events()
    assert seal_all_pending() == seeded
    verify_inline()
    Job.objects.create(
        kind=VERIFY_JOB_KIND, status=JobStatus.RUNNING, progress_done=40, progress_total=100
    )

    with console_page(chromium) as page:
        # when the operator opens the console and logs in
        log_in(page, live_server.url, "root", PASSWORD)

        # then the dashboard shows every area's panel with real content
        expect(page).to_have_url(f"{live_server.url}/admin/")
        expect(page.locator("#site-name")).to_contain_text("Bridge console")
        for panel in ("#panel-compliance", "#panel-security", "#panel-recovery", "#panel-platform"):
            expect(page.locator(panel)).to_be_visible()
        expect(page.locator("#panel-compliance")).to_contain_text("Compliance · audit trail")
        expect(page.locator("#panel-compliance")).to_contain_text("chain intact")
        expect(page.locator("#panel-recovery li", has_text="Database")).to_contain_text("up")
        expect(page.locator("#panel-platform .bridge-progress-text").first).to_have_text("40%")

        # and the audit figures count what was seeded: all sealed, the verification's own
        # events and the login waiting for the sealer
        audit = figures_of(page, "#panel-compliance")
        assert int(audit["sealed"]) == seeded
        assert int(audit["events"]) > seeded
        assert int(audit["waiting for seal"]) == int(audit["events"]) - seeded
        assert audit["last verification"] == "intact"
        assert figures_of(page, "#panel-security")["failed logins 24 h"] == "0"

        # and the chart draws one bar per hour of the last day, each hour with its events
        bars = page.locator("#panel-compliance svg.bridge-chart rect.bridge-bar")
        assert bars.count() == 24
        heights = [float(bar.get_attribute("height")) for bar in bars.all()]
        assert all(height > 0 for height in heights)
        assert len(set(heights)) > 3  # busier hours are taller
        labels = page.locator("#panel-compliance .bridge-chart-labels span").all_inner_texts()
        assert len(labels) == 24
        assert [label for label in labels if label] == labels[2::3]  # every third hour named
        assert labels[-1] == f"{timezone.now():%H}:00"  # the current hour, last

        # and the page fits the screen's width
        assert no_horizontal_overflow(page)["page"] <= SCREEN["width"]
        shot = screenshot(page, "console.png")

    assert_png(shot)


def test_the_event_list_filters_by_action_and_status_class_and_fits_the_screen(
    chromium, live_server
):
    # given a superuser, a day of API requests and a few failed logins
    make_user("root", superuser=True)
    seed_a_day_of_events()
    for _ in range(3):
        record_event(
            action=AuditAction.LOGIN_FAILED,
            status_code=401,
            method="POST",
            path="/api/security/auth/login",
            details={"username": "mallory"},
        )
    seal_all_pending()
    not_found = AuditEvent.objects.filter(action=AuditAction.API_REQUEST, status_code=404).count()

    with console_page(chromium) as page:
        log_in(page, live_server.url, "root", PASSWORD, then="/admin/compliance/auditevent/")

        # then every column fits a 1366 px screen: no horizontal scrollbar, page or table
        expect(page.locator("#result_list")).to_be_visible()
        widths = no_horizontal_overflow(page)
        assert widths["page"] <= SCREEN["width"], widths
        assert widths["table"] <= widths["room"], widths
        # and times say seconds and UTC; long paths are cut, whole in their tooltip
        first_time = page.locator("#result_list td.field-occurred").first.inner_text()
        assert first_time.endswith(" UTC") and first_time.count(":") == 2
        long_path = "/api/compliance/audit/events?page=2&page_size=100&actor=carla"
        cut = page.locator(f'#result_list td.field-short_path span[title="{long_path}"]').first
        assert cut.inner_text().endswith("…") and len(cut.inner_text()) < len(long_path)
        shot = screenshot(page, "console-events.png")

        # when the operator filters by action, then by status class, in the filter sheet
        page.locator(OPEN_FILTERS).click()
        page.get_by_role("link", name="API request", exact=True).click()
        expect(page).to_have_url(
            f"{live_server.url}/admin/compliance/auditevent/?action=api.request"
        )
        page.locator(OPEN_FILTERS).click()
        page.get_by_role("link", name="4xx", exact=True).click()

        # then only the API requests answered 4xx are listed (the 401 logins are not)
        expect(page.locator("#result_list tbody tr")).to_have_count(not_found)
        statuses = page.locator("#result_list td.field-status").all_inner_texts()
        assert {text.strip() for text in statuses} == {"404"}
        assert "status_class=4" in page.url and "action=api.request" in page.url

    assert_png(shot)


def test_an_event_page_shows_its_place_in_the_chain_and_its_details(chromium, live_server):
    # given a sealed, verified event with nested details
    make_user("root", superuser=True)
    event_id = record_event(
        action="custom.deploy",
        context=API,
        object_type="service",
        object_id="billing",
        details={"version": "2.4.1", "changes": {"replicas": [2, 4], "image": "billing:2.4.1"}},
    )
    seal_all_pending()
    verify_inline()
    event = AuditEvent.objects.select_related("seal").get(pk=event_id)
    seq, hash_, prev_hash = event.seq, event.hash, event.prev_hash

    with console_page(chromium) as page:
        log_in(
            page,
            live_server.url,
            "root",
            PASSWORD,
            then=f"/admin/compliance/auditevent/{event_id}/change/",
        )

        # then the page shows the event's seq, hash and previous hash, and that it is verified
        expect(page.locator("[data-field=seq]")).to_have_text(str(seq))
        expect(page.locator("[data-field=hash]")).to_have_text(hash_)
        expect(page.locator("[data-field=prev_hash]")).to_have_text(prev_hash)
        expect(page.locator("[data-field=verified]")).to_contain_text("verified (verification #")
        # and its details as indented JSON, one key per line
        details = page.locator("pre.bridge-json").inner_text()
        assert '  "changes": {\n    "image": "billing:2.4.1",' in details
        # and no History button: the record never changes
        expect(page.get_by_text("History", exact=True)).to_have_count(0)
        assert no_horizontal_overflow(page)["page"] <= SCREEN["width"]
        shot = screenshot(page, "console-event.png")

    assert_png(shot)


def test_a_running_job_shows_its_progress_bar_in_the_job_list(chromium, live_server):
    # given a job 40 % through, and a finished and a failed one
    make_user("root", superuser=True)
    now = timezone.now()
    Job.objects.create(
        kind=VERIFY_JOB_KIND,
        status=JobStatus.SUCCEEDED,
        actor_username="carla",
        progress_done=1200,
        progress_total=1200,
        started_at=now - timedelta(minutes=9),
        finished_at=now - timedelta(minutes=8),
        result={"ok": True, "checked": 1200},
    )
    Job.objects.create(
        kind=VERIFY_JOB_KIND,
        status=JobStatus.FAILED,
        actor_username="carla",
        progress_done=300,
        progress_total=1200,
        started_at=now - timedelta(minutes=5),
        finished_at=now - timedelta(minutes=4),
        error="worker lost: no heartbeat since 2026-01-01 10:00:00 UTC (limit 300 s)",
    )
    running = Job.objects.create(
        kind=VERIFY_JOB_KIND,
        status=JobStatus.RUNNING,
        actor_username="carla",
        progress_done=40,
        progress_total=100,
        started_at=now,
    )

    with console_page(chromium) as page:
        log_in(page, live_server.url, "root", PASSWORD, then="/admin/bridge/job/")

        # then the running job's row shows a bar filled to 40 %
        row = page.locator("#result_list tbody tr", has_text=f"{running.pk}").first
        expect(row.locator(".bridge-progress-text")).to_have_text("40%")
        track = row.locator(".bridge-progress-track").bounding_box()
        fill = row.locator(".bridge-progress-fill").bounding_box()
        assert 0.35 < fill["width"] / track["width"] < 0.45
        expect(row.locator(".field-status_label")).to_contain_text("Running")
        assert no_horizontal_overflow(page)["page"] <= SCREEN["width"]
        shot = screenshot(page, "console-jobs.png")

    assert_png(shot)


def test_every_bridge_list_fits_a_1366_px_screen(chromium, live_server):
    # given rows in every list, with long values where a column can have them
    root = make_user("root", superuser=True)
    seed_a_day_of_events()
    seal_all_pending()
    verify_inline()
    Job.objects.create(
        kind=VERIFY_JOB_KIND,
        status=JobStatus.FAILED,
        actor_username="a-rather-long-user-name",
        error="worker lost: no heartbeat since 2026-01-01 10:00:00 UTC (limit 300 s)",
        result={"reason": "content does not match its hash"},
    )
    TokenFamily.objects.create(user=root, client_ip="2001:db8:85a3::8a2e:370:7334")
    TokenFamily.objects.create(user=root, revoked_at=timezone.now(), revoked_reason="reuse")
    every_minute, _ = IntervalSchedule.objects.get_or_create(every=60, period="seconds")
    PeriodicTask.objects.create(
        name="reap-stale-jobs", task="bridge.tasks.reap_stale_jobs_task", interval=every_minute
    )
    lists = [
        "/admin/compliance/auditevent/",
        "/admin/compliance/auditverification/",
        "/admin/bridge/job/",
        "/admin/security/tokenfamily/",
        "/admin/security/user/",
        "/admin/django_celery_beat/periodictask/",
    ]

    with console_page(chromium) as page:
        log_in(page, live_server.url, "root", PASSWORD)
        expect(page).to_have_url(f"{live_server.url}/admin/")
        for url in lists:
            page.goto(f"{live_server.url}{url}")
            expect(page.locator("#result_list"), url).to_be_visible()
            widths = no_horizontal_overflow(page)
            # then neither the page nor the table needs a horizontal scrollbar
            assert widths["page"] <= SCREEN["width"], (url, widths)
            assert widths["table"] <= widths["room"], (url, widths)


def test_wrong_password_in_the_console_shows_an_error_and_is_audited(chromium, live_server):
    # given a superuser
    make_user("root", superuser=True)

    with console_page(chromium) as page:
        # when someone tries to log into the console with a wrong password
        log_in(page, live_server.url, "root", "not-the-password")

        # then the login page stays, with Django's error note and no dashboard
        expect(page).to_have_url(f"{live_server.url}/admin/login/?next=/admin/")
        error = page.locator(".errornote", has_text="Please enter the correct username")
        expect(error).to_be_visible()
        expect(page.locator("#panel-compliance")).to_have_count(0)

    # and the failure is in the audit trail, naming the username tried, via the admin
    failed = AuditEvent.objects.get(action="auth.login.failed")
    assert failed.details_data["username"] == "root"
    assert failed.details_data["channel"] == "admin"


# Runs before any page script, so it sees every violation of the Content-Security-Policy.
RECORD_CSP_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolations.push(`${event.violatedDirective} ${event.blockedURI}`);
});
"""


def test_console_and_swagger_ui_work_under_the_content_security_policy(chromium, live_server):
    # given a superuser
    make_user("root", superuser=True)

    with console_page(chromium) as page:
        reported = []
        page.on(
            "console",
            lambda message: (
                reported.append(message.text) if "Content Security Policy" in message.text else None
            ),
        )
        page.add_init_script(RECORD_CSP_VIOLATIONS)

        # when the operator logs into the console (Enter: whatever the theme's submit button)
        page.goto(f"{live_server.url}/admin/login/?next=/admin/")
        page.fill("#id_username", "root")
        page.fill("#id_password", PASSWORD)
        page.press("#id_password", "Enter")
        # then the dashboard opens, and nothing on it was blocked
        expect(page).to_have_url(f"{live_server.url}/admin/")
        page.wait_for_load_state("networkidle")
        console_violations = page.evaluate("window.__cspViolations")

        # when the operator opens the API docs
        response = page.goto(f"{live_server.url}/api/docs/")
        # then they are served under the policy, Swagger UI renders the schema, nothing blocked
        assert "script-src 'self'" in response.headers["content-security-policy"]
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("Bridge API")
        expect(page.locator(".swagger-ui .opblock").first).to_be_visible()
        docs_violations = page.evaluate("window.__cspViolations")

    assert console_violations == []
    assert docs_violations == []
    assert reported == []


def test_the_threats_panel_and_the_keys_pages_show_their_state_at_1366_px(
    chromium, live_server, settings
):
    from security import crypto, threats
    from security.choices import ThreatKind
    from security.models import DataKey, StoredSecret, ThreatEvent

    # given threat events of every layer over the day, an address scored to a ban, and keys
    settings.ENABLE_DDOS_PROTECTION = True
    make_user("root", superuser=True)
    analyst = make_user("analyst")
    kinds = [
        ThreatKind.OVER_LIMIT,
        ThreatKind.LOGIN_FAILED,
        ThreatKind.SQL_INJECTION,
        ThreatKind.PATH_TRAVERSAL,
        ThreatKind.DECRYPT_VOLUME,
    ]
    for n in range(30):
        event = threats.record(kind=kinds[n % len(kinds)], network="198.51.100.0", path="/x")
        ThreatEvent.objects.filter(pk=event.pk).update(
            occurred_at=timezone.now() - timedelta(hours=n % 20, minutes=n)
        )
    for _ in range(6):
        threats.record(kind=ThreatKind.SQL_INJECTION, network="203.0.113.0", path="/api/?q=1")
    threats.record(kind=ThreatKind.DECRYPT_VOLUME, user_id=analyst.pk, network="192.0.2.0")
    StoredSecret.objects.create(name="offsite-sftp", kind="backup_target", value="pw")
    crypto.encrypt(b"x", purpose="api")
    DataKey.objects.filter(purpose="api").update(created_at=timezone.now() - timedelta(days=400))

    with console_page(chromium) as page:
        log_in(page, live_server.url, "root", PASSWORD)
        expect(page).to_have_url(f"{live_server.url}/admin/")
        panel = page.locator("#panel-threats")
        # then the panel names the level, the ban and the top offender, with a chart
        expect(panel).to_contain_text("Critical")
        expect(panel).to_contain_text("203.0.113.0")
        expect(panel.locator("svg").first).to_be_visible()
        figures = figures_of(page, "#panel-threats")
        assert figures["banned now"] == "2", figures  # both addresses reached the ban score
        panel.scroll_into_view_if_needed()
        threats_shot = screenshot(page, "console-threats.png")

        # and the keys page shows each key's age, the old one flagged, and the rotate action
        page.goto(f"{live_server.url}/admin/security/datakey/")
        expect(page.locator("#result_list")).to_contain_text("400 d")
        expect(page.locator("#result_list")).to_contain_text("current master key")
        keys_shot = screenshot(page, "console-keys.png")
        for url in (
            "/admin/security/datakey/",
            "/admin/security/storedsecret/",
            "/admin/security/threatevent/",
            "/admin/security/ipactivity/",
            "/admin/security/useractivity/",
        ):
            page.goto(f"{live_server.url}{url}")
            expect(page.locator("#result_list"), url).to_be_visible()
            widths = no_horizontal_overflow(page)
            assert widths["page"] <= SCREEN["width"], (url, widths)
            assert widths["table"] <= widths["room"], (url, widths)

    assert_png(threats_shot)
    assert_png(keys_shot)


def test_the_backups_panel_and_list_show_age_rule_drill_and_copies_at_1366_px(
    chromium, live_server, settings
):
    from pathlib import Path

    from backups import services
    from backups.models import Backup
    from bridge.jobs import run_job

    # given a few real backups of some files and a drill
    make_user("root", superuser=True)
    media = Path(settings.MEDIA_ROOT)
    media.mkdir(parents=True, exist_ok=True)
    for n in range(4):
        (media / f"file-{n}.bin").write_bytes(bytes(range(256)) * (200 * (n + 1)))
        backup = services.start_backup(
            kind="full" if n == 0 else "incremental",
            context=AuditContext.system(),
            components=["uploads", "config"],
            enqueue=False,
        )
        run_job(backup.job_id, services.run_backup_job)
    drill = services.start_drill(context=AuditContext.system(), enqueue=False)
    run_job(drill.job_id, services.run_restore_job)
    assert Backup.objects.filter(status="succeeded").count() == 4

    with console_page(chromium) as page:
        log_in(page, live_server.url, "root", PASSWORD)
        expect(page).to_have_url(f"{live_server.url}/admin/")
        panel = page.locator("#panel-backups")
        # then the panel says the newest backup is fresh, 3-2-1 violated (no offsite), drill ok
        expect(panel).to_contain_text("newest backup age")
        expect(panel).to_contain_text("last drill")
        figures = figures_of(page, "#panel-backups")
        assert figures["3-2-1"] == "violated", figures
        assert figures["last drill"] == "passed", figures
        expect(panel.locator("svg").first).to_be_visible()
        panel.scroll_into_view_if_needed()
        panel_shot = screenshot(page, "console-backups-panel.png")
        # and the list shows coloured status, sizes and the 3-2-1 state, fitting the screen
        page.goto(f"{live_server.url}/admin/backups/backup/")
        expect(page.locator("#result_list")).to_contain_text("Succeeded")
        expect(page.locator("#result_list")).to_contain_text("violated")
        list_shot = screenshot(page, "console-backups.png")
        for url in (
            "/admin/backups/backup/",
            "/admin/backups/restorejob/",
            "/admin/backups/walsegment/",
        ):
            page.goto(f"{live_server.url}{url}")
            widths = no_horizontal_overflow(page)
            assert widths["page"] <= SCREEN["width"], (url, widths)
            assert widths["table"] <= widths["room"], (url, widths)
    assert panel_shot.stat().st_size > 10_000 and list_shot.stat().st_size > 10_000
