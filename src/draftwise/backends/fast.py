"""Fast CPU backend for Llama-style decoders (Llama, SmolLM2, Qwen2): a compact forward pass.

The model is re-expressed in a few tensors taken from the loaded transformers model (same
weights, nothing copied from modeling files): fused QKV and gate/up projections, a preallocated
KV cache ``[layers, kv_heads, max_length, head_dim]``, a precomputed rotary table, and
scaled-dot-product attention with the tree mask. A step does no reallocation and little Python.

Matrix products go through :class:`~draftwise.backends.kernels.KernelChoice`: :meth:`tune`
times whole forward passes at each row count with each kernel (MKL, oneDNN with a prepacked
weight) and keeps the fastest; the choice is cached per machine and model.

``exact=True`` runs every decoding step's products and attention one row at a time, over
exactly the keys that row sees, with the one-row kernel — the computation plain decoding does —
so verification is bit-identical to plain decoding on this backend whatever the tree size (and
costs about n times more). Prefill is shared by all methods and stays batched.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from draftwise.backends.base import Capabilities, KVBackend
from draftwise.backends.kernels import BUCKETS, KERNELS, KernelChoice, Linear, available
from draftwise.progress import progress_bar
from draftwise.tree import DraftTree

__all__ = ["FastBackend", "UnsupportedModelError", "supports"]

_SUPPORTED = {"llama": False, "qwen2": True}  # model_type -> q/k/v projections have a bias


class UnsupportedModelError(ValueError):
    """The fast backend does not implement this model family."""


def supports(model: Any) -> bool:
    """Whether :class:`FastBackend` implements ``model`` (family and rotary type)."""
    try:
        check_config(model.config)
    except UnsupportedModelError:
        return False
    return True


def check_config(config: Any) -> None:
    """Raise :class:`UnsupportedModelError` unless this backend implements ``config``."""
    family = getattr(config, "model_type", "")
    if family not in _SUPPORTED:
        raise UnsupportedModelError(
            f"the fast backend implements {sorted(_SUPPORTED)}, not {family!r}: "
            "use --backend hf"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UnsupportedModelError(
            f"rope_type {rope.get('rope_type')!r} is not implemented: use --backend hf"
        )


class FastBackend(KVBackend):
    """Llama-family decoder with a static KV cache and shape-chosen matrix kernels."""

    def __init__(
        self,
        model: Any,
        *,
        max_length: int | None = None,
        kernels: KernelChoice | None = None,
        exact: bool = False,
    ) -> None:
        config = model.config
        check_config(config)
        self.kernels = kernels or KernelChoice()
        inner = model.model
        layers: list[dict[str, Any]] = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv_bias = None
            if _SUPPORTED[config.model_type]:
                qkv_bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            layers.append({
                "attn_norm": layer.input_layernorm.weight.detach(),
                "qkv": self._linear(
                    torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                    qkv_bias,
                ),
                "out": self._linear(attn.o_proj.weight, None),
                "mlp_norm": layer.post_attention_layernorm.weight.detach(),
                "gate_up": self._linear(
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), None
                ),
                "down": self._linear(mlp.down_proj.weight, None),
            })
        self._setup(
            config, max_length, exact, next(model.parameters()).dtype,
            inner.embed_tokens.weight.detach(), layers, inner.norm.weight.detach(),
            self._linear(model.lm_head.weight, None),
        )

    def _setup(
        self, config: Any, max_length: int | None, exact: bool, dtype: torch.dtype,
        embed: Any, layers: list[dict[str, Any]], norm: torch.Tensor, head: Any,
    ) -> None:
        """Everything but the weights: shapes, rotary table, KV cache. ``embed[ids]`` gives
        the input rows; each layer's ``qkv``, ``out``, ``gate_up``, ``down`` and ``head`` are
        called as ``linear(x, exact)``."""
        rope = getattr(config, "rope_parameters", None) or {}
        window = int(max_length or config.max_position_embeddings)
        KVBackend.__init__(self, int(config.vocab_size), window)
        self.family = str(config.model_type)
        self.exact = exact
        self.dtype = dtype
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.eps = float(config.rms_norm_eps)
        theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        self.embed, self.layers, self.norm, self.head = embed, layers, norm, head

        # rotary table, computed as transformers does (float32 angles, then the model dtype)
        inv = 1.0 / theta ** (
            torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        )
        angles = torch.outer(torch.arange(window, dtype=torch.float32), inv)
        angles = torch.cat([angles, angles], dim=-1)  # [window, head_dim]
        self.cos, self.sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)

        # empty, not zeros: only slots that were written are ever read, and untouched pages of
        # a long window (8192 tokens: 377 MB for SmolLM2) then cost no memory
        shape = (len(self.layers), self.kv_heads, window, self.head_dim)
        self.keys = torch.empty(shape, dtype=self.dtype)
        self.values = torch.empty(shape, dtype=self.dtype)
        self._cached = 0  # filled slots of the cache
        self.capabilities = Capabilities(hidden_states=True, exact=exact,
                                         cost_tag="|exact" if exact else "")

    def _linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
        return Linear(weight.detach().contiguous(), None if bias is None else bias.detach(),
                      self.kernels)

    def tune(
        self, buckets: Sequence[int] = BUCKETS, repeats: int = 3, progress: bool = True
    ) -> dict[int, dict[str, float]]:
        """Choose, per row bucket, the kernel with the fastest whole forward pass.

        Returns ``{bucket: {kernel: median seconds}}``. Kernels are interleaved within each
        repetition so drift hits them alike; the first repetition warms up and is dropped.
        """
        linears = self.linears()
        shapes = {linear.shape for linear in linears}
        names = [n for n in KERNELS if all(available(n, linear) for linear in linears)]
        samples: dict[int, dict[str, list[float]]] = {b: {n: [] for n in names} for b in buckets}
        self.prefill([(7 * i + 3) % self.vocab_size for i in range(64)])
        bar = progress_bar((repeats + 1) * len(buckets) * len(names), "tuning kernels",
                           enabled=progress, unit="pass")
        for repeat in range(repeats + 1):
            for bucket in buckets:
                tree = DraftTree.chain([(5 * i + 1) % self.vocab_size for i in range(bucket - 1)])
                for name in names:
                    self.kernels.set_bucket(shapes, bucket, name)
                    start = time.perf_counter()
                    logits = self.forward_tree(tree)
                    elapsed = time.perf_counter() - start
                    self.commit((), int(logits[0].argmax()))
                    if repeat:
                        samples[bucket][name].append(elapsed)
                    bar.update()
        bar.close()
        result = {b: {n: statistics.median(s) for n, s in per.items()} for b, per in
                  samples.items()}
        for bucket, medians in result.items():
            self.kernels.set_bucket(shapes, bucket, min(medians, key=lambda n: medians[n]))
        self._reset_cache()
        self._past, self._root = 0, None
        return result

    def skipping(self, skip: set[int] | frozenset[int]) -> FastBackend:
        """A backend over the same weights that skips the layers in ``skip`` (a shallow
        sub-network of this model, for self-speculation), with its own KV cache."""
        if any(not 0 <= i < len(self.layers) for i in skip):
            raise ValueError(f"layers to skip must be in 0..{len(self.layers) - 1}")
        other = copy.copy(self)
        other.layers = [layer for i, layer in enumerate(self.layers) if i not in skip]
        shape = (len(other.layers), self.kv_heads, self._max_length, self.head_dim)
        other = other.with_cache(torch.empty(shape, dtype=self.keys.dtype),
                                 torch.empty(shape, dtype=self.keys.dtype))
        other.exact = False
        other.capabilities = dataclasses.replace(self.capabilities, exact=False, cost_tag="")
        return other

    def with_cache(self, keys: torch.Tensor, values: torch.Tensor) -> FastBackend:
        """Another sequence on the same weights, holding its KV cache in ``keys``/``values``
        (``[layers, kv_heads, window, head_dim]``, contiguous): a region of a
        :class:`~draftwise.backends.batch.SequencePool`'s cache, say."""
        if keys.shape != (len(self.layers), self.kv_heads, self._max_length, self.head_dim):
            raise ValueError(f"a cache of shape {tuple(keys.shape)} does not fit this model")
        if keys.dtype != self.keys.dtype or values.dtype != self.keys.dtype:
            raise ValueError(f"this model's cache holds {self.keys.dtype}, not {keys.dtype}")
        other = copy.copy(self)
        other.keys, other.values = keys, values
        other._cached, other._past, other._root = 0, 0, None
        return other

    def took_rows(self, hidden: torch.Tensor) -> None:
        """A shared pass (:class:`~draftwise.backends.batch.SequencePool`) computed this
        sequence's next ``len(hidden)`` rows into its cache region; ``hidden``: their
        final-normed states, as :meth:`forward_tree` would have kept them."""
        self._cached += len(hidden)
        self._hidden = hidden

    def lm_head_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The LM head's rows ``[len(ids), hidden]`` as float32 (draft heads score with them)."""
        rows: torch.Tensor = self.head.weight[ids].float()
        return rows

    def embed_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Input-embedding rows ``[*ids.shape, hidden]``, as the model reads them."""
        rows: torch.Tensor = self.embed[ids]
        return rows

    def linears(self) -> list[Linear]:
        """Every weight's matrix product (for kernel tuning)."""
        return [layer[name] for layer in self.layers for name in ("qkv", "out", "gate_up", "down")
                ] + [self.head]

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

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # in float32 whatever the model dtype, as transformers' Llama/Qwen2 RMSNorm does
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)
        return weight * (x32 * torch.rsqrt(variance + self.eps)).to(x.dtype)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _attend_rows(
        self, layer: int, q: torch.Tensor, end: int, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention one row at a time over exactly that row's visible keys, gathered
        contiguously: the same computation plain decoding does at that position."""
        t = q.shape[1]
        rows = []
        for r in range(t):
            if mask is None:
                visible = torch.arange(end - t + r + 1)
            else:
                visible = mask[r].nonzero().squeeze(-1)
            keys = self.keys[layer].index_select(1, visible)[None]  # [1, kv, S, d]
            values = self.values[layer].index_select(1, visible)[None]
            rows.append(F.scaled_dot_product_attention(
                q[None, :, r : r + 1], keys, values, enable_gqa=self.kv_heads != self.heads
            )[0])
        return torch.cat(rows, dim=1)  # [h, T, d]

    @torch.inference_mode()
    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        last_only: bool = False,
    ) -> torch.Tensor:
        t, start = len(ids), self._cached
        end = start + t
        if end > self._max_length:
            raise ValueError(f"KV cache holds {self._max_length} tokens; {end} requested")
        exact = self.exact and not last_only  # prefill is the same call for every method
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        cos, sin = self.cos[positions][None], self.sin[positions][None]  # [1, T, head_dim]
        attn_mask = None if mask is None else mask[None, None]  # [1, 1, T, end]
        if mask is None and t > 1:
            attn_mask = torch.ones(t, end, dtype=torch.bool).tril(diagonal=start)[None, None]
        x = self.embed[ids]  # [T, hidden]
        for index, layer in enumerate(self.layers):
            qkv = layer["qkv"](self._rms(x, layer["attn_norm"]), exact)  # [T, (h + 2kv) d]
            q, k, v = qkv.split([h * d, kv * d, kv * d], dim=-1)
            q = self._rotate(q.view(t, h, d).transpose(0, 1), cos, sin)  # [h, T, d]
            k = self._rotate(k.view(t, kv, d).transpose(0, 1), cos, sin)  # [kv, T, d]
            self.keys[index, :, start:end] = k
            self.values[index, :, start:end] = v.view(t, kv, d).transpose(0, 1)
            if exact:
                out = self._attend_rows(index, q, end, mask)
            else:
                out = F.scaled_dot_product_attention(
                    q[None], self.keys[index, :, :end][None], self.values[index, :, :end][None],
                    attn_mask=attn_mask, enable_gqa=kv != h,
                )[0]  # [h, T, d]
            x = x + layer["out"](out.transpose(0, 1).reshape(t, h * d), exact)
            gate, up = layer["gate_up"](self._rms(x, layer["mlp_norm"]), exact).chunk(2, dim=-1)
            x = x + layer["down"](F.silu(gate) * up, exact)
        self._cached = end
        if last_only:
            x = x[-1:]
        hidden = self._rms(x, self.norm)
        self._hidden = hidden
        logits: torch.Tensor = self.head(hidden, exact)
        return logits
