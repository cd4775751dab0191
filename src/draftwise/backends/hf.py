"""Transformers backend: any causal LM, a tree step through public APIs only.

A tree step passes a 4D *additive float* attention mask ``[1, 1, T, past + T]`` and
``position_ids = past + depth`` (docs/design.md: ``eager`` attention silently misreads boolean 4D
masks, an additive float mask is right for both ``eager`` and ``sdpa``). Accepted nodes are kept
by ``index_select`` on each layer's keys and values of the ``DynamicCache``. No modeling file is
copied or patched.

Models with sliding-window layers (``config.layer_types``: Gemma 2/3, ...) get a cache that
keeps every key in every layer (a sliding layer's own cache keeps only its window, which a tree
step's compaction cannot index) and a mask per layer type (``attention_mask`` as a dict, which
their forward takes as is): the sliding layers' rows see the keys of their last
``sliding_window`` positions.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache

from draftwise.backends.base import KVBackend, sliding_window_mask

__all__ = ["HFBackend"]


class HFBackend(KVBackend):
    """Runs a transformers ``PreTrainedModel`` (batch size 1)."""

    def __init__(self, model: Any, *, max_length: int | None = None) -> None:
        config = model.config
        window = max_length or getattr(config, "max_position_embeddings", None) or 2048
        super().__init__(int(config.vocab_size), int(window))
        self.model = model.eval()
        self.dtype: torch.dtype = next(model.parameters()).dtype
        # newer transformers name the cache argument ``cache`` (``past_key_values`` warns, and
        # goes in 5.40); older ones only know ``past_key_values``
        forward = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"
        kinds = set(getattr(config, "layer_types", None) or ())
        self.sliding: int | None = None  # a sliding layer's reach, where the model has one
        if "sliding_attention" in kinds and getattr(config, "sliding_window", None):
            self.sliding = int(config.sliding_window)
        self._reset_cache()

    def _reset_cache(self) -> None:
        # sliding models: full layers everywhere (DynamicCache() without a config)
        self.cache = DynamicCache() if self.sliding else DynamicCache(config=self.model.config)

    def _additive(self, mask: torch.Tensor) -> torch.Tensor:
        """``[1, 1, T, past + T]``: 0 where ``mask`` allows, the dtype's minimum elsewhere."""
        blocked = torch.finfo(self.dtype).min
        return torch.zeros(mask.shape, dtype=self.dtype).masked_fill(~mask, blocked)[None, None]

    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        last_only: bool = False,
    ) -> torch.Tensor:
        attention: torch.Tensor | dict[str, torch.Tensor] | None = None
        if self.sliding is not None:
            past = self.cache.get_seq_length()
            full = mask if mask is not None else torch.ones(
                len(ids), past + len(ids), dtype=torch.bool).tril(diagonal=past)
            attention = {"full_attention": self._additive(full), "sliding_attention":
                         self._additive(sliding_window_mask(full, positions, past, self.sliding))}
        elif mask is not None:
            attention = self._additive(mask)  # [1, 1, T, past + T]
        out = self.model(
            input_ids=ids[None],
            position_ids=positions[None],
            attention_mask=attention,
            **{self._cache_arg: self.cache},
            use_cache=True,
            **({"logits_to_keep": 1} if last_only else {}),
        )
        logits: torch.Tensor = out.logits[0]  # [T, vocab]
        return logits

    def _layers(self) -> list[Any]:
        layers: list[Any] = list(self.cache.layers)
        for layer in layers:
            if getattr(layer, "keys", None) is None and layer.is_initialized:
                raise TypeError(
                    f"{type(layer).__name__} cache layers hold no per-token keys: this model's "
                    "cache cannot be compacted for tree verification"
                )
        return layers

    def _keep(self, keep: torch.Tensor) -> None:
        for layer in self._layers():
            layer.keys = layer.keys.index_select(-2, keep)
            layer.values = layer.values.index_select(-2, keep)

    def _crop(self, length: int) -> None:
        for layer in self._layers():
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]
