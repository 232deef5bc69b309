from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.views import APIView

from security.choices import Role


class _RolePermission(BasePermission):
    roles: tuple[str, ...] = ()
    message = "Your account lacks the role this endpoint requires."

    def has_permission(self, request: Request, view: APIView) -> bool:
        user = request.user
        if not (user and user.is_authenticated and user.is_active):
            return False
        if user.is_superuser:
            return True
        return user.groups.filter(name__in=self.roles).exists()


def role_required(*roles: Role) -> type[BasePermission]:
    """A DRF permission class granting access to superusers and members of any of `roles`."""
    names = tuple(str(role) for role in roles)
    return type(
        f"Requires_{'_or_'.join(names)}",
        (_RolePermission,),
        {"roles": names, "message": f"Requires one of the roles: {', '.join(names)}."},
    )


IsOperator = role_required(Role.OPERATOR)
IsSecurityOfficer = role_required(Role.SECURITY_OFFICER)
IsComplianceOfficer = role_required(Role.COMPLIANCE_OFFICER)
HasAnyRole = role_required(Role.OPERATOR, Role.SECURITY_OFFICER, Role.COMPLIANCE_OFFICER)
