"""gunicorn's configuration for Bridge: HTTPS when TLS_CERT_FILE and TLS_KEY_FILE are set.

    gunicorn -c bridge/gunicorn.conf.py bridge.wsgi:application --bind ... --workers ...

Command-line options win over this file, so the caller (bin/run's supervisord, tests, an
operator) keeps choosing the address, workers and threads. Without the two files it serves
plain http, as without this file. gunicorn reads ./gunicorn.conf.py on its own only from the
working directory, so this one is always named with -c.

- TLS_CERT_FILE, TLS_KEY_FILE: the PEM certificate (chain) and its private key; both or none.
- ENABLE_TLS13 (default on): TLS 1.3 only; off, TLS 1.2 is accepted too, never anything older.
- The scheme a proxy reports (SECURE_PROXY_SSL_HEADER) is believed only from TRUSTED_PROXIES,
  as in Django (bridge/tls.py); gunicorn's own default believes any local process.

Standard library only: importing the `bridge` package would load Celery and Django into the
arbiter before it forks its workers. gunicorn takes every module-level name that is one of its
settings, so helpers start with an underscore.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Callable

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _flag(name: str, default: bool) -> bool:
    # The same words as bridge.env.env_bool, so one environment means the same to both.
    raw = os.environ.get(name)
    if raw is None:
        return default
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise SystemExit(f"{name}: expected true/false, got {raw!r}")


def _tls_files() -> tuple[str, str] | None:
    cert = os.environ.get("TLS_CERT_FILE", "").strip()
    key = os.environ.get("TLS_KEY_FILE", "").strip()
    if not cert and not key:
        return None
    if not (cert and key):
        raise SystemExit("TLS_CERT_FILE and TLS_KEY_FILE: set both, or neither for plain http")
    # Loaded once now: gunicorn itself loads them only when a client connects, so a missing
    # file or a key that does not match would start a server that fails every handshake.
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except OSError as exc:  # ssl.SSLError included: not PEM, or a key of another certificate
        message = f"TLS_CERT_FILE/TLS_KEY_FILE: cannot load {cert} with {key}: {exc}"
        raise SystemExit(message) from None
    return os.path.abspath(cert), os.path.abspath(key)


_TLS = _tls_files()
_MINIMUM = ssl.TLSVersion.TLSv1_3 if _flag("ENABLE_TLS13", True) else ssl.TLSVersion.TLSv1_2
if _TLS:
    certfile, keyfile = _TLS

_contexts: dict[str, ssl.SSLContext] = {}


def ssl_context(
    conf: object, default_ssl_context_factory: Callable[[], ssl.SSLContext]
) -> ssl.SSLContext:
    """gunicorn's hook (its `ssl_version` is ignored since 21.0): the minimum TLS version.

    gunicorn asks for a context for every connection; each worker keeps its first, so the key
    is read once per worker and a client that comes back to the same worker can resume its
    session instead of a full handshake. A reload (HUP) re-reads this file (a renewed
    certificate included), and the new workers start with new contexts.
    """
    context = _contexts.get("server")
    if context is None:
        context = default_ssl_context_factory()
        context.minimum_version = _MINIMUM
        _contexts["server"] = context
    return context


_proxy_header = os.environ.get("SECURE_PROXY_SSL_HEADER", "").strip()
_proxies = [
    str(ipaddress.ip_network(cidr.strip(), strict=False))
    for cidr in os.environ.get("TRUSTED_PROXIES", "").split(",")
    if cidr.strip()
]
# gunicorn sets wsgi.url_scheme to https when a peer it trusts sends one of these headers;
# its defaults trust 127.0.0.1 and three headers, which any process on the host could send.
forwarded_allow_ips = ",".join(_proxies) if _proxy_header else ""
secure_scheme_headers = {_proxy_header.upper(): "https"} if _proxy_header else {}
