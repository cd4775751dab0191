"""The fast backend: kernels by shape, float32 agreement, bit-identical exact mode."""

from __future__ import annotations

import pytest
import torch

from draftwise.backends.fast import FastBackend, UnsupportedModelError
from draftwise.backends.kernels import KERNELS, KernelChoice, Linear, available, row_bucket
from draftwise.drafters import create_drafter
from draftwise.engine import Engine, GenerationConfig
from draftwise.tree import DraftTree

from ..conftest import tiny_hf_model


def test_every_kernel_computes_the_same_product() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 16, generator=generator)
    bias = torch.randn(24, generator=generator)
    linear = Linear(weight, bias, KernelChoice())
    for rows in (1, 2, 3, 5, 9):
        x = torch.randn(rows, 16, generator=generator)
        x64, w64, b64 = x.double(), weight.double(), bias.double()
        expected = x64 @ w64.T + b64
        # a float32 sum of K + 1 products, in any order: |error| <= (K + 1) u sum|x w| + |b|
        # (u = 2**-24, the float32 unit roundoff), whatever SIMD width the CPU sums with
        bound = (16 + 1) * 2.0**-24 * (x64.abs() @ w64.abs().T + b64.abs())
        for name in KERNELS:
            if not available(name, linear):
                continue
            error = (linear.run(name, x).double() - expected).abs()
            assert bool((error <= bound).all()), (name, rows, (error - bound).max().item())


def test_tuning_picks_a_kernel_per_bucket_and_round_trips(tmp_path) -> None:
    model = tiny_hf_model("llama", "sdpa", vocab=40, seed=1).to(torch.float32)
    choice = KernelChoice()
    backend = FastBackend(model, kernels=choice)
    timings = backend.tune(buckets=(1, 4), repeats=1, progress=False)
    assert set(timings) == {1, 4}
    shapes = {linear.shape for linear in backend.linears()}
    for shape in shapes:
        assert choice.kernel(shape, 1) in timings[1] and choice.kernel(shape, 3) in timings[4]
    choice.save(tmp_path / "k.json")
    assert KernelChoice.load(tmp_path / "k.json").table == choice.table
    assert row_bucket(5) == 6 and row_bucket(1000) == 64
    backend.prefill([1, 2, 3])  # tuning left the backend ready for a fresh sequence
    assert backend.length == 3


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_float32_logits_match_transformers(family: str) -> None:
    model = tiny_hf_model(family, "sdpa", vocab=40, seed=2).to(torch.float32)
    backend = FastBackend(model)
    prompt = [3, 9, 27, 1, 5, 8]
    backend.prefill(prompt)
    tree = DraftTree((4, 7, 11), (-1, 0, -1))
    logits = backend.forward_tree(tree)
    with torch.inference_mode():
        for row, extra in enumerate([[], [4], [4, 7], [11]]):
            expected = model(input_ids=torch.tensor([prompt + extra])).logits[0, -1]
            torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-4)


def assert_exact_chain_is_plain_steps(model: torch.nn.Module, prompt: list[int],
                                      chain: list[int]) -> torch.Tensor:
    """Exact mode: a chain verified in one step gets, row by row, the bits of plain decoding
    steps after the same tokens. Returns the chain's logits."""
    plain = FastBackend(model, exact=True)
    plain.prefill(prompt)
    rows = []
    for token in chain:
        rows.append(plain.forward_tree(DraftTree.empty())[0])
        plain.commit((), token)
    rows.append(plain.forward_tree(DraftTree.empty())[0])
    tree_backend = FastBackend(model, exact=True)
    tree_backend.prefill(prompt)
    tree_logits = tree_backend.forward_tree(DraftTree.chain(chain))  # [len(chain) + 1, vocab]
    for i in range(len(rows)):
        assert torch.equal(tree_logits[i], rows[i]), i
    return tree_logits


def test_exact_mode_is_bit_identical_to_plain_steps() -> None:
    model = tiny_hf_model("llama", "sdpa", vocab=40, seed=5).to(torch.float32)
    prompt, chain = [2, 4, 6, 8, 10], [12, 14, 16, 18]
    tree_logits = assert_exact_chain_is_plain_steps(model, prompt, chain)
    # without exact mode the batched kernels are free to differ in the last bits
    fast = FastBackend(model)
    fast.prefill(prompt)
    torch.testing.assert_close(fast.forward_tree(DraftTree.chain(chain)), tree_logits,
                               rtol=1e-4, atol=1e-4)


def test_fast_backend_drafters_equal_plain_greedy_in_float64() -> None:
    model = tiny_hf_model("qwen2", "sdpa", vocab=48, seed=3)
    prompt = [4, 8, 15, 16, 23, 42, 4, 8, 15]
    plain = Engine(FastBackend(model), create_drafter("none")).generate(
        prompt, GenerationConfig(max_new_tokens=40)
    )
    with torch.inference_mode():
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                                   min_new_tokens=40)[0, len(prompt):].tolist()
    assert plain.tokens == reference
    for spec in ("pld", "recycling", "lookahead"):
        run = Engine(FastBackend(model), create_drafter(spec)).generate(
            prompt, GenerationConfig(max_new_tokens=40)
        )
        assert run.tokens == plain.tokens, spec


def test_unsupported_family_is_a_named_error() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20))
    with pytest.raises(UnsupportedModelError, match="--backend hf"):
        FastBackend(model)
