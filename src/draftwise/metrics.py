"""Per-request statistics of the decoding loop.

One token counter serves every method: ``new_tokens`` are the tokens a request committed, and
tokens/s divides them by the wall time from prefill to the last step. MAT (mean accepted tokens
per step, bonus included) is ``new_tokens / steps``: plain decoding scores exactly 1.00.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["GenerationStats"]


@dataclass
class GenerationStats:
    """Attributes:
    prompt_tokens: tokens in the prompt.
    cached_tokens: of those, tokens whose cache entries were reused, not computed (a server's
        slot that held the same prefix; :meth:`Backend.prefill`'s ``reuse``).
    new_tokens: tokens committed after the prompt.
    steps: target forward passes after prefill.
    step_tokens: tokens committed by each step (accepted + recovered/bonus).
    tree_sizes: draft nodes verified by each step.
    margins: greedy only: top-2 logit margin of the target at each committed token.
    prefill_s, draft_s, verify_s, total_s: wall time (seconds).
    finish_reason: ``eos``, ``length`` (max new tokens), ``context`` (window full) or ``stop``.
    prediction_tokens: tokens of the predicted output, if the request had one.
    accepted_prediction_tokens: of those, tokens the target accepted as drafts (the rest are
        ``rejected_prediction_tokens``, as OpenAI counts them).
    """

    prompt_tokens: int = 0
    cached_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0
    step_tokens: list[int] = field(default_factory=list)
    tree_sizes: list[int] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0
    finish_reason: str = ""
    prediction_tokens: int = 0
    accepted_prediction_tokens: int = 0

    @property
    def rejected_prediction_tokens(self) -> int:
        return max(0, self.prediction_tokens - self.accepted_prediction_tokens)

    @property
    def mat(self) -> float:
        """Mean committed tokens per step (plain decoding: 1.0)."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def histogram(self) -> dict[int, int]:
        """``{tokens committed in a step: number of steps}``."""
        return dict(sorted(Counter(self.step_tokens).items()))

    @property
    def mean_tree_size(self) -> float:
        return sum(self.tree_sizes) / len(self.tree_sizes) if self.tree_sizes else 0.0

    def summary(self) -> str:
        """One line for people: new tokens, tokens/s, MAT, where the time went."""
        return (
            f"{self.new_tokens} new tokens in {self.total_s:.2f} s = {self.tokens_per_s:.2f} tok/s"
            f" | {self.steps} steps, MAT {self.mat:.2f}, mean tree {self.mean_tree_size:.1f}"
            f" | draft {self.draft_s:.2f} s, verify {self.verify_s:.2f} s,"
            f" prefill {self.prefill_s:.2f} s | finish: {self.finish_reason}"
        )
