"""Reference backend: a tiny Llama-style decoder in plain PyTorch, float64 capable.

It is the test oracle: small enough to run thousands of steps in a unit test, exact enough in
float64 that no near-tie can flip, and independent of transformers. Its tree step and commit are
the shared :class:`~draftwise.backends.base.KVBackend` logic; only the forward pass is here.
:meth:`ReferenceModel.full_forward` is the plain causal forward the tree step is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from draftwise.backends.base import KVBackend

__all__ = ["ReferenceConfig", "ReferenceModel", "ReferenceBackend"]


@dataclass(frozen=True)
class ReferenceConfig:
    vocab_size: int = 64
    hidden: int = 32
    layers: int = 2
    heads: int = 4
    max_length: int = 512
    rope_theta: float = 10000.0
    seed: int = 0
    dtype: torch.dtype = torch.float64
    init_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")


class ReferenceModel(torch.nn.Module):
    """Pre-norm decoder: RMSNorm, rotary attention, SiLU-gated MLP, tied-free LM head."""

    def __init__(self, config: ReferenceConfig) -> None:
        super().__init__()
        self.config = config
        gen = torch.Generator().manual_seed(config.seed)
        h, v = config.hidden, config.vocab_size

        def weight(*shape: int) -> torch.nn.Parameter:
            scale = config.init_scale / shape[-1] ** 0.5
            data = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
            return torch.nn.Parameter(data.to(config.dtype), requires_grad=False)

        self.embed = weight(v, h)
        self.blocks = torch.nn.ParameterList()
        for _ in range(config.layers):
            for shape in ((3 * h, h), (h, h), (2 * 2 * h, h), (h, 2 * h)):
                self.blocks.append(weight(*shape))
        self.head = weight(v, h)
        self.embed.data *= h**0.5  # unit-scale embeddings

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x: [heads, T, head_dim]`` by ``positions: [T]``."""
        half = x.shape[-1] // 2
        inv = self.config.rope_theta ** (-torch.arange(half, dtype=torch.float64) / half)
        angle = positions.to(torch.float64)[:, None] * inv[None, :]  # [T, half]
        cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    @staticmethod
    def _norm(x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """``ids, positions: [T]``, ``mask: [T, past + T]`` bool; returns ``[T, vocab]`` logits
        and the cache with the T new slots appended (``cache[l] = (keys, values)``, each
        ``[heads, past, head_dim]``)."""
        cfg = self.config
        heads, head_dim = cfg.heads, cfg.hidden // cfg.heads
        x = self.embed[ids]  # [T, hidden]
        new_cache = []
        for layer in range(cfg.layers):
            qkv_w, out_w, up_w, down_w = self.blocks[4 * layer : 4 * layer + 4]
            q, k, v = (self._norm(x) @ qkv_w.T).split(cfg.hidden, dim=-1)
            q, k, v = (t.view(-1, heads, head_dim).transpose(0, 1) for t in (q, k, v))
            q, k = self._rope(q, positions), self._rope(k, positions)
            if cache:
                k = torch.cat([cache[layer][0], k], dim=1)
                v = torch.cat([cache[layer][1], v], dim=1)
            new_cache.append((k, v))
            scores = (q @ k.transpose(-1, -2)) / head_dim**0.5  # [heads, T, past + T]
            scores = scores.masked_fill(~mask, float("-inf"))
            attn = torch.softmax(scores, dim=-1) @ v  # [heads, T, head_dim]
            x = x + attn.transpose(0, 1).reshape(-1, cfg.hidden) @ out_w.T
            gate, up = (self._norm(x) @ up_w.T).chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(gate) * up) @ down_w.T
        return self._norm(x) @ self.head.T, new_cache

    @torch.inference_mode()
    def full_forward(self, ids: list[int]) -> torch.Tensor:
        """Plain causal forward over ``ids`` with no cache: ``[len(ids), vocab]``."""
        t = len(ids)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        logits: torch.Tensor = self(torch.tensor(ids), torch.arange(t), causal, [])[0]
        return logits


class ReferenceBackend(KVBackend):
    """:class:`ReferenceModel` behind the backend contract."""

    def __init__(self, model: ReferenceModel) -> None:
        super().__init__(model.config.vocab_size, model.config.max_length)
        self.model = model
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _reset_cache(self) -> None:
        self.cache = []

    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        last_only: bool = False,
    ) -> torch.Tensor:
        past = self.cache[0][0].shape[1] if self.cache else 0
        if mask is None:
            t = len(ids)
            mask = torch.ones(t, past + t, dtype=torch.bool).tril(diagonal=past)
        logits: torch.Tensor
        logits, self.cache = self.model(ids, positions, mask, self.cache)
        return logits

    def _keep(self, keep: torch.Tensor) -> None:
        self.cache = [(k.index_select(1, keep), v.index_select(1, keep)) for k, v in self.cache]

    def _crop(self, length: int) -> None:
        self.cache = [(k[:, :length], v[:, :length]) for k, v in self.cache]
