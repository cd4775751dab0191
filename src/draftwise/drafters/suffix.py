"""Suffix drafting (SuffixDecoding, Oliaro et al. 2024): continuations of the context found in
this request and in the outputs of earlier requests of the same model.

Two indexes answer the same question — where did the last tokens of the context occur before,
and what followed? — the request's own prompt + output (:class:`SuffixIndex`, grown as tokens
are committed), and a :class:`SuffixCache` of earlier requests' outputs, shared by every request
of one *tenant* (a server's API key and cache salt; a long-lived
:class:`~draftwise.api.Generator`'s requests), bounded in tokens with the oldest output evicted
first. A step finds the longest match of the context's last ``max_match`` tokens (at least
``min_match``) in both, counts the continuations of the longest matches into a trie, and drafts
its most frequent nodes first, deeper where the match is longer (a long match is a sure one).

The indexes chain every position to the last one with the same two tokens before it, and a
step extends each candidate backwards to measure its match: a step costs O(``scan``), not
O(tokens).
"""

from __future__ import annotations

import collections
import threading
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from draftwise.drafters.base import StepResult, register
from draftwise.drafters.trie import CountingTrie
from draftwise.sampling import GREEDY, SamplingConfig
from draftwise.tree import DraftTree

__all__ = ["SUFFIX_TOKENS", "SharesSuffixCache", "SuffixCache", "SuffixConfig", "SuffixDrafter",
           "SuffixIndex"]

_SHIFT = 32  # a place is (document << _SHIFT) | the position its continuation starts at
KEY = 2  # tokens every position is indexed by: the shortest match
# the default cache size, in tokens of earlier outputs over all tenants: a few hundred
# requests' worth, tens of MB at most (docs/usage.md gives the measured bytes)
SUFFIX_TOKENS = 1 << 18


class SuffixIndex:
    """Documents of token ids, every position findable by the ``KEY`` tokens before it.

    A hash chain, as LZ77 compressors keep one: ``heads`` maps each key to the most recent
    place it occurred, and each token links to the place before it with the same key, so the
    index costs a fixed few bytes per token plus one entry per distinct key. Documents are
    numbered in the order they are added; :meth:`drop` forgets the oldest (a chain ends where
    it reaches a dropped document; heads of dropped documents are cleared by rebuilding once
    dropped tokens outnumber held ones, so memory stays proportional to the tokens held)."""

    def __init__(self) -> None:
        self.docs: dict[int, array[int]] = {}
        self.tokens = 0  # tokens held
        self._links: dict[int, array[int]] = {}  # per token: the previous place of its key
        self._heads: dict[int, int] = {}  # key -> its most recent place
        self._dead = 0  # tokens of dropped documents since the last rebuild
        self._next = 0

    def add(self, tokens: Sequence[int]) -> int:
        """Hold ``tokens`` as a new document; returns its number."""
        doc = self._next
        self._next += 1
        self.docs[doc], self._links[doc] = array("i"), array("q")
        self.extend(doc, tokens)
        return doc

    def extend(self, doc: int, tokens: Sequence[int]) -> None:
        """Append ``tokens`` to document ``doc``, indexing each new position."""
        held, links, heads = self.docs[doc], self._links[doc], self._heads
        base = doc << _SHIFT
        for token in tokens:
            token = int(token)
            if held:
                key = (held[-1] << _SHIFT) | token
                links.append(heads.get(key, -1))
                held.append(token)
                heads[key] = base | len(held)
            else:
                links.append(-1)
                held.append(token)
        self.tokens += len(tokens)

    def drop(self, doc: int) -> int:
        """Forget document ``doc`` (the oldest held); returns how many tokens it held."""
        held = self.docs.pop(doc)
        del self._links[doc]
        self.tokens -= len(held)
        self._dead += len(held)
        if self._dead > max(self.tokens, 1024):
            docs, self.docs, self._links, self._heads = self.docs, {}, {}, {}
            self.tokens = self._dead = 0
            for number, tokens in docs.items():
                self.docs[number], self._links[number] = array("i"), array("q")
                self.extend(number, tokens)
        return len(held)

    def matches(self, context: Sequence[int], longest: int,
                scan: int) -> list[tuple[int, int, int]]:
        """``(length, document, position)`` of the ``scan`` most recent places whose preceding
        tokens match the end of ``context`` (at least ``KEY``, at most ``longest`` of them;
        ``position``: where the continuation starts). A match ending where its document ends
        has no continuation and is left out."""
        if len(context) < KEY:
            return []
        place = self._heads.get((int(context[-2]) << _SHIFT) | int(context[-1]), -1)
        found: list[tuple[int, int, int]] = []
        limit = min(longest, len(context))
        while place >= 0 and len(found) < scan:
            doc, end = place >> _SHIFT, place & ((1 << _SHIFT) - 1)
            held = self.docs.get(doc)
            if held is None:  # dropped: every older place is too
                break
            place = self._links[doc][end - 1]
            if end >= len(held):
                continue
            n = KEY
            while n < limit and n < end and held[end - n - 1] == context[-n - 1]:
                n += 1
            found.append((n, doc, end))
        return found


class SuffixCache:
    """Earlier requests' outputs, per tenant, at most ``max_tokens`` tokens over all tenants;
    the oldest output is evicted first (whoever's it was), so many tenants cannot grow it.

    One tenant never sees another's outputs: each has its own :class:`SuffixIndex`. Safe to
    share between threads (a server's scheduler and its request handlers)."""

    def __init__(self, max_tokens: int) -> None:
        if max_tokens < 0:
            raise ValueError(f"the suffix cache size must be >= 0 tokens, got {max_tokens}")
        self.max_tokens = max_tokens
        self.tokens = 0
        self._tenants: dict[str, SuffixIndex] = {}
        self._order: collections.deque[tuple[str, int]] = collections.deque()  # oldest first
        self._lock = threading.Lock()

    def add(self, tenant: str, tokens: Sequence[int]) -> None:
        """Keep one request's output for ``tenant``'s later requests (its last
        ``max_tokens`` tokens at most), evicting the oldest outputs to make room."""
        if self.max_tokens <= 0 or len(tokens) <= KEY:
            return
        tokens = list(tokens[-self.max_tokens :])
        with self._lock:
            while self._order and self.tokens + len(tokens) > self.max_tokens:
                owner, doc = self._order.popleft()
                index = self._tenants[owner]
                self.tokens -= index.drop(doc)
                if not index.docs:
                    del self._tenants[owner]
            own = self._tenants.get(tenant)
            if own is None:
                own = self._tenants[tenant] = SuffixIndex()
            self._order.append((tenant, own.add(tokens)))
            self.tokens += len(tokens)

    def matches(self, tenant: str, context: Sequence[int], longest: int,
                scan: int) -> list[tuple[int, list[int]]]:
        """``(length, continuation)`` of ``tenant``'s most recent matches (see
        :meth:`SuffixIndex.matches`), each continuation up to ``longest`` tokens."""
        with self._lock:
            index = self._tenants.get(tenant)
            if index is None:
                return []
            return [(n, list(index.docs[doc][end : end + longest]))
                    for n, doc, end in index.matches(context, longest, scan)]

    @property
    def tenants(self) -> int:
        return len(self._tenants)


@runtime_checkable
class SharesSuffixCache(Protocol):
    """A drafter that drafts from, and adds its requests' outputs to, a :class:`SuffixCache`
    (the engine hands it the cache and the request's tenant before ``begin``)."""

    def share(self, cache: SuffixCache | None, tenant: str) -> None: ...

    def end(self, output: Sequence[int]) -> None:
        """The request is over; ``output``: the tokens it generated."""
        ...


@dataclass(frozen=True)
class SuffixConfig:
    """Attributes:
    max_match: most context tokens a match is measured over.
    min_match: fewest context tokens that must match (at least 2, the indexes' key).
    depth: deepest draft.
    depth_per_match: drafts reach at most this many tokens per matched token (a long match
        is a sure one).
    scan: most recent places examined per index and step.
    occurrences: most continuations counted into the tree (the longest matches first).
    budget: most draft nodes.
    """

    max_match: int = 16
    min_match: int = 2
    depth: int = 16
    depth_per_match: float = 1.0
    scan: int = 32
    occurrences: int = 8
    budget: int = 16

    def __post_init__(self) -> None:
        if not KEY <= self.min_match <= self.max_match:
            raise ValueError(f"need {KEY} <= min_match <= max_match, got {self.min_match}, "
                             f"{self.max_match}")
        if self.depth_per_match <= 0:
            raise ValueError(f"depth_per_match must be > 0, got {self.depth_per_match}")
        for name in ("depth", "scan", "occurrences", "budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@register("suffix", SuffixConfig,
          "SuffixDecoding: continuations from this request and earlier outputs (a shared cache)")
class SuffixDrafter:
    def __init__(self, config: SuffixConfig) -> None:
        self.config = config
        self._own = SuffixIndex()
        self._doc = self._own.add([])
        self._cache: SuffixCache | None = None
        self._tenant = ""

    def share(self, cache: SuffixCache | None, tenant: str) -> None:
        self._cache, self._tenant = cache, tenant

    def begin(self, prompt_ids: Sequence[int], sampling: SamplingConfig = GREEDY) -> None:
        self._own = SuffixIndex()
        self._doc = self._own.add(prompt_ids)

    def _sync(self, context: Sequence[int]) -> None:
        held = self._own.docs[self._doc]
        known = len(held)
        if len(context) < known or (known and context[known - 1] != held[-1]):
            self.begin(context)  # not a continuation of what was indexed: start over
        elif len(context) > known:
            self._own.extend(self._doc, context[known:])

    def propose(self, context: Sequence[int], max_depth: int) -> DraftTree:
        cfg = self.config
        self._sync(context)
        depth = min(cfg.depth, max_depth)
        if depth <= 0:
            return DraftTree.empty()
        held = self._own.docs[self._doc]
        found = [(n, list(held[end : end + depth]))
                 for n, _, end in self._own.matches(context, cfg.max_match, cfg.scan)]
        if self._cache is not None:
            found += self._cache.matches(self._tenant, context, cfg.max_match, cfg.scan)
        found = [item for item in found if item[0] >= cfg.min_match]
        if not found:
            return DraftTree.empty()
        found.sort(key=lambda item: -item[0])  # longest first (stable: most recent first)
        trie = CountingTrie(depth)
        for n, continuation in found[: cfg.occurrences]:
            reach = min(depth, max(1, int(n * cfg.depth_per_match)))
            trie.count_path(continuation[:reach])
        return trie.draft([], cfg.budget, depth, max_prefix=0, min_prefix=0)

    def observe(self, step: StepResult) -> None:
        pass

    def end(self, output: Sequence[int]) -> None:
        if self._cache is not None:
            self._cache.add(self._tenant, output)
