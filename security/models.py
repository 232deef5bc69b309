import uuid

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.db import models

from security.choices import FamilyRevocation, KeyPurpose


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


class DataKey(models.Model):
    """An AES-256 data key, stored only wrapped (AES-256-GCM under the master key, bound to
    its own id, purpose and subject). One current key per purpose and data subject; destroying
    a subject's key (crypto-shredding) leaves every ciphertext made with it unreadable."""

    key_id = models.CharField(max_length=40, unique=True)
    purpose = models.CharField(max_length=64)
    subject_id = models.CharField(max_length=128, blank=True)
    version = models.PositiveIntegerField(default=1)
    master_key_id = models.CharField(max_length=40)
    wrapped = models.TextField(blank=True)  # base64 of nonce + ciphertext; blank once destroyed
    created_at = models.DateTimeField()
    destroyed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["purpose", "subject_id", "version"], name="data_key_version"
            )
        ]
        permissions = [("use_crypto", "Can encrypt and decrypt through the API")]

    def __str__(self) -> str:
        return f"{self.key_id} ({self.purpose}{'/' + self.subject_id if self.subject_id else ''})"
