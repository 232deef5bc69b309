"""SOX endpoints under /api/compliance/:

- `GET sox/changes`: recorded row changes of the audited tables, newest first; filters
  `table` (table name or model label), `operation`, `actor`, `from`, `to`
- `GET sox/changes/{id}`: one change, with the row before and after
- `GET approvals`: second-approval requests, newest first; filters `status`, `action`
- `GET approvals/{id}`: one request
- `POST approvals/{id}/approve` `{"note"?}`: a second authorised user approves, which carries
  the action out (a live restore, a key rotation) and shows what it started
- `POST approvals/{id}/reject` `{"reason"}`, `POST approvals/{id}/cancel` (the requester)

The endpoints that start an action needing a second approval (`POST /api/backup/restore/{id}`
for a live restore, `POST /api/security/keys/rotate`) answer 202 with `awaiting_approval()`
instead of starting it while SOX_REQUIRE_SECOND_APPROVAL is on.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.db.models import QuerySet
from django_filters import rest_framework as filters
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, serializers, status
from rest_framework.exceptions import APIException, NotFound, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.reverse import reverse

from bridge.api import (
    BodyRequiredSchema,
    BridgeViewSet,
    ErrorSerializer,
    StrictCharField,
    audit_context,
    has_body,
)
from compliance import approvals, sox
from compliance.choices import ApprovalAction, ApprovalStatus, SoxOperation
from compliance.filters import AuditEventFilterForm, UTCDateTimeFilter
from compliance.models import ApprovalRequest, SoxChange

TAGS = ["compliance"]
CHANGE_REASON_HEADER = "X-Change-Reason"


# --- Changes ----------------------------------------------------------------------------------


class SoxChangeFilter(filters.FilterSet):
    table = filters.CharFilter(
        method="filter_table",
        max_length=100,
        help_text="Table name (security_user) or model label (security.User).",
    )
    operation = filters.ChoiceFilter(choices=SoxOperation.choices)
    actor = filters.CharFilter(
        field_name="actor_username", max_length=150, help_text="Exact username of the actor."
    )
    to = UTCDateTimeFilter(
        field_name="occurred_at", lookup_expr="lt", help_text="ISO 8601 time; changes before it."
    )

    class Meta:
        model = SoxChange
        fields: list[str] = []
        form = AuditEventFilterForm

    def filter_table(self, queryset: QuerySet, name: str, value: str) -> QuerySet:
        return queryset & sox.changes(table=value)


# `from` is a Python keyword, so it cannot be written as a class attribute.
SoxChangeFilter.base_filters["from"] = UTCDateTimeFilter(
    field_name="occurred_at", lookup_expr="gte", help_text="ISO 8601 time; changes at or after it."
)


class SoxChangeSerializer(serializers.ModelSerializer):
    before = serializers.JSONField(
        read_only=True,
        allow_null=True,
        help_text="The row before (null for an insert); secret columns show only "
        f'"{sox.SECRET_CHANGED}" or "{sox.SECRET_UNCHANGED}", personal ones (a user\'s names '
        f'and email) "{sox.PERSONAL_CHANGED}" or "{sox.PERSONAL_UNCHANGED}".',
    )
    after = serializers.JSONField(
        read_only=True, allow_null=True, help_text="The row after (null for a delete)."
    )
    changed_fields = serializers.ListField(child=serializers.CharField(), read_only=True)

    class Meta:
        model = SoxChange
        fields = [
            "id",
            "occurred_at",
            "table_name",
            "model",
            "object_pk",
            "operation",
            "changed_fields",
            "before",
            "after",
            "actor_id",
            "actor_username",
            "request_id",
            "reason",
            "transaction_id",
        ]
        read_only_fields = fields


class SoxChangeViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, BridgeViewSet):
    """The SOX change trail, read-only (its table refuses updates and deletes)."""

    serializer_class = SoxChangeSerializer
    filterset_class = SoxChangeFilter
    lookup_value_regex = r"[0-9]+"
    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "list": ("compliance.view_soxchange",),
        "retrieve": ("compliance.view_soxchange",),
    }

    def get_queryset(self) -> QuerySet[SoxChange]:
        return SoxChange.objects.order_by("-id")

    @extend_schema(tags=TAGS, summary="Recorded changes of the SOX-audited tables, newest first")
    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().list(request, *args, **kwargs)

    @extend_schema(
        tags=TAGS,
        summary="One recorded change: the row before and after, who, why, which request",
        parameters=[
            OpenApiParameter("id", OpenApiTypes.INT, OpenApiParameter.PATH, description="Id.")
        ],
    )
    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().retrieve(request, *args, **kwargs)


# --- Approvals --------------------------------------------------------------------------------


class ApprovalFilter(filters.FilterSet):
    status = filters.ChoiceFilter(choices=ApprovalStatus.choices)
    action = filters.ChoiceFilter(choices=ApprovalAction.choices)

    class Meta:
        model = ApprovalRequest
        fields = ["status", "action"]


class ApprovalSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()
    requested_by = serializers.CharField(source="requested_by_username", read_only=True)
    decided_by = serializers.CharField(source="decided_by_username", read_only=True)
    params = serializers.JSONField(read_only=True, help_text="What the action is to do.")
    result = serializers.JSONField(
        read_only=True,
        help_text="Once approved: what it started (restore_id, job_id...); failed: the error.",
    )

    class Meta:
        model = ApprovalRequest
        fields = [
            "id",
            "url",
            "action",
            "status",
            "params",
            "reason",
            "requested_by",
            "requested_at",
            "expires_at",
            "decided_by",
            "decided_at",
            "decision_note",
            "result",
        ]
        read_only_fields = fields

    def get_url(self, approval: ApprovalRequest) -> str:
        return approval_url(approval, self.context.get("request"))


def approval_url(approval: ApprovalRequest, request: Request | None = None) -> str:
    return reverse("approval-detail", kwargs={"pk": approval.pk}, request=request)


class AwaitingApprovalSerializer(serializers.Serializer):
    """The answer of an endpoint whose action needs a second approval first."""

    status = serializers.ChoiceField(choices=["awaiting_approval"])
    approval = ApprovalSerializer()


class ApprovalFailedSerializer(serializers.Serializer):
    """409: no longer pending or expired (`detail`, `code`), or approved but carrying it out
    failed (`code` from the action, and the request, now `failed`, in `approval`)."""

    detail = serializers.CharField()
    code = serializers.CharField()
    approval = ApprovalSerializer(
        required=False, help_text="Present when the action was approved but failed."
    )


class ApproveRequest(serializers.Serializer):
    note = StrictCharField(required=False, allow_blank=True, max_length=2000, default="")


class RejectRequest(serializers.Serializer):
    reason = StrictCharField(max_length=2000)


class ApprovalRefused(APIException):
    """An approvals.ApprovalError as an answer: its status and code."""

    def __init__(self, error: approvals.ApprovalError) -> None:
        self.status_code = error.status
        super().__init__(detail=str(error), code=error.code)


def awaiting_approval(
    request: Request, *, action: str, params: dict[str, Any], reason: str
) -> Response:
    """Record an approval request for `action` by the caller and answer 202 with it (Location:
    the request, where a second user approves it). Used by the endpoints whose action needs
    a second approval."""
    try:
        approval = approvals.request_approval(
            action=action,
            params=params,
            reason=reason,
            context=audit_context(request),
            user=request.user,
        )
    except approvals.ApprovalError as error:
        raise ApprovalRefused(error) from error
    body = {
        "status": "awaiting_approval",
        "approval": ApprovalSerializer(approval, context={"request": request}).data,
    }
    response = Response(body, status=status.HTTP_202_ACCEPTED)
    response["Location"] = body["approval"]["url"]
    return response


def change_reason(request: Request, given: str | None, default: str) -> str:
    """The reason of a request: the body's field, else the X-Change-Reason header."""
    return (given or "").strip() or sox.reason_from(request._request) or default


def request_body(
    request: Request, serializer_class: type[serializers.Serializer]
) -> dict[str, Any]:
    """The validated JSON object of a POST whose fields are all optional (`{}` takes the
    defaults); an unknown field is refused, never read as "left out"."""
    if not has_body(request) or not isinstance(request.data, dict):
        raise ValidationError({"non_field_errors": ["Send a JSON object ({} for the defaults)."]})
    body = serializer_class(data=request.data)
    unknown = sorted(set(request.data) - set(body.fields))
    if unknown:
        raise ValidationError(
            {name: [f"Unknown field: expected {', '.join(body.fields)}."] for name in unknown}
        )
    body.is_valid(raise_exception=True)
    return body.validated_data


APPROVAL_ID = OpenApiParameter(
    "id", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The request's id."
)


class ApprovalViewSet(BridgeViewSet):
    """Second-approval requests (segregation of duties)."""

    schema = BodyRequiredSchema()
    serializer_class = ApprovalSerializer
    filterset_class = ApprovalFilter
    required_permissions: ClassVar[dict[str, tuple[str, ...]]] = {
        "list": ("compliance.view_approvalrequest",),
        "retrieve": ("compliance.view_approvalrequest",),
        "approve": ("compliance.decide_approvalrequest",),
        "reject": ("compliance.decide_approvalrequest",),
        # Only the requester may, which the service checks; they can see the request.
        "cancel": ("compliance.view_approvalrequest",),
    }

    def get_queryset(self) -> QuerySet[ApprovalRequest]:
        return ApprovalRequest.objects.order_by("-requested_at")

    def _approval(self, pk: Any) -> ApprovalRequest:
        approval = ApprovalRequest.objects.filter(pk=pk).first()
        if approval is None:
            raise NotFound(f"No approval request {pk}.")
        return approval

    def _answer(self, approval: ApprovalRequest, request: Request) -> Response:
        return Response(ApprovalSerializer(approval, context={"request": request}).data)

    @extend_schema(tags=TAGS, summary="Second-approval requests, newest first")
    def list(self, request: Request) -> Response:
        approvals.expire_stale()
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        data = ApprovalSerializer(page, many=True, context={"request": request}).data
        return self.get_paginated_response(data)

    @extend_schema(tags=TAGS, summary="One second-approval request", parameters=[APPROVAL_ID])
    def retrieve(self, request: Request, pk: Any) -> Response:
        approvals.expire_stale()
        return self._answer(self._approval(pk), request)

    @extend_schema(
        tags=TAGS,
        summary="Approve (not your own request): the action is carried out now",
        parameters=[APPROVAL_ID],
        request=ApproveRequest,
        responses={200: ApprovalSerializer, 409: ApprovalFailedSerializer},
    )
    def approve(self, request: Request, pk: Any) -> Response:
        approval = self._approval(pk)
        body = request_body(request, ApproveRequest)
        try:
            approval = approvals.approve(
                approval=approval,
                user=request.user,
                context=audit_context(request),
                note=body["note"],
            )
        except approvals.ApprovalFailed as failed:
            return Response(
                {
                    "detail": str(failed),
                    "code": failed.code,
                    "approval": ApprovalSerializer(
                        failed.approval, context={"request": request}
                    ).data,
                },
                status=status.HTTP_409_CONFLICT,
            )
        except approvals.ApprovalError as error:
            raise ApprovalRefused(error) from error
        return self._answer(approval, request)

    @extend_schema(
        tags=TAGS,
        summary="Reject (not your own request), saying why",
        parameters=[APPROVAL_ID],
        request=RejectRequest,
        responses={200: ApprovalSerializer, 409: ErrorSerializer},
    )
    def reject(self, request: Request, pk: Any) -> Response:
        approval = self._approval(pk)
        body = request_body(request, RejectRequest)
        try:
            approval = approvals.reject(
                approval=approval,
                user=request.user,
                context=audit_context(request),
                reason=body["reason"],
            )
        except approvals.ApprovalError as error:
            raise ApprovalRefused(error) from error
        return self._answer(approval, request)

    @extend_schema(
        tags=TAGS,
        summary="Withdraw your own pending request",
        parameters=[APPROVAL_ID],
        request=None,
        responses={200: ApprovalSerializer, 409: ErrorSerializer},
    )
    def cancel(self, request: Request, pk: Any) -> Response:
        from compliance.api.monitoring_views import refuse_fields

        approval = self._approval(pk)
        refuse_fields(request)
        try:
            approval = approvals.cancel(
                approval=approval, user=request.user, context=audit_context(request)
            )
        except approvals.ApprovalError as error:
            raise ApprovalRefused(error) from error
        return self._answer(approval, request)
