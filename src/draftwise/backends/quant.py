"""Quantized CPU backend: the GGUF's own block formats in memory, matrix kernels that read them.

The fast backend computes on float32 copies of the weights; for a 4-bit GGUF that is 5-8x more
bytes to read per step than the file holds, and a CPU decoding step is a read of every weight.
This backend keeps each weight matrix as the GGUF stores it (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K,
Q6_K:
``[out, row_bytes]`` bytes) and runs the decoder with the C++ kernels of ``quant_kernels/``,
which read each block once per call and use it for every row of the tree — so verifying n rows
costs far less than n steps. The step contract (tree masks, positions, KV cache, commit by
compaction) is :class:`~draftwise.backends.decoder.DecoderBackend`'s, shared with the fast
backend, so every drafter and structured output run on it unchanged.

Exactness: with the kernels, every decoder layer runs in one C++ call (``Model`` in the
kernels) that computes each row alone — row-independent matrix products, per-row norms, and
attention for each (row, head) over exactly that row's visible keys in position order. A tree
row therefore gets bit for bit what plain decoding gets after the same tokens: verification is
exact by construction (``--exact`` costs nothing here), and greedy output equals plain greedy
decoding on this backend for every method, with no near-tie caveat.

Precision: the weights are exactly the values ggml's dequantization gives. By default
(``activations="int8"``) the input of each product is rounded to 8 bits per 32-value block with
its own scale and each block's (Q6_K: each 16 weights') product is an exact integer dot product
scaled in float32: the computation llama.cpp does (its Q8_0/Q8_1/Q8_K activations), so this
backend renders the GGUF model as llama.cpp does, not as a float32 copy would. The weights are
regrouped at load, R output rows per block (``pack_rows``; R = 16 on AVX-512 builds, else 8),
so that one vector lane computes one output row. Norms, rotary, attention and SiLU are float32.
The KV cache holds each key and value rounded to float16 (``kv_cache="float16"``, llama.cpp's
default: attention reads half the bytes, and a long window takes half the memory); plain and
speculative decoding read the same cache, so exactness is untouched. ``kv_cache="float32"``
keeps them as computed.
``activations="float32"`` keeps every product float32 (slower; each product is then the float32
rendering of the dequantized model's). A prompt's rows take the same row-by-row path as tree
rows (attention included), so prefilling a prompt at once gives the bits that prefilling part of
it and decoding the rest gives (int8 activations): a cached prefix can be reused exactly.

The kernels are compiled once per machine for the widest instruction set it has (AVX-512 VNNI,
AVX-VNNI or AVX2, see :func:`kernel_isa`; ``torch.utils.cpp_extension``, about a minute, cached
under ``~/.cache/draftwise/kernels``). Without a compiler, ninja or those
instructions the backend still runs, on float32 copies of the weights (the speed of the fast
backend), and ``capabilities.slow_reason`` says why. A tensor type the kernels do not
implement is dequantized to float32 for that tensor alone and listed in
``capabilities.float32_tensors``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from draftwise.backends.base import Capabilities
from draftwise.backends.decoder import (
    GEMMA3,
    GEMMA_NORMS,
    LAYER_LINEARS,
    Decoder,
    DecoderBackend,
)
from draftwise.backends.fast import check_config
from draftwise.sampling import RowOps, use_compiled_rows

__all__ = ["ISAS", "KernelTuning", "KernelsUnavailable", "QuantBackend", "QuantLinear",
           "float32_summary",
           "kernels_unavailable", "load_kernels", "IMPLEMENTED"]

# ggml type ids the kernels implement: name -> (id, weights per block, bytes per block)
IMPLEMENTED = {"Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22), "Q8_0": (8, 32, 34),
               "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210)}
_TYPE_IDS = {"F32": 0, **{name: spec[0] for name, spec in IMPLEMENTED.items()}}
_PACKED = 100  # type code of blocks regrouped R rows at a time (the kernels' kPacked)
_SOURCES = Path(__file__).with_name("quant_kernels")  # quant_kernels.cpp and its parts
_NO_COMPILE = "DRAFTWISE_NO_COMPILE"  # set to 1 to run as if no compiler were installed
_ISA = "DRAFTWISE_QUANT_ISA"  # avx2 | avx-vnni | avx512-vnni | avx512-amx: force one build
_loaded: dict[str, Any] = {}


class KernelsUnavailable(RuntimeError):
    """The quantized kernels cannot be built or run on this machine (the message says why)."""


def kernels_unavailable() -> str | None:
    """Why the kernels cannot be used here, or None."""
    if os.environ.get(_NO_COMPILE) == "1":
        return f"{_NO_COMPILE}=1"
    flags = _cpu_flags()
    missing = [f for f in ("avx2", "fma", "f16c") if flags is not None and f not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if not (shutil.which("c++") or shutil.which("g++")):
        return "no C++ compiler (g++) on PATH"
    if not shutil.which("ninja"):
        try:
            import ninja  # noqa: F401
        except ImportError:
            return "ninja is not installed (pip install ninja)"
    return None


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None  # not Linux: let the compiler decide
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


ISAS = ("avx512-amx", "avx512-vnni", "avx-vnni", "avx2")  # widest first


def kernel_isa(wanted: str | None = None) -> tuple[str, list[str]]:
    """The instruction set the kernels are built for on this machine, and its compiler flags:
    ``wanted`` (one of :data:`ISAS`), or the next narrower one this CPU has; by default the
    widest: AVX-512 VNNI with AMX tiles where the CPU has them (the tiles take products of many
    rows), else AVX-512 VNNI, else AVX-VNNI, else AVX2. ``$DRAFTWISE_QUANT_ISA`` overrides the
    default (e.g. to test the AVX2 build on an AVX-512 machine)."""
    flags = _cpu_flags() or set()
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags
    have = {
        "avx512-amx": avx512 and {"amx_tile", "amx_int8"} <= flags,
        "avx512-vnni": avx512,
        "avx-vnni": "avx_vnni" in flags,
        "avx2": True,
    }
    if wanted is None:
        wanted = os.environ.get(_ISA)
    if wanted is not None and wanted not in have:
        raise ValueError(f"the kernels' instruction set ({_ISA}) must be one of "
                         f"{', '.join(have)}, got {wanted!r}")
    names = list(have)
    start = names.index(wanted) if wanted else 0  # the widest, or the one asked for
    isa = next(name for name in names[start:] if have[name])  # ... or the next narrower
    avx512_flags = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
    extra = {"avx512-amx": [*avx512_flags, "-mamx-tile", "-mamx-int8"],
             "avx512-vnni": avx512_flags, "avx-vnni": ["-mavxvnni"], "avx2": []}[isa]
    return isa, extra


def load_kernels(cache_dir: Path, progress: bool = True, isa: str | None = None) -> Any:
    """The compiled kernel module for ``isa`` (default: this machine's widest; see
    :func:`kernel_isa`), built once into ``cache_dir/kernels``."""
    reason = kernels_unavailable()
    if reason:
        raise KernelsUnavailable(reason)
    isa, isa_flags = kernel_isa(isa)
    if isa in _loaded:
        return _loaded[isa]
    source = b"".join(path.name.encode() + path.read_bytes()
                      for path in sorted(_SOURCES.iterdir()) if path.suffix in (".cpp", ".h"))
    digest = hashlib.sha256(source + torch.__version__.encode() + isa.encode()).hexdigest()[:12]
    build = cache_dir / "kernels" / f"quant-{isa}-{digest}"
    build.mkdir(parents=True, exist_ok=True)
    fresh = not any(build.glob("*.so"))
    if fresh and progress:
        print(f"draftwise: compiling the quantized kernels once for this machine ({isa}, about "
              "a minute) ...", file=sys.stderr, flush=True)
    from torch.utils.cpp_extension import load

    try:
        module = load(
            name=f"draftwise_quant_{digest}", sources=[str(_SOURCES / "quant_kernels.cpp")],
            build_directory=str(build),
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", *isa_flags, "-fopenmp"],
            extra_ldflags=["-fopenmp"], verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as error:
        raise KernelsUnavailable(f"building the kernels failed: {error}") from error
    if fresh and progress:
        print("draftwise: quantized kernels built", file=sys.stderr, flush=True)
    _loaded[isa] = module
    use_compiled_rows(RowOps(module.top_k_rows, module.softmax_top_k_rows,
                             module.argmax_margin_rows))
    return module


@dataclass(frozen=True)
class KernelTuning:
    """Values the kernels may be tuned by without changing a bit of any result (the kernels'
    ``Tuning``; defaults measured on this project's machines, see docs/benchmarks.md).

    Attributes:
        prefetch_bytes: how far ahead of the block being multiplied the first pass over a
            weight matrix prefetches it (0: no prefetch).
        amx_min_rows: the fewest activation rows whose Q8_0 products go to AMX tiles (four
            times as many for the 4-bit types); AMX builds only.
    """

    prefetch_bytes: int = 4096
    amx_min_rows: int = 4

    def __post_init__(self) -> None:
        if self.prefetch_bytes < 0:
            raise ValueError(f"prefetch_bytes must be >= 0, got {self.prefetch_bytes}")
        if self.amx_min_rows < 1:
            raise ValueError(f"amx_min_rows must be >= 1, got {self.amx_min_rows}")


ACTIVATIONS = ("int8", "float32")
KV_CACHES = ("float16", "float32")
_INT8_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # the kernels' 8-bit path on the GGUF layout
# ... and on blocks packed R rows at a time
_PACKABLE = (*_INT8_TYPES, "Q5_0", "Q4_K", "Q5_K", "Q6_K")


class QuantLinear:
    """``y = x @ W.T + bias`` with ``W`` in a GGUF block format (or float32 for the rest).

    ``activations``: ``"int8"`` rounds each 32-value block of ``x`` to 8 bits with its own
    scale (as llama.cpp does) where the weight type has that path (Q4_0, Q4_1, Q8_0), and the
    products become integer dot products on the blocks regrouped R output rows at a time
    (``pack_rows``: the same bytes, in the order the kernels read); ``"float32"`` keeps ``x`` as
    is. ``packed``: ``data`` is already regrouped (a concatenation of packed parts)."""

    def __init__(self, data: torch.Tensor, qtype: str, in_features: int,
                 bias: torch.Tensor | None, ops: Any, activations: str = "float32",
                 packed: bool = False) -> None:
        self.qtype, self.in_features, self.bias = qtype, in_features, bias
        self.ops = ops if qtype in IMPLEMENTED else None
        if self.ops is None and qtype in IMPLEMENTED:  # no kernels: float32 copy
            data = dequantize(data, qtype, in_features)
        rows = self.ops.rows_per_pack() if self.ops is not None else 0
        self.out_features = data.shape[0] * (rows if packed else 1)
        if (self.ops is not None and activations == "int8" and qtype in _PACKABLE
                and not packed and data.shape[0] % rows == 0):
            data = self.ops.pack_rows(data.contiguous(), _TYPE_IDS[qtype], in_features)
            packed = True
        # 8-bit activations: packed blocks, or the GGUF layout's own path for the 32-weight types
        self.int8 = activations == "int8" and self.ops is not None and (
            packed or qtype in _INT8_TYPES)
        self.packed = packed
        self.code = _TYPE_IDS.get(qtype, 0) + (_PACKED if packed else 0)
        self.data = data.contiguous()

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def __call__(self, x: torch.Tensor, exact: bool = False) -> torch.Tensor:
        if self.ops is None:
            return F.linear(x, self.data, self.bias)
        matmul = self.ops.qmatmul_q8 if self.int8 else self.ops.qmatmul
        y: torch.Tensor = matmul(x.float().contiguous(), self.data, self.code, self.in_features)
        return y if self.bias is None else y + self.bias


class _Concat:
    """Several linears on the same input, outputs side by side (a fused QKV whose parts have
    different block types)."""

    def __init__(self, parts: list[QuantLinear]) -> None:
        self.parts = parts

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def __call__(self, x: torch.Tensor, exact: bool = False) -> torch.Tensor:
        return torch.cat([p(x, exact) for p in self.parts], dim=-1)


class _Embedding:
    """``embed[ids]``: rows of a (possibly quantized) matrix, decoded on lookup."""

    def __init__(self, linear: QuantLinear) -> None:
        self.linear = linear

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        linear = self.linear
        if linear.ops is None:
            return linear.data[ids]
        rows: torch.Tensor = linear.ops.dequantize_rows(
            linear.data, ids.reshape(-1), linear.code, linear.in_features)
        return rows.view(*ids.shape, linear.in_features)


def dequantize(data: torch.Tensor, qtype: str, in_features: int) -> torch.Tensor:
    """Float32 values of GGUF blocks ``[out, row_bytes]`` (gguf's reference dequantization)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    if qtype in ("F32", "F16", "BF16"):
        return data.float()
    values = gguf_dequantize(data.numpy(), GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).view(-1, in_features)


class QuantBackend(DecoderBackend):
    """A :class:`~draftwise.backends.decoder.Decoder` on a GGUF file's quantized weights, its
    layers run by the C++ kernels (or by the decoder's torch forward where they do not build).

    ``config``: the model's transformers config (shapes, rotary, norms); the weights come from
    ``gguf_path`` only. ``ops``: the kernel module from :func:`load_kernels`, or None to run
    on float32 copies (slow; :attr:`slow_reason` says why)."""

    def __init__(self, gguf_path: str | Path, config: Any, *, ops: Any = None,
                 slow_reason: str | None = None, max_length: int | None = None,
                 exact: bool = False, activations: str = "int8",
                 kv_cache: str = "float16", tuning: KernelTuning | None = None) -> None:
        from gguf import GGUFReader

        check_config(config)
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
        if kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
        self.activations = activations
        self.tuning = tuning or KernelTuning()
        self._fallbacks: list[tuple[str, str]] = []  # (tensor, its GGUF type) run in float32
        reader = GGUFReader(str(gguf_path))
        self._tensors = {t.name: t for t in reader.tensors}
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
        # llama.cpp's converter interleaves the rotary halves of Llama's q/k rows; undo it
        unpermute = arch == "llama"

        def linear(name: str, bias: str | None = None, heads_of: int = 0) -> QuantLinear:
            data, qtype, in_features = self._raw(name)
            if unpermute and heads_of:
                data = data[_unpermute_rows(data.shape[0], heads_of)]
            b = self._dense(bias) if bias and bias in self._tensors else None
            if qtype not in IMPLEMENTED and qtype != "F32":
                self._fallbacks.append((name, qtype))
                data, qtype = dequantize(data, qtype, in_features), "F32"
            return QuantLinear(data, qtype, in_features, b, ops, activations)

        def fused(parts: list[QuantLinear]) -> QuantLinear | _Concat:
            if len({(p.qtype, p.packed) for p in parts}) == 1 and parts[0].ops is not None:
                bias = None
                if any(p.bias is not None for p in parts):
                    bias = torch.cat([p.bias if p.bias is not None else
                                      torch.zeros(p.out_features) for p in parts])
                return QuantLinear(torch.cat([p.data for p in parts]), parts[0].qtype,
                                   parts[0].in_features, bias, ops, activations,
                                   packed=parts[0].packed)
            return _Concat(parts)

        layers: list[dict[str, Any]] = []
        for i in range(int(config.num_hidden_layers)):
            p = f"blk.{i}."
            if config.model_type == GEMMA3:  # its GGUF norms hold 1 + weight, the scale itself
                layers.append({
                    "q_norm": self._dense(p + "attn_q_norm.weight"),
                    "k_norm": self._dense(p + "attn_k_norm.weight"),
                    "post_attn_norm": self._dense(p + "post_attention_norm.weight"),
                    "post_mlp_norm": self._dense(p + "post_ffw_norm.weight")})
            else:
                layers.append({})
            layers[-1].update({
                "attn_norm": self._dense(p + "attn_norm.weight"),
                "qkv": fused([linear(p + "attn_q.weight", p + "attn_q.bias", heads),
                              linear(p + "attn_k.weight", p + "attn_k.bias", kv_heads),
                              linear(p + "attn_v.weight", p + "attn_v.bias")]),
                "out": linear(p + "attn_output.weight"),
                "mlp_norm": self._dense(p + "ffn_norm.weight"),
                "gate_up": fused([linear(p + "ffn_gate.weight"), linear(p + "ffn_up.weight")]),
                "down": linear(p + "ffn_down.weight"),
            })
        embed = linear("token_embd.weight")
        head = linear("output.weight") if "output.weight" in self._tensors else embed
        decoder = Decoder(config, torch.float32, _Embedding(embed), layers,
                          self._dense("output_norm.weight"), head, max_length)
        self.slow_reason = None if ops is not None else (slow_reason or "no kernels given")
        del self._tensors  # the reader's memory map is no longer needed
        self.ops = ops  # the compiled kernel module, or None (float32 copies)
        self.decoder = decoder
        if ops is not None:
            self._into_arena(ops)
        self._native = self._build_native()
        # the kernels read a float16 cache (torch's path: float32 only)
        half = self._native is not None and kv_cache == "float16"
        super().__init__(decoder, exact=exact, cache_dtype=torch.float16 if half else None)
        self.capabilities = self._declare()

    def _declare(self) -> Capabilities:
        """What this backend does, from what it was built with."""
        native = self._native is not None
        # the step-cost curve depends on the kernels' build, the activations and the cache
        build = getattr(self.ops, "__name__", "float32-copies")
        tag = f"|{build}|{self.activations}|kv-{self.keys.dtype}".replace("torch.", "")
        # a cached prefix is reusable exactly when every row goes the row-by-row path: the
        # kernels run the model, and every product is an 8-bit one or a float32 tensor's (a
        # float32-activation product of a long prompt goes through torch's batched kernel)
        pieces = [p for layer in self.decoder.layers for name in LAYER_LINEARS
                  for p in (layer[name].parts if isinstance(layer[name], _Concat)
                            else [layer[name]])]
        return Capabilities(
            hidden_states=True, exact=self.exact or native,
            reuses_prefix=native and all(p.int8 or p.ops is None for p in pieces),
            shared_pass=native, cost_tag=tag + ("|exact" if self.exact else ""),
            float32_tensors=tuple(f"{name} ({qtype})" for name, qtype in self._fallbacks),
            slow_reason=self.slow_reason)

    def _into_arena(self, ops: Any) -> None:
        """Move the kernels' weight matrices into one arena of huge pages
        (``weight_arena``): the same bytes, read faster when a step streams them all."""
        linears: dict[int, QuantLinear] = {}
        for linear in [*(layer[name] for layer in self.decoder.layers
                         for name in LAYER_LINEARS),
                       self.decoder.head, self.decoder.embed.linear]:
            for part in (linear.parts if isinstance(linear, _Concat) else [linear]):
                if part.ops is not None and part.data.dtype == torch.uint8:
                    linears[id(part)] = part
        aligned = [-(-p.nbytes // 64) * 64 for p in linears.values()]
        arena = ops.weight_arena(sum(aligned))
        offset = 0
        for part, size in zip(linears.values(), aligned, strict=True):
            view = arena[offset:offset + part.nbytes].view(part.data.shape)
            view.copy_(part.data)
            part.data = view
            offset += size
            _return_freed_memory()  # (else the copy's peak and the old blocks stay resident)

    def _build_native(self) -> Any:
        """The kernels' ``Model`` over these layers (every layer in one call), or None."""
        decoder = self.decoder
        if self.ops is None or decoder.head_dim % 8 or int(decoder.norm.numel()) % 8:
            return None  # (the kernels' vector loops need multiples of 8)
        ops = self.ops

        def parts(linear: QuantLinear | _Concat) -> list[Any]:
            pieces = linear.parts if isinstance(linear, _Concat) else [linear]
            out = []
            for p in pieces:
                data, qtype = p.data, p.qtype
                if p.ops is None:  # a float32 tensor: rows of floats read as bytes
                    data, qtype = data.float().contiguous().view(torch.uint8), "F32"
                code = p.code if qtype != "F32" else _TYPE_IDS["F32"]
                bias = p.bias if p.bias is not None else torch.empty(0)
                out.append(ops.Linear(data, code, p.in_features, bias.float()))
            return out

        def norm(layer: dict[str, Any], name: str) -> torch.Tensor:
            return layer[name].float() if name in layer else torch.empty(0)

        layers = [
            ops.Layer(layer["attn_norm"].float(), parts(layer["qkv"]), parts(layer["out"])[0],
                      layer["mlp_norm"].float(), parts(layer["gate_up"]), parts(layer["down"])[0],
                      *(norm(layer, name) for name in GEMMA_NORMS), reach or 0)
            for layer, reach in zip(self.decoder.layers, decoder.reach, strict=True)
        ]
        return ops.Model(layers, decoder.norm.float(), decoder.eps, decoder.heads,
                         decoder.kv_heads, decoder.head_dim, self.activations == "int8",
                         prefetch_bytes=self.tuning.prefetch_bytes,
                         amx_min_rows=self.tuning.amx_min_rows,
                         attn_scale=decoder.scaling or 0.0, gelu=decoder.gemma)

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The full and the sliding layers' rotary tables at ``positions`` (the latter empty
        where no layer slides), as the kernels' Model takes them."""
        decoder = self.decoder
        cos, sin = decoder.cos[positions], decoder.sin[positions]
        if not any(decoder.reach):
            return cos, sin, torch.empty(0), torch.empty(0)
        return cos, sin, decoder.local_cos[positions], decoder.local_sin[positions]

    def skipping(self, skip: set[int] | frozenset[int]) -> QuantBackend:
        other = super().skipping(skip)
        assert isinstance(other, QuantBackend)
        other._native = other._build_native()
        other.capabilities = other._declare()
        return other

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                 last_only: bool = False) -> torch.Tensor:
        if self._native is None:
            return super()._forward(ids, positions, mask, last_only)
        self._check_room(len(ids))
        t, start, decoder = len(ids), self._cached, self.decoder
        if mask is None:
            tree = torch.ones(t, t, dtype=torch.uint8).tril()
        else:  # [T, start + T]: the committed prefix is visible to every row
            tree = mask[:, start:].to(torch.uint8)
        hidden = self._native.forward(decoder.embedding(ids), self.keys, self.values, start,
                                      *self._rotary(positions), tree, last_only)
        self._cached = start + t
        if last_only:
            hidden = hidden[-1:]
        self._hidden = hidden
        logits: torch.Tensor = decoder.head(hidden)
        return logits

    @torch.inference_mode()
    def forward_batch(self, ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      sequence: torch.Tensor, write: torch.Tensor, prefix: torch.Tensor,
                      offsets: torch.Tensor, extra: torch.Tensor,
                      positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of several sequences in one pass over a pool's cache ``keys``/``values``
        (``[slots, layers, kv_heads, window, head_dim]``; ``capabilities.shared_pass`` only):
        row r is token ``ids[r]`` of slot ``sequence[r]`` at ``positions[r]``, written to
        cache slot ``write[r]``, seeing that slot's first ``prefix[r]`` cached tokens and the
        slots ``extra[offsets[r]:offsets[r + 1]]``. Returns ``(hidden, logits)``:
        ``[R, hidden]`` final-normed states and ``[R, vocab]`` logits."""
        if self._native is None:
            raise RuntimeError("a shared pass needs the quantized kernels")
        decoder = self.decoder
        hidden: torch.Tensor = self._native.forward_batch(
            decoder.embedding(ids), keys, values, sequence, write, prefix, offsets, extra,
            *self._rotary(positions))
        logits: torch.Tensor = decoder.head(hidden)
        return hidden, logits

    def lm_head_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The LM head's rows ``[len(ids), hidden]``, decoded to float32."""
        return _Embedding(self.decoder.head)[ids].float()

    def _raw(self, name: str) -> tuple[torch.Tensor, str, int]:
        if name not in self._tensors:
            raise KeyError(f"the GGUF file has no tensor {name!r}")
        tensor = self._tensors[name]
        qtype = tensor.tensor_type.name
        in_features = int(tensor.shape[0])
        data = torch.from_numpy(np.array(tensor.data))  # a private copy, not the memory map
        if qtype in ("F32", "F16", "BF16"):
            data = data.float().view(-1, in_features)
        return data, qtype, in_features

    def _dense(self, name: str) -> torch.Tensor:
        data, qtype, in_features = self._raw(name)
        return dequantize(data, qtype, in_features).reshape(-1)

    def step_weights(self) -> tuple[int, int]:
        """What one decoding step of one row reads and computes in its matrix products: the
        bytes of every layer's matrices and the LM head (the embedding gives one row), and the
        multiply-adds (one per weight)."""
        decoder = self.decoder
        linears = [decoder.head, *(layer[name] for layer in decoder.layers
                                   for name in LAYER_LINEARS)]
        parts = [p for linear in linears
                 for p in (linear.parts if isinstance(linear, _Concat) else [linear])]
        return (sum(p.nbytes for p in parts),
                sum(p.out_features * p.in_features for p in parts))

    def machine_limits(self) -> tuple[float, float] | None:
        """This machine's read bandwidth (bytes/s, the threads streaming a buffer larger than
        any cache) and 8-bit multiply-add rate (per second, the products' own dot product), as
        the kernels measure them; None without the kernels."""
        if self.ops is None:
            return None
        bandwidth = float(self.ops.read_bandwidth(1 << 29, 5))
        return bandwidth, float(self.ops.int8_peak())


def float32_summary(tensors: Sequence[str]) -> str:
    """``"169 tensors of type Q5_0 (blk.0.attn_q.weight, ...)"``: what runs in float32, from
    ``capabilities.float32_tensors`` (``"name (type)"`` each)."""
    by_type: dict[str, list[str]] = {}
    for entry in tensors:
        name, _, qtype = entry.rpartition(" (")
        by_type.setdefault(qtype.rstrip(")"), []).append(name)
    return "; ".join(
        f"{len(names)} tensor{'s' if len(names) > 1 else ''} of type {qtype} "
        f"({', '.join(names[:2])}{', ...' if len(names) > 2 else ''})"
        for qtype, names in by_type.items()
    )


def _unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order turning llama.cpp's interleaved q/k rows back into transformers' halves."""
    half = rows // heads // 2
    gguf_order = torch.arange(rows).view(heads, 2, half).transpose(1, 2).reshape(-1)
    return torch.argsort(gguf_order)


def _return_freed_memory() -> None:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``; elsewhere nothing):
    glibc keeps large freed blocks in the heap once its mmap threshold has grown, so the
    weights' old copies would stay resident beside the arena."""
    global _malloc_trim
    if _malloc_trim is None:
        name = ctypes.util.find_library("c")
        library = ctypes.CDLL(name) if name else None
        _malloc_trim = getattr(library, "malloc_trim", False) or False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None  # libc's malloc_trim once looked up, False where there is none
