"""Fast CPU backend for Llama-style decoders (Llama, SmolLM2, Qwen2): a compact forward pass.

The model is re-expressed as a :class:`~draftwise.backends.decoder.Decoder` over a few tensors
taken from the loaded transformers model (same weights, nothing copied from modeling files):
fused QKV and gate/up projections, a precomputed rotary table, scaled-dot-product attention with
the tree mask, and a preallocated KV cache ``[layers, kv_heads, max_length, head_dim]``
(:class:`~draftwise.backends.decoder.DecoderBackend`). A step does no reallocation and little
Python.

Matrix products go through :class:`~draftwise.backends.kernels.KernelChoice`: :meth:`tune`
times whole forward passes at each row count with each kernel (MKL, oneDNN with a prepacked
weight) and keeps the fastest; the choice is cached per machine and model.

``exact=True`` runs every decoding step's products and attention one row at a time, over
exactly the keys that row sees, with the one-row kernel — the computation plain decoding does —
so verification is bit-identical to plain decoding on this backend whatever the tree size (and
costs about n times more). Prefill is shared by all methods and stays batched.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from draftwise.backends.decoder import LAYER_LINEARS, Decoder, DecoderBackend
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


class FastBackend(DecoderBackend):
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
        decoder = Decoder(config, next(model.parameters()).dtype,
                          inner.embed_tokens.weight.detach(), layers, inner.norm.weight.detach(),
                          self._linear(model.lm_head.weight, None), max_length)
        super().__init__(decoder, exact=exact)

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

    def linears(self) -> list[Linear]:
        """Every weight's matrix product (for kernel tuning)."""
        decoder = self.decoder
        return [layer[name] for layer in decoder.layers for name in LAYER_LINEARS
                ] + [decoder.head]
