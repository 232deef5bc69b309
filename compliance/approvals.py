"""Segregation of duties: actions a second authorised person must approve (SOX).

With settings.SOX_REQUIRE_SECOND_APPROVAL (and ENABLE_SOX_COMPLIANCE) on, restoring a backup
onto the live system and rotating the master and data keys are not carried out when asked:
the asker gets an `ApprovalRequest`, and a different user holding both the action's own
permission and `compliance.decide_approvalrequest` approves it, which carries the action out
(through the executor the owning app registered) and stores what it produced. The requester
can never approve or reject their own request; an approval is used once; a request not
decided within settings.SOX_APPROVAL_TTL expires. Every step is an audit event, and the
services themselves refuse the action without an approved request (`authorise`), so no entry
point can skip it.

`sod_conflicts` lists what an auditor must look at: actions carried out without a valid
approval while it was required, approvals decided by their own requester (the service never
allows it: such a row was written around it), and users holding roles that together defeat
the separation (settings.SOX_CONFLICTING_ROLES, by default operator or security officer
together with compliance officer: whoever approves a restore or a rotation must not also be
the one auditing it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from compliance.audit import AuditContext, record_event
from compliance.choices import ApprovalAction, ApprovalStatus, AuditAction
from compliance.models import ApprovalRequest, AuditEvent

log = logging.getLogger(__name__)

# The permission an approver (and the requester) must hold for each action, beside
# compliance.decide_approvalrequest for the approver.
ACTION_PERMISSIONS: dict[str, str] = {
    ApprovalAction.LIVE_RESTORE: "backups.restore_backup",
    ApprovalAction.KEY_ROTATION: "security.rotate_datakey",
}
DECIDE_PERMISSION = "compliance.decide_approvalrequest"

# Roles that must not be held together (overridden by settings.SOX_CONFLICTING_ROLES): the
# people who carry out and approve restores and rotations must not also audit them.
DEFAULT_CONFLICTING_ROLES: tuple[tuple[str, ...], ...] = (
    ("operator", "compliance_officer"),
    ("security_officer", "compliance_officer"),
)

Executor = Callable[[ApprovalRequest, AuditContext], dict]
_executors: dict[str, Executor] = {}


class ApprovalError(Exception):
    """A request about an approval that cannot be honoured; `status` is the HTTP answer."""

    def __init__(self, message: str, code: str, status: int = 409) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class ApprovalRequired(ApprovalError):
    """The action needs an approved request first (raised by the services themselves)."""

    def __init__(self, action: str) -> None:
        super().__init__(
            f"{ApprovalAction(action).label} needs the approval of a second authorised user "
            "(SOX_REQUIRE_SECOND_APPROVAL): request it, then have someone else approve it.",
            "approval_required",
            409,
        )


class ApprovalFailed(ApprovalError):
    """Approved, but carrying the action out failed; the request is marked `failed`."""

    def __init__(self, approval: ApprovalRequest, message: str, code: str) -> None:
        super().__init__(message, code, 409)
        self.approval = approval


def register_executor(action: str, executor: Executor) -> Executor:
    """How an approved `action` is carried out: `executor(approval, context) -> result` (ids
    of what it started). Called by the app owning the action, in its ready()."""
    _executors[str(action)] = executor
    return executor


def sod_enabled() -> bool:
    return bool(settings.ENABLE_SOX_COMPLIANCE and settings.SOX_REQUIRE_SECOND_APPROVAL)


def requires_approval(action: str) -> bool:
    """Whether `action` must be approved by a second user before it is carried out."""
    return sod_enabled() and str(action) in ACTION_PERMISSIONS


def _now() -> datetime:
    return timezone.now()


def _username(user: Any) -> str:
    return user.get_username() if user is not None else ""


def _authenticated(user: Any) -> bool:
    return user is not None and bool(getattr(user, "is_authenticated", False))


def _describe(approval: ApprovalRequest) -> dict[str, Any]:
    return {
        "approval": str(approval.pk),
        "action": approval.action,
        "params": approval.params,
        "requested_by": approval.requested_by_username,
        "status": approval.status,
    }


# --- Requesting ------------------------------------------------------------------------------


def request_approval(
    *,
    action: str,
    params: dict[str, Any],
    reason: str,
    context: AuditContext,
    user: Any,
) -> ApprovalRequest:
    """Ask for `action` with `params` (JSON): a pending request another user may approve until
    settings.SOX_APPROVAL_TTL has passed. `user` must hold the action's permission."""
    if str(action) not in ACTION_PERMISSIONS:
        raise ApprovalError(f"{action!r} is not an action that takes approvals.", "unknown_action")
    if not _authenticated(user):
        raise ApprovalError(
            "An approval request needs a named requester (a user who may do the action).",
            "requester_required",
            400,
        )
    needed = ACTION_PERMISSIONS[str(action)]
    if not user.has_perm(needed):
        raise ApprovalError(f"Requires the permission {needed}.", "permission_denied", 403)
    reason = (reason or "").strip()
    if not reason:
        raise ApprovalError("Say why: a reason is required.", "reason_required", 400)
    now = _now()
    with transaction.atomic():
        approval = ApprovalRequest.objects.create(
            action=str(action),
            params=params,
            reason=reason[:2000],
            status=ApprovalStatus.PENDING,
            requested_by=user,
            requested_by_username=_username(user),
            requested_at=now,
            expires_at=now + settings.SOX_APPROVAL_TTL,
        )
        record_event(
            action=AuditAction.APPROVAL_REQUESTED,
            context=context,
            object_type="compliance.approvalrequest",
            object_id=approval.pk,
            details={
                **_describe(approval),
                "reason": approval.reason,
                "expires_at": approval.expires_at.isoformat(),
            },
        )
    return approval


# --- Deciding --------------------------------------------------------------------------------


def _check_decider(approval: ApprovalRequest, user: Any) -> None:
    if not _authenticated(user) or not user.is_active:
        raise ApprovalError("Only a signed-in user can decide.", "not_authenticated", 403)
    if approval.requested_by_id is not None and approval.requested_by_id == user.pk:
        raise ApprovalError(
            "You asked for this: a second authorised user must decide it.", "self_approval", 403
        )
    if approval.requested_by_username and approval.requested_by_username == _username(user):
        raise ApprovalError(
            "You asked for this: a second authorised user must decide it.", "self_approval", 403
        )
    needed = [ACTION_PERMISSIONS.get(approval.action, ""), DECIDE_PERMISSION]
    missing = [perm for perm in needed if not perm or not user.has_perm(perm)]
    if missing:
        raise ApprovalError(
            f"Requires the permission {', '.join(p for p in missing if p) or 'of the action'}.",
            "permission_denied",
            403,
        )


def _refuse_undecidable(approval: ApprovalRequest) -> None:
    """Why a request that lost the compare-and-swap cannot be decided (expiring it if due)."""
    approval.refresh_from_db()
    if approval.status == ApprovalStatus.PENDING and approval.expires_at <= _now():
        _expire(approval)
        approval.refresh_from_db()
    if approval.status == ApprovalStatus.EXPIRED:
        raise ApprovalError(
            f"Approval request {approval.pk} expired at {approval.expires_at.isoformat()}: "
            "ask again.",
            "expired",
        )
    raise ApprovalError(
        f"Approval request {approval.pk} is {approval.status}, no longer pending.", "not_pending"
    )


def _claim(approval: ApprovalRequest, status: str, user: Any, note: str) -> bool:
    """Compare-and-swap pending (and not expired) -> `status`: True for the one who won."""
    now = _now()
    won = ApprovalRequest.objects.filter(
        pk=approval.pk, status=ApprovalStatus.PENDING, expires_at__gt=now
    ).update(
        status=status,
        decided_by=user,
        decided_by_username=_username(user),
        decided_at=now,
        decision_note=note[:2000],
    )
    if won:
        approval.refresh_from_db()
    return bool(won)


def approve(
    *, approval: ApprovalRequest, user: Any, context: AuditContext, note: str = ""
) -> ApprovalRequest:
    """Approve and carry out: refused to the requester, to a user without the action's
    permission and decide_approvalrequest, and for a request no longer pending or expired.
    Two approvers at once: one wins, the other is told it is no longer pending.

    The action runs in the approval's transaction; if it fails, the request is marked
    `failed` with the reason and ApprovalFailed is raised.
    """
    _check_decider(approval, user)
    executor = _executors.get(approval.action)
    if executor is None:
        raise ApprovalError(
            f"Nothing can carry out {approval.action} in this process.", "no_executor", 503
        )
    won = False
    try:
        with transaction.atomic():
            won = _claim(approval, ApprovalStatus.APPROVED, user, note)
            if won:
                result = executor(approval, context)
                approval.result = result
                approval.save(update_fields=["result"])
                record_event(
                    action=AuditAction.APPROVAL_APPROVED,
                    context=context,
                    object_type="compliance.approvalrequest",
                    object_id=approval.pk,
                    details={
                        **_describe(approval),
                        "note": approval.decision_note,
                        "result": result,
                    },
                )
    except Exception as exc:
        # The claim rolled back with the action: the request is pending again, and is now
        # marked failed (unless someone else decided it meanwhile).
        code = str(getattr(exc, "code", "") or "action_failed")
        message = f"Approved, but {ApprovalAction(approval.action).label.lower()} failed: {exc}"
        log.warning("approval %s: carrying it out failed: %s", approval.pk, exc)
        with transaction.atomic():
            failed = _claim(approval, ApprovalStatus.FAILED, user, note)
            if failed:
                approval.result = {"error": str(exc)[:2000], "code": code}
                approval.save(update_fields=["result"])
                record_event(
                    action=AuditAction.APPROVAL_APPROVED,
                    context=context,
                    object_type="compliance.approvalrequest",
                    object_id=approval.pk,
                    details={
                        **_describe(approval),
                        "note": approval.decision_note,
                        "failed": approval.result,
                    },
                )
        if not failed:
            _refuse_undecidable(approval)
        raise ApprovalFailed(approval, message, code) from exc
    if not won:
        _refuse_undecidable(approval)
    return approval


def reject(
    *, approval: ApprovalRequest, user: Any, context: AuditContext, reason: str
) -> ApprovalRequest:
    """Refuse the request (not by its requester, who cancels instead); `reason` is kept."""
    _check_decider(approval, user)
    reason = (reason or "").strip()
    if not reason:
        raise ApprovalError("Say why: a reason is required.", "reason_required", 400)
    with transaction.atomic():
        won = _claim(approval, ApprovalStatus.REJECTED, user, reason)
        if won:
            record_event(
                action=AuditAction.APPROVAL_REJECTED,
                context=context,
                object_type="compliance.approvalrequest",
                object_id=approval.pk,
                details={**_describe(approval), "reason": reason},
            )
    if not won:
        _refuse_undecidable(approval)
    return approval


def cancel(*, approval: ApprovalRequest, user: Any, context: AuditContext) -> ApprovalRequest:
    """Withdraw one's own pending request."""
    mine = _authenticated(user) and (
        approval.requested_by_id == user.pk
        or (approval.requested_by_id is None and approval.requested_by_username == _username(user))
    )
    if not mine:
        raise ApprovalError("Only the requester can cancel a request.", "not_requester", 403)
    with transaction.atomic():
        won = _claim(approval, ApprovalStatus.CANCELLED, user, "")
        if won:
            record_event(
                action=AuditAction.APPROVAL_CANCELLED,
                context=context,
                object_type="compliance.approvalrequest",
                object_id=approval.pk,
                details=_describe(approval),
            )
    if not won:
        _refuse_undecidable(approval)
    return approval


def _expire(approval: ApprovalRequest) -> bool:
    with transaction.atomic():
        won = ApprovalRequest.objects.filter(
            pk=approval.pk, status=ApprovalStatus.PENDING, expires_at__lte=_now()
        ).update(status=ApprovalStatus.EXPIRED)
        if won:
            approval.refresh_from_db()
            record_event(
                action=AuditAction.APPROVAL_EXPIRED,
                context=AuditContext.system(),
                object_type="compliance.approvalrequest",
                object_id=approval.pk,
                details={**_describe(approval), "expires_at": approval.expires_at.isoformat()},
            )
    return bool(won)


def expire_stale() -> int:
    """Mark every pending request past its expiry as expired (one event each); how many."""
    expired = 0
    due = ApprovalRequest.objects.filter(status=ApprovalStatus.PENDING, expires_at__lte=_now())
    for approval in due.order_by("expires_at")[:1000]:
        expired += _expire(approval)
    return expired


# --- The services' side ----------------------------------------------------------------------


def authorise(action: str, approval: ApprovalRequest | None, **params: Any) -> str | None:
    """Called by a service about to carry out `action`: the approval's id when it is an
    approved, unused request for this action with these parameters; None when no approval is
    needed; ApprovalRequired or ApprovalError otherwise."""
    if approval is None:
        if requires_approval(action):
            raise ApprovalRequired(action)
        return None
    current = ApprovalRequest.objects.filter(pk=approval.pk).first()
    if current is None or current.action != str(action):
        raise ApprovalError(f"Approval {approval.pk} is not for {action}.", "approval_invalid")
    if current.status != ApprovalStatus.APPROVED or current.result:
        raise ApprovalError(
            f"Approval {approval.pk} is {current.status}"
            + (" and already used" if current.result else "")
            + ": it cannot authorise this.",
            "approval_invalid",
        )
    if current.decided_by_id is not None and current.decided_by_id == current.requested_by_id:
        raise ApprovalError(f"Approval {approval.pk} was self-approved.", "approval_invalid")
    for key, value in params.items():
        if current.params.get(key) != value:
            raise ApprovalError(
                f"Approval {approval.pk} was given for {key}={current.params.get(key)!r}, "
                f"not {value!r}.",
                "approval_invalid",
            )
    return str(current.pk)


# --- Conflicts ---------------------------------------------------------------------------------


def _conflicting_roles() -> list[tuple[str, ...]]:
    declared = getattr(settings, "SOX_CONFLICTING_ROLES", DEFAULT_CONFLICTING_ROLES)
    return [tuple(str(role) for role in group) for group in declared if len(group) > 1]


def _action_events(since: datetime | None, until: datetime | None) -> Any:
    events = AuditEvent.objects.filter(
        action__in=[AuditAction.BACKUP_RESTORE_REQUESTED, AuditAction.KEYS_ROTATED]
    )
    if since is not None:
        events = events.filter(occurred_at__gte=since)
    if until is not None:
        events = events.filter(occurred_at__lt=until)
    return events.order_by("id")


def sod_conflicts(
    *, since: datetime | None = None, until: datetime | None = None
) -> list[dict[str, Any]]:
    """What breaks segregation of duties, oldest first. Each item: `type`, a stable `key`,
    `summary`, `occurred_at` (ISO, or None for a standing state), `user` and `details`.

    - `unapproved_action`: a live restore or key rotation carried out while a second approval
      was required, with no approval, or one that is not an approved, distinct-person request
      for that action;
    - `self_decided`: an approval request decided by its own requester;
    - `conflicting_roles`: an active user holding roles declared conflicting (a standing
      state, so `since` and `until` do not apply);
    - `capture_missing`: a table of SOX_AUDITED_MODELS whose change trigger (or the change
      table's append-only guard) is missing or disabled (PostgreSQL; standing too).
    """
    from compliance.personal import Revealer

    found: list[dict[str, Any]] = []
    approvals = {}
    revealer = Revealer()
    for event in _action_events(since, until).iterator():
        shown = revealer.event(event)
        details = shown.details if isinstance(shown.details, dict) else {}
        if event.action == AuditAction.BACKUP_RESTORE_REQUESTED and (
            details.get("kind") != "restore" or details.get("dry_run")
        ):
            continue  # drills and dry runs change nothing live
        action = (
            ApprovalAction.LIVE_RESTORE
            if event.action == AuditAction.BACKUP_RESTORE_REQUESTED
            else ApprovalAction.KEY_ROTATION
        )
        approval_id = details.get("approval")
        problem = None
        if not approval_id:
            if details.get("second_approval_required"):
                problem = "carried out without a second approval although one was required"
        else:
            if approval_id not in approvals:
                approvals[approval_id] = ApprovalRequest.objects.filter(pk=approval_id).first()
            row = approvals[approval_id]
            if row is None:
                problem = f"names approval {approval_id}, which does not exist"
            elif row.action != action or row.status != ApprovalStatus.APPROVED:
                problem = f"names approval {approval_id}, which is {row.action} {row.status}"
            elif row.decided_by_id is None or row.decided_by_id == row.requested_by_id:
                problem = f"names approval {approval_id}, decided by its own requester"
        if problem:
            found.append(
                {
                    "type": "unapproved_action",
                    "key": f"event:{event.pk}",
                    "summary": f"{ApprovalAction(action).label} (event {event.pk}) {problem}.",
                    "occurred_at": event.occurred_at.isoformat(),
                    "user": shown.actor_username,
                    "details": {
                        "event": event.pk,
                        "action": event.action,
                        "object_id": event.object_id,
                        "approval": approval_id,
                    },
                }
            )
    decided = ApprovalRequest.objects.filter(decided_at__isnull=False).exclude(
        status__in=[ApprovalStatus.CANCELLED, ApprovalStatus.EXPIRED]
    )
    if since is not None:
        decided = decided.filter(decided_at__gte=since)
    if until is not None:
        decided = decided.filter(decided_at__lt=until)
    for row in decided.order_by("decided_at"):
        same_user = row.decided_by_id is not None and row.decided_by_id == row.requested_by_id
        same_name = bool(row.decided_by_username) and (
            row.decided_by_username == row.requested_by_username
        )
        if same_user or same_name:
            found.append(
                {
                    "type": "self_decided",
                    "key": f"approval:{row.pk}",
                    "summary": (
                        f"Approval request {row.pk} ({row.action}) was {row.status} by "
                        f"{row.decided_by_username or 'its requester'}, who asked for it."
                    ),
                    "occurred_at": row.decided_at.isoformat() if row.decided_at else None,
                    "user": row.decided_by_username,
                    "details": {
                        "approval": str(row.pk),
                        "action": row.action,
                        "status": row.status,
                    },
                }
            )
    found.sort(key=lambda item: item["occurred_at"] or "")
    found += _role_conflicts()
    found += _capture_gaps()
    return found


def _capture_gaps() -> list[dict[str, Any]]:
    """Audited tables whose change capture is gone (a standing state, like role conflicts):
    changes made meanwhile bypass every control this module and the SOX trail provide."""
    from compliance import sox

    return [
        {
            "type": "capture_missing",
            "key": f"capture:{gap['table']}",
            "summary": (
                f"SOX change capture is not working on {gap['table']} ({gap['model']}): "
                f"{gap['problem']}; changes to it are not recorded (run manage.py "
                "sync_sox_triggers, and find out who removed it)."
            ),
            "occurred_at": None,
            "user": "",
            "details": gap,
        }
        for gap in sox.capture_gaps()
    ]


def _role_conflicts() -> list[dict[str, Any]]:
    from django.contrib.auth import get_user_model

    groups = _conflicting_roles()
    if not groups:
        return []
    names = sorted({role for group in groups for role in group})
    # Superusers hold every permission by design (the break-glass account); they are not
    # listed here, or every installation would carry a conflict it cannot resolve.
    users = (
        get_user_model()
        .objects.filter(is_active=True, is_superuser=False, groups__name__in=names)
        .prefetch_related("groups")
        .distinct()
        .order_by("username")
    )
    found = []
    for user in users:
        held = {group.name for group in user.groups.all()}
        for group in groups:
            if set(group) <= held:
                found.append(
                    {
                        "type": "conflicting_roles",
                        "key": f"user:{user.get_username()}:{'+'.join(group)}",
                        "summary": (
                            f"{user.get_username()} holds {' and '.join(group)}: the same "
                            "person can carry out or approve an action and audit it."
                        ),
                        "occurred_at": None,
                        "user": user.get_username(),
                        "details": {"roles": list(group)},
                    }
                )
    return found
