"""Structured output composed with speculation, proven in float64 on tiny models.

Constrained plain decoding here is the naive loop: full recompute, the constraint's mask at each
position, argmax (or a draw). Every drafter, with forced tokens, pruning and masked trees, must
give the same tokens (greedy) or the same distribution (sampling).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from draftwise.backends.reference import ReferenceBackend, ReferenceConfig, ReferenceModel
from draftwise.constraints import Compiler, ConstraintSpec, apply_mask, byte_tokenizer
from draftwise.drafters import create_drafter
from draftwise.drafters.draft_model import ModelDrafter
from draftwise.drafters.retrieval import Datastore
from draftwise.engine import Engine, GenerationConfig
from draftwise.sampling import Sampling, SamplingConfig
from draftwise.sizing import SizingConfig, TreeSizer
from draftwise.tree import DraftTree

from ..conftest import OracleDrafter
from .test_exactness import method_specs
from .test_sampling_distribution import assert_matches

EOS = 256
NEW = 72
SPECS = {
    "records": ConstraintSpec("json_schema", json.dumps({
        "type": "array", "minItems": 2, "maxItems": 4,
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer", "maximum": 99},
                           "tag": {"enum": ["red", "green", "blue"]},
                           "ok": {"type": "boolean"}},
            "required": ["id", "tag", "ok"], "additionalProperties": False,
        },
    })),
    "free_text": ConstraintSpec("json_schema", json.dumps({
        "type": "object", "properties": {"note": {"type": "string", "maxLength": 12},
                                         "n": {"type": "number"}},
        "required": ["note", "n"], "additionalProperties": False,
    }), "flexible"),
    "regex": ConstraintSpec("regex", r"(ab|ba|[0-9]{2})+-(yes|no)"),
    "lark": ConstraintSpec("grammar", 'start: item ("," item)*\nitem: /[a-c]{1,3}/ | "ok"\n'),
}
PROMPTS = [list(b"JSON: "), list(b"abab 12 ab"), [7]]


@pytest.fixture(scope="module")
def model() -> ReferenceModel:
    return ReferenceModel(ReferenceConfig(vocab_size=EOS + 1, init_scale=3.0, seed=1))


@pytest.fixture(scope="module")
def compiler() -> Compiler:
    return Compiler(byte_tokenizer(), vocab_size=EOS + 1, eos_token_ids=[EOS])


def constrained_plain(model, constraint, prompt: list[int], new: int) -> list[int]:
    """The definition: at each position, mask the logits, take the argmax (``model``: a
    reference model, or any callable from ids to ``[1, vocab]`` next-token logits)."""
    forward = model if callable(model) and not isinstance(model, ReferenceModel) else (
        lambda ids: model.full_forward(ids)[-1:])
    ids, out = list(prompt), []
    for _ in range(new):
        logits = apply_mask(forward(ids), constraint.mask()[None])
        token = int(torch.argmax(logits[0]))
        out.append(token)
        if token == EOS:
            break
        constraint.commit([token])
        ids.append(token)
    return out


@pytest.fixture(scope="module")
def answers(model: ReferenceModel, compiler: Compiler) -> dict[tuple[str, int], list[int]]:
    return {
        (name, i): constrained_plain(model, compiler.compile(spec), prompt, NEW)
        for name, spec in SPECS.items() for i, prompt in enumerate(PROMPTS)
    }


@pytest.fixture(scope="module")
def datastore(tmp_path_factory: pytest.TempPathFactory, answers) -> str:
    docs = [PROMPTS[i] + answer[: len(answer) // 2] for (_, i), answer in answers.items()]
    path = tmp_path_factory.mktemp("store") / "store.npz"
    Datastore.build(docs, key_length=8).save(path)
    return str(path)


def table_specs(datastore: str) -> list[str]:
    return [spec for specs in method_specs(datastore).values() for spec in specs]


def model_drafter(model: ReferenceModel, depth: int, width: int) -> ModelDrafter:
    drafter = ModelDrafter(depth, width, stop_threshold=1.0)
    drafter.backend = ReferenceBackend(model)
    return drafter


def test_answers_are_nontrivial(answers) -> None:
    """The grammars leave the model real choices, and most answers finish."""
    assert sum(answer[-1] == EOS for answer in answers.values()) >= len(answers) // 2
    assert len({tuple(a) for a in answers.values()}) == len(answers)


@pytest.mark.parametrize("name", list(SPECS))
def test_every_drafter_under_a_constraint_equals_constrained_plain_greedy(
    name: str, model: ReferenceModel, compiler: Compiler, answers, datastore: str
) -> None:
    other = ReferenceModel(ReferenceConfig(vocab_size=EOS + 1, init_scale=3.0, seed=2))
    config = GenerationConfig(max_new_tokens=NEW, eos_token_ids=(EOS,))
    for i, prompt in enumerate(PROMPTS):
        answer = answers[(name, i)]
        drafters = {spec: lambda spec=spec: create_drafter(spec) for spec in table_specs(datastore)}
        drafters |= {
            "oracle": lambda a=answer: OracleDrafter(a, EOS + 1, depth=6, wrong_at=[3]),
            "oracle-decoys": lambda a=answer: OracleDrafter(a, EOS + 1, depth=5,
                                                            decoy_siblings=[0, 2]),
            "draft-same": lambda: model_drafter(model, depth=4, width=1),
            "draft-other-tree": lambda: model_drafter(other, depth=3, width=2),
        }
        for label, make in drafters.items():
            for sizer in (None, TreeSizer(SizingConfig(budget=3))):
                constraint = compiler.compile(SPECS[name])
                run = Engine(ReferenceBackend(model), make(), sizer).generate(
                    prompt, config, constraint
                )
                assert run.tokens == answer, (label, name, i, sizer)
                if label == "oracle" and sizer is None and len(answer) > 8:
                    assert run.stats.mat > 1.5  # drafts really were accepted under the mask


def test_forced_tokens_are_free(model: ReferenceModel, compiler: Compiler, answers) -> None:
    constraint = compiler.compile(SPECS["records"])
    run = Engine(ReferenceBackend(model), create_drafter("none")).generate(
        PROMPTS[0], GenerationConfig(max_new_tokens=NEW, eos_token_ids=(EOS,)), constraint
    )
    assert run.tokens == answers[("records", 0)]
    assert constraint.stats.forced > len(run.tokens) // 2  # keys, quotes, separators
    assert run.stats.steps < len(run.tokens) - constraint.stats.forced + 2


class _Letters:
    """A six-token vocabulary for llguidance: a b c d e <eos>."""

    tokens = [b"a", b"b", b"c", b"d", b"e", b"<eos>"]
    eos_token_id, bos_token_id, special_token_ids = 5, None, [5]

    def __call__(self, text: str | bytes) -> list[int]:
        data = text.encode() if isinstance(text, str) else text
        return [self.tokens.index(bytes([b])) for b in data]


class _SampledDrafter:
    """Draws two root siblings without replacement and one child under each from a fixed,
    unconstrained distribution q, recording q: the grammar forbids some of what it drafts."""

    def __init__(self, vocab: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.q = torch.softmax(torch.randn(vocab, generator=gen, dtype=torch.float64), -1)
        self.rng = torch.Generator().manual_seed(seed + 1)

    def begin(self, prompt_ids, sampling=None) -> None:
        pass

    def propose(self, context, max_depth: int) -> DraftTree:
        if max_depth < 2:
            return DraftTree.empty()
        tokens, rows, q = [], [], self.q.clone()
        for _ in range(2):
            x = int(torch.multinomial(q, 1, generator=self.rng))
            tokens.append(x)
            rows.append(q.clone())
            q[x] = 0.0
            q = q / q.sum()
        for _ in range(2):
            tokens.append(int(torch.multinomial(self.q, 1, generator=self.rng)))
            rows.append(self.q.clone())
        return DraftTree(tuple(tokens), (-1, -1, 0, 1), torch.stack(rows))

    def observe(self, step) -> None:
        pass


@pytest.mark.parametrize("drafter", ["pld:budget=6,max_ngram=2,min_ngram=1", "sampled"])
def test_sampling_under_a_constraint_follows_the_constrained_distribution(drafter: str) -> None:
    vocab = 6
    model = ReferenceModel(ReferenceConfig(vocab_size=vocab, init_scale=2.0, seed=4))
    compiler = Compiler(_Letters(), vocab_size=vocab, eos_token_ids=[5])
    # first token one of a b c; then "cd" is forced; then one of a b e; then EOS is forced
    spec = ConstraintSpec("regex", r"[abc]cd[abe]")
    prompt = [0, 1, 2, 0, 1, 2, 0, 1]
    cfg = SamplingConfig(temperature=0.9, top_k=4)
    sampling = Sampling(cfg)

    def dist(context: list[int], constraint) -> torch.Tensor:
        logits = apply_mask(model.full_forward(context)[-1:], constraint.mask()[None])
        return sampling.probs(logits)[0]

    expected: dict[tuple[int, ...], float] = {}
    root = compiler.compile(spec)
    p1 = dist(prompt, root)
    for a in (0, 1, 2):
        c = compiler.compile(spec)
        c.commit([a, 2, 3])
        p4 = dist(prompt + [a, 2, 3], c)
        for b in (0, 1, 4):
            expected[(a, 2, 3, b, 5)] = float(p1[a] * p4[b])
    engine = Engine(ReferenceBackend(model), _SampledDrafter(vocab, 3) if drafter == "sampled"
                    else create_drafter(drafter))
    n = 3000
    counts: Counter = Counter()
    for seed in range(n):
        run = engine.generate(
            prompt, GenerationConfig(max_new_tokens=8, sampling=cfg, seed=seed, eos_token_ids=(5,)),
            compiler.compile(spec),
        )
        counts[tuple(run.tokens)] += 1
    assert_matches(counts, expected, n)


def test_a_tokenizer_llguidance_cannot_read_is_a_named_error(tmp_path: Path) -> None:
    """A word-level tokenizer without a decoder has no token bytes: refuse, do not guess."""
    from draftwise.api import Generator
    from draftwise.constraints import ConstraintError

    from ..conftest import save_tiny_model_dir

    folder = save_tiny_model_dir(tmp_path / "m", seed=3)
    gen = Generator(str(folder), "pld", budget=4, backend="hf", cache_dir=tmp_path)
    with pytest.raises(ConstraintError, match="cannot read this model's tokenizer"):
        gen.generate("w3 w4", max_new_tokens=4, regex="w1+", raw=True)


@pytest.mark.parametrize("options", ["trial_steps=3", "trial_steps=3,width=2,depth=3"])
def test_self_speculation_under_a_constraint(compiler: Compiler, options: str) -> None:
    """The ``self`` drafter (fast backend, layers skipped) on a float64 tiny Llama."""
    from types import SimpleNamespace

    from draftwise.backends.fast import FastBackend

    from ..conftest import tiny_hf_model

    hf = tiny_hf_model("llama", vocab=EOS + 1, seed=5, layers=6)
    spec = SPECS["records"]

    @torch.inference_mode()
    def forward(ids: list[int]) -> torch.Tensor:
        return hf(torch.tensor([ids])).logits[0, -1:]

    backend = FastBackend(hf)
    drafter = create_drafter(f"self:{options}")
    drafter.attach(SimpleNamespace(model=hf), backend)
    engine = Engine(backend, drafter)
    config = GenerationConfig(max_new_tokens=NEW, eos_token_ids=(EOS,))
    for prompt in PROMPTS:
        expected = constrained_plain(forward, compiler.compile(spec), prompt, NEW)
        assert engine.generate(prompt, config, compiler.compile(spec)).tokens == expected
