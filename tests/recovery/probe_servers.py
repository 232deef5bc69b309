"""Small real servers the recovery tests run in a thread: an HTTP server whose answers a test
changes as it goes (a health page, a webhook receiver), and service rows with names of their
own (breakers live in Redis or the database beyond one test)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from recovery.models import Service


class ScriptedAnswers:
    """What the server answers, and what it was sent."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b"all good"
        self.received: list[dict[str, Any]] = []
        self.url = ""


@contextmanager
def scripted_http_server() -> Iterator[ScriptedAnswers]:
    peer = ScriptedAnswers()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.send_response(peer.status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(peer.body)))
            self.end_headers()
            self.wfile.write(peer.body)

        def do_GET(self) -> None:
            self._answer()

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            peer.received.append(
                {"path": self.path, "headers": dict(self.headers), "json": json.loads(raw)}
            )
            self._answer()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    peer.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield peer
    finally:
        server.shutdown()
        server.server_close()


def make_service(**fields: Any) -> Service:
    """A service with a name no other test (or earlier run) used."""
    fields.setdefault("name", f"t-{uuid.uuid4().hex[:10]}")
    fields.setdefault("kind", "http")
    fields.setdefault("timeout_ms", 2000)
    return Service.objects.create(**fields)
