"""Gemma 3 on every backend: sliding-window layers, per-head norms, scaled embeddings, the
GGUF's ``1 + weight`` norms, checked against transformers' own forward pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from draftwise.backends.fast import FastBackend, UnsupportedModelError, check_config
from draftwise.backends.hf import HFBackend
from draftwise.backends.quant import QuantBackend, dequantize
from draftwise.drafters import create_drafter
from draftwise.engine import Engine, GenerationConfig
from draftwise.tree import DraftTree

from ..conftest import tiny_gemma3_model
from .test_fast_backend import assert_exact_chain_is_plain_steps
from .test_quant_backend import (
    assert_prefill_in_parts_is_prefill_at_once,
    assert_tree_rows_are_plain_rows,
)

# the sliding window is 4: a prompt of 7 and a tree 3 deep put every row's window past the start
PROMPT = [3, 9, 27, 1, 5, 8, 40]
TREE = DraftTree((4, 7, 11, 2, 13), (-1, 0, 1, -1, 3))


def expected_rows(model: torch.nn.Module, tree: DraftTree) -> list[torch.Tensor]:
    """transformers' logits after the prompt, then after each node's path, each from a plain
    causal forward pass (its own sliding-window masks)."""
    rows = []
    with torch.inference_mode():
        for node in range(-1, len(tree)):
            tokens = PROMPT + ([] if node < 0 else tree.path_tokens(node))
            rows.append(model(input_ids=torch.tensor([tokens])).logits[0, -1])
    return rows


def test_hf_backend_steps_trees_past_the_sliding_window() -> None:
    """Tree steps, commits and more steps, every row as transformers computes it alone (float64:
    only summation order differs)."""
    model = tiny_gemma3_model(vocab=64, seed=3, layers=2)
    backend = HFBackend(model)
    backend.prefill(PROMPT)
    logits = backend.forward_tree(TREE)
    for row, expected in zip(logits, expected_rows(model, TREE), strict=True):
        torch.testing.assert_close(row, expected, rtol=1e-10, atol=1e-10)
    backend.commit([3, 4], 30)  # keep the branch 2 -> 13, then 30
    logits = backend.forward_tree(DraftTree.chain([31, 32]))
    with torch.inference_mode():
        for row, extra in enumerate([[], [31], [31, 32]]):
            expected = model(input_ids=torch.tensor([PROMPT + [2, 13, 30] + extra])).logits[0, -1]
            torch.testing.assert_close(logits[row], expected, rtol=1e-10, atol=1e-10)


def test_fast_backend_matches_transformers() -> None:
    model = tiny_gemma3_model(vocab=64, seed=4, layers=2).to(torch.float32)
    backend = FastBackend(model)
    backend.prefill(PROMPT)
    logits = backend.forward_tree(TREE)
    for row, expected in zip(logits, expected_rows(model, TREE), strict=True):
        torch.testing.assert_close(row, expected, rtol=1e-4, atol=1e-4)


def test_fast_backends_exact_mode_is_bit_identical_to_plain_steps() -> None:
    model = tiny_gemma3_model(vocab=64, seed=5, layers=2).to(torch.float32)
    assert_exact_chain_is_plain_steps(model, PROMPT, [12, 14, 16, 18, 20])


def test_unimplemented_gemma_options_are_named() -> None:
    model = tiny_gemma3_model(vocab=64, seed=1, layers=2)
    check_config(model.config)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(UnsupportedModelError, match="final_logit_softcapping"):
        check_config(model.config)


# -- the quant backend on a Gemma 3 GGUF -------------------------------------------------------

def write_gemma_gguf(model: torch.nn.Module, path: Path, qtype: str) -> None:
    """The tiny Gemma as llama.cpp writes a Gemma 3 GGUF: its tensor names, q/k rows as they
    are, every norm stored as ``1 + weight``; matrices in ``qtype``, norms float32."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    writer = GGUFWriter(str(path), "gemma3")
    kind = GGMLQuantizationType[qtype]

    def matrix(name: str, weight: torch.Tensor) -> None:
        writer.add_tensor(name, quantize(weight.detach().float().numpy(), kind), raw_dtype=kind)

    def norm(name: str, module: torch.nn.Module) -> None:
        writer.add_tensor(name, (1.0 + module.weight.detach().float()).numpy())

    inner = model.model  # type: ignore[attr-defined]
    matrix("token_embd.weight", inner.embed_tokens.weight)
    for i, layer in enumerate(inner.layers):
        p, attn, mlp = f"blk.{i}.", layer.self_attn, layer.mlp
        norm(p + "attn_norm.weight", layer.input_layernorm)
        matrix(p + "attn_q.weight", attn.q_proj.weight)
        matrix(p + "attn_k.weight", attn.k_proj.weight)
        matrix(p + "attn_v.weight", attn.v_proj.weight)
        norm(p + "attn_q_norm.weight", attn.q_norm)
        norm(p + "attn_k_norm.weight", attn.k_norm)
        matrix(p + "attn_output.weight", attn.o_proj.weight)
        norm(p + "post_attention_norm.weight", layer.post_attention_layernorm)
        norm(p + "ffn_norm.weight", layer.pre_feedforward_layernorm)
        matrix(p + "ffn_gate.weight", mlp.gate_proj.weight)
        matrix(p + "ffn_up.weight", mlp.up_proj.weight)
        matrix(p + "ffn_down.weight", mlp.down_proj.weight)
        norm(p + "post_ffw_norm.weight", layer.post_feedforward_layernorm)
    norm("output_norm.weight", inner.norm)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def decoded_twin(model: torch.nn.Module, gguf: Path) -> torch.nn.Module:
    """A float32 copy of ``model`` holding the GGUF's decoded matrices (norms as they were)."""
    from gguf import GGUFReader

    twin = tiny_gemma3_model(vocab=model.config.vocab_size, seed=0, layers=len(
        model.model.layers)).float()  # type: ignore[attr-defined]
    twin.load_state_dict(model.state_dict())
    tensors = {t.name: t for t in GGUFReader(str(gguf)).tensors}

    def value(name: str) -> torch.Tensor:
        t = tensors[name]
        return dequantize(torch.from_numpy(np.array(t.data)), t.tensor_type.name,
                          int(t.shape[0]))

    inner = twin.model  # type: ignore[attr-defined]
    with torch.no_grad():
        inner.embed_tokens.weight.copy_(value("token_embd.weight"))
        for i, layer in enumerate(inner.layers):
            p, attn, mlp = f"blk.{i}.", layer.self_attn, layer.mlp
            for module, name in ((attn.q_proj, "attn_q"), (attn.k_proj, "attn_k"),
                                 (attn.v_proj, "attn_v"), (attn.o_proj, "attn_output"),
                                 (mlp.gate_proj, "ffn_gate"), (mlp.up_proj, "ffn_up"),
                                 (mlp.down_proj, "ffn_down")):
                module.weight.copy_(value(f"{p}{name}.weight"))
    return twin


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    model = tiny_gemma3_model(vocab=64, seed=6, layers=2)
    path = tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf"
    write_gemma_gguf(model, path, "Q8_0")
    return path, decoded_twin(model, path)


def test_quant_backend_matches_the_fast_backend_on_the_decoded_weights(
    gemma_gguf: tuple[Path, torch.nn.Module], ops: object
) -> None:
    """Same weights, same forward, float32 activations: the logits agree to float32 rounding
    (each a float32 sum of at most 64 products per product, two layers of them)."""
    path, twin = gemma_gguf
    quant = QuantBackend(path, twin.config, ops=ops, activations="float32", kv_cache="float32")
    fast = FastBackend(twin)
    for backend in (quant, fast):
        backend.prefill(PROMPT)
    got, expected = quant.forward_tree(TREE), fast.forward_tree(TREE)
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=0, atol=4096 * 2.0**-24 * max(1.0, scale))
    assert quant.capabilities.float32_tensors == ()
    assert quant._native is not None  # every layer in the kernels' one call
    # ... and both are transformers' model on those weights
    for row, reference in zip(expected, expected_rows(twin, TREE), strict=True):
        torch.testing.assert_close(row, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv_cache", ["float16", "float32"])
def test_tree_rows_past_the_window_are_bit_identical_to_plain_decoding(
    gemma_gguf: tuple[Path, torch.nn.Module], ops: object, kv_cache: str
) -> None:
    """The sliding layers' rows see their last positions' keys, whether the row is verified in
    a tree or decoded alone: the same bits."""
    path, twin = gemma_gguf
    prompt = PROMPT + [2, 2, 7, 1]
    assert_tree_rows_are_plain_rows(
        lambda: QuantBackend(path, twin.config, ops=ops, kv_cache=kv_cache), prompt, TREE)


def test_a_prompt_past_the_window_prefilled_at_once_leaves_what_decoding_it_leaves(
    gemma_gguf: tuple[Path, torch.nn.Module], ops: object
) -> None:
    path, twin = gemma_gguf
    prompt = [(7 * i + 2) % 64 for i in range(70)]
    assert_prefill_in_parts_is_prefill_at_once(
        lambda: QuantBackend(path, twin.config, ops=ops), prompt, TREE, (1, 3, 40))


def test_a_batched_pass_gives_each_sequence_its_logits_alone(
    gemma_gguf: tuple[Path, torch.nn.Module], ops: object
) -> None:
    """The server's shared pass: sequences of several lengths, some past the window, each get
    the bits of their tree verified alone."""
    from draftwise.backends.batch import SequencePool

    path, twin = gemma_gguf
    prompts = [PROMPT, [8, 40], PROMPT * 2]
    trees = [TREE, DraftTree.chain([]), DraftTree.chain([5, 6, 7])]
    pool = SequencePool(QuantBackend(path, twin.config, ops=ops), 3)
    alone = [QuantBackend(path, twin.config, ops=ops) for _ in prompts]
    for slot, (backend, prompt) in enumerate(zip(alone, prompts, strict=True)):
        pool.sequences[slot].prefill(prompt)
        backend.prefill(prompt)
    got = pool.forward([(slot, tree) for slot, tree in enumerate(trees)])
    for slot, logits in enumerate(got):
        assert torch.equal(logits, alone[slot].forward_tree(trees[slot])), slot


def test_every_drafter_on_quant_equals_plain_greedy_on_quant(
    gemma_gguf: tuple[Path, torch.nn.Module], ops: object
) -> None:
    path, twin = gemma_gguf
    backend = QuantBackend(path, twin.config, ops=ops)
    config = GenerationConfig(max_new_tokens=24)
    plain = Engine(backend, create_drafter("none")).generate(PROMPT, config).tokens
    assert len(plain) == 24
    for method in ("pld", "recycling", "composite"):
        assert Engine(backend, create_drafter(method)).generate(PROMPT, config).tokens == plain
