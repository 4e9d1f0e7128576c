"""Plain-text tables: the one formatter the CLI, the bench and the profiler print with."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(header: Sequence, rows: Sequence[Sequence]) -> str:
    """Columns padded to their widest cell, ``|`` between them, a rule under the header."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = " | ".join(str(h).ljust(w) for h, w in zip(header, widths))
    sep = "-+-".join("-" * w for w in widths)
    body = [" | ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in rows]
    return "\n".join([line, sep] + body)
