"""``draftwise generate --compare``: one prompt's method against plain decoding, timed fairly.

A run of a few seconds on a shared CPU varies by more than the difference being measured, so
both methods are timed :data:`COMPARE_RUNS` times, alternating (the streamed run is the
method's first), and their medians compared. Both are warmed up first, so neither pays the
first-call costs; each repeat of the method starts a fresh drafter and sizer warmed up as the
first was, so tables learned on this very prompt (recycling, aded) do not flatter the figure.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from draftwise.api import Generator, TextStream
from draftwise.constraints import Constraint
from draftwise.engine import GenerationConfig

__all__ = ["COMPARE_RUNS", "PlainComparison", "compare_runs"]

COMPARE_RUNS = 3  # timed runs of each method, alternating


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


class PlainComparison:
    """Times ``generator``'s method against plain decoding on one prompt.

    Build it before the method's own (streamed) run: it warms both methods up."""

    def __init__(self, generator: Generator, prompt_ids: list[int], config: GenerationConfig,
                 stop: Sequence[str], constrain: Callable[[], Constraint | None]) -> None:
        self.generator, self.prompt_ids, self.config = generator, prompt_ids, config
        self.stop, self.constrain = tuple(stop), constrain
        self.plain = generator.with_method("none")
        self.warm = GenerationConfig(max_new_tokens=2, sampling=config.sampling,
                                     seed=config.seed, eos_token_ids=config.eos_token_ids)
        generator.engine.generate(prompt_ids, self.warm, constrain())
        self.plain.engine.generate(prompt_ids, self.warm, constrain())

    def _finish(self, generator: Generator) -> TextStream:
        stream = generator.stream_ids(self.prompt_ids, self.config, self.stop, self.constrain())
        for _ in stream:
            pass
        return stream

    def measure(self, first: TextStream) -> dict[str, Any]:
        """After the method's streamed run ``first``: the medians, the speedup, and whether
        the outputs are identical (else where they part and plain's margin there)."""
        method_rates, plain_rates = [first.run.stats.tokens_per_s], []
        plain: TextStream | None = None
        for i in range(COMPARE_RUNS):
            run = self._finish(self.plain)
            plain = plain or run
            plain_rates.append(run.run.stats.tokens_per_s)
            if i + 1 < COMPARE_RUNS:
                fresh = self.generator.with_method(self.generator.method)
                fresh.engine.generate(self.prompt_ids, self.warm, self.constrain())
                method_rates.append(self._finish(fresh).run.stats.tokens_per_s)
        assert plain is not None
        comparison = compare_runs(first.run.tokens, plain.run.tokens, plain.run.stats)
        method_rate = statistics.median(method_rates)
        plain_rate = statistics.median(plain_rates)
        return {"speedup": method_rate / plain_rate, "identical": comparison["identical"],
                "plain_tokens_per_s": plain_rate, "median_tokens_per_s": method_rate,
                "compare_runs": COMPARE_RUNS, "first_divergence": comparison["first_divergence"],
                "margin": comparison["margin"]}

    @staticmethod
    def line(result: dict[str, Any], method: str) -> str:
        """The stats line's comparison part."""
        line = (
            f"\nplain: {result['plain_tokens_per_s']:.2f} tok/s vs {method} "
            f"{result['median_tokens_per_s']:.2f} tok/s (medians of {COMPARE_RUNS} alternating "
            f"runs) | speedup {result['speedup']:.2f}x"
            f" | identical: {'yes' if result['identical'] else 'NO'}"
        )
        if not result["identical"]:
            line += (f" (first divergence at new token {result['first_divergence']},"
                     f" plain top-2 logit margin there {result['margin']})")
        return line
