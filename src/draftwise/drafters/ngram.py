"""Drafters that need no model: ``none`` (plain decoding) and ``pld`` (prompt lookup).

Prompt lookup (Saxena 2023; transformers' ``prompt_lookup_num_tokens``; vLLM's n-gram proposer)
matches the last n tokens of the context, for n from ``max_ngram`` down to ``min_ngram``, against
every earlier place in prompt + output, and drafts what followed there. Where several places
match, their continuations (most recent first) are merged into one tree within ``budget`` nodes,
so common prefixes are verified once.

The index maps each n-gram to the positions it ended at; it is updated with each committed token,
so a step costs O(matches), not O(context).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from draftwise.drafters.base import StepResult, register
from draftwise.sampling import GREEDY, SamplingConfig
from draftwise.tree import DraftTree, TreeBuilder

__all__ = ["NoDraftConfig", "NoDrafter", "PromptLookupConfig", "PromptLookupDrafter"]


@dataclass(frozen=True)
class NoDraftConfig:
    """Plain decoding has no settings."""


@register("none", NoDraftConfig, "plain decoding: no draft, one token per step")
class NoDrafter:
    def __init__(self, config: NoDraftConfig) -> None:
        self.config = config

    def begin(
        self, prompt_ids: Sequence[int], sampling: SamplingConfig = GREEDY
    ) -> None:
        pass

    def propose(self, context: Sequence[int], max_depth: int) -> DraftTree:
        return DraftTree.empty()

    def observe(self, step: StepResult) -> None:
        pass


@dataclass(frozen=True)
class PromptLookupConfig:
    """Attributes:
    max_ngram: longest suffix to match (tokens).
    min_ngram: shortest suffix to match.
    depth: longest continuation drafted from one match.
    budget: most tree nodes per step.
    max_matches: most places whose continuations are merged per n.
    """

    max_ngram: int = 3
    min_ngram: int = 1
    depth: int = 8
    budget: int = 8
    max_matches: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(
                f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}"
            )
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1, got {self.budget}")
        if self.max_matches < 1:
            raise ValueError(f"max_matches must be >= 1, got {self.max_matches}")


@register("pld", PromptLookupConfig, "prompt lookup: continue n-gram matches in prompt + output")
class PromptLookupDrafter:
    def __init__(self, config: PromptLookupConfig) -> None:
        self.config = config
        self._tokens: list[int] = []
        self._ends: dict[tuple[int, ...], list[int]] = {}  # n-gram -> end positions (exclusive)

    def begin(
        self, prompt_ids: Sequence[int], sampling: SamplingConfig = GREEDY
    ) -> None:
        self._tokens = []
        self._ends = {}
        self._extend(prompt_ids)

    def _extend(self, tokens: Sequence[int]) -> None:
        cfg = self.config
        for token in tokens:
            self._tokens.append(int(token))
            end = len(self._tokens)
            for n in range(cfg.min_ngram, min(cfg.max_ngram, end) + 1):
                self._ends.setdefault(tuple(self._tokens[end - n : end]), []).append(end)

    def _sync(self, context: Sequence[int]) -> None:
        """Catch the index up with ``context`` (the engine's committed tokens)."""
        known = len(self._tokens)
        if len(context) < known or (known and context[known - 1] != self._tokens[-1]):
            self.begin(context)  # not a continuation of what we indexed: start over
        else:
            self._extend(context[len(self._tokens) :])

    def propose(self, context: Sequence[int], max_depth: int) -> DraftTree:
        cfg = self.config
        self._sync(context)
        tokens, length = self._tokens, len(self._tokens)
        depth = min(cfg.depth, max_depth)
        builder = TreeBuilder(cfg.budget)
        if depth <= 0:
            return builder.build()
        for n in range(min(cfg.max_ngram, length), cfg.min_ngram - 1, -1):
            ends = self._ends.get(tuple(tokens[length - n :]), [])
            used = 0
            for end in reversed(ends):  # most recent match first; skip the suffix itself
                if end >= length:
                    continue
                builder.add_path(tokens[end : end + depth])
                used += 1
                if used >= cfg.max_matches or builder.full:
                    break
            if builder.full:
                break
        return builder.build()

    def observe(self, step: StepResult) -> None:
        pass  # the index catches up from the context in propose()
