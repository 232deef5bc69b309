from datetime import timedelta
from typing import ClassVar

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin
from django.db.models import Exists, OuterRef, QuerySet
from django.db.models.functions import Now
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html
from unfold.admin import ModelAdmin
from unfold.forms import AdminPasswordChangeForm, UserChangeForm, UserCreationForm

from bridge.admin import (
    AppendOnlyAdmin,
    ReadOnlyAdmin,
    label,
    pretty_json,
    truncated,
    utc_column,
    utc_text,
)
from compliance import proof
from security import bans, services, threats
from security.choices import ThreatLayer
from security.models import (
    IPActivity,
    IPBan,
    SigningKey,
    ThreatEvent,
    TokenFamily,
    User,
    UserActivity,
)


@admin.register(User)
class BridgeUserAdmin(UserAdmin, ModelAdmin):
    # Django's UserAdmin (fieldsets, password views) first, unfold's ModelAdmin second, with
    # unfold's versions of the user forms so the password pages look like the rest.
    form = UserChangeForm
    add_form = UserCreationForm
    change_password_form = AdminPasswordChangeForm
    list_display = ("username", "email", "is_active", "is_superuser", "roles", "last_login_utc")
    list_filter = ("is_active", "is_superuser", "groups")
    fieldsets = (
        (None, {"fields": ("username", "password")}),
        ("Personal info", {"fields": ("first_name", "last_name", "email")}),
        (
            "Permissions",
            {"fields": ("is_active", "is_staff", "is_superuser", "groups", "user_permissions")},
        ),
        ("Important dates", {"fields": ("last_login_utc", "date_joined_utc")}),
        ("Tokens", {"fields": ("token_version",)}),
    )
    readonly_fields = ("token_version", "last_login_utc", "date_joined_utc")
    actions = ["log_out_everywhere"]

    last_login_utc = utc_column("last_login", "last login")
    date_joined_utc = utc_column("date_joined", "date joined")

    def get_queryset(self, request: HttpRequest) -> QuerySet[User]:
        return super().get_queryset(request).prefetch_related("groups")

    @admin.display(description="roles")
    def roles(self, user: User) -> str:
        return ", ".join(group.name for group in user.groups.all()) or "-"

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("security.revoke_tokenfamily")

    @admin.action(description="Log out everywhere (revoke all tokens)", permissions=["revoke"])
    def log_out_everywhere(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        for user in queryset:
            services.logout(request=request, user=user)
        self.message_user(request, f"Revoked every token of {queryset.count()} user(s).")


@admin.register(TokenFamily)
class TokenFamilyAdmin(AppendOnlyAdmin):
    list_display = (
        "short_id",
        "user",
        "created",
        "last_refreshed",
        "refresh_count",
        "ip",
        "state",
    )
    list_display_links = ("short_id",)
    list_filter = ("revoked_reason",)
    list_select_related = ("user",)
    search_fields = ("=user__username", "=client_ip")
    date_hierarchy = "created_at"
    fields = (
        "id",
        "user",
        "state",
        "created",
        "last_refreshed",
        "revoked",
        "refresh_count",
        "client_ip",
    )
    readonly_fields = fields
    actions = ["revoke"]

    created = utc_column("created_at", "created")
    last_refreshed = utc_column("last_refreshed_at", "last refreshed")
    revoked = utc_column("revoked_at", "revoked")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    @admin.display(description="family", ordering="id")
    def short_id(self, family: TokenFamily) -> str:
        # The first block of the UUID is enough to tell families apart on one screen.
        return str(family.id).split("-")[0]

    @admin.display(description="client IP", ordering="client_ip")
    def ip(self, family: TokenFamily) -> str:
        return family.client_ip or "-"

    @admin.display(description="state")
    def state(self, family: TokenFamily) -> str:
        if family.revoked_at is None:
            return label("active", "success")
        return label(f"revoked: {family.get_revoked_reason_display()}", "danger")

    def get_actions(self, request: HttpRequest) -> dict:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("security.revoke_tokenfamily")

    @admin.action(description="Revoke the selected sessions", permissions=["revoke"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[TokenFamily]) -> None:
        count = services.revoke_sessions(request=request, families=queryset)
        self.message_user(request, f"Revoked {count} session(s).", level=messages.WARNING)


@admin.register(SigningKey)
class SigningKeyAdmin(ReadOnlyAdmin):
    """Every audit signing key Bridge has used: its public half (the private key is a file,
    never here) and the rotation record, signed by both keys, that brought it in."""

    list_display = ("key_id", "purpose", "created", "retired", "state")
    list_filter = ("purpose",)
    fieldsets = (
        (None, {"fields": ("key_id", "purpose", "state", "created", "retired")}),
        ("Public key", {"fields": ("public_key", "public_key_pem")}),
        ("Rotation record", {"fields": ("rotation_json",)}),
    )
    created = utc_column("created_at", "created")
    retired = utc_column("retired_at", "retired")

    @admin.display(description="state")
    def state(self, key: SigningKey) -> str:
        return label("retired", "") if key.retired_at else label("current", "success")

    @admin.display(description="PEM (for python -m compliance.verify_export --public-key)")
    def public_key_pem(self, key: SigningKey) -> str:
        return format_html(
            '<pre class="bridge-json">{}</pre>',
            proof.public_key_pem(proof.load_public_key(key.public_key)),
        )

    @admin.display(description="rotation")
    def rotation_json(self, key: SigningKey) -> str:
        return pretty_json(key.rotation) if key.rotation else "- (the first key)"


@admin.register(IPBan)
class IPBanAdmin(AppendOnlyAdmin):
    """Addresses banned after repeated over-limit episodes; lifting one is audited."""

    list_display = ("network", "state", "started", "ends", "ban_number", "reason", "lifted_by")
    list_filter = ("ban_number",)
    search_fields = ("=network",)
    date_hierarchy = "started_at"
    fields = ("network", "state", "reason", "started", "ends", "ban_number", "lifted", "lifted_by")
    readonly_fields = fields
    actions = ["lift"]

    started = utc_column("started_at", "started")
    ends = utc_column("ends_at", "ends")
    lifted = utc_column("lifted_at", "lifted")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    @admin.display(description="state")
    def state(self, row: IPBan) -> str:
        if row.lifted_at is not None:
            return label("lifted", "info")
        return label("active", "danger") if row.active else label("ended", "")

    def get_actions(self, request: HttpRequest) -> dict:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    def has_lift_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("security.lift_ipban")

    @admin.action(description="Lift the selected bans now", permissions=["lift"])
    def lift(self, request: HttpRequest, queryset: QuerySet[IPBan]) -> None:
        from compliance.audit import AuditContext

        count = bans.lift(bans=list(queryset), context=AuditContext.from_request(request))
        self.message_user(request, f"Lifted {count} ban(s).", level=messages.WARNING)


# --- Threat assessment (security/threats.py): read-only, written by the scoring engine ---------

_LAYER_VARIANTS = {
    ThreatLayer.NETWORK: "info",
    ThreatLayer.AUTHENTICATION: "warning",
    ThreatLayer.APPLICATION: "danger",
    ThreatLayer.DATA: "danger",
}


class SeenWithinFilter(admin.SimpleListFilter):
    """Seen in the last hour, day or week: an indexed range on last_seen."""

    title = "last seen"
    parameter_name = "seen"
    _SPANS: ClassVar[dict[str, timedelta]] = {
        "1h": timedelta(hours=1),
        "24h": timedelta(days=1),
        "7d": timedelta(days=7),
    }

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list:
        return [("1h", "Last hour"), ("24h", "Last 24 hours"), ("7d", "Last 7 days")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        span = self._SPANS.get(self.value() or "")
        return queryset.filter(last_seen__gte=timezone.now() - span) if span else queryset


class BannedFilter(admin.SimpleListFilter):
    title = "banned"
    parameter_name = "banned"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list:
        return [("now", "Banned now"), ("ever", "Banned at least once"), ("never", "Never")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "now":
            return queryset.filter(banned_now=True)
        if self.value() == "ever":
            return queryset.filter(ban_count__gt=0)
        if self.value() == "never":
            return queryset.filter(ban_count=0)
        return queryset


def _score_label(score: float) -> str:
    if score >= settings.THREAT_BAN_SCORE:
        variant = "danger"
    elif score >= settings.THREAT_ALERT_SCORE:
        variant = "warning"
    else:
        variant = "" if score < 1 else "info"
    return label(f"{score:.1f}", variant)


@admin.register(ThreatEvent)
class ThreatEventAdmin(ReadOnlyAdmin):
    """Every scored observation of the four layers, newest first."""

    list_display = ("occurred", "layer_label", "kind", "score", "network", "user", "short_path")
    list_display_links = ("occurred",)
    list_filter = ("layer", "kind")
    list_select_related = ("user",)
    search_fields = ("=network", "=user__username")
    date_hierarchy = "occurred_at"
    list_per_page = 50
    fieldsets = (
        (None, {"fields": ("occurred", "layer_label", "kind", "score", "network", "user")}),
        ("Request", {"fields": ("path", "details_json")}),
    )

    occurred = utc_column("occurred_at", "occurred")

    @admin.display(description="layer", ordering="layer")
    def layer_label(self, event: ThreatEvent) -> str:
        return label(event.get_layer_display(), _LAYER_VARIANTS.get(event.layer, ""))

    @admin.display(description="path")
    def short_path(self, event: ThreatEvent) -> str:
        return truncated(event.path, 40)

    @admin.display(description="details")
    def details_json(self, event: ThreatEvent) -> str:
        return pretty_json(event.details)


@admin.register(IPActivity)
class IPActivityAdmin(ReadOnlyAdmin):
    """Each address's threat score (decayed to now), what it did and how often it was banned."""

    list_display = (
        "network",
        "score_now",
        "events",
        "flagged_requests",
        "refusals",
        "ban_count",
        "ban_state",
        "first",
        "last",
    )
    list_filter = (SeenWithinFilter, BannedFilter)
    search_fields = ("=network",)
    ordering = ("-last_seen",)
    fieldsets = (
        (None, {"fields": ("network", "score_now", "recorded_score", "ban_state")}),
        ("Counts", {"fields": ("events", "flagged_requests", "refusals", "ban_count")}),
        ("Times", {"fields": ("first", "last", "scored", "last_alert")}),
    )

    first = utc_column("first_seen", "first seen")
    last = utc_column("last_seen", "last seen")
    scored = utc_column("scored_at", "scored")
    last_alert = utc_column("last_alert_at", "last alert")

    def get_queryset(self, request: HttpRequest) -> QuerySet[IPActivity]:
        # Whether a ban holds now, from the bans themselves (lifting one early counts at once).
        active = IPBan.objects.filter(
            network=OuterRef("network"), lifted_at__isnull=True, ends_at__gt=Now()
        )
        return super().get_queryset(request).annotate(banned_now=Exists(active))

    @admin.display(description="score now")
    def score_now(self, row: IPActivity) -> str:
        return _score_label(threats.current_score(row))

    @admin.display(description="recorded score")
    def recorded_score(self, row: IPActivity) -> str:
        return f"{row.score:.1f} at {utc_text(row.scored_at)}"

    @admin.display(description="ban")
    def ban_state(self, row: IPActivity) -> str:
        if getattr(row, "banned_now", False):
            return label("banned", "danger")
        return label(f"{row.ban_count} earlier", "") if row.ban_count else "-"


@admin.register(UserActivity)
class UserActivityAdmin(ReadOnlyAdmin):
    """Each signed-in user's threat score (decayed to now): what they did is scored by name."""

    list_display = ("user", "score_now", "events", "first", "last", "last_alert")
    list_filter = (SeenWithinFilter,)
    list_select_related = ("user",)
    search_fields = ("=user__username",)
    ordering = ("-last_seen",)
    fieldsets = (
        (None, {"fields": ("user", "score_now", "recorded_score", "events")}),
        ("Times", {"fields": ("first", "last", "scored", "last_alert")}),
    )

    first = utc_column("first_seen", "first seen")
    last = utc_column("last_seen", "last seen")
    scored = utc_column("scored_at", "scored")
    last_alert = utc_column("last_alert_at", "last alert")

    @admin.display(description="score now")
    def score_now(self, row: UserActivity) -> str:
        return _score_label(threats.current_score(row))

    @admin.display(description="recorded score")
    def recorded_score(self, row: UserActivity) -> str:
        return f"{row.score:.1f} at {utc_text(row.scored_at)}"


# The keys pages live beside this module; importing registers them.
from security import admin_keys  # noqa: E402, F401
