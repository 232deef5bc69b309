"""Token lifetimes from settings, the client-IP resolver as lockout and audit see it, and the
shape of refusals."""

from __future__ import annotations

import ipaddress
from datetime import timedelta

import pytest
from django.test import override_settings
from rest_framework_simplejwt.tokens import AccessToken, RefreshToken

from compliance.models import AuditEvent
from tests.conftest import PASSWORD, login, make_user

LOGIN = "/api/security/auth/login"
PROXY = [ipaddress.ip_network("127.0.0.0/8")]


@pytest.mark.django_db
def test_tokens_live_as_long_as_the_settings_say(anon_api):
    from django.conf import settings

    make_user("timer")
    tokens = login(anon_api, "timer")
    access, refresh = AccessToken(tokens["access"]), RefreshToken(tokens["refresh"])
    assert timedelta(seconds=access["exp"] - access["iat"]) == settings.JWT_EXPIRATION
    assert timedelta(seconds=refresh["exp"] - refresh["iat"]) == settings.JWT_REFRESH_EXPIRATION
    # the defaults the issue names: 15 minutes and one day
    assert settings.JWT_EXPIRATION == timedelta(minutes=15)
    assert settings.JWT_REFRESH_EXPIRATION == timedelta(days=1)


def _wrong(client, forwarded: str | None = None):
    extra = {"HTTP_X_FORWARDED_FOR": forwarded} if forwarded else {}
    return client.post(LOGIN, {"username": "fox", "password": "nope"}, format="json", **extra)


@pytest.mark.django_db
def test_a_forged_forwarded_for_does_not_escape_a_lockout(anon_api):
    # given no trusted proxy (the default) and a client rotating X-Forwarded-For
    make_user("fox")
    statuses = [_wrong(anon_api, f"203.0.113.{n}").status_code for n in range(6)]
    # then the header is ignored: one address, locked at the fifth failure
    assert statuses == [401, 401, 401, 401, 429, 429]
    right = anon_api.post(LOGIN, {"username": "fox", "password": PASSWORD}, format="json")
    assert right.status_code == 429
    recorded = set(
        AuditEvent.objects.filter(path=LOGIN).values_list("client_ip", flat=True).distinct()
    )
    assert recorded == {"127.0.0.1"}


@pytest.mark.django_db
def test_behind_a_trusted_proxy_each_forwarded_client_is_locked_on_its_own(anon_api):
    make_user("fox")
    with override_settings(TRUSTED_PROXIES=PROXY):
        first = [_wrong(anon_api, "198.51.100.7").status_code for _ in range(5)]
        # a different client behind the same proxy is not locked by the first one's failures
        other = _wrong(anon_api, "198.51.100.8").status_code
    assert first == [401, 401, 401, 401, 429]
    assert other == 401
    ips = list(
        AuditEvent.objects.filter(action="api.request", path=LOGIN)
        .order_by("id")
        .values_list("client_ip", flat=True)
    )
    assert ips == ["198.51.100.7"] * 5 + ["198.51.100.8"]


@pytest.mark.django_db
def test_refusals_carry_a_machine_readable_code(anon_api, outsider_api):
    unauthenticated = anon_api.get("/api/compliance/audit/events")
    assert unauthenticated.status_code == 401
    assert unauthenticated.json()["code"] == "not_authenticated"
    forbidden = outsider_api.get("/api/compliance/audit/events")
    assert forbidden.status_code == 403
    assert forbidden.json()["code"] == "permission_denied"
    anon_api.credentials(HTTP_AUTHORIZATION="Bearer garbage")
    assert anon_api.get("/api/compliance/audit/events").json()["code"] == "token_not_valid"
