"""Sampled output follows exactly the target distribution (statistical, fixed seeds).

Each check compares empirical frequencies with exact probabilities; a cell may deviate by at
most 5 standard errors of its estimate (``5 * sqrt(p (1 - p) / n)``) plus ``1 / n``. With fixed
seeds the outcome is deterministic; a wrong rule (e.g. accepting a matching draft without
sampling, or a residual without normalisation) shifts cells by far more than that.
"""

from __future__ import annotations

from collections import Counter

import torch

from draftwise.backends.reference import ReferenceBackend, ReferenceConfig, ReferenceModel
from draftwise.drafters import create_drafter
from draftwise.engine import Engine, GenerationConfig
from draftwise.sampling import Sampling, SamplingConfig
from draftwise.tree import DraftTree
from draftwise.verify import verify

VOCAB = 6


def assert_matches(counts: Counter, expected: dict, n: int) -> None:
    for key in set(counts) | set(expected):
        p = expected.get(key, 0.0)
        freq = counts.get(key, 0) / n
        bound = 5 * (p * (1 - p) / n) ** 0.5 + 1 / n
        assert abs(freq - p) <= bound, f"{key}: frequency {freq:.4f}, probability {p:.4f}"


def random_logits(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64) * 1.5


def test_drafts_without_probabilities_sample_the_target() -> None:
    # root -> 0 (tok 1) -> 2 (tok 3);  root -> 1 (tok 4)
    tree = DraftTree((1, 4, 3), (-1, -1, 0))
    logits = random_logits(len(tree) + 1, seed=1)
    sampling = Sampling(SamplingConfig(temperature=0.8, top_k=5))
    p = sampling.probs(logits)  # [N + 1, vocab]
    expected: dict[tuple[int, ...], float] = {}
    for a in range(VOCAB):
        node_a = {1: 0, 4: 1}.get(a)
        if node_a is None:
            expected[(a,)] = float(p[0, a])
            continue
        for b in range(VOCAB):
            if node_a == 0 and b == 3:
                for c in range(VOCAB):
                    expected[(a, b, c)] = float(p[0, a] * p[1, b] * p[3, c])
            else:
                expected[(a, b)] = float(p[0, a] * p[node_a + 1, b])
    rng = torch.Generator().manual_seed(0)
    n = 30000
    counts = Counter(verify(tree, logits, sampling, rng).tokens for _ in range(n))
    assert_matches(counts, expected, n)


def _draft_with_probs(q_root: torch.Tensor, q_child: torch.Tensor, siblings: int,
                      replace: bool, rng: torch.Generator) -> DraftTree:
    """Root siblings drawn from q_root (with or without replacement), one child under each."""
    tokens, parents, rows = [], [], []
    q = q_root.clone()
    for _ in range(siblings):
        x = int(torch.multinomial(q, 1, generator=rng))
        tokens.append(x)
        parents.append(-1)
        rows.append(q.clone())
        if not replace:
            q[x] = 0.0
            q = q / q.sum()
    for s in range(siblings):
        y = int(torch.multinomial(q_child[tokens[s]], 1, generator=rng))
        tokens.append(y)
        parents.append(s)
        rows.append(q_child[tokens[s]].clone())
    return DraftTree(tuple(tokens), tuple(parents), torch.stack(rows))


def _check_rejection_rule(replace: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    q_root = torch.softmax(torch.randn(VOCAB, generator=gen, dtype=torch.float64), -1)
    q_child = torch.softmax(torch.randn(VOCAB, VOCAB, generator=gen, dtype=torch.float64), -1)
    # target logits: row 0 root; the rows of the children depend on their own token only
    target_root = random_logits(1, seed=11)[0]
    target_next = random_logits(VOCAB, seed=12)  # [token, vocab]: distribution after token
    target_after = random_logits(1, seed=13)[0]  # after two tokens (same for all: a leaf row)
    sampling = Sampling(SamplingConfig(temperature=1.0))
    p_root = sampling.probs(target_root[None])[0]
    p_next = sampling.probs(target_next)
    rng = torch.Generator().manual_seed(1)
    n = 30000
    first: Counter = Counter()
    second: Counter = Counter()
    for _ in range(n):
        tree = _draft_with_probs(q_root, q_child, 2, replace, rng)
        rows = [target_root]
        for i in range(len(tree)):
            rows.append(target_next[tree.tokens[i]] if tree.parents[i] < 0 else target_after)
        result = verify(tree, torch.stack(rows), sampling, rng)
        first[result.tokens[0]] += 1
        if len(result.tokens) > 1:
            second[(result.tokens[0], result.tokens[1])] += 1
    assert_matches(first, {a: float(p_root[a]) for a in range(VOCAB)}, n)
    for a in range(VOCAB):
        total = sum(c for (x, _), c in second.items() if x == a)
        if total < 500:
            continue
        conditional = Counter({b: c for (x, b), c in second.items() if x == a})
        assert_matches(conditional, {b: float(p_next[a, b]) for b in range(VOCAB)}, total)


def test_rejection_rule_with_independent_siblings() -> None:
    _check_rejection_rule(replace=True)


def test_rejection_rule_with_siblings_without_replacement() -> None:
    _check_rejection_rule(replace=False)


def test_engine_samples_first_two_tokens_exactly() -> None:
    model = ReferenceModel(ReferenceConfig(vocab_size=VOCAB, init_scale=2.0, seed=4))
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    cfg = SamplingConfig(temperature=0.9, top_p=0.95, repetition_penalty=1.2)
    sampling = Sampling(cfg)

    def dist(context: list[int]) -> torch.Tensor:
        seen = torch.zeros(VOCAB, dtype=torch.bool)
        seen[torch.tensor(context)] = True
        return sampling.probs(model.full_forward(context)[-1:], seen[None])[0]

    p1 = dist(prompt)
    expected = {
        (a, b): float(p1[a] * dist(prompt + [a])[b]) for a in range(VOCAB) for b in range(VOCAB)
    }
    backend = ReferenceBackend(model)
    engine = Engine(backend, create_drafter("pld:budget=6,max_ngram=2"))
    n = 4000
    counts: Counter = Counter()
    drafted = 0
    for seed in range(n):
        run = engine.generate(prompt, GenerationConfig(max_new_tokens=2, sampling=cfg, seed=seed))
        counts[tuple(run.tokens)] += 1
        drafted += run.stats.tree_sizes[0] > 0
    assert drafted == n  # the prompt repeats: every first step verified a real draft
    assert_matches(counts, expected, n)
