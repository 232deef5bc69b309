"""What a backup is made of: one handler per Component, each producing and restoring units.

A unit is one stream of one component (Bridge's own database, one database of the stack, the
Redis snapshot, the configuration, the uploads); each unit becomes one artifact. Handlers know
nothing of compression, encryption, targets or jobs: they write plaintext to a binary stream
and read it back (backups/services.py wraps the streams in backups/stream.py and the targets).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO


class ComponentError(Exception):
    """A component could not be backed up or restored; the message says what and why."""

    def __init__(self, message: str, code: str = "component_failed") -> None:
        super().__init__(message)
        self.code = code


class RestoreRefused(ComponentError):
    """A restore that must not run (another engine, an older schema, live writers); nothing
    was changed."""

    def __init__(self, message: str, code: str = "restore_refused") -> None:
        super().__init__(message, code)


@dataclass(frozen=True)
class Unit:
    """One stream of a component: `name` is unique within a backup and names the artifact."""

    component: str
    name: str
    # Handler-specific: a database alias or URL, a Redis URL, paths...
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Destination:
    """Where a restore writes.

    live: the unit's own source (the live database, MEDIA_ROOT, the Redis database).
    Otherwise scratch: a drill or a rehearsal writes only under `scratch_dir` and into scratch
    databases or key prefixes named after `tag`, and cleans them up in `discard`.
    """

    live: bool
    scratch_dir: Path | None = None
    tag: str = ""


# Progress callback: called with the number of source bytes handled since the last call.
OnBytes = Callable[[int], None]
# A chain of artifacts to restore, oldest (the full) first: each call opens one for reading
# (plaintext, already decrypted and decompressed).
Opener = Callable[[], BinaryIO]


class ComponentHandler(ABC):
    component: str

    @abstractmethod
    def units(self) -> list[Unit] | str:
        """The units to back up now, or the reason the component is skipped (not configured)."""

    @abstractmethod
    def backup(
        self, unit: Unit, out: BinaryIO, *, parent: dict[str, Any] | None, on_bytes: OnBytes
    ) -> dict[str, Any]:
        """Write the unit's artifact to `out` (plaintext) and return its manifest entry.

        `parent` is the same unit's effective manifest in the parent backup (incrementals), or
        None for a full backup. The manifest must hold what a restore and a drill need to
        check: engine facts, row counts, per-file SHA-256...
        """

    @abstractmethod
    def restore(
        self,
        unit: Unit,
        manifests: list[dict[str, Any]],
        chain: list[Opener],
        *,
        destination: Destination,
        on_bytes: OnBytes,
    ) -> dict[str, Any]:
        """Restore the unit from its chain (full first), all or nothing, and say what was done.

        `manifests[i]` belongs to `chain[i]`. Raises RestoreRefused before changing anything
        when the restore must not run.
        """

    @abstractmethod
    def check(
        self, unit: Unit, manifest: dict[str, Any], *, destination: Destination
    ) -> dict[str, Any]:
        """After a scratch restore: compare what was restored with the manifest.

        Returns {"ok": bool, "checks": [{"name", "expected", "actual", "ok"}...]}.
        """

    def discard(self, unit: Unit, *, destination: Destination) -> None:  # noqa: B027
        """Remove a scratch restore's databases, keys or files (drills call it at the end)."""

    def preflight(self, unit: Unit, manifest: dict[str, Any], *, destination: Destination) -> None:  # noqa: B027
        """Raise RestoreRefused when restoring this unit to `destination` must not start."""


HANDLERS: dict[str, ComponentHandler] = {}


def register(handler: ComponentHandler) -> ComponentHandler:
    HANDLERS[handler.component] = handler
    return handler


def handler_for(component: str) -> ComponentHandler:
    if component not in HANDLERS:
        load_handlers()
    return HANDLERS[component]


def load_handlers() -> None:
    from backups.components import config, database, redis, uploads  # noqa: F401
