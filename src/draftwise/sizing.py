"""Tree sizing: keep the part of a draft tree worth its verification cost on this machine.

A forward pass over n tokens costs ``c(n)`` (the step-cost curve, measured per machine and model:
:mod:`draftwise.cost`). A tree of nodes with acceptance probabilities ``P(i)`` (the chance
node i is on the accepted path) yields ``1 + sum P(i)`` tokens per step in expectation, so the
best tree is the prefix-closed node set maximizing ``(1 + sum P(i)) / c(1 + |set|)``.

``P(i)`` is the product, down the node's path, of running acceptance rates per *bucket*
``(depth, rank among siblings)``, learned from every verified step (a node is *offered* when its
parent was accepted, *accepted* when it is on the accepted path), with a Beta prior whose mean
falls with the rank (``prior / (1 + rank)``). A sizer that verified nothing would learn nothing,
so when the best choice is no draft at all, every ``explore_every``-th such step verifies the
``explore_nodes`` likeliest nodes anyway, keeping the rates current. This is
DySpec's idea — grow the nodes most likely to be accepted — driven by measured statistics
instead of draft-model probabilities, so it works for every drafter without its cooperation.
Drafters list better candidates first; the rank is their order among siblings. A predicted
output's chain (:mod:`draftwise.prediction`), the first nodes of a tree when there is one, is
sized by the request's own acceptance of its prediction (given with the tree), not by the
method's buckets: an edit's prediction is reliable or not for the whole request. Its nodes are
counted apart, in buckets ``(depth, PREDICTED)``, so they do not move the drafter's rates.

Drafting costs time too, and once a tree is proposed that time is spent. So before each step the
sizer decides whether to draft at all (:meth:`TreeSizer.wants_draft`, auto sizing only): it keeps
the measured throughput of its drafting steps (tokens per second, drafting *and* verification
time) and of plain decoding (a one-row forward pass, timed whenever a step verifies no draft,
plus the rest of a step), and drafts unless drafting is behind by more than ``probe_tax``. A
method that cannot pay here (a drafter slower than the forward pass it saves, a text with
nothing to copy) thus decodes plainly, paying only for its *probes*: drafting steps spaced so
that their expected extra cost stays under ``probe_tax`` of the time. A probe that was accepted
well turns drafting back on. Probes, and the sizer's own exploration when it would verify
nothing, verify the ``explore_nodes`` likeliest nodes so that the acceptance rates stay current.
A drafter that always proposes gets an occasional plain step, so the plain rate stays timed
rather than inferred through ``c(n)`` (spaced by the same rule).

What a sizer learned (acceptance by bucket, the throughputs of drafting and plain steps) is
carried to the next request of the same engine, and across processes through
:meth:`TreeSizer.snapshot` / :meth:`TreeSizer.restore` (:class:`~draftwise.method.MethodBuilder`
keeps one file per method, model, backend and machine, like the cost curve), so a new process
does not pay a warm-up. Restored counts are scaled down to at most :data:`CARRIED_OBSERVATIONS`
per bucket, so what the new text shows still moves the rates within a few steps.

The sizer never changes which tokens are accepted, only how many nodes are verified.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from draftwise.tree import DraftTree
from draftwise.verify import Acceptance

__all__ = ["CARRIED_OBSERVATIONS", "CostCurve", "SizingConfig", "TreeSizer", "size_batch"]

_MAX_DEPTH_BUCKET = 15
_MAX_RANK_BUCKET = 7
PREDICTED = _MAX_RANK_BUCKET + 1  # the rank bucket of a predicted chain's nodes
CARRIED_OBSERVATIONS = 32.0  # per bucket, the most offered nodes a restored state counts


class CostCurve:
    """``c(n)/c(1)``: relative cost of a forward pass over n tokens, interpolated linearly."""

    def __init__(self, relative: Mapping[int, float]) -> None:
        if 1 not in relative:
            raise ValueError("a cost curve needs c(1)")
        self.sizes = sorted(int(n) for n in relative)
        self.values = [float(relative[n]) / float(relative[1]) for n in self.sizes]

    def __call__(self, n: int) -> float:
        sizes, values = self.sizes, self.values
        if n <= sizes[0]:
            return values[0]
        if n >= sizes[-1]:
            if len(sizes) == 1:
                return values[-1] * n / sizes[-1]
            slope = (values[-1] - values[-2]) / (sizes[-1] - sizes[-2])
            return values[-1] + max(slope, 0.0) * (n - sizes[-1])
        i = bisect.bisect_right(sizes, n)
        a, b = sizes[i - 1], sizes[i]
        return values[i - 1] + (values[i] - values[i - 1]) * (n - a) / (b - a)

    @classmethod
    def flat(cls) -> CostCurve:
        """Verification as cheap as one token (an idealized accelerator)."""
        return cls({1: 1.0, 1024: 1.0})


@dataclass(frozen=True)
class SizingConfig:
    """Attributes:
    budget: pin the node count (the most likely nodes); None = cost-optimal (auto).
    prior: prior acceptance rate of a rank-0 bucket before it has been observed.
    prior_weight: strength of the prior, in pseudo-observations.
    explore_every: the fewest steps between two exploring steps (see below).
    explore_nodes: nodes verified by an exploring step: one that verifies although auto sizing
        would verify nothing, spaced so its expected extra cost stays under ``probe_tax``.
    gate: auto sizing only: decode plainly (no draft) while drafting does not pay.
    probe_tax: the share of time exploring and probing may cost when they find nothing.
    warmup: drafting steps measured before the gate may close (sooner when drafting runs at
        under half the plain rate).
    memory: weight of the past in the running throughputs, per step of that kind.
    """

    budget: int | None = None
    prior: float = 0.3
    prior_weight: float = 4.0
    explore_every: int = 8
    explore_nodes: int = 8
    gate: bool = True
    probe_tax: float = 0.02
    warmup: int = 4
    memory: float = 0.85

    def __post_init__(self) -> None:
        if self.budget is not None and self.budget < 0:
            raise ValueError(f"budget must be >= 0 (or None for auto), got {self.budget}")
        if not 0.0 < self.prior < 1.0:
            raise ValueError(f"prior must be in (0, 1), got {self.prior}")
        if self.prior_weight <= 0.0:
            raise ValueError(f"prior_weight must be > 0, got {self.prior_weight}")
        if self.explore_every < 1 or self.explore_nodes < 0:
            raise ValueError("explore_every must be >= 1 and explore_nodes >= 0")
        if not 0.0 < self.probe_tax < 1.0 or not 0.0 <= self.memory < 1.0:
            raise ValueError("probe_tax must be in (0, 1) and memory in [0, 1)")


def _buckets(tree: DraftTree, predicted: int = 0) -> list[tuple[int, int]]:
    """``(depth, rank among siblings)`` of each node, both capped; the first ``predicted``
    nodes (a predicted chain) are ``(depth, PREDICTED)``."""
    depths = tree.depths
    seen: dict[int, int] = {}
    result = []
    for i, parent in enumerate(tree.parents):
        rank = seen.get(parent, 0)
        seen[parent] = rank + 1
        bucket_rank = PREDICTED if i < predicted else min(rank, _MAX_RANK_BUCKET)
        result.append((min(depths[i], _MAX_DEPTH_BUCKET), bucket_rank))
    return result


class TreeSizer:
    """Prunes each proposed tree to its most valuable nodes; learns acceptance rates."""

    def __init__(self, config: SizingConfig, cost: CostCurve | None = None) -> None:
        if config.budget is None and cost is None:
            raise ValueError("auto sizing needs a cost curve (or pin a budget)")
        self.config = config
        self.cost = cost
        self._accepted: dict[tuple[int, int], float] = {}
        self._offered: dict[tuple[int, int], float] = {}
        self._pending: list[tuple[int, int]] = []  # buckets of the nodes of the last sized tree
        self._quiet = 0  # consecutive steps that verified no draft
        self._explore = False  # this step verifies explore_nodes even if sizing says none
        self._drafting = Throughput(config.memory)  # tokens per second of drafting steps
        self._unit = Throughput(config.memory)  # seconds of verification per unit of c(n)
        self._one_row = Throughput(config.memory)  # seconds of a one-row forward pass
        self._overhead = Throughput(config.memory)  # seconds of a step but forward and draft
        self._draft_s = Throughput(config.memory)  # seconds of proposing per drafting step
        self._since_one_row = 0  # drafting steps since the last one-row step

    def rate(self, bucket: tuple[int, int]) -> float:
        cfg = self.config
        accepted = self._accepted.get(bucket, 0.0)
        offered = self._offered.get(bucket, 0.0)
        prior = cfg.prior / (1 + bucket[1])
        return (accepted + prior * cfg.prior_weight) / (offered + cfg.prior_weight)

    def node_probabilities(
        self, tree: DraftTree, buckets: list[tuple[int, int]] | None = None,
        predicted_rate: float = 0.0,
    ) -> list[float]:
        """Estimated probability that each node is on the accepted path (a predicted chain's
        node: ``predicted_rate`` given its parent was)."""
        probs: list[float] = []
        for parent, bucket in zip(tree.parents, buckets or _buckets(tree), strict=True):
            reach = 1.0 if parent < 0 else probs[parent]
            rate = predicted_rate if bucket[1] == PREDICTED else self.rate(bucket)
            probs.append(reach * rate)
        return probs

    def size(self, tree: DraftTree, predicted: int = 0, predicted_rate: float = 0.0,
             ) -> DraftTree:
        """The subset of ``tree`` to verify this step; its first ``predicted`` nodes are a
        predicted chain, accepted at ``predicted_rate`` each (see the module docstring)."""
        buckets = _buckets(tree, predicted)
        self._pending = buckets
        if len(tree) == 0:
            self._quiet += 1
            return tree
        probs = self.node_probabilities(tree, buckets, predicted_rate)
        # Children never score above their parent, and ties keep index order, so every prefix
        # of this order is closed under parents.
        order = sorted(range(len(tree)), key=lambda i: (-probs[i], i))
        if self.config.budget is not None:
            count = min(self.config.budget, len(order))
        else:
            assert self.cost is not None
            best, count, expected = 1.0 / self.cost(1), 0, 1.0
            for n, node in enumerate(order, start=1):
                expected += probs[node]
                value = expected / self.cost(n + 1)
                if value > best:
                    best, count = value, n
            if count == 0 and self._explore:
                count = min(self.config.explore_nodes, len(order))
        return self._take(tree, order, buckets, count)

    def _take(self, tree: DraftTree, order: list[int], buckets: list[tuple[int, int]],
              count: int) -> DraftTree:
        """The first ``count`` nodes of ``order`` (as the subtree to verify)."""
        self._quiet = 0 if count else self._quiet + 1
        self._pending = buckets
        if count == len(tree):
            return tree
        keep = sorted(order[:count])
        self._pending = [buckets[i] for i in keep]  # buckets as proposed, not as pruned
        return tree.subset(keep)

    def ranked(self, tree: DraftTree, predicted: int = 0, predicted_rate: float = 0.0,
               ) -> tuple[list[int], list[float]]:
        """The nodes, most valuable first, and each node's acceptance probability."""
        probs = self.node_probabilities(tree, _buckets(tree, predicted), predicted_rate)
        return sorted(range(len(tree)), key=lambda i: (-probs[i], i)), probs

    def observe(self, tree: DraftTree, acceptance: Acceptance) -> None:
        """Learn from a verified step: which offered nodes were accepted."""
        on_path = set(acceptance.path)
        buckets = self._pending if len(self._pending) == len(tree) else _buckets(tree)
        for node, (parent, bucket) in enumerate(zip(tree.parents, buckets, strict=True)):
            if parent < 0 or parent in on_path:
                self._offered[bucket] = self._offered.get(bucket, 0.0) + 1.0
                if node in on_path:
                    self._accepted[bucket] = self._accepted.get(bucket, 0.0) + 1.0

    # the gate: draft only while drafting pays ------------------------------------------------

    def wants_draft(self, batch: int | None = None) -> bool:
        """Whether this step should draft at all (see the module docstring). Pinned budgets and
        ``gate=False`` always draft.

        ``batch``: the step is one of ``batch`` requests' verified in one pass (a server's
        step), whose time is no one request's, so there are no throughputs to compare. Then
        draft when a tree could pay in a pass that wide (:meth:`could_pay`), or when this
        sizer's exploring is due at that width (as :func:`size_batch` spaces it); otherwise
        the drafter's proposal would only be pruned away, and it is not asked for one."""
        cfg = self.config
        if batch is not None and cfg.budget is None and cfg.gate and self.cost is not None:
            self._explore = self._quiet + 1 >= _explore_due(self, batch, batch,
                                                            cfg.explore_nodes)
            return self._explore or self.could_pay(batch)
        self._explore = cfg.budget is None and self._quiet + 1 >= self.probe_interval()
        if cfg.budget is not None or not cfg.gate or self._drafting.count == 0:
            return True
        drafting, plain = self.drafting_rate(), self.plain_rate()
        if self._drafting.count < cfg.warmup:
            return drafting >= 0.5 * plain  # judge after a few steps, unless far behind
        if drafting < (1.0 - cfg.probe_tax) * plain:  # behind by more than rates can tell
            return self._explore
        # Drafting is ahead. Without one-row steps (a drafter that always proposes) the plain
        # rate is inferred through c(n), so now and then decode one plainly to time it, less
        # often the further ahead drafting is (the step's cost stays under probe_tax).
        self._since_one_row += 1
        gain = max(0.0, 1.0 - plain / drafting)
        if self._since_one_row >= max(cfg.explore_every,
                                      min(256, math.ceil(gain / cfg.probe_tax))):
            return False
        return True

    def could_pay(self, width: int) -> bool:
        """Whether the likeliest chain a drafter can propose (rank 0 at every depth, at this
        sizer's learned rates) is worth verifying in a pass whose other rows are ``width``
        requests' roots: the pooled rule of :func:`size_batch` applied to this request alone.
        A wide pass is compute-bound, so a row there must be nearly certain to pay."""
        assert self.cost is not None
        plain = width / self.cost(width)
        expected, reach = float(width), 1.0
        for depth in range(_MAX_DEPTH_BUCKET + 1):
            reach *= self.rate((depth, 0))
            expected += reach
            if expected / self.cost(width + depth + 1) > plain:
                return True
            if reach < 1e-3:
                break
        return False

    def record(self, drafted: bool, tokens: int, seconds: float, rows: int,
               verify_s: float, draft_s: float) -> None:
        """Time one finished step: ``tokens`` committed in ``seconds``, of which ``verify_s``
        was the forward pass over ``rows`` rows and ``draft_s`` the drafter's proposal."""
        if self.cost is not None and rows > 0:
            self._unit.add(verify_s, self.cost(rows))
        if rows == 1:  # the forward pass of a plain step, timed
            self._one_row.add(verify_s, 1.0)
            self._since_one_row = 0
        self._overhead.add(seconds - verify_s - draft_s, 1.0)  # plain steps pay it too
        if drafted:
            self._drafting.add(tokens, seconds)
            self._draft_s.add(draft_s, 1.0)

    def drafting_rate(self) -> float:
        """Tokens per second of recent drafting steps."""
        return self._drafting.rate()

    def plain_rate(self) -> float:
        """Tokens per second of plain decoding: one token per one-row forward pass (timed on
        steps that verified no draft, else inferred through c(n)) plus the rest of a step
        (sampling, commit, the drafter's feedback), which plain steps pay as well."""
        forward = self._one_row.rate() if self._one_row.count else self._unit.rate()
        if forward <= 0:
            return 0.0
        return 1.0 / (forward + max(0.0, self._overhead.rate()))

    def probe_interval(self) -> int:
        """Steps between exploring steps, so that their extra cost stays under ``probe_tax``:
        verifying ``explore_nodes`` more rows, plus (while the gate is closed) drafting."""
        cfg = self.config
        if self.cost is None:
            return cfg.explore_every
        unit = self._unit.rate()
        if unit <= 0 or self.plain_rate() <= 0:
            return cfg.explore_every
        extra = (self.cost(1 + cfg.explore_nodes) - 1.0) * unit  # seconds
        if self._drafting.count >= cfg.warmup and self.drafting_rate() < self.plain_rate():
            extra += self._draft_s.rate()
        plain = 1.0 / self.plain_rate()
        return max(cfg.explore_every, min(1024, math.ceil(extra / plain / cfg.probe_tax)))

    # what a sizer learned, carried to another process ------------------------------------

    _TIMINGS = ("_drafting", "_unit", "_one_row", "_overhead", "_draft_s")

    def snapshot(self) -> dict[str, object]:
        """What this sizer learned, as plain JSON-ready data (see :meth:`restore`)."""
        buckets = sorted(set(self._offered) | set(self._accepted))
        return {
            "buckets": [[d, r, self._accepted.get((d, r), 0.0), self._offered.get((d, r), 0.0)]
                        for d, r in buckets],
            "timings": {name: getattr(self, name).state() for name in self._TIMINGS},
        }

    def restore(self, state: Mapping[str, object]) -> None:
        """Start from ``state`` (a :meth:`snapshot`), each bucket's counts scaled down to at
        most :data:`CARRIED_OBSERVATIONS` offered nodes. Malformed state raises ValueError and
        leaves this sizer as it was."""
        accepted: dict[tuple[int, int], float] = {}
        offered: dict[tuple[int, int], float] = {}
        try:
            rows = state.get("buckets", [])
            timings = state.get("timings", {})
            if not isinstance(rows, list) or not isinstance(timings, dict):
                raise TypeError("buckets must be a list and timings an object")
            for d, r, a, o in rows:
                bucket = (min(int(d), _MAX_DEPTH_BUCKET), min(int(r), PREDICTED))
                a, o = float(a), float(o)
                if not 0.0 <= a <= o or not math.isfinite(o):
                    raise ValueError(f"bucket {bucket}: accepted {a} of {o} offered")
                scale = min(1.0, CARRIED_OBSERVATIONS / o) if o > 0 else 1.0
                accepted[bucket], offered[bucket] = a * scale, o * scale
            restored = {name: Throughput.from_state(timings[name], self.config.memory)
                        for name in self._TIMINGS if name in timings}
        except (TypeError, KeyError) as error:
            raise ValueError(f"not a sizer state: {error}") from error
        self._accepted, self._offered = accepted, offered
        for name, throughput in restored.items():
            setattr(self, name, throughput)

    def expected_tokens(self, tree: DraftTree) -> float:
        """``1 + sum P(i)``: expected tokens committed by verifying ``tree``."""
        return 1.0 + sum(self.node_probabilities(tree))


def size_batch(steps: Sequence[tuple[TreeSizer | None, DraftTree]], cost: CostCurve,
               predicted: Sequence[tuple[int, float]] | None = None) -> list[DraftTree]:
    """Size the trees of several requests verified in one forward pass (a server's step).

    The single-request rule, over the union: with B requests (B root rows), keep the node set
    maximizing ``(B + sum P(i)) / c(B + |set|)`` — aggregate tokens per unit of step cost — taking
    nodes in order of acceptance probability across all trees. A pass that is already wide
    gains little from more rows, so trees shrink as the batch grows. A sizer that pins a budget
    keeps its own rule; no sizer (budget off) keeps the whole tree; an auto sizer that is due to
    explore (see :meth:`TreeSizer.wants_draft`) keeps its ``explore_nodes`` likeliest nodes:
    one request per pass, each at most once per as many quiet steps as keep all requests'
    exploring together under ``probe_tax`` of the pass time. ``predicted[i]``: request i's
    predicted chain (its first nodes) and that request's rate for it."""
    out: list[DraftTree | None] = [None] * len(steps)
    pooled: list[tuple[float, int, int]] = []  # (probability, request, rank in its order)
    orders: dict[int, tuple[list[int], list[tuple[int, int]]]] = {}
    for i, (sizer, tree) in enumerate(steps):
        chain, chain_rate = predicted[i] if predicted is not None else (0, 0.0)
        if sizer is None:
            out[i] = tree
        elif sizer.config.budget is not None or len(tree) == 0:
            out[i] = sizer.size(tree, chain, chain_rate)
        else:
            order, probs = sizer.ranked(tree, chain, chain_rate)
            orders[i] = (order, _buckets(tree, chain))
            pooled.extend((probs[node], i, rank) for rank, node in enumerate(order))
    pooled.sort(key=lambda item: (-item[0], item[1], item[2]))
    # rows fixed before pooling: every root, and the trees sized by their own rule
    roots = len(steps) + sum(len(tree) for tree in out if tree is not None)
    best, count, expected = len(steps) / cost(roots), 0, float(len(steps))
    for n, (p, _, _) in enumerate(pooled, start=1):
        expected += p
        value = expected / cost(roots + n)
        if value > best:
            best, count = value, n
    taken: dict[int, int] = {}
    for _, i, _ in pooled[:count]:
        taken[i] = taken.get(i, 0) + 1
    rows, probed = roots + count, False
    for i, (order, buckets) in orders.items():
        sizer, tree = steps[i]
        assert sizer is not None
        k = taken.get(i, 0)
        if k == 0 and sizer._explore and not probed:
            e = min(sizer.config.explore_nodes, len(tree))
            if sizer._quiet + 1 >= _explore_due(sizer, rows, len(steps), e):
                k, probed = e, True
        out[i] = sizer._take(tree, order, buckets, k)
    return [tree for tree in out if tree is not None]


def _explore_due(sizer: TreeSizer, rows: int, width: int, nodes: int) -> int:
    """Quiet steps before ``sizer`` explores ``nodes`` rows in a pass of ``rows`` rows over
    ``width`` requests. An exploring step's rows cost the whole pass, and every request in it
    may explore: one request explores per pass, each spaced by the batch width, so that all of
    them together cost under probe_tax (spaced as for one request alone, eight requests'
    probes would cost eight times the tax)."""
    cfg, cost = sizer.config, sizer.cost
    assert cost is not None
    extra = cost(rows + nodes) / cost(rows) - 1.0
    return max(cfg.explore_every, math.ceil(extra * width / cfg.probe_tax))


class Throughput:
    """A running ratio of two sums, the past weighted down by ``memory`` per addition."""

    def __init__(self, memory: float) -> None:
        self.memory, self.count = memory, 0
        self.numerator = self.denominator = 0.0

    def add(self, numerator: float, denominator: float) -> None:
        self.numerator = self.memory * self.numerator + numerator
        self.denominator = self.memory * self.denominator + denominator
        self.count += 1

    def rate(self) -> float:
        return self.numerator / self.denominator if self.denominator > 0 else 0.0

    def state(self) -> list[float]:
        return [self.numerator, self.denominator, float(self.count)]

    @classmethod
    def from_state(cls, state: object, memory: float) -> Throughput:
        if not isinstance(state, list | tuple) or len(state) != 3:
            raise ValueError(f"a throughput is [numerator, denominator, count], got {state!r}")
        values = [float(v) for v in state]
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(f"a throughput must be finite and >= 0, got {values}")
        throughput = cls(memory)
        throughput.numerator, throughput.denominator = values[0], values[1]
        throughput.count = int(values[2])
        return throughput
