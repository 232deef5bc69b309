"""The console's keys pages: data keys with their age and a rotate action, subject keys (never
their material), and stored secrets (write-only: the value is never shown back)."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from unfold.admin import ModelAdmin

from bridge.admin import ReadOnlyAdmin, label, utc_column
from compliance import approvals
from compliance.audit import AuditContext
from compliance.choices import ApprovalAction
from security import crypto, rotation
from security.models import DataKey, StoredSecret, SubjectKey, WrappedKey

# A data key older than this is shown amber: rotate yearly (NIST SP 800-57's cryptoperiods
# for symmetric data keys are one to two years).
OLD_KEY_DAYS = 365


def _age(row: WrappedKey) -> str:
    days = (timezone.now() - row.created_at).days
    return label(f"{days} d", "warning" if days >= OLD_KEY_DAYS else "success")


def _wrapped_by(row: WrappedKey) -> str:
    if not row.wrapped:
        return "-"
    if row.master_key_id == crypto.master_key()[0]:
        return label("current master key", "success")
    return label(f"{row.master_key_id}: run rotate_keys", "warning")


class _KeyAdmin(ReadOnlyAdmin):
    list_display = ("key_id", "purpose", "version", "state", "age", "wrapped_by", "created")
    list_filter = ("purpose",)
    search_fields = ("=key_id", "purpose")
    fields = ("key_id", "purpose", "version", "state", "age", "wrapped_by", "created", "destroyed")
    created = utc_column("created_at", "created")
    destroyed = utc_column("destroyed_at", "destroyed")

    @admin.display(description="age")
    def age(self, row: WrappedKey) -> str:
        return _age(row)

    @admin.display(description="wrapped by")
    def wrapped_by(self, row: WrappedKey) -> str:
        return _wrapped_by(row)


@admin.register(DataKey)
class DataKeyAdmin(_KeyAdmin):
    """Data keys per purpose, newest version current; the material is stored only wrapped and
    is never shown. Rotating re-wraps them all and starts new versions."""

    actions = ["rotate"]

    @admin.display(description="state")
    def state(self, row: DataKey) -> str:
        if row.destroyed_at:
            return label("destroyed", "danger")
        newest = (
            DataKey.objects.filter(purpose=row.purpose, destroyed_at__isnull=True)
            .order_by("-version")
            .values_list("pk", flat=True)
            .first()
        )
        return label("current", "success") if newest == row.pk else label("older version", "")

    def has_rotate_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("security.rotate_datakey")

    @admin.action(
        description="Rotate all keys now (re-wrap, new versions, re-encrypt in the background)",
        permissions=["rotate"],
    )
    def rotate(self, request: HttpRequest, queryset: QuerySet[DataKey]) -> None:
        if approvals.requires_approval(ApprovalAction.KEY_ROTATION):
            # Segregation of duties (SOX): a second security officer approves it first.
            try:
                approval = approvals.request_approval(
                    action=ApprovalAction.KEY_ROTATION,
                    params={"new_data_keys": True},
                    reason="Key rotation asked from the console",
                    context=AuditContext.from_request(request),
                    user=request.user,
                )
            except approvals.ApprovalError as exc:
                self.message_user(request, str(exc), messages.ERROR)
                return
            self.message_user(
                request,
                format_html(
                    'Nothing rotated yet: a second security officer must approve <a href="{}">'
                    "request {}</a> (SOX second approval), which then rotates the keys.",
                    reverse("admin:compliance_approvalrequest_change", args=[approval.pk]),
                    str(approval.pk)[:8],
                ),
                messages.WARNING,
            )
            return
        try:
            summary = rotation.rotate_keys(context=AuditContext.from_request(request))
        except crypto.CryptoError as exc:
            self.message_user(request, f"Rotation refused, nothing changed: {exc}", messages.ERROR)
            return
        job_url = reverse("admin:bridge_job_change", args=[summary["job_id"]])
        self.message_user(
            request,
            format_html(
                "{} key(s) re-wrapped, {} new version(s); re-encryption is "
                '<a href="{}">job {}</a>.',
                summary["rewrapped"],
                len(summary["new_data_keys"]),
                job_url,
                summary["job_id"],
            ),
            messages.SUCCESS,
        )


@admin.register(SubjectKey)
class SubjectKeyAdmin(_KeyAdmin):
    """Data subjects' keys, in a table database dumps leave out; a destroyed key (crypto-
    shredded for an erasure) leaves that subject's ciphertexts unreadable everywhere."""

    list_display = ("key_id", "subject_id", "purpose", "state", "age", "wrapped_by", "created")
    search_fields = ("=key_id", "=subject_id")

    @admin.display(description="state")
    def state(self, row: SubjectKey) -> str:
        return label("destroyed", "danger") if row.destroyed_at else label("live", "success")


class StoredSecretForm(forms.ModelForm):
    # Write-only: the form never renders the stored value; left blank on a change, it is kept.
    new_value = forms.CharField(
        label="value",
        required=False,
        strip=False,
        widget=forms.PasswordInput(render_value=False),
        help_text="Encrypted at rest (AES-256-GCM), bound to this name; never shown again. "
        "Leave blank to keep the current value.",
    )

    class Meta:
        model = StoredSecret
        fields = ("name", "kind", "description")

    def clean(self) -> dict:
        data = super().clean()
        if self.instance.pk is None and not data.get("new_value"):
            self.add_error("new_value", "A new secret needs a value.")
        return data

    def save(self, commit: bool = True) -> StoredSecret:
        secret = super().save(commit=False)
        if self.cleaned_data.get("new_value"):
            secret.value = self.cleaned_data["new_value"]
        if commit:
            secret.save()
        return secret


@admin.register(StoredSecret)
class StoredSecretAdmin(ModelAdmin):
    form = StoredSecretForm
    list_display = ("name", "kind", "description", "updated")
    list_filter = ("kind",)
    search_fields = ("name", "description")
    updated = utc_column("updated_at", "updated")

    def get_readonly_fields(self, request: HttpRequest, obj: StoredSecret | None = None) -> tuple:
        # The name is bound into the ciphertext: renaming would orphan the value.
        return ("name",) if obj is not None else ()
