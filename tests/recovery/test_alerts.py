"""Alerts: mail through Django's backend and a JSON webhook through the retry executor, each
recorded with how its delivery went."""

from __future__ import annotations

import pytest
from django.core import mail
from django.utils import timezone

from recovery import alerts
from recovery.models import Alert, HealthTransition
from tests.conftest import free_port
from tests.recovery.probe_servers import make_service, scripted_http_server

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _closed_breakers() -> None:
    """The channels' breakers are shared state (Redis or the database): a webhook failing in
    one test must not leave the next one refused."""
    from compliance.audit import AuditContext
    from recovery import breaker

    for name in (alerts.MAIL_SERVICE, alerts.WEBHOOK_SERVICE):
        breaker.reset(name, context=AuditContext.system())


@pytest.fixture(autouse=True)
def _quick_retries(settings) -> None:
    settings.MAX_RETRIES = 2
    settings.BASE_RETRY_DELAY = 10  # ms
    settings.RETRY_MAX_DELAY = 50
    settings.RECOVERY_ALERT_EMAILS = ["ops@example.org", "oncall@example.org"]


def test_an_alert_goes_by_mail_and_webhook_and_each_delivery_is_recorded(settings):
    with scripted_http_server() as receiver:
        settings.RECOVERY_ALERT_WEBHOOK = f"{receiver.url}/hook"
        service = make_service()
        sent = alerts.send_alert(service=service, subject="db is down", body="2 failures")
    assert [alert.channel for alert in sent] == ["mail", "webhook"]
    assert all(alert.delivered and alert.attempts == 1 for alert in sent)
    assert mail.outbox[0].subject == "db is down"
    assert mail.outbox[0].to == ["ops@example.org", "oncall@example.org"]
    posted = receiver.received[0]
    assert posted["path"] == "/hook"
    assert posted["headers"]["Content-Type"] == "application/json"
    assert posted["json"]["subject"] == "db is down"
    assert posted["json"]["service"] == service.name
    assert Alert.objects.get(channel="webhook").delivery_result == "HTTP 200"


def test_a_failing_webhook_is_retried_then_recorded_as_not_delivered(settings):
    with scripted_http_server() as receiver:
        receiver.status = 502
        settings.RECOVERY_ALERT_WEBHOOK = receiver.url
        settings.RECOVERY_ALERT_EMAILS = []
        [alert] = alerts.send_alert(service=None, subject="s", body="b")
    assert not alert.delivered
    assert alert.attempts == 3  # the first and MAX_RETRIES more
    assert len(receiver.received) == 3
    assert "HTTP 502" in alert.delivery_result
    assert Alert.objects.get().delivered is False


def test_a_webhook_refusing_the_request_is_not_retried(settings):
    with scripted_http_server() as receiver:
        receiver.status = 400
        settings.RECOVERY_ALERT_WEBHOOK = receiver.url
        settings.RECOVERY_ALERT_EMAILS = []
        [alert] = alerts.send_alert(service=None, subject="s", body="b")
    assert (alert.delivered, alert.attempts, len(receiver.received)) == (False, 1, 1)


def test_an_unreachable_webhook_is_recorded_without_its_address(settings):
    settings.RECOVERY_ALERT_EMAILS = []
    settings.RECOVERY_ALERT_WEBHOOK = f"http://hook-user:hook-pw@127.0.0.1:{free_port()}/x"
    [alert] = alerts.send_alert(service=None, subject="s", body="b")
    assert not alert.delivered
    assert "hook-pw" not in alert.delivery_result
    assert alert.attempts == 3


def test_a_transition_alert_names_the_change_and_its_reason(settings):
    settings.RECOVERY_ALERT_WEBHOOK = ""
    service = make_service(name="t-billing")
    transition = HealthTransition.objects.create(
        service=service, at=timezone.now(), from_status="up", to_status="down", reason="HTTP 500"
    )
    [alert] = alerts.send_transition_alert(transition)
    assert alert.subject == "[Bridge] t-billing is down"
    assert "went from up to down" in mail.outbox[0].body
    assert "Reason: HTTP 500" in mail.outbox[0].body


def test_nothing_is_sent_without_channels(settings):
    settings.RECOVERY_ALERT_EMAILS = []
    settings.RECOVERY_ALERT_WEBHOOK = ""
    assert not alerts.channels_configured()
    assert alerts.send_alert(service=None, subject="s", body="b") == []
