"""Token Recycling (Luo et al. 2024): recycle the target's rejected candidates as drafts.

An adjacency table ``[vocab, k]`` holds, for each token, the k tokens the target most recently
ranked highest right after it. After every verified step, the row of every verified node's token
(the root and rejected nodes included) is overwritten with the top-k of that node's logits. The
table is kept across requests. A draft expands a fixed tree template breadth-first from the last
token: template node ``(r0, r1, ...)`` is the ``r1``-th successor of the ``r0``-th successor of
the root token, and so on.

The template here is ours: all rank paths ordered by ``prod 1 / (1 + r)**width_decay``, best
first, up to ``max_nodes`` and ``max_depth`` — wide near the root, deep along rank 0, the shape
of the paper's static tree. The engine's sizer trims it to what pays on the machine.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from draftwise.drafters.base import StepResult, register
from draftwise.sampling import GREEDY, SamplingConfig, top_k_rows
from draftwise.tree import DraftTree

__all__ = ["RecyclingConfig", "TokenRecyclingDrafter", "rank_template"]


@dataclass(frozen=True)
class RecyclingConfig:
    """Attributes:
    k: successors kept per token (the table's width).
    max_nodes: nodes in the tree template.
    max_depth: deepest level of the template.
    width_decay: how fast lower-ranked branches lose priority (larger = narrower tree).
    """

    k: int = 8
    max_nodes: int = 32
    max_depth: int = 6
    width_decay: float = 1.5

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.max_nodes < 1:
            raise ValueError(f"max_nodes must be >= 1, got {self.max_nodes}")
        if self.max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {self.max_depth}")
        if self.width_decay <= 0:
            raise ValueError(f"width_decay must be > 0, got {self.width_decay}")


def rank_template(k: int, max_nodes: int, max_depth: int, decay: float) -> list[tuple[int, ...]]:
    """Rank paths, best first (parents always before children)."""
    frontier: list[tuple[float, tuple[int, ...]]] = [(-1.0 / (1 + r) ** decay, (r,)) for r in
                                                      range(k)]
    heapq.heapify(frontier)
    chosen: list[tuple[int, ...]] = []
    while frontier and len(chosen) < max_nodes:
        negative, path = heapq.heappop(frontier)
        chosen.append(path)
        if len(path) < max_depth:
            for r in range(k):
                heapq.heappush(frontier, (negative / (1 + r) ** decay, (*path, r)))
    return chosen


@register("recycling", RecyclingConfig, "Token Recycling: successors table from target top-k")
class TokenRecyclingDrafter:
    def __init__(self, config: RecyclingConfig) -> None:
        self.config = config
        self.template = rank_template(
            config.k, config.max_nodes, config.max_depth, config.width_decay
        )
        self.table: np.ndarray | None = None  # [vocab, k] successor ids, -1 = unknown
        self._root = -1

    def begin(
        self, prompt_ids: Sequence[int], sampling: SamplingConfig = GREEDY
    ) -> None:
        pass  # the table is kept across requests

    def propose(self, context: Sequence[int], max_depth: int) -> DraftTree:
        self._root = int(context[-1])
        table = self.table
        if table is None or self._root >= table.shape[0] or max_depth <= 0:
            return DraftTree.empty()
        tokens: list[int] = []
        parents: list[int] = []
        node_of: dict[tuple[int, ...], int] = {}
        for path in self.template:
            if len(path) > max_depth:
                continue
            parent = node_of.get(path[:-1], -1) if len(path) > 1 else -1
            if len(path) > 1 and path[:-1] not in node_of:
                continue  # the parent had no known successor
            parent_token = self._root if parent < 0 else tokens[parent]
            token = int(table[parent_token, path[-1]])
            if token < 0:
                continue
            node_of[path] = len(tokens)
            tokens.append(token)
            parents.append(parent)
        return DraftTree(tuple(tokens), tuple(parents))

    def observe(self, step: StepResult) -> None:
        logits = step.logits  # [N + 1, vocab]
        if self.table is None:
            self.table = np.full((logits.shape[-1], self.config.k), -1, dtype=np.int64)
        top = top_k_rows(logits, self.config.k)[1].numpy()  # [N + 1, k]
        self.table[np.array((self._root, *step.tree.tokens), dtype=np.int64)] = top
