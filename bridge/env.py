"""Small typed readers for the environment, so settings.py stays declarative.

Every reader takes the variable name and a default; `_FILE` variants let secrets come from a
mounted file (Docker/Kubernetes secrets) instead of the process environment.
"""

from __future__ import annotations

import json
import os
import re
from datetime import timedelta

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def env_str(name: str, default: str = "") -> str:
    """The variable's value, or the contents of the file named by NAME_FILE, or the default."""
    file_path = os.environ.get(f"{name}_FILE")
    if file_path:
        try:
            with open(file_path, encoding="utf-8") as handle:
                return handle.read().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE: cannot read {file_path}: {exc}") from exc
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}: expected true/false, got {raw!r}")


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}: expected an integer, got {raw!r}") from exc
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}: must be at least {minimum}, got {value}")
    return value


def parse_duration(raw: str) -> timedelta:
    """'15m', '1d', '30s', '500ms' or a bare number of seconds."""
    match = _DURATION.match(raw)
    if not match:
        raise ValueError(f"expected a duration like 15m, 1h, 1d or 30s, got {raw!r}")
    number, unit = int(match.group(1)), match.group(2) or "s"
    return timedelta(seconds=number * _UNIT_SECONDS[unit])


def env_duration(name: str, default: str) -> timedelta:
    raw = os.environ.get(name, default)
    try:
        value = parse_duration(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}: {exc}") from exc
    if value <= timedelta(0):
        raise ImproperlyConfigured(f"{name}: must be positive, got {raw!r}")
    return value


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def env_json(name: str, default: dict) -> dict:
    """A JSON object from the variable or from the file NAME_FILE names (it may hold secrets)."""
    raw = env_str(name)
    if not raw.strip():
        return dict(default)
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}: not valid JSON ({exc.args[0]})") from exc
    if not isinstance(value, dict):
        raise ImproperlyConfigured(f"{name}: expected a JSON object")
    return value
