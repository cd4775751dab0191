"""``draftwise methods``: the registered methods, one line each."""

from __future__ import annotations

import argparse
from typing import Any

from draftwise.drafters.base import available_methods

__all__ = ["add_parser"]


def add_parser(commands: Any) -> None:
    methods = commands.add_parser("methods", help="list the registered methods (drafters)")
    methods.set_defaults(handler=_methods)


def _methods(args: argparse.Namespace) -> int:
    for name, summary in available_methods().items():
        print(f"{name:12s} {summary}")
    return 0
