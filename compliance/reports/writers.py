"""Report writers: CSV (every cell safe against formula injection), streamed JSON, and PDF with
a summary page (parameters, counts, charts) followed by the rows as a table.

Rows arrive once, as a `RowStream` that counts them, stops at REPORT_MAX_ROWS (and says so)
and tallies the charts' buckets as they pass, so no writer holds the rows in memory (the PDF
keeps the first PDF_MAX_ROWS for its table, and says so). Each writer writes to the path it
is given; the service writes a temporary file and renames it once complete.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

# The PDF is a document to read, not a data export: past this many rows its table stops (the
# summary page and the manifest say so, and the counts and charts still cover every row).
PDF_MAX_ROWS = 1000
# A chart of categories shows the largest ones; the rest are summed as "other".
CHART_CATEGORIES = 12
# A time chart shows at most this many buckets; later ones are summed in a last bar.
_MAX_BUCKETS = 120
# How often the row stream reports progress.
PROGRESS_EVERY = 5000

MEDIA_TYPES = {"csv": "text/csv", "json": "application/json", "pdf": "application/pdf"}
TRUNCATED_MARK = "# TRUNCATED"

# A spreadsheet reads a cell starting with one of these as a formula (or, for tab and carriage
# return, may drop them and read what follows as one): OWASP "CSV injection". Full-width forms
# are included because some spreadsheets normalise them to the ASCII operators.
_FORMULA_STARTS = frozenset("=+-@\t\r\n\uff1d\uff0b\uff0d\uff20")
_json_text = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), sort_keys=True, default=str
).encode


def json_text_of(value: Any) -> str:
    """Compact canonical JSON text (sorted keys, UTF-8), as the audit trail stores details."""
    return _json_text(value)


def safe_cell(value: Any) -> str:
    """A value as CSV cell text that no spreadsheet runs as a formula.

    A cell starting with =, +, -, @, a tab or a carriage return (or one of them after leading
    whitespace, which spreadsheets skip) is prefixed with a single quote, which spreadsheets
    show as text and never evaluate. None is an empty cell; dicts and lists are compact JSON;
    booleans are true/false.
    """
    kind = type(value)
    if kind is str:
        text = value
    elif value is None:
        return ""
    elif kind is bool:
        return "true" if value else "false"
    elif kind is dict or kind is list:
        text = _json_text(value)
    else:
        text = str(value)
    if not text:
        return text
    first = text[0]
    if first in _FORMULA_STARTS:
        return "'" + text
    if first.isspace():
        rest = text.lstrip()
        if rest and rest[0] in _FORMULA_STARTS:
            return "'" + text
    return text


# --- Rows -------------------------------------------------------------------------------------


@dataclass
class Chart:
    """A bar chart tallied as rows pass: `key(row)` names the bar(s) a row adds one to.

    `period` (from, to exclusive) makes it a time chart: keys are ISO times cut to the day,
    month or year (chosen from the period's length), and empty buckets are shown as zeros.
    """

    title: str
    key: Callable[[tuple], str | Iterable[str] | None]
    period: tuple[datetime, datetime] | None = None
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.period is not None:
            days = (self.period[1] - self.period[0]).days
            self.unit = "day" if days <= 31 else "month" if days <= 731 else "year"
            self.cut = {"day": 10, "month": 7, "year": 4}[self.unit]
            self.title = f"{self.title} per {self.unit}"
            time_key, cut = self.key, self.cut

            def bucket(row: tuple) -> str | None:
                moment = time_key(row)
                return moment[:cut] if isinstance(moment, str) else None

            self.key = bucket

    def bars(self) -> list[tuple[str, int]]:
        """(label, count) in display order: every bucket of the period, or the largest
        categories and "other"."""
        if self.period is None:
            ranked = self.counts.most_common()
            shown = ranked[:CHART_CATEGORIES]
            rest = sum(count for _, count in ranked[CHART_CATEGORIES:])
            return [*shown, *([("other", rest)] if rest else [])]
        start, end = self.period
        labels: list[str] = []
        day = start.date()
        last = (end - timedelta(microseconds=1)).date()
        while day <= last and len(labels) < _MAX_BUCKETS:
            label = day.isoformat()[: self.cut]
            if not labels or labels[-1] != label:
                labels.append(label)
            day = _next_bucket(day, self.unit)
        bars = [(label, self.counts.get(label, 0)) for label in labels]
        if day <= last:
            # A period of centuries: the rest in one bar, named, rather than left out.
            shown = set(labels)
            rest = sum(count for label, count in self.counts.items() if label not in shown)
            bars.append((f"{day.isoformat()[: self.cut]} on", rest))
        return bars


def _next_bucket(day: date, unit: str) -> date:
    if unit == "day":
        return day + timedelta(days=1)
    if unit == "month":
        if day.year == 9999 and day.month == 12:
            return date.max
        return date(day.year + (day.month == 12), day.month % 12 + 1, 1)
    return date(day.year + 1, 1, 1) if day.year < 9999 else date.max


class RowStream:
    """The rows of a report, read once: counted, capped at `limit`, tallied into the charts.

    After iteration, `count` is the number of rows given out and `truncated` says whether the
    source held more than `limit` (the row past the limit was read to know it, and dropped).
    """

    def __init__(
        self,
        rows: Iterable[tuple],
        *,
        limit: int,
        charts: list[Chart] | tuple[Chart, ...] = (),
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        self._rows = rows
        self.limit = limit
        self.charts = list(charts)
        self._on_progress = on_progress
        self.count = 0
        self.truncated = False
        self.finished = False

    def __iter__(self) -> Iterator[tuple]:
        if self.finished:
            raise RuntimeError("a report's rows can be read once")
        tallies = [(chart.key, chart.counts) for chart in self.charts]
        limit, report, count = self.limit, self._on_progress, 0
        source = iter(self._rows)
        try:
            for row in source:
                if count >= limit:
                    self.truncated = True
                    break
                count += 1
                for key, counts in tallies:
                    bucket = key(row)
                    if bucket is None:
                        continue
                    if type(bucket) is str:
                        counts[bucket] += 1
                    else:
                        counts.update(bucket)
                if report is not None and count % PROGRESS_EVERY == 0:
                    self.count = count
                    report(count)
                yield row
        finally:
            self.count = count
            self.finished = True
            close = getattr(source, "close", None)
            if close is not None:
                close()  # a generator holding a database cursor releases it now


@dataclass
class ReportContent:
    """What a writer writes: the header (the manifest's parameters, known before the rows),
    the columns, the rows, and `summary()` (counts and evidence, known once the rows are read).
    """

    title: str
    header: dict[str, Any]
    columns: tuple[str, ...]
    rows: RowStream
    summary: Callable[[], dict[str, Any]]
    # Relative widths of the PDF table's columns.
    widths: tuple[float, ...] = ()


@dataclass
class WriteResult:
    rows_in_file: int
    caps: list[str]
    media_type: str


def truncation_note(stream: RowStream) -> str:
    return (
        f"The report stopped after {stream.limit} rows (REPORT_MAX_ROWS): the period holds "
        "more. Narrow the period or the filters to see every row."
    )


def _sync(handle: Any) -> None:
    handle.flush()
    os.fsync(handle.fileno())


# --- CSV --------------------------------------------------------------------------------------


# A cell start (the row's start, or right after the separator) a spreadsheet could run: one of
# the formula characters, possibly after whitespace. Rows joined with \x1f are searched once;
# only a row where it matches goes through `safe_cell` cell by cell.
_SEPARATOR = "\x1f"
_RISKY_START = re.compile(r"(?:^|\x1f)\s*[=+\-@\t\r\n\uff1d\uff0b\uff0d\uff20]")


def write_csv(path: Path, content: ReportContent) -> WriteResult:
    """RFC 4180 CSV in UTF-8 with a byte order mark (so spreadsheets read it as UTF-8), one
    header row, then the rows; a truncated report ends with a `# TRUNCATED` row saying so.

    Every cell is `safe_cell`'s: text cells are first checked a row at a time (one search of
    the joined row finds any cell that starts like a formula), since a million rows of fourteen
    cells each would otherwise spend most of the report's time in per-cell calls."""
    stream = content.rows
    with open(path, "w", encoding="utf-8", newline="", buffering=1 << 20) as handle:
        handle.write("\ufeff")
        writer = csv.writer(handle, lineterminator="\r\n")
        writerow = writer.writerow
        writerow([safe_cell(name) for name in content.columns])
        cell, join, risky = safe_cell, _SEPARATOR.join, _RISKY_START.search
        for row in stream:
            cells = [value if type(value) is str else cell(value) for value in row]
            if risky(join(cells)) is not None:
                cells = [cell(value) for value in cells]
            writerow(cells)
        caps = []
        if stream.truncated:
            caps.append(truncation_note(stream))
            writerow([TRUNCATED_MARK, safe_cell(caps[-1])])
        _sync(handle)
    return WriteResult(stream.count, caps, MEDIA_TYPES["csv"])


# --- JSON -------------------------------------------------------------------------------------


def write_json(path: Path, content: ReportContent) -> WriteResult:
    """One JSON document, written as the rows arrive (never the whole list in memory):
    `{"manifest": <parameters>, "columns": [...], "rows": [{column: value}...],
    "end": {"rows", "truncated", "caps", "counts"}}`. The detached manifest adds the file's
    size and SHA-256, which the file cannot hold about itself."""
    stream = content.rows
    encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode
    columns = content.columns
    with open(path, "w", encoding="utf-8", buffering=1 << 20) as handle:
        write = handle.write
        write('{"manifest":' + encode(content.header))
        write(',"columns":' + encode(list(columns)) + ',"rows":[')
        separator = "\n"
        for row in stream:
            write(separator + encode(dict(zip(columns, row, strict=True))))
            separator = ",\n"
        caps = [truncation_note(stream)] if stream.truncated else []
        end = {
            "rows": stream.count,
            "truncated": stream.truncated,
            "max_rows": stream.limit,
            "caps": caps,
            **content.summary(),
        }
        write('\n],"end":' + encode(end) + "}\n")
        _sync(handle)
    return WriteResult(stream.count, caps, MEDIA_TYPES["json"])


# --- PDF --------------------------------------------------------------------------------------


def _pdf_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict | list):
        text = _json_text(value)
    else:
        text = str(value)
    # One line per cell: control characters would break the table's layout.
    return "".join(" " if ch < " " or ch == "\x7f" else ch for ch in text)


def _para(text: Any, style: Any) -> Any:
    from reportlab.platypus import Paragraph

    return Paragraph(escape(_pdf_text(text)), style)


def _bar_chart(chart: Chart, width: float, height: float) -> Any:
    from reportlab.graphics.charts.barcharts import VerticalBarChart
    from reportlab.graphics.shapes import Drawing, String
    from reportlab.lib import colors

    bars = chart.bars()
    drawing = Drawing(width, height)
    drawing.add(String(width / 2, height - 12, chart.title, textAnchor="middle", fontSize=10))
    if not bars or not any(count for _, count in bars):
        drawing.add(String(width / 2, height / 2, "No rows", textAnchor="middle", fontSize=9))
        return drawing
    plot = VerticalBarChart()
    plot.x, plot.y = 45, 55
    plot.width, plot.height = width - 60, height - 80
    plot.data = [[count for _, count in bars]]
    # Days as MM-DD: the year is in the title's period, and 31 full dates do not fit.
    day_chart = chart.period is not None and chart.unit == "day"
    plot.categoryAxis.categoryNames = [label[5:] if day_chart else label[:24] for label, _ in bars]
    plot.categoryAxis.labels.fontSize = 6
    plot.categoryAxis.labels.angle = 45 if len(bars) > 8 else 0
    plot.categoryAxis.labels.boxAnchor = "ne" if len(bars) > 8 else "n"
    plot.valueAxis.valueMin = 0
    plot.valueAxis.valueMax = max(count for _, count in bars) * 1.1
    plot.valueAxis.labels.fontSize = 7
    plot.bars[0].fillColor = colors.HexColor("#2f6db5")
    plot.bars[0].strokeColor = None
    drawing.add(plot)
    return drawing


def write_pdf(path: Path, content: ReportContent) -> WriteResult:
    """A summary page (parameters, counts, evidence, caps, charts), then the first
    PDF_MAX_ROWS rows as a table. Every row is still read: the counts and charts cover all."""
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4, landscape
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.lib.units import mm
    from reportlab.platypus import (
        LongTable,
        PageBreak,
        SimpleDocTemplate,
        Spacer,
        Table,
        TableStyle,
    )

    stream = content.rows
    columns = content.columns
    page_width, _ = landscape(A4)
    margin = 10 * mm
    usable = page_width - 2 * margin
    weights = content.widths or tuple(1.0 for _ in columns)
    total = sum(weights)
    col_widths = [usable * weight / total for weight in weights]
    font_size = 6
    # Helvetica averages about half its size per character.
    limits = [max(4, int(width / (font_size * 0.52))) for width in col_widths]
    shortened = False
    table_rows: list[list[str]] = []
    for row in stream:
        if len(table_rows) >= PDF_MAX_ROWS:
            continue  # still read: the counts and charts cover every row
        cells = []
        for value, limit in zip(row, limits, strict=True):
            text = _pdf_text(value)
            if len(text) > limit:
                text = text[: limit - 1] + "\u2026"
                shortened = True
            cells.append(text)
        table_rows.append(cells)
    summary = content.summary()
    caps = []
    if stream.truncated:
        caps.append(truncation_note(stream))
    if stream.count > len(table_rows):
        caps.append(
            f"This PDF lists the first {len(table_rows)} of {stream.count} rows (a PDF holds at "
            f"most {PDF_MAX_ROWS}); the counts and charts cover every row. Generate the CSV or "
            "JSON format for all of them."
        )
    if shortened:
        caps.append(
            "Cells longer than their column are shortened in this PDF (ending in \u2026); the "
            "CSV and JSON formats hold every value whole."
        )

    styles = getSampleStyleSheet()
    small = styles["BodyText"].clone("small", fontSize=8, leading=10)
    header = content.header
    report = header.get("report", {})
    story: list[Any] = [
        _para(f"Bridge compliance report: {content.title}", styles["Title"]),
        _para(
            f"Period {header['parameters']['from']} to {header['parameters']['to']} "
            "(whole days, UTC)",
            styles["Heading3"],
        ),
    ]
    facts: list[tuple[str, Any]] = [
        ("Report", report.get("id")),
        ("Type", f"{content.title} ({report.get('type')})"),
        (
            "Period (UTC)",
            f"{header['parameters']['period_from']} up to (not including) "
            f"{header['parameters']['period_to']}",
        ),
        ("Filters", header["parameters"].get("filters") or "none"),
        ("Generated (UTC)", header.get("generated_at")),
        ("Generator", header.get("generator")),
        ("Requested by", header.get("requested_by") or "system"),
        ("Rows", f"{stream.count}" + (" (truncated)" if stream.truncated else "")),
    ]
    checkpoint = header.get("checkpoint") or {}
    if checkpoint.get("number") is not None:
        facts.append(
            (
                "Audit checkpoint",
                f"#{checkpoint['number']} at seq {checkpoint.get('seq')}, hash "
                f"{checkpoint.get('hash')}, signed by {checkpoint.get('key_id')} at "
                f"{checkpoint.get('time')}",
            )
        )
    else:
        facts.append(("Audit checkpoint", "none published"))
    if checkpoint.get("problem"):
        facts.append(("Audit chain problem", checkpoint["problem"]))
    for name, value in summary.items():
        facts.append((name.replace("_", " ").capitalize(), value))
    facts.append(("Caps", " ".join(caps) if caps else "none: every row is in this file"))
    fact_table = Table(
        [[_para(name, small), _para(value, small)] for name, value in facts],
        colWidths=[45 * mm, usable - 45 * mm],
    )
    fact_table.setStyle(
        TableStyle(
            [
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LINEBELOW", (0, 0), (-1, -1), 0.25, colors.lightgrey),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
                ("TOPPADDING", (0, 0), (-1, -1), 2),
            ]
        )
    )
    story += [fact_table, Spacer(1, 4 * mm)]
    charts = [chart for chart in stream.charts if chart.counts or chart.period is not None]
    if charts:
        chart_width = usable / len(charts[:2])
        drawings = [_bar_chart(chart, chart_width, 62 * mm) for chart in charts[:2]]
        story.append(Table([drawings], colWidths=[chart_width] * len(drawings)))
    story.append(PageBreak())
    story.append(_para(f"Rows ({len(table_rows)} of {stream.count})", styles["Heading3"]))
    if caps:
        story.append(_para(" ".join(caps), small))
    data = [list(columns), *table_rows]
    grid = LongTable(data, colWidths=col_widths, repeatRows=1)
    grid.setStyle(
        TableStyle(
            [
                ("FONT", (0, 0), (-1, -1), "Helvetica", font_size),
                ("FONT", (0, 0), (-1, 0), "Helvetica-Bold", font_size),
                ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#dde6f2")),
                ("LINEBELOW", (0, 0), (-1, -1), 0.2, colors.lightgrey),
                ("TOPPADDING", (0, 0), (-1, -1), 1),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 1),
                ("LEFTPADDING", (0, 0), (-1, -1), 2),
                ("RIGHTPADDING", (0, 0), (-1, -1), 2),
            ]
        )
    )
    story.append(grid)

    footer = f"Bridge compliance report {report.get('id')}"
    period = header["parameters"]

    def on_page(canvas: Any, document: Any) -> None:
        canvas.saveState()
        canvas.setFont("Helvetica", 7)
        canvas.drawString(margin, 6 * mm, f"{footer}, page {document.page}")
        canvas.restoreState()

    document = SimpleDocTemplate(
        str(path),
        pagesize=landscape(A4),
        leftMargin=margin,
        rightMargin=margin,
        topMargin=margin,
        bottomMargin=12 * mm,
        title=f"Bridge compliance report: {content.title}",
        author=str(header.get("generator", "Bridge")),
        subject=f"{report.get('type')} {period['from']}..{period['to']}",
        creator=str(header.get("generator", "Bridge")),
    )
    document.build(story, onFirstPage=on_page, onLaterPages=on_page)
    with open(path, "rb+") as handle:
        _sync(handle)
    return WriteResult(len(table_rows), caps, MEDIA_TYPES["pdf"])


WRITERS: dict[str, Callable[[Path, ReportContent], WriteResult]] = {
    "csv": write_csv,
    "json": write_json,
    "pdf": write_pdf,
}


def iso_utc(moment: datetime | None) -> str | None:
    """An aware time as ISO text in UTC (microseconds), as the audit trail writes times."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="microseconds")
