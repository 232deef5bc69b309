"""Settings refuse to start on unsafe or malformed configuration, naming the culprit."""

from __future__ import annotations

import json
import os
import secrets
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


def load_settings(var_dir: Path, show: str = "", **env: str) -> subprocess.CompletedProcess:
    """Import the settings in a fresh interpreter that sees only `env` (plus PATH and HOME);
    with `show`, that setting is printed."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "BRIDGE_VAR_DIR": str(var_dir)}
    if "HOME" in os.environ:
        clean["HOME"] = os.environ["HOME"]
    clean.update(env)
    return subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_SETTINGS
            + (f"; from django.conf import settings; print(settings.{show})" if show else ""),
        ],
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


# --- make run, production hardening, timeouts ---------------------------------------------

SHOW_SETTINGS = LOAD_SETTINGS + (
    "; import json, sys; from django.conf import settings as s; "
    "print(json.dumps({n: getattr(s, n, None) for n in sys.argv[1:]}, default=str))"
)


def audit_key_file(var_dir: Path) -> str:
    """A signing key of the test's own: production refuses to start without one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = var_dir / "audit_signing_key.pem"
    if not path.exists():
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.write_bytes(pem)
        path.chmod(0o600)
    return str(path)


def settings_of(var_dir: Path, names: list[str], **env: str) -> dict:
    """The named settings as a fresh interpreter with only `env` computes them."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "BRIDGE_VAR_DIR": str(var_dir)}
    if env.get("BRIDGE_ENV") == "production":
        clean["AUDIT_SIGNING_KEY_FILE"] = audit_key_file(var_dir)
    clean.update(env)
    result = subprocess.run(
        [sys.executable, "-c", SHOW_SETTINGS, *names],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


COOKIES = ["SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE"]


def test_make_run_serves_with_debug_off_on_the_generated_key_and_local_hosts(tmp_path):
    # when settings load as bin/run starts them
    values = settings_of(
        tmp_path, ["DEBUG", "ALLOWED_HOSTS", *COOKIES], DEBUG="0", BRIDGE_LOCAL_RUN="1"
    )
    # then DEBUG is off, yet the generated key and the local host names are accepted, and
    # the cookies still work over plain http on 127.0.0.1
    assert values["DEBUG"] is False
    assert values["ALLOWED_HOSTS"] == ["localhost", "127.0.0.1", "[::1]"]
    assert (values["SESSION_COOKIE_SECURE"], values["CSRF_COOKIE_SECURE"]) == (False, False)
    assert (tmp_path / "dev_secret_key").stat().st_mode & 0o777 == 0o600


def test_the_make_run_marker_cannot_relax_production(tmp_path):
    # given production settings with bin/run's marker set too
    result = load_settings(tmp_path, BRIDGE_ENV="production", BRIDGE_LOCAL_RUN="1")
    # then it still refuses to start without a key of its own
    assert result.returncode != 0
    assert "SECRET_KEY is not set" in result.stderr
    assert not (tmp_path / "dev_secret_key").exists()
    # and with a key, the cookies are HTTPS-only
    values = settings_of(
        tmp_path,
        COOKIES,
        BRIDGE_ENV="production",
        BRIDGE_LOCAL_RUN="1",
        SECRET_KEY=GOOD_KEY,
        ALLOWED_HOSTS="bridge.example.org",
    )
    assert values == {"SESSION_COOKIE_SECURE": True, "CSRF_COOKIE_SECURE": True}


def test_postgresql_connections_get_connect_and_statement_timeouts(tmp_path):
    # given a DATABASE_URL with options of its own
    url = "postgres://bridge@db.example.org:5432/bridge?sslmode=require"
    # when
    default = settings_of(tmp_path, ["DATABASES"], DATABASE_URL=url)
    tuned = settings_of(
        tmp_path,
        ["DATABASES"],
        DATABASE_URL=url,
        DB_CONNECT_TIMEOUT="2",
        DB_STATEMENT_TIMEOUT="500ms",
    )
    unlimited = settings_of(tmp_path, ["DATABASES"], DATABASE_URL=url, DB_STATEMENT_TIMEOUT="0")
    # then
    assert default["DATABASES"]["default"]["OPTIONS"] == {
        "sslmode": "require",
        "connect_timeout": 5,
        "options": "-c statement_timeout=30000",
    }
    tuned_options = tuned["DATABASES"]["default"]["OPTIONS"]
    assert tuned_options["connect_timeout"] == 2
    assert tuned_options["options"] == "-c statement_timeout=500"
    assert "options" not in unlimited["DATABASES"]["default"]["OPTIONS"]


def test_sqlite_keeps_its_busy_timeout_and_gets_no_postgresql_options(tmp_path):
    options = settings_of(tmp_path, ["DATABASES"])["DATABASES"]["default"]["OPTIONS"]
    assert options["timeout"] == 20
    assert "connect_timeout" not in options and "options" not in options


def test_a_malformed_statement_timeout_refuses_to_start_naming_it(tmp_path):
    result = load_settings(tmp_path, DB_STATEMENT_TIMEOUT="forever")
    assert result.returncode != 0
    assert "DB_STATEMENT_TIMEOUT" in result.stderr


def test_redis_gets_connect_and_read_timeouts(tmp_path):
    values = settings_of(
        tmp_path, ["CACHES"], REDIS_URL="redis://cache.example.org:6379/0", REDIS_TIMEOUT="3"
    )
    options = values["CACHES"]["default"]["OPTIONS"]
    assert options == {"socket_connect_timeout": 3, "socket_timeout": 3}


def test_a_tls_proxy_header_is_trusted_only_when_named(tmp_path):
    production = {"DEBUG": "0", "SECRET_KEY": GOOD_KEY, "ALLOWED_HOSTS": "bridge.example.org"}
    plain = settings_of(tmp_path, ["SECURE_PROXY_SSL_HEADER"], **production)
    proxied = settings_of(
        tmp_path,
        ["SECURE_PROXY_SSL_HEADER"],
        SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto",
        TRUSTED_PROXIES="10.0.0.0/8",
        **production,
    )
    assert plain["SECURE_PROXY_SSL_HEADER"] is None
    assert proxied["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]


DEPLOY_CHECK = [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"]
TLS = {
    "SECURE_HSTS_SECONDS": "31536000",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": "1",
    "SECURE_HSTS_PRELOAD": "1",
    "SECURE_SSL_REDIRECT": "1",
}


def deploy_check(var_dir: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "BRIDGE_VAR_DIR": str(var_dir)}
    clean.update(
        BRIDGE_ENV="production",
        AUDIT_SIGNING_KEY_FILE=audit_key_file(var_dir),
        SECRET_KEY=secrets.token_urlsafe(50),
        ALLOWED_HOSTS="bridge.example.org",
        **env,
    )
    return subprocess.run(
        DEPLOY_CHECK, cwd=ROOT, env=clean, capture_output=True, text=True, timeout=120, check=False
    )


def test_deploy_check_is_clean_in_production_with_tls_configured(tmp_path):
    result = deploy_check(tmp_path, **TLS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout
    assert "WARNING" not in result.stdout + result.stderr


def test_deploy_check_names_what_is_missing_when_hsts_and_the_redirect_are_switched_off(tmp_path):
    result = deploy_check(tmp_path, SECURE_HSTS_SECONDS="0", SECURE_SSL_REDIRECT="0")
    assert result.returncode != 0
    for warning in ("security.W004", "security.W008"):
        assert warning in result.stderr + result.stdout


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


def test_backups_without_encryption_are_refused_unless_debug_is_on(tmp_path):
    production = load_settings(
        tmp_path,
        DEBUG="false",
        SECRET_KEY=GOOD_KEY,
        ALLOWED_HOSTS="bridge.example.org",
        ENABLE_BACKUP_ENCRYPTION="false",
    )
    assert production.returncode != 0
    assert "ENABLE_BACKUP_ENCRYPTION=false is allowed only with DEBUG on" in production.stderr
    development = load_settings(
        tmp_path, show="ENABLE_BACKUP_ENCRYPTION", ENABLE_BACKUP_ENCRYPTION="false"
    )
    assert development.returncode == 0, development.stderr
    assert development.stdout.strip() == "False"


def test_backup_targets_default_to_two_local_directories_and_extra_ones_add(tmp_path):
    import json

    result = load_settings(
        tmp_path,
        show="BACKUP_TARGETS",
        BACKUP_EXTRA_TARGETS=json.dumps({"offsite": {"backend": "x", "offsite": True}}),
    )
    assert result.returncode == 0, result.stderr
    assert "'local'" in result.stdout and "'local-mirror'" in result.stdout
    assert "'offsite'" in result.stdout
    assert str(tmp_path / "backups-mirror") in result.stdout
