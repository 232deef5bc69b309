"""Real probes of the services Bridge watches, each within a hard timeout.

A probe is a plain function that returns a `ProbeOutcome` when the service answers as a healthy
one does and raises `ProbeFailed` (or any exception) when it does not. The monitor runs it
through the retry executor (so the service's circuit breaker sees every probe); `run_probe`
bounds it in time whatever the client library does: the work runs in a daemon thread and the
caller stops waiting at the timeout. Every client library is also given the timeout itself, so
an abandoned thread ends soon after instead of hanging on a dead socket.

Targets never hold credentials: a probe of a built-in service reads the live settings
(DATABASES, REDIS_URL, CELERY_BROKER_URL), any other service's password comes from its
`credential` (a StoredSecret, encrypted at rest).
"""

from __future__ import annotations

import math
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from django.conf import settings

from recovery.choices import ServiceKind
from recovery.health import redact

if TYPE_CHECKING:
    from recovery.models import Service

# What a healthy HTTP answer's body is searched in: enough for any status page.
HTTP_BODY_LIMIT = 64 * 1024
DEFAULT_USERS = {ServiceKind.POSTGRES: "postgres", ServiceKind.RABBITMQ: "guest"}


class ProbeFailed(Exception):
    """The service answered wrongly or not at all; the text says how (no credentials)."""


@dataclass(frozen=True)
class ProbeOutcome:
    """A service that answered: what it said, and (non-empty) why it is only partly healthy."""

    detail: str
    degraded: str = ""


def reason(exc: BaseException) -> str:
    """An exception as a check's detail: its type and first line, without URLs, addresses or
    quoted names (client libraries put the whole connection URL in some messages)."""
    if isinstance(exc, ProbeFailed):
        return str(exc)[:300]
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {redact(text)}" if text else type(exc).__name__


# --- Targets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    host: str
    port: int
    path: str = ""  # postgres: database name; redis: db number; rabbitmq: virtual host


def parse_address(target: str) -> Address:
    """`host:port` (or `[v6]:port`), optionally `/name` after it. Raises ValueError."""
    if "@" in target or "://" in target:
        raise ValueError("expected host:port, without a scheme or credentials")
    head, _, path = target.partition("/")
    if head.startswith("["):
        host, sep, port = head[1:].partition("]:")
    else:
        host, sep, port = head.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit():
        raise ValueError("expected host:port")
    number = int(port)
    if not 1 <= number <= 65535:
        raise ValueError("the port must be between 1 and 65535")
    if any(ch.isspace() for ch in target):
        raise ValueError("a target has no spaces")
    return Address(host, number, path)


def _credential(service: Service, kind: str) -> tuple[str, str | None]:
    """(user, password) from the service's stored secret: `user:password`, or a password alone
    with the kind's usual user."""
    user = DEFAULT_USERS.get(kind, "")
    secret = service.credential.value if service.credential_id else None
    if secret and ":" in secret and kind != ServiceKind.HTTP:
        name, _, password = secret.partition(":")
        return name, password
    return user, secret


# --- One probe per kind --------------------------------------------------------------------


def probe_tcp(host: str, port: int, timeout: float) -> ProbeOutcome:
    with socket.create_connection((host, port), timeout=timeout):
        pass
    return ProbeOutcome("accepts connections")


def probe_http(
    url: str,
    timeout: float,
    *,
    expect_status: int | None = None,
    expect_body: str = "",
    token: str | None = None,
) -> ProbeOutcome:
    import requests

    headers = {"User-Agent": "Bridge health check"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    # No redirects: the status judged is the target's own (expect 301 to accept a redirect).
    with requests.get(
        url, timeout=(timeout, timeout), headers=headers, allow_redirects=False, stream=True
    ) as response:
        status = response.status_code
        healthy = status == expect_status if expect_status else 200 <= status < 300
        if not healthy:
            wanted = str(expect_status) if expect_status else "2xx"
            raise ProbeFailed(f"HTTP {status} (expected {wanted})")
        if expect_body:
            body = response.raw.read(HTTP_BODY_LIMIT, decode_content=True) or b""
            if expect_body not in body.decode(response.encoding or "utf-8", "replace"):
                raise ProbeFailed(f"HTTP {status}, but the body lacks the expected text")
    return ProbeOutcome(f"HTTP {status}")


def probe_redis_url(url: str, timeout: float) -> ProbeOutcome:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    return _ping_redis(client)


def probe_redis(
    address: Address, timeout: float, *, user: str, password: str | None
) -> ProbeOutcome:
    import redis

    client = redis.Redis(
        host=address.host,
        port=address.port,
        db=int(address.path) if address.path.isdigit() else 0,
        username=user or None,
        password=password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    return _ping_redis(client)


def _ping_redis(client) -> ProbeOutcome:  # noqa: ANN001 (redis.Redis, imported lazily)
    try:
        if not client.ping():
            raise ProbeFailed("PING was not answered with PONG")
        role = client.info("replication").get("role", "")
        return ProbeOutcome(f"PONG ({role})" if role else "PONG")
    finally:
        client.close()


def probe_postgres(params: dict, timeout: float) -> ProbeOutcome:
    """`SELECT 1` and the server's role: a replica answers but cannot take writes."""
    import psycopg2

    connection = psycopg2.connect(
        # libpq counts whole seconds (and at least 2); the caller's bound is the precise one.
        connect_timeout=max(2, math.ceil(timeout)),
        options=f"-c statement_timeout={max(1, int(timeout * 1000))}",
        application_name="bridge-health",
        **params,
    )
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1, pg_is_in_recovery()")
            _, in_recovery = cursor.fetchone()
    finally:
        connection.close()
    return ProbeOutcome("SELECT 1 (replica)" if in_recovery else "SELECT 1 (primary)")


def probe_amqp(url: str, timeout: float, transport_options: dict | None = None) -> ProbeOutcome:
    from kombu import Connection

    options = dict(transport_options or {})
    if url.startswith(("redis", "rediss")):
        options.setdefault("socket_timeout", timeout)
    with Connection(url, connect_timeout=timeout, transport_options=options) as broker:
        # One attempt: kombu's own retries wait seconds, beyond the probe's budget.
        broker.ensure_connection(max_retries=0, timeout=timeout)
    return ProbeOutcome("accepts connections")


def probe_celery(queues: list[str], timeout: float) -> ProbeOutcome:
    """Workers answer a broadcast, and every queue has a consumer.

    `active_queues` is a ping that also says what each worker consumes. Replies are collected
    for a fraction of the timeout: a live worker answers within milliseconds, and waiting the
    whole timeout would make every check of a healthy stack as slow as the timeout itself.
    """
    from bridge.celery import app

    window = min(timeout * 0.8, 1.5)
    replies = app.control.inspect(timeout=window).active_queues() or {}
    if not replies:
        raise ProbeFailed(f"no worker answered within {window:.1f} s")
    consumed = {queue["name"] for answer in replies.values() for queue in answer or []}
    missing = [queue for queue in queues if queue not in consumed]
    workers = f"{len(replies)} worker{'s' if len(replies) != 1 else ''}"
    if missing and len(missing) == len(queues):
        raise ProbeFailed(f"{workers} answered, none consumes {', '.join(missing)}")
    if missing:
        return ProbeOutcome(workers, degraded=f"no consumer on {', '.join(missing)}")
    return ProbeOutcome(f"{workers}, every queue consumed")


# --- Which probe a service gets -------------------------------------------------------------


def builtin_queues() -> list[str]:
    """The queues Bridge's own tasks go to: the default one and any declared."""
    from bridge.celery import app

    names = [app.conf.task_default_queue or "celery"]
    for queue in app.conf.task_queues or ():
        name = getattr(queue, "name", queue)
        if name not in names:
            names.append(str(name))
    return names


def _database_params() -> dict:
    database = settings.DATABASES["default"]
    params = {
        "dbname": database.get("NAME") or "postgres",
        "user": database.get("USER") or None,
        "password": database.get("PASSWORD") or None,
        "host": database.get("HOST") or None,
        "port": database.get("PORT") or None,
    }
    sslmode = (database.get("OPTIONS") or {}).get("sslmode")
    if sslmode:
        params["sslmode"] = sslmode
    return {key: value for key, value in params.items() if value is not None}


def _builtin_probe(service: Service, timeout: float) -> Callable[[], ProbeOutcome] | None:
    """Bridge's own services are probed with the live settings (credentials included)."""
    from recovery import monitor

    if service.name == monitor.BUILTIN_DATABASE:
        return lambda: probe_postgres(_database_params(), timeout)
    if service.name == monitor.BUILTIN_REDIS and settings.REDIS_URL:
        return lambda: probe_redis_url(settings.REDIS_URL, timeout)
    if service.name == monitor.BUILTIN_BROKER:
        url = settings.CELERY_BROKER_URL
        if url.startswith(("redis://", "rediss://")):
            return lambda: probe_redis_url(url, timeout)
        options = settings.CELERY_BROKER_TRANSPORT_OPTIONS
        return lambda: probe_amqp(url, timeout, options)
    if service.name == monitor.BUILTIN_WORKERS:
        return lambda: probe_celery(_queues(service.target) or builtin_queues(), timeout)
    return None


def _queues(target: str) -> list[str]:
    return [name.strip() for name in target.split(",") if name.strip()]


def probe_for(service: Service, timeout: float) -> Callable[[], ProbeOutcome]:
    """The probe of `service`, ready to run (its target parsed, its credential read)."""
    if service.builtin:
        builtin = _builtin_probe(service, timeout)
        if builtin is not None:
            return builtin
    kind = service.kind
    user, password = _credential(service, kind)
    if kind == ServiceKind.HTTP:
        return lambda: probe_http(
            service.target,
            timeout,
            expect_status=service.expect_status,
            expect_body=service.expect_body,
            token=password,
        )
    if kind == ServiceKind.CELERY:
        return lambda: probe_celery(_queues(service.target), timeout)
    address = parse_address(service.target)
    if kind == ServiceKind.TCP:
        return lambda: probe_tcp(address.host, address.port, timeout)
    if kind == ServiceKind.REDIS:
        return lambda: probe_redis(address, timeout, user=user, password=password)
    if kind == ServiceKind.POSTGRES:
        params = {
            "host": address.host,
            "port": address.port,
            "dbname": address.path or "postgres",
            "user": user,
        }
        if password:
            params["password"] = password
        return lambda: probe_postgres(params, timeout)
    if kind == ServiceKind.RABBITMQ:
        auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
        host = f"[{address.host}]" if ":" in address.host else address.host
        vhost = quote(address.path, safe="") if address.path else ""
        return lambda: probe_amqp(f"amqp://{auth}@{host}:{address.port}/{vhost}", timeout)
    raise ProbeFailed(f"no probe for kind {kind!r}")


def run_probe(probe: Callable[[], ProbeOutcome], timeout: float, *, name: str = "") -> ProbeOutcome:
    """Run `probe` and give up waiting after `timeout` seconds (raising ProbeFailed).

    The probe runs in a daemon thread that is never joined: a hung socket keeps only that
    thread, which ends when the library's own timeout (the same value) fires.
    """
    future: Future = Future()

    def work() -> None:
        try:
            future.set_result(probe())
        except BaseException as exc:  # handed to the waiting caller
            future.set_exception(exc)

    threading.Thread(target=work, name=f"probe-{name}", daemon=True).start()
    try:
        return future.result(timeout=timeout)
    except FutureTimeout:
        raise ProbeFailed(f"timed out after {timeout * 1000:.0f} ms") from None


def safe_target(url: str) -> str:
    """A URL without its user-info part, to show where a built-in service lives."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{host}:{port}" if port else host
