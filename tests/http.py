"""A tiny JSON HTTP client for tests that talk to a real server from many threads."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass


@dataclass
class Reply:
    status: int
    body: dict
    headers: dict


def call(method: str, url: str, payload: dict | None = None, token: str | None = None) -> Reply:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Reply(
                response.status, json.loads(response.read() or b"{}"), dict(response.headers)
            )
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {"raw": raw.decode(errors="replace")}
        return Reply(error.code, body, dict(error.headers))
