"""The personal-data registry: every place Bridge keeps data about a data subject, and how to
find, export, rectify and erase it (GDPR Art. 15, 16, 17 and 20).

A source is any object with

- `name`: a short identifier (lower case, digits, `_`), also the name of its files in an export;
- `find(subject_id) -> int`: how many rows hold the subject's data;
- `export(subject_id) -> Iterable[dict]`: those rows, JSON-safe (the exporter normalises dates,
  UUIDs and decimals anyway);
- `rectify(subject_id, corrections) -> int`: apply `{field: value}` to the fields the source
  declares rectifiable; any other field is a ValueError naming it; returns the rows changed;
- `erase(subject_id) -> dict`: delete or anonymise, returning counts (`deleted`, `anonymised`,
  `retained`, ...). Erasing twice is harmless: the second run finds nothing (a restored backup
  brings rows back, and compliance.dsr.reapply_erasures runs every erasure again).

Sources may also carry `description` (one line for the export's manifest), `rectifiable` (the
field names) and `retention_basis` (why rows counted as `retained` are kept: the exemptions of
Art. 17(3)).

Bridge's own sources are registered on first use of the registry (`sources()`,
`register_source()`), not from an AppConfig: the registry is then complete whoever reads it
first and in whatever order apps load, and the built-ins always come first, so an erasure runs
them in a fixed order. Another app registers its own with `register_source(...)` from its
AppConfig.ready(). `ModelSource` covers the common case of one model with a subject column.
"""

from __future__ import annotations

import re
import secrets
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Protocol, runtime_checkable

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import models, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.crypto import salted_hmac

SUBJECT_KEYS = "subject_keys"
_NAME = re.compile(r"[a-z][a-z0-9_]{0,47}")
# The export reads rows in batches of this many (server-side cursors on PostgreSQL).
_CHUNK = 2000

# Why data that is not erased is kept (GDPR Art. 17(3)): shown in the erasure's result.
BASIS_RECORDS = (
    "Art. 17(3)(b): kept to demonstrate compliance with a legal obligation (Art. 5(2), 12, 17)"
)
BASIS_AUDIT = (
    "Art. 17(3)(b) and (e): the append-only audit trail is a legal obligation and evidence for "
    "legal claims; its hashed version-1 rows cannot change without breaking the chain"
)
BASIS_SOX = "Art. 17(3)(b): SOX change records are kept by legal obligation (SOX 302/404)"


@runtime_checkable
class PersonalDataSource(Protocol):
    """What the registry needs of a source (see the module docstring)."""

    name: str

    def find(self, subject_id: str) -> int: ...

    def export(self, subject_id: str) -> Iterable[dict]: ...

    def rectify(self, subject_id: str, corrections: dict) -> int: ...

    def erase(self, subject_id: str) -> dict: ...


# --- Helpers ----------------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """`value` with dates, UUIDs, decimals and bytes turned into JSON types (times in UTC)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime):
        if timezone.is_aware(value):
            value = value.astimezone(UTC)
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, uuid.UUID | Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(item) for item in value]
    return str(value)


def pseudonym(subject_id: str) -> str:
    """What an erased subject id becomes where a row must stay (consent proof): a keyed hash,
    so the rows of one subject still group together, but the id cannot be read back without
    the server's key and the id itself."""
    digest = salted_hmac("bridge.compliance.erasure", subject_id, algorithm="sha256").hexdigest()
    return f"erased:{digest[:32]}"


class Source:
    """A convenient base: declared rectifiable fields, checked corrections, nothing to erase.

    Subclasses set `name` and override `find`, `export`, `erase` and, when they have
    rectifiable fields, `apply_corrections` (and `clean_value` to validate a value).
    """

    name: str = ""
    description: str = ""
    rectifiable: tuple[str, ...] = ()
    retention_basis: str = ""

    def find(self, subject_id: str) -> int:
        return 0

    def export(self, subject_id: str) -> Iterable[dict]:
        return []

    def erase(self, subject_id: str) -> dict:
        return {}

    def clean_value(self, field: str, value: Any) -> Any:
        """A correction's value as stored, or ValueError naming the field."""
        if not isinstance(value, str):
            raise ValueError(f"{self.name}.{field}: a text value is required")
        return value

    def check_corrections(self, corrections: Any) -> dict[str, Any]:
        """The corrections cleaned, or ValueError naming the first field at fault."""
        if not isinstance(corrections, dict) or not corrections:
            raise ValueError(f"{self.name}: corrections must be a non-empty object of fields")
        unknown = sorted(str(field) for field in corrections if field not in self.rectifiable)
        if unknown:
            allowed = ", ".join(self.rectifiable) or "none"
            raise ValueError(
                f"{self.name}.{unknown[0]}: not a rectifiable field (rectifiable: {allowed})"
            )
        return {field: self.clean_value(field, value) for field, value in corrections.items()}

    def rectify(self, subject_id: str, corrections: dict) -> int:
        return self.apply_corrections(subject_id, self.check_corrections(corrections))

    def apply_corrections(self, subject_id: str, corrections: dict[str, Any]) -> int:
        return 0


class ModelSource(Source):
    """One model whose `subject_field` holds the subject id.

    `erase` is "delete", or a mapping of field -> new value (a callable gets the subject id)
    to anonymise rows that must stay; "retain" keeps them and reports the count.
    """

    def __init__(
        self,
        *,
        name: str,
        model: type[models.Model],
        subject_field: str,
        fields: Iterable[str],
        rectifiable: Iterable[str] = (),
        erase: str | dict[str, Any] = "delete",
        description: str = "",
        retention_basis: str = "",
        max_lengths: dict[str, int] | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.subject_field = subject_field
        self.fields = tuple(fields)
        self.rectifiable = tuple(rectifiable)
        self.erase_mode = erase
        self.description = description or f"{model._meta.verbose_name_plural} about the subject"
        self.retention_basis = retention_basis
        self.max_lengths = dict(max_lengths or {})
        for field in self.rectifiable:
            model_field = model._meta.get_field(field)
            if getattr(model_field, "max_length", None):
                self.max_lengths.setdefault(field, model_field.max_length)

    def rows(self, subject_id: str) -> models.QuerySet:
        return self.model._default_manager.filter(**{self.subject_field: subject_id})

    def find(self, subject_id: str) -> int:
        return self.rows(subject_id).count()

    def export(self, subject_id: str) -> Iterator[dict]:
        query = self.rows(subject_id).order_by("pk").values(*self.fields)
        for row in query.iterator(chunk_size=_CHUNK):
            yield json_safe(row)

    def clean_value(self, field: str, value: Any) -> Any:
        value = super().clean_value(field, value)
        limit = self.max_lengths.get(field)
        if limit and len(value) > limit:
            raise ValueError(f"{self.name}.{field}: at most {limit} characters")
        return value

    def apply_corrections(self, subject_id: str, corrections: dict[str, Any]) -> int:
        return self.rows(subject_id).update(**corrections)

    def erase(self, subject_id: str) -> dict:
        rows = self.rows(subject_id)
        if self.erase_mode == "retain":
            return {"retained": rows.count()}
        if self.erase_mode == "delete":
            _, per_model = rows.delete()
            return {"deleted": per_model.get(self.model._meta.label, 0)}
        changes = {
            field: value(subject_id) if callable(value) else value
            for field, value in dict(self.erase_mode).items()
        }
        return {"anonymised": rows.update(**changes)}


# --- Bridge's own sources -------------------------------------------------------------------


class UserSource(Source):
    """Bridge's user accounts: the subject id is the username, exactly.

    Never the email: emails are not unique, and a subject id that is an email is usually a
    customer's, so matching it would export, rectify or anonymise whichever account happens
    to carry that address (an administrator whose address a customer shares), while the
    subject's keys and consent, keyed by the subject id, would not be the account's.
    """

    name = "users"
    description = "Bridge user accounts (profile; never the password hash)"
    rectifiable = ("first_name", "last_name", "email")

    def _users(self, subject_id: str) -> models.QuerySet:
        from security.models import User

        return User.objects.filter(username=subject_id)

    def find(self, subject_id: str) -> int:
        return self._users(subject_id).count()

    def export(self, subject_id: str) -> Iterator[dict]:
        for user in self._users(subject_id).order_by("pk").prefetch_related("groups"):
            yield json_safe(
                {
                    "id": user.pk,
                    "username": user.username,
                    "first_name": user.first_name,
                    "last_name": user.last_name,
                    "email": user.email,
                    "is_active": user.is_active,
                    "is_staff": user.is_staff,
                    "is_superuser": user.is_superuser,
                    "roles": sorted(group.name for group in user.groups.all()),
                    "date_joined": user.date_joined,
                    "last_login": user.last_login,
                }
            )

    def clean_value(self, field: str, value: Any) -> Any:
        value = super().clean_value(field, value).strip()
        limit = 254 if field == "email" else 150
        if len(value) > limit:
            raise ValueError(f"{self.name}.{field}: at most {limit} characters")
        if field == "email" and value:
            try:
                validate_email(value)
            except ValidationError:
                raise ValueError(f"{self.name}.email: not a valid email address") from None
        return value

    def apply_corrections(self, subject_id: str, corrections: dict[str, Any]) -> int:
        changed = 0
        with transaction.atomic():
            for user in self._users(subject_id).select_for_update():
                for field, value in corrections.items():
                    setattr(user, field, value)
                # save(), not update(): signals see an ordinary change of the account.
                user.save(update_fields=list(corrections))
                changed += 1
        return changed

    def erase(self, subject_id: str) -> dict:
        """Anonymise rather than delete: jobs, approvals and requests keep their foreign keys,
        and the account can never sign in again."""
        from security.choices import FamilyRevocation
        from security.models import TokenFamily

        anonymised = sessions = 0
        with transaction.atomic():
            for user in self._users(subject_id).select_for_update():
                user.username = f"erased-{secrets.token_hex(6)}"
                user.first_name = user.last_name = user.email = ""
                user.set_unusable_password()
                user.is_active = user.is_staff = user.is_superuser = False
                # Access tokens already issued stop working at once.
                user.token_version += 1
                user.save()
                user.groups.clear()
                user.user_permissions.clear()
                families = TokenFamily.objects.filter(user=user)
                sessions += families.filter(revoked_at__isnull=True).update(
                    revoked_at=timezone.now(), revoked_reason=FamilyRevocation.ADMIN
                )
                families.update(client_ip=None)
                anonymised += 1
        return {"anonymised": anonymised, "sessions_revoked": sessions}


def _consent_source() -> ModelSource:
    from compliance.models import ConsentEvent

    return ModelSource(
        name="consent_events",
        model=ConsentEvent,
        subject_field="subject_id",
        fields=(
            "id",
            "subject_id",
            "purpose",
            "granted",
            "notice_version",
            "notice_sha256",
            "method",
            "channel",
            "client_ip",
            "request_id",
            "occurred_at",
        ),
        # The events stay (what was consented to, when, against which notice: totals and
        # the notice history still add up) but no longer name the subject or their address.
        erase={"subject_id": pseudonym, "client_ip": None},
        description="Consent given and withdrawn, per purpose",
    )


class DsrRecordSource(Source):
    """The data-subject requests about the subject: exported, kept (accountability)."""

    name = "data_subject_requests"
    description = "Data subject requests made about the subject"
    retention_basis = BASIS_RECORDS

    def _rows(self, subject_id: str) -> models.QuerySet:
        from compliance.models import DataSubjectRequest

        return DataSubjectRequest.objects.filter(subject_id=subject_id)

    def find(self, subject_id: str) -> int:
        return self._rows(subject_id).count()

    def export(self, subject_id: str) -> Iterator[dict]:
        fields = (
            "id",
            "subject_id",
            "type",
            "status",
            "details",
            "received_at",
            "due_date",
            "verified_at",
            "verification_method",
            "extended_at",
            "extension_reason",
            "completed_at",
            "rejected_reason",
        )
        for row in self._rows(subject_id).order_by("received_at").values(*fields):
            yield json_safe(row)

    def erase(self, subject_id: str) -> dict:
        """Keep the requests (accountability) but not what their details say: free notes and
        a rectification's corrected values are the subject's data (a new email, a name).
        The keys stay, so what was asked remains visible."""
        from compliance.models import DataSubjectRequest

        rows = list(self._rows(subject_id).values_list("pk", "details"))
        anonymised = 0
        for pk, details in rows:
            scrubbed = _scrub(details)
            if scrubbed != details:
                DataSubjectRequest.objects.filter(pk=pk).update(details=scrubbed)
                anonymised += 1
        return {"retained": len(rows), "anonymised": anonymised}


ERASED_VALUE = "[erased]"


def _scrub(value: Any) -> Any:
    """`value` with every text or number replaced by ERASED_VALUE (keys, booleans and nulls
    kept): idempotent, so an erasure applied again changes nothing more."""
    if isinstance(value, dict):
        return {key: _scrub(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrub(item) for item in value]
    if value is None or isinstance(value, bool) or value == "":
        return value
    return ERASED_VALUE


class AuditActorSource(Source):
    """Audit events where the subject is the actor, read through compliance.personal.reveal.

    Version-2 events hold the personal data sealed under the subject's key, which the erasure
    destroys (the subject_keys source): they become unreadable while the chain still verifies.
    Version-1 events keep it in hashed columns that cannot change: retained, and counted.
    """

    name = "audit_events"
    description = "Audit events recording what the subject did (as the actor)"
    retention_basis = BASIS_AUDIT

    def _rows(self, subject_id: str) -> models.QuerySet:
        from compliance import personal
        from compliance.models import AuditEvent

        # Version-1 events by the plain column, version-2 ones by the actor's blind index
        # (computable only while the subject's key lives).
        return AuditEvent.objects.filter(personal.actor_match(subject_id))

    def find(self, subject_id: str) -> int:
        return self._rows(subject_id).count()

    def export(self, subject_id: str) -> Iterator[dict]:
        from compliance import personal

        query = (
            self._rows(subject_id)
            .order_by("id")
            .values_list(
                "id",
                "occurred_at",
                "action",
                "object_type",
                "object_id",
                "method",
                "path",
                "status_code",
                "actor_username",
                "client_ip",
                "personal",
                "actor_index",
                "details",
            )
        )
        # One Revealer for the whole export: each subject key is unwrapped once.
        revealer = personal.Revealer()
        for (
            event_id,
            occurred_at,
            action,
            object_type,
            object_id,
            method,
            path,
            status_code,
            actor,
            ip,
            sealed,
            actor_index,
            details,
        ) in query.iterator(chunk_size=_CHUNK):
            shown = revealer.reveal(
                actor_username=actor,
                client_ip=ip,
                personal=sealed,
                details=details,
                actor_index=actor_index,
                event_id=event_id,
            )
            # Built JSON-safe by hand: this runs once per event of a busy subject.
            yield {
                "id": event_id,
                "occurred_at": occurred_at.astimezone(UTC).isoformat(),
                "action": action,
                "object_type": object_type,
                "object_id": object_id,
                "method": method,
                "path": path,
                "status_code": status_code,
                "actor": shown.actor_username,
                "client_ip": shown.client_ip,
                "details": shown.details,
                "erased": shown.erased,
            }

    def erase(self, subject_id: str) -> dict:
        rows = self._rows(subject_id)
        sealed = rows.exclude(personal="").count()
        return {"retained": rows.filter(personal="").count(), "sealed_unreadable": sealed}


class SubjectKeySource(Source):
    """The subject's data keys (security.SubjectKey): ids, purposes and dates, never the key
    material. Erasing destroys them (crypto-shredding): every record encrypted for the subject,
    in backups too, is unreadable from then on."""

    name = SUBJECT_KEYS
    description = "Encryption keys of records kept for the subject (ids and dates only)"

    def _rows(self, subject_id: str) -> models.QuerySet:
        from security.models import SubjectKey

        return SubjectKey.objects.filter(subject_id=subject_id)

    def find(self, subject_id: str) -> int:
        return self._rows(subject_id).count()

    def export(self, subject_id: str) -> Iterator[dict]:
        fields = ("key_id", "purpose", "version", "created_at", "destroyed_at")
        for row in self._rows(subject_id).order_by("created_at", "version").values(*fields):
            yield json_safe(row)

    def erase(self, subject_id: str) -> dict:
        from compliance import personal
        from security import crypto

        destroyed = crypto.shred_subject_key(subject_id=subject_id)
        # This process's sealing cache forgets the key at once; others within 60 s (their
        # events sealed meanwhile are as unreadable as the rest: the key exists nowhere else).
        transaction.on_commit(lambda: personal.forget_keys(subject_id), robust=True)
        return {"keys_destroyed": destroyed}


class SoxChangeSource(Source):
    """SOX change records: those the subject made (without the rows' contents, which are other
    people's data) and those of the subject's own user row (with before and after)."""

    name = "sox_changes"
    description = "SOX change records the subject made, or of the subject's own account"
    retention_basis = BASIS_SOX

    def _own_row(self, subject_id: str) -> Q:
        from security.models import User

        return Q(table_name=User._meta.db_table) & (
            Q(before__username=subject_id) | Q(after__username=subject_id)
        )

    def _rows(self, subject_id: str) -> models.QuerySet:
        from compliance.models import SoxChange

        return SoxChange.objects.filter(Q(actor_username=subject_id) | self._own_row(subject_id))

    def find(self, subject_id: str) -> int:
        return self._rows(subject_id).count()

    def export(self, subject_id: str) -> Iterator[dict]:
        from compliance.models import SoxChange

        own = set(SoxChange.objects.filter(self._own_row(subject_id)).values_list("id", flat=True))
        fields = (
            "id",
            "occurred_at",
            "table_name",
            "object_pk",
            "operation",
            "changed_fields",
            "actor_username",
            "request_id",
            "reason",
            "before",
            "after",
        )
        query = self._rows(subject_id).order_by("id").values(*fields)
        for row in query.iterator(chunk_size=_CHUNK):
            mine = row["id"] in own
            if not mine:
                row["before"] = row["after"] = None
            row["role"] = "subject" if mine else "actor"
            yield json_safe(row)

    def erase(self, subject_id: str) -> dict:
        return {"retained": self.find(subject_id)}


def _builtin_sources() -> list[PersonalDataSource]:
    return [
        UserSource(),
        _consent_source(),
        DsrRecordSource(),
        AuditActorSource(),
        SoxChangeSource(),
        SubjectKeySource(),
    ]


# --- The registry ---------------------------------------------------------------------------

_registry: dict[str, PersonalDataSource] = {}
_lock = threading.RLock()
_loaded = False


def _ensure_builtins() -> None:
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        builtins = _builtin_sources()
        # Built-ins first, then whatever registered before the first read.
        others = dict(_registry)
        _registry.clear()
        for source in builtins:
            _registry[source.name] = source
        _registry.update(others)
        _loaded = True


def _check_source(source: Any) -> None:
    name = getattr(source, "name", None)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise TypeError(
            f"a personal-data source needs a name of lower-case letters, digits and _, not {name!r}"
        )
    missing = [
        method
        for method in ("find", "export", "rectify", "erase")
        if not callable(getattr(source, method, None))
    ]
    if missing:
        raise TypeError(f"personal-data source {name!r} has no {', '.join(missing)}")


def register_source(source: PersonalDataSource, *, replace: bool = False) -> PersonalDataSource:
    """Add a source to the registry (another app's: from its AppConfig.ready()).

    A second source of the same name is refused unless `replace`.
    """
    _check_source(source)
    _ensure_builtins()
    with _lock:
        if source.name in _registry and not replace:
            raise ValueError(f"a personal-data source named {source.name!r} is registered")
        _registry[source.name] = source
    return source


def unregister_source(name: str) -> None:
    """Remove a source (tests; an app that stops keeping the data)."""
    _ensure_builtins()
    with _lock:
        _registry.pop(name, None)


def sources() -> list[PersonalDataSource]:
    """Every registered source, built-ins first, in registration order."""
    _ensure_builtins()
    with _lock:
        return list(_registry.values())


def get_source(name: str) -> PersonalDataSource:
    """The source called `name`, or KeyError."""
    _ensure_builtins()
    with _lock:
        return _registry[name]


def erase_order() -> list[PersonalDataSource]:
    """Sources in the order an erasure runs them: the subject's keys last, so every other
    source can still read (and so find) what those keys protect while it erases."""
    every = sources()
    return [s for s in every if s.name != SUBJECT_KEYS] + [
        s for s in every if s.name == SUBJECT_KEYS
    ]


def check_corrections(corrections: Any) -> dict[str, dict[str, Any]]:
    """Rectification corrections `{source: {field: value}}`, cleaned; ValueError naming the
    source or field at fault."""
    if not isinstance(corrections, dict) or not corrections:
        raise ValueError('corrections must be a non-empty object {"<source>": {"<field>": value}}')
    cleaned: dict[str, dict[str, Any]] = {}
    for name, fields in corrections.items():
        try:
            source = get_source(name)
        except KeyError:
            known = ", ".join(s.name for s in sources())
            raise ValueError(f"{name}: no such personal-data source (sources: {known})") from None
        checker: Callable[[Any], dict] | None = getattr(source, "check_corrections", None)
        if callable(checker):
            cleaned[name] = checker(fields)
        elif isinstance(fields, dict) and fields:
            cleaned[name] = dict(fields)
        else:
            raise ValueError(f"{name}: corrections must be a non-empty object of fields")
    return cleaned
