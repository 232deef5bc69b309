"""Errors under /api/ are JSON with a code in every mode; browsers land in the console."""

from __future__ import annotations

import pytest
from django.test import Client, override_settings


@pytest.mark.django_db
@pytest.mark.parametrize("debug", [False, True], ids=["debug-off", "debug-on"])
def test_an_unknown_api_path_is_a_json_404_in_every_mode(compliance_api, debug):
    with override_settings(DEBUG=debug):
        response = compliance_api.get("/api/compliance/no-such-thing")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json() == {
        "detail": "Not found.",
        "code": "not_found",
        "path": "/api/compliance/no-such-thing",
    }


@pytest.mark.django_db
@pytest.mark.parametrize("debug", [False, True], ids=["debug-off", "debug-on"])
def test_a_wrong_method_is_a_json_405_with_a_code(compliance_api, debug):
    with override_settings(DEBUG=debug):
        response = compliance_api.delete("/api/compliance/audit/events")
    assert response.status_code == 405
    assert response.json()["code"] == "method_not_allowed"


@pytest.mark.django_db
@pytest.mark.parametrize("debug", [False, True], ids=["debug-off", "debug-on"])
def test_an_exception_in_an_api_view_is_a_json_500_even_with_debug_on(
    compliance_api, monkeypatch, debug
):
    from compliance import verification

    def explode() -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(verification, "latest_verification", explode)
    compliance_api.raise_request_exception = False
    with override_settings(DEBUG=debug):
        response = compliance_api.get("/api/compliance/audit/verify")
    assert response.status_code == 500
    body = response.json()
    assert body["code"] == "server_error"
    assert body["request_id"] == response["X-Request-ID"]
    assert b"secret internals" not in response.content
    assert b"Traceback" not in response.content


@pytest.mark.django_db
def test_the_root_sends_a_browser_to_the_console():
    response = Client().get("/")
    assert response.status_code == 302
    assert response["Location"] == "/admin/"


@pytest.mark.django_db
def test_the_api_docs_send_an_anonymous_browser_to_the_login_and_back():
    response = Client().get("/api/docs/", HTTP_ACCEPT="text/html,application/xhtml+xml")
    assert response.status_code == 302
    assert response["Location"] == "/admin/login/?next=/api/docs/"


@pytest.mark.django_db
def test_the_api_docs_send_any_anonymous_client_to_the_login(anon_api):
    response = anon_api.get("/api/docs/", HTTP_ACCEPT="*/*")
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")


@pytest.mark.django_db
def test_the_api_docs_open_for_a_signed_in_staff_user(admin_user):
    browser = Client()
    browser.force_login(admin_user)
    response = browser.get("/api/docs/", HTTP_ACCEPT="text/html")
    assert response.status_code == 200
    assert b"swagger-ui" in response.content
