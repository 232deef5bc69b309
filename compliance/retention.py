"""Retention: how long each category of record is kept, legal holds that stop its removal, and
the purge of sealed audit events in whole, signed ranges.

Categories (`RetentionCategory`, days in `settings.RETENTION_DAYS`):

- `audit_events`: the audit trail. Events go only in whole ranges from the oldest kept seq up to
  a seq that a published checkpoint signs (its own seq or one of its waypoints), and only when
  every event in the range is past its category's retention and no active hold covers it.
- `api_requests`: the request records of the API middleware, which are audit events (action
  `api.request`) sealed into the same chain. They cannot go on their own without cutting holes
  in it, so a retention shorter than `audit_events` is honoured as "not before": a request
  record is never purged before its days are up, and goes when the whole range around it is due.
- `dsr_records`: completed or rejected data-subject requests (and their export files), counted
  from when they were closed.
- `reports`: compliance reports and their files, counted from when they were generated.

A legal hold names categories, optionally a data subject and a time range; while active, what it
covers is never removed. The daily job (`compliance.tasks.retention_task`, dry run with
RETENTION_DRY_RUN) applies all four.

The audit purge is the one way to remove sealed events: PostgreSQL's append-only trigger
(`compliance_append_only()`, migration 0002) is replaced on post_migrate by one that still
refuses every UPDATE and TRUNCATE and every DELETE, except a DELETE of a seal or event whose seq
lies in the range a transaction-local setting names (`bridge.audit_purge = 'first:last'`), which
only `purge_audit_events` sets, inside the transaction that also writes the AuditPurge row and
the `audit.purged` event. Verification then starts from the signed hash at the seq the purge was
cut at (`chain_base`), taken from the checkpoints in the sinks, never from the AuditPurge row
alone, which an insider could write.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from django.conf import settings
from django.db import connection, connections, transaction
from django.db.models import Count, Max, Min, Q
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from bridge.choices import JobStatus
from bridge.jobs import Progress, start_job
from bridge.models import Job
from compliance import proof
from compliance.audit import AuditContext, iso, record_event
from compliance.chain import GENESIS_HASH, chain_head
from compliance.checkpoints import review_checkpoints
from compliance.choices import (
    RETENTION_JOB_KIND,
    AuditAction,
    CheckpointStatus,
    DsrStatus,
    ReportStatus,
    RetentionCategory,
)
from compliance.models import (
    AuditCheckpoint,
    AuditEvent,
    AuditPurge,
    AuditSeal,
    ComplianceReport,
    DataSubjectRequest,
    LegalHold,
)
from compliance.redaction import redact_text

log = logging.getLogger(__name__)

# The transaction-local setting that lets the guard pass a purge's DELETEs ("first:last").
PURGE_SETTING = "bridge.audit_purge"
# pg_advisory_xact_lock key of the purge ("BRIDGEPU" as a number): one purge at a time.
_PURGE_LOCK_KEY = 0x4252494447455055 & 0x7FFFFFFFFFFFFFFF
# Events per purge transaction: each ends at a signed seq, so the chain verifies between them,
# and a purge of years at once never holds one huge transaction open.
PURGE_CHUNK = 50_000
# Seqs per DELETE statement inside a transaction.
DELETE_BATCH = 5_000
# How many ids a retention run lists per category in its result (counts are always whole).
LISTED = 200

_API = AuditAction.API_REQUEST.value
_CLOSED_DSR = (DsrStatus.COMPLETED, DsrStatus.REJECTED)
_FINISHED_REPORT = (ReportStatus.SUCCEEDED, ReportStatus.FAILED)


class RetentionError(Exception):
    """A request about holds or retention that cannot be honoured: `field` names the input at
    fault (a 400), `code` says why otherwise (a 409)."""

    def __init__(self, message: str, *, field: str | None = None, code: str = "invalid") -> None:
        super().__init__(message)
        self.field = field
        self.code = code


class PurgeRefused(Exception):
    """The purge was refused (recorded as `audit.purge_refused`): `reason` says why."""

    def __init__(self, reason: str, plan: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.plan = plan or {}


class RetentionBusy(Exception):
    """A retention run is already pending or running."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"retention run {job.pk} is {job.status}: wait for it to finish")
        self.job = job


class RetentionFailed(Exception):
    """A real run could not remove what was due (the job fails, and monitoring sees it)."""


# --- Categories ---------------------------------------------------------------------------


def retention_days(category: str) -> int:
    """Days records of `category` are kept (RETENTION_DAYS, else DATA_RETENTION_DAYS)."""
    return int(settings.RETENTION_DAYS.get(str(category), settings.DATA_RETENTION_DAYS))


def cutoff(category: str, now: datetime | None = None) -> datetime:
    """Records of `category` from before this moment are past retention."""
    return (now or timezone.now()) - timedelta(days=retention_days(category))


# --- Legal holds --------------------------------------------------------------------------


def active_holds(category: str | None = None) -> list[LegalHold]:
    """Holds not released, oldest first; those naming `category` when one is given."""
    holds = list(LegalHold.objects.filter(released_at__isnull=True).order_by("created_at", "id"))
    if category is None:
        return holds
    return [hold for hold in holds if str(category) in (hold.categories or [])]


def hold_summary(hold: LegalHold) -> dict[str, Any]:
    return {
        "id": hold.pk,
        "name": hold.name,
        "categories": list(hold.categories or []),
        "subject_id": hold.subject_id,
        "covers_from": iso(hold.covers_from) if hold.covers_from else None,
        "covers_to": iso(hold.covers_to) if hold.covers_to else None,
    }


def _clean_categories(categories: Iterable[str]) -> list[str]:
    if isinstance(categories, str | bytes) or not isinstance(categories, Iterable):
        raise RetentionError("A list of categories.", field="categories")
    chosen = []
    for category in categories:
        if category not in RetentionCategory.values:
            raise RetentionError(
                f"{category!r} is not a category: one of {', '.join(RetentionCategory.values)}.",
                field="categories",
            )
        if category not in chosen:
            chosen.append(category)
    if not chosen:
        raise RetentionError("Name at least one category.", field="categories")
    return chosen


def _aware(moment: datetime | None, name: str) -> datetime | None:
    if moment is None:
        return None
    if not isinstance(moment, datetime):
        raise RetentionError("A date and time.", field=name)
    return moment if timezone.is_aware(moment) else timezone.make_aware(moment, UTC)


def place_hold(
    *,
    name: str,
    reason: str,
    categories: Iterable[str],
    subject_id: str = "",
    covers_from: datetime | None = None,
    covers_to: datetime | None = None,
    context: AuditContext,
    user: Any = None,
) -> LegalHold:
    """Place a legal hold: while it is active nothing it covers is purged (audited
    `retention.hold.placed`).

    A hold without a subject covers every record of its categories, one with a subject only
    that subject's (see `covers_event`, `_dsr_held`, `_report_held` for what that means per
    category); without a range it covers all time, with one the records of that time
    (inclusive at both ends).
    """
    name = (name or "").strip()
    reason = (reason or "").strip()
    if not name:
        raise RetentionError("A hold needs a name.", field="name")
    if len(name) > 200:
        raise RetentionError("At most 200 characters.", field="name")
    if not reason:
        raise RetentionError("Say why the records must be kept.", field="reason")
    chosen = _clean_categories(categories)
    subject_id = subject_id or ""
    if len(subject_id) > 128 or any(ord(char) < 32 or ord(char) == 127 for char in subject_id):
        raise RetentionError(
            "A subject id is at most 128 characters, without control characters.",
            field="subject_id",
        )
    for field_name, value in (("name", name), ("reason", reason), ("subject_id", subject_id)):
        # NUL and a lone surrogate (JSON carries both): no PostgreSQL text column stores them.
        if "\x00" in value:
            raise RetentionError("May not contain NUL characters.", field=field_name)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RetentionError("Not valid Unicode text.", field=field_name) from None
    covers_from = _aware(covers_from, "covers_from")
    covers_to = _aware(covers_to, "covers_to")
    if covers_from and covers_to and covers_from > covers_to:
        raise RetentionError("The range ends before it begins.", field="covers_to")
    with transaction.atomic():
        hold = LegalHold.objects.create(
            name=name,
            reason=reason,
            categories=chosen,
            subject_id=subject_id,
            covers_from=covers_from,
            covers_to=covers_to,
            created_by=user if getattr(user, "pk", None) else None,
            created_at=timezone.now(),
        )
        record_event(
            action=AuditAction.LEGAL_HOLD_PLACED,
            context=context,
            object_type="compliance.legalhold",
            object_id=hold.pk,
            details={**hold_summary(hold), "reason": reason},
        )
    return hold


def release_hold(*, hold: LegalHold, context: AuditContext, user: Any = None) -> LegalHold:
    """Release an active hold (audited `retention.hold.released`); what it covered becomes
    due at the next run if its retention is over. Releasing twice is refused."""
    now = timezone.now()
    with transaction.atomic():
        # Compare-and-swap: two releases at once, one wins, the other is told.
        released = LegalHold.objects.filter(pk=hold.pk, released_at__isnull=True).update(
            released_at=now, released_by=user if getattr(user, "pk", None) else None
        )
        if not released:
            raise RetentionError(f"Hold {hold.pk} is already released.", code="hold_released")
        hold.refresh_from_db()
        record_event(
            action=AuditAction.LEGAL_HOLD_RELEASED,
            context=context,
            object_type="compliance.legalhold",
            object_id=hold.pk,
            details={**hold_summary(hold), "held_since": iso(hold.created_at)},
        )
    return hold


def _in_range(hold: LegalHold, start: datetime, end: datetime) -> bool:
    """Whether [start, end] meets the hold's range (an open end reaches all time)."""
    return (hold.covers_from is None or end >= hold.covers_from) and (
        hold.covers_to is None or start <= hold.covers_to
    )


def _event_hold_query(hold: LegalHold) -> Q | None:
    """The audit events a hold covers (None: none). `audit_events` covers the whole trail,
    request records included; `api_requests` only the request records. With a subject: the
    events whose actor is that subject (blind index or plain column) or whose object it is."""
    categories = set(hold.categories or [])
    if RetentionCategory.AUDIT_EVENTS in categories:
        match = Q()
    elif RetentionCategory.API_REQUESTS in categories:
        match = Q(action=_API)
    else:
        return None
    if hold.covers_from is not None:
        match &= Q(occurred_at__gte=hold.covers_from)
    if hold.covers_to is not None:
        match &= Q(occurred_at__lte=hold.covers_to)
    if hold.subject_id:
        from compliance.personal import actor_match

        match &= (
            actor_match(hold.subject_id)
            | Q(object_id=hold.subject_id)
            | _about_subject(hold.subject_id)
        )
    return match


def _about_subject(subject_id: str) -> Q:
    """Events about a subject that neither name them as the actor nor as the object: their
    data subject requests, erasures and consent (events that deliberately carry the record's
    id rather than the subject's, or hold the subject id sealed in their details)."""
    from compliance.models import ConsentEvent, ErasureRecord
    from compliance.personal_data import pseudonym

    requests = DataSubjectRequest.objects.filter(subject_id=subject_id).values_list("pk", flat=True)
    erasures = ErasureRecord.objects.filter(subject_id=subject_id).values_list("pk", flat=True)
    # An erased subject's consent events carry their pseudonym.
    consents = ConsentEvent.objects.filter(
        subject_id__in=[subject_id, pseudonym(subject_id)]
    ).values_list("pk", flat=True)
    # The API's own request records of their consent (the subject id is in the path).
    consent_path = f"/api/compliance/gdpr/consent/{subject_id}"
    about = Q(path=consent_path) | Q(path=f"{consent_path}/receipt")
    for object_type, ids in (
        ("compliance.datasubjectrequest", requests),
        ("compliance.erasurerecord", erasures),
        ("compliance.consentevent", consents),
    ):
        found = [str(pk) for pk in ids]
        if found:
            about |= Q(object_type=object_type, object_id__in=found)
    return about


# --- The guard: the single audited bypass of the append-only triggers ---------------------

_GUARD_SQL = """
CREATE OR REPLACE FUNCTION compliance_append_only() RETURNS trigger AS $$
DECLARE
    -- bridge.audit_purge: set (SET LOCAL) only by compliance.retention.purge_audit_events
    purge text := current_setting('bridge.audit_purge', true);
    low bigint;
    high bigint;
    at_seq bigint;
BEGIN
    -- Only the audit events and their seals: the same guard keeps other tables append-only
    -- (the SOX change records), whose ids mean nothing to a purge's seq range.
    IF TG_OP = 'DELETE' AND COALESCE(purge, '') <> ''
       AND TG_TABLE_NAME IN ('compliance_auditevent', 'compliance_auditseal') THEN
        low := split_part(purge, ':', 1)::bigint;
        high := split_part(purge, ':', 2)::bigint;
        IF TG_TABLE_NAME = 'compliance_auditseal' THEN
            at_seq := OLD.seq;
        ELSE
            SELECT s.seq INTO at_seq FROM compliance_auditseal s WHERE s.event_id = OLD.id;
        END IF;
        IF at_seq IS NOT NULL AND at_seq BETWEEN low AND high THEN
            RETURN OLD;
        END IF;
    END IF;
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;
"""
# What pg_proc.prosrc holds once the guard above is installed (the text between the $$).
_GUARD_BODY = _GUARD_SQL.split("$$")[1]


def install_purge_guard(using: str = "default") -> bool:
    """Make `compliance_append_only()` the guard that lets only a purge's range through;
    True when it was (re)installed. Only where the triggers of migration 0002 exist."""
    database = connections[using]
    if database.vendor != "postgresql":
        return False
    with database.cursor() as cursor:
        cursor.execute(
            "SELECT 1 FROM pg_trigger WHERE tgname = 'compliance_auditevent_append_only' "
            "AND NOT tgisinternal"
        )
        if cursor.fetchone() is None:
            return False  # not migrated that far (or migrated back): nothing to guard
        cursor.execute(
            "SELECT prosrc FROM pg_proc WHERE proname = 'compliance_append_only' LIMIT 1"
        )
        row = cursor.fetchone()
        # Replaced unless it is exactly this version (an earlier one let the purge's setting
        # through on every table the guard protects).
        if row and row[0] == _GUARD_BODY:
            return False
        cursor.execute(_GUARD_SQL)
    return True


def install_purge_guard_after_migrate(sender: Any, using: str = "default", **kwargs: Any) -> None:
    """post_migrate receiver (compliance/apps.py): no migration replaces the function, so
    every migrate (and a test database's creation) installs it."""
    install_purge_guard(using)


def _allow_purge(first_seq: int, last_seq: int) -> None:
    """Let this transaction, and only it, delete the seals and events of first..last."""
    if connection.vendor != "postgresql":
        return
    if not connection.in_atomic_block:
        raise RuntimeError("the purge bypass is only ever set inside a transaction")
    install_purge_guard()  # a database restored from an older dump has the plain guard
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT set_config(%s, %s, true)", [PURGE_SETTING, f"{int(first_seq)}:{int(last_seq)}"]
        )


def _lock_purges() -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_PURGE_LOCK_KEY])


# --- Where verification starts ------------------------------------------------------------


class ChainBase(NamedTuple):
    """Where the chain's walk starts: after `after_seq`, from `start_hash`, which checkpoint
    `checkpoint` signs (None at genesis). `problem`: the kept chain cannot be anchored (events
    were removed without a signed checkpoint or a recorded purge), and verification says so."""

    after_seq: int
    start_hash: str
    checkpoint: int | None
    problem: proof.Problem | None = None


def kept_floor() -> int:
    """The lowest seq still in the chain (1 before any purge; the seq after the head when a
    purge took every sealed event and nothing was sealed since)."""
    lowest = AuditSeal.objects.aggregate(low=Min("seq"))["low"]
    if lowest is not None:
        return int(lowest)
    head = chain_head()
    return (head.last_seq if head else 0) + 1


def _signed(review: proof.CheckpointReview, seqs: set[int]) -> dict[int, proof.Anchor]:
    """The first signed anchor at each of `seqs` (anchors come in seq order: stops past them)."""
    found: dict[int, proof.Anchor] = {}
    if not seqs:
        return found
    highest = max(seqs)
    for anchor in review.anchors():
        if anchor.seq > highest:
            break
        if anchor.seq in seqs and anchor.seq not in found:
            found[anchor.seq] = anchor
    return found


def chain_base(review: proof.CheckpointReview | None = None) -> ChainBase:
    """(after_seq, start_hash, checkpoint number) for verification to start from.

    Before any purge: the genesis. After one: the seq before the lowest kept one, with the hash
    a checkpoint in the sinks signs there; the AuditPurge row only says which seq it is and
    must agree, and its `audit.purged` event must be in the trail. If no signed checkpoint
    covers that seq, the cut is reported (`problem`): events 1..N were removed unseen.
    """
    floor = kept_floor()
    if floor <= 1:
        return ChainBase(0, GENESIS_HASH, None)
    cut = floor - 1
    review = review if review is not None else review_checkpoints()
    purge = AuditPurge.objects.filter(last_seq=cut).first()
    previous = AuditPurge.objects.filter(last_seq__lt=cut).order_by("-last_seq").first()
    wanted = {cut} | ({previous.last_seq} if previous else set())
    signed = _signed(review, wanted)
    # For the message: where the unexplained part begins (after the last signed purge).
    lower = previous.last_seq + 1 if previous and previous.last_seq in signed else 1
    anchor = signed.get(cut)
    if anchor is None:
        return ChainBase(
            cut,
            GENESIS_HASH,
            None,
            proof.Problem(
                f"events {lower}..{cut} were removed and no signed checkpoint covers them",
                seq=lower,
            ),
        )
    if purge is None:
        return ChainBase(
            cut,
            GENESIS_HASH,
            anchor.checkpoint,
            proof.Problem(
                f"events {lower}..{cut} were removed without a recorded purge (no purge ends "
                f"at seq {cut})",
                seq=lower,
                checkpoint=anchor.checkpoint,
            ),
        )
    if purge.anchor_hash != anchor.hash:
        return ChainBase(
            cut,
            GENESIS_HASH,
            anchor.checkpoint,
            proof.Problem(
                f"the purge of seq {purge.first_seq}..{cut} records another hash than "
                f"checkpoint #{anchor.checkpoint} signs at seq {cut}",
                seq=cut,
                checkpoint=anchor.checkpoint,
            ),
        )
    recorded = AuditEvent.objects.filter(
        action=AuditAction.AUDIT_PURGED,
        object_type="compliance.auditpurge",
        object_id=str(purge.pk),
    ).exists()
    if not recorded:
        return ChainBase(
            cut,
            GENESIS_HASH,
            anchor.checkpoint,
            proof.Problem(
                f"the purge of seq {purge.first_seq}..{cut} is not in the audit trail (no "
                f"{AuditAction.AUDIT_PURGED.value} event names it)",
                seq=lower,
                checkpoint=anchor.checkpoint,
            ),
        )
    if not _purge_signed(purge):
        return ChainBase(
            cut,
            GENESIS_HASH,
            anchor.checkpoint,
            proof.Problem(
                f"the purge of seq {purge.first_seq}..{cut} is not signed by a key Bridge "
                "trusts: events 1.."
                f"{cut} were removed by someone other than Bridge's retention",
                seq=lower,
                checkpoint=anchor.checkpoint,
            ),
        )
    return ChainBase(cut, anchor.hash, anchor.checkpoint)


# --- Planning the audit purge -------------------------------------------------------------


@dataclass
class PurgePlan:
    """What a purge of the audit trail would remove now, and why not more.

    status: `ready` (first_seq..last_seq can go), `nothing_due`, `held` (holds stop the due
    events from reaching a signed seq), `waiting` (the due events end before the first signed
    seq after them: they go with a later run) or `refused` (`reason`).
    """

    status: str
    first_seq: int | None = None
    last_seq: int | None = None
    events: int = 0
    api_requests: int = 0
    checkpoint_number: int | None = None
    anchor_hash: str = ""
    newest_purged_at: str | None = None
    due_until_seq: int | None = None
    reason: str = ""
    holds: list[dict[str, Any]] = field(default_factory=list)


def _on_seals(match: Q) -> Q:
    """An AuditEvent lookup as the same lookup through a seal's event (a join walked in seq
    order, where an IN subquery could make the server collect every matching event first)."""
    children = [
        _on_seals(child) if isinstance(child, Q) else (f"event__{child[0]}", child[1])
        for child in match.children
    ]
    return Q(*children, _connector=match.connector, _negated=match.negated)


def _first_seq(start: int, end: int, events: Q | None = None) -> int | None:
    """The lowest seq in [start, end] whose event matches `events` (AuditEvent lookups)."""
    seals = AuditSeal.objects.filter(seq__gte=start, seq__lte=end)
    if events is not None:
        seals = seals.filter(_on_seals(events))
    return seals.order_by("seq").values_list("seq", flat=True).first()


def _not_due(now: datetime) -> Q:
    """Audit events still within their retention (AuditEvent lookups)."""
    api_cut = cutoff(RetentionCategory.API_REQUESTS, now)
    audit_cut = cutoff(RetentionCategory.AUDIT_EVENTS, now)
    return Q(action=_API, occurred_at__gte=api_cut) | (
        ~Q(action=_API) & Q(occurred_at__gte=audit_cut)
    )


def _range_stats(first_seq: int, last_seq: int) -> dict[str, Any]:
    stats = AuditSeal.objects.filter(seq__gte=first_seq, seq__lte=last_seq).aggregate(
        events=Count("pk"),
        api=Count("pk", filter=Q(event__action=_API)),
        newest=Max("event__occurred_at"),
    )
    return {
        "events": int(stats["events"] or 0),
        "api_requests": int(stats["api"] or 0),
        "newest": stats["newest"],
    }


def plan_purge(
    *,
    now: datetime | None = None,
    up_to_seq: int | None = None,
    review: proof.CheckpointReview | None = None,
) -> PurgePlan:
    """The range a purge would remove now (nothing is changed)."""
    now = now or timezone.now()
    head = chain_head()
    head_seq = head.last_seq if head else 0
    floor = kept_floor()
    if floor > head_seq:
        return PurgePlan("nothing_due", reason="no sealed event is kept")
    review = review if review is not None else review_checkpoints()
    if review.problems:
        return PurgePlan(
            "refused",
            reason=(
                f"the signed checkpoints do not check out ({review.problems[0].reason}): "
                "nothing is purged while the trail shows damage"
            ),
        )
    base = chain_base(review)
    if base.problem is not None:
        return PurgePlan(
            "refused", reason=f"the chain before seq {floor} is cut: {base.problem.reason}"
        )
    # The first event still within its retention ends the due range.
    fresh = _first_seq(floor, head_seq, _not_due(now))
    due_until = (fresh - 1) if fresh is not None else head_seq
    if due_until < floor:
        return PurgePlan("nothing_due", due_until_seq=None)
    # Then the first event an active hold covers.
    stop, holds = due_until, []
    for hold in active_holds():
        match = _event_hold_query(hold)
        if match is None:
            continue
        held = _first_seq(floor, due_until, match)
        if held is not None:
            holds.append({**hold_summary(hold), "first_held_seq": held})
            stop = min(stop, held - 1)
    limit = min(stop, up_to_seq) if up_to_seq is not None else stop
    unpublished = set(
        AuditCheckpoint.objects.exclude(status=CheckpointStatus.PUBLISHED).values_list(
            "number", flat=True
        )
    )
    best = first = None
    for anchor in review.anchors():
        if anchor.seq < floor or anchor.checkpoint in unpublished:
            continue
        first = first or anchor
        if anchor.seq > limit:
            break
        best = anchor
    plan = PurgePlan("ready", due_until_seq=due_until, holds=holds)
    if best is None:
        if first is None:
            plan.status = "refused"
            plan.reason = (
                f"no signed checkpoint covers the events due (seq {floor}..{due_until}): "
                "events are purged only up to a seq a published checkpoint signs"
            )
        elif stop < first.seq <= due_until:
            plan.status = "held"
            plan.reason = f"legal hold(s) keep seq {stop + 1} and after"
        elif up_to_seq is not None and up_to_seq < first.seq <= stop:
            plan.status = "refused"
            plan.reason = (
                f"no signed checkpoint signs a seq in {floor}..{up_to_seq}: the first signed "
                f"seq is {first.seq}"
            )
        else:
            plan.status = "waiting"
            plan.reason = (
                f"the events due end at seq {due_until}, before the first signed seq "
                f"({first.seq}): they go with a later run"
            )
        return plan
    stats = _range_stats(floor, best.seq)
    plan.first_seq, plan.last_seq = floor, best.seq
    plan.events, plan.api_requests = stats["events"], stats["api_requests"]
    plan.checkpoint_number, plan.anchor_hash = best.checkpoint, best.hash
    plan.newest_purged_at = iso(stats["newest"]) if stats["newest"] else None
    if stop < due_until:
        plan.reason = f"legal hold(s) keep seq {stop + 1} and after"
    return plan


# --- Purging ------------------------------------------------------------------------------


def _verify_range(base: ChainBase, end: proof.Anchor, review: proof.CheckpointReview) -> None:
    """Walk what is about to go: evidence of tampering is never destroyed."""
    from compliance.verification import walk_of

    walker, rows = walk_of(
        end.seq, after_seq=base.after_seq, start_hash=base.start_hash, anchors=review.anchors()
    )
    problem = walker.walk(rows)
    if problem is None and (walker.last_seq != end.seq or walker.last_hash != end.hash):
        problem = proof.Problem(f"the chain does not reach seq {end.seq}", seq=end.seq)
    if problem is not None:
        raise PurgeRefused(
            f"seq {base.after_seq + 1}..{end.seq} does not verify (seq {problem.seq}: "
            f"{problem.reason}): nothing is purged, it is evidence"
        )


def _chunk_ends(
    review: proof.CheckpointReview, first_seq: int, last: proof.Anchor, size: int
) -> list[proof.Anchor]:
    """Signed seqs cutting first_seq..last.seq into transactions of about `size` events each
    (never more where the anchors allow, more where no anchor falls sooner)."""
    unpublished = set(
        AuditCheckpoint.objects.exclude(status=CheckpointStatus.PUBLISHED).values_list(
            "number", flat=True
        )
    )
    ends: list[proof.Anchor] = []
    start, candidate = first_seq, None
    for anchor in review.anchors():
        if anchor.seq < start or anchor.checkpoint in unpublished:
            continue
        if anchor.seq >= last.seq:
            break
        if anchor.seq - start + 1 > size and candidate is not None:
            ends.append(candidate)
            start, candidate = candidate.seq + 1, None
        if anchor.seq - start + 1 > size:
            # No signed seq sooner: this one ends a longer transaction.
            ends.append(anchor)
            start = anchor.seq + 1
        else:
            candidate = anchor
    ends.append(last)
    return ends


def _delete_range(first_seq: int, last_seq: int) -> int:
    """Delete the events, then the seals, of first..last (the guard checks each event's seq
    by its seal, so the seals go second); returns the events deleted."""
    quote = connection.ops.quote_name
    events, seals = quote(AuditEvent._meta.db_table), quote(AuditSeal._meta.db_table)
    deleted = 0
    with connection.cursor() as cursor:
        for low in range(first_seq, last_seq + 1, DELETE_BATCH):
            high = min(low + DELETE_BATCH - 1, last_seq)
            # Identifiers from our own models only; the bounds are parameters.
            cursor.execute(
                f"DELETE FROM {events} WHERE {quote('id')} IN (SELECT {quote('event_id')} "  # noqa: S608
                f"FROM {seals} WHERE {quote('seq')} BETWEEN %s AND %s)",
                [low, high],
            )
            deleted += cursor.rowcount
            cursor.execute(
                f"DELETE FROM {seals} WHERE {quote('seq')} BETWEEN %s AND %s",  # noqa: S608
                [low, high],
            )
    return deleted


def _purge_chunk(
    first_seq: int, end: proof.Anchor, *, context: AuditContext, job: Job | None
) -> AuditPurge:
    with transaction.atomic():
        _lock_purges()
        if kept_floor() != first_seq:
            raise PurgeRefused(
                f"the chain now starts at seq {kept_floor()}, not {first_seq}: another purge "
                "ran meanwhile"
            )
        stats = _range_stats(first_seq, end.seq)
        _allow_purge(first_seq, end.seq)
        deleted = _delete_range(first_seq, end.seq)
        purge = AuditPurge(
            first_seq=first_seq,
            last_seq=end.seq,
            events=deleted,
            checkpoint_number=end.checkpoint,
            anchor_hash=end.hash,
            newest_purged_at=stats["newest"] or timezone.now(),
            purged_at=timezone.now(),
            job=job,
        )
        _sign_purge(purge)
        purge.save()
        # The purge is itself an event of the chain, sealed after what it removed.
        record_event(
            action=AuditAction.AUDIT_PURGED,
            context=context,
            object_type="compliance.auditpurge",
            object_id=purge.pk,
            details={
                "first_seq": first_seq,
                "last_seq": end.seq,
                "events": deleted,
                "api_requests": stats["api_requests"],
                "checkpoint": end.checkpoint,
                "anchor_hash": end.hash,
                "newest_purged_at": iso(purge.newest_purged_at),
                "job": job.pk if job else None,
            },
        )
    return purge


def purge_statement(purge: AuditPurge) -> dict[str, Any]:
    """What a purge's signature covers: the range, the count, the anchor and the times."""
    return {
        "first_seq": purge.first_seq,
        "last_seq": purge.last_seq,
        "events": purge.events,
        "checkpoint_number": purge.checkpoint_number,
        "anchor_hash": purge.anchor_hash,
        "newest_purged_at": iso(purge.newest_purged_at),
        "purged_at": iso(purge.purged_at),
    }


def _sign_purge(purge: AuditPurge) -> None:
    # Only this code path holds the signing key: an insider who deletes events and writes a
    # purge row and its event by hand cannot make this signature (the key is a file outside
    # the database), so verification tells their cut from a real purge.
    from security.keys import audit_signing_key

    key = audit_signing_key()
    signature = key.private.sign(proof.purge_message(purge_statement(purge)))
    purge.key_id = key.key_id
    purge.signature = base64.b64encode(signature).decode("ascii")


def _purge_signed(purge: AuditPurge) -> bool:
    from compliance.checkpoints import sink_rotations
    from compliance.sinks import configured_sinks
    from security.keys import trusted_keys

    ring = trusted_keys(sink_rotations(configured_sinks()))
    key = ring.keys.get(purge.key_id)
    message = proof.purge_message(purge_statement(purge))
    return key is not None and proof.verifies(key, purge.signature, message)


def _refuse(reason: str, *, dry_run: bool, context: AuditContext, plan: dict) -> PurgeRefused:
    record_event(
        action=AuditAction.AUDIT_PURGE_REFUSED,
        context=context,
        object_type="compliance.auditpurge",
        details={"reason": reason, "dry_run": dry_run, "due_until_seq": plan.get("due_until_seq")},
    )
    log.error("AUDIT PURGE REFUSED: %s", reason)
    return PurgeRefused(reason, plan)


def purge_audit_events(
    *,
    dry_run: bool,
    context: AuditContext,
    up_to_seq: int | None = None,
    progress: Progress | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Purge the sealed audit events past retention, in whole signed ranges from the oldest
    kept seq (at most up to `up_to_seq`); `dry_run` only says what would go.

    Refused (PurgeRefused, recorded as `audit.purge_refused`) when no published checkpoint
    signs a seq the due events reach, when the checkpoints or the range do not verify, or
    when the chain is already cut below. Each transaction of the purge ends at a signed seq,
    writes its AuditPurge row and records `audit.purged`; progress is reported between them.
    """
    if up_to_seq is not None and (isinstance(up_to_seq, bool) or int(up_to_seq) < 1):
        raise RetentionError("A seq of 1 or more.", field="up_to_seq")
    review = review_checkpoints()
    plan = plan_purge(now=now, up_to_seq=up_to_seq, review=review)
    summary = {"dry_run": dry_run, **asdict(plan), "purges": []}
    if plan.status == "refused":
        raise _refuse(plan.reason, dry_run=dry_run, context=context, plan=summary)
    if plan.status != "ready":
        return summary
    end = proof.Anchor(plan.last_seq, plan.anchor_hash, plan.checkpoint_number)
    try:
        _verify_range(chain_base(review), end, review)
    except PurgeRefused as refused:
        raise _refuse(refused.reason, dry_run=dry_run, context=context, plan=summary) from None
    if dry_run:
        summary["status"] = "would_purge"
        return summary
    job = progress.job if progress is not None else None
    total, done, start = plan.events, 0, plan.first_seq
    if progress is not None:
        progress.update(0, total, f"purging audit seq {plan.first_seq}..{plan.last_seq}")
    for cut in _chunk_ends(review, plan.first_seq, end, PURGE_CHUNK):
        try:
            purge = _purge_chunk(start, cut, context=context, job=job)
        except PurgeRefused as refused:
            raise _refuse(refused.reason, dry_run=dry_run, context=context, plan=summary) from None
        summary["purges"].append(purge.pk)
        done += purge.events
        start = cut.seq + 1
        if progress is not None:
            progress.update(min(done, total), total, f"purged audit seq ..{cut.seq}")
    summary.update(status="purged", events=done)
    log.warning(
        "audit events purged: seq %s..%s (%s events), anchored by checkpoint #%s",
        plan.first_seq,
        plan.last_seq,
        done,
        plan.checkpoint_number,
    )
    return summary


# --- Data-subject requests and reports ----------------------------------------------------


def _moment(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            parsed = parse_datetime(value)
        except ValueError:
            return None
        if parsed is not None and timezone.is_naive(parsed):
            parsed = timezone.make_aware(parsed, UTC)
        return parsed
    return None


def dsr_closed_at(request: DataSubjectRequest) -> datetime:
    """When a request was closed: its completion time, else the newest time in its history,
    else its receipt (retention counts from the latest moment known, never earlier)."""
    moments = [request.received_at]
    if request.completed_at:
        moments.append(request.completed_at)
    for entry in request.history or []:
        if isinstance(entry, dict):
            for key in ("at", "time", "timestamp"):
                moment = _moment(entry.get(key))
                if moment is not None:
                    moments.append(moment)
    return max(moments)


def _dsr_held(hold: LegalHold, request: DataSubjectRequest, closed: datetime) -> bool:
    """A dsr_records hold covers a request of its subject (any, without one) whose life
    (receipt to closing) meets its range."""
    if hold.subject_id and hold.subject_id != request.subject_id:
        return False
    return _in_range(hold, request.received_at, closed)


def _report_held(hold: LegalHold, report: ComplianceReport) -> bool:
    """A reports hold covers the reports whose period or generation meets its range. Reports
    are not indexed by subject (an audit trail report names every actor), so a hold naming a
    subject keeps every report of its range: more than asked, never less."""
    end = max(report.period_to, report.created_at)
    return _in_range(hold, report.period_from, end)


@dataclass
class _Candidates:
    days: int
    cutoff: datetime
    due: list[Any] = field(default_factory=list)
    held: list[Any] = field(default_factory=list)
    holds: dict[int, dict[str, Any]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "days": self.days,
            "cutoff": iso(self.cutoff),
            "due": len(self.due) + len(self.held),
            "would_delete": len(self.due),
            "held": len(self.held),
            "holds": list(self.holds.values()),
            "ids": [str(item.pk) for item in self.due[:LISTED]],
        }


def _dsr_candidates(now: datetime) -> _Candidates:
    category = RetentionCategory.DSR_RECORDS
    found = _Candidates(retention_days(category), cutoff(category, now))
    holds = active_holds(category)
    # Closed no earlier than received: the received_at bound narrows, closed_at decides.
    rows = DataSubjectRequest.objects.filter(
        status__in=_CLOSED_DSR, received_at__lt=found.cutoff
    ).order_by("received_at")
    for request in rows.iterator(chunk_size=500):
        closed = dsr_closed_at(request)
        if closed >= found.cutoff:
            continue
        blocking = [hold for hold in holds if _dsr_held(hold, request, closed)]
        (found.held if blocking else found.due).append(request)
        for hold in blocking:
            found.holds.setdefault(hold.pk, hold_summary(hold))
    return found


def _report_candidates(now: datetime) -> _Candidates:
    category = RetentionCategory.REPORTS
    found = _Candidates(retention_days(category), cutoff(category, now))
    holds = active_holds(category)
    rows = ComplianceReport.objects.filter(
        status__in=_FINISHED_REPORT, created_at__lt=found.cutoff
    ).order_by("created_at")
    for report in rows.iterator(chunk_size=500):
        blocking = [hold for hold in holds if _report_held(hold, report)]
        (found.held if blocking else found.due).append(report)
        for hold in blocking:
            found.holds.setdefault(hold.pk, hold_summary(hold))
    return found


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except (ValueError, OSError):
        return False
    return True


def _remove_files(paths: Iterable[str], root: Path) -> int:
    """Delete the files at `paths` found inside `root` (a path edited in the database steers
    no deletion elsewhere); returns how many were removed."""
    removed = 0
    for text in paths:
        if not text:
            continue
        path = Path(text)
        if not path.is_absolute():
            path = Path(root) / path
        if not _inside(path, Path(root)):
            log.warning("retention: %s is outside %s, not deleted", path, root)
            continue
        try:
            if path.is_file():
                path.unlink()
                removed += 1
        except OSError as exc:
            log.error("retention could not delete %s: %s", path, redact_text(str(exc)))
    return removed


def _delete_rows(model: type, rows: list[Any], **still: Any) -> list[Any]:
    """Delete `rows` of `model` that still match `still`, in batches; returns those gone."""
    ids = [row.pk for row in rows]
    with transaction.atomic():
        for at in range(0, len(ids), 500):
            model.objects.filter(pk__in=ids[at : at + 500], **still).delete()
    kept = set()
    for at in range(0, len(ids), 500):
        kept.update(model.objects.filter(pk__in=ids[at : at + 500]).values_list("pk", flat=True))
    return [row for row in rows if row.pk not in kept]


def _delete_dsrs(found: _Candidates) -> dict[str, int]:
    # Only still-closed rows go (one reopened since the plan stays).
    gone = _delete_rows(DataSubjectRequest, found.due, status__in=_CLOSED_DSR)
    files = [request.export_path for request in gone if request.export_path]
    return {
        "deleted": len(gone),
        "files_deleted": _remove_files(files, Path(settings.DSR_EXPORT_DIR)),
    }


def _delete_reports(found: _Candidates) -> dict[str, int]:
    from compliance.reports import report_files

    gone = _delete_rows(ComplianceReport, found.due, status__in=_FINISHED_REPORT)
    # The report file, its manifest and its signature, by the names the reports service gives
    # them (never the stored file_path, which an insider could point elsewhere).
    files = [str(path) for report in gone for path in report_files(report)]
    return {
        "deleted": len(gone),
        "files_deleted": _remove_files(files, Path(settings.REPORT_DIR)),
    }


# --- The plan and the run -----------------------------------------------------------------


def _audit_due_counts(now: datetime) -> dict[str, int]:
    api_cut = cutoff(RetentionCategory.API_REQUESTS, now)
    audit_cut = cutoff(RetentionCategory.AUDIT_EVENTS, now)
    return {
        RetentionCategory.AUDIT_EVENTS.value: AuditEvent.objects.exclude(action=_API)
        .filter(occurred_at__lt=audit_cut)
        .count(),
        RetentionCategory.API_REQUESTS.value: AuditEvent.objects.filter(
            action=_API, occurred_at__lt=api_cut
        ).count(),
    }


def _audit_categories(plan: dict[str, Any], due: dict[str, int], now: datetime) -> dict:
    api = int(plan.get("api_requests") or 0)
    going = {
        RetentionCategory.AUDIT_EVENTS.value: int(plan.get("events") or 0) - api,
        RetentionCategory.API_REQUESTS.value: api,
    }
    out = {}
    for category in (RetentionCategory.AUDIT_EVENTS, RetentionCategory.API_REQUESTS):
        name = category.value
        blocking = [
            hold
            for hold in plan.get("holds", [])
            if name in hold["categories"] or RetentionCategory.AUDIT_EVENTS in hold["categories"]
        ]
        out[name] = {
            "days": retention_days(category),
            "cutoff": iso(cutoff(category, now)),
            "due": due[name],
            "would_delete": going[name],
            # Due but kept: held, short of a signed seq, or beside a record not yet due.
            "kept": max(0, due[name] - going[name]),
            "holds": blocking,
        }
    return out


def retention_plan(*, now: datetime | None = None) -> dict[str, Any]:
    """What a run would remove now, per category, with counts and the holds that block."""
    now = now or timezone.now()
    try:
        audit = asdict(plan_purge(now=now))
    except Exception as exc:  # a sink that cannot be read: the plan still shows the rest
        log.exception("retention plan: the audit purge could not be planned")
        audit = asdict(PurgePlan("refused", reason=redact_text(f"{type(exc).__name__}: {exc}")))
    categories = _audit_categories(audit, _audit_due_counts(now), now)
    categories[RetentionCategory.DSR_RECORDS.value] = _dsr_candidates(now).summary()
    categories[RetentionCategory.REPORTS.value] = _report_candidates(now).summary()
    return {
        "generated_at": iso(now),
        "dry_run_scheduled": bool(settings.RETENTION_DRY_RUN),
        "categories": categories,
        "audit_purge": audit,
        "holds": [hold_summary(hold) for hold in active_holds()],
    }


# The counts of each category a retention run's audit event carries.
_RUN_COUNTS = (
    "due",
    "would_delete",
    "held",
    "kept",
    "deleted",
    "files_deleted",
    "exports_expired",
)


def apply_retention(
    *,
    dry_run: bool,
    context: AuditContext,
    progress: Progress | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Remove what is past retention and not held: closed DSRs and their exports, reports and
    their files, and the audit events in whole signed ranges (`purge_audit_events`).
    `dry_run` removes nothing and says what would go. Audited `retention.run` with the counts.

    A category that fails does not stop the others; a real run that could not remove what
    was due (an error, a refused purge) raises RetentionFailed after recording the run.
    """
    now = now or timezone.now()
    errors: list[str] = []

    def step(message: str) -> None:
        if progress is not None:
            progress.update(0, None, message)

    step("data subject requests")
    dsrs = _dsr_candidates(now)
    dsr_result = dsrs.summary()
    try:
        # Exports are kept DSR_EXPORT_TTL_DAYS only (the request itself much longer): copies
        # of a subject's data must not outlive their download window on disk.
        from compliance.dsr import delete_expired_exports

        dsr_result["exports_expired"] = delete_expired_exports(now=now, dry_run=dry_run)
    except Exception as exc:
        log.exception("retention: expired data subject exports not deleted")
        errors.append(redact_text(f"dsr_exports: {type(exc).__name__}: {exc}"))
    if not dry_run:
        try:
            dsr_result.update(_delete_dsrs(dsrs))
        except Exception as exc:
            log.exception("retention: data subject requests not deleted")
            errors.append(redact_text(f"dsr_records: {type(exc).__name__}: {exc}"))
    step("reports")
    reports = _report_candidates(now)
    report_result = reports.summary()
    if not dry_run:
        try:
            report_result.update(_delete_reports(reports))
        except Exception as exc:
            log.exception("retention: reports not deleted")
            errors.append(redact_text(f"reports: {type(exc).__name__}: {exc}"))
    step("audit events")
    due = _audit_due_counts(now)
    try:
        audit = purge_audit_events(dry_run=dry_run, context=context, progress=progress, now=now)
    except PurgeRefused as refused:
        audit = {**refused.plan, "status": "refused", "reason": refused.reason}
        if not dry_run:
            errors.append(f"audit_events: {refused.reason}")
    except Exception as exc:
        log.exception("retention: the audit purge failed")
        reason = redact_text(f"{type(exc).__name__}: {exc}")
        audit = {"status": "failed", "reason": reason, "events": 0}
        errors.append(f"audit_events: {reason}")
    categories = _audit_categories(audit, due, now)
    categories[RetentionCategory.DSR_RECORDS.value] = dsr_result
    categories[RetentionCategory.REPORTS.value] = report_result
    result = {
        "dry_run": dry_run,
        "ok": not errors,
        "generated_at": iso(now),
        "categories": categories,
        "audit_purge": audit,
        "errors": errors,
    }
    job = progress.job if progress is not None else None
    record_event(
        action=AuditAction.RETENTION_RUN,
        context=context,
        object_type="bridge.job" if job else "",
        object_id=job.pk if job else "",
        details={
            "dry_run": dry_run,
            "ok": not errors,
            "counts": {
                name: {key: value for key, value in numbers.items() if key in _RUN_COUNTS}
                for name, numbers in categories.items()
            },
            "audit_status": audit.get("status"),
            "audit_range": [audit.get("first_seq"), audit.get("last_seq")],
            "purges": audit.get("purges", []),
            "errors": errors,
        },
    )
    if errors:
        raise RetentionFailed("; ".join(errors))
    return result


def start_retention(
    *, dry_run: bool, context: AuditContext, source: str = "api", enqueue: bool = True
) -> Job:
    """Ask for a retention run (a job); RetentionBusy while another is pending or running."""
    active = (
        Job.objects.filter(
            kind=RETENTION_JOB_KIND, status__in=(JobStatus.PENDING, JobStatus.RUNNING)
        )
        .order_by("id")
        .first()
    )
    if active is not None:
        raise RetentionBusy(active)
    return start_job(
        kind=RETENTION_JOB_KIND,
        context=context,
        params={"dry_run": bool(dry_run), "source": source},
        enqueue=enqueue,
    )


def run_retention_job(job: Job, progress: Progress) -> dict[str, Any]:
    """The job's work (compliance.tasks.retention_job_task)."""
    context = AuditContext(actor_id=job.actor_id, actor_username=job.actor_username)
    return apply_retention(
        dry_run=bool(job.params.get("dry_run", True)), context=context, progress=progress
    )
