"""A one-line progress bar for the backup and restore commands (a job listener)."""

from __future__ import annotations

import sys
from typing import Any

from backups.sizes import size_text
from bridge.models import Job

WIDTH = 30


class Bar:
    """Draws `[#####-----]  42%  1.2 GiB of 2.9 GiB  message` on one line of `out`."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.tty = bool(getattr(getattr(out, "_out", out), "isatty", lambda: False)())

    def __call__(self, job: Job) -> None:
        total = job.progress_total or 0
        if total:
            percent = min(100, 100 * job.progress_done // total)
            filled = WIDTH * percent // 100
            bar = f"[{'#' * filled}{'-' * (WIDTH - filled)}] {percent:3d}%"
            amount = f"{size_text(job.progress_done)} of {size_text(total)}"
        else:
            bar = f"[{'?' * WIDTH}]    "
            amount = size_text(job.progress_done)
        line = f"{bar}  {amount}  {job.progress_message}"[:160]
        if self.tty:
            self.out.write(f"\r{line:<160}", ending="")
            sys.stdout.flush()
        else:
            self.out.write(line)

    def done(self) -> None:
        if self.tty:
            self.out.write("")
