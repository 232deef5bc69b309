"""Segregation of duties: with SOX second approval on, a live restore and a key rotation wait
for a different authorised user, who approves once; the services refuse without; conflicts
are listed."""

from __future__ import annotations

import base64
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from backups import services
from backups.choices import BackupKind, BackupStatus
from backups.models import Backup, RestoreJob
from bridge.jobs import run_job
from compliance import approvals
from compliance.audit import AuditContext, record_event
from compliance.choices import ApprovalAction, ApprovalStatus, AuditAction
from compliance.models import ApprovalRequest, AuditEvent, SoxChange
from compliance.personal import revealed
from recovery.models import Service
from security import crypto, rotation
from security.choices import Role
from security.models import DataKey, StoredSecret
from tests.conftest import client_for, make_user

pytestmark = pytest.mark.django_db

APPROVALS = "/api/compliance/approvals"
ROTATE = "/api/security/keys/rotate"
SYSTEM = AuditContext.system()


@pytest.fixture(autouse=True)
def _master_key(settings):
    settings.BRIDGE_MASTER_KEY = base64.b64encode(b"m" * 32).decode()
    settings.BRIDGE_MASTER_KEY_PREVIOUS = []
    crypto.forget_keys()
    yield
    crypto.forget_keys()


@pytest.fixture
def second_officer(db):
    return make_user("sara", Role.SECURITY_OFFICER)


@pytest.fixture
def security_api(security_officer):
    return client_for(security_officer)


@pytest.fixture
def backup(settings) -> Backup:
    root = Path(settings.MEDIA_ROOT)
    root.mkdir(parents=True, exist_ok=True)
    (root / "note.txt").write_text("kept\n")
    taken = services.start_backup(
        kind=BackupKind.FULL, context=SYSTEM, enqueue=False, components=["uploads"]
    )
    run_job(taken.job_id, services.run_backup_job)
    taken.refresh_from_db()
    assert taken.status == BackupStatus.SUCCEEDED, taken.error
    return taken


def ask_rotation(api) -> dict:
    StoredSecret.objects.get_or_create(name="smtp", defaults={"value": "hunter2"})
    response = api.post(ROTATE, {"reason": "yearly rotation"}, format="json")
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["status"] == "awaiting_approval"
    assert response["Location"].endswith(f"{APPROVALS}/{body['approval']['id']}")
    return body["approval"]


# --- Key rotation ------------------------------------------------------------------------------


@pytest.mark.sod
def test_a_rotation_waits_and_only_a_second_officer_can_approve_it(
    security_officer, security_api, second_officer, operator_api
):
    versions = DataKey.objects.count()
    approval = ask_rotation(security_api)
    assert approval["action"] == ApprovalAction.KEY_ROTATION
    assert approval["requested_by"] == "sam" and approval["params"] == {"new_data_keys": True}
    assert approval["reason"] == "yearly rotation"
    assert not AuditEvent.objects.filter(action=AuditAction.KEYS_ROTATED).exists()
    approve = f"{APPROVALS}/{approval['id']}/approve"
    # the requester cannot approve their own request
    own = security_api.post(approve, {}, format="json")
    assert own.status_code == 403 and own.json()["code"] == "self_approval"
    # an operator may decide approvals, but not rotate keys
    operator = operator_api.post(approve, {}, format="json")
    assert operator.status_code == 403 and operator.json()["code"] == "permission_denied"
    # a second security officer approves: the rotation happens now
    second = client_for(second_officer).post(approve, {"note": "checked"}, format="json")
    assert second.status_code == 200, second.content
    body = second.json()
    assert body["status"] == ApprovalStatus.APPROVED and body["decided_by"] == "sara"
    assert body["decision_note"] == "checked" and body["result"]["job_id"]
    rotated = AuditEvent.objects.get(action=AuditAction.KEYS_ROTATED)
    assert rotated.details_data["approval"] == approval["id"]
    assert revealed(rotated).actor_username == "sara"
    assert DataKey.objects.count() > versions
    # used once: approving again is refused
    again = client_for(second_officer).post(approve, {}, format="json")
    assert again.status_code == 409 and again.json()["code"] == "not_pending"
    actions = set(AuditEvent.objects.values_list("action", flat=True))
    assert {AuditAction.APPROVAL_REQUESTED, AuditAction.APPROVAL_APPROVED} <= actions


@pytest.mark.sod
def test_the_services_refuse_without_an_approval(backup):
    with pytest.raises(approvals.ApprovalRequired):
        rotation.rotate_keys(context=SYSTEM, enqueue=False)
    with pytest.raises(services.BackupRefused) as refused:
        services.start_restore(backup=backup, context=SYSTEM, enqueue=False)
    assert refused.value.code == "approval_required"
    # a dry run changes nothing live: no approval needed
    dry = services.start_restore(backup=backup, context=SYSTEM, enqueue=False, dry_run=True)
    assert dry.dry_run


@pytest.mark.sod
def test_an_approval_cannot_be_used_twice_or_for_something_else(
    security_officer, second_officer, backup
):
    approval = approvals.request_approval(
        action=ApprovalAction.KEY_ROTATION,
        params={"new_data_keys": True},
        reason="r",
        context=SYSTEM,
        user=security_officer,
    )
    approvals.approve(approval=approval, user=second_officer, context=SYSTEM)
    with pytest.raises(approvals.ApprovalError) as reused:
        rotation.rotate_keys(context=SYSTEM, enqueue=False, approval=approval)
    assert reused.value.code == "approval_invalid"
    with pytest.raises(services.BackupRefused) as wrong:
        services.start_restore(backup=backup, context=SYSTEM, enqueue=False, approval=approval)
    assert wrong.value.code == "approval_invalid"


def test_without_second_approval_the_rotation_endpoint_rotates_at_once(security_api):
    StoredSecret.objects.create(name="smtp", value="hunter2")
    response = security_api.post(ROTATE, {}, format="json")
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["job"]["id"] == body["rotation"]["job_id"]
    assert response["Location"].endswith(f"/api/jobs/{body['job']['id']}")
    event = AuditEvent.objects.get(action=AuditAction.KEYS_ROTATED)
    assert event.details_data["approval"] is None
    assert event.details_data["second_approval_required"] is False


def test_the_rotation_endpoint_needs_rotate_datakey(operator_api, outsider_api):
    assert operator_api.post(ROTATE, {}, format="json").status_code == 403
    assert outsider_api.post(ROTATE, {}, format="json").status_code == 403


def test_the_rotation_endpoint_refuses_unknown_fields(security_api):
    response = security_api.post(ROTATE, {"keepDataKeys": True}, format="json")
    assert response.status_code == 400 and "keepDataKeys" in response.json()


# --- Live restore ------------------------------------------------------------------------------


@pytest.mark.sod
def test_a_live_restore_waits_for_a_second_operator_who_starts_it(operator, operator_api, backup):
    response = operator_api.post(
        f"/api/backup/restore/{backup.pk}",
        {"components": ["uploads"]},
        format="json",
        HTTP_X_CHANGE_REASON="roll back a bad upload",
    )
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["status"] == "awaiting_approval"
    approval = body["approval"]
    assert approval["reason"] == "roll back a bad upload"
    assert approval["params"] == {
        "backup_id": str(backup.pk),
        "components": ["uploads"],
        "target_time": None,
    }
    assert not RestoreJob.objects.exists()
    approve = f"{APPROVALS}/{approval['id']}/approve"
    assert operator_api.post(approve, {}, format="json").json()["code"] == "self_approval"
    # a second operator approves: the restore starts (its job is queued on commit)
    oscar = client_for(make_user("oscar", Role.OPERATOR))
    approved = oscar.post(approve, {}, format="json")
    assert approved.status_code == 200, approved.content
    result = approved.json()["result"]
    restore = RestoreJob.objects.get(pk=result["restore_id"])
    assert restore.job_id == result["job_id"] and not restore.dry_run
    assert restore.created_by == "oscar" and restore.components == ["uploads"]
    event = AuditEvent.objects.get(action=AuditAction.BACKUP_RESTORE_REQUESTED)
    assert event.details_data["approval"] == approval["id"]
    assert event.details_data["second_approval_required"] is True
    assert approvals.sod_conflicts() == []


@pytest.mark.sod
def test_a_dry_run_restore_needs_no_approval(operator_api, backup):
    response = operator_api.post(
        f"/api/backup/restore/{backup.pk}", {"dry_run": True}, format="json"
    )
    assert response.status_code == 202 and "restore" in response.json()


@pytest.mark.sod
def test_an_impossible_restore_is_refused_before_anyone_is_asked(operator_api, backup):
    response = operator_api.post(
        f"/api/backup/restore/{backup.pk}", {"components": ["redis"]}, format="json"
    )
    assert response.status_code == 400 and "components" in response.json()
    assert not ApprovalRequest.objects.exists()


@pytest.mark.sod
def test_a_failed_restore_marks_the_approval_failed(operator, backup):
    approval = approvals.request_approval(
        action=ApprovalAction.LIVE_RESTORE,
        params=services.restore_approval_params(backup=backup, components=None, target_time=None),
        reason="r",
        context=SYSTEM,
        user=operator,
    )
    Backup.objects.filter(pk=backup.pk).update(status=BackupStatus.FAILED)
    with pytest.raises(approvals.ApprovalFailed) as failed:
        approvals.approve(approval=approval, user=make_user("oscar", Role.OPERATOR), context=SYSTEM)
    assert failed.value.code == "not_restorable"
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.FAILED
    assert approval.result["code"] == "not_restorable"
    assert not RestoreJob.objects.exists()


@pytest.mark.sod
def test_the_restore_command_asks_for_approval(operator, backup, capsys):
    with pytest.raises(CommandError, match="--requested-by"):
        call_command("restore", str(backup.pk), "--yes")
    call_command("restore", str(backup.pk), "--requested-by", "olivia", "--reason", "disk swap")
    approval = ApprovalRequest.objects.get()
    out = capsys.readouterr().out
    assert str(approval.pk) in out and "/approve" in out
    assert (approval.requested_by_username, approval.reason) == ("olivia", "disk swap")
    assert not RestoreJob.objects.exists()


@pytest.mark.sod
def test_the_rotation_command_asks_for_approval(security_officer, capsys):
    call_command("rotate_keys", "--requested-by", "sam", "--keep-data-keys")
    approval = ApprovalRequest.objects.get()
    assert approval.params == {"new_data_keys": False}
    assert str(approval.pk) in capsys.readouterr().out
    with pytest.raises(CommandError, match="rotate_datakey"):
        call_command("rotate_keys", "--requested-by", make_user("otto").username)


# --- Deciding ----------------------------------------------------------------------------------


def _request(user, action=ApprovalAction.KEY_ROTATION) -> ApprovalRequest:
    return approvals.request_approval(
        action=action, params={"new_data_keys": True}, reason="r", context=SYSTEM, user=user
    )


@pytest.mark.sod
def test_an_expired_approval_is_refused_and_marked_expired(security_officer, second_officer):
    approval = _request(security_officer)
    assert approval.expires_at - approval.requested_at == timedelta(hours=24)
    ApprovalRequest.objects.filter(pk=approval.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    response = client_for(second_officer).post(
        f"{APPROVALS}/{approval.pk}/approve", {}, format="json"
    )
    assert response.status_code == 409 and response.json()["code"] == "expired"
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.EXPIRED
    assert AuditEvent.objects.filter(
        action=AuditAction.APPROVAL_EXPIRED, object_id=str(approval.pk)
    ).exists()
    assert not AuditEvent.objects.filter(action=AuditAction.KEYS_ROTATED).exists()


@pytest.mark.sod
def test_expire_stale_expires_only_what_is_due(security_officer):
    due, fresh = _request(security_officer), _request(security_officer)
    ApprovalRequest.objects.filter(pk=due.pk).update(expires_at=timezone.now())
    assert approvals.expire_stale() == 1
    assert ApprovalRequest.objects.get(pk=due.pk).status == ApprovalStatus.EXPIRED
    assert ApprovalRequest.objects.get(pk=fresh.pk).status == ApprovalStatus.PENDING


@pytest.mark.sod
def test_reject_and_cancel(security_officer, security_api, second_officer):
    first, second = _request(security_officer), _request(security_officer)
    sara = client_for(second_officer)
    no_reason = sara.post(f"{APPROVALS}/{first.pk}/reject", {}, format="json")
    assert no_reason.status_code == 400
    rejected = sara.post(f"{APPROVALS}/{first.pk}/reject", {"reason": "not now"}, format="json")
    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected"
    assert rejected.json()["decision_note"] == "not now"
    # only the requester withdraws
    theirs = sara.post(f"{APPROVALS}/{second.pk}/cancel")
    assert theirs.status_code == 403 and theirs.json()["code"] == "not_requester"
    mine = security_api.post(f"{APPROVALS}/{second.pk}/cancel")
    assert mine.status_code == 200 and mine.json()["status"] == "cancelled"
    assert sara.post(f"{APPROVALS}/{second.pk}/approve", {}, format="json").status_code == 409


@pytest.mark.sod
def test_list_and_detail(security_officer, security_api, outsider_api, compliance_api):
    approval = _request(security_officer)
    listed = security_api.get(APPROVALS, {"status": "pending", "action": "security.key_rotation"})
    assert listed.status_code == 200
    assert [row["id"] for row in listed.json()["results"]] == [str(approval.pk)]
    assert security_api.get(APPROVALS, {"status": "approved"}).json()["results"] == []
    assert security_api.get(APPROVALS, {"status": "nope"}).status_code == 400
    detail = compliance_api.get(f"{APPROVALS}/{approval.pk}")
    assert detail.status_code == 200 and detail.json()["status"] == "pending"
    assert outsider_api.get(APPROVALS).status_code == 403
    assert security_api.get(f"{APPROVALS}/00000000-0000-0000-0000-000000000000").status_code == 404


@pytest.mark.sod
@pytest.mark.django_db(transaction=True)
def test_two_approvers_at_once_approve_once(postgres, monkeypatch):
    requester = make_user("sam", Role.SECURITY_OFFICER)
    deciders = [make_user(name, Role.SECURITY_OFFICER) for name in ("sara", "sven")]
    approval = _request(requester)
    calls = []

    def executor(row: ApprovalRequest, context: AuditContext) -> dict:
        calls.append(context.actor_username)
        return {"done_by": context.actor_username}

    monkeypatch.setitem(approvals._executors, ApprovalAction.KEY_ROTATION, executor)
    barrier = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def decide(user) -> None:
        try:
            barrier.wait(5)
            approvals.approve(
                approval=ApprovalRequest.objects.get(pk=approval.pk),
                user=user,
                context=AuditContext().with_actor(user),
            )
            outcomes[user.username] = "approved"
        except approvals.ApprovalError as error:
            outcomes[user.username] = error.code
        finally:
            connection.close()

    threads = [threading.Thread(target=decide, args=(user,)) for user in deciders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes.values()) == ["approved", "not_pending"]
    assert len(calls) == 1
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.APPROVED
    assert approval.result == {"done_by": approval.decided_by_username}
    assert AuditEvent.objects.filter(action=AuditAction.APPROVAL_APPROVED).count() == 1


# --- Conflicts ---------------------------------------------------------------------------------


@pytest.mark.sod
def test_sod_conflicts_lists_a_forged_self_approved_row(security_officer):
    now = timezone.now()
    forged = ApprovalRequest.objects.create(
        action=ApprovalAction.KEY_ROTATION,
        reason="insider",
        status=ApprovalStatus.APPROVED,
        requested_by=security_officer,
        requested_by_username="sam",
        requested_at=now,
        expires_at=now + timedelta(hours=1),
        decided_by=security_officer,
        decided_by_username="sam",
        decided_at=now,
    )
    conflicts = approvals.sod_conflicts()
    [found] = [c for c in conflicts if c["type"] == "self_decided"]
    assert found["key"] == f"approval:{forged.pk}" and found["user"] == "sam"
    # an action citing that approval is a conflict too
    record_event(
        action=AuditAction.KEYS_ROTATED,
        context=AuditContext(actor_id=security_officer.pk, actor_username="sam"),
        object_type="security.datakey",
        object_id="mk",
        details={"approval": str(forged.pk), "second_approval_required": True},
    )
    unapproved = [c for c in approvals.sod_conflicts() if c["type"] == "unapproved_action"]
    assert len(unapproved) == 1 and "own requester" in unapproved[0]["summary"]
    # outside the window, nothing
    assert approvals.sod_conflicts(since=now + timedelta(hours=2)) == []


@pytest.mark.sod
def test_sod_conflicts_lists_an_action_taken_without_approval_and_conflicting_roles():
    record_event(
        action=AuditAction.BACKUP_RESTORE_REQUESTED,
        context=SYSTEM,
        object_type="backups.restorejob",
        object_id="7",
        details={"kind": "restore", "dry_run": False, "second_approval_required": True},
    )
    # a drill, and an action from before second approval was required: not conflicts
    record_event(
        action=AuditAction.BACKUP_RESTORE_REQUESTED,
        context=SYSTEM,
        details={"kind": "drill", "dry_run": False, "second_approval_required": True},
    )
    record_event(action=AuditAction.KEYS_ROTATED, context=SYSTEM, details={"approval": None})
    make_user("dual", Role.OPERATOR, Role.COMPLIANCE_OFFICER)
    make_user("single", Role.OPERATOR)
    conflicts = approvals.sod_conflicts()
    assert [c["type"] for c in conflicts] == ["unapproved_action", "conflicting_roles"]
    assert conflicts[0]["details"]["object_id"] == "7"
    assert conflicts[1]["user"] == "dual"
    assert conflicts[1]["details"]["roles"] == ["operator", "compliance_officer"]


def test_requires_approval_follows_the_settings(settings):
    assert not approvals.requires_approval(ApprovalAction.LIVE_RESTORE)  # off by default here
    settings.SOX_REQUIRE_SECOND_APPROVAL = True
    assert approvals.requires_approval(ApprovalAction.KEY_ROTATION)
    settings.ENABLE_SOX_COMPLIANCE = False
    assert not approvals.requires_approval(ApprovalAction.KEY_ROTATION)


@pytest.mark.sod
@pytest.mark.django_db(transaction=True)
def test_an_approved_live_restore_keeps_its_approval_and_the_change_trail(
    postgres, django_capture_on_commit_callbacks
):
    olivia = make_user("olivia", Role.OPERATOR)
    oscar = make_user("oscar", Role.OPERATOR)
    service = Service.objects.create(name="billing", kind="http", target="http://127.0.0.1:1/")
    taken = services.start_backup(
        kind=BackupKind.FULL, context=SYSTEM, enqueue=False, components=["database"]
    )
    run_job(taken.job_id, services.run_backup_job)
    taken.refresh_from_db()
    assert taken.status == BackupStatus.SUCCEEDED, taken.error
    Service.objects.filter(pk=service.pk).update(timeout_ms=4321)  # after the backup
    trail = SoxChange.objects.filter(table_name="recovery_service").count()
    approval = approvals.request_approval(
        action=ApprovalAction.LIVE_RESTORE,
        params=services.restore_approval_params(backup=taken, components=None, target_time=None),
        reason="rewind the bad change",
        context=AuditContext().with_actor(olivia),
        user=olivia,
    )
    with django_capture_on_commit_callbacks(execute=True):
        approvals.approve(approval=approval, user=oscar, context=AuditContext().with_actor(oscar))
    restore = RestoreJob.objects.get(pk=ApprovalRequest.objects.get().result["restore_id"])
    assert restore.status == "succeeded", restore.error
    # the data is rewound; the approval that allowed it and the change trail are not
    assert Service.objects.get(pk=service.pk).timeout_ms == 5000
    kept = ApprovalRequest.objects.get(pk=approval.pk)
    assert kept.status == ApprovalStatus.APPROVED and kept.decided_by_username == "oscar"
    assert SoxChange.objects.filter(table_name="recovery_service").count() >= trail
    assert approvals.sod_conflicts() == []
