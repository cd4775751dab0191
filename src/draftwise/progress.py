"""Progress for long work (conversion, tuning, step cost, benchmarks): a bar on a terminal, a
start line and an end line anywhere else.

A tqdm bar redraws many times a second; when stderr is a file, a pipe or a CI log each redraw
becomes a line, so long work would print hundreds of lines. :func:`progress_bar` therefore gives
a tqdm bar only when stderr is a terminal, and otherwise an object with the same few methods
that prints ``desc ...`` when the work starts and ``desc: done (N in S s)`` when it ends.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any, Protocol

__all__ = ["Progress", "progress_bar", "quiet_transformers"]


class Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...

    def set_postfix_str(self, text: str) -> Any: ...

    def close(self) -> Any: ...


class _Lines:
    """Two lines of progress for a non-terminal stderr: one at the start, one at the end."""

    def __init__(self, total: int | None, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.count, self.postfix, self.closed = 0, "", False
        self.start = time.perf_counter()
        of = f" ({total} {_plural(unit)})" if total else ""
        print(f"{desc}{of} ...", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.count += n

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            seconds = time.perf_counter() - self.start
            print(f"{self.desc}: done ({self.count} {_plural(self.unit)} in {seconds:.1f} s)",
                  file=sys.stderr, flush=True)


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith("s") else "s")


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(
    total: int | None, desc: str, *, enabled: bool = True, unit: str = "it",
    bar_format: str | None = None,
) -> Progress:
    """A progress reporter for ``total`` units of work (see the module docstring)."""
    if not enabled:
        return _Silent()
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar: Progress = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr,
                             bar_format=bar_format)
        return bar
    return _Lines(total, desc, unit)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' own progress bars and info logs (e.g. while we convert a GGUF file
    and report our own progress)."""
    from transformers.utils import logging

    hf_logging: Any = logging  # its switches are untyped
    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
