"""Settings refuse to start on unsafe or malformed configuration, naming the culprit."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from bridge.env import env_duration, parse_duration
from tests.conftest import ROOT

LOAD_SETTINGS = (
    "import django, os; os.environ['DJANGO_SETTINGS_MODULE'] = 'bridge.settings'; django.setup()"
)
GOOD_KEY = "k" * 40


def load_settings(var_dir: Path, **env: str) -> subprocess.CompletedProcess:
    """Import the settings in a fresh interpreter that sees only `env` (plus PATH and HOME)."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "BRIDGE_VAR_DIR": str(var_dir)}
    if "HOME" in os.environ:
        clean["HOME"] = os.environ["HOME"]
    clean.update(env)
    return subprocess.run(
        [sys.executable, "-c", LOAD_SETTINGS],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_production_without_a_secret_key_refuses_to_start(tmp_path):
    result = load_settings(tmp_path, DEBUG="false", ALLOWED_HOSTS="bridge.example.org")
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "SECRET_KEY" in result.stderr
    assert not (tmp_path / "dev_secret_key").exists()


def test_a_short_secret_key_is_refused(tmp_path):
    result = load_settings(tmp_path, SECRET_KEY="too-short")
    assert result.returncode != 0
    assert "SECRET_KEY must be at least 32 characters" in result.stderr


def test_production_with_empty_allowed_hosts_refuses_to_start(tmp_path):
    result = load_settings(tmp_path, DEBUG="false", SECRET_KEY=GOOD_KEY, ALLOWED_HOSTS="")
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "ALLOWED_HOSTS" in result.stderr


def test_production_with_a_secret_key_and_allowed_hosts_starts(tmp_path):
    result = load_settings(
        tmp_path, DEBUG="false", SECRET_KEY=GOOD_KEY, ALLOWED_HOSTS="bridge.example.org"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_bridge_env_production_switches_debug_off(tmp_path):
    result = load_settings(tmp_path, BRIDGE_ENV="production")
    assert result.returncode != 0
    assert "SECRET_KEY" in result.stderr


def test_development_creates_one_private_key_file_under_the_var_dir(tmp_path):
    # when started twice without SECRET_KEY in development
    first = load_settings(tmp_path)
    key = (tmp_path / "dev_secret_key").read_text()
    second = load_settings(tmp_path)
    # then both start, sharing one key readable only by the owner
    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    assert len(key) >= 32
    assert (tmp_path / "dev_secret_key").read_text() == key
    assert (tmp_path / "dev_secret_key").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"JWT_EXPIRATION": "banana"}, ["JWT_EXPIRATION", "banana"]),
        ({"JWT_EXPIRATION": "0s"}, ["JWT_EXPIRATION: must be positive"]),
        ({"TRUSTED_PROXIES": "10.0.0.0/8,not-a-cidr"}, ["TRUSTED_PROXIES", "not-a-cidr"]),
        ({"DEBUG": "maybe"}, ["DEBUG: expected true/false"]),
    ],
    ids=["malformed-duration", "zero-duration", "malformed-cidr", "malformed-boolean"],
)
def test_a_malformed_setting_refuses_to_start_naming_it(tmp_path, env, expected):
    result = load_settings(tmp_path, **env)
    assert result.returncode != 0
    for text in expected:
        assert text in result.stderr


def test_secret_key_can_come_from_a_mounted_file(tmp_path):
    # given
    secret = tmp_path / "secret_key"
    secret.write_text(GOOD_KEY + "\n")
    # when
    result = load_settings(
        tmp_path, DEBUG="false", SECRET_KEY_FILE=str(secret), ALLOWED_HOSTS="bridge.example.org"
    )
    # then
    assert result.returncode == 0, result.stderr


def test_an_unreadable_secret_key_file_refuses_to_start_naming_it(tmp_path):
    result = load_settings(tmp_path, SECRET_KEY_FILE=str(tmp_path / "missing"))
    assert result.returncode != 0
    assert "SECRET_KEY_FILE: cannot read" in result.stderr


# --- bridge.env.parse_duration ------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("15m", timedelta(seconds=900)),
        ("1d", timedelta(days=1)),
        ("2h", timedelta(hours=2)),
        ("30s", timedelta(seconds=30)),
        ("500ms", timedelta(milliseconds=500)),
        ("45", timedelta(seconds=45)),
        (" 10 m ", timedelta(minutes=10)),
    ],
)
def test_parse_duration_reads_a_number_and_a_unit(raw, expected):
    assert parse_duration(raw) == expected


@pytest.mark.parametrize("raw", ["banana", "", "m", "-5m", "1.5h", "15 minutes", "15M", "1w"])
def test_parse_duration_rejects_anything_else_with_value_error(raw):
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(raw)


def test_env_duration_names_the_variable_when_it_is_malformed(monkeypatch):
    monkeypatch.setenv("SOME_TIMEOUT", "soon")
    with pytest.raises(ImproperlyConfigured, match="SOME_TIMEOUT"):
        env_duration("SOME_TIMEOUT", "15m")


def test_env_duration_falls_back_to_its_default(monkeypatch):
    monkeypatch.delenv("SOME_TIMEOUT", raising=False)
    assert env_duration("SOME_TIMEOUT", "15m") == timedelta(minutes=15)
