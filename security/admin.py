from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html
from unfold.admin import ModelAdmin
from unfold.forms import AdminPasswordChangeForm, UserChangeForm, UserCreationForm

from bridge.admin import AppendOnlyAdmin, ReadOnlyAdmin, label, pretty_json, utc_column
from compliance import proof
from security import bans, services
from security.models import IPBan, SigningKey, TokenFamily, User


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
