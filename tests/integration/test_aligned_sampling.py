"""Grammar-aligned sampling (ASAp) converges to the model's distribution given the grammar.

A toy model and a finite language, so both targets are computed exactly by enumeration:
``P(w | w in L)`` (what ASAp must converge to) and the distorted distribution of plain
constrained sampling (what the engine's masked sampling must follow, and ASAp must leave).
"""

from __future__ import annotations

from collections import Counter

import pytest

from draftwise.backends.reference import ReferenceBackend, ReferenceConfig, ReferenceModel
from draftwise.constraints import Compiler, ConstraintError, ConstraintSpec, apply_mask
from draftwise.constraints.aligned import AlignedSampler
from draftwise.drafters import create_drafter
from draftwise.engine import Engine, GenerationConfig
from draftwise.sampling import Sampling, SamplingConfig

from .test_sampling_distribution import assert_matches
from .test_structured import _Letters

EOS = 5
LANGUAGE = ["ab", "ac", "bac", "bbc", "bcc", "cc", "cab"]
SPEC = ConstraintSpec("regex", "|".join(LANGUAGE))
PROMPT = [0, 1, 2, 3, 4, 0]
CFG = SamplingConfig(temperature=1.0)


def ids(word: str) -> list[int]:
    return [b"abcde".index(bytes([ch])) for ch in word.encode()]


@pytest.fixture(scope="module")
def model() -> ReferenceModel:
    return ReferenceModel(ReferenceConfig(vocab_size=6, init_scale=2.0, seed=1))


@pytest.fixture(scope="module")
def compiler() -> Compiler:
    return Compiler(_Letters(), vocab_size=6, eos_token_ids=[EOS])


def exact_targets(model: ReferenceModel, compiler: Compiler) -> tuple[dict, dict]:
    """(P(w | w in L), distribution of masked sampling) over the words of L (+ EOS)."""
    sampling = Sampling(CFG)
    joint, masked = {}, {}
    for word in LANGUAGE:
        tokens = ids(word) + [EOS]
        constraint = compiler.compile(SPEC)
        p_model = p_masked = 1.0
        for i, token in enumerate(tokens):
            logits = model.full_forward(PROMPT + tokens[:i])[-1:]
            p_model *= float(sampling.probs(logits)[0, token])
            p_masked *= float(sampling.probs(apply_mask(logits, constraint.mask()[None]))[0, token])
            if token != EOS:
                constraint.commit([token])
        joint[tuple(tokens)] = p_model
        masked[tuple(tokens)] = p_masked
    total = sum(joint.values())
    return {w: p / total for w, p in joint.items()}, masked


def total_variation(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def test_asap_converges_to_the_grammar_conditioned_distribution(
    model: ReferenceModel, compiler: Compiler
) -> None:
    exact, masked = exact_targets(model, compiler)
    assert abs(sum(masked.values()) - 1.0) < 1e-9
    assert total_variation(exact, masked) > 0.1  # the toy shows a real distortion to undo

    sampler = AlignedSampler(ReferenceBackend(model), compiler.compile(SPEC), PROMPT, CFG,
                             [EOS], max_new_tokens=8, seed=0)
    warmup = sampler.samples(400)
    assert all(s.complete for s in warmup)  # the mask alone never dead-ends on this grammar
    n = 4000
    counts = Counter(tuple(s.tokens) for s in sampler.samples(n))
    assert_matches(counts, exact, n)
    assert total_variation({k: v / n for k, v in counts.items()}, masked) > 0.08
    assert sampler.model_calls <= 1 + sum(len(w) for w in LANGUAGE)  # each prefix once


def test_masked_sampling_follows_the_distorted_distribution(
    model: ReferenceModel, compiler: Compiler
) -> None:
    """The baseline ASAp corrects: the engine's constrained sampling (with drafts) is the
    masked distribution, exactly — not the grammar-conditioned one."""
    exact, masked = exact_targets(model, compiler)
    engine = Engine(ReferenceBackend(model), create_drafter("pld:min_ngram=1,max_ngram=2"))
    n = 3000
    counts = Counter(
        tuple(engine.generate(PROMPT, GenerationConfig(max_new_tokens=8, sampling=CFG, seed=s,
                                                       eos_token_ids=(EOS,)),
                              compiler.compile(SPEC)).tokens)
        for s in range(n)
    )
    assert_matches(counts, masked, n)
    assert total_variation({k: v / n for k, v in counts.items()}, exact) > 0.08


def test_grammaticality_estimate_becomes_exact(model: ReferenceModel, compiler: Compiler) -> None:
    sampling = Sampling(CFG)
    p_language = 0.0
    for word in LANGUAGE:
        tokens = ids(word) + [EOS]
        p = 1.0
        for i, token in enumerate(tokens):
            p *= float(sampling.probs(model.full_forward(PROMPT + tokens[:i])[-1:])[0, token])
        p_language += p
    sampler = AlignedSampler(ReferenceBackend(model), compiler.compile(SPEC), PROMPT, CFG,
                             [EOS], max_new_tokens=8, seed=1)
    assert sampler.grammaticality == pytest.approx(1.0 - float(
        sampling.probs(model.full_forward(PROMPT)[-1:])[0, ids("de") + [EOS]].sum()))
    sampler.samples(400)
    assert sampler.grammaticality == pytest.approx(p_language, rel=1e-9)


def test_length_cap_and_dead_ends(model: ReferenceModel, compiler: Compiler) -> None:
    # every word of L needs 3+ tokens with EOS; a cap of 2 leaves only dead ends
    sampler = AlignedSampler(ReferenceBackend(model), compiler.compile(SPEC), PROMPT, CFG,
                             [EOS], max_new_tokens=2, seed=0)
    first = sampler.sample()
    assert not first.complete
    for _ in range(50):
        try:
            assert not sampler.sample().complete
        except ConstraintError:
            break
    else:
        raise AssertionError("the trie never learned that nothing fits in two tokens")
    with pytest.raises(ValueError, match="temperature"):
        AlignedSampler(ReferenceBackend(model), compiler.compile(SPEC), PROMPT,
                       SamplingConfig(), [EOS], 8)
