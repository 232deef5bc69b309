from django.urls import include, path
from rest_framework.routers import DefaultRouter

from compliance.api import views

router = DefaultRouter(trailing_slash=False)
router.include_root_view = False
router.register("audit/events", views.AuditEventViewSet, basename="audit-event")
router.register(
    "audit/verifications", views.AuditVerificationViewSet, basename="audit-verification"
)
router.register("audit/checkpoints", views.AuditCheckpointViewSet, basename="audit-checkpoint")

urlpatterns = [
    path(
        "audit/verify",
        views.AuditVerificationViewSet.as_view({"get": "latest", "post": "start"}),
        name="audit-verify",
    ),
    path(
        "audit/public-key",
        views.AuditCheckpointViewSet.as_view({"get": "public_key"}),
        name="audit-public-key",
    ),
    path("audit/log", views.AuditLogViewSet.as_view({"post": "create"}), name="audit-log"),
    path("", include("compliance.api.gdpr_urls")),
    path("", include("compliance.api.reports_urls")),
    path("", include("compliance.api.sox_urls")),
    path("", include("compliance.api.retention_urls")),
    path("", include("compliance.api.monitoring_urls")),
    *router.urls,
]
