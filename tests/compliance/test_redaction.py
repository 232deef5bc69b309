"""Redaction of audit details: secrets found by the words of keys and inside values, nothing
more hidden than that."""

from __future__ import annotations

import pytest

from compliance.models import AuditEvent
from compliance.redaction import REDACTED, is_secret_key, key_words, redact, redact_text

LOG = "/api/compliance/audit/log"

MUST_REDACT = [
    "password",
    "Password",
    "PASSWORD",
    "new_password1",
    "old_password",
    "oldpassword",
    "passwd",
    "pwd",
    "pass",
    "passphrase",
    "secret",
    "client_secret",
    "clientSecret",
    "SECRET_KEY",
    "secret_key",
    "token",
    "tokens",
    "access_token",
    "accessToken",
    "refresh_token",
    "id_token",
    "jwt",
    "bearer",
    "auth",
    "Authorization",
    "HTTP_AUTHORIZATION",
    "X-Auth-Token",
    "credential",
    "credentials",
    "cookie",
    "cookies",
    "Set-Cookie",
    "sessionid",
    "session_id",
    "sessionId",
    "session key",
    "csrftoken",
    "csrfmiddlewaretoken",
    "X-CSRFToken",
    "pin",
    "otp",
    "totp",
    "mfa_code",
    "mfaCode",
    "mfa-code",
    "recovery_codes",
    "private_key",
    "privateKey",
    "api_key",
    "apiKey",
    "APIKey",
    "x-api-key",
    "apikey",
    "access_key",
    "AWS_SECRET_ACCESS_KEY",
    "key",
    "Key",
    "signature",
    "X-Hub-Signature-256",
    "ssn",
    "refresh",
    "access",
    "plaintext",
    "salt",
    "card_number",
    "cardNumber",
    "cvv",
]

MUST_KEEP = [
    "key_id",
    "keyId",
    "KeyID",
    "access_level",
    "accessLevel",
    "access_log",
    "sessions_revoked",
    "session",
    "primary_key",
    "primaryKey",
    "public_key",
    "publicKey",
    "foreign_key",
    "cache_key",
    "key_name",
    "keys",
    "monkey",
    "turkey",
    "keyboard",
    "token_version",
    "token_type",
    "tokens_revoked",
    "auth_method",
    "refresh_count",
    "refreshes_before_reuse",
    "families_revoked",
    "jti",
    "author",
    "passenger",
    "bypass",
    "compass",
    "spin",
    "pinned",
    "username",
    "note",
    "code",
    "iban",
]


@pytest.mark.parametrize("key", MUST_REDACT)
def test_a_secret_key_has_its_value_redacted(key):
    assert is_secret_key(key)
    assert redact({key: "s3cr3t-value"}) == {key: REDACTED}


@pytest.mark.parametrize("key", MUST_KEEP)
def test_a_harmless_key_keeps_its_value(key):
    assert not is_secret_key(key)
    assert redact({key: "visible"}) == {key: "visible"}


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("apiKey", ("api", "key")),
        ("API_KEY", ("api", "key")),
        ("APIKey", ("api", "key")),
        ("X-CSRFToken", ("x", "csrf", "token")),
        ("new_password1", ("new", "password", "1")),
        ("db.password hint", ("db", "password", "hint")),
    ],
)
def test_keys_are_split_into_lower_case_words(key, words):
    assert key_words(key) == words


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("retry with Bearer abc.def.ghi please", f"retry with Bearer {REDACTED} please"),
        ("Basic dXNlcjpwYXNzd29yZA==", f"Basic {REDACTED}"),
        ("Authorization: Bearer abcdef123", f"Authorization: Bearer {REDACTED}"),
        (
            "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl expired",
            f"token {REDACTED} expired",
        ),
        ("postgres://bridge:pw-123@db:5432/bridge", f"postgres://bridge:{REDACTED}@db:5432/bridge"),
        ("redis://:s3cret@cache:6379/0", f"redis://:{REDACTED}@cache:6379/0"),
        (
            "https://x/cb?page=2&access_token=zzz&q=1",
            f"https://x/cb?page=2&access_token={REDACTED}&q=1",
        ),
        ("password=x", f"password={REDACTED}"),
        ("passwd=hunter2;user=bob", f"passwd={REDACTED};user=bob"),
        ("secret=abc token=def", f"secret={REDACTED} token={REDACTED}"),
        ("api_key=sk-live-123&x=1", f"api_key={REDACTED}&x=1"),
        ('{"password": "hunter2", "user": "bob"}', f'{{"password": "{REDACTED}", "user": "bob"}}'),
        (
            "key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIB\n-----END RSA PRIVATE KEY-----\nend",
            f"key:\n{REDACTED}\nend",
        ),
        ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA", REDACTED),
    ],
)
def test_credentials_inside_a_string_are_masked_in_place(text, expected):
    assert redact_text(text) == expected
    assert redact({"note": text}) == {"note": expected}


@pytest.mark.parametrize(
    "text",
    [
        "the bearer of bad news",
        "Basic configuration applied",
        "https://bridge.example.org:8443/admin/?page=2",
        "deployed at 12:30:00 on node-1",
        "page_size=50&action=auth.login.succeeded",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0",
        "key_id=k1 access_level=admin",
    ],
)
def test_ordinary_text_is_left_alone(text):
    assert redact_text(text) == text


def test_values_are_scanned_in_lists_and_nested_dicts_whatever_their_key():
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"
    details = {"items": [{"comment": f"copied {jwt}"}, ("dsn", "mysql://app:pw@db/app")]}
    assert redact(details) == {
        "items": [{"comment": f"copied {REDACTED}"}, ["dsn", f"mysql://app:{REDACTED}@db/app"]]
    }


def test_a_bare_token_sent_as_a_query_key_is_masked():
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"
    assert redact({"query": {jwt: ""}}) == {"query": {REDACTED: ""}}


def test_a_secret_key_hides_a_whole_nested_value_but_not_none_or_a_boolean():
    details = {"credentials": {"user": "bob", "pw": "x"}, "token": None, "password": False}
    assert redact(details) == {"credentials": REDACTED, "token": None, "password": False}


def test_caller_masked_keys_are_redacted_at_any_depth_case_insensitively():
    details = {"IBAN": "DE89370400440532013000", "rows": [{"Note": "call me", "iban": "x"}]}
    masked = redact(details, mask=("iban", "note"))
    assert masked == {"IBAN": REDACTED, "rows": [{"Note": REDACTED, "iban": REDACTED}]}
    assert redact(details) == details


def test_json_oddities_become_text_and_tuples_become_lists():
    assert redact({"ratio": float("nan"), "limit": float("inf"), "pair": (1, 2), 3: {4}}) == {
        "ratio": "nan",
        "limit": "inf",
        "pair": [1, 2],
        "3": "{4}",
    }


@pytest.mark.django_db
def test_a_custom_event_is_stored_without_its_secrets_but_with_its_identifiers(compliance_api):
    # given details with a secret under a camelCase key and a credential inside free text
    details = {
        "apiKey": "sk-live-4f3c2b1a",
        "key_id": "k1",
        "note": "Bearer abc.def.ghi was rotated",
    }
    # when the client records them
    response = compliance_api.post(
        LOG, {"action": "key.rotated", "details": details}, format="json"
    )
    # then neither the custom event nor the request's own event holds a secret
    assert response.status_code == 201, response.content
    stored = "\n".join(AuditEvent.objects.values_list("details", flat=True))
    assert "sk-live-4f3c2b1a" not in stored
    assert "abc.def.ghi" not in stored
    custom = AuditEvent.objects.get(action="custom.key.rotated")
    assert custom.details_data == {
        "apiKey": REDACTED,
        "key_id": "k1",
        "note": f"Bearer {REDACTED} was rotated",
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "Authorization: Token 9944b09199c62bcf9418ad846dd0e4bb",
            "Authorization: Token [REDACTED]",
        ),
        ([["Authorization", "Token x"]], [["Authorization", "[REDACTED]"]]),
        ('{"password": "s3 cret"}', '{"password": "[REDACTED]"}'),
        ("password=p@ss(word)", "password=[REDACTED]"),
        ("postgres://u:p@ss@db/x", "postgres://u:[REDACTED]@db/x"),
        ({"pw": "abc"}, {"pw": "[REDACTED]"}),
        ("http://example.org/a@b", "http://example.org/a@b"),
        ("a token of appreciation", "a token of appreciation"),
    ],
    ids=[
        "token-scheme",
        "header-pair",
        "quoted-with-space",
        "bare-with-brackets",
        "url-password-with-at",
        "pw-key",
        "at-in-path-kept",
        "prose-kept",
    ],
)
def test_shapes_found_in_review_are_masked_and_look_alikes_kept(value, expected):
    assert redact(value) == expected
