"""Transformers backend: any causal LM, a tree step through public APIs only.

A tree step passes a 4D *additive float* attention mask ``[1, 1, T, past + T]`` and
``position_ids = past + depth`` (docs/design.md: ``eager`` attention silently misreads boolean 4D
masks, an additive float mask is right for both ``eager`` and ``sdpa``). Accepted nodes are kept
by ``index_select`` on each layer's keys and values of the ``DynamicCache``. No modeling file is
copied or patched.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from draftwise.backends.base import KVBackend

__all__ = ["HFBackend"]


class HFBackend(KVBackend):
    """Runs a transformers ``PreTrainedModel`` (batch size 1)."""

    def __init__(self, model: Any, *, max_length: int | None = None) -> None:
        config = model.config
        window = max_length or getattr(config, "max_position_embeddings", None) or 2048
        super().__init__(int(config.vocab_size), int(window))
        self.model = model.eval()
        self.dtype: torch.dtype = next(model.parameters()).dtype
        self.cache = DynamicCache(config=config)

    def _reset_cache(self) -> None:
        self.cache = DynamicCache(config=self.model.config)

    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        last_only: bool = False,
    ) -> torch.Tensor:
        attention: torch.Tensor | None = None
        if mask is not None:
            blocked = torch.finfo(self.dtype).min
            attention = torch.zeros(mask.shape, dtype=self.dtype).masked_fill(~mask, blocked)
            attention = attention[None, None]  # [1, 1, T, past + T]
        out = self.model(
            input_ids=ids[None],
            position_ids=positions[None],
            attention_mask=attention,
            past_key_values=self.cache,
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
