"""Sampling: the one place logits become probabilities, and the one argmax.

Plain decoding and speculative verification both call :meth:`Sampling.probs` and
:meth:`Sampling.greedy`, so a speculative step can never use a different rule from plain
decoding. Transforms are applied in this order: repetition penalty (on the raw logits, seeing the
committed tokens *and* each node's own draft path), temperature, then the truncations top-k,
top-p, min-p and typical on the resulting distribution.

Greedy (``temperature == 0``) is the argmax of the penalized logits; truncations do not apply, as
in transformers' ``generate(do_sample=False)``. Ties resolve to the lowest token id.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["GREEDY", "RowOps", "SamplingConfig", "Sampling", "argmax_margin_rows", "argmax_rows",
           "softmax_top_k_rows", "top2_margins", "top_k_rows", "use_compiled_rows"]


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    Attributes:
        temperature: 0 = greedy; > 0 samples from ``softmax(logits / temperature)``.
        top_k: keep the k most likely tokens (0 = off).
        top_p: keep the smallest set whose probability reaches p (1.0 = off).
        min_p: drop tokens below ``min_p`` times the top probability (0 = off).
        typical_p: locally typical sampling mass (1.0 = off).
        repetition_penalty: CTRL-style penalty on tokens already in the context (1.0 = off).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if not 0.0 < self.typical_p <= 1.0:
            raise ValueError(f"typical_p must be in (0, 1], got {self.typical_p}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingConfig()


class Sampling:
    """Applies a :class:`SamplingConfig` to rows of logits."""

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config

    def penalize(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """Repetition penalty. ``logits, seen: [rows, vocab]`` (``seen`` bool: token in context)."""
        penalty = self.config.repetition_penalty
        if penalty == 1.0 or seen is None:
            return logits
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        return torch.where(seen, penalized, logits)

    def greedy(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """``[rows]`` argmax of the penalized logits, ties to the lowest id."""
        return argmax_rows(self.penalize(logits, seen))

    def probs(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """``[rows, vocab]`` sampling distribution (rows sum to 1) for ``temperature > 0``."""
        cfg = self.config
        if cfg.greedy:
            raise ValueError("probs() needs temperature > 0; use greedy() for temperature 0")
        scores = self.penalize(logits, seen).to(torch.float64) / cfg.temperature
        probs = torch.softmax(scores, dim=-1)
        # Each truncation sees the distribution the previous one left (transformers' order).
        if cfg.top_k > 0 and cfg.top_k < probs.shape[-1]:
            kth = torch.topk(probs, cfg.top_k, dim=-1).values[..., -1:]
            probs = _restrict(probs, probs >= kth)
        if cfg.top_p < 1.0:
            probs = _restrict(probs, _nucleus(probs, cfg.top_p))
        if cfg.min_p > 0.0:
            probs = _restrict(probs, probs >= cfg.min_p * probs.max(dim=-1, keepdim=True).values)
        if cfg.typical_p < 1.0:
            probs = _restrict(probs, _typical(probs, cfg.typical_p))
        return probs


def _restrict(probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the tokens outside ``keep`` and renormalize each row."""
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    return probs / probs.sum(dim=-1, keepdim=True)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest most-likely set whose mass reaches ``top_p`` (always >= 1 token)."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def _typical(probs: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical set: tokens closest to the entropy in surprisal until ``mass`` is covered."""
    logp = torch.log(probs.clamp_min(1e-300))
    entropy = -(probs * logp).sum(dim=-1, keepdim=True)
    distance = (-logp - entropy).abs()
    order = torch.argsort(distance, dim=-1)
    sorted_probs = probs.gather(-1, order)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = mass_before < mass
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``[rows]`` index of each row's maximum, the lowest id among ties (as ``torch.argmax``).

    NumPy's argmax on a CPU float32/float64 tensor: torch's is many times slower for a few rows
    of a large vocabulary, enough to show in a decoding step."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.ascontiguousarray(np.argmax(logits.detach().numpy(), axis=-1)))
    return torch.argmax(logits, dim=-1)


TopK = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class RowOps:
    """The quant kernels' statistics of float32 rows, each one or two passes over a row (the
    same results as the torch/NumPy code beside them, which runs where the kernels do not load):

    top_k: ``(values, indices)`` as :func:`top_k_rows` (equal values: the lower index first).
    softmax_top_k: ``(probabilities, indices)`` as :func:`softmax_top_k_rows`.
    argmax_margin: ``(argmax [rows] int64, margin [rows] float64)`` as :func:`argmax_rows` and
        :func:`top2_margins` over every row.
    """

    top_k: TopK
    softmax_top_k: TopK
    argmax_margin: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


_compiled: RowOps | None = None


def use_compiled_rows(ops: RowOps) -> None:
    """Let the row statistics below use the quant kernels' ``ops`` (registered when they
    load)."""
    global _compiled
    _compiled = ops


def argmax_margin_rows(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(argmax [rows], margin [rows] float64)`` of float32 rows in one compiled pass each, or
    None where the kernels are not loaded (then :func:`argmax_rows` and :func:`top2_margins`).
    Greedy verification needs both of every row it reads; NumPy's argmax then a margin per
    emitted row cost several passes and copies of a vocabulary-wide row."""
    if _compiled is None or logits.dtype != torch.float32 or logits.device.type != "cpu":
        return None
    return _compiled.argmax_margin(logits)


def top_k_rows(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)``, each ``[rows, k]``: every row's k largest entries, largest first,
    as ``torch.topk`` gives them (ties may come in another order).

    Drafters learn from the top few of every verified row each step, and torch's top-k scans a
    large vocabulary slowly enough to show next to a small model's step. The k largest entries
    lie in the k blocks with the largest maxima (any other block's maximum is below k entries),
    so only those blocks are searched, after one pass of block maxima. The block is the largest
    power of two up to 512 that divides the vocabulary (no padding copy); with none of at
    least 64, or few blocks, it is torch's top-k. Where the quant kernels are loaded, their
    one-pass top-k runs instead (:func:`use_compiled_rows`)."""
    rows, vocab = logits.shape
    k = min(k, vocab)
    if _compiled is not None and logits.dtype == torch.float32 and k >= 1:
        return _compiled.top_k(logits, k)
    block = next((b for b in (512, 256, 128, 64) if vocab % b == 0), 0)
    if block == 0 or vocab // block < 4 * k or not logits.is_contiguous():
        top = torch.topk(logits, k, dim=-1)
        return top.values, top.indices
    blocks = logits.view(rows, -1, block)
    chosen = torch.topk(blocks.amax(-1), k, dim=-1).indices  # [rows, k] blocks
    candidates = blocks[torch.arange(rows).unsqueeze(1), chosen].reshape(rows, -1)
    top = torch.topk(candidates, k, dim=-1)
    which = chosen.gather(1, top.indices // block)
    return top.values, which * block + top.indices % block


def softmax_top_k_rows(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probabilities, indices)``, each ``[rows, k]``: every row's k likeliest tokens under its
    softmax, likeliest first, in float32 (the whole softmax, or torch's logsumexp, costs more
    than a small model's step can spare; the kernels sum the exponentials in one pass)."""
    k = min(k, logits.shape[-1])
    if _compiled is not None and logits.dtype == torch.float32 and k >= 1:
        return _compiled.softmax_top_k(logits, k)
    rows = logits.float()
    top, indices = top_k_rows(rows, k)
    return torch.exp(top - torch.logsumexp(rows, dim=-1, keepdim=True)), indices


def top2_margins(logits: torch.Tensor, top: Sequence[int],
                 rows: Sequence[int] | None = None) -> tuple[float, ...]:
    """For each row ``r`` of ``rows`` (default: all) with argmax ``top[k]``: ``logits[r, top[k]]``
    less the row's largest other value, in float64. A margin near 0 is a near-tie that floating
    point may break. Reads the rows in place (no copy of a vocabulary-wide row)."""
    values = logits.detach().cpu()
    if values.dtype not in (torch.float32, torch.float64):
        values = values.to(torch.float64)
    table = values.numpy()
    margins = []
    for r, i in zip(range(len(table)) if rows is None else rows, top, strict=True):
        row = table[r]  # the maxima either side of the top
        second = max(row[:i].max(initial=-np.inf), row[i + 1 :].max(initial=-np.inf))
        margins.append(float(row[i]) - float(second) if np.isfinite(second) else 0.0)
    return tuple(margins)
