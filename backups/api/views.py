"""The ten `/api/backup/*` endpoints of the seed's Stage 3B, and restores' progress.

- `GET /status`, `GET /list`, `GET /{id}`, `DELETE /{id}`
- `POST /full`, `POST /incremental`, `POST /point-in-time`: 202, the backup and its job
- `POST /restore/{id}`, `POST /test`: 202, the restore (or drill) and its job;
  `GET /restores`, `GET /restores/{id}` show them
- `POST /cleanup`: the retention policy, `{"dry_run": true}` to only see what it would do

Every view is a thin caller of backups/services.py.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    PolymorphicProxySerializer,
    extend_schema,
    inline_serializer,
)
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.reverse import reverse

from backups import services
from backups.choices import BackupKind, Component
from backups.filters import BackupFilter, RestoreJobFilter
from backups.models import Artifact, Backup, BackupCopy, RestoreJob
from bridge.api import (
    BodyRequiredSchema,
    BridgeViewSet,
    ErrorSerializer,
    JobSerializer,
    StrictBooleanField,
    StrictCharField,
    audit_context,
    has_body,
)
from bridge.models import Job
from compliance import approvals
from compliance.api.sox_views import AwaitingApprovalSerializer, awaiting_approval, change_reason
from compliance.choices import ApprovalAction


class ComponentsField(serializers.ListField):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            child=serializers.ChoiceField(choices=Component.choices),
            allow_empty=False,
            max_length=len(Component.values),
            required=False,
            help_text="Components to include (default: all).",
            **kwargs,
        )


class StrictUUIDField(serializers.UUIDField):
    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, str):
            self.fail("invalid", value=data)
        return super().to_internal_value(data)


# --- Responses ------------------------------------------------------------------------------


class JobBriefSerializer(serializers.ModelSerializer):
    percent = serializers.IntegerField(read_only=True, allow_null=True)

    class Meta:
        model = Job
        fields = [
            "id",
            "status",
            "percent",
            "progress_done",
            "progress_total",
            "progress_message",
            "error",
        ]
        read_only_fields = fields


class CopySerializer(serializers.ModelSerializer):
    class Meta:
        model = BackupCopy
        fields = [
            "target",
            "media",
            "offsite",
            "location",
            "size",
            "sha256",
            "status",
            "error",
            "created_at",
            "verified_at",
        ]
        read_only_fields = fields


class ArtifactSerializer(serializers.ModelSerializer):
    copies = CopySerializer(many=True, read_only=True)

    class Meta:
        model = Artifact
        fields = ["name", "component", "raw_bytes", "stored_bytes", "sha256", "chunks", "copies"]
        read_only_fields = fields


class BackupSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()
    parent = serializers.UUIDField(source="parent_id", read_only=True, allow_null=True)
    job = JobBriefSerializer(read_only=True, allow_null=True)
    duration_seconds = serializers.FloatField(read_only=True, allow_null=True)
    copies = serializers.SerializerMethodField()

    class Meta:
        model = Backup
        fields = [
            "id",
            "url",
            "kind",
            "status",
            "components",
            "parent",
            "label",
            "created_by",
            "raw_bytes",
            "stored_bytes",
            "copies",
            "rule_321_ok",
            "rule_321",
            "key_id",
            "restore_point",
            "error",
            "created_at",
            "started_at",
            "finished_at",
            "duration_seconds",
            "verified_at",
            "job",
        ]
        read_only_fields = fields

    def get_url(self, backup: Backup) -> str:
        return reverse(
            "backup-detail", kwargs={"backup_id": backup.pk}, request=self.context.get("request")
        )

    def get_copies(self, backup: Backup) -> int:
        """Complete copies: targets holding every artifact, committed."""
        return int(backup.rule_321.get("copies", 0)) if backup.rule_321 else 0


class BackupDetailSerializer(BackupSerializer):
    artifacts = ArtifactSerializer(many=True, read_only=True)
    manifest = serializers.JSONField(read_only=True)
    children = serializers.SerializerMethodField()

    class Meta(BackupSerializer.Meta):
        fields = [*BackupSerializer.Meta.fields, "wal_lsn", "manifest", "artifacts", "children"]
        read_only_fields = fields

    def get_children(self, backup: Backup) -> list[str]:
        return [str(pk) for pk in backup.children.values_list("pk", flat=True)]


class RestoreSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()
    backup = serializers.CharField(
        source="backup_ref", read_only=True, help_text="The backup's id (kept after it is deleted)."
    )
    safety_backup = serializers.UUIDField(
        source="safety_backup_id", read_only=True, allow_null=True
    )
    job = JobBriefSerializer(read_only=True, allow_null=True)

    class Meta:
        model = RestoreJob
        fields = [
            "id",
            "url",
            "kind",
            "status",
            "backup",
            "components",
            "target_time",
            "dry_run",
            "safety_backup",
            "created_by",
            "result",
            "error",
            "rto_seconds",
            "created_at",
            "started_at",
            "finished_at",
            "job",
        ]
        read_only_fields = fields

    def get_url(self, restore: RestoreJob) -> str:
        return reverse(
            "backup-restore-detail", kwargs={"pk": restore.pk}, request=self.context.get("request")
        )


class StartedBackupSerializer(serializers.Serializer):
    backup = BackupSerializer()
    job = JobSerializer()


class StartedRestoreSerializer(serializers.Serializer):
    restore = RestoreSerializer()
    job = JobSerializer()


# --- Requests -------------------------------------------------------------------------------


class FullRequest(serializers.Serializer):
    components = ComponentsField()
    label = StrictCharField(required=False, allow_blank=True, max_length=200)


class IncrementalRequest(FullRequest):
    parent = StrictUUIDField(
        required=False, help_text="The backup to base it on (default: the newest successful one)."
    )


class RestoreRequest(serializers.Serializer):
    components = ComponentsField()
    target_time = serializers.DateTimeField(
        required=False,
        help_text="PostgreSQL to this second (point-in-time recovery; WAL archiving on).",
    )
    dry_run = StrictBooleanField(
        required=False, default=False, help_text="Verify and say what would be overwritten."
    )
    reason = StrictCharField(
        required=False,
        allow_blank=True,
        max_length=2000,
        help_text="Why (kept with the second-approval request a live restore needs under SOX; "
        "else the X-Change-Reason header).",
    )


class TestRequest(serializers.Serializer):
    backup = StrictUUIDField(required=False, help_text="Default: the newest successful backup.")


class CleanupRequest(serializers.Serializer):
    dry_run = StrictBooleanField(
        required=False, default=False, help_text="Only say what would be deleted and kept."
    )


BACKUP_ID = OpenApiParameter(
    "backup_id", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The backup's id."
)


def _body(request: Request, serializer_class: type[serializers.Serializer]) -> dict[str, Any]:
    if not has_body(request) or not isinstance(request.data, dict):
        raise ValidationError({"non_field_errors": ["Send a JSON object ({} for the defaults)."]})
    body = serializer_class(data=request.data)
    # A misspelt field must not be read as "left out": `{"dryRun": true}` would otherwise
    # become a real restore of everything.
    unknown = sorted(set(request.data) - set(body.fields))
    if unknown:
        raise ValidationError(
            {
                name: [f"Unknown field: expected one of {', '.join(body.fields)}."]
                for name in unknown
            }
        )
    body.is_valid(raise_exception=True)
    return body.validated_data


def _refused(refused: services.BackupRefused) -> Response:
    if refused.field:
        raise ValidationError({refused.field: [str(refused)]})
    return Response({"detail": str(refused), "code": refused.code}, status=status.HTTP_409_CONFLICT)


def _started_backup(backup: Backup, request: Request) -> Response:
    backup = Backup.objects.select_related("job").get(pk=backup.pk)
    body = {
        "backup": BackupSerializer(backup, context={"request": request}).data,
        "job": JobSerializer(backup.job, context={"request": request}).data,
    }
    response = Response(body, status=status.HTTP_202_ACCEPTED)
    response["Location"] = body["job"]["url"]
    return response


def _started_restore(restore: RestoreJob, request: Request) -> Response:
    restore = RestoreJob.objects.select_related("job").get(pk=restore.pk)
    body = {
        "restore": RestoreSerializer(restore, context={"request": request}).data,
        "job": JobSerializer(restore.job, context={"request": request}).data,
    }
    response = Response(body, status=status.HTTP_202_ACCEPTED)
    response["Location"] = body["restore"]["url"]
    return response


def _backup(backup_id: Any, field: str | None = None) -> Backup:
    backup = Backup.objects.filter(pk=backup_id).first()
    if backup is None:
        if field:
            raise ValidationError({field: [f"No backup {backup_id}."]})
        raise NotFound(f"No backup {backup_id}.")
    return backup


class BackupViewSet(BridgeViewSet):
    """Backups: status, list, details, start, delete, restore, drill, retention."""

    schema = BodyRequiredSchema()
    filterset_class = BackupFilter
    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "overview": ("backups.view_backup",),
        "list": ("backups.view_backup",),
        "retrieve": ("backups.view_backup",),
        "destroy": ("backups.delete_backup",),
        "full": ("backups.run_backup",),
        "incremental": ("backups.run_backup",),
        "point_in_time": ("backups.run_backup",),
        "restore": ("backups.restore_backup",),
        "drill": ("backups.verify_backup",),
        "cleanup": ("backups.cleanup_backups",),
    }

    def get_queryset(self) -> QuerySet[Backup]:
        return Backup.objects.select_related("job").order_by("-created_at")

    def get_serializer_class(self) -> type[serializers.Serializer]:
        return BackupDetailSerializer if self.action == "retrieve" else BackupSerializer

    @extend_schema(
        tags=["backup"],
        summary="Backup system status: newest backup against the RPO, 3-2-1, last drill",
        responses={
            200: inline_serializer(
                "BackupSystemStatus",
                {
                    "status": serializers.ChoiceField(choices=["ok", "warn", "bad"]),
                    "problems": serializers.ListField(child=serializers.CharField()),
                    "newest": serializers.JSONField(allow_null=True),
                    "rpo_seconds": serializers.IntegerField(),
                    "last_drill": serializers.JSONField(allow_null=True),
                    "counts": serializers.JSONField(),
                    "targets": serializers.JSONField(),
                    "settings": serializers.JSONField(),
                    "pitr": serializers.JSONField(),
                    "running": serializers.IntegerField(),
                },
            )
        },
    )
    def overview(self, request: Request) -> Response:
        return Response(serializers.JSONField().to_representation(services.status()))

    @extend_schema(tags=["backup"], summary="List backups (newest first)")
    def list(self, request: Request) -> Response:
        services.reap_backups()
        queryset = self.filter_queryset(self.get_queryset())
        page = self.paginate_queryset(queryset)
        data = BackupSerializer(page, many=True, context={"request": request}).data
        return self.get_paginated_response(data)

    @extend_schema(
        tags=["backup"],
        summary="A backup: its manifest, artifacts and every copy with target and SHA-256",
        parameters=[BACKUP_ID],
    )
    def retrieve(self, request: Request, backup_id: Any) -> Response:
        backup = _backup(backup_id)
        backup = (
            Backup.objects.select_related("job")
            .prefetch_related("artifacts__copies")
            .get(pk=backup.pk)
        )
        return Response(BackupDetailSerializer(backup, context={"request": request}).data)

    @extend_schema(
        tags=["backup"],
        summary="Delete a backup and its copies (refused while others depend on it)",
        parameters=[BACKUP_ID],
        request=None,
        responses={
            200: inline_serializer(
                "BackupDeleted",
                {
                    "id": serializers.UUIDField(),
                    "kind": serializers.CharField(),
                    "copies": serializers.IntegerField(),
                },
            ),
            409: ErrorSerializer,
        },
    )
    def destroy(self, request: Request, backup_id: Any) -> Response:
        backup = _backup(backup_id)
        try:
            return Response(services.delete_backup(backup=backup, context=audit_context(request)))
        except services.BackupRefused as refused:
            return _refused(refused)

    def _start(self, request: Request, kind: str, body: dict[str, Any]) -> Response:
        parent = _backup(body["parent"], "parent") if body.get("parent") else None
        try:
            backup = services.start_backup(
                kind=kind,
                context=audit_context(request),
                components=body.get("components"),
                parent=parent,
                label=body.get("label", ""),
            )
        except services.BackupRefused as refused:
            return _refused(refused)
        return _started_backup(backup, request)

    @extend_schema(
        tags=["backup"],
        summary="Start a full backup of every (or the listed) component",
        request=FullRequest,
        responses={202: StartedBackupSerializer, 409: ErrorSerializer},
    )
    def full(self, request: Request) -> Response:
        return self._start(request, BackupKind.FULL, _body(request, FullRequest))

    @extend_schema(
        tags=["backup"],
        summary="Start an incremental backup on a parent (changed files, WAL since the parent)",
        request=IncrementalRequest,
        responses={202: StartedBackupSerializer, 409: ErrorSerializer},
    )
    def incremental(self, request: Request) -> Response:
        return self._start(request, BackupKind.INCREMENTAL, _body(request, IncrementalRequest))

    @extend_schema(
        tags=["backup"],
        summary="Create a named restore point and a consistent snapshot of the components",
        request=FullRequest,
        responses={202: StartedBackupSerializer, 409: ErrorSerializer},
    )
    def point_in_time(self, request: Request) -> Response:
        return self._start(request, BackupKind.POINT_IN_TIME, _body(request, FullRequest))

    @extend_schema(
        tags=["backup"],
        summary="Restore a backup (its chain) onto the live system, or PostgreSQL to a time",
        parameters=[BACKUP_ID],
        description=(
            "With SOX_REQUIRE_SECOND_APPROVAL on, a live (not dry-run) restore is not started: "
            "the answer is an approval request (status awaiting_approval, Location: the "
            "request) that a second user with backups.restore_backup approves at "
            "/api/compliance/approvals/{id}/approve, which starts the restore."
        ),
        request=RestoreRequest,
        responses={
            202: PolymorphicProxySerializer(
                component_name="RestoreStartedOrAwaitingApproval",
                serializers=[StartedRestoreSerializer, AwaitingApprovalSerializer],
                resource_type_field_name=None,
            ),
            409: ErrorSerializer,
        },
    )
    def restore(self, request: Request, backup_id: Any) -> Response:
        backup = _backup(backup_id)
        body = _body(request, RestoreRequest)
        if not body["dry_run"] and approvals.requires_approval(ApprovalAction.LIVE_RESTORE):
            try:
                params = services.restore_approval_params(
                    backup=backup,
                    components=body.get("components"),
                    target_time=body.get("target_time"),
                )
            except services.BackupRefused as refused:
                return _refused(refused)
            return awaiting_approval(
                request,
                action=ApprovalAction.LIVE_RESTORE,
                params=params,
                reason=change_reason(
                    request, body.get("reason"), f"Live restore of backup {backup.pk}"
                ),
            )
        try:
            restore = services.start_restore(
                backup=backup,
                context=audit_context(request),
                components=body.get("components"),
                target_time=body.get("target_time"),
                dry_run=body["dry_run"],
            )
        except services.BackupRefused as refused:
            return _refused(refused)
        return _started_restore(restore, request)

    @extend_schema(
        tags=["backup"],
        summary="Restore drill: restore the newest backup into scratch space and compare",
        request=TestRequest,
        responses={202: StartedRestoreSerializer, 409: ErrorSerializer},
    )
    def drill(self, request: Request) -> Response:
        body = _body(request, TestRequest)
        backup = _backup(body["backup"], "backup") if body.get("backup") else None
        try:
            restore = services.start_drill(context=audit_context(request), backup=backup)
        except services.BackupRefused as refused:
            return _refused(refused)
        return _started_restore(restore, request)

    @extend_schema(
        tags=["backup"],
        summary="Apply the retention policy: what was deleted and kept, with reasons",
        request=CleanupRequest,
        responses={
            200: inline_serializer(
                "BackupCleanup",
                {
                    "dry_run": serializers.BooleanField(),
                    "deleted": serializers.JSONField(),
                    "kept": serializers.JSONField(),
                    "wal": serializers.JSONField(),
                },
            )
        },
    )
    def cleanup(self, request: Request) -> Response:
        body = _body(request, CleanupRequest)
        summary = services.cleanup(context=audit_context(request), dry_run=body["dry_run"])
        return Response(summary)


class RestoreViewSet(BridgeViewSet):
    """Restores and drills, with their progress."""

    filterset_class = RestoreJobFilter
    serializer_class = RestoreSerializer
    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "list": ("backups.view_restorejob",),
        "retrieve": ("backups.view_restorejob",),
    }

    def get_queryset(self) -> QuerySet[RestoreJob]:
        return RestoreJob.objects.select_related("job").order_by("-created_at")

    @extend_schema(tags=["backup"], summary="Restores and restore drills (newest first)")
    def list(self, request: Request) -> Response:
        services.reap_backups()
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        data = RestoreSerializer(page, many=True, context={"request": request}).data
        return self.get_paginated_response(data)

    @extend_schema(tags=["backup"], summary="A restore or drill: status, progress, result")
    def retrieve(self, request: Request, pk: int) -> Response:
        services.reap_backups()
        restore = self.get_queryset().filter(pk=pk).first()
        if restore is None:
            raise NotFound(f"No restore {pk}.")
        return Response(RestoreSerializer(restore, context={"request": request}).data)
