"""HTTPS: gunicorn's TLS 1.3 minimum (bridge/gunicorn.conf.py), `manage.py make_dev_cert`,
`make run-tls`, and the production settings: HSTS, secure cookies, plain http refused on /api/,
a proxy's scheme header believed only from TRUSTED_PROXIES, a clean `check --deploy`."""

from __future__ import annotations

import http.client
import io
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from django.core.management import CommandError, call_command
from django.test import Client

from tests.conftest import ROOT, free_port
from tests.test_runtime import Output, bridge_env, kill_all, processes_of
from tests.test_settings import GOOD_KEY, audit_key_file, load_settings, settings_of

GUNICORN = str(ROOT / ".venv/bin/gunicorn")
HTTPS_REQUIRED = {"detail": "HTTPS is required", "code": "https_required"}
ONE_YEAR = 365 * 24 * 3600


def make_dev_cert(*args: str) -> str:
    out = io.StringIO()
    call_command("make_dev_cert", *args, stdout=out)
    return out.getvalue()


@pytest.fixture(scope="module")
def dev_cert(tmp_path_factory) -> tuple[Path, Path]:
    """One pair from `manage.py make_dev_cert` for every server of this module."""
    folder = tmp_path_factory.mktemp("tls")
    make_dev_cert("--dir", str(folder))
    return folder / "cert.pem", folder / "key.pem"


def client_context(cert: Path, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A verifying client that trusts the development certificate, capped at `maximum`."""
    context = ssl.create_default_context(cafile=str(cert))
    if maximum is not None:
        context.maximum_version = maximum
    return context


def fetch(
    base: str,
    method: str,
    path: str,
    *,
    context: ssl.SSLContext | None = None,
    body: dict | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes, str | None]:
    """One request, redirects not followed: status, headers, body and the TLS version."""
    host, port = base.split("://")[1].rsplit(":", 1)
    if base.startswith("https"):
        connection = http.client.HTTPSConnection(host, int(port), timeout=10, context=context)
    else:
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        data = json.dumps(body).encode() if body is not None else None
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        version = connection.sock.version() if isinstance(connection.sock, ssl.SSLSocket) else None
        return response.status, response.headers, response.read(), version
    finally:
        connection.close()


def production_env(var_dir: Path, **extra: str) -> dict[str, str]:
    """What an operator sets for production, and nothing of the test run's own environment
    (its fast password hasher, for one, is refused in production)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "BRIDGE_VAR_DIR": str(var_dir),
        "BRIDGE_ENV": "production",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "AUDIT_SIGNING_KEY_FILE": audit_key_file(var_dir),
    }
    env.update(extra)
    return env


def start_server(
    env: dict[str, str], cert: Path | None = None, key: Path | None = None
) -> tuple[subprocess.Popen, str]:
    """gunicorn as an operator starts it (-c bridge/gunicorn.conf.py), once it answers."""
    # Unlimited, as every server the tests start: its few requests are not what is tested.
    env = {**env, "ENABLE_DDOS_PROTECTION": "false"}
    if cert is not None and key is not None:
        env.update(TLS_CERT_FILE=str(cert), TLS_KEY_FILE=str(key))
    port = free_port()
    log = Path(env["BRIDGE_VAR_DIR"]) / f"gunicorn-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                GUNICORN,
                "bridge.wsgi:application",
                "-c",
                "bridge/gunicorn.conf.py",
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                "1",
                "--worker-class",
                "gthread",
                "--threads",
                "4",
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    base = f"{'https' if cert else 'http'}://127.0.0.1:{port}"
    context = client_context(cert) if cert else None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"gunicorn exited:\n{log.read_text()}")
        try:
            if fetch(base, "GET", "/health/live", context=context)[0] == 200:
                return process, base
        except OSError:  # refused while booting; ssl.SSLError is an OSError too
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"gunicorn did not answer:\n{log.read_text()}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=15)


def handshake(base: str, context: ssl.SSLContext) -> str:
    """The TLS version a bare handshake agrees on; ssl.SSLError when the server refuses."""
    port = int(base.rsplit(":", 1)[1])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return tls.version() or ""


@pytest.fixture(scope="module")
def production_https(dev_cert, tmp_path_factory) -> Iterator[str]:
    """Production settings, TLS by gunicorn with the default ENABLE_TLS13, on a migrated
    database of its own (the API records each request in the audit trail)."""
    env = production_env(tmp_path_factory.mktemp("var"))
    subprocess.run(
        [str(ROOT / ".venv/bin/python"), "manage.py", "migrate", "--noinput", "-v0"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    process, base = start_server(env, *dev_cert)
    yield base
    stop(process)


@pytest.fixture(scope="module")
def production_http(tmp_path_factory) -> Iterator[str]:
    """Production settings, served over plain http (as behind a proxy, or by mistake)."""
    process, base = start_server(production_env(tmp_path_factory.mktemp("var")))
    yield base
    stop(process)


# --- make_dev_cert ------------------------------------------------------------------------


def test_make_dev_cert_writes_a_private_p256_pair_for_the_local_names(tmp_path):
    # when
    output = make_dev_cert("--dir", str(tmp_path / "tls"))
    # then the key is EC P-256, the owner's only, and the certificate's
    cert_path, key_path = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "tls").stat().st_mode & 0o777 == 0o700
    key = load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert certificate.public_key().public_numbers() == key.public_key().public_numbers()
    # and it names localhost and the loopback addresses, a server certificate only
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert "SHA-256 fingerprint" in output
    # and no temp file is left behind
    assert sorted(p.name for p in (tmp_path / "tls").iterdir()) == ["cert.pem", "key.pem"]


def test_make_dev_cert_refuses_to_overwrite_a_pair_unless_forced(tmp_path):
    # given a pair
    folder = str(tmp_path)
    make_dev_cert("--dir", folder)
    first = (tmp_path / "key.pem").read_bytes()
    # when asked again without --force, then it refuses and keeps the pair
    with pytest.raises(CommandError, match="not overwritten"):
        make_dev_cert("--dir", folder)
    assert (tmp_path / "key.pem").read_bytes() == first
    # and --if-missing (make run-tls) keeps it without an error
    assert "Keeping" in make_dev_cert("--dir", folder, "--if-missing")
    assert (tmp_path / "key.pem").read_bytes() == first
    # when forced, then both are replaced, still private
    make_dev_cert("--dir", folder, "--force")
    assert (tmp_path / "key.pem").read_bytes() != first
    assert (tmp_path / "key.pem").stat().st_mode & 0o777 == 0o600


def test_make_dev_cert_if_missing_refuses_half_a_pair(tmp_path):
    make_dev_cert("--dir", str(tmp_path))
    (tmp_path / "key.pem").unlink()
    with pytest.raises(CommandError, match="only one of"):
        make_dev_cert("--dir", str(tmp_path), "--if-missing")


# --- gunicorn.conf.py ---------------------------------------------------------------------


@pytest.mark.servers
def test_a_tls12_client_is_refused_and_a_tls13_client_served(production_https, dev_cert):
    cert, _ = dev_cert
    # when a client that speaks at most TLS 1.2 connects, then the handshake fails
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
        handshake(production_https, client_context(cert, ssl.TLSVersion.TLSv1_2))
    # when a TLS 1.3 client asks, then it is served
    status, _, body, version = fetch(
        production_https, "GET", "/health/live", context=client_context(cert)
    )
    assert (status, json.loads(body), version) == (200, {"status": "ok"}, "TLSv1.3")


@pytest.mark.servers
def test_with_enable_tls13_off_a_tls12_client_is_served(dev_cert, tmp_path):
    # given the same server with ENABLE_TLS13 off
    process, base = start_server(production_env(tmp_path, ENABLE_TLS13="false"), *dev_cert)
    try:
        # when a TLS 1.2 client connects, then it is served over TLS 1.2
        tls12 = client_context(dev_cert[0], ssl.TLSVersion.TLSv1_2)
        status, _, _, version = fetch(base, "GET", "/health/live", context=tls12)
        assert (status, version) == (200, "TLSv1.2")
    finally:
        stop(process)


def check_config(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [GUNICORN, "-c", "bridge/gunicorn.conf.py", "--check-config", "bridge.wsgi:application"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_gunicorn_refuses_to_start_on_half_a_pair_or_a_key_of_another_certificate(tmp_path):
    # given two pairs
    make_dev_cert("--dir", str(tmp_path / "a"))
    make_dev_cert("--dir", str(tmp_path / "b"))
    cert, other_key = str(tmp_path / "a" / "cert.pem"), str(tmp_path / "b" / "key.pem")
    # when started with a certificate and no key, or with another pair's key
    half = check_config(TLS_CERT_FILE=cert, TLS_KEY_FILE="")
    mismatched = check_config(TLS_CERT_FILE=cert, TLS_KEY_FILE=other_key)
    # then it refuses at once, saying why, instead of failing every handshake later
    assert half.returncode != 0 and "set both" in half.stderr
    assert mismatched.returncode != 0 and "cannot load" in mismatched.stderr
    # while without either it starts as before, on plain http
    assert check_config(TLS_CERT_FILE="", TLS_KEY_FILE="").returncode == 0


# --- Production settings over a real server -----------------------------------------------


@pytest.mark.servers
def test_production_refuses_plain_http_on_the_api_with_json(production_http):
    # when an API client calls over plain http, with credentials or without
    login = fetch(
        production_http,
        "POST",
        "/api/security/auth/login",
        body={"username": "admin", "password": "sent-in-clear"},
    )
    listing = fetch(production_http, "GET", "/api/jobs")
    # then both are refused, not redirected
    for status, headers, body, _ in (login, listing):
        assert status == 403
        assert headers["Content-Type"] == "application/json"
        assert json.loads(body) == HTTPS_REQUIRED
    # while probes keep working over plain http, and the console redirects to https
    assert fetch(production_http, "GET", "/health/live")[0] == 200
    status, headers, _, _ = fetch(production_http, "GET", "/admin/login/")
    assert status == 301
    assert headers["Location"].startswith("https://127.0.0.1:")


@pytest.mark.servers
def test_production_over_https_sends_hsts_and_serves_the_api(production_https, dev_cert):
    context = client_context(dev_cert[0])
    # when a probe and a console page are fetched over https
    probe = fetch(production_https, "GET", "/health/live", context=context)
    page = fetch(production_https, "GET", "/admin/login/", context=context)
    # then both carry HSTS for a year, subdomains included, preloadable
    for status, headers, _, _ in (probe, page):
        assert status == 200
        assert headers["Strict-Transport-Security"] == (
            f"max-age={ONE_YEAR}; includeSubDomains; preload"
        )
    # and the console's cookie is HTTPS-only
    assert "csrftoken=" in page[1]["Set-Cookie"] and "Secure" in page[1]["Set-Cookie"]
    # and the API is not refused over https (an anonymous caller meets authentication)
    status, _, body, _ = fetch(production_https, "GET", "/api/jobs", context=context)
    assert status == 401, body


@pytest.mark.servers
def test_a_forwarded_proto_header_is_believed_only_from_trusted_proxies(dev_cert, tmp_path):
    # given production over plain http behind a proxy on 10.0.0.0/8 (not the test's address)
    env = production_env(
        tmp_path, TRUSTED_PROXIES="10.0.0.0/8", SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto"
    )
    process, base = start_server(env)
    try:
        # when a client on 127.0.0.1 claims https itself
        host, port = base.split("://")[1].rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request("GET", "/api/jobs", headers={"X-Forwarded-Proto": "https"})
        response = connection.getresponse()
        # then neither gunicorn nor Django believes it
        assert (response.status, json.loads(response.read())) == (403, HTTPS_REQUIRED)
        connection.close()
    finally:
        stop(process)


# --- The same rules in process -------------------------------------------------------------


@pytest.fixture
def api_https_only(settings) -> None:
    settings.API_HTTPS_ONLY = True
    settings.TRUSTED_PROXIES = [ipaddress.ip_network("10.0.0.0/8")]
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")


@pytest.mark.django_db
def test_the_proxy_scheme_header_counts_only_from_a_trusted_proxy(api_https_only):
    client = Client()
    # when a client claims https itself
    spoofed = client.get("/api/jobs", REMOTE_ADDR="203.0.113.7", HTTP_X_FORWARDED_PROTO="https")
    # then it is refused as plain http
    assert (spoofed.status_code, spoofed.json()) == (403, HTTPS_REQUIRED)
    # when the trusted proxy says the client spoke https, or the request is https itself
    proxied = client.get("/api/jobs", REMOTE_ADDR="10.1.2.3", HTTP_X_FORWARDED_PROTO="https")
    direct = client.get("/api/jobs", secure=True)
    # then both reach the API (which asks for credentials)
    assert (proxied.status_code, direct.status_code) == (401, 401)


@pytest.mark.django_db
def test_outside_the_api_plain_http_is_not_refused(api_https_only):
    assert Client().get("/health/live").status_code == 200


@pytest.mark.django_db
def test_development_serves_the_api_over_plain_http(settings):
    assert settings.API_HTTPS_ONLY is False
    assert Client().get("/api/jobs").status_code == 401


# --- Production settings and the deploy check ---------------------------------------------

PRODUCTION = {"BRIDGE_ENV": "production", "SECRET_KEY": GOOD_KEY, "ALLOWED_HOSTS": "bridge.example"}
HARDENING = [
    "SECURE_HSTS_SECONDS",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS",
    "SECURE_HSTS_PRELOAD",
    "SESSION_COOKIE_SECURE",
    "CSRF_COOKIE_SECURE",
    "SECURE_SSL_REDIRECT",
    "SECURE_REDIRECT_EXEMPT",
    "SECURE_PROXY_SSL_HEADER",
    "API_HTTPS_ONLY",
    "ENABLE_TLS13",
]


def test_production_settings_default_to_https_only(tmp_path):
    values = settings_of(tmp_path, HARDENING, **PRODUCTION)
    assert values["SECURE_HSTS_SECONDS"] >= ONE_YEAR
    assert values["SECURE_HSTS_INCLUDE_SUBDOMAINS"] and values["SECURE_HSTS_PRELOAD"]
    assert values["SESSION_COOKIE_SECURE"] and values["CSRF_COOKIE_SECURE"]
    assert values["SECURE_SSL_REDIRECT"] and values["API_HTTPS_ONLY"] and values["ENABLE_TLS13"]
    # the API is refused rather than redirected, and the probes answer over plain http
    assert set(values["SECURE_REDIRECT_EXEMPT"]) == {r"^health/", r"^api/"}
    # and no header can claim https without a trusted proxy
    assert values["SECURE_PROXY_SSL_HEADER"] is None


def test_make_run_and_development_keep_plain_http(tmp_path):
    local = settings_of(tmp_path, HARDENING, DEBUG="0", BRIDGE_LOCAL_RUN="1")
    development = settings_of(tmp_path, ["API_HTTPS_ONLY", "SECURE_SSL_REDIRECT"])
    assert local["SECURE_HSTS_SECONDS"] == 0
    assert not local["SECURE_SSL_REDIRECT"] and not local["API_HTTPS_ONLY"]
    assert development == {"API_HTTPS_ONLY": False, "SECURE_SSL_REDIRECT": False}


def test_a_proxy_ssl_header_without_trusted_proxies_refuses_to_start(tmp_path):
    result = load_settings(tmp_path, SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto")
    assert result.returncode != 0
    assert "SECURE_PROXY_SSL_HEADER is set but TRUSTED_PROXIES is empty" in result.stderr


def test_deploy_check_is_clean_under_the_production_settings(tmp_path):
    # when `check --deploy` runs with what production sets and no TLS variable of its own
    result = subprocess.run(
        [str(ROOT / ".venv/bin/python"), "manage.py", "check", "--deploy"],
        cwd=ROOT,
        env=production_env(tmp_path, ALLOWED_HOSTS="bridge.example.org"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # then it names no warning and no error
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert not re.search(r"\(\w+(\.\w+)*\.[WE]\d+\)", output), output
    assert "System check identified no issues" in output


# --- make run-tls -------------------------------------------------------------------------


@pytest.fixture
def short_var() -> Iterator[Path]:
    """A var dir with a short path, so supervisord's socket stays inside it."""
    with tempfile.TemporaryDirectory(prefix="brt-") as folder:
        yield Path(folder) / "var"


@pytest.mark.servers
def test_make_run_tls_makes_a_dev_cert_and_serves_https_only(short_var):
    # given a Bridge of its own
    port = free_port()
    env = bridge_env(short_var, PORT=str(port))
    # when started with `make run-tls`
    run = subprocess.Popen(
        ["make", "--no-print-directory", "run-tls"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output = Output(run.stdout)
    try:
        # then it says it is up on https once the server answers there
        output.wait_for(rf"^Bridge is up: https://127\.0\.0\.1:{port}/admin/", timeout=180)
        cert, key = short_var / "tls" / "cert.pem", short_var / "tls" / "key.pem"
        assert key.stat().st_mode & 0o777 == 0o600
        base = f"https://127.0.0.1:{port}"
        # and the console answers a TLS 1.3 client with HTTPS-only cookies
        status, headers, _, version = fetch(
            base, "GET", "/admin/login/", context=client_context(cert)
        )
        assert (status, version) == (200, "TLSv1.3")
        assert "csrftoken=" in headers["Set-Cookie"] and "Secure" in headers["Set-Cookie"]
        # and a TLS 1.2 client is refused
        with pytest.raises(ssl.SSLError):
            handshake(base, client_context(cert, ssl.TLSVersion.TLSv1_2))
        # when Ctrl-C reaches it, then everything stops
        os.killpg(run.pid, signal.SIGINT)
        run.wait(timeout=30)
        deadline = time.monotonic() + 15
        while processes_of(short_var) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes_of(short_var) == []
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        kill_all(processes_of(short_var))
