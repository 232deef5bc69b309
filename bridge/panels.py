"""The console's dashboard: panels that each app registers from its own `panels.py`.

An app describes what its area looks like at a glance and who may see it:

    from bridge.panels import Figure, Link, PanelContent, register_panel

    @register_panel("backups", title="Backups", permissions=("backups.view_backup",), order=40)
    def backups_panel(request: HttpRequest) -> PanelContent:
        return PanelContent(
            state="ok",
            figures=[Figure("last backup", "2 h ago", state="ok")],
            links=[Link("Backups", reverse("admin:backups_backup_changelist"),
                        permission="backups.view_backup")],
        )

The dashboard shows a panel only to a user holding every one of its `permissions` (and passing
its `allowed` check, if any); inside a shown panel, figures, rows and links that name a
`permission` are left out for a user without it. Panels are loaded from every installed app's
`panels` module the first time the dashboard is built, so an app needs no AppConfig code.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from django.http import HttpRequest
from django.utils import timezone
from django.utils.module_loading import autodiscover_modules

log = logging.getLogger(__name__)

# Colours a panel, figure or row can take: the console's CSS has one class per state.
STATES = ("ok", "warn", "bad", "info", "")


@dataclass(frozen=True)
class Figure:
    """A number with its label, e.g. 12 "locked out"; `hint` is a small line under it."""

    label: str
    value: Any
    state: str = ""
    hint: str = ""
    permission: str = ""


@dataclass(frozen=True)
class Bar:
    label: str
    value: int


@dataclass(frozen=True)
class Chart:
    """A bar chart drawn as SVG (no script, so nothing for the Content-Security-Policy to
    allow): one bar per entry, zero-height bars included, every `label_every`-th label shown
    (the template writes the labels in HTML under it, so their text never stretches)."""

    title: str
    bars: Sequence[Bar]
    label_every: int = 3
    # The line beside the title; empty: "N in all, peak M an hour" (charts of events per hour).
    summary: str = ""

    # The SVG's own coordinate system; it scales to the panel's width.
    WIDTH = 480
    PLOT = 96

    @property
    def peak(self) -> int:
        return max([bar.value for bar in self.bars] + [0])

    @property
    def total(self) -> int:
        return sum(bar.value for bar in self.bars)

    def shapes(self) -> list[dict[str, Any]]:
        """Each bar's rectangle in the SVG's coordinates, its label and whether to show it."""
        slot = self.WIDTH / max(len(self.bars), 1)
        scale = (self.PLOT - 4) / self.peak if self.peak else 0  # the peak stays clear of the top
        shapes = []
        for index, bar in enumerate(self.bars):
            height = round(bar.value * scale, 1)
            if bar.value and height < 1:
                height = 1.0  # a non-empty hour never looks empty
            shapes.append(
                {
                    "label": bar.label,
                    "value": bar.value,
                    "x": round(index * slot + slot * 0.12, 1),
                    "width": round(slot * 0.76, 1),
                    "y": round(self.PLOT - height, 1),
                    "height": height,
                    # Counted from the last bar, so the current hour is always labelled.
                    "show_label": (len(self.bars) - 1 - index) % self.label_every == 0,
                }
            )
        return shapes


@dataclass(frozen=True)
class Row:
    """A line of a panel's list: a readiness check, a job (with `percent` for its bar)."""

    label: str
    value: str = ""
    state: str = ""
    detail: str = ""
    url: str = ""
    percent: int | None = None
    permission: str = ""


@dataclass(frozen=True)
class Link:
    label: str
    url: str
    permission: str = ""


@dataclass
class PanelContent:
    """What a panel shows now. `state` colours it; `badge` is a short verdict by the title."""

    state: str = ""
    badge: str = ""
    figures: list[Figure] = field(default_factory=list)
    chart: Chart | None = None
    rows_title: str = ""
    rows: list[Row] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    note: str = ""


@dataclass(frozen=True)
class Panel:
    """A registered panel: who may see it and how to build its content for a request."""

    key: str
    title: str
    build: Callable[[HttpRequest], PanelContent]
    permissions: tuple[str, ...] = ()
    allowed: Callable[[Any], bool] | None = None
    order: int = 100

    def visible_to(self, user: Any) -> bool:
        if not (user.is_active and user.is_staff):
            return False
        if self.permissions and not user.has_perms(self.permissions):
            return False
        return self.allowed is None or bool(self.allowed(user))


_registry: dict[str, Panel] = {}
_discovered = False
_discover_lock = threading.Lock()


def register_panel(
    key: str,
    *,
    title: str,
    permissions: str | Sequence[str] = (),
    allowed: Callable[[Any], bool] | None = None,
    order: int = 100,
    build: Callable[[HttpRequest], PanelContent] | None = None,
) -> Any:
    """Register a dashboard panel; use it as a decorator on the build function or pass `build`.

    Registering a key again replaces the panel (a module imported twice stays one panel).
    """
    needed = (permissions,) if isinstance(permissions, str) else tuple(permissions)

    def register(function: Callable[[HttpRequest], PanelContent]) -> Callable:
        _registry[key] = Panel(key, title, function, needed, allowed, order)
        return function

    if build is not None:
        register(build)
        return _registry[key]
    return register


def discover() -> None:
    """Import every installed app's `panels` module, once per process."""
    global _discovered
    if _discovered:
        return
    with _discover_lock:
        if not _discovered:
            autodiscover_modules("panels")
            _discovered = True


def registered_panels() -> list[Panel]:
    discover()
    return sorted(_registry.values(), key=lambda panel: (panel.order, panel.key))


def panels_for(request: HttpRequest) -> list[Panel]:
    """The registered panels this request's user may see, in display order."""
    return [panel for panel in registered_panels() if panel.visible_to(request.user)]


@dataclass(frozen=True)
class ShownPanel:
    panel: Panel
    content: PanelContent


def _allowed(user: Any, item: Figure | Row | Link) -> bool:
    return not item.permission or user.has_perm(item.permission)


def build_panels(request: HttpRequest) -> list[ShownPanel]:
    """Every panel the user may see, built, with the figures, rows and links it may not see
    left out. A panel whose build fails says so instead of taking the dashboard down."""
    user = request.user
    shown = []
    for panel in panels_for(request):
        try:
            content = panel.build(request)
        except Exception as exc:
            log.exception("dashboard panel %s could not be built", panel.key)
            content = PanelContent(
                state="bad", badge="unavailable", note=f"Could not be built: {type(exc).__name__}"
            )
        content = replace(
            content,
            figures=[item for item in content.figures if _allowed(user, item)],
            rows=[item for item in content.rows if _allowed(user, item)],
            links=[item for item in content.links if _allowed(user, item)],
        )
        shown.append(ShownPanel(panel, content))
    return shown


# --- Helpers for the panels' own modules ----------------------------------------------------


def utc(moment: datetime | None) -> str:
    """A time as the console shows it everywhere: seconds, and saying UTC."""
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def age(delta: timedelta | None) -> str:
    """A short, readable age: "40 s", "12 min", "5 h", "3 d"."""
    if delta is None:
        return "-"
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 2 * 3600:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


def ago(moment: datetime | None) -> str:
    return "never" if moment is None else f"{age(timezone.now() - moment)} ago"


def worst(*states: str) -> str:
    """The most alarming of several states (bad > warn > ok)."""
    for state in ("bad", "warn", "info", "ok"):
        if state in states:
            return state
    return ""


# --- The platform's own panel: background jobs ----------------------------------------------


def _can_see_jobs(user: Any) -> bool:
    from bridge import jobs

    return any(user.has_perm(kind.permission) for kind in jobs.KINDS.values())


_JOB_STATES = {
    "pending": "info",
    "running": "info",
    "succeeded": "ok",
    "failed": "bad",
    "cancelled": "warn",
}


@register_panel("platform", title="Platform · jobs", allowed=_can_see_jobs, order=40)
def jobs_panel(request: HttpRequest) -> PanelContent:
    from django.urls import reverse

    from bridge import jobs
    from bridge.choices import JobStatus

    visible = jobs.visible_jobs(request.user)
    day_ago = timezone.now() - timedelta(days=1)
    running = visible.filter(status=JobStatus.RUNNING).count()
    pending = visible.filter(status=JobStatus.PENDING).count()
    failed = visible.filter(status=JobStatus.FAILED, finished_at__gte=day_ago).count()
    rows = []
    for job in visible.order_by("-id")[:5]:
        spec = jobs.kind_of(job)
        rows.append(
            Row(
                label=f"#{job.pk} {spec.title if spec else job.kind}",
                value=job.get_status_display(),
                state=_JOB_STATES.get(job.status, ""),
                detail=utc(job.created_at),
                url=reverse("admin:bridge_job_change", args=[job.pk]),
                percent=job.percent,
            )
        )
    return PanelContent(
        state="bad" if failed else "ok",
        badge=f"{failed} failed in 24 h" if failed else "no failures in 24 h",
        figures=[
            Figure("running", running, state="info" if running else ""),
            Figure("pending", pending),
            Figure("failed 24 h", failed, state="bad" if failed else "ok"),
        ],
        rows_title="Latest jobs",
        rows=rows,
        links=[
            Link("Jobs", reverse("admin:bridge_job_changelist")),
            Link(
                "Periodic tasks",
                reverse("admin:django_celery_beat_periodictask_changelist"),
                permission="django_celery_beat.view_periodictask",
            ),
        ],
        note="" if rows else "No jobs yet.",
    )
