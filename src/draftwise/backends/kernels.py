"""Matrix-product kernels chosen by row count: the part of a CPU step that decides its cost.

On this project's CPUs the time of ``x @ W.T`` for a few rows ``x`` is far from proportional to
the rows, and the best kernel depends on the row count: MKL's path for 2 or 3 rows costs about
twice or thrice one row, and for a large LM head oneDNN with a prepacked weight beats MKL by a
wide margin at one row. Timing one weight alone misleads (it stays in cache),
so :meth:`draftwise.backends.fast.FastBackend.tune` times whole forward passes for each row
bucket and kernel and records the winner here, per weight shape and row bucket:

* ``mkl``: ``torch.nn.functional.linear``;
* ``mkldnn``: oneDNN's linear with the weight prepacked for its blocked layout (when the build
  has it).

:class:`Linear` holds one weight and applies the chosen kernel; with ``exact`` it applies the
one-row kernel to each row, so every row's result is bit-identical to plain decoding's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["BUCKETS", "KERNELS", "KernelChoice", "Linear", "available", "row_bucket"]

BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def row_bucket(rows: int) -> int:
    """The measured row count that stands for ``rows``: the smallest bucket >= rows."""
    for bucket in BUCKETS:
        if rows <= bucket:
            return bucket
    return BUCKETS[-1]


class Linear:
    """``y = x @ weight.T + bias`` with a kernel chosen by (shape, rows)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        choice: KernelChoice,
    ) -> None:
        self.weight = weight  # [out, in]
        self.bias = bias
        self.choice = choice
        self.shape = (int(weight.shape[0]), int(weight.shape[1]))
        self._packed: torch.Tensor | None = None

    def packed(self) -> torch.Tensor:
        if self._packed is None:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight)
        return self._packed

    def run(self, kernel: str, x: torch.Tensor) -> torch.Tensor:
        return KERNELS[kernel](self, x)

    def __call__(self, x: torch.Tensor, exact: bool = False) -> torch.Tensor:
        if exact:  # plain decoding's one-row kernel, one row at a time
            one_row = self.choice.kernel(self.shape, 1)
            return torch.cat([self.run(one_row, x[i : i + 1]) for i in range(x.shape[0])])
        return self.run(self.choice.kernel(self.shape, x.shape[0]), x)


def _mkl(linear: Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, linear.weight, linear.bias)


def _mkldnn(linear: Linear, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
        x, linear.packed(), linear.bias, "none", [], ""
    )
    return out


KERNELS: dict[str, Callable[[Linear, torch.Tensor], torch.Tensor]] = {
    "mkl": _mkl,
    "mkldnn": _mkldnn,
}


def available(name: str, linear: Linear) -> bool:
    """Whether kernel ``name`` runs on this build for ``linear``'s dtype."""
    if name != "mkldnn":
        return True
    if linear.weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return False
    try:
        _mkldnn(linear, torch.zeros(1, linear.shape[1]))
    except (RuntimeError, AttributeError):
        return False
    return True


class KernelChoice:
    """The kernel to use for each (weight shape, row bucket); ``mkl`` where unmeasured."""

    def __init__(self, table: dict[str, str] | None = None) -> None:
        self.table = dict(table or {})

    @staticmethod
    def _key(shape: tuple[int, int], bucket: int) -> str:
        return f"{shape[0]}x{shape[1]}@{bucket}"

    def kernel(self, shape: tuple[int, int], rows: int) -> str:
        return self.table.get(self._key(shape, row_bucket(rows)), "mkl")

    def set_bucket(self, shapes: Iterable[tuple[int, int]], bucket: int, kernel: str) -> None:
        """Use ``kernel`` for every shape at row bucket ``bucket``."""
        for shape in shapes:
            self.table[self._key(shape, bucket)] = kernel

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.table, indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> KernelChoice:
        return cls(json.loads(path.read_text()))
