"""Alerts on change: mail through Django's mail backend to RECOVERY_ALERT_EMAILS, and a JSON
POST to RECOVERY_ALERT_WEBHOOK, each sent through the retry executor and recorded as an Alert
row with how its delivery went (delivered or not, the last error, the attempts it took)."""

from __future__ import annotations

import json
import logging
from typing import Any

from django.conf import settings
from django.core.mail import send_mail
from django.utils import timezone

from recovery.choices import AlertChannel
from recovery.health import redact
from recovery.models import Alert, HealthTransition, Service

log = logging.getLogger(__name__)

# The executor's breaker and statistics names for the two channels.
MAIL_SERVICE = "alerts-mail"
WEBHOOK_SERVICE = "alerts-webhook"
WEBHOOK_TIMEOUT = 5.0  # seconds per attempt
# All attempts of one alert: long enough for a few backed-off retries, short enough that a
# dead receiver does not hold a worker for the executor's whole RETRY_DEADLINE.
DELIVERY_DEADLINE = 30.0


class WebhookRefused(Exception):
    """A 4xx other than 408/429: retrying the same request cannot succeed."""


class WebhookFailed(Exception):
    """A 5xx, 408 or 429: the receiver may take it on a later attempt."""


def channels_configured() -> bool:
    return bool(settings.RECOVERY_ALERT_EMAILS or settings.RECOVERY_ALERT_WEBHOOK)


def _policy() -> Any:
    from recovery import retry

    deadline = min(DELIVERY_DEADLINE, settings.RETRY_DEADLINE / 1000.0)
    # requests' own errors are OSErrors; a 4xx refusal (WebhookRefused) is not retried.
    retryable = (WebhookFailed, retry.RetryAfter, OSError, TimeoutError)
    return retry.default_policy(deadline=deadline, retry_on=retryable)


def _deliver(alert: Alert, send: Any, service: str, policy: Any) -> Alert:
    """Send through the executor, counting attempts, and record the outcome on the row."""
    from recovery import retry

    attempts = {"n": 0}

    def attempt() -> Any:
        attempts["n"] += 1
        return send()

    try:
        result = retry.call(attempt, service=service, policy=policy)
    except Exception as exc:
        cause = exc
        while cause.__cause__ is not None and cause is not cause.__cause__:
            cause = cause.__cause__
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        alert.delivered = False
        alert.delivery_result = redact(f"{type(cause).__name__}: {detail}".rstrip(": "))[:500]
    else:
        alert.delivered = True
        alert.delivery_result = str(result)[:500]
    alert.attempts = attempts["n"]
    alert.save(update_fields=["delivered", "delivery_result", "attempts"])
    return alert


def _post_webhook(url: str, payload: dict) -> str:
    import requests

    from recovery.retry import RetryAfter

    response = requests.post(
        url,
        data=json.dumps(payload, default=str),
        headers={"Content-Type": "application/json", "User-Agent": "Bridge alerts"},
        timeout=WEBHOOK_TIMEOUT,
        allow_redirects=False,
    )
    status = response.status_code
    if 200 <= status < 300:
        return f"HTTP {status}"
    if status == 429 or status == 503:
        after = response.headers.get("Retry-After", "")
        if after.isdigit():
            raise RetryAfter(float(after))
    if status in (408, 429) or status >= 500:
        raise WebhookFailed(f"HTTP {status}")
    raise WebhookRefused(f"HTTP {status}")


def send_alert(
    *, service: Service | None, subject: str, body: str, payload: dict | None = None
) -> list[Alert]:
    """Send one alert on every configured channel; one Alert row per channel, delivered or
    not (delivery never raises). `payload` is extra JSON for the webhook."""
    sent: list[Alert] = []
    now = timezone.now()
    subject = subject[:200]
    recipients = list(settings.RECOVERY_ALERT_EMAILS)
    policy = _policy()
    if recipients:
        alert = Alert.objects.create(
            service=service, created_at=now, channel=AlertChannel.MAIL, subject=subject, body=body
        )

        def mail() -> str:
            count = send_mail(
                subject, body, settings.DEFAULT_FROM_EMAIL, recipients, fail_silently=False
            )
            return f"sent to {len(recipients)} recipient(s)" if count else "not sent"

        sent.append(_deliver(alert, mail, MAIL_SERVICE, policy))
    url = settings.RECOVERY_ALERT_WEBHOOK
    if url:
        alert = Alert.objects.create(
            service=service,
            created_at=now,
            channel=AlertChannel.WEBHOOK,
            subject=subject,
            body=body,
        )
        data = {
            "subject": subject,
            "text": body,
            "service": service.name if service is not None else None,
            "at": now.isoformat(),
            **(payload or {}),
        }
        sent.append(_deliver(alert, lambda: _post_webhook(url, data), WEBHOOK_SERVICE, policy))
    for alert in sent:
        if not alert.delivered:
            log.warning("recovery: alert %s not delivered: %s", alert.pk, alert.delivery_result)
    return sent


def send_transition_alert(transition: HealthTransition) -> list[Alert]:
    """The alert for a change of a service's status."""
    service = transition.service
    subject = f"[Bridge] {service.name} is {transition.to_status}"
    body = (
        f"{service.name} ({service.get_kind_display()}, "
        f"{'critical' if service.critical else 'optional'}) went from "
        f"{transition.from_status} to {transition.to_status} at {transition.at.isoformat()}.\n"
        f"Reason: {transition.reason or '-'}\n"
    )
    payload = {
        "from_status": transition.from_status,
        "to_status": transition.to_status,
        "reason": transition.reason,
        "critical": service.critical,
        "transition_id": transition.pk,
    }
    return send_alert(service=service, subject=subject, body=body, payload=payload)
