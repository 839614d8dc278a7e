"""The one validator of options and metadata: apply()'s arguments and every field a file's metadata holds are
checked by the same :class:`Check` methods, so that what apply() accepts is what a file may hold, and the reverse."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, NoReturn

#: The int64 range: JSON integers a file holds are read in it, and so apply() accepts counts and seeds in it too.
INT64 = (-(2**63), 2**63)


@dataclass(frozen=True)
class Check:
    """Field checks, each failure an ``error`` naming where, the field and the value: "<where>: <prefix><field>
    must be <expected>, got <value>; <tail>". ``where``: "minipissa" for apply()'s arguments (a ValueError), a
    file for its metadata (a StateError, with the tail saying the file is corrupted or crafted)."""

    where: str
    error: type[Exception] = ValueError
    tail: str = ""
    prefix: str = ""  # "module 'x' ": the fields of one module

    def within(self, prefix: str) -> Check:
        """The same checks for the fields of ``prefix`` (e.g. "module 'q_proj'")."""
        return replace(self, prefix=f"{self.prefix}{prefix} ")

    def refuse(self, message: str) -> NoReturn:
        """A failure that is no single field's (a rule between fields, a malformed structure)."""
        raise self.error(f"{self.where}: {self.prefix}{message}{f'; {self.tail}' if self.tail else ''}")

    def fail(self, field: str, expected: str, value: Any) -> NoReturn:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        self.refuse(f"{field} must be {expected}, got {shown}")

    def malformed(self, what: str) -> NoReturn:
        self.refuse(f"{what} is malformed")

    def integer(self, value: Any, field: str, low: int = 0, expected: str | None = None) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value < INT64[1]:
            self.fail(field, expected or f"an integer >= {low}", value)
        return value

    def number(
        self, value: Any, field: str, low: float = -math.inf, high: float = math.inf, *,
        low_open: bool = False, high_open: bool = False,
    ) -> float:  # fmt: skip
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
        if not ok:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            self.fail(field, f"a finite number in {interval}", value)
        return float(value)

    def boolean(self, value: Any, field: str) -> bool:
        if not isinstance(value, bool):
            self.fail(field, "true or false", value)
        return value

    def text(self, value: Any, field: str, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(value, str) or (choices is not None and value not in choices):
            self.fail(field, f"one of {list(choices)}" if choices else "a string", value)
        return value

    def array(self, value: Any, field: str) -> list[Any]:
        if not isinstance(value, list):
            self.fail(field, "a list", value)
        return value

    def mapping(
        self, value: Any, field: str, keys: tuple[str, ...] | None = None, optional: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            self.fail(field, "an object", value)
        if keys is not None and not set(keys) <= set(value) <= set(keys) | set(optional):
            self.fail(field, f"an object with the keys {list(keys)}", sorted(value))
        return dict(value)
