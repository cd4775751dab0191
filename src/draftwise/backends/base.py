"""Backend contract: a model plus the KV cache of the one sequence in flight.

The cache holds every committed token except the last one, the *root*. Each step runs the root and
the draft tree's nodes in one forward pass (:meth:`Backend.forward_tree`), so the same call with
an empty tree is plain decoding. :meth:`Backend.commit` keeps the root and the accepted path in the
cache and makes the step's last emitted token the new root.

:class:`KVBackend` implements that bookkeeping once; a concrete backend supplies only the forward
pass over ``(ids, positions, mask)`` and the cache operations. Backends know nothing about
drafters, tokenizers or acceptance rules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from draftwise.tree import DraftTree

__all__ = ["Backend", "Capabilities", "KVBackend", "PromptTooLongError", "sliding_window_mask"]


def sliding_window_mask(mask: torch.Tensor | None, positions: torch.Tensor, past: int,
                        reach: int) -> torch.Tensor:
    """What a sliding-window layer's rows see: ``[T, past + T]`` bool, the keys ``mask``
    allows (None: causal) that lie less than ``reach`` positions before the row's own
    (transformers' ``kv_idx > q_idx - sliding_window``). The cache's committed slots
    ``0 .. past - 1`` hold positions ``0 .. past - 1``; the rows are at ``positions``."""
    t = len(positions)
    if mask is None:
        mask = torch.ones(t, past + t, dtype=torch.bool).tril(diagonal=past)
    keys = torch.cat([torch.arange(past), positions])
    return mask & (keys[None, :] > positions[:, None] - reach)


class PromptTooLongError(ValueError):
    """The prompt does not fit the model's context window."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend does, declared when it is built (never probed).

    Attributes:
        hidden_states: :meth:`KVBackend.commit` sets ``last_hidden``, and the backend is a
            :class:`~draftwise.backends.decoder.DecoderBackend` whose ``lm_head_rows`` and
            ``embed_rows`` draft heads read.
        exact: every tree row gets, bit for bit, what plain decoding gets for the same tokens,
            so greedy output equals plain greedy decoding with no near-tie caveat.
        reuses_prefix: :meth:`KVBackend.prefill` may keep cached tokens: a prompt prefilled at
            once gets, bit for bit, what prefilling a part and computing the rest gets.
        shared_pass: several sequences' trees can be verified in one pass that reads the
            weights once (:class:`~draftwise.backends.batch.SequencePool`).
        cost_tag: what the step-cost curve depends on beyond the model and backend class
            (a kernel build, activation and cache types).
        float32_tensors: ``"name (type)"`` of each tensor run in float32 for want of a kernel.
        slow_reason: why the backend runs without its fast path, or None.
    """

    hidden_states: bool = False
    exact: bool = False
    reuses_prefix: bool = False
    shared_pass: bool = False
    cost_tag: str = ""
    float32_tensors: tuple[str, ...] = ()
    slow_reason: str | None = None


class Backend(Protocol):
    """What the engine needs from a model."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_length(self) -> int:
        """Context window: the most tokens (prompt + output) a sequence may hold."""
        ...

    @property
    def length(self) -> int:
        """Committed tokens, the root included."""
        ...

    def prefill(self, ids: Sequence[int], reuse: int = 0) -> int:
        """Start a sequence on ``ids``; returns how many of its ``reuse`` cached tokens were
        kept rather than computed."""
        ...

    def forward_tree(self, tree: DraftTree) -> torch.Tensor:
        """``[N + 1, vocab]`` logits: row 0 after the root, row ``i + 1`` after node ``i``."""
        ...

    def commit(self, path: Sequence[int], next_root: int) -> None: ...

    @property
    def capabilities(self) -> Capabilities: ...

    @property
    def last_hidden(self) -> torch.Tensor | None:
        """The final-normed hidden state that predicted the root (where
        ``capabilities.hidden_states``; else None)."""
        ...


class KVBackend(ABC):
    """Tree-step bookkeeping shared by every cache-holding backend."""

    def __init__(self, vocab_size: int, max_length: int) -> None:
        self._vocab_size = vocab_size
        self._max_length = max_length
        self._past = 0  # tokens in the cache (committed, root excluded)
        self._root: int | None = None
        # final-normed hidden states of the last forward's rows, where the backend keeps them
        self._hidden: torch.Tensor | None = None
        self.last_hidden: torch.Tensor | None = None
        self.capabilities = Capabilities()  # a concrete backend declares its own

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def length(self) -> int:
        return self._past + (self._root is not None)

    # the part a concrete backend supplies ---------------------------------------------------

    @abstractmethod
    def _reset_cache(self) -> None:
        """Empty the cache."""

    @abstractmethod
    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Append ``ids: [T]`` at ``positions: [T]`` to the cache and return ``[T, vocab]``.

        ``mask: [T, past + T]`` bool (True = may attend), or None for plain causal attention.
        ``last_only``: the caller needs at most the last row of logits (prefill).
        """

    @abstractmethod
    def _keep(self, keep: torch.Tensor) -> None:
        """Keep only the cache slots ``keep: [K]`` (ascending), in that order."""

    @abstractmethod
    def _crop(self, length: int) -> None:
        """Keep the first ``length`` cache slots."""

    # the contract ------------------------------------------------------------------------------

    @property
    def past(self) -> int:
        """Tokens in the cache: the committed ones but the root."""
        return self._past

    def adopt(self, length: int) -> None:
        """The cache's first ``length`` slots now hold a committed prefix written from outside
        (a pool's :meth:`~draftwise.backends.batch.SequencePool.copy_prefix`): the sequence
        holds exactly those tokens, and the next :meth:`prefill` may reuse them."""
        if not 0 <= length < self._max_length:
            raise ValueError(f"cannot hold {length} tokens in a window of {self._max_length}")
        self._crop(length)
        self._past, self._root = length, None
        self._hidden = self.last_hidden = None

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int], reuse: int = 0) -> int:
        """Start a sequence: cache ``ids[:-1]``; ``ids[-1]`` becomes the root.

        ``reuse``: the first ``reuse`` cached tokens of the sequence before are ``ids[:reuse]``
        (the caller knows; a server keeps each slot's tokens): they stay and only the rest is
        computed — where :attr:`reuses_prefix`; elsewhere everything is computed. Returns how
        many were kept."""
        if len(ids) == 0:
            raise ValueError("cannot prefill an empty prompt")
        if len(ids) >= self._max_length:
            raise PromptTooLongError(
                f"prompt has {len(ids)} tokens; the context window is {self._max_length} "
                "(prompt + at least one new token must fit): shorten the prompt"
            )
        reuse = min(reuse, len(ids) - 1) if self.capabilities.reuses_prefix else 0
        if not 0 <= reuse <= self._past:
            raise ValueError(f"cannot reuse {reuse} tokens of a cache holding {self._past}")
        if reuse:
            self._crop(reuse)
        else:
            self._reset_cache()
        self._past = reuse
        self.last_hidden = None
        if len(ids) - 1 > reuse:
            head = torch.tensor(ids[reuse:-1], dtype=torch.long)
            self._forward(head, torch.arange(reuse, len(ids) - 1), None, last_only=True)
            self._past = len(ids) - 1
        self._root = int(ids[-1])
        return reuse

    def tree_rows(self, tree: DraftTree) -> tuple[torch.Tensor, torch.Tensor]:
        """The ids ``[T]`` (root, then the nodes) and positions ``[T]`` of a step over
        ``tree``; raises when the tree reaches past the context window."""
        if self._root is None:
            raise RuntimeError("forward_tree before prefill")
        ids = torch.tensor((self._root, *tree.tokens), dtype=torch.long)
        depth = torch.tensor([0] + [d + 1 for d in tree.depths], dtype=torch.long)
        positions = self._past + depth
        if int(positions.max()) >= self._max_length:
            raise PromptTooLongError("draft tree reaches past the context window")
        return ids, positions

    @torch.inference_mode()
    def forward_tree(self, tree: DraftTree) -> torch.Tensor:
        ids, positions = self.tree_rows(tree)
        mask = None
        if len(tree) > 0:
            past = torch.ones(len(ids), self._past, dtype=torch.bool)
            mask = torch.cat([past, tree.ancestor_mask()], dim=1)  # [T, past + T]
        return self._forward(ids, positions, mask)

    def discard(self) -> None:
        """Forget the last :meth:`forward_tree` (its root and nodes leave the cache)."""
        self._crop(self._past)

    def rewind(self, length: int, root: int) -> None:
        """Keep the first ``length`` committed tokens, the last of which, ``root``, becomes
        the root again (a drafter following another model's commits uses this)."""
        if not 1 <= length <= self.length:
            raise ValueError(f"cannot rewind to {length} of {self.length} committed tokens")
        self.last_hidden = self._hidden = None
        self._crop(length - 1)
        self._past = length - 1
        self._root = int(root)

    @torch.inference_mode()
    def commit(self, path: Sequence[int], next_root: int) -> None:
        """Keep the root and the accepted ``path`` in the cache; ``next_root`` becomes the root.

        Backends that keep their final-normed hidden states (fast, quant) set
        :attr:`last_hidden` to the one that predicted ``next_root`` — no extra forward pass."""
        base = self._past + 1  # cache slots up to and including the root
        # the hidden state that produced next_root: the last accepted row's (draft heads read it)
        hidden = self._hidden
        self.last_hidden = None if hidden is None else hidden[path[-1] + 1 if path else 0]
        self._hidden = None
        if list(path) == list(range(len(path))):
            self._crop(base + len(path))
        else:
            keep = torch.cat(
                [torch.arange(base), base + torch.tensor(list(path), dtype=torch.long)]
            )
            self._keep(keep)
        self._past = base + len(path)
        self._root = int(next_root)
