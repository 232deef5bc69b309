from django.test import RequestFactory, override_settings

from bridge.settings import TRUSTED_PROXIES  # noqa: F401  (settings import check)
from security.ip import client_ip


def _request(remote: str, forwarded: str | None = None):
    extra = {"REMOTE_ADDR": remote}
    if forwarded is not None:
        extra["HTTP_X_FORWARDED_FOR"] = forwarded
    return RequestFactory().get("/", **extra)


def test_forwarded_for_is_ignored_without_trusted_proxies():
    assert client_ip(_request("203.0.113.7", "1.2.3.4")) == "203.0.113.7"


def test_forwarded_for_is_believed_from_a_trusted_proxy():
    import ipaddress

    with override_settings(TRUSTED_PROXIES=[ipaddress.ip_network("10.0.0.0/8")]):
        assert client_ip(_request("10.0.0.2", "198.51.100.4")) == "198.51.100.4"


def test_a_client_cannot_spoof_its_address_through_a_trusted_proxy():
    import ipaddress

    # the client sent "X-Forwarded-For: 1.1.1.1"; the proxy appended the real address
    with override_settings(TRUSTED_PROXIES=[ipaddress.ip_network("10.0.0.0/8")]):
        assert client_ip(_request("10.0.0.2", "1.1.1.1, 198.51.100.4")) == "198.51.100.4"
        assert client_ip(_request("10.0.0.2", "1.1.1.1, 198.51.100.4, 10.0.0.3")) == "198.51.100.4"


def test_untrusted_peer_forwarding_is_not_believed():
    import ipaddress

    with override_settings(TRUSTED_PROXIES=[ipaddress.ip_network("10.0.0.0/8")]):
        assert client_ip(_request("192.0.2.1", "198.51.100.4")) == "192.0.2.1"
