"""core/table.py: columns as wide as their widest cell, names left, numbers right."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from minipissa.core.table import table

cell = st.text(alphabet="abc.xyz0123456789", min_size=1, max_size=30)


def shaped(n: int) -> st.SearchStrategy[tuple[list[str], list[list[str]]]]:
    """A header of n cells and up to 6 rows of n cells."""
    row = st.lists(cell, min_size=n, max_size=n)
    return st.tuples(row, st.lists(row, max_size=6))


@given(st.integers(1, 5).flatmap(shaped))
def test_every_column_starts_and_ends_where_the_header_says(drawn):
    header, rows = drawn
    lines = table(header, rows)
    assert len(lines) == 1 + len(rows)
    widths = [max(len(c) for c in column) for column in zip(header, *rows, strict=True)]
    for line, row in zip(lines, [header, *rows], strict=True):
        start = 0
        for i, (c, w) in enumerate(zip(row, widths, strict=True)):  # the name column left-aligned, others right
            field = line[start : start + w]
            aligned = c.ljust(w) if i == 0 else c.rjust(w)
            assert field == aligned or (i == len(row) - 1 and field == aligned.rstrip())  # no trailing spaces
            start += w + 2
        assert not line.endswith(" ")


def test_left_columns_are_left_aligned():
    lines = table(["name", "n", "values"], [["a", "10", "1, 2"], ["long.name", "2", "3"]], left=(0, 2))
    assert lines == ["name        n  values", "a          10  1, 2", "long.name   2  3"]
