"""Composite drafting: several drafters' trees merged by shared prefixes in one budget.

Each part proposes its own tree; nodes are taken from the parts in turn (round-robin, each
part's nodes in its own order, so parents come first) into one trie, where identical prefixes
are stored once — the fusion of RASD-style retrieval + model drafts. Every part observes every
verified step, and per-part statistics record how many of its nodes were verified and accepted
(a node proposed by several parts counts for each).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from draftwise.drafters.base import Drafter, StepResult, create_drafter, register
from draftwise.drafters.suffix import SharesSuffixCache, SuffixCache
from draftwise.sampling import GREEDY, SamplingConfig
from draftwise.tree import DraftTree, TreeBuilder

__all__ = ["CompositeConfig", "CompositeDrafter"]


@dataclass(frozen=True)
class CompositeConfig:
    """Attributes:
    parts: method specs of the parts, separated by '+', e.g. pld+recycling (a part's own
        options separated by ';': pld:max_ngram=4;depth=6+recycling).
    budget: most nodes of the merged tree.
    """

    parts: tuple[str, ...] = field(default=("pld", "recycling"), metadata={"methods": True})
    budget: int = 24

    def __post_init__(self) -> None:
        if len(self.parts) < 1:
            raise ValueError("parts must name at least one method")
        if "composite" in {p.split(":")[0] for p in self.parts}:
            raise ValueError("a composite cannot contain a composite")
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1, got {self.budget}")


@dataclass
class PartStats:
    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


@register("composite", CompositeConfig, "several drafters' trees merged by shared prefixes")
class CompositeDrafter:
    def __init__(self, config: CompositeConfig) -> None:
        self.config = config
        self.parts: list[tuple[str, Drafter]] = [
            (p, create_drafter(p.replace(";", ","))) for p in config.parts
        ]
        self.stats: dict[str, PartStats] = {name: PartStats() for name, _ in self.parts}
        self._paths: dict[tuple[int, ...], set[str]] = {}

    def begin(
        self, prompt_ids: Sequence[int], sampling: SamplingConfig = GREEDY
    ) -> None:
        for _, part in self.parts:
            part.begin(prompt_ids, sampling)

    def propose(self, context: Sequence[int], max_depth: int) -> DraftTree:
        trees = [(name, part.propose(context, max_depth)) for name, part in self.parts]
        builder = TreeBuilder(self.config.budget)
        mapped: dict[str, dict[int, int]] = {name: {} for name, _ in trees}
        owners: dict[int, set[str]] = {}
        longest = max((len(tree) for _, tree in trees), default=0)
        for i in range(longest):
            for name, tree in trees:
                if i >= len(tree):
                    continue
                parent = tree.parents[i]
                if parent >= 0 and parent not in mapped[name]:
                    continue  # its parent did not fit the budget
                node = builder.add(-1 if parent < 0 else mapped[name][parent], tree.tokens[i])
                if node is None:
                    continue
                mapped[name][i] = node
                owners.setdefault(node, set()).add(name)
        merged = builder.build()
        self._paths = {tuple(merged.path_tokens(i)): owners[i] for i in range(len(merged))}
        return merged

    def share(self, cache: SuffixCache | None, tenant: str) -> None:
        for _, part in self.parts:
            if isinstance(part, SharesSuffixCache):
                part.share(cache, tenant)

    def end(self, output: Sequence[int]) -> None:
        for _, part in self.parts:
            if isinstance(part, SharesSuffixCache):
                part.end(output)

    def report(self) -> dict[str, dict[str, float]]:
        """Per-part counts of verified and accepted nodes (cumulative)."""
        return {
            name: {"proposed": s.proposed, "accepted": s.accepted, "acceptance": s.acceptance}
            for name, s in self.stats.items()
        }

    def observe(self, step: StepResult) -> None:
        tree, accepted = step.tree, set(step.acceptance.path)
        for node in range(len(tree)):
            # the verified tree may be a pruned copy: find each node's owners by its path
            for name in self._paths.get(tuple(tree.path_tokens(node)), ()):
                self.stats[name].proposed += 1
                self.stats[name].accepted += node in accepted
        for _, part in self.parts:
            part.observe(step)
