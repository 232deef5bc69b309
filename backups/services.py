"""Backups' services: start, run, verify, restore, drill, retain and delete backups.

The API, the console's actions, the management commands and the beat schedule all call these
functions, so they can never disagree. Long work runs as job rows (bridge/jobs.py): a backup,
a restore and a drill are each a job with progress and a heartbeat, and the reaper fails the
job of a killed worker; `reap_backups` then fails its backup and removes its partial copies.

A backup is one artifact per unit (backups/components), streamed through backups/stream.py
(zstd, then AES-256-GCM in framed chunks under a data key of its own) onto every local target at
once, each copy committed only when its read-back SHA-256 matches, then uploaded to the remote
targets through the recovery app's retry executor and circuit breaker.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from backups import stream
from backups import targets as target_registry
from backups.choices import (
    BACKUP_JOB_KIND,
    DRILL_JOB_KIND,
    RESTORE_JOB_KIND,
    BackupKind,
    BackupStatus,
    Component,
    ComponentState,
    CopyStatus,
    RestoreKind,
    RestoreStatus,
)
from backups.components import (
    ComponentError,
    ComponentHandler,
    Destination,
    RestoreRefused,
    Unit,
    handler_for,
)
from backups.models import Artifact, Backup, BackupCopy, RestoreJob, WalSegment
from bridge.choices import JobStatus
from bridge.jobs import Progress, run_job, start_job
from bridge.models import Job
from compliance import approvals
from compliance.audit import AuditContext, record_event
from compliance.choices import ApprovalAction, AuditAction
from compliance.models import ApprovalRequest
from compliance.redaction import redact

log = logging.getLogger(__name__)

PITR_BASE_UNIT = "pitr-base"
RULE_COPIES, RULE_MEDIA, RULE_OFFSITE = 3, 2, 1


class BackupRefused(Exception):
    """A request that cannot be carried out as asked; nothing was started or changed.

    `field` names the request field at fault (a 400 naming it), else the state is (409).
    """

    def __init__(self, message: str, code: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


# --- Starting -----------------------------------------------------------------------------


def _components(requested: list[str] | None) -> list[str]:
    if not requested:
        return list(Component.values)
    unknown = [name for name in requested if name not in Component.values]
    if unknown:
        raise BackupRefused(
            f"Unknown component {unknown[0]!r}: choose from {', '.join(Component.values)}.",
            "unknown_component",
            field="components",
        )
    # Duplicates dropped, the documented order kept.
    return [name for name in Component.values if name in requested]


def newest_backup(*, full_only: bool = False) -> Backup | None:
    backups = Backup.objects.filter(status=BackupStatus.SUCCEEDED)
    if full_only:
        backups = backups.filter(kind=BackupKind.FULL)
    return backups.order_by("-created_at").first()


def start_backup(
    *,
    kind: str,
    context: AuditContext,
    components: list[str] | None = None,
    parent: Backup | None = None,
    label: str = "",
    enqueue: bool = True,
    limit: bool = True,
) -> Backup:
    """Record a pending backup and hand it to a worker (or, enqueue=False, to the caller).

    At most BACKUP_MAX_CONCURRENT backups are pending or running at once (limit=False: a
    restore's safety backup, which must not be refused for that): slow backups must not pile
    up behind each other, each holding a database snapshot open.
    """
    reap_backups()
    if kind not in BackupKind.values:
        raise BackupRefused(f"Unknown kind {kind!r}.", "unknown_kind", field="kind")
    chosen = _components(components)
    if kind == BackupKind.INCREMENTAL:
        parent = parent or newest_backup()
        if parent is None:
            raise BackupRefused(
                "No successful backup to base an incremental on: take a full backup first.",
                "no_parent",
            )
        if parent.status != BackupStatus.SUCCEEDED:
            raise BackupRefused(
                f"Backup {parent.pk} is {parent.status}: an incremental needs a successful parent.",
                "parent_not_usable",
                field="parent",
            )
    elif parent is not None:
        raise BackupRefused(
            "Only an incremental backup has a parent.", "no_parent_allowed", "parent"
        )
    with transaction.atomic():
        if limit:
            _refuse_when_busy()
        backup = Backup.objects.create(
            kind=kind,
            components=chosen,
            parent=parent,
            label=label,
            created_by=context.actor_username,
        )
        job = start_job(
            kind=BACKUP_JOB_KIND,
            context=context,
            params={"backup_id": str(backup.pk), "kind": kind},
            enqueue=enqueue,
        )
        backup.job = job
        backup.save(update_fields=["job"])
        record_event(
            action=AuditAction.BACKUP_REQUESTED,
            context=context,
            object_type="backups.backup",
            object_id=backup.pk,
            details={
                "kind": kind,
                "components": chosen,
                "parent": str(parent.pk) if parent else None,
                "label": label,
                "job": job.pk,
            },
        )
    return backup


def _catalog_lock() -> None:
    """Inside a transaction: serialise what changes which backups exist or are in use (starting
    a backup, a restore or a drill; retention deleting). PostgreSQL: an advisory lock held to
    the end of the transaction; SQLite serialises writers itself."""
    from django.db import connection

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext('bridge.backups.catalog'))")


def _live_restores() -> QuerySet[RestoreJob]:
    return RestoreJob.objects.filter(
        kind=RestoreKind.RESTORE,
        dry_run=False,
        status__in=[RestoreStatus.PENDING, RestoreStatus.RUNNING],
    )


def _refuse_when_busy() -> None:
    """Inside the starting transaction, under the catalog lock: count what is in progress."""
    _catalog_lock()
    restoring = _live_restores().first()
    if restoring is not None:
        raise BackupRefused(
            f"Restore {restoring.pk} is overwriting live data: a backup now would record a "
            "half-restored system. Try again when it has finished.",
            "restore_in_progress",
        )
    busy = Backup.objects.filter(status__in=[BackupStatus.PENDING, BackupStatus.RUNNING]).count()
    if busy >= settings.BACKUP_MAX_CONCURRENT:
        raise BackupRefused(
            f"{busy} backup(s) already pending or running (BACKUP_MAX_CONCURRENT is "
            f"{settings.BACKUP_MAX_CONCURRENT}): try again when one has finished.",
            "backups_busy",
        )


# --- Running a backup ---------------------------------------------------------------------


class _Meter:
    """Bytes read from the sources, reported to the job's progress (throttled there)."""

    def __init__(self, progress: Progress | None, total: int | None) -> None:
        self.progress = progress
        self.total = total
        self.done = 0
        self.message = ""

    def __call__(self, count: int) -> None:
        self.done += count
        if self.total and self.done >= self.total:
            # The estimate was short: keep the total just ahead, so the bar holds at 99%
            # (never 100% early, never going backwards) and the job row is still written only
            # every half second (at the total it would be written on every report).
            self.total = self.done + max(1, self.done // 100)
        self._report()

    def uploaded(self, count: int) -> None:
        """Bytes sent to a remote target: not source bytes, but proof of life (and a cancel
        request is seen)."""
        self._report()

    def stage(self, message: str) -> None:
        self.message = message[:200]
        self._report()

    def _report(self) -> None:
        if self.progress is not None:
            self.progress.update(self.done, self.total, self.message)


def _estimate(components: list[str]) -> int | None:
    """Roughly how many bytes the sources hold, so progress can say a percentage."""
    total = 0
    try:
        if Component.DATABASE in components:
            from django.db import connection

            if connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_database_size(current_database())")
                    total += int(cursor.fetchone()[0])
            else:
                name = Path(str(settings.DATABASES["default"]["NAME"]))
                total += name.stat().st_size if name.exists() else 0
        if Component.UPLOADS in components and Path(settings.MEDIA_ROOT).is_dir():
            total += sum(
                item.stat().st_size
                for item in Path(settings.MEDIA_ROOT).rglob("*")
                if item.is_file()
            )
    except Exception:  # an estimate only: never the reason a backup fails
        log.debug("backup size estimate failed", exc_info=True)
        return None
    return total or None


@contextmanager
def _heartbeat(job: Job) -> Iterator[None]:
    """Beat the job's heartbeat from a thread while the work runs: some steps cannot report
    progress (an upload through retries, a safety backup run as its own job, a restore applied
    in one transaction), and a live worker's job must never be reaped as dead. A killed worker
    takes the thread with it, so the reaper still finds its job."""
    from django.db import connection as thread_connection

    stop = threading.Event()
    interval = max(0.2, settings.JOB_HEARTBEAT_TIMEOUT / 4)

    def beat() -> None:
        try:
            while not stop.wait(interval):
                Job.objects.filter(pk=job.pk, status=JobStatus.RUNNING).update(
                    heartbeat_at=timezone.now()
                )
        except Exception:
            log.exception("heartbeat of job %s failed", job.pk)
        finally:
            thread_connection.close()

    thread = threading.Thread(target=beat, name=f"heartbeat-{job.pk}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval + 5)


def run_backup_job(job: Job, progress: Progress) -> dict[str, Any]:
    """The backup job (backups/tasks.py): claim the backup row and make it."""
    backup_id = job.params["backup_id"]
    claimed = Backup.objects.filter(pk=backup_id, status=BackupStatus.PENDING).update(
        status=BackupStatus.RUNNING, started_at=timezone.now()
    )
    if not claimed:
        backup = Backup.objects.filter(pk=backup_id).first()
        raise ComponentError(
            f"backup {backup_id} is {backup.status if backup else 'gone'}, not pending",
            "not_pending",
        )
    backup = Backup.objects.get(pk=backup_id)
    try:
        with _heartbeat(job):
            return perform_backup(backup, progress=progress)
    except BaseException as exc:
        _fail_backup(backup, exc)
        raise


def perform_backup(backup: Backup, *, progress: Progress | None = None) -> dict[str, Any]:
    all_targets = target_registry.configured_targets()
    if not all_targets:
        raise ComponentError("no backup target is configured (BACKUP_TARGETS)", "no_targets")
    key = stream.new_data_key() if settings.ENABLE_BACKUP_ENCRYPTION else None
    if key is not None:
        backup.key_id, backup.master_key_id, backup.wrapped_key = (
            key.key_id,
            key.master_key_id,
            key.wrapped,
        )
        backup.save(update_fields=["key_id", "master_key_id", "wrapped_key"])
    # An incremental reads about what its parent read (the uploads are walked, not re-read);
    # a full one is estimated from the sources.
    estimate = backup.parent.raw_bytes if backup.parent else _estimate(backup.components)
    meter = _Meter(progress, estimate or None)
    parent_units = _unit_manifests(backup.parent) if backup.parent else {}
    manifest: dict[str, Any] = {}

    if backup.kind == BackupKind.POINT_IN_TIME:
        point = _restore_point(backup)
        if point:
            manifest["restore_point"] = point

    for component in backup.components:
        handler = handler_for(component)
        units = handler.units()
        if isinstance(units, str):
            manifest[component] = {"state": ComponentState.SKIPPED, "reason": units}
            continue
        entries: dict[str, Any] = {}
        for unit in units:
            meter.stage(f"{component}: {unit.name}")

            def write(
                out: BinaryIO, unit: Unit = unit, handler: ComponentHandler = handler
            ) -> dict:
                return handler.backup(unit, out, parent=parent_units.get(unit.name), on_bytes=meter)

            entries[unit.name] = _store_unit(
                backup, component, unit, write, key, all_targets, meter.uploaded
            )
        if component == Component.DATABASE and backup.kind != BackupKind.INCREMENTAL:
            base = _pitr_base(backup, key, all_targets, meter)
            if base:
                entries[PITR_BASE_UNIT] = base
        manifest[component] = {"state": ComponentState.DONE, "units": entries}

    artifacts = list(backup.artifacts.all())
    backup.manifest = manifest
    backup.raw_bytes = sum(item.raw_bytes for item in artifacts)
    backup.stored_bytes = sum(item.stored_bytes for item in artifacts)
    rule = check_321(backup)
    with transaction.atomic():
        backup.rule_321, backup.rule_321_ok = rule, rule["ok"]
        backup.status = BackupStatus.SUCCEEDED
        backup.finished_at = timezone.now()
        backup.error = ""
        # Only from running: a backup the reaper failed meanwhile (its copies deleted) stays
        # failed, whatever this worker finished.
        finished = Backup.objects.filter(pk=backup.pk, status=BackupStatus.RUNNING).update(
            manifest=backup.manifest,
            raw_bytes=backup.raw_bytes,
            stored_bytes=backup.stored_bytes,
            rule_321=rule,
            rule_321_ok=rule["ok"],
            status=BackupStatus.SUCCEEDED,
            finished_at=backup.finished_at,
            error="",
        )
        if not finished:
            raise ComponentError(
                f"backup {backup.pk} was failed while it ran (its worker was presumed lost)",
                "reaped",
            )
        record_event(
            action=AuditAction.BACKUP_SUCCEEDED,
            context=AuditContext.system(),
            object_type="backups.backup",
            object_id=backup.pk,
            details={
                "kind": backup.kind,
                "artifacts": len(artifacts),
                "raw_bytes": backup.raw_bytes,
                "stored_bytes": backup.stored_bytes,
                "rule_321": rule["ok"],
            },
        )
        if not rule["ok"]:
            record_event(
                action=AuditAction.BACKUP_RULE_321_VIOLATED,
                context=AuditContext.system(),
                object_type="backups.backup",
                object_id=backup.pk,
                details={"problems": rule["problems"]},
            )
    if not rule["ok"]:
        _alert(
            f"Backup {backup.pk} breaks the 3-2-1 rule",
            "The backup succeeded but is not protected as the 3-2-1 rule asks:\n- "
            + "\n- ".join(rule["problems"]),
        )
    return {
        "backup_id": str(backup.pk),
        "artifacts": len(artifacts),
        "raw_bytes": backup.raw_bytes,
        "stored_bytes": backup.stored_bytes,
        "rule_321_ok": rule["ok"],
        "skipped": {
            name: entry["reason"]
            for name, entry in manifest.items()
            if isinstance(entry, dict) and entry.get("state") == ComponentState.SKIPPED
        },
    }


def _restore_point(backup: Backup) -> dict[str, Any] | None:
    from backups import pitr

    if not pitr.archiving_configured():
        return None
    name = f"bridge-{str(backup.pk)[:8]}"
    point = pitr.create_restore_point(name)
    backup.restore_point = point.get("name", name)
    backup.wal_lsn = str(point.get("lsn", ""))
    backup.save(update_fields=["restore_point", "wal_lsn"])
    return point


def _pitr_base(
    backup: Backup, key: stream.DataKey | None, all_targets: list, meter: _Meter
) -> dict[str, Any] | None:
    from backups import pitr

    if not pitr.archiving_configured():
        return None
    meter.stage("database: base backup for point-in-time recovery")
    unit = Unit(component=Component.DATABASE, name=PITR_BASE_UNIT)

    def write(out: BinaryIO) -> dict:
        return pitr.base_backup(out, on_bytes=meter)

    return _store_unit(backup, Component.DATABASE, unit, write, key, all_targets, meter.uploaded)


def _store_unit(
    backup: Backup,
    component: str,
    unit: Unit,
    write: Callable[[BinaryIO], dict],
    key: stream.DataKey | None,
    all_targets: list,
    on_upload: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """One unit -> one artifact, tee'd onto every local target at once, then uploaded to the
    remote ones from the first committed local copy. At least one copy must commit."""
    location = f"{backup.pk}/{unit.name}"
    local = [target for target in all_targets if not target.remote]
    remote = [target for target in all_targets if target.remote]
    uploads = [target.begin(location) for target in local]
    spool = None
    if not uploads:
        Path(settings.BACKUP_SCRATCH_DIR).mkdir(parents=True, exist_ok=True)
        spool = tempfile.NamedTemporaryFile(dir=settings.BACKUP_SCRATCH_DIR, suffix=".spool")
    outs = [upload.file for upload in uploads] or [spool]
    try:
        writer = stream.ArtifactWriter(
            outs,
            name=unit.name,
            key=key,
            meta={"backup_id": str(backup.pk), "component": component, "kind": backup.kind},
        )
        entry = write(writer)
        info = writer.finish()
    except BaseException:
        for upload in uploads:
            with suppress(Exception):
                upload.abort()
        if spool is not None:
            spool.close()
        raise
    artifact = Artifact.objects.create(
        backup=backup,
        component=component,
        name=unit.name,
        raw_bytes=info.raw_bytes,
        stored_bytes=info.stored_bytes,
        sha256=info.sha256,
        chunks=info.chunks,
    )
    source: Path | None = None
    # Each local copy is read back and hashed before it is renamed into place: in parallel,
    # one thread per copy (hashing and file I/O release the GIL).
    copies = [_new_copy(artifact, target, location) for target in local]
    with ThreadPoolExecutor(max_workers=max(1, len(uploads))) as pool:
        outcomes = list(pool.map(lambda upload: _commit(upload, info.sha256), uploads))
    for target, copy, error in zip(local, copies, outcomes, strict=True):
        if error is not None:
            _copy_failed(copy, error)
            continue
        _copy_committed(copy, info)
        source = source or target.local_path(location)
    try:
        if spool is not None:
            spool.flush()
            source = Path(spool.name)
        for target in remote:
            copy = _new_copy(artifact, target, location)
            if source is None:
                _copy_failed(copy, ComponentError("no local copy to upload from"))
                continue
            try:
                target.put(source, location, sha256=info.sha256, on_bytes=on_upload)
            except Exception as exc:
                _copy_failed(copy, exc)
                continue
            _copy_committed(copy, info)
    finally:
        if spool is not None:
            spool.close()
    if not artifact.copies.filter(status=CopyStatus.COMMITTED).exists():
        errors = "; ".join(
            f"{copy.target}: {copy.error}" for copy in artifact.copies.all() if copy.error
        )
        raise ComponentError(f"{unit.name}: no copy could be stored ({errors})", "no_copy")
    return {
        "artifact": unit.name,
        "options": redact(dict(unit.options)),
        "raw_bytes": info.raw_bytes,
        "stored_bytes": info.stored_bytes,
        "sha256": info.sha256,
        "manifest": entry,
    }


def _commit(upload: Any, sha256: str) -> Exception | None:
    try:
        upload.commit(sha256=sha256)
    except Exception as exc:
        return exc
    return None


def _new_copy(artifact: Artifact, target: Any, location: str) -> BackupCopy:
    return BackupCopy.objects.create(
        artifact=artifact,
        target=target.name,
        media=target.media,
        offsite=target.offsite,
        location=location,
        status=CopyStatus.WRITING,
    )


def _copy_committed(copy: BackupCopy, info: stream.ArtifactInfo) -> None:
    copy.status = CopyStatus.COMMITTED
    copy.size = info.stored_bytes
    copy.sha256 = info.sha256
    copy.verified_at = timezone.now()
    copy.save(update_fields=["status", "size", "sha256", "verified_at"])


def _copy_failed(copy: BackupCopy, exc: BaseException) -> None:
    copy.status = CopyStatus.FAILED
    copy.error = redact(f"{type(exc).__name__}: {exc}")[:2000]
    copy.save(update_fields=["status", "error"])
    log.error("backup copy on %s failed: %s", copy.target, copy.error)


def _fail_backup(backup: Backup, exc: BaseException) -> None:
    """Say so on the row, loudly, and remove what was written: partial copies never count."""
    reason = redact(f"{type(exc).__name__}: {exc}")[:2000]
    log.error("backup %s failed: %s", backup.pk, reason)
    _mark_failed(backup, reason)


def _mark_failed(backup: Backup, reason: str) -> bool:
    with transaction.atomic():
        changed = Backup.objects.filter(
            pk=backup.pk, status__in=[BackupStatus.PENDING, BackupStatus.RUNNING]
        ).update(status=BackupStatus.FAILED, error=reason, finished_at=timezone.now())
        if not changed:
            return False
        record_event(
            action=AuditAction.BACKUP_FAILED,
            context=AuditContext.system(),
            object_type="backups.backup",
            object_id=backup.pk,
            details={"kind": backup.kind, "error": reason},
        )
    _remove_copies(backup)
    _alert(f"Backup {backup.pk} failed", f"The {backup.kind} backup failed: {reason}")
    return True


def _remove_copies(backup: Backup) -> int:
    removed = 0
    names = {target.name: target for target in target_registry.configured_targets()}
    for copy in (
        BackupCopy.objects.filter(artifact__backup=backup)
        .exclude(status=CopyStatus.DELETED)
        .select_related("artifact")
    ):
        target = names.get(copy.target)
        try:
            if target is not None:
                target.delete(_canonical(copy))
        except Exception as exc:
            log.error("could not delete %s on %s: %s", copy.location, copy.target, redact(str(exc)))
            continue
        copy.status = CopyStatus.DELETED
        copy.save(update_fields=["status"])
        removed += 1
    return removed


def _canonical(copy: BackupCopy) -> str:
    """Where a copy of this artifact must be: the catalog's location is used only when it is
    that, so a location edited in the database cannot steer a deletion onto another backup."""
    expected = f"{copy.artifact.backup_id}/{copy.artifact.name}"
    if copy.location != expected:
        log.error(
            "copy %s on %s names %r, not its own place %r: the catalog was edited; deleting "
            "only its own place",
            copy.pk,
            copy.target,
            copy.location,
            expected,
        )
    return expected


def reap_backups() -> int:
    """Fail backups and restores whose job has ended without them (a killed worker, a job the
    reaper failed, a job cancelled before it started)."""
    ended = [JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.SUCCEEDED]
    reaped = 0
    stale = Backup.objects.filter(
        status__in=[BackupStatus.PENDING, BackupStatus.RUNNING], job__status__in=ended
    ).select_related("job")
    for backup in stale:
        reason = f"its job {backup.job_id} ended ({backup.job.status}): {backup.job.error}".strip()
        if _mark_failed(backup, reason[:2000]):
            reaped += 1
    for restore in RestoreJob.objects.filter(
        status__in=[RestoreStatus.PENDING, RestoreStatus.RUNNING], job__status__in=ended
    ).select_related("job"):
        RestoreJob.objects.filter(pk=restore.pk, status=restore.status).update(
            status=RestoreStatus.FAILED,
            error=f"its job {restore.job_id} ended ({restore.job.status}): {restore.job.error}"[
                :2000
            ],
            finished_at=timezone.now(),
        )
        reaped += 1
    return reaped


def _alert(subject: str, body: str) -> None:
    from recovery.alerts import send_alert

    try:
        send_alert(service=None, subject=subject, body=body)
    except Exception:
        log.exception("backup alert could not be sent: %s", subject)


# --- The 3-2-1 rule -----------------------------------------------------------------------


def check_321(backup: Backup) -> dict[str, Any]:
    """Copies, distinct media and offsite copies of the whole backup, counted from committed
    copies only: a target counts when it holds every artifact of the backup."""
    artifacts = list(backup.artifacts.all())
    holders: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    for copy in BackupCopy.objects.filter(artifact__backup=backup):
        if copy.status == CopyStatus.FAILED:
            failed.append(f"copy on {copy.target} failed: {copy.error[:200]}")
        if copy.status != CopyStatus.COMMITTED:
            continue
        entry = holders.setdefault(
            copy.target, {"media": copy.media, "offsite": copy.offsite, "artifacts": set()}
        )
        entry["artifacts"].add(copy.artifact_id)
    complete = {
        name: entry
        for name, entry in holders.items()
        if artifacts and len(entry["artifacts"]) == len(artifacts)
    }
    media = sorted({entry["media"] for entry in complete.values()})
    offsite = sorted(name for name, entry in complete.items() if entry["offsite"])
    problems = []
    if len(complete) < RULE_COPIES:
        problems.append(f"{len(complete)} complete copies, {RULE_COPIES} needed")
    if len(media) < RULE_MEDIA:
        problems.append(
            f"{len(media)} kind(s) of media ({', '.join(media) or 'none'}), {RULE_MEDIA} needed"
        )
    if len(offsite) < RULE_OFFSITE:
        problems.append("no offsite copy: add an offsite target (BACKUP_EXTRA_TARGETS)")
    problems.extend(sorted(set(failed)))
    return {
        "ok": not problems,
        "copies": len(complete),
        "media": media,
        "offsite": offsite,
        "targets": sorted(complete),
        "problems": problems,
    }


# --- Chains and copies ----------------------------------------------------------------------


def chain_of(backup: Backup) -> list[Backup]:
    """The backup and its ancestors, the full one first."""
    chain = [backup]
    while chain[-1].parent_id is not None:
        chain.append(Backup.objects.get(pk=chain[-1].parent_id))
        if len(chain) > 10000:
            raise ComponentError("the backup chain loops", "chain_loop")
    return list(reversed(chain))


def _unit_manifests(backup: Backup) -> dict[str, dict[str, Any]]:
    """Each unit's own manifest in a backup (what an incremental on it compares against)."""
    found: dict[str, dict[str, Any]] = {}
    for entry in backup.manifest.values():
        if isinstance(entry, dict) and entry.get("state") == ComponentState.DONE:
            for name, unit in entry.get("units", {}).items():
                found[name] = unit.get("manifest", {})
    return found


def data_key_of(backup: Backup | WalSegment) -> stream.DataKey | None:
    if not backup.key_id:
        return None
    return stream.data_key_from(
        key_id=backup.key_id, master_key_id=backup.master_key_id, wrapped=backup.wrapped_key
    )


class ArtifactRefused(RestoreRefused):
    def __init__(self, message: str) -> None:
        super().__init__(message, "artifact_refused")


def _good_copy(artifact: Artifact, key: stream.DataKey | None, meter: _Meter) -> BackupCopy:
    """The first copy that reads back whole, authenticated and with the catalog's SHA-256.

    Every chunk is decrypted and checked before anything is restored, so a tampered, truncated
    or wrong-key artifact is refused before a single byte of the restore is written; another
    copy is tried first.
    """
    names = {target.name: target for target in target_registry.configured_targets()}
    problems = []
    copies = artifact.copies.filter(status=CopyStatus.COMMITTED).order_by("offsite", "id")
    for copy in copies:
        target = names.get(copy.target)
        if target is None:
            problems.append(f"{copy.target}: target no longer configured")
            continue
        try:
            with target.open(copy.location) as handle:
                reader = stream.open_artifact(handle, name=artifact.name, key=key)
                meta = reader.header.get("meta", {})
                if meta.get("backup_id") != str(artifact.backup_id):
                    # An authentic artifact of another backup, put here through the catalog.
                    raise stream.ArtifactError(
                        artifact.name,
                        "tampered",
                        f"it belongs to backup {meta.get('backup_id')}, not {artifact.backup_id}",
                    )
                while reader.read(1 << 20):
                    pass
                info = reader.info
        except stream.ArtifactError as exc:
            problems.append(f"{copy.target}: {exc.reason}: {exc}")
            continue
        except Exception as exc:
            problems.append(f"{copy.target}: {type(exc).__name__}: {redact(str(exc))}")
            continue
        if info.sha256 != artifact.sha256:
            problems.append(f"{copy.target}: SHA-256 differs from the catalog's (tampered)")
            continue
        meter(info.stored_bytes)
        BackupCopy.objects.filter(pk=copy.pk).update(verified_at=timezone.now())
        return copy
    if not problems:
        problems.append("no committed copy")
    raise ArtifactRefused(
        f"artifact {artifact.name} of backup {artifact.backup_id} refused: " + "; ".join(problems)
    )


def _opener(copy: BackupCopy, artifact: Artifact, key: stream.DataKey | None) -> Callable[[], Any]:
    target = target_registry.get_target(copy.target)

    def open_plain() -> Any:
        return stream.open_artifact(target.open(copy.location), name=artifact.name, key=key)

    return open_plain


# --- Restores and drills ------------------------------------------------------------------


def _restorable_components(backup: Backup) -> list[str]:
    return [
        name
        for name in Component.values
        if isinstance(backup.manifest.get(name), dict)
        and backup.manifest[name].get("state") == ComponentState.DONE
    ]


def start_restore(
    *,
    backup: Backup,
    context: AuditContext,
    components: list[str] | None = None,
    target_time: datetime | None = None,
    dry_run: bool = False,
    enqueue: bool = True,
    approval: ApprovalRequest | None = None,
) -> RestoreJob:
    """Restore a backup (its chain) onto the live system: a job; refused before it starts when
    the backup cannot be restored as asked. With SOX_REQUIRE_SECOND_APPROVAL on, a live (not
    dry-run) restore needs `approval`: an approved request for this backup, by a second user
    (compliance/approvals.py; `restore_approved` is how an approval carries it out)."""
    return _start(
        backup=backup,
        context=context,
        kind=RestoreKind.RESTORE,
        components=components,
        target_time=target_time,
        dry_run=dry_run,
        enqueue=enqueue,
        approval=approval,
    )


def check_restore(
    *, backup: Backup, components: list[str] | None, target_time: datetime | None
) -> list[str]:
    """The components a restore of `backup` as asked would restore; BackupRefused when it
    cannot be (checked before a restore is started, or asked for approval)."""
    if backup.status != BackupStatus.SUCCEEDED:
        raise BackupRefused(
            f"Backup {backup.pk} is {backup.status}: only a successful backup can be restored.",
            "not_restorable",
        )
    available = _restorable_components(backup)
    chosen = _components(components) if components else available
    missing = [name for name in chosen if name not in available]
    if missing:
        entry = backup.manifest.get(missing[0]) or {}
        why = entry.get("reason") or "not requested when it was taken"
        raise BackupRefused(
            f"Backup {backup.pk} has no {missing[0]} ({why}).", "component_absent", "components"
        )
    if target_time is not None:
        _check_target_time(backup, chosen, target_time)
    return chosen


def restore_approval_params(
    *, backup: Backup, components: list[str] | None, target_time: datetime | None
) -> dict[str, Any]:
    """What an approval request for a live restore records (checked restorable first)."""
    check_restore(backup=backup, components=components, target_time=target_time)
    return {
        "backup_id": str(backup.pk),
        "components": list(components) if components else None,
        "target_time": target_time.isoformat() if target_time else None,
    }


def restore_approved(approval: ApprovalRequest, context: AuditContext) -> dict[str, Any]:
    """Carry out an approved live restore (the executor compliance.approvals calls, in the
    approval's transaction): the restore job is queued once that commits."""
    params = approval.params
    backup = Backup.objects.filter(pk=params.get("backup_id")).first()
    if backup is None:
        raise BackupRefused(f"Backup {params.get('backup_id')} is gone.", "not_restorable")
    target = params.get("target_time")
    restore = start_restore(
        backup=backup,
        context=context,
        components=params.get("components") or None,
        target_time=datetime.fromisoformat(target) if target else None,
        approval=approval,
    )
    return {"restore_id": restore.pk, "job_id": restore.job_id, "backup_id": str(backup.pk)}


def start_drill(
    *, context: AuditContext, backup: Backup | None = None, enqueue: bool = True
) -> RestoreJob:
    """A restore drill of the newest backup (or the one given) into scratch space."""
    backup = backup or newest_backup()
    if backup is None:
        raise BackupRefused("There is no successful backup to test: take one first.", "no_backup")
    return _start(
        backup=backup,
        context=context,
        kind=RestoreKind.DRILL,
        components=None,
        target_time=None,
        dry_run=False,
        enqueue=enqueue,
    )


def _start(
    *,
    backup: Backup,
    context: AuditContext,
    kind: str,
    components: list[str] | None,
    target_time: datetime | None,
    dry_run: bool,
    enqueue: bool,
    approval: ApprovalRequest | None = None,
) -> RestoreJob:
    reap_backups()
    chosen = check_restore(backup=backup, components=components, target_time=target_time)
    live = kind == RestoreKind.RESTORE and not dry_run
    approval_id = None
    if live:
        # Segregation of duties: refused here, whoever calls, without a second approval.
        try:
            approval_id = approvals.authorise(
                ApprovalAction.LIVE_RESTORE, approval, backup_id=str(backup.pk)
            )
        except approvals.ApprovalError as exc:
            raise BackupRefused(str(exc), exc.code) from exc
    with transaction.atomic():
        _catalog_lock()
        if not Backup.objects.filter(pk=backup.pk, status=BackupStatus.SUCCEEDED).exists():
            raise BackupRefused(f"Backup {backup.pk} is gone.", "not_restorable")
        if kind == RestoreKind.RESTORE and not dry_run:
            # One live restore at a time, and none while a backup reads the live system.
            other = _live_restores().first()
            if other is not None:
                raise BackupRefused(
                    f"Restore {other.pk} is already overwriting live data.", "restore_in_progress"
                )
            running = Backup.objects.filter(
                status__in=[BackupStatus.PENDING, BackupStatus.RUNNING]
            ).first()
            if running is not None:
                raise BackupRefused(
                    f"Backup {running.pk} is {running.status}: restore when it has finished.",
                    "backup_in_progress",
                )
        restore = RestoreJob.objects.create(
            backup=backup,
            backup_ref=str(backup.pk),
            kind=kind,
            components=chosen,
            target_time=target_time,
            dry_run=dry_run,
            created_by=context.actor_username,
        )
        job = start_job(
            kind=DRILL_JOB_KIND if kind == RestoreKind.DRILL else RESTORE_JOB_KIND,
            context=context,
            params={"restore_id": restore.pk, "backup_id": str(backup.pk)},
            enqueue=enqueue,
        )
        restore.job = job
        restore.save(update_fields=["job"])
        record_event(
            action=AuditAction.BACKUP_RESTORE_REQUESTED,
            context=context,
            object_type="backups.restorejob",
            object_id=restore.pk,
            details={
                "kind": kind,
                "backup": str(backup.pk),
                "components": chosen,
                "target_time": target_time.isoformat() if target_time else None,
                "dry_run": dry_run,
                "job": job.pk,
                "approval": approval_id,
                "second_approval_required": live
                and approvals.requires_approval(ApprovalAction.LIVE_RESTORE),
            },
        )
    return restore


def _base_time(backup: Backup) -> datetime | None:
    entry = backup.manifest.get(Component.DATABASE, {}).get("units", {}).get(PITR_BASE_UNIT, {})
    raw = entry.get("manifest", {}).get("time")
    try:
        return datetime.fromisoformat(raw) if raw else backup.finished_at
    except (TypeError, ValueError):
        return backup.finished_at


def _pitr_bases(up_to: datetime | None = None) -> list[Backup]:
    """Successful backups holding a base backup, oldest first; with `up_to`, those whose base
    backup ended by then (a replay can start from them)."""
    bases = Backup.objects.filter(
        status=BackupStatus.SUCCEEDED, artifacts__name=PITR_BASE_UNIT
    ).order_by("created_at")
    found = []
    for backup in bases.distinct():
        ended = _base_time(backup)
        if up_to is None or (ended is not None and ended <= up_to):
            found.append(backup)
    return found


def _check_target_time(backup: Backup, chosen: list[str], target_time: datetime) -> None:
    from backups import pitr

    if Component.DATABASE not in chosen:
        raise BackupRefused(
            "target_time applies to the database: include it in components.",
            "target_time_without_database",
            "target_time",
        )
    if not pitr.archiving_configured():
        raise BackupRefused(
            "Point-in-time restores need WAL archiving (BACKUP_PITR_DATABASE is not set).",
            "pitr_not_configured",
            "target_time",
        )
    window = pitr_window()
    if window["from"] is None or window["until"] is None:
        raise BackupRefused(
            "No base backup and archived WAL yet: take a full backup with archiving on.",
            "pitr_window_empty",
            "target_time",
        )
    if not (window["from"] <= target_time <= window["until"]):
        raise BackupRefused(
            f"target_time must lie between {window['from'].isoformat()} (the oldest base "
            f"backup) and {window['until'].isoformat()} (the newest archived WAL).",
            "target_time_out_of_window",
            "target_time",
        )


def pitr_window() -> dict[str, datetime | None]:
    """The times PostgreSQL can be restored to: from the oldest base backup's end to the newest
    archived WAL."""
    from backups import pitr

    # The server the newest base backup was taken of: another server's WAL (an old cluster
    # before a migration) is no window of this one.
    bases = _pitr_bases()
    server = None
    if bases:
        units = bases[-1].manifest.get(Component.DATABASE, {}).get("units", {})
        base = units.get(PITR_BASE_UNIT, {}).get("manifest", {})
        server = str(base.get("system_identifier", "")) or None
    window = pitr.wal_window(system_identifier=server)
    return {"from": window["base_from"], "until": window["wal_until"]}


def run_restore_job(job: Job, progress: Progress) -> dict[str, Any]:
    restore_id = job.params["restore_id"]
    claimed = RestoreJob.objects.filter(pk=restore_id, status=RestoreStatus.PENDING).update(
        status=RestoreStatus.RUNNING, started_at=timezone.now()
    )
    if not claimed:
        raise ComponentError(f"restore {restore_id} is not pending", "not_pending")
    restore = RestoreJob.objects.select_related("backup").get(pk=restore_id)
    started = time.monotonic()
    meter = _Meter(progress, restore.backup.stored_bytes * 2 or None)
    try:
        with _heartbeat(job):
            if restore.kind == RestoreKind.DRILL:
                result = _drill(restore, meter)
            else:
                result = _restore(restore, meter)
    except RestoreRefused as exc:
        _finish_restore(restore, RestoreStatus.REFUSED, error=str(exc), started=started)
        raise
    except BaseException as exc:
        error = redact(f"{type(exc).__name__}: {exc}")
        _finish_restore(restore, RestoreStatus.FAILED, error=error, started=started)
        raise
    ok = result.get("ok", True)
    _finish_restore(
        restore,
        RestoreStatus.SUCCEEDED if ok else RestoreStatus.FAILED,
        result=result,
        error="" if ok else "the restored data does not match the backup's manifest",
        started=started,
    )
    if not ok:
        raise ComponentError(
            f"drill of backup {restore.backup_id} failed: restored data differs from the manifest",
            "drill_failed",
        )
    return {"restore_id": restore.pk, **{k: v for k, v in result.items() if k != "units"}}


def _finish_restore(
    restore: RestoreJob,
    status: str,
    *,
    started: float,
    result: dict | None = None,
    error: str = "",
) -> None:
    elapsed = round(time.monotonic() - started, 3)
    with transaction.atomic():
        RestoreJob.objects.filter(pk=restore.pk, status=RestoreStatus.RUNNING).update(
            status=status,
            result=result or {},
            error=error[:4000],
            rto_seconds=(result or {}).get("rto_seconds", elapsed),
            finished_at=timezone.now(),
        )
        if restore.kind == RestoreKind.DRILL:
            action = AuditAction.BACKUP_DRILL
            if status == RestoreStatus.SUCCEEDED:
                Backup.objects.filter(pk=restore.backup_id).update(verified_at=timezone.now())
        elif status == RestoreStatus.SUCCEEDED:
            action = AuditAction.BACKUP_RESTORED
        else:
            action = AuditAction.BACKUP_RESTORE_FAILED
        record_event(
            action=action,
            context=AuditContext.system(),
            object_type="backups.restorejob",
            object_id=restore.pk,
            details={
                "backup": str(restore.backup_id),
                "status": status,
                "seconds": elapsed,
                "dry_run": restore.dry_run,
                "error": error[:500],
            },
        )
    if status != RestoreStatus.SUCCEEDED and not restore.dry_run:
        what = "Restore drill" if restore.kind == RestoreKind.DRILL else "Restore"
        _alert(f"{what} {restore.pk} {status}", f"{what} of backup {restore.backup_id}: {error}")


def _plan(
    restore: RestoreJob, meter: _Meter
) -> list[tuple[ComponentHandler, Unit, list[dict[str, Any]], list[Callable[[], Any]]]]:
    """Per unit to restore: its handler, the unit as configured here, and the chain of verified
    artifacts (full first). Every artifact is read back whole before this returns."""
    backup = restore.backup
    chain = chain_of(backup)
    keys = {}
    for link in chain:
        try:
            keys[link.pk] = data_key_of(link)
        except stream.ArtifactError as exc:
            raise ArtifactRefused(
                f"the data key of backup {link.pk} does not unwrap: {exc.reason}: {exc}"
            ) from exc
    plan = []
    for component in restore.components:
        handler = handler_for(component)
        configured = handler.units()
        by_name = {unit.name: unit for unit in configured} if isinstance(configured, list) else {}
        for name in backup.manifest[component].get("units", {}):
            if name == PITR_BASE_UNIT:
                continue
            unit = by_name.get(name)
            if unit is None and component in (Component.UPLOADS, Component.CONFIG):
                # Files restore onto a fresh host too: the restore makes MEDIA_ROOT itself.
                unit = Unit(component=component, name=name)
            if unit is None:
                why = configured if isinstance(configured, str) else "not configured here"
                raise RestoreRefused(f"{name}: cannot be restored here ({why})", "unit_unknown")
            links = []
            for link in chain:
                entry = link.manifest.get(component, {}).get("units", {}).get(name)
                if entry is None:
                    continue
                if not entry.get("manifest", {}).get("incremental"):
                    links = []  # a self-contained artifact: the chain starts again here
                links.append((link, entry))
            manifests, openers = [], []
            for link, entry in links:
                artifact = link.artifacts.get(name=name)
                meter.stage(f"verifying {name} of backup {str(link.pk)[:8]}")
                copy = _good_copy(artifact, keys[link.pk], meter)
                manifests.append(entry.get("manifest", {}))
                openers.append(_opener(copy, artifact, keys[link.pk]))
            plan.append((handler, unit, manifests, openers))
    return plan


def _restore(restore: RestoreJob, meter: _Meter) -> dict[str, Any]:
    if restore.target_time is not None:
        return _restore_to_time(restore, meter)
    plan = _plan(restore, meter)
    live = Destination(live=True)
    if restore.dry_run:
        return {
            "dry_run": True,
            "would_overwrite": [
                overwrite_text(unit.component, unit.name) for _, unit, _, _ in plan
            ],
            "artifacts_verified": sum(len(openers) for *_, openers in plan),
        }
    for handler, unit, manifests, _ in plan:
        handler.preflight(unit, manifests[-1], destination=live)
    if Component.DATABASE in restore.components:
        meter.stage("safety backup of the live system before overwriting it")
        safety = start_backup(
            kind=BackupKind.FULL,
            context=AuditContext.system(),
            components=restore.components,
            label=f"safety before restore {restore.pk}",
            enqueue=False,
            limit=False,
        )
        # The same job any backup is, run here: if it fails, nothing is restored.
        run_job(safety.job_id, run_backup_job)
        safety.refresh_from_db()
        if safety.status != BackupStatus.SUCCEEDED:
            raise RestoreRefused(
                f"the safety backup {safety.pk} failed, nothing was restored: {safety.error}",
                "safety_backup_failed",
            )
        RestoreJob.objects.filter(pk=restore.pk).update(safety_backup=safety)
    results = {}
    for handler, unit, manifests, openers in plan:
        meter.stage(f"restoring {unit.name}")
        results[unit.name] = handler.restore(
            unit, manifests, openers, destination=live, on_bytes=meter
        )
        # A live database restore holds the job table's lock until it commits: beat at once.
        meter.stage(f"restored {unit.name}")
    summary = {"ok": True, "units": results, "restored": sorted(results)}
    if any(_is_own_database(unit) for _, unit, _, _ in plan):
        meter.stage("applying recorded erasures again")
        summary["erasures_reapplied"] = _reapply_erasures()
    return summary


def _is_own_database(unit: Unit) -> bool:
    from backups.components.database import OWN_UNIT

    return unit.component == Component.DATABASE and unit.name == OWN_UNIT


def _reapply_erasures() -> int:
    """GDPR erasures made since the backup was taken came back with it: run every recorded
    erasure again at once (the erasure log itself is kept through the restore)."""
    from compliance import dsr

    try:
        return dsr.reapply_erasures(context=AuditContext.system())
    except Exception as exc:
        raise ComponentError(
            "the database was restored, but the recorded GDPR erasures could not be applied "
            f"again ({type(exc).__name__}: {exc}); run `python manage.py reapply_erasures`",
            "erasures_not_reapplied",
        ) from exc


def overwrite_text(component: str, unit_name: str = "") -> str:
    """What restoring `component` to the live system overwrites, in an operator's words."""
    return {
        Component.DATABASE: f"{unit_name or 'the databases'}: every table (the audit trail, "
        "jobs and the backup catalog of Bridge's own database are kept); a safety backup is "
        "taken first",
        Component.REDIS: "redis: every key of the configured Redis database",
        Component.CONFIG: "config: the configuration files listed in the backup",
        Component.UPLOADS: f"uploads: the whole of {settings.MEDIA_ROOT}",
    }.get(component, unit_name or component)


def _restore_to_time(restore: RestoreJob, meter: _Meter) -> dict[str, Any]:
    from backups import pitr

    bases = _pitr_bases(up_to=restore.target_time)
    if not bases:
        raise RestoreRefused("no base backup finished before target_time", "no_base_backup")
    base = bases[-1]
    artifact = base.artifacts.get(name=PITR_BASE_UNIT)
    key = data_key_of(base)
    copy = _good_copy(artifact, key, meter)
    manifest = base.manifest[Component.DATABASE]["units"][PITR_BASE_UNIT]["manifest"]
    data_dir = Path(settings.BACKUP_SCRATCH_DIR) / f"pitr-{restore.pk}"
    if restore.dry_run:
        return {"dry_run": True, "base_backup": str(base.pk), "data_dir": str(data_dir)}
    meter.stage("replaying WAL to the target time")
    try:
        result = pitr.restore_to_time(
            manifest,
            _opener(copy, artifact, key),
            target_time=restore.target_time,
            restore_point=None,
            data_dir=data_dir,
            on_bytes=meter,
        )
    except pitr.PitrError as exc:
        if exc.code in ("target_time_out_of_window", "no_base_backup"):
            raise RestoreRefused(str(exc), exc.code) from exc
        raise
    return {"ok": True, "base_backup": str(base.pk), **result}


def _drill(restore: RestoreJob, meter: _Meter) -> dict[str, Any]:
    scratch = Path(settings.BACKUP_SCRATCH_DIR) / f"drill-{restore.pk}"
    destination = Destination(live=False, scratch_dir=scratch, tag=str(restore.pk))
    started = time.monotonic()
    plan = _plan(restore, meter)
    units: dict[str, Any] = {}
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        for handler, unit, manifests, openers in plan:
            meter.stage(f"drill: restoring {unit.name} into scratch")
            unit_started = time.monotonic()
            restored = handler.restore(
                unit, manifests, openers, destination=destination, on_bytes=meter
            )
            checked = handler.check(unit, manifests[-1], destination=destination)
            units[unit.name] = {
                "ok": bool(checked.get("ok")),
                "seconds": round(time.monotonic() - unit_started, 3),
                "checks": checked.get("checks", []),
                "restored": restored,
            }
        # The recovery time: verified artifacts to restored and checked data. Dropping the
        # scratch copies afterwards is housekeeping, not part of a recovery.
        recovered = time.monotonic() - started
    finally:
        for handler, unit, _, _ in plan:
            try:
                handler.discard(unit, destination=destination)
            except Exception:
                log.exception("drill %s: could not discard the scratch %s", restore.pk, unit.name)
        shutil.rmtree(scratch, ignore_errors=True)
    ok = bool(units) and all(entry["ok"] for entry in units.values())
    return {
        "ok": ok,
        "rto_seconds": round(recovered, 3),
        "units": units,
        "failed_checks": [
            f"{name}: {check.get('name')}"
            for name, entry in units.items()
            for check in entry["checks"]
            if not check.get("ok")
        ],
    }


# --- Retention ------------------------------------------------------------------------------


def plan_cleanup(now: datetime | None = None) -> dict[str, list[dict[str, Any]]]:
    """Which backups the retention policy deletes and which it keeps, each with its reasons."""
    now = now or timezone.now()
    backups = list(Backup.objects.order_by("-created_at"))
    reasons: dict[Any, list[str]] = {backup.pk: [] for backup in backups}
    horizon = now - timedelta(days=settings.BACKUP_RETENTION_DAYS)
    succeeded = [backup for backup in backups if backup.status == BackupStatus.SUCCEEDED]
    for backup in backups:
        if backup.status in (BackupStatus.PENDING, BackupStatus.RUNNING):
            reasons[backup.pk].append("in progress")
        if backup.created_at >= horizon:
            reasons[backup.pk].append(
                f"younger than BACKUP_RETENTION_DAYS ({settings.BACKUP_RETENTION_DAYS} d)"
            )
        if backup.restores.filter(
            status__in=[RestoreStatus.PENDING, RestoreStatus.RUNNING]
        ).exists():
            reasons[backup.pk].append("a restore of it is running")
    newest_full = next((b for b in succeeded if b.kind == BackupKind.FULL), None)
    if newest_full is not None:
        reasons[newest_full.pk].append("newest successful full backup")
    for label, count, bucket in (
        ("daily", settings.BACKUP_KEEP_DAILY, lambda d: d.strftime("%Y-%m-%d")),
        (
            "weekly",
            settings.BACKUP_KEEP_WEEKLY,
            lambda d: "{}-W{:02d}".format(*d.isocalendar()[:2]),
        ),
        ("monthly", settings.BACKUP_KEEP_MONTHLY, lambda d: d.strftime("%Y-%m")),
    ):
        seen: list[str] = []
        for backup in succeeded:
            period = bucket(backup.created_at)
            if period in seen:
                continue
            if len(seen) >= count:
                break
            seen.append(period)
            reasons[backup.pk].append(f"newest of {period} (keep {label} {count})")
    # A kept backup's ancestors are kept with it: retention never breaks a chain.
    by_id = {backup.pk: backup for backup in backups}
    for backup in backups:
        if not reasons[backup.pk]:
            continue
        parent_id = backup.parent_id
        while parent_id is not None and parent_id in by_id:
            note = f"backup {str(backup.pk)[:8]} depends on it"
            if note not in reasons[parent_id]:
                reasons[parent_id].append(note)
            parent_id = by_id[parent_id].parent_id
    keep, delete = [], []
    for backup in backups:
        row = {
            "id": str(backup.pk),
            "kind": backup.kind,
            "status": backup.status,
            "created_at": backup.created_at.isoformat(),
        }
        if reasons[backup.pk]:
            keep.append({**row, "reasons": reasons[backup.pk]})
        else:
            delete.append({**row, "reasons": ["older than every retention rule keeps"]})
    return {"keep": keep, "delete": delete, "wal": _plan_wal(keep)}


def _plan_wal(keep: list[dict[str, Any]]) -> dict[str, Any]:
    """Per server (system identifier): WAL older than its oldest kept base backup is needed by
    no point-in-time restore. A server with no kept base backup keeps all its WAL."""
    firsts: dict[str, str] = {}
    kept = Backup.objects.filter(
        pk__in=[row["id"] for row in keep], artifacts__name=PITR_BASE_UNIT
    ).distinct()
    for backup in kept:
        units = backup.manifest.get(Component.DATABASE, {}).get("units", {})
        base = units.get(PITR_BASE_UNIT, {}).get("manifest", {})
        server, first = str(base.get("system_identifier", "")), str(base.get("start_wal_file", ""))
        if server and first:
            firsts[server] = min(firsts.get(server, first), first)
    segments = sum(_old_wal(server, first).count() for server, first in firsts.items())
    return {
        "delete_before": firsts,
        "segments": segments,
        "reason": "per server, older than its oldest kept base backup"
        if firsts
        else "no base backup kept: all WAL kept",
    }


def _old_wal(server: str, first: str) -> QuerySet[WalSegment]:
    # WAL names sort in order within a timeline; history files are always kept.
    return WalSegment.objects.filter(system_identifier=server, name__lt=first).exclude(
        name__endswith=".history"
    )


def cleanup(*, context: AuditContext, dry_run: bool = False) -> dict[str, Any]:
    """Apply the retention policy (or, dry_run, only say what it would do)."""
    reap_backups()
    plan = plan_cleanup()
    deleted: list[str] = []
    failed: list[dict[str, str]] = []
    wal_deleted = 0
    if not dry_run:
        # Newest first: a backup is deleted only after the incrementals on it. Each deletion
        # re-checks, under the catalog lock, that nothing started depending on the backup
        # since the plan was made; one that fails is reported and the rest go on.
        for row in plan["delete"]:
            backup = Backup.objects.filter(pk=row["id"]).first()
            if backup is None:
                continue
            try:
                _delete(backup)
            except BackupRefused as refused:
                failed.append({"id": row["id"], "reason": str(refused)})
                continue
            except Exception as exc:
                log.exception("retention could not delete backup %s", row["id"])
                failed.append({"id": row["id"], "reason": redact(f"{type(exc).__name__}: {exc}")})
                continue
            deleted.append(row["id"])
        if plan["wal"]["delete_before"]:
            wal_deleted = _delete_wal(plan["wal"]["delete_before"])
        # Copies a killed worker left under a temporary name (a day old: never one being
        # written now).
        for target in target_registry.configured_targets():
            try:
                target.purge_temporaries(older_than=86400)
            except Exception as exc:
                log.error("could not purge temporaries on %s: %s", target.name, redact(str(exc)))
    summary = {
        "dry_run": dry_run,
        "deleted": plan["delete"]
        if dry_run
        else [row for row in plan["delete"] if row["id"] in deleted],
        "kept": plan["keep"],
        "failed": failed,
        "wal": {**plan["wal"], "deleted": wal_deleted},
    }
    record_event(
        action=AuditAction.BACKUP_CLEANUP,
        context=context,
        object_type="backups.backup",
        object_id="",
        details={
            "dry_run": dry_run,
            "deleted": deleted if not dry_run else [row["id"] for row in plan["delete"]],
            "kept": len(plan["keep"]),
            "wal_deleted": wal_deleted,
        },
    )
    return summary


def _delete_wal(firsts: dict[str, str]) -> int:
    from backups import pitr

    names = {target.name: target for target in target_registry.configured_targets()}
    count = 0
    for server, first in firsts.items():
        for segment in _old_wal(server, first):
            # Its own place only: a location edited in the catalog steers nothing.
            location = pitr.wal_location(server, segment.name)
            for copy in segment.copies:
                target = names.get(copy.get("target"))
                if target is None:
                    continue
                try:
                    target.delete(location)
                except Exception as exc:
                    log.error("could not delete WAL %s: %s", segment.name, redact(str(exc)))
            segment.delete()
            count += 1
    return count


def _delete(backup: Backup) -> None:
    """The row first (under the catalog lock, re-checked), then the files: a backup is never
    left in the catalog as restorable with its copies gone."""
    names = {target.name: target for target in target_registry.configured_targets()}
    with transaction.atomic():
        _catalog_lock()
        row = Backup.objects.select_for_update().filter(pk=backup.pk).first()
        if row is None:
            return
        if row.children.exists():
            raise BackupRefused(f"Backup {row.pk} gained an incremental; kept.", "has_dependents")
        if row.status in (BackupStatus.PENDING, BackupStatus.RUNNING):
            raise BackupRefused(f"Backup {row.pk} is {row.status}.", "in_progress")
        if row.restores.filter(status__in=[RestoreStatus.PENDING, RestoreStatus.RUNNING]):
            raise BackupRefused(f"A restore of backup {row.pk} is running.", "restore_running")
        places = [
            (copy.target, _canonical(copy))
            for copy in BackupCopy.objects.filter(artifact__backup=row)
            .exclude(status=CopyStatus.DELETED)
            .select_related("artifact")
        ]
        row.delete()
    for target_name, location in places:
        target = names.get(target_name)
        if target is None:
            log.error(
                "backup %s: target %s no longer configured; %s left there",
                backup.pk,
                target_name,
                location,
            )
            continue
        try:
            target.delete(location)
        except Exception as exc:
            log.error("could not delete %s on %s: %s", location, target_name, redact(str(exc)))


def delete_backup(*, backup: Backup, context: AuditContext) -> dict[str, Any]:
    """Delete a backup and every copy of it; refused for one others depend on or in use."""
    reap_backups()
    dependents = [str(pk) for pk in backup.children.values_list("pk", flat=True)]
    if dependents:
        raise BackupRefused(
            f"Backup {backup.pk} is the parent of {', '.join(dependents)}: delete those first.",
            "has_dependents",
        )
    if backup.status in (BackupStatus.PENDING, BackupStatus.RUNNING):
        raise BackupRefused(f"Backup {backup.pk} is still {backup.status}.", "in_progress")
    summary = {
        "id": str(backup.pk),
        "kind": backup.kind,
        "copies": BackupCopy.objects.filter(
            artifact__backup=backup, status=CopyStatus.COMMITTED
        ).count(),
    }
    _delete(backup)
    record_event(
        action=AuditAction.BACKUP_DELETED,
        context=context,
        object_type="backups.backup",
        object_id=summary["id"],
        details=summary,
    )
    return summary


# --- Status ---------------------------------------------------------------------------------


def status() -> dict[str, Any]:
    """What an operator asks first: how old is the newest backup, is it protected, does it
    restore, and is anything wrong."""
    from backups import pitr

    reap_backups()
    now = timezone.now()
    newest = newest_backup()
    rpo = settings.BACKUP_RPO
    problems = []
    newest_info = None
    if newest is None:
        problems.append("no successful backup yet")
    else:
        age = (now - (newest.finished_at or newest.created_at)).total_seconds()
        rule = check_321(newest)
        newest_info = {
            "id": str(newest.pk),
            "kind": newest.kind,
            "finished_at": newest.finished_at,
            "age_seconds": round(age),
            "stored_bytes": newest.stored_bytes,
            "raw_bytes": newest.raw_bytes,
            "rule_321": rule,
        }
        if age > rpo.total_seconds():
            problems.append(
                f"newest backup is {age / 3600:.1f} h old, over the RPO of "
                f"{rpo.total_seconds() / 3600:.1f} h"
            )
        if not rule["ok"]:
            problems.extend(f"3-2-1: {problem}" for problem in rule["problems"])
    drill = (
        RestoreJob.objects.filter(kind=RestoreKind.DRILL)
        .exclude(status__in=[RestoreStatus.PENDING, RestoreStatus.RUNNING])
        .first()
    )
    drill_info = None
    if drill is None:
        problems.append("no restore drill yet (POST /api/backup/test)")
    else:
        drill_info = {
            "id": drill.pk,
            "backup": str(drill.backup_id),
            "status": drill.status,
            "finished_at": drill.finished_at,
            "rto_seconds": drill.rto_seconds,
            "error": drill.error,
        }
        if drill.status != RestoreStatus.SUCCEEDED:
            problems.append(f"the last restore drill {drill.status}")
        elif drill.finished_at and now - drill.finished_at > timedelta(days=8):
            problems.append("the last successful restore drill is over a week old")
    failed_recent = Backup.objects.filter(
        status=BackupStatus.FAILED, created_at__gte=now - timedelta(days=1)
    ).count()
    if failed_recent:
        problems.append(f"{failed_recent} backup(s) failed in the last 24 h")
    targets = []
    for target in target_registry.configured_targets():
        targets.append(
            {
                "name": target.name,
                "media": target.media,
                "offsite": target.offsite,
                "remote": target.remote,
                "stored_bytes": sum(
                    BackupCopy.objects.filter(
                        target=target.name, status=CopyStatus.COMMITTED
                    ).values_list("size", flat=True)
                ),
            }
        )
    counts = {value: Backup.objects.filter(status=value).count() for value in BackupStatus.values}
    window = pitr_window() if pitr.archiving_configured() else {"from": None, "until": None}
    state = "ok" if not problems else ("bad" if newest is None or failed_recent else "warn")
    return {
        "status": state,
        "problems": problems,
        "newest": newest_info,
        "rpo_seconds": int(rpo.total_seconds()),
        "last_drill": drill_info,
        "counts": counts,
        "targets": targets,
        "settings": {
            "compression": settings.ENABLE_BACKUP_COMPRESSION,
            "compression_level": settings.BACKUP_COMPRESSION_LEVEL,
            "encryption": settings.ENABLE_BACKUP_ENCRYPTION,
            "retention_days": settings.BACKUP_RETENTION_DAYS,
            "keep_daily": settings.BACKUP_KEEP_DAILY,
            "keep_weekly": settings.BACKUP_KEEP_WEEKLY,
            "keep_monthly": settings.BACKUP_KEEP_MONTHLY,
        },
        "pitr": {
            "configured": pitr.archiving_configured(),
            "window_from": window["from"],
            "window_until": window["until"],
            "wal_segments": WalSegment.objects.count(),
        },
        "running": Backup.objects.filter(
            status__in=[BackupStatus.PENDING, BackupStatus.RUNNING]
        ).count(),
    }


# --- Key rotation (security.rotation calls this inside rotate_keys' transaction) -------------


def rewrap_keys() -> int:
    """Re-wrap every backup's and WAL segment's data key under the current master key, so old
    backups still restore once the previous master key is dropped."""
    from security import crypto

    master_id, _ = crypto.master_key()
    count = 0
    for model in (Backup, WalSegment):
        rows = model.objects.select_for_update().exclude(key_id="").exclude(master_key_id=master_id)
        for row in rows:
            key = crypto.unwrap(
                key_id=row.key_id,
                purpose="backup",
                subject_id="",
                master_key_id=row.master_key_id,
                wrapped=row.wrapped_key,
            )
            row.master_key_id, row.wrapped_key = crypto.wrap(
                key_id=row.key_id, purpose="backup", subject_id="", key=key
            )
            row.save(update_fields=["master_key_id", "wrapped_key"])
            count += 1
    return count
