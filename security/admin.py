from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from security import services
from security.models import TokenFamily, User


@admin.register(User)
class BridgeUserAdmin(UserAdmin):
    list_display = ("username", "email", "is_active", "is_superuser", "roles", "last_login")
    list_filter = ("is_active", "is_superuser", "groups")
    fieldsets = (*UserAdmin.fieldsets, ("Tokens", {"fields": ("token_version",)}))
    readonly_fields = ("token_version", "last_login", "date_joined")
    actions = ["log_out_everywhere"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[User]:
        return super().get_queryset(request).prefetch_related("groups")

    @admin.display(description="roles")
    def roles(self, user: User) -> str:
        return ", ".join(group.name for group in user.groups.all()) or "-"

    @admin.action(description="Log out everywhere (revoke all tokens)")
    def log_out_everywhere(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        for user in queryset:
            services.logout(request=request, user=user)
        self.message_user(request, f"Revoked every token of {queryset.count()} user(s).")


@admin.register(TokenFamily)
class TokenFamilyAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "user",
        "created_at",
        "last_refreshed_at",
        "refresh_count",
        "client_ip",
        "state",
    )
    list_filter = ("revoked_reason",)
    list_select_related = ("user",)
    search_fields = ("=user__username", "=client_ip")
    date_hierarchy = "created_at"
    readonly_fields = [field.name for field in TokenFamily._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    @admin.display(description="state")
    def state(self, family: TokenFamily) -> str:
        if family.revoked_at is None:
            return format_html('<b style="color:#2e9e44">active</b>')
        return format_html(
            '<b style="color:#d1302f">revoked</b> ({})', family.get_revoked_reason_display()
        )

    def get_actions(self, request: HttpRequest) -> dict:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    @admin.action(description="Revoke the selected sessions")
    def revoke(self, request: HttpRequest, queryset: QuerySet[TokenFamily]) -> None:
        count = services.revoke_sessions(request=request, families=queryset)
        self.message_user(request, f"Revoked {count} session(s).", level=messages.WARNING)

    actions = ["revoke"]
