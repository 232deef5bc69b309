import uuid

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.db import models

from security.choices import FamilyRevocation, KeyPurpose, SecretKind, ThreatKind, ThreatLayer
from security.fields import EncryptedTextField


class User(AbstractUser):
    """Bridge's user: Django's own plus a token version that revokes access tokens at once.

    Every access token carries the version current when it was issued; bumping it (logout,
    refresh-token theft) makes all of them fail on the next request, with no extra query since
    the authenticator loads the user anyway.
    """

    token_version = models.PositiveIntegerField(default=0)

    def has_role(self, role: str) -> bool:
        if not self.is_active:
            return False
        if self.is_superuser:
            return True
        return self.groups.filter(name=role).exists()


class TokenFamily(models.Model):
    """All refresh tokens descending from one login (RFC 9700 refresh-token reuse detection).

    Rotation keeps the family; presenting a rotated token again revokes the whole family.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="token_families"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_refreshed_at = models.DateTimeField(null=True, blank=True)
    refresh_count = models.PositiveIntegerField(default=0)
    client_ip = models.GenericIPAddressField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True, db_index=True)
    revoked_reason = models.CharField(max_length=32, choices=FamilyRevocation.choices, blank=True)

    class Meta:
        verbose_name_plural = "token families"
        ordering = ["-created_at"]
        permissions = [
            ("revoke_tokenfamily", "Can revoke sessions and log users out everywhere"),
        ]

    def __str__(self) -> str:
        return f"{self.user} {self.id}"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class SigningKey(models.Model):
    """The public half of a signing key Bridge has used, and the record that rotated it in.

    The private key never enters the database: it is the file named by AUDIT_SIGNING_KEY_FILE.
    A rotation record is signed by the old and the new key, so trust passes between them
    without any database row being believed on its own.
    """

    key_id = models.CharField(max_length=40, unique=True)
    purpose = models.CharField(max_length=32, choices=KeyPurpose.choices)
    public_key = models.CharField(max_length=64)  # base64 of the 32 raw bytes
    created_at = models.DateTimeField()
    retired_at = models.DateTimeField(null=True, blank=True)
    # Canonical JSON of the rotation record that brought this key in ("" for the first key).
    rotation = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.key_id


class RateHit(models.Model):
    """One admitted request for a limiter key: the database backend of security.ratelimit
    when there is no Redis (a sliding log, as exact as Redis's; rows go once out of window)."""

    key = models.CharField(max_length=200)
    at = models.FloatField()

    class Meta:
        indexes = [models.Index(fields=["key", "at"], name="rate_hit_key_at")]

    def __str__(self) -> str:
        return f"{self.key} @ {self.at}"


class IPBan(models.Model):
    """A temporary ban of an address (an IPv6 /64) after repeated over-limit episodes; each
    ban of the same address lasts twice the one before, up to IP_BAN_MAX."""

    network = models.CharField(max_length=64, db_index=True)
    reason = models.CharField(max_length=200)
    started_at = models.DateTimeField()
    ends_at = models.DateTimeField(db_index=True)
    ban_number = models.PositiveIntegerField(default=1)
    lifted_at = models.DateTimeField(null=True, blank=True)
    lifted_by = models.CharField(max_length=150, blank=True)

    class Meta:
        ordering = ["-started_at"]
        verbose_name = "IP ban"
        permissions = [("lift_ipban", "Can lift an IP ban early")]

    def __str__(self) -> str:
        return f"{self.network} until {self.ends_at:%Y-%m-%d %H:%M:%S}"

    @property
    def active(self) -> bool:
        from django.utils import timezone

        return self.lifted_at is None and self.ends_at > timezone.now()


class WrappedKey(models.Model):
    """An AES-256 data key, stored only wrapped (AES-256-GCM under the master key, bound to
    its own id, purpose and subject)."""

    key_id = models.CharField(max_length=40, unique=True)
    purpose = models.CharField(max_length=64)
    subject_id = models.CharField(max_length=128, blank=True)
    version = models.PositiveIntegerField(default=1)
    master_key_id = models.CharField(max_length=40)
    wrapped = models.TextField(blank=True)  # base64 of nonce + ciphertext; blank once destroyed
    created_at = models.DateTimeField()
    destroyed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True

    def __str__(self) -> str:
        return f"{self.key_id} ({self.purpose}{'/' + self.subject_id if self.subject_id else ''})"


class DataKey(WrappedKey):
    """A purpose's data key (service credentials, API callers...); one current version per
    purpose, older versions kept so what they encrypted stays readable."""

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["purpose", "subject_id", "version"], name="data_key_version"
            )
        ]
        permissions = [
            ("use_crypto", "Can encrypt and decrypt through the API"),
            ("rotate_datakey", "Can rotate the encryption keys"),
            ("run_security_selftest", "Can run the security self-test"),
        ]


class SubjectKey(WrappedKey):
    """A data subject's key, in a table of its own that database dumps leave out (see
    SUBJECT_KEY_TABLES in security/crypto.py): destroying it (crypto-shredding) leaves every
    ciphertext made with it unreadable, in old backups too. Its own short-lived key backup
    (`manage.py backup_subject_keys`) lets a restore find every living subject's key."""

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["purpose", "subject_id", "version"], name="subject_key_version"
            )
        ]


class StoredSecret(models.Model):
    """A credential Bridge needs to reach something (a service, a backup target, a webhook),
    encrypted at rest and bound to its name: copied to another row, it does not decrypt."""

    name = models.SlugField(max_length=100, unique=True)
    kind = models.CharField(max_length=32, choices=SecretKind.choices, default=SecretKind.OTHER)
    value = EncryptedTextField(purpose="stored_secret", row_key="name")
    description = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


# --- Threat assessment (security/threats.py) -------------------------------------------------


class ThreatEvent(models.Model):
    """One scored observation of one of the four layers (network, authentication, application,
    data): written only when something suspicious happens, never for an ordinary request."""

    occurred_at = models.DateTimeField(db_index=True)
    layer = models.CharField(max_length=16, choices=ThreatLayer.choices)
    kind = models.CharField(max_length=32, choices=ThreatKind.choices)
    # Points this event added to its address's or user's score (before decay).
    score = models.PositiveSmallIntegerField()
    # The client address as limits and bans group it (IPv6 by /64); blank when unknown.
    network = models.CharField(max_length=64, blank=True, db_index=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    path = models.CharField(max_length=500, blank=True)
    # What matched or was counted: never a password, token or plaintext.
    details = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-occurred_at", "-id"]
        indexes = [models.Index(fields=["layer", "occurred_at"], name="threat_layer_time")]
        verbose_name = "threat event"

    def __str__(self) -> str:
        return f"{self.kind} {self.network or self.user_id} +{self.score}"


class IPActivity(models.Model):
    """The rolling threat picture of one address (an IPv6 /64): written with each threat event
    of the address, never for its ordinary requests. `score` is the value at `scored_at`; it
    halves every THREAT_SCORE_HALF_LIFE from then (security.threats.current_score)."""

    network = models.CharField(max_length=64, unique=True)
    first_seen = models.DateTimeField()
    last_seen = models.DateTimeField(db_index=True)
    events = models.PositiveIntegerField(default=0)
    # Requests the application layer flagged (probes, 404s past a burst, oversized bodies).
    flagged_requests = models.PositiveIntegerField(default=0)
    # Over-limit episodes: the first refusal of each window (later ones are the same episode).
    refusals = models.PositiveIntegerField(default=0)
    score = models.FloatField(default=0.0)
    scored_at = models.DateTimeField()
    ban_count = models.PositiveIntegerField(default=0)
    banned_until = models.DateTimeField(null=True, blank=True)
    last_alert_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-last_seen"]
        verbose_name = "IP activity"
        verbose_name_plural = "IP activity"

    def __str__(self) -> str:
        return self.network


class UserActivity(models.Model):
    """A signed-in user's threat score: what they did is scored against them by name (their
    address may be a whole office behind one NAT). Decays like IPActivity's."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="threat_activity"
    )
    first_seen = models.DateTimeField()
    last_seen = models.DateTimeField(db_index=True)
    events = models.PositiveIntegerField(default=0)
    score = models.FloatField(default=0.0)
    scored_at = models.DateTimeField()
    last_alert_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-last_seen"]
        verbose_name = "user activity"
        verbose_name_plural = "user activity"

    def __str__(self) -> str:
        return str(self.user)
