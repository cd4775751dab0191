"""ADED (Liu et al. 2024): an adaptive tri-gram model of the target, drafted by a tree search.

The model maps the last two tokens to a next-token distribution. It learns from the prompt, from
every committed token, and from the target's own top-k distribution at every verified node,
with exponential decay of old evidence so it follows the target as the text changes. It is kept
across requests. Contexts never seen fall back to the last token alone (a bi-gram).

Drafts are built by a Monte-Carlo-tree-search-like procedure under a node budget: each
simulation descends from the root choosing, at each node, the candidate maximizing
``P(x | two previous tokens) * (1 + c * sqrt(N(node)) / (1 + N(x)))`` (PUCT), and expands the
first candidate not yet in the tree. High-probability paths are exploited deeply, while visit
counts push later simulations to explore siblings. Children are emitted most probable first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from draftwise.drafters.base import StepResult, register
from draftwise.sampling import GREEDY, SamplingConfig, softmax_top_k_rows
from draftwise.tree import DraftTree

__all__ = ["AdedConfig", "AdedDrafter", "TrigramModel"]


@dataclass(frozen=True)
class AdedConfig:
    """Attributes:
    budget: draft nodes (one per simulation).
    max_depth: deepest draft level.
    candidates: next-token candidates considered per node.
    top_k: target top-k folded into the model at each verified node.
    decay: weight kept by old evidence at each update of a context (0..1].
    exploration: PUCT exploration constant c.
    """

    budget: int = 16
    max_depth: int = 8
    candidates: int = 4
    top_k: int = 4
    decay: float = 0.9
    exploration: float = 1.0

    def __post_init__(self) -> None:
        for name in ("budget", "max_depth", "candidates", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if self.exploration < 0.0:
            raise ValueError(f"exploration must be >= 0, got {self.exploration}")


class TrigramModel:
    """``(a, b) -> {next: weight}`` with a ``b -> {next: weight}`` fallback, decaying."""

    def __init__(self, decay: float, keep: int = 16) -> None:
        self.decay = decay
        self.keep = keep
        self.tri: dict[tuple[int, int], dict[int, float]] = {}
        self.bi: dict[int, dict[int, float]] = {}

    def _add(self, table: dict[int, float], weights: dict[int, float]) -> dict[int, float]:
        merged = {t: w * self.decay for t, w in table.items()}
        for token, weight in weights.items():
            merged[token] = merged.get(token, 0.0) + weight
        if len(merged) > self.keep:
            merged = dict(sorted(merged.items(), key=lambda kv: -kv[1])[: self.keep])
        return merged

    def update(self, a: int, b: int, weights: dict[int, float]) -> None:
        self.tri[(a, b)] = self._add(self.tri.get((a, b), {}), weights)
        self.bi[b] = self._add(self.bi.get(b, {}), weights)

    def observe_sequence(self, tokens: Sequence[int]) -> None:
        for a, b, c in zip(tokens, tokens[1:], tokens[2:], strict=False):
            self.update(int(a), int(b), {int(c): 1.0})

    def distribution(self, a: int, b: int, count: int) -> list[tuple[int, float]]:
        """The ``count`` most likely next tokens with normalized probabilities."""
        table = self.tri.get((a, b)) or self.bi.get(b)
        if not table:
            return []
        total = sum(table.values())
        best = sorted(table.items(), key=lambda kv: (-kv[1], kv[0]))[:count]
        return [(token, weight / total) for token, weight in best]


@register("aded", AdedConfig, "ADED: adaptive tri-gram model of the target + tree search")
class AdedDrafter:
    def __init__(self, config: AdedConfig) -> None:
        self.config = config
        self.model = TrigramModel(config.decay)
        self._previous = (-1, -1)  # (token before the root, root) of the current step

    def begin(
        self, prompt_ids: Sequence[int], sampling: SamplingConfig = GREEDY
    ) -> None:
        self.model.observe_sequence(prompt_ids)

    def propose(self, context: Sequence[int], max_depth: int) -> DraftTree:
        cfg = self.config
        a = int(context[-2]) if len(context) > 1 else -1
        b = int(context[-1])
        self._previous = (a, b)
        depth_limit = min(cfg.max_depth, max_depth)
        if depth_limit <= 0:
            return DraftTree.empty()
        tokens: list[int] = []  # the search tree; the root is node -1
        parents: list[int] = []
        visits: dict[int, int] = {-1: 0}
        child_of: dict[tuple[int, int], int] = {}
        priors: list[float] = []
        # the simulations revisit the same few contexts: ask the model once per context
        known: dict[tuple[int, int], list[tuple[int, float]]] = {}
        # A simulation that reaches the depth limit or an unknown context expands nothing but
        # still counts its visits, steering later ones elsewhere; the attempts are bounded.
        for _ in range(4 * cfg.budget):
            if len(tokens) >= cfg.budget:
                break
            node, pair, level = -1, (a, b), 0
            path = [-1]
            expanded = False
            while level < depth_limit:
                options = known.get(pair)
                if options is None:
                    options = known[pair] = self.model.distribution(pair[0], pair[1],
                                                                    cfg.candidates)
                if not options:
                    break
                scale = cfg.exploration * math.sqrt(visits[node] + 1)
                # PUCT, the first of the best on ties (as max() picks); inline: this loop runs
                # for every level of every simulation
                best, best_score = options[0], -math.inf
                for option in options:
                    seen = child_of.get((node, option[0]))
                    score = option[1] * (1 + scale / (1 + (visits[seen] if seen is not None
                                                           else 0)))
                    if score > best_score:
                        best, best_score = option, score
                token = best[0]
                child = child_of.get((node, token))
                if child is None:
                    child = len(tokens)
                    tokens.append(token)
                    parents.append(node)
                    priors.append(best[1] * (priors[node] if node >= 0 else 1.0))
                    child_of[(node, token)] = child
                    visits[child] = 0
                    expanded = True
                path.append(child)
                node, pair, level = child, (pair[1], token), level + 1
                if expanded:
                    break
            for visited in path:
                visits[visited] += 1
            if len(path) == 1:
                break  # the root's context is unknown: nothing can be drafted
        return _best_first(tokens, parents, priors)

    def observe(self, step: StepResult) -> None:
        tree, logits = step.tree, step.logits
        probs, indices_t = softmax_top_k_rows(logits, self.config.top_k)
        values, indices = probs.tolist(), indices_t.tolist()
        a, b = self._previous
        # each row's context pair: (token before the node, the node's token); row 0 = root
        pairs = [(a, b)] + [
            (b if parent < 0 else tree.tokens[parent], token)
            for token, parent in zip(tree.tokens, tree.parents, strict=True)
        ]
        for row, (x, y) in enumerate(pairs):
            self.model.update(x, y, dict(zip(indices[row], values[row], strict=True)))
        committed = [a, b, *step.acceptance.tokens]
        self.model.observe_sequence(committed[-(len(step.acceptance.tokens) + 2) :])


def _best_first(tokens: list[int], parents: list[int], priors: list[float]) -> DraftTree:
    """Renumber so nodes come breadth-first with siblings most probable first."""
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(parents):
        children.setdefault(parent, []).append(i)
    order: list[int] = []
    queue = [-1]
    while queue:
        node = queue.pop(0)
        kids = sorted(children.get(node, []), key=lambda i: (-priors[i], i))
        order.extend(kids)
        queue.extend(kids)
    new_index = {old: new for new, old in enumerate(order)}
    return DraftTree(
        tuple(tokens[i] for i in order),
        tuple(-1 if parents[i] < 0 else new_index[parents[i]] for i in order),
    )
