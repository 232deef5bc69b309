"""HTTPS for Bridge: the plain-http refusal on /api/, the proxy scheme header checked against
TRUSTED_PROXIES, and the self-signed development certificate (`manage.py make_dev_cert`).

gunicorn's side (TLS 1.3, the certificate files) is bridge/gunicorn.conf.py, which does not
import this module: the arbiter should not load Django and Celery before forking its workers.
"""

from __future__ import annotations

import ipaddress
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

DEV_CERT_NAME = "cert.pem"
DEV_KEY_NAME = "key.pem"
# The names a browser or client on this machine uses for `make run-tls`.
DEV_HOSTS = ("localhost", "127.0.0.1", "::1")


def _from_trusted_proxy(request: HttpRequest) -> bool:
    try:
        peer = ipaddress.ip_address(request.META.get("REMOTE_ADDR", "").strip())
    except ValueError:
        return False
    return any(peer in network for network in settings.TRUSTED_PROXIES)


class HttpsMiddleware:
    """First in MIDDLEWARE, before anything asks `request.is_secure()`.

    Django believes SECURE_PROXY_SSL_HEADER from any peer; the header is dropped here unless
    the peer is one of TRUSTED_PROXIES (the rule security/ip.py applies to X-Forwarded-For),
    so a client that reaches Bridge around its proxy cannot claim HTTPS.

    With API_HTTPS_ONLY (production) a plain-http request under /api/ is refused with a JSON
    403 instead of redirected: a redirect would hide that the client just sent its password or
    token in clear (and turn its POST into a GET), where a refusal makes it fail loudly.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        header = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
        if header and header[0] in request.META and not _from_trusted_proxy(request):
            del request.META[header[0]]
        if settings.API_HTTPS_ONLY and request.path.startswith("/api/") and not request.is_secure():
            return JsonResponse(
                {"detail": "HTTPS is required", "code": "https_required"}, status=403
            )
        return self.get_response(request)


# --- make_dev_cert ------------------------------------------------------------------------


def _write_file(path: Path, data: bytes, *, mode: int, replace: bool) -> None:
    """Whole or not at all: a temp file created with its final mode (a key is never readable by
    others, not even for an instant), then renamed over the old one or linked to a free name
    (which fails if another process wrote it first)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_dev_certificate(
    directory: Path, *, days: int = 365, force: bool = False
) -> tuple[Path, Path]:
    """Write a self-signed certificate and its private key for the local host names.

    EC P-256 rather than Ed25519, which no browser accepts in TLS. The certificate is its own
    trust anchor (clients pass it as their CA file). Returns (certificate, key); raises
    FileExistsError naming the file when either exists and `force` is not given.
    """
    cert_path, key_path = directory / DEV_CERT_NAME, directory / DEV_KEY_NAME
    if not force:
        for path in (cert_path, key_path):
            if path.exists():
                raise FileExistsError(str(path))
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bridge development (localhost)")])
    now = datetime.now(UTC)
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    names += [x509.IPAddress(ipaddress.ip_address(host)) for host in DEV_HOSTS[1:]]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # A few minutes back: a client whose clock is slightly behind still accepts it.
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # The key first: a crash in between leaves a new key beside the old certificate, which
    # gunicorn refuses at start, rather than a certificate whose key is gone.
    _write_file(key_path, key_pem, mode=0o600, replace=force)
    _write_file(
        cert_path, certificate.public_bytes(serialization.Encoding.PEM), mode=0o644, replace=force
    )
    return cert_path, key_path


def fingerprint(cert_path: Path) -> str:
    """SHA-256 of the certificate, as browsers show it, to compare before trusting it."""
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()
