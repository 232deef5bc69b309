"""What the audit trail must never hold: secrets, found by the words of a key and in values.

Two nets, both applied to every event's details:

- Keys. A key is split into words (on `_`, `-`, `.`, spaces, camelCase and digit boundaries,
  lower-cased): `X-Api-Key` is `x api key`, `csrfmiddlewaretoken` one word. Its value becomes
  [REDACTED] when one of its words is a secret word, two adjacent words are a secret pair, one
  word ends like a secret noun (`oldpassword`), or the whole key is a word that is only a
  secret on its own (`key`, `access`, `refresh`), unless the whole key is a listed exception
  (`key_id`). Words, not substrings, so `monkey`, `author`, `passenger` and
  `sessions_revoked` stay readable.
- Values. Every string, whatever its key, is scanned for credentials that announce themselves:
  PEM blocks, JWTs, `Bearer`/`Basic` credentials, passwords in URLs (`postgres://u:pw@host`)
  and `name=value` / `name: value` assignments whose name is a secret key. Only the credential
  is replaced, so the surrounding text still says what happened.

A caller may name further keys to mask (`mask=("iban", "note")`), matched by whole key,
case-insensitively, at any depth.

This runs on every API request, so the key decision is cached per key and strings are only
handed to a regular expression when a cheap substring test says one could match.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Iterable
from typing import Any

REDACTED = "[REDACTED]"

# --- What is secret ------------------------------------------------------------------------

# A key holding any of these words is secret: `new_password1`, `X-Auth-Token`, `set-cookie`.
SECRET_WORDS: frozenset[str] = frozenset(
    {
        # passwords
        "password",
        "passwords",
        "passwd",
        "pwd",
        "pw",
        "pass",
        "passphrase",
        "passcode",
        # tokens, credentials and what carries them
        "secret",
        "secrets",
        "token",
        "tokens",
        "jwt",
        "bearer",
        "auth",
        "authorization",
        "credential",
        "credentials",
        "cookie",
        "cookies",
        "signature",
        "hmac",
        "plaintext",
        # a password hash's salt is half of what an offline attack needs
        "salt",
        # one-time and second-factor codes
        "pin",
        "otp",
        "totp",
        "hotp",
        # card data a log must never hold (PCI DSS), and social security numbers
        "cvv",
        "cvc",
        "ssn",
        # compound words written without a separator, matched as one word
        "sessionid",
        "csrftoken",
        "csrfmiddlewaretoken",
        "xsrftoken",
        "apikey",
        "privatekey",
        "accesskey",
        "secretkey",
        "sessionkey",
        "clientsecret",
        "cardnumber",
    }
)

# Two adjacent words that are secret together though each alone is harmless.
SECRET_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("api", "key"),
        ("private", "key"),
        ("access", "key"),
        ("secret", "key"),
        ("signing", "key"),
        ("encryption", "key"),
        ("master", "key"),
        ("client", "key"),
        ("license", "key"),
        ("session", "key"),
        ("session", "id"),
        ("mfa", "code"),
        ("recovery", "code"),
        ("recovery", "codes"),
        ("backup", "code"),
        ("backup", "codes"),
        ("verification", "code"),
        ("security", "code"),
        ("card", "number"),
        ("credit", "card"),
    }
)

# Words that are a secret only when they are the whole key: `key` is a key, `key_id` names
# one; `access` and `refresh` are the token pair's fields, `access_level` is not a token.
SECRET_WHOLE_KEYS: frozenset[str] = frozenset({"key", "access", "refresh"})

# Unambiguous nouns that make any word ending with them secret (`oldpassword`, `authtoken`);
# `key` is deliberately not one of them (`monkey`, `turkey`).
SECRET_WORD_ENDINGS: tuple[str, ...] = ("password", "passwd", "passphrase", "token", "secret")

# --- What is not ---------------------------------------------------------------------------

# Whole keys (as words) that hold a secret word but describe, count or name a secret without
# being one. Checked first.
ALLOWED_KEYS: frozenset[tuple[str, ...]] = frozenset(
    {
        ("key", "id"),
        ("key", "ids"),
        ("token", "version"),
        ("token", "type"),
        ("tokens", "revoked"),
        ("auth", "method"),
        ("auth", "type"),
        ("auth", "provider"),
        ("auth", "backend"),
        ("signature", "algorithm"),
        ("password", "changed", "at"),
    }
)

# Words are runs of capitals not followed by a lower-case letter (`API` in `APIKey`), a
# capitalised or lower-case run, or digits; everything else separates.
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")

_PEM = re.compile(
    # An unterminated block is masked to the end: the admin form caps values, cutting off END.
    r"-----BEGIN [A-Z0-9 ]{1,64}-----.*?(?:-----END [A-Z0-9 ]{1,64}-----|\Z)",
    re.DOTALL,
)
# A match may only start where a run of its characters starts (the lookbehinds): then each
# character is scanned a bounded number of times and a hostile 64 KB body stays linear.
_JWT = re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]*){2,4}")
# The credential must look like one (a digit, a symbol or a lower-to-upper case change), so
# prose such as "bearer of bad news" or "Basic configuration" is left alone.
_AUTH_SCHEME = re.compile(
    r"\b(?P<scheme>(?i:bearer|basic|token))\s+"
    r"(?=[A-Za-z0-9._~+/=-]*(?:[0-9._~+/=-]|[a-z][A-Z]))[A-Za-z0-9._~+/-]+=*"
)
_SCHEMES = frozenset({"bearer", "basic", "token"})
# The password runs to the authority's last `@` (a password may hold `@` itself).
_URL_PASSWORD = re.compile(
    r"(?<![A-Za-z0-9+.-])(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*:)[^/?#\s]+"
    r"(?=@[^@/?#\s]*(?:[/?#\s]|$))"
)
# A URL's query parameters. Without this, `scheme:` reads as an assignment whose bare value
# swallows the rest of the URL, so `otpauth://totp/...?secret=KEY` (an authenticator's key) or
# `https://host/?token=...` would pass. Masked when the parameter's name is a secret key.
_URL_QUERY_PARAM = re.compile(r"(?<=[?&;])(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)=[^&;#\s\"']*")
# A quoted value runs to its closing quote (spaces included); a bare one to a space, `&`, `;`,
# `,` or a quote, so `password=p@ss(word)` is masked whole.
_ASSIGNMENT = re.compile(
    r"(?<![A-Za-z0-9_.-])(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)"
    r"(?P<sep>[\"']?\s*[=:]\s*)"
    r"(?:(?P<quote>[\"'])(?P<quoted>[^\"'\n]{0,1024})(?P=quote)|(?P<value>[^\s&;,\"']+))"
)


@functools.lru_cache(maxsize=4096)
def key_words(key: str) -> tuple[str, ...]:
    """The lower-cased words of a key: `apiKey` and `API_KEY` are both ("api", "key")."""
    return tuple(word.lower() for word in _WORD.findall(key))


@functools.lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    """Whether a value stored under `key` must be redacted (see the module's lists)."""
    words = key_words(key)
    if not words or words in ALLOWED_KEYS:
        return False
    if len(words) == 1 and words[0] in SECRET_WHOLE_KEYS:
        return True
    for word in words:
        if word in SECRET_WORDS or word.endswith(SECRET_WORD_ENDINGS):
            return True
    return any(pair in SECRET_PAIRS for pair in itertools.pairwise(words))


@functools.lru_cache(maxsize=1024)
def _normal_key(key: str) -> str:
    # `mask` names match whatever the key's spelling: "customerNote" is "customer_note".
    return "_".join(key_words(key)) or key.casefold()


def _mask_assignment(match: re.Match[str]) -> str:
    if not is_secret_key(match["name"]):
        return match[0]
    if match["quote"]:
        quote = match["quote"]
        return f"{match['name']}{match['sep']}{quote}{REDACTED}{quote}"
    if match["value"].lower() in _SCHEMES and match.string.startswith(f" {REDACTED}", match.end()):
        # `Authorization: Bearer [REDACTED]`: the credential is already masked, the scheme
        # still tells the reader what kind it was.
        return match[0]
    return f"{match['name']}{match['sep']}{REDACTED}"


def _mask_query_param(match: re.Match[str]) -> str:
    return f"{match['name']}={REDACTED}" if is_secret_key(match["name"]) else match[0]


def redact_text(text: str) -> str:
    """`text` with every credential it holds replaced by [REDACTED], the rest kept."""
    # Each pattern runs only when its tell-tale substring is present: most strings (user
    # agents, names, paths) hold none, and `in` costs far less than a regex search.
    if "-----" in text:
        text = _PEM.sub(REDACTED, text)
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    if any(tell in text for tell in ("earer", "EARER", "asic", "ASIC", "oken", "OKEN")):
        text = _AUTH_SCHEME.sub(lambda match: f"{match['scheme']} {REDACTED}", text)
    if "://" in text:
        text = _URL_PASSWORD.sub(lambda match: f"{match['head']}{REDACTED}", text)
        if "=" in text:
            text = _URL_QUERY_PARAM.sub(_mask_query_param, text)
    if "=" in text or ":" in text:
        text = _ASSIGNMENT.sub(_mask_assignment, text)
    return text


def redact(value: Any, *, mask: Iterable[str] = ()) -> Any:
    """A JSON-ready copy of `value` with secrets replaced by [REDACTED].

    A secret key's whole value is replaced (unless it is None or a boolean, which cannot hold
    a secret and say whether one was sent); strings anywhere are scanned by `redact_text`;
    keys named in `mask` are replaced too. Tuples become lists, NaN, Infinity and non-JSON
    types become text.
    """
    masked = frozenset(_normal_key(str(name)) for name in mask)
    return _redact(value, masked)


def _redact(value: Any, masked: frozenset[str]) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        result = {}
        for key, item in value.items():
            name = key if isinstance(key, str) else str(key)
            hidden = is_secret_key(name) or (bool(masked) and _normal_key(name) in masked)
            # A bare token in a query string arrives as a key (`?eyJ...`), so keys are scanned.
            result[redact_text(name)] = (
                REDACTED
                if hidden and item is not None and not isinstance(item, bool)
                else _redact(item, masked)
            )
        return result
    if isinstance(value, list | tuple):
        if (
            len(value) == 2
            and isinstance(value[0], str)
            and is_secret_key(value[0])
            and value[1] is not None
            and not isinstance(value[1], bool)
        ):
            # A header or form field as a [name, value] pair: ["Authorization", "Token x"].
            return [redact_text(value[0]), REDACTED]
        return [_redact(item, masked) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        # NaN and Infinity are not JSON: stored as text, they would break every reader.
        return str(value)
    if isinstance(value, int | float) or value is None:
        return value
    return redact_text(str(value))
