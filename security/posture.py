"""The security posture: what GET /api/security/status reports, the self-checks POST /test runs
for real, and POST /reset (bans and counters cleared, superusers only).

Every figure is read live from the settings, the database and the shared store; nothing here
is a canned answer. A self-check that cannot run counts as failed, with the reason.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from axes.models import AccessAttempt
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.apps import apps
from django.conf import settings
from django.core import checks
from django.db import connection, connections, transaction
from django.db.migrations.executor import MigrationExecutor
from django.db.models import Count, Max, Min
from django.utils import timezone

from compliance.audit import AuditContext, iso, record_event
from compliance.choices import AuditAction
from compliance.models import AuditEvent
from security import bans, crypto, keys, ratelimit, threats
from security.models import DataKey, IPBan, SigningKey, SubjectKey

BLACKLIST_APP = "rest_framework_simplejwt.token_blacklist"


def _seconds(value: timedelta | None) -> int | None:
    return None if value is None else int(value.total_seconds())


def deploy_check_messages() -> list[dict[str, str]]:
    """Django's `check --deploy` findings, as data."""
    found = checks.run_checks(include_deployment_checks=True, tags=[checks.Tags.security])
    return [
        {"id": item.id or "", "level": _level(item.level), "message": str(item.msg)}
        for item in found
        if item.level >= checks.WARNING
    ]


def _level(level: int) -> str:
    return "error" if level >= checks.ERROR else "warning"


def _limiter_health() -> dict[str, Any]:
    backend = "redis" if settings.REDIS_URL else "database"
    started = time.perf_counter()
    try:
        if settings.REDIS_URL:
            ratelimit._redis_connection().ping()
        else:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
    except Exception as exc:  # any failure to answer is "down", with its type
        return {"backend": backend, "ok": False, "error": type(exc).__name__}
    return {
        "backend": backend,
        "ok": True,
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
    }


def _key_inventory(now: Any) -> dict[str, Any]:
    master_id, _ = crypto.master_key()
    purposes = []
    rows = (
        DataKey.objects.filter(destroyed_at__isnull=True)
        .values("purpose")
        .annotate(versions=Count("id"), newest=Max("created_at"), oldest=Min("created_at"))
        .order_by("purpose")
    )
    for row in rows:
        current = (
            DataKey.objects.filter(purpose=row["purpose"], destroyed_at__isnull=True)
            .order_by("-version")
            .first()
        )
        purposes.append(
            {
                "purpose": row["purpose"],
                "current_key_id": current.key_id,
                "version": current.version,
                "versions": row["versions"],
                "age_days": (now - current.created_at).days,
                "wrapped_by": current.master_key_id,
            }
        )
    signing = SigningKey.objects.filter(retired_at__isnull=True).order_by("-created_at").first()
    stale = DataKey.objects.exclude(master_key_id=master_id).exclude(wrapped="").count()
    stale += SubjectKey.objects.exclude(master_key_id=master_id).exclude(wrapped="").count()
    return {
        "master_key_id": master_id,
        "previous_master_keys": len(settings.BRIDGE_MASTER_KEY_PREVIOUS),
        "keys_wrapped_by_other_master": stale,
        "data_keys": purposes,
        "subject_keys": {
            "live": SubjectKey.objects.filter(destroyed_at__isnull=True).count(),
            "destroyed": SubjectKey.objects.filter(destroyed_at__isnull=False).count(),
        },
        "audit_signing_key": None
        if signing is None
        else {
            "key_id": signing.key_id,
            "age_days": (now - signing.created_at).days,
        },
    }


def _counts(since: Any) -> dict[str, int]:
    return {
        "lockouts": AccessAttempt.objects.filter(
            failures_since_start__gte=settings.AXES_FAILURE_LIMIT, attempt_time__gte=since
        ).count(),
        "failed_logins": AuditEvent.objects.filter(
            action=AuditAction.LOGIN_FAILED, occurred_at__gte=since
        ).count(),
        "bans": IPBan.objects.filter(started_at__gte=since).count(),
        "token_reuse": AuditEvent.objects.filter(
            action=AuditAction.TOKEN_REUSE_DETECTED, occurred_at__gte=since
        ).count(),
    }


def security_status() -> dict[str, Any]:
    """The live posture (GET /api/security/status)."""
    now = timezone.now()
    jwt = settings.SIMPLE_JWT
    grace = settings.JWT_REFRESH_REUSE_GRACE
    return {
        "time": iso(now),
        "tls": {
            "tls13_only": settings.ENABLE_TLS13,
            "minimum_version": "TLSv1.3" if settings.ENABLE_TLS13 else "TLSv1.2",
            "hsts_seconds": settings.SECURE_HSTS_SECONDS,
            "secure_cookies": settings.SESSION_COOKIE_SECURE and settings.CSRF_COOKIE_SECURE,
        },
        "jwt": {
            "access_seconds": _seconds(jwt["ACCESS_TOKEN_LIFETIME"]),
            "refresh_seconds": _seconds(jwt["REFRESH_TOKEN_LIFETIME"]),
            "rotation": jwt["ROTATE_REFRESH_TOKENS"],
            "blacklist_after_rotation": jwt["BLACKLIST_AFTER_ROTATION"],
            "reuse_detection": True,
            "reuse_grace_seconds": _seconds(grace) or 0,
        },
        "lockout": {
            "enabled": settings.AXES_ENABLED,
            "failure_limit": settings.AXES_FAILURE_LIMIT,
            "cooloff_seconds": _seconds(settings.AXES_COOLOFF_TIME),
        },
        "rate_limiting": {
            "enabled": settings.ENABLE_DDOS_PROTECTION,
            "limits": dict(settings.RATE_LIMITS),
            "login_username": settings.RATE_LIMIT_LOGIN_USERNAME,
            "allowlist": [str(net) for net in settings.RATE_LIMIT_ALLOWLIST],
            "ban_after": settings.IP_BAN_AFTER,
            "ban_base_seconds": _seconds(settings.IP_BAN_BASE),
            "ban_max_seconds": _seconds(settings.IP_BAN_MAX),
            "store": _limiter_health(),
        },
        "keys": _key_inventory(now),
        "deploy_checks": deploy_check_messages(),
        "active_bans": IPBan.objects.filter(lifted_at__isnull=True, ends_at__gt=now).count(),
        "last_hour": _counts(now - timedelta(hours=1)),
        "last_day": _counts(now - timedelta(days=1)),
    }


# --- self-test -------------------------------------------------------------------------------


def _check_round_trips() -> str:
    """Each current purpose key and every living subject key unwraps and round-trips."""
    probe = secrets.token_bytes(64)
    checked = 0
    current: dict[str, DataKey] = {}
    for row in DataKey.objects.filter(destroyed_at__isnull=True).order_by("purpose", "version"):
        current[row.purpose] = row
    for row in [*current.values(), *SubjectKey.objects.filter(destroyed_at__isnull=True)]:
        cipher = AESGCM(crypto._unwrap(row))
        nonce = secrets.token_bytes(12)
        if cipher.decrypt(nonce, cipher.encrypt(nonce, probe, b"self-test"), b"self-test") != probe:
            raise AssertionError(f"key {row.key_id} does not round-trip")
        checked += 1
    sealed = crypto.encrypt(probe, purpose="self_test", context="self-test")
    if crypto.decrypt(sealed, context="self-test") != probe:
        raise AssertionError("the envelope round trip gave other bytes back")
    return f"{checked} key(s) and the envelope round-trip"


def _check_tamper_refused() -> str:
    sealed = crypto.encrypt(b"self-test", purpose="self_test", context="self-test")
    head, tail = sealed.rsplit(".", 1)
    tampered = f"{head}.{tail[:-2]}{'A' if tail[-2] != 'A' else 'B'}{tail[-1]}"
    for bad, context in ((tampered, "self-test"), (sealed, "another-context")):
        try:
            crypto.decrypt(bad, context=context)
        except crypto.CryptoError:
            continue
        raise AssertionError("a tampered or moved ciphertext decrypted")
    return "a flipped bit and a swapped context are both refused"


def _check_limiter_atomic() -> str:
    """40 hits in parallel against a limit of 10 on a fresh key: exactly 10 admitted."""
    key = f"selftest:{uuid.uuid4().hex}"
    rate = ratelimit.Rate(10, 60)

    def one(_: int) -> bool:
        try:
            return ratelimit.hit(key, rate).allowed
        finally:
            if not settings.REDIS_URL:
                connections.close_all()

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            admitted = sum(pool.map(one, range(40)))
    finally:
        ratelimit.clear(key)
    if admitted != 10:
        raise AssertionError(f"{admitted} of 40 parallel hits admitted against a limit of 10")
    return "10 of 40 parallel hits admitted against a limit of 10"


def _check_blacklist() -> str:
    if not apps.is_installed(BLACKLIST_APP):
        raise AssertionError(f"{BLACKLIST_APP} is not installed: rotated tokens stay valid")
    executor = MigrationExecutor(connection)
    plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    missing = [migration.name for migration, _ in plan if migration.app_label == "token_blacklist"]
    if missing:
        raise AssertionError(f"token_blacklist migrations not applied: {', '.join(missing)}")
    return "token_blacklist installed and migrated"


def _check_deploy() -> str:
    found = deploy_check_messages()
    if found:
        names = ", ".join(f"{item['id']}" for item in found)
        raise AssertionError(f"{len(found)} deploy check finding(s): {names}")
    return "manage.py check --deploy is clean"


def _check_signing_key() -> str:
    key = keys.audit_signing_key()
    return f"audit signing key {key.key_id[:16]} loads"


SELF_CHECKS: tuple[tuple[str, Callable[[], str]], ...] = (
    ("encryption_round_trip", _check_round_trips),
    ("tampered_ciphertext_refused", _check_tamper_refused),
    ("limiter_atomic", _check_limiter_atomic),
    ("token_blacklist", _check_blacklist),
    ("audit_signing_key", _check_signing_key),
    ("deploy_checks", _check_deploy),
)


def run_self_test(*, context: AuditContext) -> dict[str, Any]:
    """Run every self-check for real; one audit event with the outcome of each."""
    results = []
    for name, check in SELF_CHECKS:
        started = time.perf_counter()
        try:
            detail, ok = check(), True
        except Exception as exc:  # a check that cannot run has failed: say which and why
            detail, ok = f"{type(exc).__name__}: {exc}", False
        results.append(
            {
                "name": name,
                "ok": ok,
                "detail": detail,
                "ms": round((time.perf_counter() - started) * 1000, 1),
            }
        )
    outcome = {
        "ok": all(item["ok"] for item in results),
        "passed": sum(item["ok"] for item in results),
        "failed": sum(not item["ok"] for item in results),
        "checks": results,
    }
    record_event(
        action=AuditAction.SECURITY_SELF_TEST,
        context=context,
        object_type="security",
        object_id="self-test",
        details={
            "ok": outcome["ok"],
            "failed": [item["name"] for item in results if not item["ok"]],
        },
    )
    return outcome


# --- reset -------------------------------------------------------------------------------


def reset_protection(*, context: AuditContext) -> dict[str, int]:
    """Lift every active ban, forget every rate counter, lockout and threat score (the threat
    events stay, as history) (POST /reset)."""
    now = timezone.now()
    with transaction.atomic():
        active = list(IPBan.objects.filter(lifted_at__isnull=True, ends_at__gt=now))
        lifted = bans.lift(bans=active, context=context)
        lockouts = AccessAttempt.objects.all().delete()[0]
        ratelimit.clear("")
        scores = threats.clear_scores()
        summary = {"bans_lifted": lifted, "lockouts_cleared": lockouts, "scores_cleared": scores}
        record_event(
            action=AuditAction.SECURITY_RESET,
            context=context,
            object_type="security",
            object_id="reset",
            details=summary,
        )
    return summary
