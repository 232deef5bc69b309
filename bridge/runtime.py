"""What `make run` needs besides settings: supervisor's paths, quiet access logs, safe error pages.

`python -m bridge.runtime env VAR_DIR` prints the shell assignments bin/run exports for
supervisord (bridge/supervisord.conf reads them as %(ENV_...)s).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

from django.http import HttpRequest
from django.views.debug import SafeExceptionReporterFilter

# sun_path holds 108 bytes on Linux (104 on the BSDs) including the final NUL; supervisord
# fails to bind beyond that, so longer paths are moved under the temp directory.
SOCKET_PATH_LIMIT = 100


def supervisor_paths(var_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Where one Bridge instance keeps supervisord's socket, pid file and logs.

    Everything lives under the instance's own var dir, so two checkouts (or two
    BRIDGE_VAR_DIRs) on one host never share a control socket or pid file. Only the socket
    may move, when its path is too long for a unix socket: to a private folder under the temp
    directory named after a hash of the var dir, which stays distinct per instance.
    """
    var = Path(var_dir).resolve()
    run_dir = var / "supervisor"
    socket = run_dir / "supervisor.sock"
    if len(str(socket)) > SOCKET_PATH_LIMIT:
        digest = hashlib.sha256(str(var).encode()).hexdigest()[:16]
        socket = Path(tempfile.gettempdir()) / f"bridge-{os.getuid()}-{digest}" / "s.sock"
    return {
        "BRIDGE_VAR_DIR": str(var),
        "BRIDGE_SUPERVISOR_DIR": str(run_dir),
        "BRIDGE_SUPERVISOR_SOCKET": str(socket),
        "BRIDGE_SUPERVISOR_PIDFILE": str(run_dir / "supervisord.pid"),
    }


def prepare_supervisor_dirs(paths: dict[str, str]) -> None:
    """Create the folders, the socket's private (0700, ours alone) even under a shared /tmp."""
    run_dir = Path(paths["BRIDGE_SUPERVISOR_DIR"])
    run_dir.mkdir(parents=True, exist_ok=True)
    socket_dir = Path(paths["BRIDGE_SUPERVISOR_SOCKET"]).parent
    if socket_dir == run_dir:
        return  # inside the instance's own var dir (and supervisord makes the socket 0700)
    socket_dir.mkdir(mode=0o700, exist_ok=True)
    info = socket_dir.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        # Someone else made it first: binding our control socket there would hand them control.
        raise SystemExit(f"{socket_dir} is not private to this user; remove it and retry")


class QuietStaticAccessFilter(logging.Filter):
    """Drops gunicorn's access-log lines for static files served fine (2xx/3xx): a console
    page loads dozens of them, which buries the requests worth reading. Failures still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        atoms = record.args if isinstance(record.args, dict) else None
        if not atoms:
            return True
        path = str(atoms.get("U") or "")
        status = str(atoms.get("s") or "")
        return not (path.startswith("/static/") and status[:1] in {"2", "3"})


# scheme://user:password@host - the password part (an empty user is allowed: redis://:pw@h).
_URL_CREDENTIALS = re.compile(r"([a-z][a-z0-9+.\-]*://[^/\s:@'\"]*):[^@\s/'\"]+@", re.I)


def scrub_url_credentials(text: str) -> str:
    """The text with the password of every URL in it replaced by stars."""
    return _URL_CREDENTIALS.sub(r"\1:********************@", text)


class SecretUrlFilter(SafeExceptionReporterFilter):
    """Error pages and error mails hide connection URLs as they hide SECRET_KEY.

    DATABASE_URL, CELERY_BROKER_URL, REDIS_URL and CACHES' LOCATION carry passwords; Django's
    default filter only matches names such as KEY or PASS. The same names are hidden in the
    request's environment (runserver copies os.environ there), and any other value or local
    variable that holds a URL with a password has that password starred out.
    """

    hidden_settings = re.compile(
        "API|AUTH|TOKEN|KEY|SECRET|PASS|SIGNATURE|HTTP_COOKIE|URL|LOCATION|BROKER|DSN", re.I
    )

    def cleanse_setting(self, key: object, value: object) -> object:
        cleansed = super().cleanse_setting(key, value)
        if isinstance(cleansed, str):  # lazy strings too, hence str() before matching
            scrubbed = scrub_url_credentials(str(cleansed))
            return scrubbed if scrubbed != str(cleansed) else cleansed
        return cleansed

    def get_traceback_frame_variables(
        self, request: HttpRequest | None, tb_frame: FrameType
    ) -> list[tuple[str, Any]]:
        variables = super().get_traceback_frame_variables(request, tb_frame)
        scrubbed = []
        for name, value in variables:
            if isinstance(name, str) and self.hidden_settings.search(name):
                value = self.cleansed_substitute
            else:
                try:
                    shown = value if isinstance(value, str) else repr(value)
                except Exception:  # a broken __repr__ is shown as Django would show it
                    shown = None
                if shown is not None and scrub_url_credentials(shown) != shown:
                    value = scrub_url_credentials(shown)
            scrubbed.append((name, value))
        return scrubbed


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] != "env":
        print("usage: python -m bridge.runtime env VAR_DIR", file=sys.stderr)
        return 2
    paths = supervisor_paths(argv[2])
    prepare_supervisor_dirs(paths)
    for name, value in paths.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
