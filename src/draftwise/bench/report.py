"""Benchmark figures from run records: speedup, MAT, tokens/s, exactness; tables and chart.

One token counter for every method: a record's ``new_tokens`` over its ``wall_s``. Speedup of a
method in a category is its tokens/s (all its new tokens over all its wall time there) divided by
plain decoding's (``none``) tokens/s on the same turns. MAT is new tokens over target steps
(unknown for transformers peers, whose steps are not observable). Exactness is the share of turns
whose tokens equal plain decoding's; for each mismatch, the first divergent position and plain
decoding's top-2 logit margin there tell a floating-point near-tie from a bug.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["BASELINE", "first_divergence", "mark_exactness", "summarize", "markdown", "chart"]

BASELINE = "none"


def first_divergence(tokens: Sequence[int], baseline: Sequence[int]) -> int | None:
    """Index of the first differing token (a length difference counts), or None if equal."""
    for i, (a, b) in enumerate(zip(tokens, baseline, strict=False)):
        if a != b:
            return i
    return None if len(tokens) == len(baseline) else min(len(tokens), len(baseline))


def mark_exactness(records: list[dict[str, Any]]) -> None:
    """Fill ``identical``, ``first_divergence`` and ``margin`` of each record in place, against
    the record of its ``reference`` method (default: the baseline) for the same question and
    turn (greedy runs only)."""
    runs = {(r["method"], r["question_id"], r["turn"]): r for r in records}
    for record in records:
        reference = record.get("reference", BASELINE)
        base = runs.get((reference, record["question_id"], record["turn"]))
        if base is None or not record.get("greedy", True):
            record.update(identical=None, first_divergence=None, margin=None)
            continue
        first = first_divergence(record["token_ids"], base["token_ids"])
        margins = base.get("margins") or []
        margin = margins[first] if first is not None and first < len(margins) else None
        record.update(identical=first is None, first_divergence=first, margin=margin)


def _aggregate(records: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = sum(r["new_tokens"] for r in records)
    wall = sum(r["wall_s"] for r in records)
    steps = [r["steps"] for r in records if r.get("steps") is not None]
    step_tokens = sum(r["new_tokens"] for r in records if r.get("steps") is not None)
    base_rate = sum(r["new_tokens"] for r in base) / max(sum(r["wall_s"] for r in base), 1e-12)
    rate = tokens / wall if wall > 0 else 0.0
    checked = [r["identical"] for r in records if r.get("identical") is not None]
    return {
        "questions": len({r["question_id"] for r in records}),
        "turns": len(records),
        "new_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": rate,
        "speedup": rate / base_rate if base and base_rate > 0 else None,
        "mat": step_tokens / sum(steps) if steps and sum(steps) else None,
        "exact_match": sum(checked) / len(checked) if checked else None,
    }


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"methods": {name: {"overall", "categories": {cat: ...}, "mismatches"}}}``."""
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_method[record["method"]].append(record)
    baseline = by_method.get(BASELINE, [])
    methods: dict[str, Any] = {}
    for name, rows in by_method.items():
        keys = {(r["question_id"], r["turn"]) for r in rows}
        base = [r for r in baseline if (r["question_id"], r["turn"]) in keys]
        categories = sorted({r["category"] for r in rows})
        methods[name] = {
            "reference": rows[0].get("reference", BASELINE),
            "peer": rows[0].get("peer"),  # which llama.cpp build a llama.cpp peer ran
            "overall": _aggregate(rows, base),
            "categories": {
                c: _aggregate(
                    [r for r in rows if r["category"] == c], [r for r in base if r["category"] == c]
                )
                for c in categories
            },
            "mismatches": [
                {k: r[k] for k in ("question_id", "turn", "first_divergence", "margin")}
                for r in rows
                if r.get("identical") is False
            ],
        }
    return {"methods": methods}


def _fmt(value: float | None, pattern: str) -> str:
    return "–" if value is None else pattern.format(value)


def markdown(summary: dict[str, Any]) -> str:
    """The overall table, the per-category table, and the mismatch list."""
    methods = summary["methods"]
    lines = [
        "| method | tok/s | speedup | MAT | exact | turns |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, data in methods.items():
        o = data["overall"]
        lines.append(
            f"| {name} | {o['tokens_per_s']:.2f} | {_fmt(o['speedup'], '{:.2f}x')} | "
            f"{_fmt(o['mat'], '{:.2f}')} | {_fmt(o['exact_match'], '{:.0%}')} | {o['turns']} |"
        )
    others = [f"{n} against {d['reference']}" for n, d in methods.items()
              if d.get("reference", BASELINE) != BASELINE]
    if others:
        lines += ["", f"exact: greedy output identical to {BASELINE}'s; " + ", ".join(others)]
    peers = [f"{n}: {d['peer']}" for n, d in methods.items() if d.get("peer")]
    if peers:
        lines += ["", "peers: " + "; ".join(peers)]
    categories = sorted({c for data in methods.values() for c in data["categories"]})
    lines += ["", "Speedup (MAT, exact) per category:", ""]
    lines.append("| method | " + " | ".join(categories) + " |")
    lines.append("|---|" + "---:|" * len(categories))
    for name, data in methods.items():
        cells = []
        for c in categories:
            d = data["categories"].get(c)
            cells.append(
                "–" if d is None else f"{_fmt(d['speedup'], '{:.2f}x')} "
                f"({_fmt(d['mat'], '{:.2f}')}, {_fmt(d['exact_match'], '{:.0%}')})"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    mismatches = [(n, m) for n, d in methods.items() for m in d["mismatches"]]
    if mismatches:
        lines += ["", "Outputs that differ from plain decoding:", ""]
        for name, m in mismatches:
            reference = methods[name].get("reference", BASELINE)
            against = "" if reference == BASELINE else f" (against {reference})"
            lines.append(
                f"- {name}{against}: question {m['question_id']} turn {m['turn']}: first "
                f"divergence at new token {m['first_divergence']}, plain top-2 logit margin "
                f"{_fmt(m['margin'], '{:.2e}')}"
            )
    return "\n".join(lines) + "\n"


def chart_unavailable() -> str | None:
    """Why :func:`chart` cannot draw here (matplotlib missing), or None. Checked before a run,
    so a finished benchmark never fails on its optional chart."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        return f"matplotlib cannot be imported ({error}): pip install 'draftwise[bench]'"
    return None


def chart(summary: dict[str, Any], path: Path) -> None:
    """PNG: speedup and MAT per category, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = summary["methods"]
    categories = sorted({c for d in methods.values() for c in d["categories"]}) + ["overall"]
    figure, axes = plt.subplots(2, 1, figsize=(max(8, 1.3 * len(categories)) + 4, 7),
                                sharex=True)
    width = 0.8 / max(len(methods), 1)
    for i, (name, data) in enumerate(methods.items()):
        cells = [data["categories"].get(c, data["overall"] if c == "overall" else {})
                 for c in categories]
        xs = [j + i * width for j in range(len(categories))]
        axes[0].bar(xs, [cell.get("speedup") or 0 for cell in cells], width, label=name)
        axes[1].bar(xs, [cell.get("mat") or 0 for cell in cells], width, label=name)
    axes[0].axhline(1.0, color="black", linewidth=0.8)
    axes[0].set_ylabel("speedup over plain")
    axes[1].set_ylabel("MAT (tokens / step)")
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(categories))], categories,
                       rotation=30, ha="right")
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
