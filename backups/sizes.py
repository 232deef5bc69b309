"""Byte counts as people read them (console, panels, the commands' progress bars)."""


def size_text(count: int | None) -> str:
    """1536 -> "1.5 KiB"; bytes whole, the rest to one decimal."""
    if not count:
        return "0 B"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"
