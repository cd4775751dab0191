"""Shared fixtures: tiny float64 models (no weights needed) and the real default model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

from draftwise.backends.reference import ReferenceBackend, ReferenceConfig, ReferenceModel
from draftwise.drafters.base import StepResult
from draftwise.sampling import GREEDY, SamplingConfig
from draftwise.tree import DraftTree


def tiny_hf_model(
    family: str = "llama", attn: str = "sdpa", vocab: int = 64, seed: int = 0, layers: int = 2,
    hidden: int = 32, heads: int = 4, kv_heads: int = 2,
):
    """A tiny random transformers model in float64 (no download)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        initializer_range=0.5, eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )
    if family == "gemma3_text":
        return tiny_gemma3_model(attn, vocab, seed, layers, hidden, heads, kv_heads)
    config = LlamaConfig(**kwargs) if family == "llama" else Qwen2Config(**kwargs)
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.to(torch.float64).eval()


def tiny_gemma3_model(attn: str = "sdpa", vocab: int = 64, seed: int = 0, layers: int = 3,
                      hidden: int = 32, heads: int = 2, kv_heads: int = 1):
    """A tiny random Gemma 3 text model in float64: sliding layers with a window of 4 around a
    full one, their own rotary base, and random norm weights (Gemma's start at zero, which
    would hide a norm applied as ``w`` instead of ``1 + w``)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    kinds = ["sliding_attention", "full_attention"] * layers
    config = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
        max_position_embeddings=256, initializer_range=0.5, sliding_window=4,
        layer_types=kinds[:layers], query_pre_attn_scalar=24,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
        eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(torch.randn_like(parameter) * 0.5)
    return model.to(torch.float64).eval()


def save_tiny_model_dir(folder, seed: int, words: int = 64, layers: int = 2):
    """A transformers folder: a tiny random Llama and a word-level tokenizer (w0, w1, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<unk>", "<eos>"] + [f"w{i}" for i in range(words - 2)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>"
    )
    model = tiny_hf_model("llama", "sdpa", vocab=words, seed=seed, layers=layers)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def reference_model() -> ReferenceModel:
    return ReferenceModel(ReferenceConfig(vocab_size=32, init_scale=3.0, seed=1))


@pytest.fixture(scope="session")
def reference_backend(reference_model: ReferenceModel) -> ReferenceBackend:
    return ReferenceBackend(reference_model)


class OracleDrafter:
    """Knows the plain greedy answer; drafts ``depth`` tokens of it, planting mistakes.

    ``wrong_at``: depths whose drafted token is replaced by a wrong one (the rest of that branch
    follows the wrong token). ``decoy_siblings``: at each depth in it, a wrong sibling is placed
    *before* the right child, so acceptance must pick the later sibling.
    """

    def __init__(
        self,
        answer: Sequence[int],
        vocab: int,
        depth: int,
        wrong_at: Sequence[int] = (),
        decoy_siblings: Sequence[int] = (),
    ) -> None:
        self.answer, self.vocab, self.depth = list(answer), vocab, depth
        self.wrong_at, self.decoys = set(wrong_at), set(decoy_siblings)
        self.prompt_len = 0

    def begin(
        self, prompt_ids: Sequence[int], sampling: SamplingConfig = GREEDY
    ) -> None:
        self.prompt_len = len(prompt_ids)

    def propose(self, context: Sequence[int], max_depth: int) -> DraftTree:
        done = len(context) - self.prompt_len
        future = self.answer[done : done + min(self.depth, max_depth)]
        tokens: list[int] = []
        parents: list[int] = []
        parent = -1
        for d, right in enumerate(future):
            wrong = (right + 1) % self.vocab
            if d in self.decoys:
                tokens.append(wrong)
                parents.append(parent)
            tokens.append(wrong if d in self.wrong_at else right)
            parents.append(parent)
            parent = len(tokens) - 1
        return DraftTree(tuple(tokens), tuple(parents))

    def observe(self, step: StepResult) -> None:
        pass


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve the ASGI ``app`` with uvicorn in a thread on a free loopback port; yields its URL
    once ``/health`` answers (bounded wait), and stops it afterwards."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                             log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    try:
        yield url
    finally:
        instance.should_exit = True
        thread.join(timeout=30)
