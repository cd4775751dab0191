"""Progress for long work (conversion, tuning, step cost, benchmarks): a bar on a terminal,
sparse lines anywhere else.

A tqdm bar redraws many times a second; when stderr is a file, a pipe or a CI log each redraw
becomes a line, so long work would print hundreds of lines. :func:`progress_bar` therefore gives
a tqdm bar only when stderr is a terminal, and otherwise an object with the same few methods
that prints ``desc ...`` when the work starts, ``desc: done (N in S s)`` when it ends, and in
between, at most once per :data:`LOG_INTERVAL` seconds, how far it is (``desc: 45000/121794
toks (37%), 3.1 min, ~5.3 min left``): a log of a 15-minute feature pass is not silent.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any, Protocol

__all__ = ["LOG_INTERVAL", "Progress", "progress_bar", "quiet_transformers"]

LOG_INTERVAL = 30.0  # seconds between progress lines off a terminal


class Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...

    def set_postfix_str(self, text: str) -> Any: ...

    def close(self) -> Any: ...


class _Lines:
    """Progress lines for a non-terminal stderr: the start, the end, and one per
    :data:`LOG_INTERVAL` seconds between them."""

    def __init__(self, total: int | None, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.count, self.postfix, self.closed = 0, "", False
        self.start = self.said = time.perf_counter()
        of = f" ({total} {_plural(unit)})" if total else ""
        print(f"{desc}{of} ...", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.count += n
        now = time.perf_counter()
        if now - self.said >= LOG_INTERVAL and not self.closed and self.count != self.total:
            self.said = now
            minutes = (now - self.start) / 60
            line = f"{self.desc}: {self.count}"
            if self.total:
                line += f"/{self.total}"
            line += f" {_plural(self.unit)}"
            if self.total and self.count:
                left = minutes * (self.total - self.count) / self.count
                share = 100 * self.count / self.total
                line += f" ({share:.0f}%), {minutes:.1f} min, ~{left:.1f} min left"
            else:
                line += f", {minutes:.1f} min"
            if self.postfix:
                line += f" [{self.postfix}]"
            print(line, file=sys.stderr, flush=True)

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
