"""Personas, authenticated API clients and the real-server fixtures shared by every test."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import Group
from django.db import connection
from rest_framework.test import APIClient

from security.choices import Role
from security.models import User

# Logins in tests verify an MD5 hash instead of PBKDF2's 1.2M rounds; servers the tests start
# inherit the variable (process_env copies the environment), so they accept those hashes too.
os.environ.setdefault("BRIDGE_FAST_PASSWORD_HASHER", "1")
# Nobody must enrol an authenticator in the servers the tests start (their personas log in with
# a password); in-process the `_no_required_otp` fixture does the same, and the two-factor
# tests (tests/security/test_totp.py) switch the production default back on.
os.environ.setdefault("OTP_REQUIRED_ROLES", "")

# The sftp_target fixture (a real OpenSSH server on loopback), for every backup test.
pytest_plugins = ["tests.backups.sftp"]

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "Correct-Horse-Battery-42"
REQUIRE_SERVICES = os.environ.get("BRIDGE_REQUIRE_SERVICES") == "1"


@pytest.fixture(scope="session", autouse=True)
def _fast_password_hasher() -> None:
    from django.conf import settings

    settings.PASSWORD_HASHERS = [
        "django.contrib.auth.hashers.MD5PasswordHasher",
        "django.contrib.auth.hashers.PBKDF2PasswordHasher",
    ]


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix: None) -> None:
    """A test database of this run's own (by process id): two runs in one checkout, or on
    one PostgreSQL server, never drop each other's database."""
    from django.conf import settings

    run = f"run{os.getpid()}"
    database = settings.DATABASES["default"]
    test = database.setdefault("TEST", {})
    if database["ENGINE"].endswith("sqlite3"):
        test["NAME"] = str(Path(settings.VAR_DIR) / f"test_bridge_{run}.sqlite3")
    else:
        test["NAME"] = f"test_{database['NAME']}_{run}"


RUN_SERVER_TESTS = REQUIRE_SERVICES or os.environ.get("BRIDGE_SERVER_TESTS") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests that start Bridge's own processes take most of a local run's time: CI runs them
    # (BRIDGE_REQUIRE_SERVICES=1), a local `make test` skips them unless asked.
    if RUN_SERVER_TESTS:
        return
    skip = pytest.mark.skip(reason="starts servers: set BRIDGE_SERVER_TESTS=1 (CI runs it)")
    for item in items:
        if "servers" in item.keywords:
            item.add_marker(skip)


def need(condition: bool, reason: str) -> None:
    """Skip when a real service is missing; under BRIDGE_REQUIRE_SERVICES=1, fail instead."""
    if condition:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"required service missing: {reason}", pytrace=False)
    pytest.skip(reason)


def on_postgres() -> bool:
    return connection.vendor == "postgresql"


@pytest.fixture
def postgres() -> None:
    need(on_postgres(), "needs PostgreSQL (set DATABASE_URL)")


# pytest-django empties tables between transactional tests with TRUNCATE, which the audit
# table's trigger refuses (as it should in production). Tests run as the postgres superuser,
# who may switch ordinary triggers off for its own session while flushing.
def _patch_flush() -> None:
    from django.db.backends.postgresql.operations import DatabaseOperations

    original = DatabaseOperations.execute_sql_flush

    def execute_sql_flush(self: DatabaseOperations, sql_list: list[str]) -> None:
        with self.connection.cursor() as cursor:
            cursor.execute("SET session_replication_role = replica")
        try:
            original(self, sql_list)
        finally:
            with self.connection.cursor() as cursor:
                cursor.execute("SET session_replication_role = DEFAULT")

    DatabaseOperations.execute_sql_flush = execute_sql_flush

    # SQLite empties tables row by row: the SOX change triggers would record every deleted
    # row into the (already emptied) change table. PostgreSQL's TRUNCATE fires no row triggers.
    from django.db.backends.sqlite3 import base as sqlite_base

    SQLiteOperations = sqlite_base.DatabaseOperations

    original_sqlite = SQLiteOperations.execute_sql_flush

    def execute_sqlite_flush(self: SQLiteOperations, sql_list: list[str]) -> None:
        from compliance import sox

        with sox.capture_paused():
            original_sqlite(self, sql_list)

    SQLiteOperations.execute_sql_flush = execute_sqlite_flush


_patch_flush()


def bypass_triggers(sql: str, params: list | None = None) -> None:
    """Run SQL as a superuser with triggers off: how an attacker with DBA rights tampers."""
    with connection.cursor() as cursor:
        if on_postgres():
            cursor.execute("SET session_replication_role = replica")
        try:
            cursor.execute(sql, params)
        finally:
            if on_postgres():
                cursor.execute("SET session_replication_role = DEFAULT")


def make_user(username: str, *roles: Role, superuser: bool = False) -> User:
    if superuser:
        user = User.objects.create_superuser(username=username, password=PASSWORD, email="")
    else:
        user = User.objects.create_user(username=username, password=PASSWORD)
    for role in roles:
        # get_or_create: a transactional test's flush empties the groups the migration made
        user.groups.add(Group.objects.get_or_create(name=role)[0])
    return user


@pytest.fixture
def admin_user(db) -> User:
    return make_user("root", superuser=True)


@pytest.fixture
def operator(db) -> User:
    return make_user("olivia", Role.OPERATOR)


@pytest.fixture
def security_officer(db) -> User:
    return make_user("sam", Role.SECURITY_OFFICER)


@pytest.fixture
def compliance_officer(db) -> User:
    return make_user("carla", Role.COMPLIANCE_OFFICER)


@pytest.fixture
def outsider(db) -> User:
    return make_user("otto")


def login(client: APIClient, username: str, password: str = PASSWORD) -> dict:
    response = client.post(
        "/api/security/auth/login", {"username": username, "password": password}, format="json"
    )
    assert response.status_code == 200, response.content
    return response.json()


def client_for(user: User) -> APIClient:
    client = APIClient()
    tokens = login(client, user.username)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {tokens['access']}")
    client.tokens = tokens
    return client


@pytest.fixture
def admin_api(admin_user) -> APIClient:
    return client_for(admin_user)


@pytest.fixture
def operator_api(operator) -> APIClient:
    return client_for(operator)


@pytest.fixture
def compliance_api(compliance_officer) -> APIClient:
    return client_for(compliance_officer)


@pytest.fixture
def outsider_api(outsider) -> APIClient:
    return client_for(outsider)


@pytest.fixture
def anon_api() -> APIClient:
    return APIClient()


@pytest.fixture(scope="session")
def _test_signing_key_file(tmp_path_factory) -> Path:
    # The tests' own key: a rotation in a test must never replace the developer's var/keys one.
    return tmp_path_factory.mktemp("keys") / "audit_signing_key.pem"


@pytest.fixture(autouse=True)
def _no_cached_data_keys() -> Iterator[None]:
    """A data key cached by one test may have been rolled back with its database."""
    from security import crypto

    crypto.forget_keys()
    yield
    crypto.forget_keys()


@pytest.fixture(autouse=True)
def _no_required_otp(settings) -> None:
    """The personas log in with a password; production requires an authenticator of
    superusers and security officers (OTP_REQUIRED_ROLES), which test_totp.py switches on."""
    settings.OTP_REQUIRED_ROLES = []


@pytest.fixture(autouse=True)
def _second_approval(request, settings) -> None:
    """Segregation of duties (SOX second approval) only where a test is marked `sod`: the
    other tests restore backups and rotate keys as one user."""
    settings.SOX_REQUIRE_SECOND_APPROVAL = request.node.get_closest_marker("sod") is not None


@pytest.fixture(autouse=True)
def _no_rate_limits(settings) -> None:
    """Tests send hundreds of requests from one address; the limiter's own tests switch it on."""
    settings.ENABLE_DDOS_PROTECTION = False


@pytest.fixture(autouse=True)
def checkpoint_dir(settings, tmp_path, _test_signing_key_file) -> Path:
    """Each test writes its checkpoints to a directory sink of its own."""
    settings.AUDIT_SIGNING_KEY_FILE = _test_signing_key_file
    settings.AUDIT_CHECKPOINT_DIR = tmp_path / "checkpoints"
    # Reports and DSR exports too: never var/.
    settings.REPORT_DIR = tmp_path / "reports"
    settings.DSR_EXPORT_DIR = tmp_path / "dsr-exports"
    return settings.AUDIT_CHECKPOINT_DIR


@pytest.fixture(autouse=True)
def _backup_places(settings, tmp_path_factory) -> None:
    """Backups in tests write only to directories of their own, never var/, and snapshot a
    Redis database no other part of Bridge uses (db 13), never the shared one."""
    root = tmp_path_factory.mktemp("backups")
    settings.BACKUP_TARGETS = {
        "local": {
            "backend": "django.core.files.storage.FileSystemStorage",
            "options": {"location": str(root / "primary")},
            "media": "disk",
            "offsite": False,
        },
        "local-mirror": {
            "backend": "django.core.files.storage.FileSystemStorage",
            "options": {"location": str(root / "mirror")},
            "media": "disk",
            "offsite": False,
        },
    }
    settings.MEDIA_ROOT = root / "media"
    settings.BACKUP_SCRATCH_DIR = root / "scratch"
    settings.BACKUP_CONFIG_PATHS = []
    settings.BACKUP_DATABASES = []
    settings.BACKUP_PITR_DATABASE = ""
    redis_url = os.environ.get("REDIS_URL", "")
    settings.BACKUP_REDIS_URL = re.sub(r"(/\d*)?$", "/13", redis_url, count=1) if redis_url else ""


@pytest.fixture(autouse=True)
def _celery_eager(monkeypatch) -> None:
    """Unit tests run tasks inline; the end-to-end tests switch a real worker back on."""
    from bridge.celery import app

    monkeypatch.setitem(app.conf, "task_always_eager", True)
    monkeypatch.setitem(app.conf, "task_eager_propagates", True)


@pytest.fixture
def worker_queue(postgres, transactional_db, tmp_path, monkeypatch) -> Iterator[str]:
    """A Celery worker in its own process, on the real broker, consuming only a queue no other
    worker knows; it sees the test's database and keys (process_env)."""
    from bridge.celery import app

    # Publish for real even if the environment asks for eager tasks.
    monkeypatch.setitem(app.conf, "task_always_eager", False)
    queue = f"bridge-test-{uuid.uuid4().hex[:12]}"
    env = process_env(CELERY_TASK_ALWAYS_EAGER="false")
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [
            str(ROOT / ".venv/bin/celery"),
            "-A",
            "bridge",
            "worker",
            "--loglevel",
            "WARNING",
            "--concurrency",
            "1",
            "-Q",
            queue,
            "--hostname",
            f"{queue}@%h",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield queue
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=10)
        log.close()


VERIFY = "/api/compliance/audit/verify"


@pytest.fixture
def verify(compliance_api, django_capture_on_commit_callbacks):
    """Start a verification over the API, let it run (eagerly, on commit) and read it back."""

    def run(api: APIClient = compliance_api) -> dict:
        with django_capture_on_commit_callbacks(execute=True):
            started = api.post(VERIFY)
        assert started.status_code == 202, started.content
        return api.get(VERIFY).json()

    return run


# --- Real processes against the test database ---------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def database_url_of_tests() -> str:
    settings = connection.settings_dict
    user = settings.get("USER") or "postgres"
    host = settings.get("HOST") or "127.0.0.1"
    port = settings.get("PORT") or 5432
    return f"postgres://{user}@{host}:{port}/{settings['NAME']}"


def process_env(**extra: str) -> dict[str, str]:
    from django.conf import settings

    env = dict(os.environ)
    env["DATABASE_URL"] = database_url_of_tests()
    env["AUDIT_SIGNING_KEY_FILE"] = str(settings.AUDIT_SIGNING_KEY_FILE)
    env["AUDIT_CHECKPOINT_DIR"] = str(settings.AUDIT_CHECKPOINT_DIR)
    # The test's own master keys, if it set any (else both sides use var/keys/master.key).
    if settings.BRIDGE_MASTER_KEY:
        env["BRIDGE_MASTER_KEY"] = settings.BRIDGE_MASTER_KEY
    env["BRIDGE_MASTER_KEY_PREVIOUS"] = ",".join(settings.BRIDGE_MASTER_KEY_PREVIOUS)
    # Servers the tests start run unlimited unless a test asks (extra) for the limiter.
    env["ENABLE_DDOS_PROTECTION"] = "false"
    env.update(extra)
    return env


def start_gunicorn(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """Bridge under gunicorn (two threaded workers, as in production), once it answers."""
    port = free_port()
    process = subprocess.Popen(
        [
            str(ROOT / ".venv/bin/gunicorn"),
            "bridge.wsgi:application",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "--worker-class",
            "gthread",
            "--threads",
            "8",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health/live", timeout=1)
            break
        except OSError:  # URLError, a refused connection, a socket timeout under load
            time.sleep(0.2)
    else:
        process.kill()
        raise RuntimeError("gunicorn did not start")
    return process, url


@pytest.fixture(scope="session")
def gunicorn_server(django_db_setup, django_db_blocker) -> Iterator[str]:
    """Bridge under gunicorn, two workers as in production, on the test database."""
    with django_db_blocker.unblock():
        if connection.vendor != "postgresql":
            yield ""
            return
        # Fuzzing sends thousands of refused requests: Django's one warning line per 4xx would
        # bury a CI log. Errors still show.
        env = process_env(LOG_LEVEL="ERROR")
    process, url = start_gunicorn(env)
    yield url
    process.terminate()
    process.wait(timeout=15)


@pytest.fixture
def server(postgres, gunicorn_server, transactional_db) -> str:
    return gunicorn_server


@pytest.fixture
def hung_port() -> Iterator[int]:
    """A TCP port that accepts connections (the kernel's backlog does) and never answers: a
    hung database, cache or broker. Closing it resets the waiting connections, which ends the
    probe threads stuck on it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield listener.getsockname()[1]
    listener.close()


@pytest.fixture
def chromium() -> str:
    # Debian's package only, never a browser a test tool downloaded onto the PATH.
    path = "/usr/bin/chromium"
    need(Path(path).exists(), "needs Debian's chromium at /usr/bin/chromium")
    return path


@pytest.fixture
def python() -> str:
    return sys.executable
