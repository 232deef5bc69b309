"""The /api/backup/* endpoints: roles, 202 and polling, refusals naming the field, details."""

from __future__ import annotations

from pathlib import Path

import pytest

from backups.choices import BackupStatus, RestoreStatus
from backups.models import Backup, RestoreJob
from compliance.models import AuditEvent
from compliance.personal import actor_match

pytestmark = pytest.mark.django_db


@pytest.fixture
def media(settings) -> Path:
    root = Path(settings.MEDIA_ROOT)
    root.mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "b.bin").write_bytes(bytes(range(256)) * 40)
    return root


def start_full(api, django_capture_on_commit_callbacks, **body):
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/backup/full", {"components": ["uploads"], **body}, format="json")
    return response


def test_full_answers_202_with_backup_and_job_and_runs(
    operator_api, media, django_capture_on_commit_callbacks
):
    response = start_full(operator_api, django_capture_on_commit_callbacks, label="nightly")
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["backup"]["kind"] == "full" and body["backup"]["label"] == "nightly"
    assert response["Location"].endswith(f"/api/jobs/{body['job']['id']}")
    backup = Backup.objects.get(pk=body["backup"]["id"])
    assert backup.status == BackupStatus.SUCCEEDED, backup.error
    detail = operator_api.get(f"/api/backup/{backup.pk}").json()
    assert detail["status"] == "succeeded"
    copies = detail["artifacts"][0]["copies"]
    assert {copy["target"] for copy in copies} == {"local", "local-mirror"}
    assert all(len(copy["sha256"]) == 64 and copy["location"] for copy in copies)
    listing = operator_api.get("/api/backup/list?status=succeeded").json()
    assert [row["id"] for row in listing["results"]] == [str(backup.pk)]
    assert AuditEvent.objects.filter(actor_match("olivia"), action="backup.requested").exists()


def test_status_reports_rpo_321_and_drill(operator_api, media, django_capture_on_commit_callbacks):
    empty = operator_api.get("/api/backup/status").json()
    assert empty["status"] == "bad" and "no successful backup yet" in empty["problems"]
    start_full(operator_api, django_capture_on_commit_callbacks)
    report = operator_api.get("/api/backup/status").json()
    assert report["newest"]["rule_321"]["ok"] is False
    assert report["rpo_seconds"] == 86400
    assert {target["name"] for target in report["targets"]} == {"local", "local-mirror"}
    assert report["settings"]["encryption"] is True


def test_restore_and_poll_its_progress(operator_api, media, django_capture_on_commit_callbacks):
    backup_id = start_full(operator_api, django_capture_on_commit_callbacks).json()["backup"]["id"]
    (media / "a.txt").write_text("changed")
    with django_capture_on_commit_callbacks(execute=True):
        response = operator_api.post(
            f"/api/backup/restore/{backup_id}", {"components": ["uploads"]}, format="json"
        )
    assert response.status_code == 202, response.content
    poll = operator_api.get(response["Location"])
    assert poll.status_code == 200
    assert poll.json()["status"] == "succeeded"
    assert poll.json()["job"]["percent"] == 100
    assert (media / "a.txt").read_text() == "alpha"


def test_drill_endpoint(operator_api, media, django_capture_on_commit_callbacks):
    start_full(operator_api, django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=True):
        response = operator_api.post("/api/backup/test", {}, format="json")
    assert response.status_code == 202, response.content
    drill = RestoreJob.objects.get(pk=response.json()["restore"]["id"])
    assert drill.status == RestoreStatus.SUCCEEDED and drill.kind == "drill"


def test_bad_input_names_the_field(operator_api, media):
    bad = operator_api.post("/api/backup/full", {"components": ["floppy"]}, format="json")
    assert bad.status_code == 400 and "components" in bad.json()
    no_body = operator_api.post("/api/backup/full")
    assert no_body.status_code == 400
    parent = operator_api.post(
        "/api/backup/incremental",
        {"parent": "00000000-0000-0000-0000-000000000000"},
        format="json",
    )
    assert parent.status_code == 400 and "parent" in parent.json()
    no_parent = operator_api.post("/api/backup/incremental", {}, format="json")
    assert no_parent.status_code == 409 and no_parent.json()["code"] == "no_parent"
    missing = operator_api.get("/api/backup/00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404
    dry = operator_api.post("/api/backup/cleanup", {"dry_run": "yes"}, format="json")
    assert dry.status_code == 400 and "dry_run" in dry.json()


def test_delete_refused_for_a_parent(operator_api, media, django_capture_on_commit_callbacks):
    full = start_full(operator_api, django_capture_on_commit_callbacks).json()["backup"]["id"]
    with django_capture_on_commit_callbacks(execute=True):
        operator_api.post("/api/backup/incremental", {"components": ["uploads"]}, format="json")
    refused = operator_api.delete(f"/api/backup/{full}")
    assert refused.status_code == 409 and refused.json()["code"] == "has_dependents"
    cleanup = operator_api.post("/api/backup/cleanup", {"dry_run": True}, format="json")
    assert cleanup.status_code == 200
    assert {row["id"] for row in cleanup.json()["kept"]} >= {full}


def test_roles(outsider_api, compliance_api, anon_api, media):
    assert anon_api.get("/api/backup/status").status_code == 401
    assert outsider_api.get("/api/backup/list").status_code == 403
    assert outsider_api.post("/api/backup/full", {}, format="json").status_code == 403
    # Compliance officers read the evidence but start nothing.
    assert compliance_api.get("/api/backup/list").status_code == 200
    assert compliance_api.get("/api/backup/restores").status_code == 200
    assert compliance_api.post("/api/backup/full", {}, format="json").status_code == 403
    assert compliance_api.post("/api/backup/cleanup", {}, format="json").status_code == 403
