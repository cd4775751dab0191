"""``draftwise bench --structured``: speculation under JSON Schema constraints.

Schemas come from a folder of MaskBench-style files (each a JSON object with ``schema`` and
optionally ``tests``/``description``) or a JSONL file of such objects. For each schema the model
is asked for a matching JSON object; every method (plain constrained decoding ``none`` first,
always) generates under the compiled schema, interleaved like the question bench. Reported:

* compile time per schema (first compile, not the cache) and the schemas llguidance refused, with
  its message (never replaced by a looser grammar);
* mask time: microseconds per mask and per generated token;
* forced-token share: tokens the grammar alone decided (emitted as free drafts or without a step);
* speedup of each method over constrained plain decoding (end to end, and decode only: schema
  prompts are long and every method pays the same prefill), MAT, exactness against it;
* validity of every output: complete, parses, and validates with ``jsonschema`` (independent of
  the grammar engine).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from draftwise.api import Generator
from draftwise.bench.report import BASELINE, mark_exactness
from draftwise.constraints import ConstraintSpec, GrammarError, check_output
from draftwise.engine import GenerationConfig
from draftwise.progress import progress_bar

__all__ = ["Schema", "load_schemas", "run_structured", "summarize_structured", "markdown"]

PROMPT = (
    "Write one JSON value that is valid for this JSON Schema. Use realistic values and reply "
    "with the JSON only.\n\nSchema:\n{schema}"
)


@dataclass(frozen=True)
class Schema:
    name: str
    schema: Any


def load_schemas(path: str | Path, limit: int | None = None) -> list[Schema]:
    """Schemas from a folder of ``*.json`` MaskBench files or a JSONL file, in name order;
    ``limit``: that many, spread evenly over them (MaskBench's files are grouped by source)."""
    path = Path(path)
    items: list[Schema] = []
    if path.is_dir():
        for file in sorted(path.glob("*.json")):
            items.append(Schema(file.stem, _schema_of(json.loads(file.read_text()), file.name)))
    elif path.is_file():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                data = json.loads(line)
                name = str(data.get("name") or data.get("description") or f"line {n}")
                items.append(Schema(name, _schema_of(data, f"{path.name}:{n}")))
    else:
        raise FileNotFoundError(f"no schema folder or JSONL file at {path}")
    if not items:
        raise ValueError(f"{path} holds no schemas")
    if limit and limit < len(items):  # spread evenly: the files are grouped by source
        items = [items[i * len(items) // limit] for i in range(limit)]
    return items


def _schema_of(data: Any, where: str) -> Any:
    if not isinstance(data, dict) or "schema" not in data:
        raise ValueError(f"{where}: expected an object with a 'schema' field")
    return data["schema"]


Record = dict[str, Any]


def run_structured(
    generator: Generator,
    schemas: Sequence[Schema],
    methods: Sequence[str],
    config: GenerationConfig,
    *,
    whitespace: str = "compact",
    progress: bool = True,
    on_record: Callable[[Record], None] | None = None,
) -> tuple[list[Record], list[Record]]:
    """Returns ``(run records, schema records)``: one run record per (schema, method); one
    schema record per schema (compile time, or why it was refused or skipped)."""
    names = [BASELINE] + [m for m in methods if m != BASELINE]
    generators = {name: generator.with_method(name) for name in names}
    runs: list[Record] = []
    schema_records: list[Record] = []
    warm = GenerationConfig(max_new_tokens=4, sampling=config.sampling, seed=config.seed,
                            eos_token_ids=config.eos_token_ids)
    warmed = False
    bar = progress_bar(len(schemas), "structured bench", enabled=progress, unit="schema")
    for index, item in enumerate(schemas):
        spec = ConstraintSpec("json_schema", json.dumps(item.schema), whitespace)
        info: Record = {"schema": item.name}
        try:
            first = generator.constrain(spec)
            info["compile_ms"] = 1e3 * first.stats.compile_s
        except GrammarError as error:
            info["refused"] = str(error)
            schema_records.append(info)
            bar.update()
            continue
        prompt_ids = generator.encode(PROMPT.format(schema=json.dumps(item.schema)))
        if len(prompt_ids) + config.max_new_tokens > generator.backend.max_length:
            info["skipped"] = f"prompt of {len(prompt_ids)} tokens + output exceeds the window"
            schema_records.append(info)
            bar.update()
            continue
        if not warmed:  # first-call costs off the clock, for every method
            for name in names:
                generators[name].engine.generate(prompt_ids, warm, generator.constrain(spec))
            warmed = True
        info["prompt_tokens"] = len(prompt_ids)
        schema_records.append(info)
        order = names[index % len(names) :] + names[: index % len(names)]
        for name in order:
            constraint = generator.constrain(spec)
            start = time.perf_counter()
            stream = generators[name].stream_ids(prompt_ids, config, (), constraint)
            for _ in stream:
                pass
            wall = time.perf_counter() - start
            stats = stream.run.stats
            complete = stats.finish_reason == "eos" or constraint.is_accepting()
            valid, why = check_output(spec, stream.text, complete)
            record: Record = {
                "question_id": item.name, "turn": 0, "method": name,
                "greedy": config.sampling.greedy,
                "token_ids": list(stream.run.tokens), "new_tokens": stats.new_tokens,
                "wall_s": wall, "prefill_s": stats.prefill_s, "steps": stats.steps,
                "margins": stats.margins,
                "finish_reason": stats.finish_reason, "valid": valid, "invalid_reason": why,
                "forced": constraint.stats.forced, "masks": constraint.stats.masks,
                "mask_s": constraint.stats.mask_s, "pruned": constraint.stats.pruned,
                "mean_tree_size": stats.mean_tree_size, "text": stream.text,
            }
            runs.append(record)
            if on_record is not None:
                on_record(record)
        bar.set_postfix_str(item.name[:30])
        bar.update()
    bar.close()
    mark_exactness(runs)
    return runs, schema_records


def summarize_structured(runs: list[Record], schemas: list[Record]) -> dict[str, Any]:
    compiled = [s["compile_ms"] for s in schemas if "compile_ms" in s]
    refused = [s for s in schemas if "refused" in s]
    base = [r for r in runs if r["method"] == BASELINE]
    base_rate = _rate(base)
    methods: dict[str, Any] = {}
    for name in dict.fromkeys(r["method"] for r in runs):
        rows = [r for r in runs if r["method"] == name]
        tokens = sum(r["new_tokens"] for r in rows)
        steps = sum(r["steps"] for r in rows)
        checked = [r["identical"] for r in rows if r.get("identical") is not None]
        masks = sum(r["masks"] for r in rows)
        mask_s = sum(r["mask_s"] for r in rows)
        methods[name] = {
            "schemas": len(rows),
            "new_tokens": tokens,
            "tokens_per_s": _rate(rows),
            "speedup": _rate(rows) / base_rate if base_rate else None,
            "decode_tokens_per_s": _rate(rows, decode=True),
            "decode_speedup": (_rate(rows, decode=True) / _rate(base, decode=True)
                               if base and _rate(base, decode=True) else None),
            "mat": tokens / steps if steps else None,
            "forced_share": sum(r["forced"] for r in rows) / tokens if tokens else 0.0,
            "mask_us": 1e6 * mask_s / masks if masks else 0.0,
            "mask_us_per_token": 1e6 * mask_s / tokens if tokens else 0.0,
            "valid": sum(r["valid"] for r in rows),
            "identical": sum(checked) if checked else None,
            "checked": len(checked),
        }
    return {
        "schemas": len(schemas),
        "compiled": len(compiled),
        "refused": len(refused),
        "skipped": sum("skipped" in s for s in schemas),
        "compile_ms": _spread(compiled),
        "refusals": {s["schema"]: s["refused"] for s in refused},
        "methods": methods,
    }


def _rate(rows: list[Record], decode: bool = False) -> float:
    """Tokens per second of wall time; ``decode``: without the prompt's prefill (schema
    prompts can be thousands of tokens, and every method pays the same prefill)."""
    wall = sum(r["wall_s"] - (r.get("prefill_s", 0.0) if decode else 0.0) for r in rows)
    return sum(r["new_tokens"] for r in rows) / wall if wall > 0 else 0.0


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "max": ordered[-1],
    }


def markdown(summary: dict[str, Any]) -> str:
    c = summary["compile_ms"] or {"median": 0.0, "p90": 0.0, "max": 0.0}
    lines = [
        f"schemas: {summary['schemas']} | compiled {summary['compiled']} "
        f"(compile ms median {c['median']:.1f}, p90 {c['p90']:.1f}, max {c['max']:.1f}) | "
        f"refused {summary['refused']} | skipped {summary['skipped']}",
        "",
        "| method | schemas | tok/s | speedup | decode tok/s | decode speedup | MAT "
        "| forced share | mask us | mask us/token | valid | identical |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in summary["methods"].items():
        speedup = f"{m['speedup']:.2f}x" if m["speedup"] is not None else "-"
        decode = f"{m['decode_speedup']:.2f}x" if m["decode_speedup"] is not None else "-"
        mat = f"{m['mat']:.2f}" if m["mat"] is not None else "-"
        identical = f"{m['identical']}/{m['checked']}" if m["identical"] is not None else "-"
        lines.append(
            f"| {name} | {m['schemas']} | {m['tokens_per_s']:.1f} | {speedup} "
            f"| {m['decode_tokens_per_s']:.1f} | {decode} | {mat} "
            f"| {m['forced_share']:.0%} | {m['mask_us']:.0f} | {m['mask_us_per_token']:.0f} "
            f"| {m['valid']}/{m['schemas']} | {identical} |"
        )
    return "\n".join(lines) + "\n"

