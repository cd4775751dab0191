"""DraftTree: the guessed future tokens a drafter proposes for one step.

A tree of N nodes hangs below the *root*, the last committed token. Node ``i`` carries
``tokens[i]`` and has parent ``parents[i]`` (``-1`` for a child of the root, otherwise an earlier
node: ``parents[i] < i``). A linear draft is a degenerate tree (:meth:`DraftTree.chain`).

Drafts drawn from a distribution may carry ``draft_probs[i]``: the distribution node ``i``'s token
was drawn from, given its parent's path *and* its earlier siblings (for siblings drawn without
replacement that is the draft distribution with the earlier siblings removed). The verifier's
rejection rule needs exactly that.

This module knows nothing about models or tokenizers; every view is derived from ``parents``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["DraftTree", "TreeBuilder"]


@dataclass(frozen=True)
class DraftTree:
    """Draft tokens and their parent links; views are derived on demand.

    Attributes:
        tokens: ``[N]`` token ids.
        parents: ``[N]`` parent node index, ``-1`` for a child of the root, always ``< i``.
        draft_probs: optional ``[N, vocab]`` proposal distribution of each node's token.
    """

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    draft_probs: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError(
                f"tokens ({len(self.tokens)}) and parents ({len(self.parents)}) differ in length"
            )
        for i, parent in enumerate(self.parents):
            if not -1 <= parent < i:
                raise ValueError(f"parents[{i}] = {parent}: must be -1 or an earlier node (< {i})")
        if self.draft_probs is not None and self.draft_probs.shape[0] != len(self.tokens):
            raise ValueError(
                f"draft_probs has {self.draft_probs.shape[0]} rows for {len(self.tokens)} nodes"
            )

    # construction ---------------------------------------------------------------------------

    @classmethod
    def empty(cls) -> DraftTree:
        """No draft: the step is plain decoding."""
        return cls((), ())

    @classmethod
    def chain(cls, tokens: Sequence[int], draft_probs: torch.Tensor | None = None) -> DraftTree:
        """A linear draft ``tokens[0] -> tokens[1] -> ...`` below the root."""
        return cls(tuple(int(t) for t in tokens), tuple(range(-1, len(tokens) - 1)), draft_probs)

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]], budget: int | None = None) -> DraftTree:
        """Merge token paths into a trie (shared prefixes stored once), earlier paths first.

        Stops adding nodes once ``budget`` nodes exist; a path cut by the budget keeps its prefix.
        """
        builder = TreeBuilder(budget)
        for path in paths:
            builder.add_path(path)
        return builder.build()

    # views ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depths(self) -> list[int]:
        """Depth of each node: 0 for a child of the root."""
        depth: list[int] = []
        for parent in self.parents:
            depth.append(0 if parent < 0 else depth[parent] + 1)
        return depth

    def children(self, node: int) -> list[int]:
        """Children of ``node`` (``-1`` = root) in index order."""
        return [i for i, parent in enumerate(self.parents) if parent == node]

    def children_map(self) -> dict[int, list[int]]:
        """``{node: [children...]}`` for the root (-1) and every node that has children."""
        result: dict[int, list[int]] = {}
        for i, parent in enumerate(self.parents):
            result.setdefault(parent, []).append(i)
        return result

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's child down to ``node`` (empty for the root, -1)."""
        path: list[int] = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def path_tokens(self, node: int) -> list[int]:
        return [self.tokens[i] for i in self.path_to(node)]

    def leaves(self) -> list[int]:
        has_child = set(self.parents)
        return [i for i in range(len(self)) if i not in has_child]

    def ancestor_mask(self) -> torch.Tensor:
        """``[N+1, N+1]`` bool: row r may attend to column c (row/col 0 = root, i+1 = node i).

        Each node sees the root, its ancestors and itself — causal attention along its own path.
        """
        size = len(self) + 1
        mask = torch.zeros(size, size, dtype=torch.bool)
        mask[:, 0] = True
        for i, parent in enumerate(self.parents):
            if parent >= 0:
                mask[i + 1] = mask[parent + 1]
            mask[i + 1, i + 1] = True
        mask[0, 0] = True
        return mask

    def truncated(self, max_depth: int) -> DraftTree:
        """The subtree of nodes with depth < ``max_depth`` (indices renumbered, order kept)."""
        if max_depth <= 0:
            return DraftTree.empty()
        depths = self.depths
        keep = [i for i in range(len(self)) if depths[i] < max_depth]
        if len(keep) == len(self):
            return self
        return self.subset(keep)

    def subset(self, keep: Sequence[int]) -> DraftTree:
        """The nodes in ``keep`` (sorted, closed under parents), renumbered in order."""
        new_index = {old: new for new, old in enumerate(keep)}
        parents = tuple(new_index[self.parents[i]] if self.parents[i] >= 0 else -1 for i in keep)
        tokens = tuple(self.tokens[i] for i in keep)
        probs = None
        if self.draft_probs is not None:
            probs = self.draft_probs[torch.tensor(list(keep), dtype=torch.long)]
        return DraftTree(tokens, parents, probs)


class TreeBuilder:
    """Grows a trie of token paths under a node budget (shared prefixes are stored once)."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self._index: dict[tuple[int, int], int] = {}  # (parent, token) -> node

    @property
    def full(self) -> bool:
        return self.budget is not None and len(self.tokens) >= self.budget

    def add(self, parent: int, token: int) -> int | None:
        """The node for ``token`` under ``parent``, created if needed; None if over budget."""
        key = (parent, token)
        node = self._index.get(key)
        if node is not None:
            return node
        if self.full:
            return None
        node = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self._index[key] = node
        return node

    def add_path(self, path: Sequence[int], parent: int = -1) -> int:
        """Add ``path`` below ``parent``; returns how many of its tokens are in the tree."""
        for depth, token in enumerate(path):
            node = self.add(parent, int(token))
            if node is None:
                return depth
            parent = node
        return len(path)

    def build(self) -> DraftTree:
        return DraftTree(tuple(self.tokens), tuple(self.parents))
