"""Fast CPU backend for Llama-style decoders (Llama, SmolLM2, Qwen2, Gemma 3): a compact forward
pass.

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

from draftwise.backends.decoder import GEMMA3, LAYER_LINEARS, Decoder, DecoderBackend
from draftwise.backends.kernels import BUCKETS, KERNELS, KernelChoice, Linear, available
from draftwise.progress import progress_bar
from draftwise.tree import DraftTree

__all__ = ["FastBackend", "UnsupportedModelError", "supports"]

# model_type -> q/k/v projections have a bias
_SUPPORTED = {"llama": False, "qwen2": True, GEMMA3: False}


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
    # one set of rotary parameters, or one per layer type (Gemma 3)
    for params in [p for p in rope.values() if isinstance(p, dict)] or [rope]:
        if params.get("rope_type", "default") != "default":
            raise UnsupportedModelError(
                f"rope_type {params.get('rope_type')!r} is not implemented: use --backend hf"
            )
    if family == GEMMA3:
        unsupported = [f"{name}={getattr(config, name)}" for name in (
            "attn_logit_softcapping", "final_logit_softcapping") if getattr(config, name, None)]
        if getattr(config, "use_bidirectional_attention", False):
            unsupported.append("use_bidirectional_attention=True")
        if getattr(config, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            unsupported.append(f"hidden_activation={config.hidden_activation}")
        if unsupported:
            raise UnsupportedModelError(
                f"this Gemma 3 config has {', '.join(unsupported)}, which the fast backend does "
                "not implement: use --backend hf")


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
        gemma = config.model_type == GEMMA3

        def scale(norm: Any) -> torch.Tensor:
            # Gemma's norms scale by 1 + weight (in float32, as its RMSNorm computes it)
            weight: torch.Tensor = norm.weight.detach()
            return 1.0 + weight.float() if gemma else weight

        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv_bias = None
            if _SUPPORTED[config.model_type]:
                qkv_bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            layers.append({
                "attn_norm": scale(layer.input_layernorm),
                "qkv": self._linear(
                    torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                    qkv_bias,
                ),
                "out": self._linear(attn.o_proj.weight, None),
                "mlp_norm": scale(layer.pre_feedforward_layernorm if gemma
                                  else layer.post_attention_layernorm),
                "gate_up": self._linear(
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), None
                ),
                "down": self._linear(mlp.down_proj.weight, None),
            })
            if gemma:
                layers[-1].update(
                    q_norm=scale(attn.q_norm), k_norm=scale(attn.k_norm),
                    post_attn_norm=scale(layer.post_attention_layernorm),
                    post_mlp_norm=scale(layer.post_feedforward_layernorm))
        decoder = Decoder(config, next(model.parameters()).dtype,
                          inner.embed_tokens.weight.detach(), layers, scale(inner.norm),
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
