"""Tree sizing: cost curve, cost-optimal node count, pinned budgets, learned rates."""

import json
from typing import Any

import pytest

from draftwise.method import MethodSpec, parse_budget
from draftwise.sizing import CARRIED_OBSERVATIONS, CostCurve, SizingConfig, TreeSizer
from draftwise.tree import DraftTree
from draftwise.verify import Acceptance


def test_cost_curve_interpolates_and_extrapolates() -> None:
    curve = CostCurve({1: 2.0, 3: 4.0, 5: 5.0})
    assert curve(1) == 1.0 and curve(2) == 1.5 and curve(3) == 2.0
    assert curve(7) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="c\\(1\\)"):
        CostCurve({2: 1.0})


def test_auto_size_maximizes_expected_tokens_per_cost() -> None:
    chain = DraftTree.chain([1, 2, 3, 4])
    # prior rate 0.5 per level: P = .5, .25, .125, .0625
    sizer = TreeSizer(SizingConfig(prior=0.5), CostCurve({1: 1.0, 2: 1.1, 3: 1.7, 5: 4.0}))
    # expected/cost: n=0: 1; n=1: 1.5/1.1=1.36; n=2: 1.75/1.7=1.03; ...
    assert sizer.size(chain).tokens == (1,)
    flat = TreeSizer(SizingConfig(prior=0.5), CostCurve.flat())
    assert flat.size(chain).tokens == (1, 2, 3, 4)
    steep = TreeSizer(SizingConfig(prior=0.5, explore_every=3, explore_nodes=2),
                      CostCurve({1: 1.0, 2: 2.0}))
    sizes = []
    for _ in range(6):
        assert steep.wants_draft()  # nothing timed yet: the gate is open
        sizes.append(len(steep.size(chain)))
    assert sizes == [0, 0, 2, 0, 0, 2]  # no draft pays, but every 3rd idle step explores


def test_pinned_budget_keeps_the_likeliest_prefix_closed_nodes() -> None:
    tree = DraftTree((1, 2, 3, 4), (-1, 0, -1, 2))  # two chains
    sizer = TreeSizer(SizingConfig(budget=3, prior=0.5))
    kept = sizer.size(tree)
    assert len(kept) == 3
    assert all(p < i for i, p in enumerate(kept.parents))
    assert kept.tokens[:2] == (1, 2) or kept.tokens[0] == 1


def test_rates_learn_from_accepted_and_rejected_offers() -> None:
    sizer = TreeSizer(SizingConfig(budget=10, prior=0.5, prior_weight=2.0))
    tree = DraftTree((1, 2, 9), (-1, 0, -1))
    for _ in range(8):
        sizer.size(tree)
        sizer.observe(tree, Acceptance((0,), (1, 5), bonus=False))
    # depth 0 rank 0: accepted 8 of 8; depth 1 rank 0: rejected 8 of 8; depth 0 rank 1: 0 of 8
    # (rank 1's prior mean is 0.5 / 2)
    assert sizer.rate((0, 0)) == pytest.approx(9 / 10)
    assert sizer.rate((1, 0)) == pytest.approx(1 / 10)
    assert sizer.rate((0, 1)) == pytest.approx(0.5 / 10)
    assert sizer.expected_tokens(tree) == pytest.approx(1 + 0.9 + 0.09 + 0.05)


def test_budget_parsing() -> None:
    assert MethodSpec.parse("recycling:k=4@8") == MethodSpec("recycling:k=4", 8)
    assert MethodSpec.parse("pld") == MethodSpec("pld", None)
    assert parse_budget("auto") == "auto" and parse_budget(None) == "auto"
    assert parse_budget("12") == 12 and parse_budget(" off ") == "off"
    with pytest.raises(ValueError, match="budget"):
        parse_budget("lots")
    with pytest.raises(ValueError, match="budget"):
        SizingConfig(budget=-1)
    with pytest.raises(ValueError, match="cost curve"):
        TreeSizer(SizingConfig())


CURVE = CostCurve({1: 1.0, 2: 1.05, 4: 1.1, 8: 1.3, 16: 1.8})


def run_gate(sizer: TreeSizer, steps: int, drafted_tokens: float, draft_s: float,
             verify_s: float = 0.010, rows: int = 5) -> list[bool]:
    """Feed the sizer ``steps`` timed steps: a drafting step commits ``drafted_tokens`` after
    ``draft_s`` of drafting and a ``rows``-row forward pass; a plain step commits one token
    after a one-row pass. Returns, per step, whether the sizer chose to draft."""
    unit = verify_s / CURVE(rows)
    choices = []
    for _ in range(steps):
        drafting = sizer.wants_draft()
        choices.append(drafting)
        sizer.size(DraftTree.chain(list(range(rows - 1))) if drafting else DraftTree.empty())
        if drafting:
            sizer.record(True, round(drafted_tokens), draft_s + verify_s, rows, verify_s, draft_s)
        else:
            sizer.record(False, 1, unit, 1, unit, 0.0)
    return choices


def test_gate_decodes_plainly_when_drafting_costs_more_than_it_saves() -> None:
    """A drafter whose drafting takes two forward passes and yields two tokens per step."""
    sizer = TreeSizer(SizingConfig(), CURVE)
    choices = run_gate(sizer, 400, drafted_tokens=2, draft_s=0.016)
    assert all(choices[:4])  # warm-up: measured before judged
    late = choices[100:]
    # probes only, spaced so their extra cost stays under probe_tax of the time
    assert 0 < sum(late) <= len(late) * 0.03
    assert sizer.drafting_rate() < sizer.plain_rate()


def test_gate_keeps_drafting_when_it_pays() -> None:
    """A cheap, accurate drafter: four tokens per step for 1 ms of drafting."""
    sizer = TreeSizer(SizingConfig(), CURVE)
    choices = run_gate(sizer, 200, drafted_tokens=4, draft_s=0.001)
    # drafts, but for a plain step now and then that keeps the plain rate measured; with
    # drafting 2.5x ahead those are spaced as probe_tax allows (gain / tax = 30 steps)
    plain_steps = [i for i, drafted in enumerate(choices) if not drafted]
    assert 0 < len(plain_steps) <= 200 / 25
    assert all(b - a >= 25 for a, b in zip(plain_steps, plain_steps[1:], strict=False))
    assert sizer.drafting_rate() > 2 * sizer.plain_rate()


def test_gate_reopens_when_a_probe_finds_text_to_copy() -> None:
    sizer = TreeSizer(SizingConfig(), CURVE)
    run_gate(sizer, 200, drafted_tokens=1, draft_s=0.004)  # nothing to copy: gate closes
    assert not all(run_gate(sizer, 20, drafted_tokens=1, draft_s=0.004))
    choices = run_gate(sizer, 200, drafted_tokens=8, draft_s=0.004)  # a copy-heavy stretch
    assert sum(choices[-100:]) >= 95


def test_a_drafter_far_behind_is_stopped_before_the_warmup_ends() -> None:
    """Drafting at under half the plain rate is not noise: the gate closes after one step."""
    sizer = TreeSizer(SizingConfig(), CURVE)
    choices = run_gate(sizer, 20, drafted_tokens=1, draft_s=0.1)
    assert choices[0] and not any(choices[1:])


def test_pinned_budget_and_no_gate_always_draft() -> None:
    for config in (SizingConfig(budget=4), SizingConfig(gate=False)):
        sizer = TreeSizer(config, CURVE)
        assert all(run_gate(sizer, 50, drafted_tokens=1, draft_s=0.1))


def test_batch_sizing_is_the_single_rule_over_all_trees() -> None:
    """One request: size_batch keeps what size() keeps. Many: the pooled rule keeps fewer
    nodes per request as the pass widens (a wide pass costs more per extra row), each kept
    set closed under parents, the likeliest nodes first."""
    from draftwise.sizing import size_batch

    cost = CostCurve({1: 1.0, 2: 1.05, 4: 1.15, 8: 1.4, 16: 2.4, 32: 4.6, 64: 9.0})
    tree = DraftTree.chain([1, 2, 3, 4, 5, 6])
    alone = TreeSizer(SizingConfig(prior=0.8), cost).size(tree)
    assert len(size_batch([(TreeSizer(SizingConfig(prior=0.8), cost), tree)], cost)[0]) \
        == len(alone) > 0
    for batch in (2, 4, 8, 16):
        sized = size_batch([(TreeSizer(SizingConfig(prior=0.8), cost), tree)
                            for _ in range(batch)], cost)
        kept = [len(t) for t in sized]
        assert all(t.parents == tuple(range(-1, len(t) - 1)) for t in sized)  # chains
        assert max(kept) - min(kept) <= 1  # equal trees share the rows fairly
        if batch == 16:
            assert sum(kept) < batch * len(alone)
    # pinned budgets and budget off keep their own rules inside a batch
    pinned, whole = TreeSizer(SizingConfig(budget=2)), None
    sized = size_batch([(pinned, tree), (whole, tree)], cost)
    assert [len(t) for t in sized] == [2, len(tree)]


def test_batch_sizing_keeps_exploration_under_the_probe_tax() -> None:
    """Exploring rows cost the whole batch: at any width, the extra cost of all requests'
    exploring steps together stays under probe_tax of the pass time (plus one probe), one
    request explores per pass, and every request still explores."""
    from draftwise.sizing import size_batch

    cost = CostCurve({1: 1.0, 2: 1.05, 4: 1.15, 8: 1.4, 16: 2.4, 32: 4.6, 64: 9.0})
    tree = DraftTree.chain([1, 2, 3, 4, 5, 6, 7, 8])
    steps, tax = 400, SizingConfig().probe_tax
    for batch in (1, 4, 8):
        sizers = [TreeSizer(SizingConfig(prior=0.01), cost) for _ in range(batch)]
        spent, explored = 0.0, [0] * batch
        for _ in range(steps):
            for sizer in sizers:
                sizer.wants_draft()
            sized = size_batch([(s, tree) for s in sizers], cost)
            assert sum(len(t) > 0 for t in sized) <= 1
            explored = [n + (len(t) > 0) for n, t in zip(explored, sized, strict=True)]
            spent += cost(batch + sum(len(t) for t in sized)) / cost(batch) - 1.0
        assert min(explored) > 0, (batch, explored)
        assert spent <= tax * steps + cost(batch + 8) / cost(batch) - 1.0, (batch, spent)


def test_batch_gate_asks_for_no_draft_a_wide_pass_would_prune() -> None:
    """In a server's pass the gate judges by the pass's width: a request whose likeliest chain
    cannot pay there is not asked for a draft (only for its spaced exploring steps), one whose
    drafts are nearly certain is, and the same sizer drafts again when the pass narrows."""
    from draftwise.sizing import size_batch

    cost = CostCurve({1: 1.0, 2: 1.05, 4: 1.15, 8: 1.4, 16: 2.4, 32: 4.6, 64: 9.0})
    tree = DraftTree.chain([1, 2, 3, 4])
    poor = TreeSizer(SizingConfig(prior=0.3), cost)  # a 0.3 rate pays alone, not among 8
    assert poor.could_pay(1) and not poor.could_pay(8)
    sure = TreeSizer(SizingConfig(prior=0.95), cost)
    assert sure.could_pay(8)
    # at width 8 the poor sizer drafts only on its exploring steps, which size_batch verifies
    asked = 0
    for _ in range(600):
        if poor.wants_draft(batch=8):
            asked += 1
            sized = size_batch([(poor, tree)] + [(TreeSizer(SizingConfig(prior=0.3), cost),
                                                  DraftTree.empty()) for _ in range(7)], cost)
            assert len(sized[0]) > 0  # an exploring step, not a wasted proposal
        else:
            size_batch([(poor, DraftTree.empty())], cost)  # a quiet step
    assert 0 < asked < 600 // 20
    assert poor.wants_draft(batch=1)  # narrow again: the chain pays
    # pinned budgets and a closed-off gate keep their rules
    assert TreeSizer(SizingConfig(budget=2)).wants_draft(batch=8)
    assert TreeSizer(SizingConfig(gate=False, prior=0.3), cost).wants_draft(batch=8)


def test_what_a_sizer_learned_survives_a_snapshot_scaled_to_a_few_observations() -> None:
    sizer = TreeSizer(SizingConfig(), CostCurve({1: 1.0, 8: 2.0}))
    tree = DraftTree((1, 2, 9), (-1, 0, -1))
    for _ in range(200):  # depth 0 rank 0 always accepted, depth 1 never, rank 1 never
        sizer.size(tree)
        sizer.observe(tree, Acceptance((0,), (1, 5), bonus=False))
        sizer.record(True, 2, 0.01, 4, 0.008, 0.001)
    other = TreeSizer(SizingConfig(), CostCurve({1: 1.0, 8: 2.0}))
    other.restore(json.loads(json.dumps(sizer.snapshot())))  # through JSON, as it is kept
    # 200 offers scale down to CARRIED_OBSERVATIONS, the ratio kept: (32 + 0.3 * 4) / (32 + 4)
    assert other.rate((0, 0)) == pytest.approx((CARRIED_OBSERVATIONS + 1.2)
                                               / (CARRIED_OBSERVATIONS + 4.0))
    assert other.rate((1, 0)) == pytest.approx(1.2 / (CARRIED_OBSERVATIONS + 4.0))
    assert other.drafting_rate() == pytest.approx(sizer.drafting_rate())
    assert other.plain_rate() == pytest.approx(sizer.plain_rate())
    # new text moves the restored rates: 32 rejections halve the carried acceptance
    for _ in range(32):
        other.size(tree)
        other.observe(tree, Acceptance((), (5,), bonus=False))
    assert other.rate((0, 0)) == pytest.approx((CARRIED_OBSERVATIONS + 1.2)
                                               / (2 * CARRIED_OBSERVATIONS + 4.0))


@pytest.mark.parametrize("state", [
    {"buckets": [[0, 0, 5.0, 2.0]]},  # more accepted than offered
    {"buckets": [[0, 0, 1.0]]},
    {"buckets": "0,0"},
    {"timings": {"_drafting": [1.0, -2.0, 3]}},
    {"timings": {"_unit": "fast"}},
])
def test_a_malformed_sizer_state_is_refused_and_changes_nothing(state: dict[str, Any]) -> None:
    sizer = TreeSizer(SizingConfig(), CostCurve({1: 1.0}))
    before = sizer.snapshot()
    with pytest.raises(ValueError):
        sizer.restore(state)
    assert sizer.snapshot() == before


def test_a_predicted_chain_is_sized_by_the_requests_own_rate() -> None:
    """The first ``predicted`` nodes (a predicted output's chain) take the request's rate for
    its prediction, not the method's buckets, and their outcomes go to buckets of their own."""
    from draftwise.sizing import PREDICTED

    curve = CostCurve({1: 1.0, 2: 1.05, 4: 1.15, 8: 1.4, 16: 2.0})
    tree = DraftTree((7, 8, 9, 10, 11, 5), (-1, 0, 1, 2, 3, -1))  # chain 7..11, a guess 5
    sizer = TreeSizer(SizingConfig(), curve)
    assert sizer.size(tree, predicted=5, predicted_rate=0.95).tokens[:5] == (7, 8, 9, 10, 11)
    assert len(sizer.size(tree, predicted=5, predicted_rate=0.05)) < 2  # unreliable: cut
    unmarked = sizer.size(tree)  # the same nodes in the drafter's buckets, at the prior
    assert len(unmarked) < 5
    kept = sizer.size(tree, predicted=5, predicted_rate=0.95)
    sizer.observe(kept, Acceptance((0, 1, 2, 3, 4), (7, 8, 9, 10, 11, 1), bonus=False))
    assert sizer.rate((0, 0)) == pytest.approx(SizingConfig().prior)  # the drafter's: untouched
    buckets = sizer.snapshot()["buckets"]
    assert isinstance(buckets, list) and {row[1] for row in buckets} <= {PREDICTED, 1}
