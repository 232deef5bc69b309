"""/api/backup/: the seed's ten endpoints and restores' progress (backups/api/views.py)."""

from django.urls import path

from backups.api.views import BackupViewSet, RestoreViewSet

urlpatterns = [
    path("status", BackupViewSet.as_view({"get": "overview"}), name="backup-status"),
    path("list", BackupViewSet.as_view({"get": "list"}), name="backup-list"),
    path("full", BackupViewSet.as_view({"post": "full"}), name="backup-full"),
    path("incremental", BackupViewSet.as_view({"post": "incremental"}), name="backup-incremental"),
    path(
        "point-in-time",
        BackupViewSet.as_view({"post": "point_in_time"}),
        name="backup-point-in-time",
    ),
    path("test", BackupViewSet.as_view({"post": "drill"}), name="backup-test"),
    path("cleanup", BackupViewSet.as_view({"post": "cleanup"}), name="backup-cleanup"),
    path(
        "restore/<uuid:backup_id>",
        BackupViewSet.as_view({"post": "restore"}),
        name="backup-restore",
    ),
    path("restores", RestoreViewSet.as_view({"get": "list"}), name="backup-restore-list"),
    path(
        "restores/<int:pk>",
        RestoreViewSet.as_view({"get": "retrieve"}),
        name="backup-restore-detail",
    ),
    path(
        "<uuid:backup_id>",
        BackupViewSet.as_view({"get": "retrieve", "delete": "destroy"}),
        name="backup-detail",
    ),
]
