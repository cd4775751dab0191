"""Command line: ``draftwise generate | methods | bench | serve | datastore | assemble |
train-heads``, one module per subcommand, each with its ``add_parser``.

Flags shared by several subcommands are in :mod:`draftwise.cli.flags`; sampling and training
flags are built from their config dataclasses' fields, so the CLI and the Python API cannot
drift apart. A bad flag or value exits with status 2 and one line that says what was wrong; a
bad model, method or prompt exits with status 1 and one line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from draftwise.backends.base import PromptTooLongError
from draftwise.cli import bench, files, generate, methods, serve, train_heads
from draftwise.cli.flags import Parser
from draftwise.drafters.base import UnknownMethodError
from draftwise.models import ModelError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="draftwise",
        description="Faster generation with identical output: draft cheaply, verify a token "
        "tree in one forward pass, keep what the model agrees with.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in (generate, methods, files, train_heads, serve, bench):
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        handler: Any = args.handler
        return int(handler(args))
    except (ModelError, UnknownMethodError, PromptTooLongError, ValueError,
            FileNotFoundError, ConnectionError) as error:
        print(f"draftwise: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndraftwise: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
