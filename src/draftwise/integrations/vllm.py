"""draftwise's drafters as vLLM speculative proposers (``speculative_config`` method
``custom_class``).

vLLM loads a proposer class by module path, builds it with its ``VllmConfig``, and each decoding
step calls ``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=...)``:
row ``i`` of the batch holds its request's tokens in ``token_ids_cpu[i, :num_tokens_no_spec[i]]``
and ``sampled_token_ids[i]`` the tokens it committed this step (empty: no draft wanted). It
wants one list of draft ids per row and verifies them itself — so the output stays vLLM's own.

vLLM verifies chains, not trees: each row gets the first chain of the drafter's tree (every
drafter puts its likeliest continuation first), at most ``num_speculative_tokens`` long.

vLLM gives the proposer no request ids, and a request may move to another row between steps
(the batch is condensed when requests end). :class:`ChainProposer` follows requests by their
tokens: a row continues the request whose whole earlier sequence it starts with — the one it
held last step, else one of those beginning with the same token — else a new request begins.
A request not seen for :data:`GONE_AFTER` steps is over: its output goes to the suffix cache
(one tenant per vLLM instance) and its drafter is dropped. Methods that learn from the
target's logits (recycling, aded, lookahead) never get them here: only drafters that read
tokens (``pld``, ``suffix``, ``retrieval``, and composites of them) draft.

Classes by method (the ``model`` path of ``speculative_config``): :class:`PromptLookup`
(``pld``), :class:`Suffix` (``suffix``), and :class:`Method`, which runs the spec in
``$DRAFTWISE_VLLM_METHOD`` (any of the above with options; vLLM's worker processes inherit the
environment). Usage::

    LLM(model=..., speculative_config={"method": "custom_class", "num_speculative_tokens": 8,
                                       "model": "draftwise.integrations.vllm.Suffix"})
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from draftwise.drafters.base import Drafter, create_drafter, drafter_config, parse_method
from draftwise.drafters.suffix import SUFFIX_TOKENS, SharesSuffixCache, SuffixCache
from draftwise.tree import DraftTree

__all__ = ["GONE_AFTER", "TOKEN_ONLY", "ChainProposer", "Method", "PromptLookup", "Suffix",
           "check_token_only", "first_chain"]

METHOD_ENV = "DRAFTWISE_VLLM_METHOD"
GONE_AFTER = 4  # steps a request may go unseen before it counts as over
# methods that draft from tokens alone (the others learn from logits vLLM does not hand over)
TOKEN_ONLY = frozenset({"none", "pld", "suffix", "retrieval", "composite"})


def check_token_only(method: str) -> None:
    """Raise ValueError unless ``method`` (a draftwise spec) drafts from tokens alone."""
    name = parse_method(method)[0]
    parts = {name}
    if name == "composite":
        config = drafter_config(method)
        parts = {parse_method(p.replace(";", ","))[0] for p in config.parts}
    refused = sorted(parts - TOKEN_ONLY)
    if refused:
        raise ValueError(f"{', '.join(refused)} learn(s) from the target's logits, which vLLM "
                         f"does not give a proposer; inside vLLM: "
                         f"{', '.join(sorted(TOKEN_ONLY - {'none'}))}")


def first_chain(tree: DraftTree, limit: int) -> list[int]:
    """The path from the root through each node's first child (a drafter's likeliest
    continuation), at most ``limit`` tokens."""
    chain: list[int] = []
    parent = -1
    for node, token in enumerate(tree.tokens):
        if len(chain) >= limit:
            break
        if tree.parents[node] == parent:
            chain.append(token)
            parent = node
    return chain


class _Request:
    __slots__ = ("drafter", "tokens", "prompt", "seen")

    def __init__(self, drafter: Drafter, tokens: np.ndarray, step: int) -> None:
        self.drafter = drafter
        self.tokens = tokens
        self.prompt = len(tokens) - 1  # first seen with its first sampled token
        self.seen = step


class ChainProposer:
    """Drafts one chain per batch row with a draftwise method, following requests across
    steps and rows (see the module docstring). vLLM-free: :class:`Method` and its subclasses
    adapt it to vLLM's constructor."""

    def __init__(self, method: str, num_speculative_tokens: int, *,
                 suffix_tokens: int = SUFFIX_TOKENS) -> None:
        check_token_only(method)
        if num_speculative_tokens < 1:
            raise ValueError("num_speculative_tokens must be >= 1")
        self.method = method
        self.k = num_speculative_tokens
        self.suffix = SuffixCache(suffix_tokens) if suffix_tokens > 0 else None
        # followed requests by their first token; the request each row held last step
        self._requests: dict[int, list[_Request]] = collections.defaultdict(list)
        self._rows: dict[int, _Request] = {}
        self._step = 0

    @property
    def requests(self) -> int:
        """Requests followed now."""
        return sum(len(group) for group in self._requests.values())

    def propose(self, sampled_token_ids: Sequence[Sequence[int]], num_tokens_no_spec: Any,
                token_ids_cpu: Any, slot_mappings: Any = None) -> list[list[int]]:
        self._step += 1
        counts = np.asarray(num_tokens_no_spec).reshape(-1)
        rows = np.asarray(token_ids_cpu)
        drafts: list[list[int]] = []
        for row, sampled in enumerate(sampled_token_ids):
            n = int(counts[row]) if row < len(counts) else 0
            if n <= 0:
                drafts.append([])
                continue
            context = rows[row, :n]
            request = self._follow(row, context)
            if not sampled:  # a prefill chunk, or a request vLLM is not decoding this step
                drafts.append([])
                continue
            room = min(self.k, len(rows[row]) - n)
            tree = request.drafter.propose(context.tolist(), room) if room > 0 else None
            drafts.append(first_chain(tree, room) if tree is not None else [])
        self._forget()
        return drafts

    def _follow(self, row: int, context: np.ndarray) -> _Request:
        """The request ``context`` (in ``row``) continues, or a new one."""
        key = int(context[0])
        last = self._rows.get(row)
        candidates: list[_Request] = [last] if last is not None else []
        for request in candidates + self._requests.get(key, []):
            known = len(request.tokens)
            if known <= len(context) and np.array_equal(request.tokens, context[:known]):
                request.tokens = context.copy()
                request.seen = self._step
                self._rows[row] = request
                return request
        drafter = create_drafter(self.method)
        if isinstance(drafter, SharesSuffixCache):
            drafter.share(self.suffix, "")
        drafter.begin(context.tolist())
        request = _Request(drafter, context.copy(), self._step)
        self._requests[key].append(request)
        self._rows[row] = request
        return request

    def _forget(self) -> None:
        """End the requests not seen for :data:`GONE_AFTER` steps."""
        for key in list(self._requests):
            group = self._requests[key]
            for request in [r for r in group if self._step - r.seen >= GONE_AFTER]:
                group.remove(request)
                for row in [i for i, held in self._rows.items() if held is request]:
                    del self._rows[row]
                if isinstance(request.drafter, SharesSuffixCache):
                    request.drafter.end(request.tokens[request.prompt :].tolist())
            if not group:
                del self._requests[key]

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to load: the drafters read tokens."""


class Method(ChainProposer):
    """A draftwise method as a vLLM ``custom_class`` proposer: the class's ``METHOD``, or for
    this class the spec in ``$DRAFTWISE_VLLM_METHOD`` (default ``suffix``)."""

    METHOD: str | None = None

    def __init__(self, vllm_config: Any) -> None:
        method = self.METHOD or os.environ.get(METHOD_ENV, "").strip() or "suffix"
        super().__init__(method, int(vllm_config.speculative_config.num_speculative_tokens))


class PromptLookup(Method):
    """``pld``: prompt lookup over each request's own tokens."""

    METHOD = "pld"


class Suffix(Method):
    """``suffix``: each request's own tokens and the outputs of this instance's earlier
    requests."""

    METHOD = "suffix"
