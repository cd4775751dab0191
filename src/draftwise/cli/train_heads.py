"""``draftwise train-heads``: Medusa/Hydra draft heads trained on the model's own choices."""

from __future__ import annotations

import argparse
import json
from typing import Any

from draftwise.cli.flags import (
    HIDDEN_STATE_BACKENDS,
    add_config_flags,
    add_model_flags,
    config_from_args,
    positive_int,
)

__all__ = ["add_parser"]


def add_parser(commands: Any) -> None:
    train = commands.add_parser(
        "train-heads",
        help="train Medusa/Hydra draft heads for a model (on its own greedy choices)",
        description="One target pass over a corpus gives each position's hidden state and the "
        "target's choice; small heads learn to guess the next few choices. Shows progress, "
        "checkpoints each epoch (--resume continues), prints held-out accuracy per head.",
    )
    add_model_flags(train)
    train.add_argument("--data", default="pydoc",
                       help="'pydoc' (CPython's documentation topics, the default) or a "
                       ".jsonl/.txt corpus")
    train.add_argument("--out", required=True, help="the head file to write (.safetensors)")
    train.add_argument("--backend", choices=HIDDEN_STATE_BACKENDS, default="auto",
                       help="the backend whose hidden states the heads learn (default: auto)")
    train.add_argument("--resume", action="store_true", help="continue from OUT.ckpt")
    train.add_argument("--distill", type=int, default=0, metavar="N",
                       help="also train on the model's own greedy answers to N generated "
                       "prompts (see --self-written; cached; default: 0)")
    train.add_argument("--distill-tokens", type=positive_int, default=192,
                       help="longest self-distilled answer (default: 192)")
    train.add_argument("--self-written", type=float, default=0.5, metavar="FRACTION",
                       help="the share of the N prompts the model writes itself (a kind of "
                       "request about a word of its vocabulary, sampled); the rest from "
                       "templates (default: 0.5)")
    from draftwise.heads_train import TrainConfig

    add_config_flags(train, TrainConfig)
    train.set_defaults(handler=_train_heads)


def _train_heads(args: argparse.Namespace) -> int:
    from pathlib import Path

    from draftwise.api import Generator
    from draftwise.heads_train import (
        TrainConfig,
        distill,
        distill_prompts,
        self_written_prompts,
        train_heads,
    )
    from draftwise.models import default_cache_dir, load_model

    config = config_from_args(args, TrainConfig)
    if config.kind not in ("medusa", "hydra"):
        raise ValueError(f"--kind must be medusa or hydra, got {config.kind!r}")
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    loaded = load_model(args.model, cache_dir=args.cache_dir)
    generator = Generator(loaded, "none", cache_dir=cache, backend=args.backend)
    extra: list[Any] = []
    if args.distill > 0:
        saved = cache / "heads" / (f"distill-{loaded.name}-{args.distill}-{args.distill_tokens}"
                                   f"-{args.self_written:g}-{config.seed}.json")
        if saved.is_file():
            extra = json.loads(saved.read_text(encoding="utf-8"))
        else:
            written = round(args.distill * args.self_written)
            prompts = distill_prompts(args.distill - written, config.seed)
            if written:
                prompts += self_written_prompts(generator, written, config.seed)
            extra = distill(generator, prompts, args.distill_tokens)
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(extra), encoding="utf-8")
    result = train_heads(generator.backend, loaded.tokenizer, loaded.name, args.data,
                         Path(args.out), config, cache, resume=args.resume, extra=extra)
    last = result["history"][-1] if result["history"] else {}
    print(json.dumps({"out": args.out, "positions": result["positions"],
                      "held_out_positions": result["held_out"],
                      "train_minutes": round(result["train_s"] / 60, 1),
                      "held_out_top1": last.get("top1"), "held_out_chained": last.get("chained")}))
    return 0
