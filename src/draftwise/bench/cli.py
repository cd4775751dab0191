"""The ``draftwise bench`` command line."""

from __future__ import annotations

import argparse
from typing import Any


def add_bench_parser(commands: Any) -> None:
    bench = commands.add_parser("bench", help="measure methods against plain decoding")
    bench.set_defaults(handler=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    raise NotImplementedError("bench is being built")
