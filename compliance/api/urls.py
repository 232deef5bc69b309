from django.urls import path
from rest_framework.routers import DefaultRouter

from compliance.api import views

router = DefaultRouter(trailing_slash=False)
router.include_root_view = False
router.register("audit/events", views.AuditEventViewSet, basename="audit-event")
router.register(
    "audit/verifications", views.AuditVerificationViewSet, basename="audit-verification"
)

urlpatterns = [
    path(
        "audit/verify",
        views.AuditVerificationViewSet.as_view({"get": "latest", "post": "start"}),
        name="audit-verify",
    ),
    path("audit/log", views.AuditLogViewSet.as_view({"post": "create"}), name="audit-log"),
    *router.urls,
]
