"""Verification runs become jobs (bridge.Job, kind compliance.verify_audit_chain): the
shared job table replaces this app's own, and AuditVerification stays as a proxy."""

from django.db import migrations

_STATUS = {"ok": "succeeded", "broken": "succeeded", "failed": "failed", "running": "failed"}


def copy_runs_to_jobs(apps, schema_editor):
    Old = apps.get_model("compliance", "AuditVerification")
    Job = apps.get_model("bridge", "Job")
    for run in Old.objects.order_by("id").iterator():
        interrupted = run.status == "running"
        Job.objects.create(
            kind="compliance.verify_audit_chain",
            status=_STATUS.get(run.status, "failed"),
            actor_username=run.requested_by,
            params={"source": run.source},
            result={}
            if run.status in ("failed", "running")
            else {
                "ok": run.status == "ok",
                "checked": run.checked,
                "unsealed": run.unsealed,
                "first_broken_id": run.first_broken_id,
                "reason": run.reason,
            },
            error="interrupted by an upgrade"
            if interrupted
            else (run.reason if run.status == "failed" else ""),
            progress_done=run.checked,
            progress_total=run.total,
            started_at=run.started_at,
            finished_at=run.finished_at or run.started_at,
            heartbeat_at=run.finished_at or run.started_at,
        )


class Migration(migrations.Migration):
    dependencies = [
        ("bridge", "0001_initial"),
        ("compliance", "0003_console_indexes"),
    ]

    operations = [
        migrations.RunPython(copy_runs_to_jobs, migrations.RunPython.noop),
        migrations.DeleteModel(
            name="AuditVerification",
        ),
        migrations.AlterModelOptions(
            name="auditevent",
            options={
                "ordering": ["-id"],
                "permissions": [("log_custom_event", "Can record custom audit events")],
            },
        ),
        migrations.CreateModel(
            name="AuditVerification",
            fields=[],
            options={
                "verbose_name": "audit verification",
                "ordering": ["-id"],
                "permissions": [
                    ("verify_chain", "Can start an audit chain verification"),
                    ("cancel_verification", "Can cancel a running audit chain verification"),
                ],
                "proxy": True,
                "indexes": [],
                "constraints": [],
            },
            bases=("bridge.job",),
        ),
    ]
