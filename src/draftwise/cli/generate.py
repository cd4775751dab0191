"""``draftwise generate``: one prompt, streamed, then a stats line (``--compare``: against plain
decoding, see :mod:`draftwise.bench.compare`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from draftwise.bench.compare import COMPARE_RUNS, PlainComparison
from draftwise.cli.flags import (
    add_backend_flags,
    add_budget_flag,
    add_config_flags,
    add_constraint_flags,
    add_model_flags,
    config_from_args,
    constraint_from_args,
    positive_int,
)
from draftwise.method import MethodSpec, parse_budget
from draftwise.sampling import SamplingConfig

__all__ = ["add_parser"]


def add_parser(commands: Any) -> None:
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
    gen.add_argument("--prediction", default=None, metavar="FILE",
                     help="a text the output is expected to resemble (a file to edit, a "
                     "document to rewrite): drafted from as the output follows it; the output "
                     "is the same without it (OpenAI's Predicted Outputs)")
    gen.add_argument(
        "--compare", action="store_true",
        help="also run plain decoding; print the speedup (medians of "
        f"{COMPARE_RUNS} alternating runs of each) and whether the outputs are identical",
    )
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_constraint_flags(gen)
    sampling = gen.add_argument_group("sampling (temperature 0 = greedy)")
    add_config_flags(sampling, SamplingConfig)
    gen.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    from draftwise.api import Generator
    from draftwise.models import load_model

    sampling = config_from_args(args, SamplingConfig)
    args.method = str(MethodSpec.parse(args.method, draft=args.draft, heads=args.heads))
    parse_budget(args.budget)
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
    prediction = None
    if args.prediction is not None:
        with open(args.prediction, encoding="utf-8") as file:
            prediction = file.read()
    comparison = (PlainComparison(generator, prompt_ids, config, args.stop, constrain)
                  if args.compare else None)
    stream = generator.stream_ids(prompt_ids, config, args.stop, constraint, prediction)
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
    line = stats.summary() + _backend_report(generator.backend.capabilities, result)
    if prediction is not None:
        result.update(accepted_prediction_tokens=stats.accepted_prediction_tokens,
                      rejected_prediction_tokens=stats.rejected_prediction_tokens)
        line += (f" | prediction: {stats.accepted_prediction_tokens} tokens accepted, "
                 f"{stats.rejected_prediction_tokens} rejected")
    if constraint is not None:
        line += _constraint_report(spec, constraint, stream.text, stats.finish_reason, result)
    if comparison is not None:
        measured = comparison.measure(stream)
        result.update(measured)
        line += comparison.line(measured, args.method)
    if args.json:
        print(json.dumps(result))
    else:
        print("\n" + line)
    return 0


def _backend_report(caps: Any, result: dict[str, Any]) -> str:
    """The stats line's note on tensors run in float32 (no quantized kernel for their type) and
    on a backend running without its kernels; both go into ``result`` too."""
    fallback, slow = list(caps.float32_tensors), caps.slow_reason
    line = ""
    if fallback or slow:
        result.update(float32_tensors=fallback, slow_reason=slow)
        if fallback:
            from draftwise.backends.quant import float32_summary

            line += f" | float32 (no quantized kernel): {float32_summary(fallback)}"
        if slow:
            line += f" | without quantized kernels: {slow}"
    return line


def _constraint_report(spec: Any, constraint: Any, text: str, finish_reason: str,
                       result: dict[str, Any]) -> str:
    """Whether the output is valid for the grammar, and the grammar's costs (into ``result``
    too)."""
    from draftwise.constraints import check_output

    complete = finish_reason == "eos" or constraint.is_accepting()
    valid, why = check_output(spec, text, complete)
    cs = constraint.stats
    result["constraint"] = {
        "kind": spec.kind, "valid": valid, "invalid_reason": why or None,
        "compile_ms": 1e3 * cs.compile_s, "mask_us": cs.mask_us, "masks": cs.masks,
        "forced_tokens": cs.forced, "pruned_nodes": cs.pruned,
    }
    return (
        f"\n{spec.kind.replace('_', ' ')}: {'valid' if valid else 'INVALID (' + why + ')'}"
        f" | compile {1e3 * cs.compile_s:.1f} ms, {cs.masks} masks at {cs.mask_us:.0f} us,"
        f" {cs.forced} forced tokens, {cs.pruned} draft nodes pruned"
    )


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
