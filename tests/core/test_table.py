"""core/table.py: columns as wide as their widest cell, names left, numbers right."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from minipissa.core.table import table

cell = st.text(alphabet="abc.xyz0123456789", min_size=1, max_size=30)


@given(st.integers(1, 5).flatmap(lambda n: st.tuples(st.lists(cell, min_size=n, max_size=n),
                                                     st.lists(st.lists(cell, min_size=n, max_size=n), max_size=6))))  # fmt: skip
def test_every_column_starts_and_ends_where_the_header_says(drawn):
    header, rows = drawn
    lines = table(header, rows)
    assert len(lines) == 1 + len(rows)
    widths = [max(len(c) for c in column) for column in zip(header, *rows)]
    for line, row in zip(lines, [header, *rows]):
        start = 0
        for i, (c, w) in enumerate(zip(row, widths)):  # name column left-aligned, the others right-aligned
            field = line[start : start + w]
            assert field == (c.ljust(w) if i == 0 else c.rjust(w)) or (i == len(row) - 1 and field == c.ljust(w).rstrip())
            start += w + 2
        assert not line.endswith(" ")


def test_left_columns_are_left_aligned():
    lines = table(["name", "n", "values"], [["a", "10", "1, 2"], ["long.name", "2", "3"]], left=(0, 2))
    assert lines == ["name        n  values", "a          10  1, 2", "long.name   2  3"]
