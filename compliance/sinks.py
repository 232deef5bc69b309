"""Checkpoint sinks: where signed checkpoints are kept, outside the database.

The default is an append-only directory of JSON lines, one file per day (AUDIT_CHECKPOINT_DIR);
any django-storages target can be added (AUDIT_CHECKPOINT_STORAGES), one object per checkpoint,
since object stores cannot append. A checkpoint counts once every sink holds it. Rotation
records (`key_rotation`) are kept beside the checkpoints, so an auditor holding only a sink
and one public key can follow every rotation.

Reading gives each sink's copies sorted by checkpoint number, one day at a time, so a
verification over years of checkpoints holds one day of them in memory.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import Storage, storages

from compliance.proof import CheckpointCopy, canonical_json

_DAY_FILE = re.compile(r"^checkpoints-(\d{4}-\d{2}-\d{2})\.jsonl$")
KEYS_FILE = "keys.jsonl"


class SinkError(Exception):
    """A sink could not take or give back checkpoints; the message names the sink."""


class CheckpointSink(Protocol):
    name: str

    def append(self, record: dict[str, Any]) -> None: ...

    def ensure_rotations(self, records: list[dict[str, Any]]) -> None: ...

    def copies(self) -> Iterator[CheckpointCopy]: ...

    def rotations(self) -> list[dict[str, Any]]: ...

    def newest(self, accept: Callable[[dict], bool]) -> dict[str, Any] | None: ...

    @property
    def problems(self) -> list[str]: ...


def _line(record: dict[str, Any]) -> bytes:
    return (canonical_json(record) + "\n").encode("utf-8")


def _parse(text: str, where: str, problems: list[str]) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "type" not in record:
            problems.append(f"{where} line {number} is not a checkpoint record")
            continue
        records.append(record)
    return records


def _sorted_copies(
    records: list[dict[str, Any]], source: str, where: str, problems: list[str]
) -> list[CheckpointCopy]:
    copies = []
    for record in records:
        if record.get("type") != "checkpoint":
            continue
        number = record.get("number")
        if not isinstance(number, int):
            problems.append(f"{where} holds a checkpoint without a number")
            continue
        copies.append(CheckpointCopy(number, record, source))
    return sorted(copies, key=lambda copy: copy.number)


class DirectorySink:
    """JSON lines in `checkpoints-YYYY-MM-DD.jsonl` (the checkpoint's UTC day), each written
    with one O_APPEND write and fsynced, the directory fsynced when a file is created. Give it
    its own disk or host and, where the filesystem allows, `chattr +a` on its files."""

    name = "directory"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._problems: list[str] = []

    @property
    def problems(self) -> list[str]:
        return self._problems

    def _append(self, filename: str, data: bytes) -> None:
        try:
            self._ensure_directory()
            target = self.path / filename
            created = not target.exists()
            fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                if not created and _ends_without_newline(target):
                    # A write cut short by a crash: end that line, so this one stays whole.
                    data = b"\n" + data
                if os.write(fd, data) != len(data):
                    raise OSError("short write")
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                _fsync_dir(self.path)
        except OSError as exc:
            raise SinkError(f"sink {self.name} ({self.path}): {exc.strerror or exc}") from exc

    def _ensure_directory(self) -> None:
        if self.path.is_dir():
            return
        if settings.PRODUCTION:
            # A missing mount must not read as an empty sink and then be replaced by a fresh
            # one: in production the directory is made by the operator, on its own storage.
            raise SinkError(f"sink {self.name}: {self.path} does not exist (create it)")
        self.path.mkdir(mode=0o750, parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        day = str(record["time"])[:10]
        self._append(f"checkpoints-{day}.jsonl", _line(record))

    def newest(self, accept: Callable[[dict], bool]) -> dict[str, Any] | None:
        """The highest-numbered accepted checkpoint, reading day files from the newest back."""
        for name in reversed(self._day_files()):
            where = f"sink {self.name} {name}"
            text = (self.path / name).read_text("utf-8")
            copies = _sorted_copies(_parse(text, where, []), self.name, where, [])
            for copy in reversed(copies):
                if accept(copy.record):
                    return copy.record
        return None

    def _day_files(self) -> list[str]:
        try:
            return sorted(name for name in os.listdir(self.path) if _DAY_FILE.match(name))
        except FileNotFoundError:
            if settings.PRODUCTION:
                raise SinkError(f"sink {self.name}: {self.path} does not exist") from None
            return []
        except OSError as exc:
            raise SinkError(f"sink {self.name} ({self.path}): {exc.strerror}") from exc

    def rotations(self) -> list[dict[str, Any]]:
        keys = self.path / KEYS_FILE
        if not keys.exists():
            return []
        where = f"sink {self.name} {KEYS_FILE}"
        records = _parse(keys.read_text("utf-8"), where, self._problems)
        return [record for record in records if record.get("type") == "key_rotation"]

    def ensure_rotations(self, records: list[dict[str, Any]]) -> None:
        have = {canonical_json(record) for record in self.rotations()}
        for record in records:
            if canonical_json(record) not in have:
                self._append(KEYS_FILE, _line(record))

    def copies(self) -> Iterator[CheckpointCopy]:
        for name in self._day_files():
            where = f"sink {self.name} {name}"
            text = (self.path / name).read_text("utf-8")
            yield from _sorted_copies(
                _parse(text, where, self._problems), self.name, where, self._problems
            )


def _ends_without_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return False
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) != b"\n"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StorageSink:
    """A django-storages target: `checkpoints/YYYY-MM-DD/<number>.json` per checkpoint and
    `keys/<new key id>.json` per rotation. An object that exists is never overwritten; one that
    differs from what would be written is an error."""

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.name = f"storage:{alias.removeprefix('audit_checkpoints_')}"
        self._problems: list[str] = []

    @property
    def problems(self) -> list[str]:
        return self._problems

    @property
    def storage(self) -> Storage:
        return storages[self.alias]

    def _put(self, name: str, data: bytes) -> None:
        try:
            storage = self.storage
            if storage.exists(name):
                with storage.open(name, "rb") as handle:
                    if handle.read() == data:
                        return
                raise SinkError(f"sink {self.name}: {name} exists with other content")
            saved = storage.save(name, ContentFile(data))
            if saved != name:
                raise SinkError(f"sink {self.name}: {name} was stored as {saved}")
        except SinkError:
            raise
        except Exception as exc:  # any backend's error: boto, paramiko, OSError...
            raise SinkError(f"sink {self.name}: {type(exc).__name__}: {exc}") from exc

    def append(self, record: dict[str, Any]) -> None:
        day = str(record["time"])[:10]
        self._put(f"checkpoints/{day}/{int(record['number']):012d}.json", _line(record))

    def ensure_rotations(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self._put(f"keys/{record['new_key_id'].replace(':', '-')}.json", _line(record))

    def _read(self, name: str) -> list[dict[str, Any]]:
        with self.storage.open(name, "rb") as handle:
            return _parse(handle.read().decode("utf-8"), f"sink {self.name} {name}", self._problems)

    def rotations(self) -> list[dict[str, Any]]:
        try:
            _, files = self.storage.listdir("keys")
        except FileNotFoundError:
            return []
        return [record for name in sorted(files) for record in self._read(f"keys/{name}")]

    def newest(self, accept: Callable[[dict], bool]) -> dict[str, Any] | None:
        try:
            days, _ = self.storage.listdir("checkpoints")
        except FileNotFoundError:
            return None
        for day in sorted(days, reverse=True):
            _, files = self.storage.listdir(f"checkpoints/{day}")
            for name in sorted(files, reverse=True):
                for record in self._read(f"checkpoints/{day}/{name}"):
                    if record.get("type") == "checkpoint" and accept(record):
                        return record
        return None

    def copies(self) -> Iterator[CheckpointCopy]:
        try:
            days, _ = self.storage.listdir("checkpoints")
        except FileNotFoundError:
            return
        for day in sorted(days):
            _, files = self.storage.listdir(f"checkpoints/{day}")
            records = [r for name in sorted(files) for r in self._read(f"checkpoints/{day}/{name}")]
            where = f"sink {self.name} checkpoints/{day}"
            yield from _sorted_copies(records, self.name, where, self._problems)


def configured_sinks() -> list[CheckpointSink]:
    """The directory sink, then every storage sink, in a stable order."""
    sinks: list[CheckpointSink] = [DirectorySink(settings.AUDIT_CHECKPOINT_DIR)]
    for name in sorted(settings.AUDIT_CHECKPOINT_STORAGES):
        sinks.append(StorageSink(f"audit_checkpoints_{name}"))
    return sinks
