"""The one client-IP resolver of the project (audit trail, lockout, later rate limits).

X-Forwarded-For is believed only when the direct peer is a trusted proxy (TRUSTED_PROXIES),
and then read from the right, skipping trusted hops: the first untrusted address is the client.
Anything left of it could have been written by the client itself.
"""

from __future__ import annotations

import ipaddress

from django.conf import settings
from django.http import HttpRequest


def _parse(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        return None


def _trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return any(address in network for network in settings.TRUSTED_PROXIES)


def client_ip(request: HttpRequest) -> str | None:
    """The client's address as a string, or None when the peer address is unusable."""
    cached = getattr(request, "_bridge_client_ip", None)
    if cached is not None:
        return cached or None
    peer = _parse(request.META.get("REMOTE_ADDR", ""))
    result = peer
    if peer is not None and _trusted(peer):
        hops = [hop for hop in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if hop]
        for hop in reversed(hops):
            address = _parse(hop)
            if address is None:
                break
            result = address
            if not _trusted(address):
                break
    value = str(result) if result is not None else ""
    request._bridge_client_ip = value
    return value or None
