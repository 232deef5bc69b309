"""Security services: login, refresh with reuse detection, logout; signing key rotation.

The API views and the admin are thin callers of these functions; each runs in one transaction
and leaves one audit event.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.conf import settings
from django.contrib.auth import authenticate
from django.core.cache import cache
from django.db import transaction
from django.db.models import F, QuerySet
from django.http import HttpRequest
from django.utils import timezone
from rest_framework_simplejwt.exceptions import TokenBackendError
from rest_framework_simplejwt.settings import api_settings as jwt_settings
from rest_framework_simplejwt.state import token_backend
from rest_framework_simplejwt.token_blacklist.models import BlacklistedToken, OutstandingToken
from rest_framework_simplejwt.tokens import RefreshToken

from compliance import proof
from compliance.audit import AuditContext, iso, record_event
from compliance.choices import AuditAction
from security import crypto, keys, otp, ratelimit
from security.choices import FamilyRevocation
from security.ip import client_ip
from security.lockout import retry_after_seconds
from security.models import SigningKey, TokenFamily, User

log = logging.getLogger(__name__)


class AuthError(Exception):
    """A refusal the API turns into 401 (or 429 for lockouts), with a stable code."""

    status = 401

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class LockedOut(AuthError):
    status = 429

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            "Too many failed login attempts; this account is locked for this address.",
            "locked_out",
        )
        self.retry_after = retry_after


class UsernameRateLimited(LockedOut):
    """Too many login attempts for one submitted username, from any number of addresses."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(retry_after)
        self.args = ("Too many login attempts for this username; try again later.",)
        self.code = "login_rate_limited"


class SecondFactorRefused(AuthError):
    """The password was right but the authenticator code is missing, wrong, replayed or
    throttled (401, 429), or the role requires an authenticator not yet enrolled (403)."""

    def __init__(self, refused: otp.CodeRefused) -> None:
        super().__init__(str(refused), refused.code)
        self.status = refused.status
        if refused.retry_after is not None:
            self.retry_after = refused.retry_after


@dataclass(frozen=True)
class TokenPair:
    access: str
    refresh: str


def _mint(user: User, family: TokenFamily) -> tuple[TokenPair, str]:
    refresh = RefreshToken.for_user(user)
    refresh["fam"] = str(family.pk)
    refresh["ver"] = user.token_version
    pair = TokenPair(access=str(refresh.access_token), refresh=str(refresh))
    return pair, refresh[jwt_settings.JTI_CLAIM]


def _issue(user: User, family: TokenFamily) -> TokenPair:
    return _mint(user, family)[0]


def login(*, request: HttpRequest, username: str, password: str, otp_code: str = "") -> TokenPair:
    """Check credentials through axes and Django, and open a new refresh-token family.

    A user holding an authenticator must send its current code too, and one whose role
    requires an authenticator (OTP_REQUIRED_ROLES) is refused until they enrol one in the
    console (security/otp.py). A failure, a wrong code included, is recorded by the
    `user_login_failed` receiver (axes counts it there too).
    Attempts per submitted username are limited too (RATE_LIMIT_LOGIN_USERNAME), whatever
    address they come from: a botnet guessing one account's password gets its share, no more.
    """
    if settings.ENABLE_DDOS_PROTECTION:
        rate = ratelimit.Rate.parse(settings.RATE_LIMIT_LOGIN_USERNAME)
        decision = ratelimit.hit(f"login:{username.casefold()[:150]}", rate)
        if not decision.allowed:
            raise UsernameRateLimited(math.ceil(decision.retry_after))
    user = authenticate(request=request, username=username, password=password)
    if getattr(request, "axes_locked_out", False):
        raise LockedOut(retry_after_seconds(request))
    if user is None:
        raise AuthError("Invalid username or password.", "invalid_credentials")
    try:
        device = otp.check_second_factor(
            request=request,
            user=user,
            username=username,
            code=otp_code,
            channel="api",
            enforce_enrolment=True,
        )
    except otp.CodeRefused as refused:
        if getattr(request, "axes_locked_out", False):
            # That wrong code was the failure that reached the limit.
            raise LockedOut(retry_after_seconds(request)) from None
        raise SecondFactorRefused(refused) from None
    with transaction.atomic():
        family = TokenFamily.objects.create(user=user, client_ip=client_ip(request))
        pair = _issue(user, family)
        record_event(
            action=AuditAction.LOGIN_SUCCEEDED,
            context=AuditContext.from_request(request, user=user),
            object_type="security.tokenfamily",
            object_id=family.pk,
            details={"channel": "api", "second_factor": "totp" if device else "none"},
        )
    return pair


def _decode_refresh(raw: str) -> dict:
    try:
        payload = token_backend.decode(raw, verify=True)
    except TokenBackendError as exc:
        raise AuthError("Refresh token is invalid or expired.", "token_not_valid") from exc
    if payload.get(jwt_settings.TOKEN_TYPE_CLAIM) != "refresh" or not payload.get("fam"):
        raise AuthError("Not a refresh token.", "token_not_valid")
    return payload


# --- Reuse grace ---------------------------------------------------------------------------
#
# With JWT_REFRESH_REUSE_GRACE on, each rotation keeps its successor pair in Django's shared
# cache under the spent token's jti for the grace period, so that the same token presented
# again soon after (a client retrying a call whose answer it lost, or racing itself) gets that
# same pair back instead of revoking the family. Nothing new is issued on a retry: a family
# stays one chain of refresh tokens.
#
# The entry is written inside the rotating transaction, before COMMIT, and not in on_commit:
# COMMIT releases the family lock before on_commit callbacks run, so a concurrent retry
# waiting on that lock could look before the entry exists and revoke the family. Written
# early, the entry may outlive a rolled-back rotation, so it is never trusted on its own: it
# is served only while the database (read under the family lock, i.e. committed state) shows
# that the presented token is spent, that the entry's successor was issued to this user and
# is still unspent (so the presented token is the family's latest parent and the successor
# has not rotated further), and that the family last rotated within the grace period. A
# rolled-back rotation's successor was never issued, so its entry can never pass.


def _reuse_grace() -> timedelta:
    """The configured grace, `timedelta(0)` when off (the setting may be None or 0)."""
    return getattr(settings, "JWT_REFRESH_REUSE_GRACE", None) or timedelta(0)


def _grace_key(spent_jti: str) -> str:
    return f"security:refresh-grace:{spent_jti}"


def _remember_successor(
    spent_jti: str, family: TokenFamily, pair: TokenPair, successor_jti: str, grace: timedelta
) -> None:
    entry = {
        "family": str(family.pk),
        "successor_jti": successor_jti,
        "access": pair.access,
        "refresh": pair.refresh,
    }
    try:
        # The database check decides the window; the cache only has to keep the entry as long.
        cache.set(_grace_key(spent_jti), entry, timeout=math.ceil(grace.total_seconds()))
    except Exception:
        # Without its cache the refresh still works; only this rotation has no grace.
        log.warning("refresh grace entry not stored (cache unavailable)", exc_info=True)


def _successor_within_grace(
    spent_jti: str, family: TokenFamily, user: User
) -> tuple[TokenPair, timedelta] | None:
    """The pair a rotation of `spent_jti` issued, if it may be handed out again (see above)."""
    grace = _reuse_grace()
    if not grace or family.last_refreshed_at is None:
        return None
    since_rotation = timezone.now() - family.last_refreshed_at
    if since_rotation > grace:
        return None
    try:
        entry = cache.get(_grace_key(spent_jti))
    except Exception:
        log.warning("refresh grace entry not read (cache unavailable)", exc_info=True)
        return None
    if not isinstance(entry, dict) or entry.get("family") != str(family.pk):
        return None
    issued_and_unspent = OutstandingToken.objects.filter(
        jti=entry["successor_jti"], user=user, blacklistedtoken__isnull=True
    ).exists()
    if not issued_and_unspent:
        return None
    return TokenPair(access=entry["access"], refresh=entry["refresh"]), since_rotation


def refresh(*, request: HttpRequest, refresh_token: str) -> TokenPair:
    """Rotate a refresh token; presenting an already-rotated one revokes its whole family.

    The family row is locked first, so two refreshes of one token run one after the other:
    the first rotates, the second finds the token spent and is treated as reuse (RFC 9700).
    Reuse also bumps the user's token version, so access tokens already handed out stop
    working at once. With JWT_REFRESH_REUSE_GRACE on, the family's latest spent token
    presented again within the grace gets the pair its rotation issued instead (see above).
    """
    payload = _decode_refresh(refresh_token)
    jti = payload[jwt_settings.JTI_CLAIM]
    reused = False
    with transaction.atomic():
        family = (
            TokenFamily.objects.select_for_update()
            .select_related("user")
            .filter(pk=payload["fam"])
            .first()
        )
        if family is None or str(family.user_id) != str(payload.get(jwt_settings.USER_ID_CLAIM)):
            raise AuthError("Refresh token is invalid or expired.", "token_not_valid")
        user = family.user
        if family.revoked_at is not None:
            raise AuthError("This session has been revoked.", "token_revoked")
        if not user.is_active:
            raise AuthError("User is inactive.", "user_inactive")
        spent = BlacklistedToken.objects.filter(token__jti=jti).exists()
        retried = _successor_within_grace(jti, family, user) if spent else None
        if retried is not None:
            pair, since_rotation = retried
            # No token material here: the pair is live, the trail is read by many.
            record_event(
                action=AuditAction.TOKEN_REFRESH_RETRIED,
                context=AuditContext.from_request(request, user=user),
                object_type="security.tokenfamily",
                object_id=family.pk,
                details={
                    "seconds_since_rotation": round(since_rotation.total_seconds(), 3),
                    "refreshes": family.refresh_count,
                },
            )
        elif spent:
            reused = True
            _revoke_families(
                TokenFamily.objects.filter(pk=family.pk), FamilyRevocation.REUSE_DETECTED
            )
            User.objects.filter(pk=user.pk).update(token_version=F("token_version") + 1)
            record_event(
                action=AuditAction.TOKEN_REUSE_DETECTED,
                context=AuditContext.from_request(request, user=user),
                object_type="security.tokenfamily",
                object_id=family.pk,
                details={"jti": jti, "refreshes_before_reuse": family.refresh_count},
            )
        else:
            outstanding, _ = OutstandingToken.objects.get_or_create(
                jti=jti,
                defaults={
                    "user": user,
                    "token": refresh_token,
                    "expires_at": timezone.now(),
                },
            )
            BlacklistedToken.objects.create(token=outstanding)
            TokenFamily.objects.filter(pk=family.pk).update(
                last_refreshed_at=timezone.now(), refresh_count=F("refresh_count") + 1
            )
            pair, successor_jti = _mint(user, family)
            grace = _reuse_grace()
            if grace:
                _remember_successor(jti, family, pair, successor_jti, grace)
            record_event(
                action=AuditAction.TOKEN_REFRESHED,
                context=AuditContext.from_request(request, user=user),
                object_type="security.tokenfamily",
                object_id=family.pk,
            )
    if reused:
        log.warning("refresh token reuse detected for user %s, family revoked", user.pk)
        raise AuthError(
            "Refresh token reuse detected; every token of this session is revoked.",
            "token_reused",
        )
    return pair


def _revoke_families(families: QuerySet[TokenFamily], reason: FamilyRevocation) -> int:
    revoked = families.filter(revoked_at__isnull=True).update(
        revoked_at=timezone.now(), revoked_reason=reason
    )
    return revoked


def logout(*, request: HttpRequest | None, user: User) -> int:
    """Revoke all of the user's refresh tokens and, via the token version, access tokens."""
    with transaction.atomic():
        User.objects.filter(pk=user.pk).update(token_version=F("token_version") + 1)
        families = _revoke_families(TokenFamily.objects.filter(user=user), FamilyRevocation.LOGOUT)
        outstanding = OutstandingToken.objects.filter(user=user, blacklistedtoken__isnull=True)
        BlacklistedToken.objects.bulk_create(
            [BlacklistedToken(token=token) for token in outstanding], ignore_conflicts=True
        )
        record_event(
            action=AuditAction.LOGOUT,
            context=AuditContext.from_request(request, user=user),
            object_type="security.user",
            object_id=user.pk,
            details={"families_revoked": families},
        )
    return families


def revoke_sessions(*, request: HttpRequest | None, families: QuerySet[TokenFamily]) -> int:
    """An administrator ends chosen sessions: their refresh tokens die, and the owners'
    access tokens too (the version is per user, so their other sessions must refresh)."""
    with transaction.atomic():
        chosen = list(families.filter(revoked_at__isnull=True).values_list("pk", "user_id"))
        ids = [pk for pk, _ in chosen]
        users = sorted({user_id for _, user_id in chosen})
        revoked = _revoke_families(TokenFamily.objects.filter(pk__in=ids), FamilyRevocation.ADMIN)
        User.objects.filter(pk__in=users).update(token_version=F("token_version") + 1)
        record_event(
            action=AuditAction.SESSIONS_REVOKED,
            context=AuditContext.from_request(request),
            object_type="security.tokenfamily",
            details={"families": [str(pk) for pk in ids], "users": users},
        )
    return revoked


def rotate_audit_signing_key(
    *, context: AuditContext, new_key_file: Path | None = None, reason: str = ""
) -> SigningKey:
    """Hand audit signing over to a new key; checkpoints signed by the old one stay verifiable.

    The rotation record is signed by both keys and kept with the public keys (and written to
    every checkpoint sink by the next checkpoint), so whoever trusts either key trusts the
    other. Without `new_key_file` a key is generated and replaces the configured file at once
    (temp file, then rename; every process reloads it); with one (production's mounted secret)
    that key is linked in and takes over once AUDIT_SIGNING_KEY_FILE names it.
    """
    current = keys.audit_signing_key()
    new = keys.read_key_file(new_key_file) if new_key_file else Ed25519PrivateKey.generate()
    new_id = proof.key_id_of(new.public_key())
    if new_id == current.key_id:
        raise ValueError("the new key is the current key")
    now = timezone.now()
    record = proof.sign_rotation(current.private, new, iso(now), reason)
    # Into every checkpoint sink first, outside the database: an insider who then deletes the
    # database's copy cannot cut the link between the keys. A sink that fails stops the
    # rotation before anything changed.
    from compliance.sinks import configured_sinks

    for sink in configured_sinks():
        sink.ensure_rotations([record])
    with transaction.atomic():
        SigningKey.objects.filter(key_id=current.key_id, retired_at__isnull=True).update(
            retired_at=now
        )
        row = keys.register_public_key(new.public_key(), rotation=record)
        record_event(
            action=AuditAction.SIGNING_KEY_ROTATED,
            context=context,
            object_type="security.signingkey",
            object_id=row.pk,
            details={
                "old_key_id": current.key_id,
                "new_key_id": new_id,
                "reason": reason,
                "key_file_replaced": new_key_file is None,
            },
        )
    if new_key_file is None:
        # Only once the record linking the keys is committed: a process signing with the new
        # key a moment earlier would make a checkpoint nobody could trust yet. A write that
        # fails here leaves the old key signing, still trusted; the rotation can be run again.
        keys.write_key_file(current.path, new, replace=True)
    log.warning("audit signing key rotated: %s -> %s", current.key_id, new_id)
    return row


def encrypt_text(
    *, context: AuditContext, plaintext: str, bound_to: str = "", subject_id: str = ""
) -> tuple[str, str]:
    """Encrypt for a caller of the API (purpose `api`); audited with sizes and key id only."""
    ciphertext = crypto.encrypt(
        plaintext.encode("utf-8"), purpose="api", context=bound_to, subject_id=subject_id
    )
    key_id = crypto.key_id_of(ciphertext)
    record_event(
        action=AuditAction.DATA_ENCRYPTED,
        context=context,
        object_type="security.datakey",
        object_id=key_id,
        details={"bytes": len(plaintext.encode("utf-8")), "subject": bool(subject_id)},
    )
    return ciphertext, key_id


def decrypt_text(*, context: AuditContext, ciphertext: str, bound_to: str = "") -> str:
    """Decrypt for a caller of the API; a failure is audited (and raised) too."""
    key_id = ""
    try:
        key_id = crypto.key_id_of(ciphertext)
        plaintext = crypto.decrypt(ciphertext, context=bound_to).decode("utf-8")
    except (crypto.CryptoError, UnicodeDecodeError) as exc:
        record_event(
            action=AuditAction.DECRYPTION_FAILED,
            context=context,
            object_type="security.datakey",
            object_id=key_id,
            details={"code": getattr(exc, "code", "not_text")},
        )
        if isinstance(exc, UnicodeDecodeError):
            raise crypto.CryptoError("the plaintext is not UTF-8 text") from exc
        raise
    record_event(
        action=AuditAction.DATA_DECRYPTED,
        context=context,
        object_type="security.datakey",
        object_id=key_id,
        details={"bytes": len(plaintext.encode("utf-8"))},
    )
    return plaintext
