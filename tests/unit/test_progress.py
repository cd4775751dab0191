"""Progress on a non-terminal stderr: a start line, an end line, and a line per half minute
between them — not one per redraw."""

from __future__ import annotations

import pytest

from draftwise import progress
from draftwise.progress import progress_bar


def test_progress_off_a_terminal_prints_a_start_and_an_end_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bar = progress_bar(500, "step cost", unit="size")
    for _ in range(500):
        bar.update()
        bar.set_postfix_str("c=1.0")
    bar.close()
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0] == "step cost (500 sizes) ..."
    assert lines[1].startswith("step cost: done (500 sizes in ")


def test_disabled_progress_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    bar = progress_bar(3, "quiet", enabled=False)
    bar.update(3)
    bar.close()
    assert capsys.readouterr().err == ""


def test_long_work_off_a_terminal_says_how_far_it_is(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    bar = progress_bar(480, "target pass", unit="tok")
    for _ in range(480):  # 2 tokens a second (exact in binary), a line per 30 s of it
        clock[0] += 0.5
        bar.update()
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "target pass (480 toks) ..."
    assert lines[1] == "target pass: 60/480 toks (12%), 0.5 min, ~3.5 min left"
    assert lines[-2] == "target pass: 420/480 toks (88%), 3.5 min, ~0.5 min left"
    assert len(lines) == 2 + 7
    assert lines[-1] == "target pass: done (480 toks in 240.0 s)"
