"""Signed compliance reports: audit trail, access review, GDPR requests, SOX changes, security
events and backup evidence, as CSV, JSON or PDF, each with a manifest and a detached Ed25519
signature (README "Reports").

- `services`: start_report, generate_inline, generate_report_job, verify_report_file, ...
- `sources`: one row generator per report type
- `writers`: CSV (formula-injection safe), streamed JSON, PDF with a summary page and a chart
- `signing`: the manifest's signature with the audit signing key
- `verify`: the verification core, without Django (`python -m compliance.reports.verify`)

The services are imported on first use rather than here: `python -m compliance.reports.verify`
imports this package, and must run on an auditor's machine without Django or a database.
"""

from __future__ import annotations

import importlib
from typing import Any

_SERVICES = (
    "ReportRefused",
    "ReportTampered",
    "Verdict",
    "generate_inline",
    "generate_report_job",
    "open_report_file",
    "read_companion",
    "reap_reports",
    "record_download",
    "report_files",
    "report_path",
    "start_report",
    "verify_report_file",
)
_WRITERS = ("safe_cell",)

__all__ = [*_SERVICES, *_WRITERS]


def __getattr__(name: str) -> Any:
    if name in _SERVICES:
        return getattr(importlib.import_module("compliance.reports.services"), name)
    if name in _WRITERS:
        return getattr(importlib.import_module("compliance.reports.writers"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
