"""One row generator per report type.

A source knows its columns, its filters, how to read its rows for a period (streamed: large
tables are read in bounded windows of ids as value tuples, never as model instances), the
charts of its PDF summary, and the evidence it adds to the manifest once its rows are read.
Every audit event shown goes through `compliance.personal` (a `Revealer`), which reads sealed
personal data and says when it was erased.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, ClassVar

from django.contrib.auth import get_user_model
from django.db.models import Count, Max, Q, QuerySet

from backups.choices import BackupKind, BackupStatus, RestoreKind, RestoreStatus
from backups.models import Backup, RestoreJob
from bridge.roles import Role
from compliance import personal as personal_data
from compliance.choices import (
    AuditAction,
    DsrStatus,
    DsrType,
    ReportType,
    SoxOperation,
)
from compliance.models import AuditEvent, DataSubjectRequest, SoxChange
from compliance.reports.reading import audit_batches, windowed
from compliance.reports.writers import Chart, json_text_of
from security.choices import ThreatKind
from security.models import ThreatEvent


class SourceError(Exception):
    """A report cannot be made as asked (a module it needs is missing, say): it fails, loudly,
    rather than leave out what it cannot read."""


@dataclass(frozen=True)
class FilterSpec:
    """One filter a report type accepts: free text (exact match), one of `choices`, or a
    JSON boolean."""

    kind: str
    help: str
    max_length: int = 150
    choices: tuple[str, ...] = ()


def _time(moment: datetime | None) -> str | None:
    # As the audit trail writes times: ISO 8601 in UTC with microseconds, so that text order
    # is time order and a chart's bucket is a prefix.
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _date(value: date | None) -> str | None:
    return value.isoformat() if value is not None else None


class ReportSource:
    """A report type's rows for one period; subclasses fill in the class attributes."""

    type: ClassVar[str]
    title: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]
    widths: ClassVar[tuple[float, ...]]
    filters: ClassVar[dict[str, FilterSpec]] = {}

    def __init__(
        self,
        *,
        period_from: datetime,
        period_to: datetime,
        filters: dict[str, Any],
        checkpoint: dict[str, Any] | None,
        now: datetime,
        json_text: bool = False,
    ) -> None:
        # json_text: JSON-valued cells as compact JSON text rather than dicts (the CSV writer
        # then writes them as they are; a source may ignore it).
        self.json_text = json_text
        self.period_from = period_from
        self.period_to = period_to
        self.chosen = dict(filters)
        self.checkpoint = checkpoint or {}
        self.now = now

    @property
    def period(self) -> tuple[datetime, datetime]:
        return self.period_from, self.period_to

    def in_period(self, field: str) -> Q:
        return Q(**{f"{field}__gte": self.period_from, f"{field}__lt": self.period_to})

    def rows(self) -> Iterator[tuple]:
        raise SourceError(f"{type(self).__name__} defines no rows")

    def charts(self) -> list[Chart]:
        return []

    def estimate(self) -> int | None:
        """Roughly how many rows (for progress), or None."""
        return None

    def evidence(self) -> dict[str, Any]:
        """What the manifest states besides the rows, once they are read."""
        return {}


# --- Audit events (the audit trail and security events) ----------------------------------


class _Coverage:
    """Whether the audit rows shown are sealed in the chain under the report's checkpoint."""

    def __init__(self, checkpoint: dict[str, Any]) -> None:
        number = checkpoint.get("number")
        self.number = number
        self.seq = checkpoint.get("seq") if number is not None else None
        self.unsealed = 0
        self.after = 0
        self.rows = 0
        self.erased = 0
        self.unreadable = 0

    def evidence(self) -> dict[str, Any]:
        covered = self.number is not None and self.unsealed == 0 and self.after == 0
        return {
            "checkpoint": self.number,
            "checkpoint_seq": self.seq,
            "audit_rows": self.rows,
            "all_rows_sealed_under_checkpoint": covered,
            "rows_not_yet_sealed": self.unsealed,
            "rows_sealed_after_checkpoint": self.after,
            "rows_with_erased_personal_data": self.erased,
            "rows_with_unreadable_personal_data": self.unreadable,
        }


def _audit_rows(
    queryset: QuerySet, coverage: _Coverage, actor: str | None, json_text: bool
) -> Iterator[tuple]:
    """(id, seq, time, actor, client_ip, action, object_type, object_id, method, path,
    status_code, request_id, details, personal_data) of each event in id order, its personal
    data revealed (`personal_data` is "erased" once the subject's key was destroyed,
    "unreadable: <why>" when sealed data cannot be read otherwise, else blank).

    One Revealer per report: it unwraps each subject's key once, however many rows are theirs.
    An actor filter goes through the blind index, so sealed actors are found too. `json_text`:
    details as compact JSON text (for CSV) rather than a dict; an event without sealed data
    then gives its stored canonical text, which is what `reveal` parsed.
    """
    if actor is not None:
        queryset = queryset.filter(personal_data.actor_match(actor))
    reveal = personal_data.Revealer().reveal
    checkpoint_seq = coverage.seq if coverage.seq is not None else -1
    unsealed = after = count = erased = unreadable = 0
    to_text = json_text_of
    try:
        for rows, seals in audit_batches(queryset):
            for (
                pk,
                at,
                actor_username,
                actor_index,
                client_ip,
                personal,
                action,
                object_type,
                object_id,
                method,
                path,
                status_code,
                request_id,
                details,
            ) in rows:
                seq, hash_version = seals.get(pk, (None, None))
                shown = reveal(
                    actor_username=actor_username,
                    client_ip=client_ip,
                    personal=personal,
                    details=details,
                    actor_index=actor_index,
                    hash_version=hash_version,
                    event_id=pk,
                )
                count += 1
                if seq is None:
                    unsealed += 1
                elif seq > checkpoint_seq:
                    after += 1
                if shown.erased:
                    erased += 1
                    state = "erased"
                elif shown.problem:
                    unreadable += 1
                    state = f"unreadable: {shown.problem}"
                else:
                    state = ""
                if json_text:
                    shown_details = details if not personal else to_text(shown.details)
                else:
                    shown_details = shown.details
                yield (
                    pk,
                    seq,
                    at,
                    shown.actor_username,
                    shown.client_ip,
                    action,
                    object_type,
                    object_id,
                    method,
                    path,
                    status_code,
                    request_id,
                    shown_details,
                    state,
                )
    finally:
        coverage.unsealed += unsealed
        coverage.after += after
        coverage.rows += count
        coverage.erased += erased
        coverage.unreadable += unreadable


def _text(help_text: str, max_length: int = 150) -> FilterSpec:
    return FilterSpec("text", help_text, max_length=max_length)


def _choice(help_text: str, choices: tuple[str, ...]) -> FilterSpec:
    return FilterSpec("choice", help_text, choices=choices)


class AuditTrailSource(ReportSource):
    type = ReportType.AUDIT_TRAIL
    title = "Audit trail"
    columns = (
        "id",
        "seq",
        "time",
        "actor",
        "client_ip",
        "action",
        "object_type",
        "object_id",
        "method",
        "path",
        "status_code",
        "request_id",
        "details",
        "personal_data",
    )
    widths = (0.6, 0.6, 1.9, 1.0, 1.1, 1.5, 1.1, 1.0, 0.5, 1.8, 0.5, 1.2, 3.0, 0.7)
    filters: ClassVar[dict[str, FilterSpec]] = {
        "action": _text("Only events of this action (exact, e.g. auth.login.failed).", 64),
        "actor": _text("Only events by this username (exact; sealed actors included)."),
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.coverage = _Coverage(self.checkpoint)

    def queryset(self) -> QuerySet:
        events = AuditEvent.objects.filter(self.in_period("occurred_at"))
        if "action" in self.chosen:
            events = events.filter(action=self.chosen["action"])
        return events

    def rows(self) -> Iterator[tuple]:
        return _audit_rows(self.queryset(), self.coverage, self.chosen.get("actor"), self.json_text)

    def estimate(self) -> int | None:
        return self.queryset().count()

    def charts(self) -> list[Chart]:
        return [
            Chart("Events", lambda row: row[2], period=self.period),
            Chart("Events per action (largest)", lambda row: row[5]),
        ]

    def evidence(self) -> dict[str, Any]:
        return {"sealing": self.coverage.evidence()}


# Security and authentication actions of the audit trail (the security events report).
SECURITY_ACTIONS: tuple[str, ...] = (
    AuditAction.LOGIN_FAILED,
    AuditAction.LOCKED_OUT,
    AuditAction.TOKEN_REUSE_DETECTED,
    AuditAction.SESSIONS_REVOKED,
    AuditAction.OTP_ENROLLED,
    AuditAction.OTP_FAILED,
    AuditAction.OTP_REMOVED,
    AuditAction.RATE_LIMITED,
    AuditAction.IP_BANNED,
    AuditAction.IP_UNBANNED,
    AuditAction.DECRYPTION_FAILED,
    AuditAction.KEYS_ROTATED,
    AuditAction.SIGNING_KEY_ROTATED,
    AuditAction.SUBJECT_KEYS_BACKED_UP,
    AuditAction.SUBJECT_KEYS_RESTORED,
    AuditAction.SECURITY_RESET,
    AuditAction.SECURITY_SELF_TEST,
    AuditAction.THREAT_ALERT,
    AuditAction.ADMIN_ACCOUNT,
    AuditAction.AUDIT_BROKEN,
    AuditAction.CHECKPOINT_FAILED,
    AuditAction.CHECKPOINT_REFUSED,
    AuditAction.CHECKPOINT_NOT_SIGNED,
    AuditAction.AUDIT_PURGE_REFUSED,
)


class SecurityEventsSource(ReportSource):
    type = ReportType.SECURITY_EVENTS
    title = "Security events"
    columns = (
        "source",
        "id",
        "seq",
        "time",
        "action",
        "layer",
        "score",
        "actor",
        "client_ip",
        "path",
        "status_code",
        "request_id",
        "details",
        "personal_data",
    )
    widths = (0.6, 0.6, 0.6, 1.9, 1.7, 0.9, 0.5, 1.0, 1.1, 1.6, 0.5, 1.2, 3.0, 0.6)
    filters: ClassVar[dict[str, FilterSpec]] = {
        "source": _choice(
            "audit (the audit trail's security actions) or threat.", ("audit", "threat")
        ),
        "action": _choice(
            "One security action of the audit trail, or one threat kind.",
            (*SECURITY_ACTIONS, *ThreatKind.values),
        ),
        "actor": _text("Only events by this username (exact)."),
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.coverage = _Coverage(self.checkpoint)
        action = self.chosen.get("action")
        source = self.chosen.get("source")
        self.audit_actions = [a for a in SECURITY_ACTIONS if action in (None, a)]
        self.threat_kinds = [k for k in ThreatKind.values if action in (None, k)]
        if source == "threat":
            self.audit_actions = []
        if source == "audit":
            self.threat_kinds = []

    def audit_queryset(self) -> QuerySet:
        return AuditEvent.objects.filter(
            self.in_period("occurred_at"), action__in=self.audit_actions
        )

    def threat_queryset(self) -> QuerySet:
        threats = ThreatEvent.objects.filter(
            self.in_period("occurred_at"), kind__in=self.threat_kinds
        )
        if "actor" in self.chosen:
            threats = threats.filter(user__username=self.chosen["actor"])
        return threats

    def _audit(self) -> Iterator[tuple]:
        if not self.audit_actions:
            return
        rows = _audit_rows(
            self.audit_queryset(), self.coverage, self.chosen.get("actor"), self.json_text
        )
        for row in rows:
            # The audit trail's columns, less the object (a security event's is its path).
            pk, seq, at, actor, ip, action, path, status, request_id, details, state = (
                row[0], row[1], row[2], row[3], row[4], row[5], row[9], row[10], row[11],
                row[12], row[13],
            )  # fmt: skip
            yield (
                "audit", pk, seq, at, action, "", None, actor, ip, path, status, request_id,
                details, state,
            )  # fmt: skip

    def _threats(self) -> Iterator[tuple]:
        if not self.threat_kinds:
            return
        fields = (
            "id",
            "occurred_at",
            "kind",
            "layer",
            "score",
            "user__username",
            "network",
            "path",
            "details",
        )
        for pk, at, kind, layer, score, username, network, path, details in windowed(
            self.threat_queryset(), fields
        ):
            yield (
                "threat",
                pk,
                None,
                _time(at),
                kind,
                layer,
                score,
                username or "",
                network or None,
                path,
                None,
                "",
                details,
                "",
            )

    def rows(self) -> Iterator[tuple]:
        # One timeline: both streams are read in id order, which is time order but for events
        # recorded within moments of each other.
        return heapq.merge(self._audit(), self._threats(), key=lambda row: row[3])

    def estimate(self) -> int | None:
        audit = self.audit_queryset().count() if self.audit_actions else 0
        return audit + (self.threat_queryset().count() if self.threat_kinds else 0)

    def charts(self) -> list[Chart]:
        return [
            Chart("Security events", lambda row: row[3], period=self.period),
            Chart("Security events per action or threat kind", lambda row: row[4]),
        ]

    def evidence(self) -> dict[str, Any]:
        return {"sealing": self.coverage.evidence()}


# --- Access review ---------------------------------------------------------------------------

# Actions that change Bridge or its data, or read secrets: what an access review counts per
# user ("privileged actions in the period").
PRIVILEGED_ACTIONS: tuple[str, ...] = (
    AuditAction.ADMIN_CHANGE,
    AuditAction.ADMIN_REQUEST,
    AuditAction.ADMIN_ACCOUNT,
    AuditAction.SESSIONS_REVOKED,
    AuditAction.OTP_REMOVED,
    AuditAction.IP_UNBANNED,
    AuditAction.SIGNING_KEY_ROTATED,
    AuditAction.DATA_DECRYPTED,
    AuditAction.KEYS_ROTATED,
    AuditAction.SUBJECT_KEYS_BACKED_UP,
    AuditAction.SUBJECT_KEYS_RESTORED,
    AuditAction.SECURITY_RESET,
    AuditAction.JOB_CANCEL_REQUESTED,
    AuditAction.HEAL_REQUESTED,
    AuditAction.RECOVERY_RESET,
    AuditAction.BREAKER_RESET,
    AuditAction.BREAKER_FORCED_OPEN,
    AuditAction.BREAKER_DISABLED,
    AuditAction.SERVICE_CREATED,
    AuditAction.SERVICE_UPDATED,
    AuditAction.SERVICE_DELETED,
    AuditAction.BACKUP_REQUESTED,
    AuditAction.BACKUP_DELETED,
    AuditAction.BACKUP_RESTORE_REQUESTED,
    AuditAction.BACKUP_CLEANUP,
    AuditAction.AUDIT_EXPORTED,
    AuditAction.AUDIT_PURGED,
    AuditAction.DSR_VERIFIED,
    AuditAction.DSR_EXTENDED,
    AuditAction.DSR_REJECTED,
    AuditAction.DSR_RECTIFIED,
    AuditAction.DSR_ERASED,
    AuditAction.DSR_EXPORT_DOWNLOADED,
    AuditAction.CONSENT_RECORDED,
    AuditAction.APPROVAL_REQUESTED,
    AuditAction.APPROVAL_APPROVED,
    AuditAction.APPROVAL_REJECTED,
    AuditAction.LEGAL_HOLD_PLACED,
    AuditAction.LEGAL_HOLD_RELEASED,
    AuditAction.RETENTION_RUN,
    AuditAction.REPORT_REQUESTED,
    AuditAction.REPORT_DOWNLOADED,
)


class AccessReviewSource(ReportSource):
    type = ReportType.ACCESS_REVIEW
    title = "Access review"
    columns = (
        "username",
        "full_name",
        "email",
        "active",
        "staff",
        "superuser",
        "roles",
        "other_groups",
        "direct_permissions",
        "date_joined",
        "last_login",
        "privileged_actions",
        "last_privileged_action",
    )
    widths = (1.2, 1.3, 1.6, 0.5, 0.5, 0.6, 1.6, 1.0, 2.0, 1.6, 1.6, 0.7, 1.6)
    filters: ClassVar[dict[str, FilterSpec]] = {
        "user": _text("Only this username (exact)."),
        "role": _choice("Only members of this role.", tuple(Role.values)),
        "active": FilterSpec("bool", "true: active accounts only; false: disabled ones only."),
    }

    def users(self) -> QuerySet:
        users = get_user_model().objects.order_by("username")
        if "user" in self.chosen:
            users = users.filter(username=self.chosen["user"])
        if "role" in self.chosen:
            users = users.filter(groups__name=self.chosen["role"])
        if "active" in self.chosen:
            users = users.filter(is_active=self.chosen["active"])
        return users.distinct()

    def activity(self) -> dict[int, tuple[int, datetime | None]]:
        """Per actor id: privileged actions in the period and the newest one's time (actor ids
        stay plain on sealed events: no personal data is read to count them)."""
        rows = (
            AuditEvent.objects.filter(
                self.in_period("occurred_at"),
                action__in=PRIVILEGED_ACTIONS,
                actor_id__isnull=False,
            )
            .order_by()
            .values("actor_id")
            .annotate(actions=Count("id"), newest=Max("occurred_at"))
        )
        return {row["actor_id"]: (row["actions"], row["newest"]) for row in rows}

    def rows(self) -> Iterator[tuple]:
        activity = self.activity()
        roles = set(Role.values)
        users = self.users().prefetch_related("groups", "user_permissions__content_type")
        for user in users.iterator(chunk_size=500):
            groups = sorted(group.name for group in user.groups.all())
            permissions = sorted(
                f"{permission.content_type.app_label}.{permission.codename}"
                for permission in user.user_permissions.all()
            )
            actions, newest = activity.get(user.pk, (0, None))
            yield (
                user.get_username(),
                user.get_full_name(),
                user.email,
                user.is_active,
                user.is_staff,
                user.is_superuser,
                "; ".join(name for name in groups if name in roles),
                "; ".join(name for name in groups if name not in roles),
                "; ".join(permissions),
                _time(user.date_joined),
                _time(user.last_login),
                actions,
                _time(newest),
            )

    def estimate(self) -> int | None:
        return self.users().count()

    def charts(self) -> list[Chart]:
        def roles_of(row: tuple) -> list[str]:
            found = [name for name in row[6].split("; ") if name]
            if row[5]:
                found.append("superuser")
            return found or ["no role"]

        return [
            Chart("Users per role", roles_of),
            Chart("Privileged actions per user (largest)", _privileged_bars),
        ]

    def evidence(self) -> dict[str, Any]:
        return {"privileged_actions_counted": list(PRIVILEGED_ACTIONS)}


def _privileged_bars(row: tuple) -> dict[str, int] | None:
    # One bar per user, its height the user's privileged actions (a mapping adds its counts).
    return {row[0]: row[11]} if row[11] else None


# --- GDPR requests ---------------------------------------------------------------------------


def _closed_at(status: str, completed_at: datetime | None, history: Any) -> datetime | None:
    """When the request was answered: its completion, or for a rejection the history entry
    that rejected it (a rejection is an answer, due by the same date)."""
    if completed_at is not None or status != DsrStatus.REJECTED:
        return completed_at
    for entry in reversed(history if isinstance(history, list) else []):
        if isinstance(entry, dict) and entry.get("status") == DsrStatus.REJECTED:
            for key in ("at", "time", "changed_at"):
                value = entry.get(key)
                if isinstance(value, str):
                    try:
                        return datetime.fromisoformat(value).astimezone(UTC)
                    except ValueError:
                        continue
    return None


class GdprRequestsSource(ReportSource):
    type = ReportType.GDPR_REQUESTS
    title = "GDPR data subject requests"
    columns = (
        "id",
        "subject_id",
        "type",
        "status",
        "received_at",
        "due_date",
        "verified_at",
        "extended",
        "extension_months",
        "extension_reason",
        "paused_days",
        "closed_at",
        "on_time",
        "days_to_close",
        "rejected_reason",
    )
    widths = (2.2, 1.4, 0.9, 0.8, 1.7, 0.8, 1.7, 0.5, 0.5, 1.5, 0.5, 1.7, 0.6, 0.5, 1.5)
    filters: ClassVar[dict[str, FilterSpec]] = {
        "status": _choice("Only requests in this status.", tuple(DsrStatus.values)),
        "type": _choice("Only requests of this type.", tuple(DsrType.values)),
    }

    def queryset(self) -> QuerySet:
        requests = DataSubjectRequest.objects.filter(self.in_period("received_at"))
        for name in ("status", "type"):
            if name in self.chosen:
                requests = requests.filter(**{name: self.chosen[name]})
        return requests

    def rows(self) -> Iterator[tuple]:
        today = self.now.astimezone(UTC).date()
        fields = (
            "id",
            "subject_id",
            "type",
            "status",
            "received_at",
            "due_date",
            "verified_at",
            "extended_at",
            "extension_months",
            "extension_reason",
            "paused_days",
            "completed_at",
            "rejected_reason",
            "history",
        )
        rows = self.queryset().order_by("received_at", "id").values_list(*fields)
        for (
            pk,
            subject_id,
            kind,
            status,
            received_at,
            due_date,
            verified_at,
            extended_at,
            extension_months,
            extension_reason,
            paused_days,
            completed_at,
            rejected_reason,
            history,
        ) in rows.iterator(chunk_size=1000):
            closed = _closed_at(status, completed_at, history)
            if closed is not None:
                on_time = "yes" if closed.astimezone(UTC).date() <= due_date else "no"
                days = (closed - received_at).days
            elif status in (DsrStatus.COMPLETED, DsrStatus.REJECTED):
                on_time, days = "unknown", None
            else:
                on_time, days = ("open" if today <= due_date else "overdue"), None
            yield (
                str(pk),
                subject_id,
                kind,
                status,
                _time(received_at),
                _date(due_date),
                _time(verified_at),
                extended_at is not None or extension_months > 0,
                extension_months,
                extension_reason,
                paused_days,
                _time(closed),
                on_time,
                days,
                rejected_reason,
            )

    def estimate(self) -> int | None:
        return self.queryset().count()

    def charts(self) -> list[Chart]:
        return [
            Chart("Requests by deadline outcome", lambda row: row[12]),
            Chart("Requests received", lambda row: row[4], period=self.period),
        ]


# --- SOX changes and segregation of duties --------------------------------------------------


def _first(item: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        value = item.get(key)
        if value not in (None, ""):
            return value
    return None


def _conflicts_reader() -> Callable[..., Any]:
    """compliance.approvals.sod_conflicts, or SourceError naming what is missing: a SOX report
    without its segregation-of-duties conflicts would claim there were none."""
    try:
        from compliance import approvals
    except ImportError as exc:
        raise SourceError(
            "the SOX report needs compliance.approvals.sod_conflicts (segregation-of-duties "
            f"conflicts), and compliance.approvals cannot be imported: {exc}"
        ) from exc
    reader = getattr(approvals, "sod_conflicts", None)
    if not callable(reader):
        raise SourceError(
            "the SOX report needs compliance.approvals.sod_conflicts (segregation-of-duties "
            "conflicts), which compliance.approvals does not define"
        )
    return reader


class SoxChangesSource(ReportSource):
    type = ReportType.SOX_CHANGES
    title = "SOX changes and segregation of duties"
    columns = (
        "record",
        "id",
        "time",
        "table",
        "model",
        "object_pk",
        "operation",
        "changed_fields",
        "actor",
        "request_id",
        "reason",
        "transaction_id",
        "before",
        "after",
        "details",
    )
    widths = (0.9, 0.6, 1.8, 1.2, 1.1, 0.7, 0.7, 1.4, 1.0, 1.1, 1.3, 0.7, 2.0, 2.0, 1.5)
    filters: ClassVar[dict[str, FilterSpec]] = {
        "table": _text("Only changes of this database table (exact).", 100),
        "operation": _choice("Only this operation.", tuple(SoxOperation.values)),
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Checked before any file is written: the report fails at once, naming the module.
        self._sod_conflicts = _conflicts_reader()
        self.conflict_count = 0
        self.change_count = 0

    def queryset(self) -> QuerySet:
        changes = SoxChange.objects.filter(self.in_period("occurred_at"))
        if "table" in self.chosen:
            changes = changes.filter(table_name=self.chosen["table"])
        if "operation" in self.chosen:
            changes = changes.filter(operation=self.chosen["operation"])
        return changes

    def conflicts(self) -> list[dict[str, Any]]:
        found = self._sod_conflicts(since=self.period_from, until=self.period_to)
        if not isinstance(found, list) or not all(isinstance(item, dict) for item in found):
            raise SourceError(
                "compliance.approvals.sod_conflicts did not return a list of dicts "
                f"({type(found).__name__})"
            )
        return found

    def rows(self) -> Iterator[tuple]:
        for conflict in self.conflicts():
            self.conflict_count += 1
            moment = _first(
                conflict, "time", "at", "occurred_at", "decided_at", "requested_at", "detected_at"
            )
            yield (
                "sod_conflict",
                str(_first(conflict, "id", "approval_id", "key") or ""),
                _time(moment) if isinstance(moment, datetime) else moment,
                "",
                "",
                "",
                "",
                None,
                str(_first(conflict, "actor", "user", "username", "requested_by") or ""),
                str(_first(conflict, "request_id") or ""),
                str(_first(conflict, "summary", "reason", "rule", "action") or ""),
                None,
                None,
                None,
                conflict,
            )
        fields = (
            "id",
            "occurred_at",
            "table_name",
            "model",
            "object_pk",
            "operation",
            "changed_fields",
            "actor_username",
            "request_id",
            "reason",
            "transaction_id",
            "before",
            "after",
        )
        for (
            pk,
            at,
            table,
            model,
            object_pk,
            operation,
            changed,
            actor,
            request_id,
            reason,
            transaction_id,
            before,
            after,
        ) in windowed(self.queryset(), fields):
            self.change_count += 1
            yield (
                "change",
                pk,
                _time(at),
                table,
                model,
                object_pk,
                operation,
                changed,
                actor,
                request_id,
                reason,
                transaction_id,
                before,
                after,
                None,
            )

    def estimate(self) -> int | None:
        return self.queryset().count()

    def charts(self) -> list[Chart]:
        return [
            Chart(
                "Changes per table, and segregation-of-duties conflicts",
                lambda row: row[3] if row[0] == "change" else "SoD conflicts",
            ),
            Chart(
                "Changes", lambda row: row[2] if row[0] == "change" else None, period=self.period
            ),
        ]

    def evidence(self) -> dict[str, Any]:
        return {"changes": self.change_count, "sod_conflicts": self.conflict_count}


# --- Backup evidence ---------------------------------------------------------------------------


class BackupEvidenceSource(ReportSource):
    type = ReportType.BACKUP_EVIDENCE
    title = "Backup evidence"
    columns = (
        "record",
        "id",
        "backup",
        "time",
        "finished_at",
        "kind",
        "status",
        "components",
        "artifact",
        "target",
        "media",
        "offsite",
        "size",
        "sha256",
        "copies",
        "rule_321_ok",
        "verified_at",
        "rto_seconds",
        "details",
        "error",
    )
    widths = (
        0.6,
        1.3,
        1.3,
        1.5,
        1.5,
        0.7,
        0.7,
        1.0,
        1.1,
        0.8,
        0.5,
        0.4,
        0.7,
        2.2,
        0.4,
        0.5,
        1.5,
        0.5,
        1.6,
        1.0,
    )
    filters: ClassVar[dict[str, FilterSpec]] = {
        "kind": _choice(
            "Only backups of this kind (drills are always listed).", tuple(BackupKind.values)
        ),
        "status": _choice(
            "Only backups in this status (drills are always listed).", tuple(BackupStatus.values)
        ),
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tally = {
            "backups": 0,
            "backups_succeeded": 0,
            "backups_meeting_3_2_1": 0,
            "copies": 0,
            "drills": 0,
            "drills_succeeded": 0,
            "longest_drill_rto_seconds": None,
        }

    def backups(self) -> QuerySet:
        backups = Backup.objects.filter(self.in_period("created_at"))
        for name in ("kind", "status"):
            if name in self.chosen:
                backups = backups.filter(**{name: self.chosen[name]})
        return backups

    def drills(self) -> QuerySet:
        return RestoreJob.objects.filter(self.in_period("created_at"), kind=RestoreKind.DRILL)

    def rows(self) -> Iterator[tuple]:
        tally = self.tally
        backups = self.backups().order_by("created_at", "id").prefetch_related("artifacts__copies")
        for backup in backups.iterator(chunk_size=100):
            tally["backups"] += 1
            tally["backups_succeeded"] += backup.status == BackupStatus.SUCCEEDED
            tally["backups_meeting_3_2_1"] += bool(backup.rule_321_ok)
            rule = backup.rule_321 or {}
            yield (
                "backup",
                str(backup.pk),
                str(backup.parent_id or ""),
                _time(backup.created_at),
                _time(backup.finished_at),
                backup.kind,
                backup.status,
                ", ".join(backup.components or []),
                "",
                "",
                "",
                None,
                backup.stored_bytes,
                "",
                rule.get("copies"),
                backup.rule_321_ok,
                _time(backup.verified_at),
                None,
                rule,
                backup.error,
            )
            for artifact in backup.artifacts.all():
                for copy in artifact.copies.all():
                    tally["copies"] += 1
                    yield (
                        "copy",
                        str(copy.pk),
                        str(backup.pk),
                        _time(copy.created_at),
                        None,
                        "",
                        copy.status,
                        artifact.component,
                        artifact.name,
                        copy.target,
                        copy.media,
                        copy.offsite,
                        copy.size,
                        copy.sha256,
                        None,
                        None,
                        _time(copy.verified_at),
                        None,
                        {"location": copy.location, "artifact_sha256": artifact.sha256},
                        copy.error,
                    )
        for drill in self.drills().order_by("created_at", "id").iterator(chunk_size=500):
            tally["drills"] += 1
            tally["drills_succeeded"] += drill.status == RestoreStatus.SUCCEEDED
            if drill.rto_seconds is not None:
                longest = tally["longest_drill_rto_seconds"]
                tally["longest_drill_rto_seconds"] = max(longest or 0.0, drill.rto_seconds)
            yield (
                "drill",
                str(drill.pk),
                drill.backup_ref,
                _time(drill.created_at),
                _time(drill.finished_at),
                drill.kind,
                drill.status,
                ", ".join(drill.components or []),
                "",
                "",
                "",
                None,
                None,
                "",
                None,
                None,
                None,
                drill.rto_seconds,
                drill.result,
                drill.error,
            )

    def estimate(self) -> int | None:
        return self.backups().count() + self.drills().count()

    def charts(self) -> list[Chart]:
        return [
            Chart("Backups and drills by status", lambda row: f"{row[0]} {row[6]}"),
            Chart(
                "Backups", lambda row: row[3] if row[0] == "backup" else None, period=self.period
            ),
        ]

    def evidence(self) -> dict[str, Any]:
        return dict(self.tally)


SOURCES: dict[str, type[ReportSource]] = {
    source.type: source
    for source in (
        AuditTrailSource,
        AccessReviewSource,
        GdprRequestsSource,
        SoxChangesSource,
        SecurityEventsSource,
        BackupEvidenceSource,
    )
}


def filter_specs(report_type: str) -> dict[str, FilterSpec]:
    """The filters a report type accepts, with their allowed values."""
    return dict(SOURCES[report_type].filters)
