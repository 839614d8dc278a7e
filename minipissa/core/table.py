"""Plain-text tables (summary() and the CLI's inspect): every column as wide as its widest cell, so long module
names do not push the other columns out of line."""

from __future__ import annotations

from collections.abc import Collection, Sequence


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *, left: Collection[int] = (0,)) -> list[str]:
    """Lines of a table: the columns numbered in ``left`` left-aligned (names), the others right-aligned (numbers), two
    spaces between columns, no trailing spaces. Every row has ``len(header)`` cells."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = []
    for row in (header, *rows):
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return lines
