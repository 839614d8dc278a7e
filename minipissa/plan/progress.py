"""apply()'s progress report: the user's callback, or a plain line on stderr (no dependency: tqdm is not needed)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def progress_reporter(progress: bool | Callable[[int, int], None], total: int) -> Callable[[int], None]:
    """A ``report(done)`` for apply's loop: the user's ``progress(done, total)``, a line on stderr, or nothing.

    On a terminal the line is rewritten in place; in a log (stderr not a terminal) a line is written at most every
    ten per cent, so a 70B model's 560 modules do not fill the log."""
    if not (isinstance(progress, bool) or callable(progress)):
        raise TypeError(
            f"minipissa: progress must be True/False or a callable progress(done, total), got {progress!r:.40}"
        )
    if callable(progress):
        return lambda done: progress(done, total)
    if not progress:
        return lambda done: None
    start = time.perf_counter()
    shown = [-1]  # the last tenth written to a log

    def report(done: int) -> None:
        stream = sys.stderr
        terminal = stream.isatty()
        tenth = done * 10 // max(total, 1)
        if not terminal and tenth == shown[0] and done != total:
            return
        shown[0] = tenth
        line = f"minipissa init: {done}/{total} modules, {time.perf_counter() - start:.1f} s"
        end = "\n" if done == total or not terminal else ""
        stream.write(("\r" if terminal else "") + line + end)
        stream.flush()

    return report
