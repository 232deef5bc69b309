"""The `config` component: the files of BACKUP_CONFIG_PATHS and the effective settings.

The artifact is a tar stream (see uploads.TarWriter): `files/<absolute path>` per configured
file (content, mode, mtime), `settings.json` (every upper-case setting, secrets left out), then
`index.json`, the manifest, so the artifact explains itself without the catalog.

Files are kept verbatim: they are what a rebuilt host needs, and the artifact is encrypted.
When one holds the value of a secret setting (an env file with SECRET_KEY), the manifest says
so in `warnings` (by setting name, never the value): such a backup is then only as safe as the
master key, which must be kept apart from it.

The settings document is informational, never applied by a restore. Three nets keep secrets
out of it: settings (and nested keys) whose name contains KEY, SECRET, PASSWORD or TOKEN are
dropped; compliance.redaction.redact masks what remains (passwords in URLs, secret-looking
keys and assignments); then the values of the known secrets (SECRET_KEY, the master keys,
database and broker passwords, anything under a secret-named setting) are searched for and
replaced, and the document is refused if one still shows.

Restore (live): every file is staged next to its destination (following a symlink at the
destination) and checked against the manifest's SHA-256 before any file is replaced; then each
staged file gets its mode and mtime and is renamed over the destination. A failure before the
renames removes the staged files (and directories this restore created): nothing changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tarfile
import uuid
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from django.conf import settings

from backups.components import (
    ComponentError,
    ComponentHandler,
    Destination,
    OnBytes,
    Opener,
    RestoreRefused,
    Unit,
    register,
)
from backups.components.uploads import (
    TarWriter,
    copy_member,
    fsync_dir,
    open_new,
    read_index,
    read_member,
    safe_relpath,
    tar_members,
)
from compliance.redaction import REDACTED, redact

FORMAT = "bridge-config/1"
FILES = "files/"
SETTINGS = "settings.json"
INDEX = "index.json"
# Configuration files are small; a larger one is most likely a mistake in BACKUP_CONFIG_PATHS.
MAX_FILE = 64 * 1024 * 1024
SECRET_NAME_PARTS = ("KEY", "SECRET", "PASSWORD", "TOKEN")
# Shorter values are not searched for: "pw" would blank every word that contains it.
MIN_SECRET_LENGTH = 4
MODE_MASK = 0o7777
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def _secret_name(name: Any) -> bool:
    upper = str(name).upper()
    return any(part in upper for part in SECRET_NAME_PARTS)


def _without_secret_names(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: _without_secret_names(item) for key, item in value.items() if not _secret_name(key)
        }
    if isinstance(value, list | tuple):
        return [_without_secret_names(item) for item in value]
    return value


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, bytes):
        return [value.decode("utf-8", "replace")]
    if isinstance(value, dict):
        return [text for item in value.values() for text in _strings(item)]
    if isinstance(value, list | tuple | set | frozenset):
        return [text for item in value for text in _strings(item)]
    return []


# The secrets a configuration file may legitimately hold, named in `warnings` when one does.
NAMED_SECRETS = (
    "SECRET_KEY",
    "SECRET_KEY_FALLBACKS",
    "BRIDGE_MASTER_KEY",
    "BRIDGE_MASTER_KEY_PREVIOUS",
    "EMAIL_HOST_PASSWORD",
)


def secret_values(*, named_only: bool = False) -> dict[str, str]:
    """The secret values the settings hold, by where they come from (never logged).

    All of them: every string under a setting or key whose name contains KEY, SECRET,
    PASSWORD or TOKEN, and every password in a URL. named_only: the master and signing keys,
    database passwords and passwords in URLs, not the likes of PASSWORD_HASHERS' class paths.
    """
    found: dict[str, str] = {}

    def add(where: str, value: Any) -> None:
        for index, text in enumerate(_strings(value)):
            # A dotted import path (PASSWORD_HASHERS' classes) is configuration, not a secret.
            if len(text) >= MIN_SECRET_LENGTH and not _IMPORT_PATH.fullmatch(text):
                found.setdefault(text, f"{where}[{index}]" if index else where)

    def collect(where: str, value: Any, secret: bool) -> None:
        if secret:
            add(where, value)
            return
        if isinstance(value, dict):
            for key, item in value.items():
                collect(f"{where}.{key}", item, _secret_name(key))
        elif isinstance(value, list | tuple):
            for item in value:
                collect(where, item, False)
        elif isinstance(value, str) and "://" in value:
            with contextlib.suppress(ValueError):
                password = urlsplit(value).password
                if password:
                    add(f"password in {where}", password)

    for name in dir(settings):
        if not name.isupper():
            continue
        value = getattr(settings, name, None)
        if not named_only:
            collect(name, value, _secret_name(name))
        elif name in NAMED_SECRETS:
            add(name, value)
        else:
            collect(name, value, False)  # URLs' passwords
    if named_only:
        for alias, database in settings.DATABASES.items():
            add(f"DATABASES.{alias}.PASSWORD", database.get("PASSWORD"))
        add("SIMPLE_JWT.SIGNING_KEY", getattr(settings, "SIMPLE_JWT", {}).get("SIGNING_KEY"))
        found = {
            value: where
            for value, where in found.items()
            if where.split("[")[0] in NAMED_SECRETS
            or where.startswith("password in ")
            or (where.startswith("DATABASES.") and where.endswith(".PASSWORD"))
            or where == "SIMPLE_JWT.SIGNING_KEY"
        }
    return {where: value for value, where in found.items()}


def _scrub(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        value = str(value)  # a lazy str subclass (a translation, a proxy) is not JSON's str
        for secret in secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {_scrub(key, secrets): _scrub(item, secrets) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrub(item, secrets) for item in value]
    return value


def effective_settings() -> bytes:
    """The effective settings as JSON, secrets left out (see the module docstring)."""
    values = {
        name: _without_secret_names(getattr(settings, name))
        for name in sorted(dir(settings))
        if name.isupper() and not _secret_name(name)
    }
    secrets = sorted(secret_values().values(), key=len, reverse=True)
    document = json.dumps(_scrub(redact(values), secrets), sort_keys=True, indent=1).encode()
    for secret in secrets:
        if secret.encode() in document or json.dumps(secret)[1:-1].encode() in document:
            raise ComponentError(
                "config: a secret survived redaction; the settings were not written",
                "secret_leak",
            )
    return document


def configured_paths() -> list[Path]:
    """BACKUP_CONFIG_PATHS as absolute paths (relative ones are under BASE_DIR), in order."""
    paths: list[Path] = []
    for item in settings.BACKUP_CONFIG_PATHS:
        path = Path(str(item)).expanduser()
        if not path.is_absolute():
            path = Path(settings.BASE_DIR) / path
        path = Path(os.path.normpath(path))
        if path not in paths:
            paths.append(path)
    return paths


class ConfigHandler(ComponentHandler):
    """The configuration files and the effective settings (see the module docstring)."""

    component = "config"

    def units(self) -> list[Unit] | str:
        return [Unit(component=self.component, name="config")]

    def backup(
        self, unit: Unit, out: BinaryIO, *, parent: dict[str, Any] | None, on_bytes: OnBytes
    ) -> dict[str, Any]:
        paths = configured_paths()
        missing = [str(path) for path in paths if not path.exists()]
        if missing:
            raise ComponentError(
                f"config: listed in BACKUP_CONFIG_PATHS but missing: {', '.join(missing)}",
                "config_file_missing",
            )
        document = effective_settings()
        secrets = secret_values(named_only=True)
        writer = TarWriter(out)
        files: list[dict[str, Any]] = []
        warnings: list[str] = []
        for path in paths:
            try:
                with open(path, "rb") as handle:
                    info = os.fstat(handle.fileno())
                    if not stat.S_ISREG(info.st_mode):
                        raise ComponentError(
                            f"config: {path} (BACKUP_CONFIG_PATHS) is not a regular file",
                            "config_file_invalid",
                        )
                    if info.st_size > MAX_FILE:
                        raise ComponentError(
                            f"config: {path} is larger than {MAX_FILE} bytes", "config_file_invalid"
                        )
                    data = handle.read(MAX_FILE + 1)
            except OSError as exc:
                raise ComponentError(
                    f"config: cannot read {path}: {exc.strerror}", "config_file_unreadable"
                ) from exc
            mode = stat.S_IMODE(info.st_mode) & MODE_MASK
            sha = writer.add_bytes(FILES + str(path).lstrip("/"), data, mode=mode)
            on_bytes(len(data))
            files.append(
                {
                    "path": str(path),
                    "sha256": sha,
                    "size": len(data),
                    "mode": mode,
                    "mtime_ns": info.st_mtime_ns,
                }
            )
            held = sorted(where for where, value in secrets.items() if value.encode() in data)
            if held:
                warnings.append(
                    f"{path} holds the value of {', '.join(held)} (kept as is, encrypted)"
                )
        writer.add_bytes(SETTINGS, document)
        manifest = {
            "format": FORMAT,
            "incremental": False,
            "files": files,
            "settings_sha256": hashlib.sha256(document).hexdigest(),
            "settings_bytes": len(document),
            "warnings": warnings,
        }
        writer.add_bytes(INDEX, json.dumps(manifest, sort_keys=True).encode())
        writer.close()
        return manifest

    def preflight(self, unit: Unit, manifest: dict[str, Any], *, destination: Destination) -> None:
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), list):
            raise RestoreRefused("config: the manifest is not one this version restores")
        for entry in manifest["files"]:
            path = str(entry.get("path", "")) if isinstance(entry, dict) else ""
            if (
                not path.startswith("/")
                or not safe_relpath(path.lstrip("/"))
                or os.path.normpath(path) != path
            ):
                raise RestoreRefused(f"config: refused path in the manifest: {path!r}")
        if not destination.live and destination.scratch_dir is None:
            raise RestoreRefused("config: a scratch restore needs a scratch directory")

    def restore(
        self,
        unit: Unit,
        manifests: list[dict[str, Any]],
        chain: list[Opener],
        *,
        destination: Destination,
        on_bytes: OnBytes,
    ) -> dict[str, Any]:
        # Every config artifact is self-contained: of a chain only the newest one counts.
        manifest = manifests[-1]
        self.preflight(unit, manifest, destination=destination)
        staged: dict[str, tuple[Path, Path]] = {}  # path -> (staged file, destination)
        created: list[Path] = []
        try:
            document = self._stage(manifest, chain[-1], destination, staged, created, on_bytes)
            if not destination.live:
                settings_copy = self._scratch(destination) / SETTINGS
                settings_copy.parent.mkdir(parents=True, exist_ok=True)
                settings_copy.write_bytes(document)
            entries = {entry["path"]: entry for entry in manifest["files"]}
            for path, (temp, _target) in staged.items():
                os.chmod(temp, entries[path]["mode"])
                mtime = entries[path]["mtime_ns"]
                os.utime(temp, ns=(mtime, mtime))
        except BaseException:
            for temp, _target in staged.values():
                with contextlib.suppress(OSError):
                    temp.unlink()
            for directory in reversed(created):
                with contextlib.suppress(OSError):
                    directory.rmdir()
            raise
        # Everything is staged and verified: only now is anything replaced.
        replaced: list[str] = []
        try:
            for path, (temp, target) in staged.items():
                os.replace(temp, target)
                fsync_dir(target.parent)
                replaced.append(path)
        except OSError as exc:
            # Renames within one directory hardly fail; if one does, say exactly what changed.
            for temp, _target in staged.values():
                with contextlib.suppress(OSError):
                    temp.unlink()
            raise ComponentError(
                f"config: replacing {exc.filename} failed ({exc.strerror}); already replaced: "
                f"{replaced or 'none'}"
            ) from exc
        return {
            "files": [str(target) for _temp, target in staged.values()],
            "settings": json.loads(document),
            "settings_applied": False,
            "warnings": manifest.get("warnings", []),
        }

    def _stage(
        self,
        manifest: dict[str, Any],
        opener: Opener,
        destination: Destination,
        staged: dict[str, tuple[Path, Path]],
        created: list[Path],
        on_bytes: OnBytes,
    ) -> bytes:
        """Each file of the artifact into a temporary file beside its destination, verified
        against the manifest; the settings document. `staged` and `created` say what was made,
        for the caller to remove on failure."""
        entries = {entry["path"]: entry for entry in manifest["files"]}
        document: bytes | None = None
        index: dict[str, Any] | None = None
        label = "config artifact"
        source = opener()
        try:
            for member, content in tar_members(source, label=label):
                if index is not None:
                    raise ComponentError(f"{label}: member {member.name!r} after the index")
                if member.isreg() and member.name == SETTINGS:
                    document = read_member(member, content, label=label, limit=MAX_FILE)
                    continue
                if member.isreg() and member.name == INDEX:
                    index = read_index(member, content, label=label)
                    continue
                path = self._member_path(member, label)
                entry = entries.get(path)
                if entry is None or path in staged:
                    raise ComponentError(
                        f"{label}: member {member.name!r} is not in the manifest", "member_refused"
                    )
                target = self._destination(path, destination)
                created.extend(_make_dirs(target.parent))
                temp = target.parent / f".{target.name}.bridge-restore-{uuid.uuid4().hex[:12]}"
                fd = open_new(temp)
                staged[path] = (temp, target)
                try:
                    sha = copy_member(member, content, fd, label=label, on_bytes=on_bytes)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if sha != entry["sha256"]:
                    raise ComponentError(
                        f"{label}: {path}: SHA-256 differs from the manifest's", "sha_mismatch"
                    )
        finally:
            with contextlib.suppress(Exception):
                source.close()
        if index is None or document is None:
            raise ComponentError(f"{label}: the stream ends early (truncated)")
        if index.get("files") != manifest["files"]:
            raise ComponentError(f"{label}: the artifact's index differs from the catalog's")
        if hashlib.sha256(document).hexdigest() != manifest.get("settings_sha256"):
            raise ComponentError(f"{label}: settings.json differs from the manifest's")
        if set(staged) != set(entries):
            missing = sorted(set(entries) - set(staged))
            raise ComponentError(f"{label}: files missing from the artifact: {missing}")
        return document

    @staticmethod
    def _member_path(member: tarfile.TarInfo, label: str) -> str:
        rel = member.name[len(FILES) :] if member.name.startswith(FILES) else ""
        if not member.isreg() or not safe_relpath(rel):
            raise ComponentError(f"{label}: refused tar member {member.name!r}", "member_refused")
        return "/" + rel

    @staticmethod
    def _scratch(destination: Destination) -> Path:
        assert destination.scratch_dir is not None  # preflight refused otherwise
        return Path(destination.scratch_dir) / "config"

    def _destination(self, path: str, destination: Destination) -> Path:
        if destination.live:
            # A symlinked configuration file (a mounted secret, a ConfigMap) is restored where
            # the link points, so the link itself survives.
            return Path(os.path.realpath(path))
        return self._scratch(destination) / "files" / path.lstrip("/")

    def check(
        self, unit: Unit, manifest: dict[str, Any], *, destination: Destination
    ) -> dict[str, Any]:
        root = self._scratch(destination)
        checks = []
        for entry in manifest.get("files", []):
            copy = root / "files" / entry["path"].lstrip("/")
            actual = hashlib.sha256(copy.read_bytes()).hexdigest() if copy.is_file() else None
            checks.append(
                {
                    "name": f"sha256 {entry['path']}",
                    "expected": entry["sha256"],
                    "actual": actual,
                    "ok": actual == entry["sha256"],
                }
            )
        document = root / SETTINGS
        actual = hashlib.sha256(document.read_bytes()).hexdigest() if document.is_file() else None
        checks.append(
            {
                "name": "sha256 settings.json",
                "expected": manifest.get("settings_sha256"),
                "actual": actual,
                "ok": actual == manifest.get("settings_sha256"),
            }
        )
        return {"ok": all(item["ok"] for item in checks), "checks": checks}

    def discard(self, unit: Unit, *, destination: Destination) -> None:
        if not destination.live and destination.scratch_dir is not None:
            shutil.rmtree(self._scratch(destination), ignore_errors=True)


def _make_dirs(directory: Path) -> list[Path]:
    """Make `directory` and its missing parents; the ones made, outermost first."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        path.mkdir()
    return list(reversed(missing))


register(ConfigHandler())
