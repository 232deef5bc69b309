"""Two-factor login with TOTP authenticators: enrolment in the console, the code at the API
and console logins, replays and wrong codes refused (and counted by the lockout), and the
roles that must enrol before they can do anything else."""

from __future__ import annotations

import re
from base64 import b32decode, b32encode
from concurrent.futures import ThreadPoolExecutor

import pytest
from axes.models import AccessAttempt
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django_otp.oath import totp
from django_otp.plugins.otp_totp.models import TOTPDevice
from rest_framework.test import APIClient

from compliance.models import AuditEvent
from compliance.personal import revealed
from compliance.redaction import redact_text
from security.models import TokenFamily, User
from tests.conftest import PASSWORD, make_user
from tests.http import call
from tests.test_settings import load_settings

LOGIN = "/api/security/auth/login"
EVENTS = "/api/compliance/audit/events"
ADMIN_LOGIN = "/admin/login/"
ENROL = "/admin/account/two-factor/"


@pytest.fixture
def required(settings) -> None:
    """Production's default: superusers and security officers must use an authenticator."""
    settings.OTP_REQUIRED_ROLES = ["superuser", "security_officer"]


def enrolled(user: User) -> TOTPDevice:
    """A confirmed authenticator for `user`, as the enrolment page leaves it."""
    return TOTPDevice.objects.create(user=user, name="Authenticator", confirmed=True)


def code_for(device: TOTPDevice, steps_ahead: int = 0) -> str:
    """What the user's app shows now (or `steps_ahead` 30-second steps later)."""
    device.refresh_from_db()
    token = totp(
        device.bin_key,
        step=device.step,
        t0=device.t0,
        digits=device.digits,
        drift=device.drift + steps_ahead,
    )
    return f"{token:0{device.digits}d}"


def wrong_code(device: TOTPDevice) -> str:
    right = {code_for(device, offset) for offset in (-1, 0, 1)}
    return next(code for code in ("000000", "111111", "222222", "333333") if code not in right)


def api_login(username: str, otp: str | None = None, password: str = PASSWORD):
    body = {"username": username, "password": password}
    if otp is not None:
        body["otp"] = otp
    return APIClient().post(LOGIN, body, format="json")


def audit_text() -> str:
    return "".join(AuditEvent.objects.values_list("details", flat=True))


def staff(user: User) -> User:
    user.is_staff = True
    user.save()
    return user


def console_login(client: Client, username: str, otp: str = "", password: str = PASSWORD):
    return client.post(
        f"{ADMIN_LOGIN}?next=/admin/",
        {"username": username, "password": password, "otp_token": otp},
    )


# --- Enrolment in the console ---------------------------------------------------------------


@pytest.mark.django_db
def test_enrolment_shows_the_secret_and_a_qr_code_and_a_right_code_turns_it_on(operator):
    # given a staff user on their two-factor page
    client = Client()
    client.force_login(staff(operator))
    page = client.get(ENROL)
    assert page.status_code == 200
    device = TOTPDevice.objects.get(user=operator, confirmed=False)
    secret = b32encode(device.bin_key).decode()
    html = page.content.decode()
    assert page.context["secret"].replace(" ", "") == secret
    assert f"otpauth://totp/Bridge%3Aolivia?secret={secret}&amp;issuer=Bridge" in html
    assert 'src="data:image/svg+xml;base64,' in html
    assert "no-store" in page["Cache-Control"]
    # and a reload shows the same secret, not a new one
    assert client.get(ENROL).context["secret"] == page.context["secret"]

    # when a wrong code is sent, then it stays off and the refusal is audited
    refused = client.post(ENROL, {"otp_token": wrong_code(device)})
    assert refused.status_code == 200
    assert "The authentication code is wrong." in refused.content.decode()
    device.refresh_from_db()
    assert not device.confirmed
    failed = AuditEvent.objects.get(action="auth.otp.failed")
    assert failed.details_data == {"channel": "enrolment", "reason": "otp_invalid"}

    # when the code the app shows is sent (after django-otp's 1 s back-off)
    TOTPDevice.objects.filter(pk=device.pk).update(throttling_failure_count=0)
    confirmed = client.post(ENROL, {"otp_token": code_for(device), "next": "/admin/"})

    # then two-factor is on, the session is verified by it and the enrolment is audited
    assert confirmed.status_code == 302 and confirmed["Location"] == "/admin/"
    device.refresh_from_db()
    assert device.confirmed
    event = AuditEvent.objects.get(action="auth.otp.enrolled")
    assert (revealed(event).actor_username, event.object_id) == ("olivia", str(device.pk))
    status = client.get(ENROL).content.decode()
    assert 'id="otp-enrolled"' in status and secret not in status
    # and the secret is in no audit record (the codes sent are masked in the request events)
    assert secret not in audit_text() and device.key not in audit_text()
    sent = AuditEvent.objects.filter(action="admin.request", path=ENROL).first()
    assert sent.details_data["form"]["otp_token"] == "[REDACTED]"


@pytest.mark.django_db
def test_the_secret_is_never_shown_on_the_authenticators_page(admin_user, operator):
    device = enrolled(operator)
    client = Client()
    client.force_login(staff(admin_user))
    changelist = client.get(reverse("admin:otp_totp_totpdevice_changelist"))
    detail = client.get(reverse("admin:otp_totp_totpdevice_change", args=[device.pk]))
    assert changelist.status_code == detail.status_code == 200
    for page in (changelist, detail):
        assert device.key not in page.content.decode()
        assert b32encode(device.bin_key).decode() not in page.content.decode()
    assert client.get(reverse("admin:otp_totp_totpdevice_add")).status_code == 403


# --- The API login --------------------------------------------------------------------------


@pytest.mark.django_db
def test_api_login_of_a_user_with_an_authenticator_needs_its_code(operator):
    # given
    device = enrolled(operator)
    # when the code is left out, then the password alone is not enough
    missing = api_login("olivia")
    assert (missing.status_code, missing.json()["code"]) == (401, "otp_required")
    assert not TokenFamily.objects.exists()
    # when the code the app shows is sent, then tokens
    code = code_for(device)
    answered = api_login("olivia", code)
    assert answered.status_code == 200
    assert set(answered.json()) == {"access", "refresh"}
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {answered.json()['access']}")
    assert client.get("/api/jobs").status_code == 200
    # and the verification is audited, without the code
    verified = AuditEvent.objects.get(action="auth.otp.verified")
    shown = revealed(verified)
    assert (shown.actor_username, shown.details) == ("olivia", {"channel": "api"})
    login = AuditEvent.objects.get(action="auth.login.succeeded")
    assert login.details_data == {"channel": "api", "second_factor": "totp"}
    sent = AuditEvent.objects.filter(action="api.request", path=LOGIN).order_by("-id").first()
    assert sent.details_data["body"]["otp"] == "[REDACTED]"
    assert code not in audit_text()


@pytest.mark.django_db
def test_a_code_is_accepted_once_and_its_replay_is_refused(operator):
    # given a login with the current code
    device = enrolled(operator)
    code = code_for(device)
    assert api_login("olivia", code).status_code == 200
    # when the same code is sent again
    replayed = api_login("olivia", code)
    # then it is refused as spent, and counted as a failed login
    assert (replayed.status_code, replayed.json()["code"]) == (401, "otp_reused")
    assert AccessAttempt.objects.get(username="olivia").failures_since_start == 1
    assert AuditEvent.objects.get(action="auth.otp.failed").details_data["reason"] == "otp_reused"
    # and the app's next code works (after the back-off of one failure)
    TOTPDevice.objects.filter(pk=device.pk).update(throttling_failure_count=0)
    assert api_login("olivia", code_for(device, steps_ahead=1)).status_code == 200


@pytest.mark.django_db
def test_a_wrong_code_is_refused_and_counted_like_a_wrong_password(operator):
    device = enrolled(operator)
    refused = api_login("olivia", wrong_code(device))
    assert (refused.status_code, refused.json()["code"]) == (401, "otp_invalid")
    assert not TokenFamily.objects.exists()
    assert AccessAttempt.objects.get(username="olivia").failures_since_start == 1
    failed = AuditEvent.objects.get(action="auth.otp.failed")
    assert failed.details_data == {"channel": "api", "reason": "otp_invalid", "failures": 1}
    assert AuditEvent.objects.filter(action="auth.login.failed").count() == 1


@pytest.mark.django_db
def test_wrong_codes_lock_the_account_out_and_then_even_the_right_code_is_refused(
    operator, settings
):
    # given only the lockout counting (django-otp's own back-off off)
    settings.OTP_TOTP_THROTTLE_FACTOR = 0
    device = enrolled(operator)
    limit = settings.AXES_FAILURE_LIMIT
    # when wrong codes are sent up to the limit
    statuses = [api_login("olivia", wrong_code(device)).status_code for _ in range(limit)]
    # then each is refused and the last one locks the account out for this address
    assert statuses == [401] * (limit - 1) + [429]
    # and then the right password with the right code is refused too, the code left unspent
    right = api_login("olivia", code_for(device))
    assert (right.status_code, right.json()["code"]) == (429, "locked_out")
    assert int(right["Retry-After"]) > 0
    device.refresh_from_db()
    assert device.last_t == -1
    assert not TokenFamily.objects.exists()
    assert AuditEvent.objects.filter(action="auth.lockout").exists()


@pytest.mark.django_db
def test_right_after_a_wrong_code_the_authenticator_backs_off(operator):
    device = enrolled(operator)
    assert api_login("olivia", wrong_code(device)).status_code == 401
    throttled = api_login("olivia", code_for(device))
    assert (throttled.status_code, throttled.json()["code"]) == (429, "otp_throttled")
    assert int(throttled["Retry-After"]) >= 1


@pytest.mark.django_db
def test_a_wrong_password_with_the_right_code_is_invalid_credentials_and_spends_no_code(operator):
    device = enrolled(operator)
    refused = api_login("olivia", code_for(device), password="not-the-password")
    assert refused.json()["code"] == "invalid_credentials"
    device.refresh_from_db()
    assert device.last_t == -1 and device.throttling_failure_count == 0


@pytest.mark.django_db
def test_required_roles_without_an_authenticator_are_refused_by_the_api(
    required, admin_user, security_officer, operator, settings
):
    for username in ("root", "sam"):
        refused = api_login(username)
        assert (refused.status_code, refused.json()["code"]) == (403, "otp_enrolment_required")
    # an operator's role does not require one
    assert api_login("olivia").status_code == 200
    # with an authenticator, the code is enough
    assert api_login("sam", code_for(enrolled(security_officer))).status_code == 200
    # and with the setting empty nobody must enrol
    settings.OTP_REQUIRED_ROLES = []
    assert api_login("root").status_code == 200


def test_parallel_logins_with_one_code_let_exactly_one_through(server):
    # given
    device = enrolled(make_user("race"))
    body = {"username": "race", "password": PASSWORD, "otp": code_for(device)}
    # when eight clients send the same code at once
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: call("POST", f"{server}{LOGIN}", body), range(8)))
    # then the device row is locked while a code is checked: one login, seven refusals (the
    # code spent, then django-otp's back-off, then the lockout those failures add up to)
    statuses = [reply.status for reply in replies]
    assert statuses.count(200) == 1
    assert {reply.body["code"] for reply in replies if reply.status != 200} <= {
        "otp_reused",
        "otp_throttled",
        "locked_out",
    }
    assert AuditEvent.objects.filter(action="auth.otp.verified").count() == 1


# --- The console login ----------------------------------------------------------------------


@pytest.mark.django_db
def test_console_login_asks_users_with_an_authenticator_for_its_code(operator):
    # given
    device = enrolled(staff(operator))
    client = Client()
    # when the code is left out, then the login page stays and says so
    missing = console_login(client, "olivia")
    assert missing.status_code == 200
    assert "its current code is required" in missing.content.decode()
    assert client.get("/admin/").status_code == 302
    # when a wrong one is sent, then it is refused and counted
    wrong = console_login(client, "olivia", wrong_code(device))
    assert "The authentication code is wrong." in wrong.content.decode()
    assert AccessAttempt.objects.get(username="olivia").failures_since_start == 1
    assert AuditEvent.objects.get(action="auth.otp.failed").details_data["channel"] == "admin"
    # when the right one is sent (after the back-off), then the console opens
    TOTPDevice.objects.filter(pk=device.pk).update(throttling_failure_count=0)
    code = code_for(device)
    answered = console_login(client, "olivia", code)
    assert answered.status_code == 302 and answered["Location"] == "/admin/"
    assert client.get("/admin/").status_code == 200
    assert client.session["otp_device_id"] == device.persistent_id
    verified = AuditEvent.objects.get(action="auth.otp.verified")
    assert verified.details_data == {"channel": "admin"}
    # and the code is in no record (the form's values are masked, axes keeps none)
    assert code not in audit_text()
    assert all(code not in attempt.post_data for attempt in AccessAttempt.objects.all())


@pytest.mark.django_db
def test_console_wrong_codes_up_to_the_limit_show_the_lockout_page(operator, settings):
    settings.OTP_TOTP_THROTTLE_FACTOR = 0
    device = enrolled(staff(operator))
    client = Client()
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert console_login(client, "olivia", wrong_code(device)).status_code == 200
    assert console_login(client, "olivia", wrong_code(device)).status_code == 429
    assert console_login(client, "olivia", code_for(device)).status_code == 429
    assert client.get("/admin/").status_code == 302


@pytest.mark.django_db
def test_a_required_role_without_an_authenticator_is_sent_to_enrolment_and_nowhere_else(
    required, admin_user
):
    # given the superuser logs in to the console with the password alone
    client = Client()
    response = console_login(client, "root")
    assert response.status_code == 302
    # then every console page sends them to enrolment, coming back afterwards
    dashboard = client.get("/admin/")
    assert dashboard.status_code == 302
    assert dashboard["Location"] == f"{ENROL}?next=%2Fadmin%2F"
    for url in (
        reverse("admin:compliance_auditevent_changelist"),
        reverse("admin:security_user_changelist"),
        reverse("admin:otp_totp_totpdevice_changelist"),
    ):
        assert client.get(url)["Location"].startswith(f"{ENROL}?next="), url
    assert client.post(reverse("admin:security_user_changelist"), {})["Location"].startswith(ENROL)
    # and the session opens no API either
    assert client.get(EVENTS).status_code in (401, 403)
    assert client.get("/api/docs/")["Location"].startswith(ADMIN_LOGIN)
    # while the enrolment page shows, without the sidebar's links
    page = client.get(ENROL)
    assert page.status_code == 200
    assert 'id="otp-required"' in page.content.decode()
    assert reverse("admin:compliance_auditevent_changelist") not in page.content.decode()

    # when they enrol
    device = TOTPDevice.objects.get(user=admin_user, confirmed=False)
    enrol = client.post(ENROL, {"otp_token": code_for(device), "next": "/admin/"})

    # then they are back where they were going, and the console is theirs
    assert enrol.status_code == 302 and enrol["Location"] == "/admin/"
    assert client.get("/admin/").status_code == 200
    assert client.get(reverse("admin:compliance_auditevent_changelist")).status_code == 200
    assert client.get(EVENTS).status_code == 200
    # and from now on both logins ask for the code
    assert api_login("root").json()["code"] == "otp_required"
    assert api_login("root", code_for(device, steps_ahead=1)).status_code == 200


@pytest.mark.django_db
def test_a_required_role_may_still_log_out_before_enrolling(required, security_officer):
    client = Client()
    console_login(client, staff(security_officer).username)
    assert client.get("/admin/")["Location"].startswith(ENROL)
    assert client.post(reverse("admin:logout")).status_code == 200
    assert client.get("/admin/")["Location"].startswith(ADMIN_LOGIN)


@pytest.mark.django_db
def test_a_session_from_before_an_authenticator_was_enrolled_counts_as_logged_out(operator):
    # given a session that logged in with the password alone
    client = Client()
    client.force_login(staff(operator))
    assert client.get("/admin/").status_code == 200
    # when an authenticator is enrolled (in another session)
    enrolled(operator)
    # then this session must log in again, with the code
    assert client.get("/admin/")["Location"].startswith(ADMIN_LOGIN)
    assert client.get(EVENTS).status_code in (401, 403)


@pytest.mark.services
def test_in_a_browser_the_first_admin_enrols_after_logging_in_then_logs_in_with_a_code(
    required, chromium, live_server
):
    from playwright.sync_api import expect

    from tests.test_browser import assert_png, console_page, log_in, screenshot

    # given the first admin, as `ensure_admin` makes it, with no authenticator yet
    make_user("root", superuser=True)
    with console_page(chromium) as page:
        # when they log in with the password alone
        log_in(page, live_server.url, "root", PASSWORD)
        # then the console opens on its two-factor page, QR code and secret shown
        expect(page).to_have_url(f"{live_server.url}{ENROL}?next=%2Fadmin%2F")
        expect(page.locator("#otp-required")).to_be_visible()
        expect(page.locator("#otp-qr")).to_be_visible()
        assert page.locator("#otp-qr").evaluate("image => image.naturalWidth") > 0
        assert_png(screenshot(page, "console-two-factor-enrolment.png"))
        # and every other page leads back there
        page.goto(f"{live_server.url}/admin/compliance/auditevent/")
        expect(page).to_have_url(re.compile(re.escape(f"{live_server.url}{ENROL}?next=")))
        # when they scan it (read the secret) and confirm with the code the app shows
        secret = page.locator("#otp-secret").inner_text().replace(" ", "")
        key = b32decode(secret + "=" * (-len(secret) % 8))
        page.fill("#id_otp_token", f"{totp(key):06d}")
        page.click("#otp-confirm")
        # then they are where they were going
        expect(page).to_have_url(f"{live_server.url}/admin/compliance/auditevent/")
        # and the next login asks for the code (the next step's: this one is spent)
        page.context.clear_cookies()
        page.goto(f"{live_server.url}/admin/login/?next=/admin/")
        page.fill("#id_username", "root")
        page.fill("#id_password", PASSWORD)
        page.fill("#id_otp_token", f"{totp(key, drift=1):06d}")
        assert_png(screenshot(page, "console-login-with-code.png"))
        page.press("#id_otp_token", "Enter")
        expect(page).to_have_url(f"{live_server.url}/admin/")
        expect(page.locator("#panel-security")).to_be_visible()


# --- Lost authenticators, settings, redaction -----------------------------------------------


@pytest.mark.django_db
def test_a_security_officer_removes_a_lost_authenticator_and_its_owner_enrols_again(
    required, admin_user, security_officer
):
    # given the superuser's authenticator
    device = enrolled(admin_user)
    officer = Client()
    officer.force_login(staff(security_officer))
    enrolled_officer = enrolled(security_officer)
    session = officer.session
    session["otp_device_id"] = enrolled_officer.persistent_id
    session.save()
    # when the security officer removes it in the console
    url = reverse("admin:otp_totp_totpdevice_delete", args=[device.pk])
    assert officer.post(url, {"post": "yes"}).status_code == 302
    # then it is gone, audited, and its owner must enrol again
    assert not TOTPDevice.objects.filter(pk=device.pk).exists()
    removed = AuditEvent.objects.get(action="auth.otp.removed")
    assert (revealed(removed).actor_username, removed.object_id) == ("sam", str(admin_user.pk))
    assert api_login("root").json()["code"] == "otp_enrolment_required"


@pytest.mark.django_db
def test_reset_otp_removes_an_authenticator_from_the_command_line(admin_user):
    enrolled(admin_user)
    call_command("reset_otp", "root", "--reason", "phone lost")
    assert not TOTPDevice.objects.filter(user=admin_user).exists()
    removed = AuditEvent.objects.get(action="auth.otp.removed")
    assert removed.details_data["reason"] == "phone lost"


def test_production_requires_an_authenticator_of_superusers_and_security_officers(tmp_path):
    shown = load_settings(tmp_path, show="OTP_REQUIRED_ROLES")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "['superuser', 'security_officer']"
    off = load_settings(tmp_path, show="OTP_REQUIRED_ROLES", OTP_REQUIRED_ROLES="")
    assert off.stdout.strip() == "[]"


def test_a_misspelt_role_in_otp_required_roles_refuses_to_start(tmp_path):
    result = load_settings(tmp_path, OTP_REQUIRED_ROLES="superuser,security_oficer")
    assert result.returncode != 0
    assert "OTP_REQUIRED_ROLES: unknown role security_oficer" in result.stderr


def test_an_authenticators_provisioning_uri_is_masked_in_audit_text():
    text = "scanned otpauth://totp/Bridge%3Aroot?secret=JBSWY3DPEHPK3PXP&issuer=Bridge"
    assert redact_text(text) == (
        "scanned otpauth://totp/Bridge%3Aroot?secret=[REDACTED]&issuer=Bridge"
    )
