from django.urls import path

from compliance.api import views

urlpatterns = [
    path("audit/events", views.AuditEventListView.as_view(), name="audit-events"),
    path("audit/verify", views.AuditVerifyView.as_view(), name="audit-verify"),
    path("audit/log", views.AuditLogView.as_view(), name="audit-log"),
]
