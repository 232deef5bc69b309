"""Personal data in the audit trail (hash version 2): sealing it under the data subject's key,
reading it back, and the blind indexes that keep exact search working.

Readers of events (the console, the API, reports, exports) call `reveal` on every row instead
of reading `actor_username`, `client_ip` and `details` directly: version 1 rows keep those in
their plain columns, version 2 rows in the sealed `personal` column, which reads as erased once
the subject's key is destroyed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

ERASED = "[erased]"


@dataclass(frozen=True)
class Revealed:
    """An event's personal data as a reader may show it."""

    actor_username: str
    client_ip: str | None
    details: dict = field(default_factory=dict)
    erased: bool = False


def reveal(
    *, actor_username: str, client_ip: str | None, personal: str, details: dict | str
) -> Revealed:
    """The actor, client IP and details of an event row, personal data included where it can
    still be read; `erased` when the subject's key was destroyed."""
    data = json.loads(details or "{}") if isinstance(details, str) else dict(details or {})
    if not personal:
        return Revealed(actor_username, client_ip, data)
    raise ValueError("sealed personal data needs compliance.personal's version 2 reader")
