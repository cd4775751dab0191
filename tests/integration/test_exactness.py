"""Losslessness, proven in float64: every drafter's greedy output equals plain greedy."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from draftwise.backends.hf import HFBackend
from draftwise.backends.reference import ReferenceBackend, ReferenceModel
from draftwise.drafters import available_methods, create_drafter
from draftwise.drafters.retrieval import Datastore
from draftwise.drafters.suffix import SuffixCache
from draftwise.engine import Engine, GenerationConfig
from draftwise.sampling import SamplingConfig
from draftwise.sizing import CostCurve, SizingConfig, TreeSizer
from draftwise.tree import DraftTree

from ..conftest import OracleDrafter, tiny_hf_model

PROMPTS = [
    [1, 2, 3, 4, 1, 2, 3],
    [7, 7, 7, 7, 7],
    [5, 9, 2, 30, 11, 5, 9, 2, 14, 22, 5, 9],
    [0],
]
NEW = 64


def plain_greedy(model: ReferenceModel, prompt: list[int], new: int) -> list[int]:
    """Plain greedy decoding by full recompute: no cache, no engine."""
    ids = list(prompt)
    for _ in range(new):
        ids.append(int(torch.argmax(model.full_forward(ids)[-1])))
    return ids[len(prompt) :]


@pytest.fixture(scope="module")
def answers(reference_model: ReferenceModel) -> dict[int, list[int]]:
    return {i: plain_greedy(reference_model, p, NEW) for i, p in enumerate(PROMPTS)}



@pytest.fixture(scope="module")
def datastore(tmp_path_factory: pytest.TempPathFactory, answers: dict[int, list[int]]) -> str:
    """A datastore holding the prompts and half of each plain answer (partial matches)."""
    docs = [PROMPTS[i] + answers[i][: NEW // 2] for i in range(len(PROMPTS))]
    path = tmp_path_factory.mktemp("store") / "store.npz"
    Datastore.build(docs, key_length=8).save(path)
    return str(path)


def method_specs(datastore: str) -> dict[str, list[str]]:
    """Specs to test for every registered method (defaults, plus settings that stress trees)."""
    return {
        "none": ["none"],
        "pld": ["pld", "pld:budget=1", "pld:budget=32,depth=16,max_matches=8",
                "pld:max_ngram=1,min_ngram=1", "pld:max_ngram=5,min_ngram=2"],
        "recycling": ["recycling", "recycling:k=2,max_nodes=6", "recycling:max_nodes=64"],
        "aded": ["aded", "aded:budget=4,candidates=2", "aded:budget=32,exploration=0"],
        "lookahead": ["lookahead", "lookahead:window=7,ngram=2,trie_depth=0",
                      "lookahead:ngram=5,budget=8"],
        "retrieval": [f"retrieval:datastore={datastore}",
                      f"retrieval:datastore={datastore},min_ngram=1,budget=4"],
        "suffix": ["suffix", "suffix:budget=1", "suffix:min_match=3,depth=4,occurrences=2",
                   "suffix:depth_per_match=4,budget=32,scan=4"],
        "composite": ["composite", "composite:parts=pld+aded+lookahead,budget=12",
                      "composite:parts=suffix+recycling",
                      f"composite:parts=recycling+retrieval:datastore={datastore};budget=4"],
    }


# model drafters need a target and tiny model folders: tests/integration/test_model_drafters.py;
# draft heads need trained heads on a fast/quant backend: tests/integration/test_heads.py
MODEL_DRAFTERS = {"draft", "self", "medusa", "hydra"}
TABLE_DRAFTERS = sorted(set(available_methods()) - MODEL_DRAFTERS)


def test_every_registered_method_is_covered(datastore: str) -> None:
    assert set(method_specs(datastore)) | MODEL_DRAFTERS == set(available_methods())


@pytest.mark.parametrize("method", TABLE_DRAFTERS)
def test_every_drafter_equals_plain_greedy(
    method: str, datastore: str, reference_model: ReferenceModel,
    answers: dict[int, list[int]],
) -> None:
    for spec in method_specs(datastore)[method]:
        # one engine per spec across all prompts, twice: drafters that keep state across
        # requests (recycling, aded, the suffix cache: small, so it also evicts) are
        # exercised with it
        engine = Engine(ReferenceBackend(reference_model), create_drafter(spec),
                        suffix=SuffixCache(2 * NEW))
        for index, prompt in [*enumerate(PROMPTS)] * 2:
            run = engine.generate(prompt, GenerationConfig(max_new_tokens=NEW))
            assert run.tokens == answers[index], (spec, index)
            assert run.stats.new_tokens == NEW


@pytest.mark.parametrize("method", TABLE_DRAFTERS)
def test_every_drafter_with_tree_sizing_equals_plain_greedy(
    method: str, datastore: str, reference_model: ReferenceModel,
    answers: dict[int, list[int]],
) -> None:
    curve = CostCurve({1: 1.0, 2: 1.1, 4: 1.3, 8: 1.6, 16: 2.2, 64: 5.0})
    for budget in (None, 3):
        sizer = TreeSizer(SizingConfig(budget=budget), curve)
        spec = method_specs(datastore)[method][0]
        engine = Engine(ReferenceBackend(reference_model), create_drafter(spec), sizer)
        for index, prompt in enumerate(PROMPTS):
            run = engine.generate(prompt, GenerationConfig(max_new_tokens=NEW))
            assert run.tokens == answers[index], (spec, budget, index)
            if budget is not None:
                assert max(run.stats.tree_sizes) <= budget


@pytest.mark.parametrize("depth", [1, 3, 7])
def test_perfect_drafter_gets_mat_k_plus_one(
    depth: int, reference_model: ReferenceModel, answers: dict[int, list[int]]
) -> None:
    vocab = reference_model.config.vocab_size
    new = (depth + 1) * 8  # a whole number of full steps
    drafter = OracleDrafter(answers[2], vocab, depth)
    run = Engine(ReferenceBackend(reference_model), drafter).generate(
        PROMPTS[2], GenerationConfig(max_new_tokens=new)
    )
    assert run.tokens == answers[2][:new]
    assert run.stats.steps == 8
    assert run.stats.mat == depth + 1
    assert run.stats.histogram == {depth + 1: 8}


@pytest.mark.parametrize(
    ("wrong_at", "decoys", "accepted"),
    [
        ((0,), (), 0),
        ((2,), (), 2),
        ((4,), (), 4),
        ((), (0,), 6),
        ((), (1, 3), 6),
        ((3,), (0, 2), 3),
    ],
)
def test_planted_mistakes_accept_exactly_up_to_them(
    wrong_at: tuple[int, ...],
    decoys: tuple[int, ...],
    accepted: int,
    reference_model: ReferenceModel,
    answers: dict[int, list[int]],
) -> None:
    vocab = reference_model.config.vocab_size
    drafter = OracleDrafter(answers[0], vocab, 6, wrong_at=wrong_at, decoy_siblings=decoys)
    run = Engine(ReferenceBackend(reference_model), drafter).generate(
        PROMPTS[0], GenerationConfig(max_new_tokens=NEW)
    )
    assert run.tokens == answers[0]
    # every step accepts exactly the right tokens before the first planted mistake
    full_steps = [n for n in run.stats.step_tokens[:-1]]
    assert all(n == accepted + 1 for n in full_steps)


def test_repetition_penalty_greedy_equals_plain_engine(reference_model: ReferenceModel) -> None:
    config = GenerationConfig(max_new_tokens=NEW, sampling=SamplingConfig(repetition_penalty=1.3))
    plain = Engine(ReferenceBackend(reference_model), create_drafter("none"))
    ids = PROMPTS[2]
    expected = plain.generate(ids, config).tokens
    # the plain engine itself against a hand-rolled penalized greedy loop
    context = list(ids)
    for _ in range(NEW):
        logits = reference_model.full_forward(context)[-1]
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[torch.tensor(context)] = True
        logits = torch.where(seen, torch.where(logits > 0, logits / 1.3, logits * 1.3), logits)
        context.append(int(torch.argmax(logits)))
    assert expected == context[len(ids) :]
    spec = Engine(ReferenceBackend(reference_model), create_drafter("pld:budget=16"))
    assert spec.generate(ids, config).tokens == expected


def test_eos_stops_and_is_kept(
    reference_model: ReferenceModel, answers: dict[int, list[int]]
) -> None:
    eos = answers[0][10]
    first = answers[0].index(eos)
    config = GenerationConfig(max_new_tokens=NEW, eos_token_ids=(eos,))
    for method in ("none", "pld"):
        run = Engine(ReferenceBackend(reference_model), create_drafter(method)).generate(
            PROMPTS[0], config
        )
        assert run.tokens == answers[0][: first + 1]
        assert run.stats.finish_reason == "eos"


def test_context_window_ends_generation(reference_model: ReferenceModel) -> None:
    window = reference_model.config.max_length
    prompt = PROMPTS[0] * ((window - 20) // len(PROMPTS[0]))
    run = Engine(ReferenceBackend(reference_model), create_drafter("pld")).generate(
        prompt, GenerationConfig(max_new_tokens=100)
    )
    assert len(prompt) + len(run.tokens) == window
    assert run.stats.finish_reason == "context"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_transformers_backend_pld_equals_plain(family: str) -> None:
    model = tiny_hf_model(family, "sdpa", vocab=48, seed=3)
    prompt = [4, 8, 15, 16, 23, 42, 4, 8, 15]
    plain = Engine(HFBackend(model), create_drafter("none")).generate(
        prompt, GenerationConfig(max_new_tokens=48)
    )
    with torch.inference_mode():
        reference = model.generate(
            torch.tensor([prompt]), max_new_tokens=48, do_sample=False, min_new_tokens=48
        )[0, len(prompt) :].tolist()
    assert plain.tokens == reference
    for spec in ("pld", "pld:budget=16,max_ngram=1"):
        run = Engine(HFBackend(model), create_drafter(spec)).generate(
            prompt, GenerationConfig(max_new_tokens=48)
        )
        assert run.tokens == plain.tokens


@pytest.mark.parametrize("method", TABLE_DRAFTERS)
def test_every_drafter_on_the_fast_backend_equals_plain_greedy(
    method: str, datastore: str
) -> None:
    from draftwise.backends.fast import FastBackend

    model = tiny_hf_model("llama", "sdpa", vocab=32, seed=1)  # float64
    plain = Engine(FastBackend(model), create_drafter("none"))
    spec = method_specs(datastore)[method][0]
    engine = Engine(FastBackend(model), create_drafter(spec))
    for prompt in PROMPTS:
        expected = plain.generate(prompt, GenerationConfig(max_new_tokens=NEW)).tokens
        assert engine.generate(prompt, GenerationConfig(max_new_tokens=NEW)).tokens == expected


class Clock:
    """Time that passes only where a test says (a virtual ``time.perf_counter``): decisions
    that depend on measured time then do not depend on how fast or busy the machine is."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class SlowOracle(OracleDrafter):
    """An accurate drafter whose drafts take ``delay`` seconds of ``clock``; counts the drafts
    asked."""

    def __init__(self, answer: list[int], vocab: int, depth: int, delay: float,
                 clock: Clock) -> None:
        super().__init__(answer, vocab, depth)
        self.delay, self.asked, self.clock = delay, 0, clock

    def propose(self, context: Sequence[int], max_depth: int) -> DraftTree:
        if max_depth > 0:
            self.asked += 1
            self.clock.now += self.delay
        return super().propose(context, max_depth)


class TimedBackend(ReferenceBackend):
    """The reference backend whose forward pass over n rows takes ``unit * curve(n)`` seconds
    of ``clock`` (exactly the cost curve the sizer is given)."""

    def __init__(self, model: ReferenceModel, clock: Clock, curve: CostCurve,
                 unit: float) -> None:
        super().__init__(model)
        self.clock, self.curve, self.unit = clock, curve, unit

    def forward_tree(self, tree: DraftTree) -> torch.Tensor:
        self.clock.now += self.unit * self.curve(len(tree) + 1)
        return super().forward_tree(tree)


@pytest.mark.parametrize("delay", [0.0, 0.05])
def test_auto_sizing_drafts_only_while_drafting_pays(
    delay: float, reference_model: ReferenceModel, answers: dict[int, list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A draft that takes 50 ms (a hundred forward passes of 0.5 ms) for four tokens cannot
    pay: after its warm-up the engine decodes plainly but for sparse probes. The same drafter
    without the delay drafts every step. Output is plain greedy's either way. Time is virtual
    (forward passes cost the sizer's own curve), so the outcome is the same on any machine."""
    clock = Clock()
    monkeypatch.setattr("draftwise.engine.time", clock)
    vocab = reference_model.config.vocab_size
    drafter = SlowOracle(answers[2], vocab, 3, delay=delay, clock=clock)
    curve = CostCurve({1: 1.0, 2: 1.1, 4: 1.3, 8: 1.6, 16: 2.2, 64: 5.0})
    sizer = TreeSizer(SizingConfig(prior=0.9), curve)
    backend = TimedBackend(reference_model, clock, curve, unit=0.0005)
    run = Engine(backend, drafter, sizer).generate(PROMPTS[2], GenerationConfig(max_new_tokens=NEW))
    assert run.tokens == answers[2]
    if delay:
        warmup = SizingConfig().warmup
        plain_steps = run.stats.steps - drafter.asked
        assert drafter.asked <= warmup + plain_steps // SizingConfig().explore_every + 1
        assert plain_steps >= NEW - 4 * drafter.asked
    else:
        assert drafter.asked == run.stats.steps and run.stats.mat > 3
