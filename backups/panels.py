"""The backups area's dashboard panels: the newest backup's age against the RPO, the 3-2-1
state, the last restore drill and its restore time, and backups' sizes and durations."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone

from backups import services
from backups.choices import BackupStatus
from backups.models import Backup
from backups.sizes import size_text
from bridge.panels import Bar, Chart, Figure, Link, PanelContent, Row, register_panel

CHART_BACKUPS = 24


def _age_text(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _recent() -> list[Backup]:
    finished = Backup.objects.filter(status=BackupStatus.SUCCEEDED).order_by("-created_at")
    return list(reversed(finished[:CHART_BACKUPS]))


@register_panel("backups", title="Backups", permissions=("backups.view_backup",), order=35)
def backups_panel(request: HttpRequest) -> PanelContent:
    report = services.status()
    newest = report["newest"]
    rpo = settings.BACKUP_RPO.total_seconds()
    figures = []
    if newest is None:
        figures.append(Figure("newest backup", "none", state="bad", hint="take a full backup"))
    else:
        age = newest["age_seconds"]
        figures.append(
            Figure(
                "newest backup age",
                _age_text(age),
                state="ok" if age <= rpo else "bad",
                hint=f"RPO {_age_text(rpo)}",
            )
        )
        rule = newest["rule_321"]
        figures.append(
            Figure(
                "3-2-1",
                "met" if rule["ok"] else "violated",
                state="ok" if rule["ok"] else "bad",
                hint=f"{rule['copies']} copies, {len(rule['media'])} media, "
                f"{len(rule['offsite'])} offsite",
            )
        )
    drill = report["last_drill"]
    if drill is None:
        figures.append(Figure("last drill", "never", state="warn", hint="POST /api/backup/test"))
    else:
        ok = drill["status"] == "succeeded"
        rto = drill["rto_seconds"]
        figures.append(
            Figure(
                "last drill",
                "passed" if ok else drill["status"],
                state="ok" if ok else "bad",
                hint=f"restore time {rto:.1f} s" if rto is not None else "",
            )
        )
    recent = _recent()
    chart = Chart(
        title="Stored size of the last backups (KiB)",
        bars=[
            Bar(f"{backup.created_at:%d %H:%M}", max(0, backup.stored_bytes // 1024))
            for backup in recent
        ],
        label_every=4,
        summary=f"{len(recent)} backups, largest "
        f"{size_text(max((b.stored_bytes for b in recent), default=0))}",
    )
    rows = [
        Row(label=problem, state="bad" if "no " in problem else "warn")
        for problem in report["problems"]
    ]
    changelist = reverse("admin:backups_backup_changelist")
    return PanelContent(
        state=report["status"],
        badge={"ok": "protected", "warn": "attention", "bad": "AT RISK"}[report["status"]],
        figures=figures,
        chart=chart if recent else None,
        rows_title="Problems" if rows else "",
        rows=rows,
        links=[
            Link("Backups", changelist, permission="backups.view_backup"),
            Link(
                "Restores and drills",
                reverse("admin:backups_restorejob_changelist"),
                permission="backups.view_restorejob",
            ),
        ],
        note=f"{report['counts'].get('succeeded', 0)} successful backups kept; "
        f"as of {timezone.now():%H:%M:%S} UTC",
    )


@register_panel(
    "backup-durations",
    title="Backups · durations",
    permissions=("backups.view_backup",),
    order=36,
)
def durations_panel(request: HttpRequest) -> PanelContent:
    recent = _recent()
    durations = [backup.duration_seconds or 0.0 for backup in recent]
    longest = max(durations, default=0.0)
    # Small installations back up in well under a second: bars in milliseconds then.
    unit, scale = ("ms", 1000) if longest < 10 else ("s", 1)
    return PanelContent(
        state="info" if recent else "warn",
        figures=[
            Figure("last", f"{durations[-1]:.1f} s" if durations else "-"),
            Figure("longest", f"{longest:.1f} s" if durations else "-"),
            Figure("stored", size_text(sum(b.stored_bytes for b in recent))),
        ],
        chart=Chart(
            title=f"Duration of the last backups ({unit})",
            bars=[
                Bar(f"{backup.created_at:%d %H:%M}", round(seconds * scale))
                for backup, seconds in zip(recent, durations, strict=True)
            ],
            label_every=4,
            summary=f"{len(recent)} backups, longest {longest:.1f} s",
        )
        if recent
        else None,
        note="" if recent else "no successful backup yet",
    )
