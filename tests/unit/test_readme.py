"""The README's first screen has two commands, and its test command is the one CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_the_readme_test_command() -> None:
    first_screen = (ROOT / "README.md").read_text().split("## ")[0].splitlines()
    commands = [line for line in first_screen if line.startswith("python3 -m pip install")]
    assert len(commands) == 2, commands
    test_command = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci
