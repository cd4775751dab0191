"""The quant backend: GGUF block kernels against float64 references, and the backend exact.

Tolerances follow from what is computed: the kernels decode each weight exactly as ggml does and
sum float32 products, so a product of length K differs from the float64 product of the same
decoded weights by at most K u sum|x w| (u = 2**-24), in any summation order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from draftwise.backends.fast import FastBackend
from draftwise.backends.quant import (
    IMPLEMENTED,
    KernelTuning,
    QuantBackend,
    dequantize,
    load_kernels,
)
from draftwise.drafters import create_drafter
from draftwise.drafters.heads import DraftHeads, _KernelHeads
from draftwise.engine import Engine, GenerationConfig
from draftwise.sampling import argmax_rows, top2_margins
from draftwise.tree import DraftTree

from ..conftest import tiny_hf_model

U = 2.0**-24


def random_blocks(qtype: str, rows: int, in_features: int, seed: int,
                  largest: bool = False) -> torch.Tensor:
    """Random GGUF blocks of ``qtype``: random quants and scale bits, float16 scales of a
    sensible size (random bytes there could be inf or NaN). ``largest``: every quant and scale
    bit set instead (the largest unsigned quants; Q8_0's and Q6_K's scales then read -1)."""
    _, weights, size = IMPLEMENTED[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, in_features // weights, size), dtype=np.uint8)
    if largest:
        blocks[...] = 0xFF
    scales = rng.uniform(0.001, 0.05, (rows, in_features // weights, 2)).astype(np.float16)
    offset = {"Q6_K": 208}.get(qtype, 0)
    blocks[..., offset : offset + 2] = scales[..., :1].view(np.uint8)
    if qtype in ("Q4_1", "Q4_K", "Q5_K"):  # second float16: the min
        blocks[..., 2:4] = (scales[..., 1:] * (-1 if qtype == "Q4_1" else 1)).view(np.uint8)
    return torch.from_numpy(blocks.reshape(rows, -1))


@pytest.mark.parametrize("qtype", sorted(IMPLEMENTED))
def test_the_scalar_reference_decodes_as_gguf_and_the_simd_decoders_as_it(
    qtype: str, ops: object
) -> None:
    """Each block type's plain scalar decoding (the kernels' reference.h: ggml's formulas, no
    fused multiply-adds) gives exactly the gguf package's float32 values; the vector decoders
    of both layouts stay within a few roundings of it (they may fuse the scale's multiply-add)."""
    code, in_features = IMPLEMENTED[qtype][0], 512
    data = random_blocks(qtype, 2 * ops.rows_per_pack(), in_features, seed=code + 1)  # type: ignore[attr-defined]
    reference = ops.dequantize_reference(data, code, in_features)  # type: ignore[attr-defined]
    assert torch.equal(reference, dequantize(data, qtype, in_features))
    ids = torch.arange(data.shape[0])
    packed = ops.pack_rows(data, code, in_features)  # type: ignore[attr-defined]
    for layout, weights in ((code, data), (100 + code, packed)):
        decoded = ops.dequantize_rows(weights, ids, layout, in_features)  # type: ignore[attr-defined]
        torch.testing.assert_close(decoded.double(), reference.double(), rtol=4 * U, atol=0)


@pytest.mark.parametrize("qtype", sorted(IMPLEMENTED))
def test_kernels_decode_as_gguf_and_sum_within_float32_bounds(qtype: str, ops: object) -> None:
    code = IMPLEMENTED[qtype][0]
    in_features = 512
    data = random_blocks(qtype, 37, in_features, seed=code)
    reference = dequantize(data, qtype, in_features).double()  # the gguf package's decoding
    ids = torch.tensor([0, 5, 36, 5])
    decoded = ops.dequantize_rows(data, ids, code, in_features).double()  # type: ignore[attr-defined]
    # the same formula as ggml; K-types multiply two float scales first: a few roundings apart
    torch.testing.assert_close(decoded, reference[ids], rtol=4 * U, atol=0)
    generator = torch.Generator().manual_seed(code)
    for rows in (1, 2, 3, 8, 17, 64):
        x = torch.randn(rows, in_features, generator=generator)
        y = ops.qmatmul(x, data, code, in_features).double()  # type: ignore[attr-defined]
        exact = x.double() @ reference.T
        bound = (in_features + 4) * U * (x.double().abs() @ reference.abs().T) + 1e-30
        assert bool(((y - exact).abs() <= bound).all()), (qtype, rows)
        # a row's result does not depend on the rows computed with it (bit for bit)
        alone = ops.qmatmul(x[-1:].contiguous(), data, code, in_features)  # type: ignore[attr-defined]
        assert torch.equal(alone[0], y[-1].float()), (qtype, rows)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_packed_blocks_hold_the_same_weights(qtype: str, ops: object) -> None:
    """pack_rows regroups R rows' blocks (R = 8 or 16 by build); every row decodes, bit for
    bit, to what the original blocks decode to."""
    code, in_features = IMPLEMENTED[qtype][0], 512
    rows = 3 * ops.rows_per_pack()  # type: ignore[attr-defined]
    data = random_blocks(qtype, rows, in_features, seed=20 + code)
    packed = ops.pack_rows(data, code, in_features)  # type: ignore[attr-defined]
    # the same bytes, regrouped (Q4_K, Q5_K: their twelve bytes of 6-bit scales become sixteen)
    size = IMPLEMENTED[qtype][2]
    grown = size + 4 if qtype in ("Q4_K", "Q5_K") else size
    assert packed.numel() * size == data.numel() * grown
    ids = torch.arange(rows)
    assert torch.equal(
        ops.dequantize_rows(packed, ids, 100 + code, in_features),  # type: ignore[attr-defined]
        ops.dequantize_rows(data, ids, code, in_features),  # type: ignore[attr-defined]
    )


@pytest.mark.parametrize(("qtype", "packed"), [
    ("Q4_0", False), ("Q4_1", False), ("Q8_0", False),
    ("Q4_0", True), ("Q4_1", True), ("Q5_0", True), ("Q8_0", True), ("Q4_K", True),
    ("Q5_K", True), ("Q6_K", True),
])
def test_int8_activation_products_within_the_rounding_of_the_activations(
    qtype: str, packed: bool, ops: object
) -> None:
    """8-bit activations: each 32-block of x is rounded to a multiple of its scale
    d = max|x_block| / 127, so |x_i - x8_i| <= d / 2 and the product is off by at most
    sum over blocks of d/2 * sum|w_i| (plus float32 summation, as above). Packed: 2 groups of
    R output rows (the K types' two-group tiles) and 3 (one group's tiles for the third)."""
    for groups in (2, 3) if packed else (0,):
        _check_int8_products(qtype, packed, groups, ops)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_int8_products_of_the_largest_quants_do_not_saturate(qtype: str, ops: object) -> None:
    """Without VNNI a product is int16 sums of byte products, and several groups' int16 sums
    add before widening: every quant at its largest against activations rounded to +-127 (rows
    of one sign, and of alternating signs) is where such a sum would saturate."""
    code, in_features = IMPLEMENTED[qtype][0], 512
    data = random_blocks(qtype, 2 * ops.rows_per_pack(), in_features, seed=30 + code,  # type: ignore[attr-defined]
                         largest=True)
    signs = torch.ones(in_features)
    signs[1::2] = -1
    x = torch.stack([torch.ones(in_features), -torch.ones(in_features), signs, -signs])
    _check_int8_products(qtype, True, 2, ops, data, x)


def _check_int8_products(qtype: str, packed: bool, groups: int, ops: object,
                         data: torch.Tensor | None = None,
                         inputs: torch.Tensor | None = None) -> None:
    code, in_features = IMPLEMENTED[qtype][0], 512
    out = groups * ops.rows_per_pack() if packed else 29  # type: ignore[attr-defined]
    if data is None:
        data = random_blocks(qtype, out, in_features, seed=10 + code)
    weights = dequantize(data, qtype, in_features).double()  # [out, in]
    if packed:
        data = ops.pack_rows(data, code, in_features)  # type: ignore[attr-defined]
        code += 100
    generator = torch.Generator().manual_seed(code)
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 16) if inputs is None else (len(inputs),):
        x = torch.randn(rows, in_features, generator=generator) if inputs is None else inputs
        y = ops.qmatmul_q8(x, data, code, in_features).double()  # type: ignore[attr-defined]
        exact = x.double() @ weights.T
        d = x.double().view(rows, -1, 32).abs().amax(-1) / 127  # [rows, blocks]
        w_blocks = weights.abs().view(weights.shape[0], -1, 32).sum(-1)  # [out, blocks]
        bound = (d / 2) @ w_blocks.T + (in_features + 8) * U * (x.double().abs()
                                                                @ weights.abs().T)
        assert bool(((y - exact).abs() <= bound * (1 + 1e-6)).all()), (qtype, rows)
        for r in range(rows):  # independent of the rows computed with it, bit for bit
            alone = ops.qmatmul_q8(x[r : r + 1].contiguous(), data, code, in_features)  # type: ignore[attr-defined]
            assert torch.equal(alone[0], y[r].float()), (qtype, rows, r)


def test_the_compiled_top_k_is_torchs_top_k(ops: object) -> None:
    """Values exactly torch.topk's, largest first; equal values in index order; -inf entries
    (a grammar's mask) taken when fewer than k are finite; any width, not only multiples of 8."""
    generator = torch.Generator().manual_seed(5)
    for rows, n, k in ((1, 49152, 8), (3, 1001, 1), (5, 37, 16), (2, 8, 8), (4, 151936, 32)):
        x = torch.randn(rows, n, generator=generator)
        x[0, : n // 2] = x[0, n // 2 :][: n // 2]  # every value of row 0's first half repeated
        if rows > 1:
            x[1] = float("-inf")
            x[1, n // 3] = 0.5
        values, indices = ops.top_k_rows(x, k)  # type: ignore[attr-defined]
        expected = torch.topk(x, k, dim=-1).values
        assert torch.equal(values, expected), (rows, n, k)
        assert torch.equal(x.gather(1, indices), values), (rows, n, k)
        for r in range(rows):  # among equal values the lower index first
            for a in range(k - 1):
                if values[r, a] == values[r, a + 1]:
                    assert indices[r, a] < indices[r, a + 1], (rows, n, k, r, a)
        assert all(len(set(row.tolist())) == k for row in indices)
    with pytest.raises(RuntimeError, match="k must be"):
        ops.top_k_rows(torch.zeros(1, 4), 5)  # type: ignore[attr-defined]


def test_the_compiled_argmax_and_margin_are_numpys(ops: object) -> None:
    """Greedy verification's fused row pass: the argmax NumPy gives (the first of equal maxima,
    the first NaN) and sampling.top2_margins' float64 lead, bit for bit — ties (margin 0), rows
    masked to -inf but one (margin 0), any width."""
    generator = torch.Generator().manual_seed(6)
    for rows, n in ((1, 49152), (3, 1001), (5, 37), (2, 8), (7, 151936), (1, 1)):
        x = torch.randn(rows, n, generator=generator) * 4
        if rows > 1:
            x[1] = float("-inf")
            x[1, n // 3] = 0.5
        if rows > 2:
            x[2, n - 1] = x[2, n // 2] = x[2].max() + 1  # two equal maxima
        indices, margins = ops.argmax_margin_rows(x)  # type: ignore[attr-defined]
        expected = argmax_rows(x)
        assert torch.equal(indices, expected), (rows, n)
        assert margins.dtype == torch.float64
        assert margins.tolist() == list(top2_margins(x, expected.tolist())), (rows, n)
    x = torch.tensor([[0.0, float("nan"), 3.0, float("nan")]])
    assert ops.argmax_margin_rows(x)[0].tolist() == [int(np.argmax(x.numpy()))] == [1]  # type: ignore[attr-defined]


def test_the_compiled_softmax_top_k_is_the_softmaxs(ops: object) -> None:
    """The k likeliest tokens of each row's softmax: torch.topk's indices over the logits and
    probabilities within float32's error of a float64 softmax (each exponential a few ulp, the
    sum of n of them in 8 lanes: up to n / 8 + 8 roundings)."""
    generator = torch.Generator().manual_seed(7)
    for rows, n, k in ((1, 49152, 4), (3, 1001, 1), (4, 151936, 8), (2, 13, 3)):
        x = torch.randn(rows, n, generator=generator) * 5
        probs, indices = ops.softmax_top_k_rows(x, k)  # type: ignore[attr-defined]
        exact = torch.softmax(x.double(), dim=-1)
        assert torch.equal(indices, torch.topk(x, k, dim=-1).indices), (rows, n, k)
        expected = exact.gather(1, indices)
        bound = expected * (n / 8 + 16) * 2.0**-24 + 2.0**-126
        assert bool(((probs.double() - expected).abs() <= bound).all()), (rows, n, k)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_amx_tiles_give_the_vnni_path_bits(qtype: str, ops: object) -> None:
    """Where the CPU has AMX, products of many rows go through the tile unit: the same exact
    integer block dot products, scaled in the same float32 order, so the same bits as the VNNI
    path for every row count (full tiles of 16, a partial tile, the rest on the VNNI path)."""
    if not ops.amx_usable():  # type: ignore[attr-defined]
        pytest.skip("no AMX tiles here (CPU, build or kernel permission)")
    code, in_features = IMPLEMENTED[qtype][0], 576
    data = ops.pack_rows(random_blocks(qtype, 3 * ops.rows_per_pack(), in_features, seed=code),  # type: ignore[attr-defined]
                         code, in_features)
    generator = torch.Generator().manual_seed(code)
    for rows in (1, 2, 5, 8, 16, 17, 31, 40, 64):
        x = torch.randn(rows, in_features, generator=generator)
        vnni = ops.qmatmul_q8(x, data, code + 100, in_features,  # type: ignore[attr-defined]
                              amx_min_rows=10**9)
        tiles = ops.qmatmul_q8(x, data, code + 100, in_features,  # type: ignore[attr-defined]
                               amx_min_rows=1)
        assert torch.equal(vnni, tiles), (qtype, rows)


def _permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k row order (interleaved rotary halves)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(
        1, 2).reshape(rows.shape)


def write_tiny_gguf(model: torch.nn.Module, path: Path, qtype: str) -> None:
    """The tiny transformers Llama as a GGUF file, its matrices quantized to ``qtype`` (norms
    stay float32), with llama.cpp's tensor names and q/k row order."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    config = model.config
    writer = GGUFWriter(str(path), "llama")
    kind = GGMLQuantizationType[qtype]

    def matrix(name: str, weight: torch.Tensor, heads: int = 0) -> None:
        w = weight.detach().float().numpy()
        if heads:
            w = _permute(w, heads)
        writer.add_tensor(name, quantize(w, kind), raw_dtype=kind)

    def vector(name: str, weight: torch.Tensor) -> None:
        writer.add_tensor(name, weight.detach().float().numpy())

    inner = model.model  # type: ignore[attr-defined]
    matrix("token_embd.weight", inner.embed_tokens.weight)
    for i, layer in enumerate(inner.layers):
        p, attn, mlp = f"blk.{i}.", layer.self_attn, layer.mlp
        vector(p + "attn_norm.weight", layer.input_layernorm.weight)
        matrix(p + "attn_q.weight", attn.q_proj.weight, config.num_attention_heads)
        matrix(p + "attn_k.weight", attn.k_proj.weight, config.num_key_value_heads)
        matrix(p + "attn_v.weight", attn.v_proj.weight)
        matrix(p + "attn_output.weight", attn.o_proj.weight)
        vector(p + "ffn_norm.weight", layer.post_attention_layernorm.weight)
        matrix(p + "ffn_gate.weight", mlp.gate_proj.weight)
        matrix(p + "ffn_up.weight", mlp.up_proj.weight)
        matrix(p + "ffn_down.weight", mlp.down_proj.weight)
    vector("output_norm.weight", inner.norm.weight)
    matrix("output.weight", model.lm_head.weight)  # type: ignore[attr-defined]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def dequantized_twin(model: torch.nn.Module, gguf: Path) -> torch.nn.Module:
    """A float32 copy of ``model`` holding the GGUF's decoded weights (q/k rows unpermuted)."""
    from gguf import GGUFReader

    twin = tiny_hf_model("llama", "sdpa", vocab=model.config.vocab_size, seed=11).float()
    tensors = {t.name: t for t in GGUFReader(str(gguf)).tensors}
    config = model.config

    def value(name: str, heads: int = 0) -> torch.Tensor:
        t = tensors[name]
        data = torch.from_numpy(np.array(t.data))
        w = dequantize(data, t.tensor_type.name, int(t.shape[0]))
        if heads:  # inverse of _permute
            w = torch.from_numpy(w.numpy().reshape(heads, w.shape[0] // heads // 2, 2, -1)
                                 .swapaxes(1, 2).reshape(w.shape))
        return w

    inner = twin.model  # type: ignore[attr-defined]
    with torch.no_grad():
        inner.embed_tokens.weight.copy_(value("token_embd.weight"))
        for i, layer in enumerate(inner.layers):
            p, attn, mlp = f"blk.{i}.", layer.self_attn, layer.mlp
            layer.input_layernorm.weight.copy_(value(p + "attn_norm.weight").reshape(-1))
            attn.q_proj.weight.copy_(value(p + "attn_q.weight", config.num_attention_heads))
            attn.k_proj.weight.copy_(value(p + "attn_k.weight", config.num_key_value_heads))
            attn.v_proj.weight.copy_(value(p + "attn_v.weight"))
            attn.o_proj.weight.copy_(value(p + "attn_output.weight"))
            layer.post_attention_layernorm.weight.copy_(value(p + "ffn_norm.weight").reshape(-1))
            mlp.gate_proj.weight.copy_(value(p + "ffn_gate.weight"))
            mlp.up_proj.weight.copy_(value(p + "ffn_up.weight"))
            mlp.down_proj.weight.copy_(value(p + "ffn_down.weight"))
        inner.norm.weight.copy_(value("output_norm.weight").reshape(-1))
        twin.lm_head.weight.copy_(value("output.weight"))  # type: ignore[attr-defined]
    return twin


@pytest.fixture(scope="module", params=["Q4_0", "Q4_1", "Q8_0"])
def tiny_gguf(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, torch.nn.Module]:
    model = tiny_hf_model("llama", "sdpa", vocab=64, seed=4)
    path = tmp_path_factory.mktemp("gguf") / f"tiny-{request.param}.gguf"
    write_tiny_gguf(model, path, request.param)
    return path, dequantized_twin(model, path)


def test_quant_backend_equals_the_fast_backend_on_the_decoded_weights(
    tiny_gguf: tuple[Path, torch.nn.Module], ops: object
) -> None:
    """Same weights, same forward (float32 activations and cache): the tree's logits agree to
    float32 rounding (both sum float32 products over at most 64 terms per layer, two layers)."""
    path, twin = tiny_gguf
    quant = QuantBackend(path, twin.config, ops=ops, activations="float32", kv_cache="float32")
    fast = FastBackend(twin)
    prompt = [3, 9, 27, 1, 5, 8, 40]
    tree = DraftTree((4, 7, 11, 2), (-1, 0, -1, 2))
    for backend in (quant, fast):
        backend.prefill(prompt)
    got, expected = quant.forward_tree(tree), fast.forward_tree(tree)
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=0, atol=4096 * U * max(1.0, scale))
    assert quant.capabilities.float32_tensors == ()


def assert_tree_rows_are_plain_rows(make: Callable[[], QuantBackend], prompt: list[int],
                                    tree: DraftTree) -> None:
    """Each row of ``tree`` verified after ``prompt`` on ``make()`` equals, bit for bit, the
    row plain decoding gets after the same tokens on a fresh ``make()``."""
    backend = make()
    backend.prefill(prompt)
    logits = backend.forward_tree(tree)
    for node in range(-1, len(tree)):
        tokens = [] if node < 0 else tree.path_tokens(node)
        plain = make()
        plain.prefill(prompt)
        row = plain.forward_tree(DraftTree.chain([]))[0]
        for token in tokens:
            plain.commit((), token)
            row = plain.forward_tree(DraftTree.chain([]))[0]
        assert torch.equal(row, logits[node + 1]), node


def assert_prefill_in_parts_is_prefill_at_once(
    make: Callable[[], QuantBackend], prompt: list[int], tree: DraftTree, cuts: Sequence[int]
) -> torch.Tensor:
    """Prefilling ``prompt`` whole, or its first ``cut`` tokens and verifying the rest as one
    chain, leaves the same bits: ``tree``'s logits after it are equal. Returns them."""
    whole = make()
    assert whole.capabilities.reuses_prefix
    whole.prefill(prompt)
    expected = whole.forward_tree(tree)
    for cut in cuts:
        part = make()
        part.prefill(prompt[:cut])
        rest = prompt[cut:]
        part.forward_tree(DraftTree.chain(rest[:-1]))
        part.commit(list(range(len(rest) - 1)), rest[-1])
        assert torch.equal(part.forward_tree(tree), expected), cut
    return expected


@pytest.mark.parametrize("kv_cache", ["float16", "float32"])
@pytest.mark.parametrize("activations", ["float32", "int8"])
def test_tree_rows_are_bit_identical_to_plain_decoding(
    tiny_gguf: tuple[Path, torch.nn.Module], ops: object, activations: str, kv_cache: str
) -> None:
    """Every row of a verified tree gets exactly the logits plain decoding gets after the same
    tokens: the layers compute each row alone (attention over that row's visible keys in
    position order), so no tolerance is involved, whatever the activations and the cache are
    rounded to."""
    path, twin = tiny_gguf
    prompt = [3, 9, 27, 1, 5, 8, 40, 2, 2, 7]
    tree = DraftTree((4, 7, 11, 2, 9, 4), (-1, 0, -1, 2, 2, 3))
    assert_tree_rows_are_plain_rows(
        lambda: QuantBackend(path, twin.config, ops=ops, activations=activations,
                             kv_cache=kv_cache), prompt, tree)


def test_kernel_tuning_changes_no_bit(
    tiny_gguf: tuple[Path, torch.nn.Module], ops: object
) -> None:
    """The kernels' tuning values (how far ahead weights are prefetched, from how many rows the
    AMX tiles take products) are speed choices: any setting gives the same logits."""
    path, twin = tiny_gguf
    prompt = [3, 9, 27, 1, 5, 8, 40, 2, 2, 7]
    tree = DraftTree((4, 7, 11, 2, 9, 4, 5, 6, 1, 3), (-1, 0, -1, 2, 2, 3, 5, 6, 7, 8))
    results = []
    for tuning in (KernelTuning(), KernelTuning(prefetch_bytes=0, amx_min_rows=1),
                   KernelTuning(prefetch_bytes=64, amx_min_rows=10**6)):
        backend = QuantBackend(path, twin.config, ops=ops, tuning=tuning)
        backend.prefill(prompt)
        results.append(backend.forward_tree(tree))
    assert all(torch.equal(results[0], other) for other in results[1:])
    with pytest.raises(ValueError, match="prefetch_bytes"):
        KernelTuning(prefetch_bytes=-1)


@pytest.fixture(scope="module", params=[(384, 6), (512, 4)], ids=["d64", "d128"])
def wide_gguf(tmp_path_factory: pytest.TempPathFactory,
              request: pytest.FixtureRequest) -> tuple[Path, object]:
    """Head sizes 64 and 128 (SmolLM2's, Qwen2.5-1.5B's) with several query heads per KV head:
    the kernels' widest attention paths (16-lane key blocks; keys scored and values summed for
    several queries at once, values in column blocks where AVX2's registers are few)."""
    hidden, heads = request.param
    model = tiny_hf_model("llama", "sdpa", vocab=64, seed=5, hidden=hidden, heads=heads,
                          kv_heads=2)
    path = tmp_path_factory.mktemp("gguf") / f"wide-{hidden // heads}-Q8_0.gguf"
    write_tiny_gguf(model, path, "Q8_0")
    return path, model.config


@pytest.mark.parametrize("kv_cache", ["float16", "float32"])
def test_grouped_attention_gives_each_row_its_bits_alone(
    wide_gguf: tuple[Path, object], ops: object, kv_cache: str
) -> None:
    """Attention reads the keys and values every row of a tree sees once for all the rows and
    query heads of a KV head (keys a chunk at a time, several queries per key load, or
    key-major for many; values for up to four queries at once), over a prefix longer than a
    chunk: each row still gets plain decoding's bits, and each sequence of a batched pass its
    bits alone."""
    from draftwise.backends.batch import SequencePool

    path, config = wide_gguf
    prompt = [(5 * i + 3) % 64 for i in range(150)]
    tree = DraftTree((4, 7, 11, 2, 9, 4, 1, 1, 3), (-1, 0, -1, 2, 2, 3, 5, 6, 7))

    def make() -> QuantBackend:
        return QuantBackend(path, config, ops=ops, kv_cache=kv_cache)

    assert_tree_rows_are_plain_rows(make, prompt, tree)
    for small in (DraftTree((4,), (-1,)), DraftTree((4, 7), (-1, -1))):  # few queries per item
        assert_tree_rows_are_plain_rows(make, prompt, small)
    pool = SequencePool(make(), 3)
    prompts = [prompt, prompt[:70], prompt[40:]]
    for i, p in enumerate(prompts):
        pool.sequences[i].prefill(p)
    got = pool.forward([(i, tree) for i in range(3)])
    for p, logits in zip(prompts, got, strict=True):
        alone = make()
        alone.prefill(p)
        assert torch.equal(logits, alone.forward_tree(tree))


@pytest.mark.parametrize("kv_cache", ["float16", "float32"])
def test_a_prompt_prefilled_at_once_leaves_what_decoding_it_leaves(
    wide_gguf: tuple[Path, object], ops: object, kv_cache: str
) -> None:
    """A prompt's rows take the tree rows' path (runs of rows over shared keys, each layer's keys
    put in key-major order once): prefilling it whole leaves, bit for bit, the cache and logits
    that prefilling a part and verifying the rest as one chain leaves — what makes a cached
    prefix reusable exactly."""
    path, config = wide_gguf
    prompt = [(7 * i + 2) % 64 for i in range(150)]
    tree = DraftTree((4, 7, 11, 2), (-1, 0, -1, 2))

    def make() -> QuantBackend:
        return QuantBackend(path, config, ops=ops, kv_cache=kv_cache)

    expected = assert_prefill_in_parts_is_prefill_at_once(make, prompt, tree, (1, 33, 120))
    # a cache that holds another sequence's first 100 tokens: prefill keeps them
    other = make()
    assert other.capabilities.reuses_prefix
    other.prefill(prompt[:100] + [5, 6, 7])
    other.prefill(prompt, reuse=100)
    assert torch.equal(other.forward_tree(tree), expected)
    with pytest.raises(ValueError, match="cannot reuse"):  # an empty cache holds none
        make().prefill(prompt, reuse=10)


def test_the_float16_cache_holds_the_rounded_float32_values(
    tiny_gguf: tuple[Path, torch.nn.Module], ops: object
) -> None:
    """The default cache (float16, as llama.cpp's) holds each key and value rounded to nearest
    float16: layer 0, whose inputs do not depend on the cache, equals the float32 cache's
    rounding exactly; halving the bytes attention reads changes nothing else."""
    path, twin = tiny_gguf
    prompt = [3, 9, 27, 1, 5, 8, 40, 2, 2, 7]
    tree = DraftTree((4, 7, 11, 2), (-1, 0, -1, 2))
    half, full = (QuantBackend(path, twin.config, ops=ops, kv_cache=kv)
                  for kv in ("float16", "float32"))
    for backend in (half, full):
        backend.prefill(prompt)
        backend.forward_tree(tree)
    n = len(prompt) - 1 + len(tree) + 1
    assert half.keys.dtype == torch.float16 and full.keys.dtype == torch.float32
    assert torch.equal(half.keys[0, :, :n], full.keys[0, :, :n].half())
    assert torch.equal(half.values[0, :, :n], full.values[0, :, :n].half())
    with pytest.raises(ValueError, match="kv_cache"):
        QuantBackend(path, twin.config, ops=ops, kv_cache="int8")


@pytest.mark.parametrize("activations", ["float32", "int8"])
def test_every_drafter_on_quant_equals_plain_greedy_on_quant(
    tiny_gguf: tuple[Path, torch.nn.Module], ops: object, activations: str
) -> None:
    path, twin = tiny_gguf
    prompt = [4, 8, 15, 16, 23, 42, 4, 8, 15]
    config = GenerationConfig(max_new_tokens=40)
    backend = QuantBackend(path, twin.config, ops=ops, activations=activations)
    plain = Engine(backend, create_drafter("none")).generate(prompt, config).tokens
    for method in ("pld", "recycling", "aded", "lookahead", "composite"):
        run = Engine(backend, create_drafter(method)).generate(prompt, config)
        assert run.tokens == plain, method


def test_heads_score_with_the_kernels_and_keep_plain_greedy_output(
    tiny_gguf: tuple[Path, torch.nn.Module], ops: object, tmp_path: Path
) -> None:
    """On the kernels, hydra's products run as Q8_0 dot products (the target's own kind):
    drafts may differ from float32 scoring in a near-tie, the output may not."""
    path, twin = tiny_gguf
    backend = QuantBackend(path, twin.config, ops=ops)
    torch.manual_seed(0)
    heads = DraftHeads("hydra", 2, 32, torch.arange(32),
                       {"model": "tiny", "vocab_size": str(backend.vocab_size)})
    for parameter in heads.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    heads.save(tmp_path / "tiny.hydra.safetensors")
    drafter = create_drafter(f"hydra:heads={tmp_path / 'tiny.hydra.safetensors'},top_k=3")
    drafter.attach(twin, backend)  # type: ignore[attr-defined]
    assert isinstance(drafter._scorer, _KernelHeads)  # type: ignore[attr-defined]
    prompt = [4, 8, 15, 16, 23, 42, 4, 8, 15]
    config = GenerationConfig(max_new_tokens=30)
    plain = Engine(backend, create_drafter("none")).generate(prompt, config).tokens
    run = Engine(backend, drafter).generate(prompt, config)
    assert run.tokens == plain
    assert max(run.stats.tree_sizes) > 0


def test_without_kernels_the_backend_runs_on_float32_copies(
    tiny_gguf: tuple[Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No compiler (simulated): load_kernels refuses with a reason; the backend still runs,
    on dequantized float32 weights, and says why it is slow."""
    from draftwise.backends.quant import KernelsUnavailable

    monkeypatch.setenv("DRAFTWISE_NO_COMPILE", "1")
    monkeypatch.setattr("draftwise.backends.quant._loaded", {})
    with pytest.raises(KernelsUnavailable, match="DRAFTWISE_NO_COMPILE"):
        load_kernels(tmp_path)
    path, twin = tiny_gguf
    backend = QuantBackend(path, twin.config, ops=None, slow_reason="no compiler")
    assert backend.capabilities.slow_reason == "no compiler"
    fast = FastBackend(twin)
    prompt = [1, 2, 3, 4]
    config = GenerationConfig(max_new_tokens=12)
    assert (Engine(backend, create_drafter("pld")).generate(prompt, config).tokens
            == Engine(fast, create_drafter("none")).generate(prompt, config).tokens)


@pytest.mark.parametrize("activations", ["float32", "int8"])
def test_a_batched_pass_gives_each_sequence_its_logits_alone(
    tiny_gguf: tuple[Path, torch.nn.Module], ops: object, activations: str
) -> None:
    """Several sequences' trees in one pass (the server's batching): each sequence's logits
    equal, bit for bit, those of the same tree verified alone, whoever shares the pass; and
    the sequences' caches stay apart through commits (compaction included)."""
    from draftwise.backends.batch import SequencePool

    path, twin = tiny_gguf
    prompts = [[3, 9, 27, 1, 5], [8, 40, 2], [2, 7, 4, 4, 4, 4, 4, 1, 3]]
    trees = [DraftTree((4, 7, 11, 2), (-1, 0, -1, 2)), DraftTree.chain([]),
             DraftTree.chain([5, 6, 7])]
    pool = SequencePool(QuantBackend(path, twin.config, ops=ops, activations=activations), 4)
    assert pool.shared
    alone = [QuantBackend(path, twin.config, ops=ops, activations=activations) for _ in prompts]
    slots = [3, 0, 1]  # any slot order
    for slot, backend, prompt in zip(slots, alone, prompts, strict=True):
        pool.sequences[slot].prefill(prompt)
        backend.prefill(prompt)
    for step in range(3):
        active = [0, 1, 2] if step != 1 else [2, 0]  # requests come and go between steps
        got = pool.forward([(slots[i], trees[i]) for i in active])
        for i, logits in zip(active, got, strict=True):
            expected = alone[i].forward_tree(trees[i])
            assert torch.equal(logits, expected), (activations, step, i)
            path_nodes = (2, 3) if i == 0 and step == 0 else (0,) if len(trees[i]) else ()
            next_root = int(expected[-1].argmax())
            for backend in (pool.sequences[slots[i]], alone[i]):
                backend.commit(path_nodes, next_root)
    with pytest.raises(ValueError, match="one tree per pass"):
        pool.forward([(0, trees[1]), (0, trees[1])])


def test_a_steps_weights_and_the_machines_limits(
    tiny_gguf: tuple[Path, torch.nn.Module], ops: object
) -> None:
    """What `bench --cost` puts each step next to: the bytes of every layer matrix and the head
    as the GGUF holds them (one row of the embedding is read, not the matrix) and one
    multiply-add per weight; the machine's limits are measured, so only their sign is known."""
    from gguf import GGUFReader

    path, twin = tiny_gguf
    quant = QuantBackend(path, twin.config, ops=ops)
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    matrices = [t for name, t in tensors.items()
                if name.startswith("blk.") and len(t.shape) == 2]
    head = tensors.get("output.weight", tensors["token_embd.weight"])
    read_bytes, macs = quant.step_weights()
    assert read_bytes == sum(int(t.n_bytes) for t in [*matrices, head])
    assert macs == sum(int(t.n_elements) for t in [*matrices, head])
    limits = quant.machine_limits()
    assert limits is not None and limits[0] > 0 and limits[1] > 0
