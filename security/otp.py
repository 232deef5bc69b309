"""Two-factor login: TOTP authenticators (django-otp) for the console and the API login.

One rule, three places. A user who holds a confirmed authenticator must give its current code
at every login: the API login (`otp` beside the password) and the console's login form alike.
A user whose role is named in OTP_REQUIRED_ROLES ("superuser" for superusers, or a group such as
"security_officer") and who holds none is refused by the API (403 `otp_enrolment_required`)
and, in the console, may open the enrolment page and nothing else until they have enrolled one.
A session that logged in with the password alone while its user now holds an authenticator
(one enrolled since, in another session) counts as logged out.

A code is checked against the user's device row, locked (`select_for_update`), so two
requests with one code run one after the other and the second finds it spent: django-otp's
`last_t` only accepts a time step above the last one used, which is what refuses a replay.
Every code refused counts as a failed login for the lockout (django-axes counts the same
`user_login_failed` signal a wrong password sends), on top of django-otp's own back-off per
device (1, 2, 4, 8... seconds after consecutive failures, whatever address they come from).

Enrolment, every code accepted and every code refused is an audit event. The secret itself is
shown on the enrolment page only (never logged, never in an event or a form value) and the form
field carrying a code is `otp_token`, a name the audit redaction masks.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urlencode

import django_otp
from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.models import AnonymousUser
from django.contrib.auth.signals import user_login_failed
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import resolve_url
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django_otp.oath import TOTP
from django_otp.plugins.otp_totp.models import TOTPDevice
from unfold.forms import AuthenticationForm
from unfold.widgets import BASE_INPUT_CLASSES

from compliance.audit import AuditContext, record_event
from compliance.choices import AuditAction

SUPERUSER = "superuser"
ISSUER = "Bridge"
DEVICE_TYPE = "otp_totp.totpdevice"


class CodeRefused(Exception):
    """A login or enrolment whose one-time code was not accepted; `code` says why, for
    programs: otp_required, otp_invalid, otp_reused, otp_throttled, otp_enrolment_required."""

    def __init__(
        self, message: str, code: str, *, status: int = 401, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.retry_after = retry_after


# --- The rule -------------------------------------------------------------------------------


def required_roles() -> frozenset[str]:
    return frozenset(getattr(settings, "OTP_REQUIRED_ROLES", ()) or ())


def check_required_roles() -> None:
    """Every name in OTP_REQUIRED_ROLES is "superuser" or a role, or the process does not start:
    a misspelt role would silently require nothing."""
    from bridge.roles import Role

    unknown = sorted(required_roles() - {SUPERUSER, *Role.values})
    if unknown:
        known = ", ".join([SUPERUSER, *Role.values])
        raise ImproperlyConfigured(
            f"OTP_REQUIRED_ROLES: unknown role {', '.join(unknown)} (known: {known})"
        )


def is_required_for(user: object) -> bool:
    """Whether `user`'s role obliges them to log in with an authenticator."""
    roles = required_roles()
    if not roles or not getattr(user, "is_authenticated", False) or not user.is_active:
        return False
    if SUPERUSER in roles and user.is_superuser:
        return True
    groups = roles - {SUPERUSER}
    return bool(groups) and user.groups.filter(name__in=groups).exists()


def confirmed_device(user: object) -> TOTPDevice | None:
    """The authenticator `user` enrolled, if any (one per user)."""
    if not getattr(user, "is_authenticated", False):
        return None
    return TOTPDevice.objects.filter(user=user, confirmed=True).order_by("pk").first()


def needs_enrolment(user: object) -> bool:
    return is_required_for(user) and confirmed_device(user) is None


def normalise(code: str | None) -> str:
    """What people type: "123 456" is 123456."""
    return "".join((code or "").split())


# --- Checking a code ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    ok: bool
    reason: str = ""
    retry_after: int | None = None


def _check(device: TOTPDevice, code: str) -> _Outcome:
    """Verify `code` on a locked device row; django-otp moves `last_t` on success and its
    back-off counter on failure, and saves the row either way."""
    allowed, extra = device.verify_is_allowed()
    if not allowed:
        until = (extra or {}).get("locked_until")
        wait = (until - timezone.now()).total_seconds() if until else 1
        return _Outcome(False, "otp_throttled", max(1, int(wait) + 1))
    if device.verify_token(code):
        return _Outcome(True)
    return _Outcome(False, "otp_reused" if _was_used(device, code) else "otp_invalid")


def _was_used(device: TOTPDevice, code: str) -> bool:
    """Whether `code` is right for this device but at a time step already used (a replay)."""
    if not code.isdigit():
        return False
    totp = TOTP(device.bin_key, device.step, device.t0, device.digits, device.drift)
    totp.time = time.time()
    return totp.verify(int(code), device.tolerance) and totp.t() <= device.last_t


_MESSAGES = {
    "otp_invalid": "The authentication code is wrong.",
    "otp_reused": "This authentication code was used already; wait for the next one.",
    "otp_throttled": "Too many wrong authentication codes; wait before trying again.",
}


def _refusal(outcome: _Outcome) -> CodeRefused:
    if outcome.reason == "otp_throttled":
        return CodeRefused(
            _MESSAGES["otp_throttled"], "otp_throttled", status=429, retry_after=outcome.retry_after
        )
    return CodeRefused(_MESSAGES[outcome.reason], outcome.reason)


def check_second_factor(
    *,
    request: HttpRequest,
    user: object,
    username: str,
    code: str | None,
    channel: str,
    enforce_enrolment: bool,
) -> TOTPDevice | None:
    """After the password: the user's authenticator code, when they hold one.

    Returns the device that accepted the code, or None for a user without one (refused with
    `otp_enrolment_required` when `enforce_enrolment` and their role requires one). A code
    refused is audited and counts as a failed login under `username` (django-axes), exactly
    like a wrong password; a missing code does not (the password was right: the client is
    asked for the code).
    """
    device = confirmed_device(user)
    if device is None:
        if enforce_enrolment and is_required_for(user):
            raise CodeRefused(
                "Your role requires two-factor authentication: enrol an authenticator in the "
                "console (Users & groups > Two-factor authentication) first.",
                "otp_enrolment_required",
                status=403,
            )
        return None
    code = normalise(code)
    if not code:
        raise CodeRefused(
            "This account logs in with an authenticator: its current code is required.",
            "otp_required",
        )
    context = AuditContext.from_request(request, user=user)
    with transaction.atomic():
        locked = TOTPDevice.objects.select_for_update().get(pk=device.pk)
        outcome = _check(locked, code)
        details: dict = {"channel": channel}
        if not outcome.ok:
            details.update(reason=outcome.reason, failures=locked.throttling_failure_count)
        record_event(
            action=AuditAction.OTP_VERIFIED if outcome.ok else AuditAction.OTP_FAILED,
            context=context,
            object_type=DEVICE_TYPE,
            object_id=locked.pk,
            details=details,
        )
    if not outcome.ok:
        # Counted by axes like a wrong password (and recorded as a failed login).
        user_login_failed.send(sender=__name__, credentials={"username": username}, request=request)
        raise _refusal(outcome)
    return locked


# --- Enrolment ------------------------------------------------------------------------------


def pending_device(user: object) -> TOTPDevice:
    """The authenticator being enrolled: the same secret until it is confirmed."""
    device = TOTPDevice.objects.filter(user=user, confirmed=False).order_by("-pk").first()
    return device or TOTPDevice.objects.create(user=user, name="Authenticator", confirmed=False)


def secret_of(device: TOTPDevice) -> str:
    """The key as authenticator apps take it typed in: base32, in groups of four."""
    text = base64.b32encode(device.bin_key).decode().rstrip("=")
    return " ".join(text[i : i + 4] for i in range(0, len(text), 4))


def provisioning_uri(device: TOTPDevice) -> str:
    """The otpauth:// URI an authenticator app reads from the QR code."""
    params = {
        "secret": base64.b32encode(device.bin_key).decode().rstrip("="),
        "issuer": ISSUER,
        "algorithm": "SHA1",
        "digits": device.digits,
        "period": device.step,
    }
    label = quote(f"{ISSUER}:{device.user.get_username()}")
    return f"otpauth://totp/{label}?{urlencode(params, quote_via=quote)}"


def qr_data_uri(text: str) -> str:
    """`text` as an SVG QR code in a data: URI (the CSP allows data: images), or "" without
    the qrcode package (the page then shows the secret and the URI only)."""
    try:
        import qrcode
        import qrcode.image.svg
    except ImportError:
        return ""
    image = qrcode.make(text, image_factory=qrcode.image.svg.SvgPathImage, border=2)
    return "data:image/svg+xml;base64," + base64.b64encode(image.to_string()).decode()


def confirm_enrolment(*, request: HttpRequest, device: TOTPDevice, code: str) -> TOTPDevice:
    """Confirm a pending authenticator with a code it shows; the session counts as verified
    by it from now on. Audited (enrolled, or the code refused)."""
    context = AuditContext.from_request(request, user=device.user)
    with transaction.atomic():
        locked = TOTPDevice.objects.select_for_update().get(pk=device.pk)
        if locked.confirmed or confirmed_device(locked.user) is not None:
            raise CodeRefused("An authenticator is enrolled already.", "otp_enrolled")
        outcome = _check(locked, normalise(code))
        if outcome.ok:
            locked.confirmed = True
            locked.save(update_fields=["confirmed"])
            TOTPDevice.objects.filter(user=locked.user, confirmed=False).delete()
            record_event(
                action=AuditAction.OTP_ENROLLED,
                context=context,
                object_type=DEVICE_TYPE,
                object_id=locked.pk,
                details={"device": locked.name, "required": is_required_for(locked.user)},
            )
        else:
            record_event(
                action=AuditAction.OTP_FAILED,
                context=context,
                object_type=DEVICE_TYPE,
                object_id=locked.pk,
                details={"channel": "enrolment", "reason": outcome.reason},
            )
    if not outcome.ok:
        raise _refusal(outcome)
    # A new session key for the raised privilege; the session remembers the device.
    request.session.cycle_key()
    django_otp.login(request, locked)
    return locked


def remove_devices(*, devices: QuerySet[TOTPDevice], context: AuditContext, reason: str) -> int:
    """Remove authenticators (a lost phone): their owners enrol again at the next login when
    their role requires it, or log in with the password alone. One event per owner."""
    with transaction.atomic():
        rows = list(
            TOTPDevice.objects.select_for_update()
            .filter(pk__in=devices.values("pk"))
            .values_list("pk", "user_id")
        )
        TOTPDevice.objects.filter(pk__in=[pk for pk, _ in rows]).delete()
        for user_id in sorted({user_id for _, user_id in rows}):
            record_event(
                action=AuditAction.OTP_REMOVED,
                context=context,
                object_type="security.user",
                object_id=user_id,
                details={
                    "devices": [pk for pk, owner in rows if owner == user_id],
                    "reason": reason,
                },
            )
    return len(rows)


# --- The console ----------------------------------------------------------------------------


_CODE_WIDGET_ATTRS = {
    "autocomplete": "one-time-code",
    "inputmode": "numeric",
    "class": " ".join(BASE_INPUT_CLASSES),
}


class ConsoleLoginForm(AuthenticationForm):
    """unfold's login form plus the authenticator code, asked of users who enrolled one."""

    otp_token = forms.CharField(
        label="Authentication code",
        required=False,
        max_length=16,
        help_text="The 6 digits your authenticator app shows, if you enrolled one.",
        widget=forms.TextInput(attrs=_CODE_WIDGET_ATTRS),
    )

    def clean(self) -> dict:
        cleaned = super().clean()
        user = self.get_user()
        if user is None:
            return cleaned
        try:
            device = check_second_factor(
                request=self.request,
                user=user,
                username=cleaned.get("username", ""),
                code=cleaned.get("otp_token"),
                channel="admin",
                # The console lets such a user in to the enrolment page only (middleware).
                enforce_enrolment=False,
            )
        except CodeRefused as refused:
            raise forms.ValidationError(str(refused), code=refused.code) from None
        if device is not None:
            # django-otp keeps it in the session when the login view logs the user in.
            user.otp_device = device
        return cleaned


class EnrolmentForm(forms.Form):
    otp_token = forms.CharField(
        label="Code from your app",
        max_length=16,
        widget=forms.TextInput(attrs={**_CODE_WIDGET_ATTRS, "autofocus": ""}),
    )


def enrolment_url() -> str:
    return reverse("admin:otp_enrol")


def _next_url(request: HttpRequest) -> str:
    target = request.POST.get("next") or request.GET.get("next") or ""
    if target and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return resolve_url("admin:index")


def enrolment_view(request: HttpRequest, site: object) -> HttpResponse:
    """The console's page for the logged-in user: enrol an authenticator (secret, otpauth
    URI, QR code, confirm with a code), or see the one enrolled."""
    from bridge.admin import utc_text  # (not at import: the admin site imports this module)

    user = request.user
    context = {
        **site.each_context(request),
        "title": "Two-factor authentication",
        "required": is_required_for(user),
        "next": _next_url(request),
    }
    device = confirmed_device(user)
    if device is not None:
        context.update(
            device=device,
            enrolled_at=utc_text(device.created_at),
            last_used_at=utc_text(device.last_used_at),
        )
        return TemplateResponse(request, "security/otp_enrol.html", context)
    pending = pending_device(user)
    form = EnrolmentForm(request.POST if request.method == "POST" else None)
    if form.is_valid():
        try:
            confirm_enrolment(request=request, device=pending, code=form.cleaned_data["otp_token"])
        except CodeRefused as refused:
            form.add_error("otp_token", str(refused))
        else:
            messages.success(request, "Two-factor authentication is on for your account.")
            return HttpResponseRedirect(context["next"])
    uri = provisioning_uri(pending)
    context.update(form=form, secret=secret_of(pending), uri=uri, qr=qr_data_uri(uri))
    return TemplateResponse(request, "security/otp_enrol.html", context)


class SecondFactorMiddleware:
    """Holds console sessions to the rule (after AuthenticationMiddleware and django-otp's
    OTPMiddleware, which marks a session verified by its device).

    - A session not verified by a device while its user holds one counts as anonymous (it
      logged in with the password alone before an authenticator was enrolled elsewhere).
    - A user whose role requires an authenticator and who holds none may open the enrolment
      page, log out, and nothing else: other console pages redirect there, and elsewhere
      (the API with the session cookie, the API docs) the session counts as anonymous.

    Requests without a session cookie (API clients with tokens, probes) pass untouched.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if settings.SESSION_COOKIE_NAME in request.COOKIES:
            redirect = self._enforce(request)
            if redirect is not None:
                return redirect
        return self.get_response(request)

    def _enforce(self, request: HttpRequest) -> HttpResponse | None:
        user = request.user
        if not user.is_authenticated or user.is_verified():
            return None
        if confirmed_device(user) is not None:
            request.user = AnonymousUser()
            return None
        if not is_required_for(user):
            return None
        request.otp_enrolment_pending = True
        admin_root = reverse("admin:index")
        if not request.path.startswith(admin_root):
            request.user = AnonymousUser()
            return None
        allowed = {enrolment_url(), reverse("admin:logout"), reverse("admin:login")}
        if request.path in allowed:
            return None
        target = request.get_full_path() if request.method == "GET" else admin_root
        return HttpResponseRedirect(f"{enrolment_url()}?{urlencode({'next': target})}")
