"""A Llama/Qwen2/Gemma-3 decoder and one sequence's KV cache over it, shared by the fast and
quant backends by composition.

:class:`Decoder` holds what a decoder *is*: its shapes, its rotary table and its weights
(embedding rows, and per layer the norms and the ``qkv``, ``out``, ``gate_up`` and ``down``
linears, each called as ``linear(x, exact)``), and runs the forward pass in torch over a cache it
is handed. It holds no sequence state, so many sequences (a server's pool) share one.

Gemma 3 (``gemma3_text``) is the same decoder with more: the embedding scaled by
``sqrt(hidden)``, every norm computed and scaled in float32 (its scales are ``1 + weight``: the
builders pass them so, as a GGUF stores them), per-head norms of queries and keys before the
rotary, norms of the attention's and the MLP's outputs before each residual add, a tanh-GELU
gate, attention scaled by ``query_pre_attn_scalar ** -0.5``, and *sliding* layers whose rows see
only the keys of the last ``sliding_window`` positions, with their own rotary base.

:class:`DecoderBackend` is one sequence on a decoder: its KV cache ``[layers, kv_heads, window,
head_dim]`` and the :class:`~draftwise.backends.base.KVBackend` bookkeeping. The fast backend
builds its decoder from a transformers model with float linears
(:mod:`~draftwise.backends.fast`); the quant backend from a GGUF file's blocks, and runs the
decoder's layers in its C++ kernels where they build (:mod:`~draftwise.backends.quant`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from draftwise.backends.base import Capabilities, KVBackend, sliding_window_mask

__all__ = ["Decoder", "DecoderBackend", "LAYER_LINEARS"]

LAYER_LINEARS = ("qkv", "out", "gate_up", "down")  # a layer's matrix products, in order
GEMMA3 = "gemma3_text"
# Gemma 3's extra per-layer norm scales: queries' and keys' (per head), the attention's and the
# MLP's outputs
GEMMA_NORMS = ("q_norm", "k_norm", "post_attn_norm", "post_mlp_norm")


def rope_theta(config: Any, layer_type: str = "full_attention") -> float:
    """The rotary base of ``layer_type``'s layers: ``rope_parameters`` per layer type (Gemma 3)
    or one for all."""
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope.get(layer_type), dict):
        rope = rope[layer_type]
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


class Decoder:
    """A Llama/Qwen2/Gemma-3 decoder's shapes, rotary tables and weights, and its torch forward.

    Parameters:
        config: the transformers config (shapes, rotary, norms).
        dtype: the dtype of the activations and of the cache.
        embed: ``embed[ids] -> [*ids.shape, hidden]`` (unscaled: :meth:`embedding` scales).
        layers: per layer ``attn_norm``, ``mlp_norm`` (tensors) and the :data:`LAYER_LINEARS`;
            Gemma 3 also the :data:`GEMMA_NORMS`.
        norm: the final norm's weight; head: the LM head (a linear).
        max_length: the context window (default: the config's).
    """

    def __init__(self, config: Any, dtype: torch.dtype, embed: Any, layers: list[dict[str, Any]],
                 norm: torch.Tensor, head: Any, max_length: int | None = None) -> None:
        self.window = int(max_length or config.max_position_embeddings)
        self.vocab_size = int(config.vocab_size)
        self.family = str(config.model_type)
        self.gemma = self.family == GEMMA3
        self.dtype = dtype
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.eps = float(config.rms_norm_eps)
        self.embed, self.layers, self.norm, self.head = embed, layers, norm, head
        # per layer: None, or how many positions back its rows see (a sliding layer)
        kinds = list(getattr(config, "layer_types", None) or []) if self.gemma else []
        self.reach: list[int | None] = [
            int(config.sliding_window) if kind == "sliding_attention" else None
            for kind in kinds] or [None] * len(layers)
        if len(self.reach) != len(layers):
            raise ValueError(f"{len(layers)} layers but {len(self.reach)} layer types")
        self.scaling: float | None = None  # attention's: None is 1/sqrt(head_dim)
        self.embed_scale: torch.Tensor | None = None
        if self.gemma:
            self.scaling = float(config.query_pre_attn_scalar) ** -0.5
            # as transformers keeps it: a float32 scalar, cast to the embedding's dtype
            self.embed_scale = torch.tensor(float(config.hidden_size) ** 0.5).to(dtype)
        self.cos, self.sin = self._rotary(rope_theta(config))
        self.local_cos, self.local_sin = self.cos, self.sin  # sliding layers'
        if any(self.reach):
            self.local_cos, self.local_sin = self._rotary(rope_theta(config, "sliding_attention"))

    def _rotary(self, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary table ``[window, head_dim]`` (cos, sin), computed as transformers does
        (float32 angles, then the model dtype)."""
        inv = 1.0 / theta ** (
            torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        )
        angles = torch.outer(torch.arange(self.window, dtype=torch.float32), inv)
        angles = torch.cat([angles, angles], dim=-1)  # [window, head_dim]
        return angles.cos().to(self.dtype), angles.sin().to(self.dtype)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """The input rows ``[*ids.shape, hidden]`` as the first layer reads them."""
        x: torch.Tensor = self.embed[ids]
        return x if self.embed_scale is None else x * self.embed_scale

    def cache_shape(self) -> tuple[int, int, int, int]:
        """``(layers, kv_heads, window, head_dim)``: one sequence's keys (or values)."""
        return (len(self.layers), self.kv_heads, self.window, self.head_dim)

    def skipping(self, skip: set[int] | frozenset[int]) -> Decoder:
        """The same weights without the layers in ``skip`` (a shallow sub-network)."""
        if any(not 0 <= i < len(self.layers) for i in skip):
            raise ValueError(f"layers to skip must be in 0..{len(self.layers) - 1}")
        other = copy.copy(self)
        other.layers = [layer for i, layer in enumerate(self.layers) if i not in skip]
        other.reach = [reach for i, reach in enumerate(self.reach) if i not in skip]
        return other

    def rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # in float32 whatever the model dtype, as transformers' RMSNorms do: Llama/Qwen2 scale
        # after the cast back, Gemma 3 before it
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)
        if self.gemma:
            return (x32 * torch.rsqrt(variance + self.eps) * weight.float()).to(x.dtype)
        return weight * (x32 * torch.rsqrt(variance + self.eps)).to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _attend_rows(self, keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor, end: int,
                     mask: torch.Tensor | None) -> torch.Tensor:
        """Attention one row at a time over exactly that row's visible keys, gathered
        contiguously: the same computation plain decoding does at that position."""
        t = q.shape[1]
        rows = []
        for r in range(t):
            if mask is None:
                visible = torch.arange(end - t + r + 1)
            else:
                visible = mask[r].nonzero().squeeze(-1)
            k = keys.index_select(1, visible)[None]  # [1, kv, S, d]
            v = values.index_select(1, visible)[None]
            rows.append(F.scaled_dot_product_attention(
                q[None, :, r : r + 1], k, v, enable_gqa=self.kv_heads != self.heads,
                scale=self.scaling,
            )[0])
        return torch.cat(rows, dim=1)  # [h, T, d]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                keys: torch.Tensor, values: torch.Tensor, start: int, *, exact: bool = False,
                last_only: bool = False) -> torch.Tensor:
        """Run ``ids: [T]`` at ``positions: [T]``, writing their keys and values to cache slots
        ``start .. start + T - 1`` of ``keys``/``values`` (``[layers, kv, window, d]``), each
        row seeing the slots ``mask: [T, start + T]`` allows (None: causal). Returns the
        final-normed hidden states ``[T, hidden]`` (``[1, hidden]`` with ``last_only``).
        ``exact``: every product and attention one row at a time (plain decoding's
        computation for each row)."""
        t = len(ids)
        end = start + t
        h, kv, d = self.heads, self.kv_heads, self.head_dim

        def view(reach: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                             torch.Tensor | None]:
            """What a layer of this reach (None: full) uses, once per forward: its rotary
            ``[1, T, d]`` at the rows' positions, the slots each row sees (``[T, end]``, None:
            causal) and attention's mask (``[1, 1, T, end]`` or None)."""
            cos, sin = (self.cos, self.sin) if reach is None else (self.local_cos, self.local_sin)
            visible = mask if reach is None else sliding_window_mask(mask, positions, start, reach)
            attn_mask = None if visible is None else visible[None, None]
            if visible is None and t > 1:
                attn_mask = torch.ones(t, end, dtype=torch.bool).tril(diagonal=start)[None, None]
            return cos[positions][None], sin[positions][None], visible, attn_mask

        views = {reach: view(reach) for reach in set(self.reach)}
        x = self.embedding(ids)  # [T, hidden]
        for index, layer in enumerate(self.layers):
            cos, sin, visible, attn_mask = views[self.reach[index]]
            qkv = layer["qkv"](self.rms(x, layer["attn_norm"]), exact)  # [T, (h + 2kv) d]
            q, k, v = qkv.split([h * d, kv * d, kv * d], dim=-1)
            q, k = q.view(t, h, d), k.view(t, kv, d)
            if self.gemma:
                q, k = self.rms(q, layer["q_norm"]), self.rms(k, layer["k_norm"])
            q = self._rotate(q.transpose(0, 1), cos, sin)  # [h, T, d]
            k = self._rotate(k.transpose(0, 1), cos, sin)  # [kv, T, d]
            keys[index, :, start:end] = k
            values[index, :, start:end] = v.view(t, kv, d).transpose(0, 1)
            if exact:
                out = self._attend_rows(keys[index], values[index], q, end, visible)
            else:
                out = F.scaled_dot_product_attention(
                    q[None], keys[index, :, :end][None], values[index, :, :end][None],
                    attn_mask=attn_mask, enable_gqa=kv != h, scale=self.scaling,
                )[0]  # [h, T, d]
            out = layer["out"](out.transpose(0, 1).reshape(t, h * d), exact)
            x = x + (self.rms(out, layer["post_attn_norm"]) if self.gemma else out)
            gate, up = layer["gate_up"](self.rms(x, layer["mlp_norm"]), exact).chunk(2, dim=-1)
            if self.gemma:
                mlp = layer["down"](F.gelu(gate, approximate="tanh") * up, exact)
                x = x + self.rms(mlp, layer["post_mlp_norm"])
            else:
                x = x + layer["down"](F.silu(gate) * up, exact)
        if last_only:
            x = x[-1:]
        return self.rms(x, self.norm)

class DecoderBackend(KVBackend):
    """One sequence on a :class:`Decoder`: its KV cache and the tree-step bookkeeping.

    ``exact``: every decoding step runs row by row (see :meth:`Decoder.forward`); prefill is the
    same call for every method and stays batched."""

    def __init__(self, decoder: Decoder, *, exact: bool = False,
                 cache_dtype: torch.dtype | None = None) -> None:
        KVBackend.__init__(self, decoder.vocab_size, decoder.window)
        self.decoder = decoder
        self.exact = exact
        # empty, not zeros: only slots that were written are ever read, and untouched pages of
        # a long window then cost no memory
        dtype = cache_dtype or decoder.dtype
        self.keys = torch.empty(decoder.cache_shape(), dtype=dtype)
        self.values = torch.empty(decoder.cache_shape(), dtype=dtype)
        self._cached = 0  # filled slots of the cache
        self.capabilities = Capabilities(hidden_states=True, exact=exact,
                                         cost_tag="|exact" if exact else "")

    def with_cache(self, keys: torch.Tensor, values: torch.Tensor) -> DecoderBackend:
        """Another sequence on the same weights, holding its KV cache in ``keys``/``values``
        (``[layers, kv_heads, window, head_dim]``, contiguous): a region of a
        :class:`~draftwise.backends.batch.SequencePool`'s cache, say."""
        if keys.shape != self.decoder.cache_shape():
            raise ValueError(f"a cache of shape {tuple(keys.shape)} does not fit this model")
        if keys.dtype != self.keys.dtype or values.dtype != self.keys.dtype:
            raise ValueError(f"this model's cache holds {self.keys.dtype}, not {keys.dtype}")
        other = copy.copy(self)
        other.keys, other.values = keys, values
        other._cached, other._past, other._root = 0, 0, None
        other._hidden = other.last_hidden = None
        return other

    def skipping(self, skip: set[int] | frozenset[int]) -> DecoderBackend:
        """A backend over the same weights that skips the layers in ``skip`` (a shallow
        sub-network of this model, for self-speculation), with its own KV cache."""
        other = copy.copy(self)
        other.decoder = self.decoder.skipping(skip)
        shape = other.decoder.cache_shape()
        other = other.with_cache(torch.empty(shape, dtype=self.keys.dtype),
                                 torch.empty(shape, dtype=self.keys.dtype))
        other.exact = False
        other.capabilities = Capabilities(hidden_states=True)
        return other

    def took_rows(self, hidden: torch.Tensor) -> None:
        """A shared pass (:class:`~draftwise.backends.batch.SequencePool`) computed this
        sequence's next ``len(hidden)`` rows into its cache region; ``hidden``: their
        final-normed states, as :meth:`forward_tree` would have kept them."""
        self._cached += len(hidden)
        self._hidden = hidden

    def lm_head_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The LM head's rows ``[len(ids), hidden]`` as float32 (draft heads score with them)."""
        rows: torch.Tensor = self.decoder.head.weight[ids].float()
        return rows

    def embed_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Input-embedding rows ``[*ids.shape, hidden]``, as the model reads them."""
        return self.decoder.embedding(ids)

    # KVBackend -----------------------------------------------------------------------------

    def _reset_cache(self) -> None:
        self._cached = 0

    def _keep(self, keep: torch.Tensor) -> None:
        count = len(keep)
        self.keys[:, :, :count] = self.keys[:, :, keep]
        self.values[:, :, :count] = self.values[:, :, keep]
        self._cached = count

    def _crop(self, length: int) -> None:
        self._cached = length

    def _check_room(self, rows: int) -> None:
        if self._cached + rows > self._max_length:
            raise ValueError(f"KV cache holds {self._max_length} tokens; "
                             f"{self._cached + rows} requested")

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                 last_only: bool = False) -> torch.Tensor:
        self._check_room(len(ids))
        exact = self.exact and not last_only  # prefill is the same call for every method
        hidden = self.decoder.forward(ids, positions, mask, self.keys, self.values,
                                      self._cached, exact=exact, last_only=last_only)
        self._cached += len(ids)
        self._hidden = hidden
        logits: torch.Tensor = self.decoder.head(hidden, exact)
        return logits
