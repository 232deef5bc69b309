"""The operator console (django-unfold): dashboard panels by permission, event and job pages,
times in UTC, no history on append-only records, and every admin page of every app."""

from __future__ import annotations

import re

import pytest
from axes.models import AccessLog
from django.contrib import admin
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from unfold.admin import ModelAdmin as UnfoldModelAdmin

from bridge import panels
from bridge.choices import JobStatus
from bridge.models import Job
from compliance import chain
from compliance.audit import AuditContext, record_event
from compliance.choices import VERIFY_JOB_KIND
from compliance.models import AuditEvent, AuditVerification
from security.models import TokenFamily
from tests.conftest import make_user

pytestmark = pytest.mark.django_db

SECURITY_FIGURES = ("active sessions", "locked out", "failed logins 24 h", "token thefts 24 h")
UTC_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC")


def console_for(user) -> Client:
    user.is_staff = True
    user.save()
    client = Client()
    client.force_login(user)
    return client


def dashboard(client: Client) -> str:
    response = client.get("/admin/")
    assert response.status_code == 200
    return response.content.decode()


def shown_keys(client: Client) -> set[str]:
    return {shown.panel.key for shown in client.get("/admin/").context["panels"]}


def verification_run(*, ok: bool, checked: int, first_broken_id: int | None = None) -> Job:
    now = timezone.now()
    return AuditVerification.objects.create(
        status=JobStatus.SUCCEEDED,
        started_at=now,
        finished_at=now,
        progress_done=checked,
        progress_total=checked,
        result={"ok": ok, "checked": checked, "first_broken_id": first_broken_id},
    )


# --- Dashboard panels by permission --------------------------------------------------------


def test_a_staff_user_without_a_role_sees_no_security_figures_and_no_compliance_panel():
    client = console_for(make_user("stella"))
    page = dashboard(client)
    assert "panel-compliance" not in page and "panel-security" not in page
    for figure in SECURITY_FIGURES:
        assert figure not in page
    assert "Events per hour" not in page
    assert {"compliance", "security", "platform"}.isdisjoint(shown_keys(client))


def test_a_compliance_officer_sees_the_compliance_panel_but_not_the_security_one(
    compliance_officer,
):
    client = console_for(compliance_officer)
    page = dashboard(client)
    assert 'id="panel-compliance"' in page
    assert "waiting for seal" in page and "last verification" in page
    assert 'id="panel-security"' not in page
    for figure in SECURITY_FIGURES:
        assert figure not in page
    # verifications are jobs this role may see, so the platform panel is there too; auditors
    # read the threat picture and the backup evidence
    assert shown_keys(client) == {
        "compliance",
        "compliance-checkpoints",
        "compliance-gdpr",
        "recovery",
        "platform",
        "threats",
        "backups",
        "backup-durations",
    }


def test_a_security_officer_sees_the_security_panel_and_not_the_audit_trail(security_officer):
    client = console_for(security_officer)
    page = dashboard(client)
    assert 'id="panel-security"' in page
    for figure in SECURITY_FIGURES:
        assert figure in page
    assert 'id="panel-compliance"' not in page


def test_the_superuser_sees_every_panel_with_a_bar_per_hour(admin_user):
    # given three events, sealed, in the current hour
    for _ in range(3):
        record_event(action="custom.x")
    chain.seal_all_pending()
    client = console_for(admin_user)
    # when
    page = dashboard(client)
    # then
    for key in ("compliance", "security", "recovery", "platform"):
        assert f'id="panel-{key}"' in page
    chart = re.search(r'<svg class="bridge-chart".*?</svg>', page, re.S).group(0)
    bars = [int(value) for value in re.findall(r'class="bridge-bar"[^>]*data-value="(\d+)"', chart)]
    assert len(bars) == 24
    assert bars[-1] >= 3 and sum(bars) == bars[-1]  # all of them in the last hour
    assert "00:00" in chart or "01:00" in chart  # hour labels are drawn


def test_the_compliance_panel_counts_sealed_and_waiting_events(admin_user):
    for _ in range(2):
        record_event(action="custom.x")
    chain.seal_all_pending()
    record_event(action="custom.late")
    client = console_for(admin_user)
    content = next(
        shown.content
        for shown in client.get("/admin/").context["panels"]
        if shown.panel.key == "compliance"
    )
    figures = {figure.label: figure.value for figure in content.figures}
    total = AuditEvent.objects.count()
    assert figures["sealed"] == total - 2  # the late event and the login are not sealed yet
    assert figures["waiting for seal"] == 2
    assert figures["events"] == total
    assert figures["last verification"] == "never"


def test_panels_for_returns_only_the_panels_whose_permissions_the_user_holds(
    rf, compliance_officer, monkeypatch
):
    monkeypatch.setattr(panels, "_registry", dict(panels._registry))
    panels.register_panel(
        "backups-test",
        title="Backups",
        permissions=("compliance.view_auditevent", "security.view_user"),
        build=lambda request: panels.PanelContent(),
    )
    compliance_officer.is_staff = True
    request = rf.get("/admin/")
    request.user = compliance_officer
    keys = [panel.key for panel in panels.panels_for(request)]
    assert "backups-test" not in keys  # needs both permissions; the role has one
    assert keys[0] == "compliance"


def test_a_panel_that_cannot_be_built_says_so_and_the_dashboard_still_answers(
    admin_user, monkeypatch
):
    monkeypatch.setattr(panels, "_registry", dict(panels._registry))

    def broken(request):
        raise RuntimeError("boom")

    panels.register_panel("broken-test", title="Broken", build=broken)
    page = dashboard(console_for(admin_user))
    assert 'id="panel-broken-test"' in page
    assert "Could not be built: RuntimeError" in page
    assert 'id="panel-compliance"' in page


def test_figures_links_and_rows_are_filtered_by_their_own_permission(rf, security_officer):
    # a security officer without axes.view_accessattempt sees no lockout figure or link
    from django.contrib.auth.models import Permission

    group = security_officer.groups.get()
    group.permissions.remove(Permission.objects.get(codename="view_accessattempt"))
    client = console_for(security_officer)
    content = next(
        shown.content
        for shown in client.get("/admin/").context["panels"]
        if shown.panel.key == "security"
    )
    assert "locked out" not in {figure.label for figure in content.figures}
    assert "Lockouts" not in {link.label for link in content.links}
    assert "Sessions" in {link.label for link in content.links}


def test_the_sidebar_links_only_what_the_user_may_open(compliance_officer):
    page = dashboard(console_for(compliance_officer))
    assert reverse("admin:compliance_auditevent_changelist") in page
    assert reverse("admin:security_tokenfamily_changelist") not in page
    assert reverse("admin:django_celery_beat_periodictask_changelist") not in page


# --- Pages of records ------------------------------------------------------------------------


def test_an_event_page_shows_its_seq_hash_details_and_whether_it_is_verified(admin_user):
    client = console_for(admin_user)
    event = AuditEvent.objects.get(
        pk=record_event(action="custom.deploy", details={"version": "1.2.3", "ok": True})
    )
    url = reverse("admin:compliance_auditevent_change", args=[event.pk])

    # waiting for seal
    page = client.get(url).content.decode()
    assert "waiting for seal" in page

    # sealed, no verification yet
    chain.seal_all_pending()
    event = AuditEvent.objects.get(pk=event.pk)  # the seal is cached on the instance
    page = client.get(url).content.decode()
    assert event.hash in page and event.prev_hash in page
    assert f">{event.seq}<" in page
    assert "sealed, not yet covered by a verification" in page
    # details pretty-printed, one key per line
    assert '<pre class="bridge-json">{\n  &quot;ok&quot;: true,\n  &quot;version&quot;' in page

    # covered by an intact verification
    verification_run(ok=True, checked=event.seq)
    page = client.get(url).content.decode()
    assert "verified (verification #" in page

    # a later event, sealed after that run, is not covered yet
    later = record_event(action="custom.later")
    chain.seal_all_pending()
    later_page = client.get(reverse("admin:compliance_auditevent_change", args=[later]))
    assert "sealed, not yet covered by a verification" in later_page.content.decode()


def test_an_event_past_a_break_the_verification_found_is_not_verified(admin_user):
    client = console_for(admin_user)
    first, second = record_event(action="custom.a"), record_event(action="custom.b")
    chain.seal_all_pending()
    verification_run(ok=False, checked=AuditEvent.objects.get(pk=first).seq, first_broken_id=second)
    page = client.get(reverse("admin:compliance_auditevent_change", args=[second]))
    assert "NOT verified: verification #" in page.content.decode()
    assert f"broken at event #{second}" in page.content.decode()


def test_append_only_records_have_no_history_button_or_page(admin_user):
    client = console_for(admin_user)
    event = record_event(action="custom.x")
    job = Job.objects.create(kind=VERIFY_JOB_KIND, status=JobStatus.SUCCEEDED)
    family = TokenFamily.objects.create(user=admin_user)
    log = AccessLog.objects.create(username="root", ip_address="10.0.0.1", user_agent="test")
    for name, pk in (
        ("compliance_auditevent", event),
        ("compliance_auditverification", job.pk),
        ("bridge_job", job.pk),
        ("security_tokenfamily", family.pk),
        ("axes_accesslog", log.pk),
    ):
        page = client.get(reverse(f"admin:{name}_change", args=[pk]))
        assert page.status_code == 200, name
        history = reverse(f"admin:{name}_history", args=[pk])
        assert history not in page.content.decode(), name
        assert client.get(history).status_code == 404, name
    # an editable record keeps its history
    user_page = client.get(reverse("admin:security_user_change", args=[admin_user.pk]))
    assert (
        reverse("admin:security_user_history", args=[admin_user.pk]) in user_page.content.decode()
    )


def test_lists_show_times_to_the_second_in_utc(admin_user):
    client = console_for(admin_user)  # the login itself is an event and a last_login
    record_event(action="custom.x")
    Job.objects.create(kind=VERIFY_JOB_KIND, status=JobStatus.SUCCEEDED, finished_at=timezone.now())
    TokenFamily.objects.create(user=admin_user, last_refreshed_at=timezone.now())
    for name in (
        "compliance_auditevent",
        "compliance_auditverification",
        "bridge_job",
        "security_tokenfamily",
        "security_user",
    ):
        page = client.get(reverse(f"admin:{name}_changelist")).content.decode()
        assert UTC_TIME.search(page), name
        # and never Django's locale format without seconds ("Jan. 5, 2026, 3:04 p.m.")
        assert not re.search(r"[ap]\.m\.", page), name


def test_the_event_list_keeps_the_request_id_searchable_but_not_as_a_column(admin_user):
    client = console_for(admin_user)
    wanted = record_event(action="custom.x", context=AuditContext(request_id="req-4711"))
    record_event(action="custom.y", context=AuditContext(request_id="req-other"))
    url = reverse("admin:compliance_auditevent_changelist")
    page = client.get(url)
    headers = [str(header["text"]).lower() for header in page.context["result_headers"]]
    assert "request id" not in headers
    assert headers[:3] == ["id", "time", "actor"]
    found = client.get(url, {"q": "req-4711"}).context["cl"].result_list
    assert [event.pk for event in found] == [wanted]


def test_a_job_page_is_read_only_with_its_parameters_formatted(admin_user):
    client = console_for(admin_user)
    job = Job.objects.create(
        kind=VERIFY_JOB_KIND,
        status=JobStatus.RUNNING,
        params={"source": "admin", "nested": {"a": 1}},
        progress_done=40,
        progress_total=100,
        started_at=timezone.now(),
    )
    page = client.get(reverse("admin:bridge_job_change", args=[job.pk])).content.decode()
    assert 'name="_save"' not in page
    assert "&quot;nested&quot;: {\n    &quot;a&quot;: 1\n  }" in page
    assert "40%" in page


def test_the_job_list_shows_a_running_job_at_40_percent(admin_user):
    client = console_for(admin_user)
    Job.objects.create(
        kind=VERIFY_JOB_KIND, status=JobStatus.RUNNING, progress_done=40, progress_total=100
    )
    page = client.get(reverse("admin:bridge_job_changelist")).content.decode()
    assert 'class="bridge-progress-fill" style="width: 40%"' in page
    assert ">40%<" in page
    assert "Running" in page


def test_the_verification_list_offers_the_button_and_refreshes_while_a_run_is_going(
    compliance_officer,
):
    client = console_for(compliance_officer)
    url = reverse("admin:compliance_auditverification_changelist")
    idle = client.get(url).content.decode()
    assert 'id="verify-now"' in idle
    assert 'http-equiv="refresh"' not in idle
    AuditVerification.objects.create(status=JobStatus.RUNNING, progress_done=1, progress_total=4)
    running = client.get(url).content.decode()
    assert '<meta http-equiv="refresh" content="2">' in running
    assert ">25%<" in running


def test_the_verify_button_starts_a_verification_job(
    compliance_officer, django_capture_on_commit_callbacks
):
    client = console_for(compliance_officer)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(reverse("admin:compliance_auditverification_verify"))
    assert response.status_code == 302
    run = AuditVerification.objects.get()
    assert run.status == JobStatus.SUCCEEDED and run.ok is True


# --- Every page of every app, in unfold ------------------------------------------------------


def test_every_registered_admin_is_an_unfold_model_admin():
    plain = [
        model._meta.label
        for model, model_admin in admin.site._registry.items()
        if not isinstance(model_admin, UnfoldModelAdmin)
    ]
    assert plain == []
    assert {"auth.Group", "axes.AccessLog", "django_celery_beat.PeriodicTask"} <= {
        model._meta.label for model in admin.site._registry
    }


def test_every_changelist_answers_200_for_the_superuser(admin_user):
    client = console_for(admin_user)
    for model in admin.site._registry:
        url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
        assert client.get(url).status_code == 200, url


def test_console_pages_carry_no_inline_script(admin_user):
    # The Content-Security-Policy allows scripts from Bridge's own URLs only.
    client = console_for(admin_user)
    event = record_event(action="custom.x")
    inline = re.compile(r"<script(?![^>]*\bsrc=)(?![^>]*application/json)[^>]*>")
    for url in (
        "/admin/",
        reverse("admin:compliance_auditevent_changelist"),
        reverse("admin:compliance_auditevent_change", args=[event]),
        reverse("admin:compliance_auditverification_changelist"),
        reverse("admin:bridge_job_changelist"),
        reverse("admin:django_celery_beat_periodictask_add"),
    ):
        page = client.get(url).content.decode()
        assert not inline.search(page), url


def test_the_dashboard_says_why_it_is_empty_when_no_panel_is_visible(monkeypatch):
    monkeypatch.setattr(panels, "_registry", {})
    monkeypatch.setattr(panels, "_discovered", True)
    page = dashboard(console_for(make_user("stella")))
    assert 'id="no-panels"' in page
    assert "Ask an administrator" in page
