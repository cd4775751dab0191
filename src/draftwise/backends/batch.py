"""Many sequences on one model: a KV cache with one region per sequence, and one forward pass
over several sequences' draft trees (the server's continuous batching, :mod:`draftwise.serve`).

:class:`SequencePool` holds ``[slots, layers, kv_heads, window, head_dim]`` keys and values;
``pool.sequences[i]`` is a complete backend (prefill, ``forward_tree``, commit) over region
``i`` and the shared weights, so one request's engine runs on it unchanged. :meth:`forward`
verifies several sequences' trees at once: the rows of every tree, concatenated, in one pass
whose attention is block-diagonal — each row sees its own sequence's committed prefix, its own
root and its tree ancestors, nothing of the others.

On the quant backend with kernels that pass is one call of the kernels' ``forward_batch``, which
computes every row alone (row-independent matrix products, attention per row over exactly its
visible keys, in position order), so a request's logits in a batch equal, bit for bit, its
logits alone: greedy output does not depend on who else is being served. Other backends run
the trees one after the other (still exact, no sharing of the weight reads).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from draftwise.backends.decoder import DecoderBackend
from draftwise.backends.quant import QuantBackend
from draftwise.tree import DraftTree

__all__ = ["SequencePool"]


class SequencePool:
    """``slots`` sequences sharing ``backend``'s weights, each with its own cache region."""

    def __init__(self, backend: DecoderBackend, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"a pool needs at least one slot, got {slots}")
        self.backend = backend
        shape = (slots, *backend.decoder.cache_shape())
        # empty: a slot's pages are touched only as its sequence grows
        self.keys = torch.empty(shape, dtype=backend.keys.dtype)
        self.values = torch.empty(shape, dtype=backend.keys.dtype)
        self.sequences = [backend.with_cache(self.keys[i], self.values[i]) for i in range(slots)]

    @property
    def shared(self) -> bool:
        """Whether :meth:`forward` reads the weights once for all trees (one pass)."""
        return self.backend.capabilities.shared_pass

    @torch.inference_mode()
    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Give slot ``target`` the first ``length`` cached tokens of slot ``source`` (a system
        prompt or document that two requests share): the same rows of keys and values that
        prefilling those tokens in ``target`` computes, where the backend
        :attr:`~draftwise.backends.base.Capabilities.reuses_prefix`. ``target`` then holds exactly
        those ``length`` tokens (its own are overwritten)."""
        if source == target:
            raise ValueError("a slot cannot copy from itself")
        if not 0 < length <= self.sequences[source].past:
            raise ValueError(f"slot {source} holds {self.sequences[source].past} committed "
                             f"tokens, not {length}")
        self.keys[target, :, :, :length] = self.keys[source, :, :, :length]
        self.values[target, :, :, :length] = self.values[source, :, :, :length]
        self.sequences[target].adopt(length)

    @torch.inference_mode()
    def forward(self, items: Sequence[tuple[int, DraftTree]]) -> list[torch.Tensor]:
        """Logits ``[N_i + 1, vocab]`` for each ``(slot, tree)``, as ``sequences[slot]
        .forward_tree(tree)`` would give them (every slot at most once)."""
        if len({slot for slot, _ in items}) != len(items):
            raise ValueError("a slot can verify one tree per pass")
        model = self.backend
        if not isinstance(model, QuantBackend) or not self.shared or len(items) == 1:
            return [self.sequences[slot].forward_tree(tree) for slot, tree in items]
        ids: list[torch.Tensor] = []
        positions: list[torch.Tensor] = []
        seq: list[int] = []
        write: list[int] = []
        prefix: list[int] = []  # row r sees slots 0..prefix[r]-1, then its extra slots
        extra: list[int] = []
        offsets = [0]
        for slot, tree in items:
            backend = self.sequences[slot]
            row_ids, row_positions = backend.tree_rows(tree)
            past, t = backend.past, len(tree) + 1
            ids.append(row_ids)
            positions.append(row_positions)
            seq += [slot] * t
            write += range(past, past + t)
            prefix += [past] * t
            for row in range(t):  # the root, then each node's path from the root to it
                extra += [past, *(past + 1 + node for node in tree.path_to(row - 1))]
                offsets.append(len(extra))
        hidden, logits = model.forward_batch(
            torch.cat(ids), self.keys, self.values, torch.tensor(seq), torch.tensor(write),
            torch.tensor(prefix), torch.tensor(offsets), torch.tensor(extra),
            torch.cat(positions))
        out, row = [], 0
        for slot, tree in items:
            t = len(tree) + 1
            self.sequences[slot].took_rows(hidden[row : row + t])
            out.append(logits[row : row + t])
            row += t
        return out

