"""Progress on a non-terminal stderr is two lines, not one per redraw."""

from __future__ import annotations

import pytest

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
