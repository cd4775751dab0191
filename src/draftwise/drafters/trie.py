"""A counting token trie for multi-branch retrieval (the idea of Alipay's Lookahead).

Every window of ``depth`` tokens of prompt + output is inserted, counting how often each path
occurs. A query finds the longest suffix of the context (up to ``max_prefix`` tokens) present in
the trie and grows a draft tree best-first by occurrence count below it, so the most frequent
continuations — several branches of them — are verified together.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from draftwise.tree import DraftTree, TreeBuilder

__all__ = ["CountingTrie"]


class _Node:
    __slots__ = ("children", "count")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.count = 0


class CountingTrie:
    """Counts of all token paths up to ``depth`` long, grown incrementally."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.root = _Node()
        self.tokens: list[int] = []

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens, counting each path that now ends at the last token once."""
        for token in tokens:
            self.tokens.append(int(token))
            end = len(self.tokens)
            for start in range(max(0, end - self.depth), end):
                node = self.root
                for t in self.tokens[start:end]:
                    node = node.children.setdefault(t, _Node())
                node.count += 1

    def count_path(self, path: Sequence[int]) -> None:
        """Count one occurrence of each prefix of ``path`` below the root (a continuation
        found elsewhere, not a window of this trie's own tokens)."""
        node = self.root
        for token in path:
            node = node.children.setdefault(int(token), _Node())
            node.count += 1

    def _find(self, context: Sequence[int], max_prefix: int, min_prefix: int) -> _Node | None:
        for n in range(min(max_prefix, len(context)), min_prefix - 1, -1):
            node: _Node | None = self.root
            for t in context[len(context) - n :]:
                node = node.children.get(int(t)) if node is not None else None
                if node is None:
                    break
            if node is not None and node.children:
                return node
        return None

    def draft(
        self, context: Sequence[int], budget: int, max_depth: int, max_prefix: int = 4,
        min_prefix: int = 1,
    ) -> DraftTree:
        """The ``budget`` most frequent continuation nodes below the longest matched suffix."""
        builder = TreeBuilder(budget)
        start = self._find(context, max_prefix, min_prefix)
        if start is None or budget <= 0 or max_depth <= 0:
            return builder.build()
        counter = 0  # tie-break: insertion order
        heap: list[tuple[int, int, int, int, _Node]] = []
        for token, child in start.children.items():
            heapq.heappush(heap, (-child.count, counter, -1, token, child))
            counter += 1
        depth_of: dict[int, int] = {-1: -1}
        while heap and not builder.full:
            _, _, parent, token, node = heapq.heappop(heap)
            index = builder.add(parent, token)
            if index is None:
                break
            depth_of[index] = depth_of[parent] + 1
            if depth_of[index] + 1 < max_depth:
                for child_token, child in node.children.items():
                    heapq.heappush(heap, (-child.count, counter, index, child_token, child))
                    counter += 1
        return builder.build()
