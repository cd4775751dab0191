"""Engine: the one decoding loop every method runs through.

The engine knows nothing about tokenization or about which method drafts: it holds a
:class:`~draftwise.backends.base.Backend` and a :class:`~draftwise.drafters.base.Drafter` and
repeats, until EOS, the token budget or the context window:

1. ``tree = drafter.propose(context)`` — trimmed so it cannot pass the budget or the window,
   then (optionally) sized by a :class:`~draftwise.sizing.TreeSizer` to what pays on this machine
   (which may also decide, before proposing, that this step drafts nothing: plain decoding);
2. ``logits = backend.forward_tree(tree)`` — root and every node in one forward pass;
3. ``acceptance = verify(tree, logits)`` — the lossless rule, shared with plain decoding;
4. ``backend.commit(acceptance.path)`` — keep the accepted path in the KV cache;
5. ``drafter.observe(step)`` — feedback for adaptive drafters;
6. yield the committed tokens (the caller may stop early; see :class:`Run`).

Under a :class:`~draftwise.constraints.Constraint` (structured output) the same loop also: puts
the tokens the grammar forces at the top of the tree as free drafts (or emits them without a model
step when they end the generation), prunes the draft nodes the grammar forbids before sizing,
masks the logits of the root and every node, and advances the grammar by committed tokens only.
Masking is one more transform before :class:`~draftwise.sampling.Sampling`, the same in plain and
speculative decoding, so output stays identical to constrained plain decoding.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from draftwise.backends.base import Backend
from draftwise.constraints.base import Constraint, apply_mask
from draftwise.drafters.base import Drafter, StepResult
from draftwise.drafters.suffix import SharesSuffixCache, SuffixCache
from draftwise.metrics import GenerationStats
from draftwise.prediction import Prediction
from draftwise.sampling import Sampling, SamplingConfig
from draftwise.sizing import TreeSizer
from draftwise.tree import DraftTree, TreeBuilder
from draftwise.verify import Acceptance, verify

__all__ = ["GenerationConfig", "Engine", "Run", "Step", "StepTimes", "UNSIZED_PREDICTION"]

UNSIZED_PREDICTION = 8  # predicted tokens drafted per step when no sizer prunes the tree
# the prior of a request's own record of its prediction: mean, weight (pseudo-observations)
PREDICTION_PRIOR = (0.5, 2.0)


@dataclass(frozen=True)
class GenerationConfig:
    """Attributes:
    max_new_tokens: most tokens to generate.
    sampling: how tokens are chosen (greedy by default).
    seed: seed of the sampling generator (unused when greedy).
    eos_token_ids: tokens that end generation (kept in the output).
    """

    max_new_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must be a 64-bit integer, got {self.seed}")


class Engine:
    """Runs requests, one at a time, on a backend with a drafter."""

    def __init__(
        self, backend: Backend, drafter: Drafter, sizer: TreeSizer | None = None, *,
        learned: Callable[[TreeSizer], None] | None = None, suffix: SuffixCache | None = None,
    ) -> None:
        """``learned``: called with the sizer at the end of every request (to keep what it
        learned beyond this process: :class:`~draftwise.method.MethodBuilder`); ``suffix``:
        earlier requests' outputs, for a drafter that drafts from them
        (:class:`~draftwise.drafters.suffix.SharesSuffixCache`; each request names its
        tenant)."""
        self.backend = backend
        self.drafter = drafter
        self.sizer = sizer
        self.learned = learned
        self.suffix = suffix

    def run(
        self,
        prompt_ids: Sequence[int],
        config: GenerationConfig,
        constraint: Constraint | None = None,
        prediction: Prediction | None = None,
        tenant: str = "",
    ) -> Run:
        """A request; iterate it to decode (each item: the tokens one step committed).

        ``constraint``: a fresh grammar state the output must follow (see module docstring);
        ``prediction``: a predicted output to draft from besides the drafter (its own state for
        this request: :mod:`draftwise.prediction`); ``tenant``: whose earlier outputs the
        drafter may draft from, and whose later requests may draft from this one's."""
        return Run(self, list(prompt_ids), config, constraint, prediction, tenant)

    def generate(
        self,
        prompt_ids: Sequence[int],
        config: GenerationConfig,
        constraint: Constraint | None = None,
        prediction: Prediction | None = None,
    ) -> Run:
        """Decode to the end and return the finished :class:`Run`."""
        run = self.run(prompt_ids, config, constraint, prediction)
        for _ in run:
            pass
        return run


class Run:
    """One request: iterate to decode; ``tokens`` and ``stats`` fill in as it goes.

    A step has three phases, which a scheduler running many requests calls itself
    (:mod:`draftwise.serve.scheduler`): :meth:`plan` drafts the tree, :meth:`finish` verifies
    the model's logits over it, and between them someone runs the forward pass — here
    ``backend.forward_tree``, there one pass over every request's tree."""

    def __init__(
        self,
        engine: Engine,
        prompt_ids: list[int],
        config: GenerationConfig,
        constraint: Constraint | None = None,
        prediction: Prediction | None = None,
        tenant: str = "",
    ) -> None:
        self.engine = engine
        self.tenant = tenant
        self.prompt_ids = prompt_ids
        self.config = config
        self.constraint = constraint
        self.prediction = prediction
        self.tokens: list[int] = []  # committed new tokens
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids),
                                     prediction_tokens=len(prediction.tokens) if prediction
                                     else 0)
        self.done = False
        # logprobs: None (off) or how many alternatives to keep; each committed token gets
        # (its log-probability, [(token, log-probability) of the top alternatives]) under the
        # model's own distribution (raw logits: before sampling transforms and grammar masks)
        self.top_logprobs: int | None = None
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self._context = list(prompt_ids)
        self._prediction_record = [0.0, 0.0]  # predicted nodes accepted, offered
        self._sampling = Sampling(config.sampling)
        self._rng = torch.Generator().manual_seed(config.seed)
        self._eos = set(config.eos_token_ids)
        self._seen: torch.Tensor | None = None
        self._start = 0.0
        # prompt tokens the backend's cache already holds (a server's slot from the request
        # before): prefill keeps them where the backend reuses prefixes exactly
        self.reuse = 0
        self.started = False  # prefilled: the backend's cache holds this run's tokens

    def __iter__(self) -> Iterator[list[int]]:
        self.start()
        while not self.done:
            step = self.plan()
            if step is None:
                break
            if step.emitted:  # the grammar alone ended the generation
                yield step.emitted
                break
            t1 = time.perf_counter()
            logits = self.engine.backend.forward_tree(step.full)  # 2. [N + 1, vocab]
            yield self.finish(step, logits, forward_s=time.perf_counter() - t1)  # 6.

    def start(self) -> None:
        """Prefill the prompt and start the drafter."""
        backend, cfg = self.engine.backend, self.config
        if cfg.sampling.repetition_penalty != 1.0:
            self._seen = torch.zeros(backend.vocab_size, dtype=torch.bool)
            self._seen[torch.tensor(self._context, dtype=torch.long)] = True
        self._start = time.perf_counter()
        self.stats.cached_tokens = backend.prefill(self._context, reuse=self.reuse)
        self.started = True
        drafter = self.engine.drafter
        if isinstance(drafter, SharesSuffixCache):
            drafter.share(self.engine.suffix, self.tenant)
        drafter.begin(self._context, cfg.sampling)
        self.stats.prefill_s = time.perf_counter() - self._start

    def plan(self, size: bool = True, batch: int | None = None) -> Step | None:
        """Draft this step's tree (1.), or None when the run is over (``stats.finish_reason``
        says why). ``size=False`` leaves the tree unsized: the caller sizes it (several
        requests' trees together) and passes the result to :meth:`Step.settle`; ``batch``:
        how many requests' trees that pass verifies (the sizer's gate judges by it; the pass's
        time is then no one request's, so the step does not feed the sizer's throughputs)."""
        backend, drafter, sizer = self.engine.backend, self.engine.drafter, self.engine.sizer
        cfg, stats, constraint = self.config, self.stats, self.constraint
        remaining = cfg.max_new_tokens - len(self.tokens)
        room = backend.max_length - backend.length
        if remaining <= 0 or room <= 0:
            stats.finish_reason = "length" if remaining <= 0 else "context"
            self._end()
            return None
        max_depth = min(remaining, room) - 1

        t0 = time.perf_counter()
        forced: list[int] = []
        if constraint is not None:
            limit = min(remaining, room)
            forced = constraint.forced(limit)
            if forced and (forced[-1] in self._eos or len(forced) == limit):
                # The grammar alone ends the generation: emit without a model step.
                emitted = forced
                constraint.commit(emitted)
                constraint.stats.forced += len(emitted)
                self._context.extend(emitted)
                self.tokens.extend(emitted)
                if self.top_logprobs is not None:  # forced: certain under the grammar
                    self.logprobs.extend((0.0, [(t, 0.0)][: self.top_logprobs])
                                         for t in emitted)
                stats.new_tokens += len(emitted)
                stats.draft_s += time.perf_counter() - t0
                stats.finish_reason = (
                    "eos" if emitted[-1] in self._eos else "length" if limit == remaining
                    else "context"
                )
                self._end()
                return Step(run=self, forced=forced, tree=DraftTree.empty(),
                            times=StepTimes(start=t0), emitted=emitted)
            forced = forced[:max_depth]
        depth = max_depth - len(forced)
        # A step that cannot pay for its draft decodes plainly (the sizer's gate): the
        # drafter is asked for nothing (depth 0) but keeps its bookkeeping and feedback.
        drafting = sizer is None or sizer.wants_draft(batch)
        asked = depth if drafting else 0
        pinned = sizer.config.budget if sizer is not None else None
        if pinned is not None:  # the likeliest N nodes reach no deeper than N
            asked = min(asked, pinned)
        tp = time.perf_counter()
        tree = drafter.propose(self._context + forced, asked).truncated(depth)
        chain: tuple[int, ...] = ()
        if self.prediction is not None and depth > 0:
            # without a sizer every node is verified: an unsized chain stays short, since on a
            # CPU each verified row costs compute whether or not it is accepted
            reach = depth if sizer is not None else min(depth, UNSIZED_PREDICTION)
            output = self.tokens + forced if forced else self.tokens  # (no copy per step)
            chain = tuple(self.prediction.propose(output, reach))
            tree = _with_chain(chain, tree)
            drafting = drafting or bool(chain)
        # every node takes a cache row until the step commits: no more nodes than rows left
        # (the first k nodes of a tree are closed under parents)
        rows = room - len(forced)
        if len(tree) > rows:
            tree = tree.subset(range(max(rows, 0)))
        propose_s = time.perf_counter() - tp
        if constraint is not None:
            tree = constraint.prune(tree, after=forced)
        step = Step(run=self, forced=forced, tree=tree, drafting=drafting and depth > 0,
                    shared=batch is not None, times=StepTimes(start=t0, propose_s=propose_s),
                    predicted=chain)
        if size:
            step.settle(sizer.size(tree, step.predicted_nodes, self.prediction_rate)
                        if sizer is not None else tree)
        return step

    @property
    def prediction_rate(self) -> float:
        """How often this request's predicted tokens were accepted when offered (on a weak
        prior): the sizer sizes the predicted chain by it. A prediction's worth is this
        request's own — an edit that keeps the code keeps being right, one that rewrites it
        departs early — so it is not the method's learned rates."""
        mean, weight = PREDICTION_PRIOR
        accepted, offered = self._prediction_record
        return (accepted + mean * weight) / (offered + weight)

    def finish(self, step: Step, logits: torch.Tensor, *, forward_s: float) -> list[int]:
        """Verify ``logits`` (``[N + 1, vocab]`` over ``step.full``, computed in
        ``forward_s`` seconds), commit, let the drafter learn; return the tokens this step
        committed (3.-5.)."""
        backend, drafter, sizer = self.engine.backend, self.engine.drafter, self.engine.sizer
        stats, constraint, forced, full = self.stats, self.constraint, step.forced, step.full
        t1 = time.perf_counter()
        raw = logits
        if step.masks is not None:
            logits = apply_mask(logits, step.masks)
        acceptance = verify(full, logits, self._sampling, self._rng, self._seen)  # 3.
        backend.commit(acceptance.path, acceptance.tokens[-1])  # 4.
        t2 = time.perf_counter()
        # The masks may prune more than prune() did (llguidance's masks also insist on
        # canonical tokenizations of forced text): the drafter sees the tree verified.
        tree = _below(len(forced), full)
        own = _ungraft(len(forced), tree, acceptance)
        hidden = backend.last_hidden
        drafter.observe(StepResult(tree, own, logits[len(forced) :], hidden))  # 5.
        if sizer is not None:
            sizer.observe(tree, own)
        t3 = time.perf_counter()
        times = step.times
        verify_s = forward_s + (t2 - t1)
        if sizer is not None and not step.shared:
            sizer.record(step.drafting, len(acceptance.tokens), t3 - times.start,
                         len(full) + 1, verify_s, times.propose_s)

        if step.predicted:  # the predicted tokens the target accepted
            accepted = own.tokens[: len(own.path)]
            taken = next((i for i, (a, b) in enumerate(zip(accepted, step.predicted,
                                                           strict=False)) if a != b),
                         min(len(accepted), len(step.predicted)))
            assert self.prediction is not None
            self.prediction.accepted += taken
            stats.accepted_prediction_tokens += taken
            verified = step.predicted_nodes  # each offered when the one before was accepted
            self._prediction_record[0] += min(taken, verified)
            self._prediction_record[1] += min(taken + 1, verified)
        emitted = list(acceptance.tokens)
        hit = next((i for i, token in enumerate(emitted) if token in self._eos), None)
        if hit is not None:
            emitted = emitted[: hit + 1]
        if constraint is not None:
            constraint.commit(emitted)
            constraint.stats.forced += len(forced)
        if self.top_logprobs is not None:
            self._log_probs(raw, [0, *(n + 1 for n in acceptance.path)], emitted)
        self._context.extend(emitted)
        self.tokens.extend(emitted)
        if self._seen is not None:
            self._seen[torch.tensor(emitted, dtype=torch.long)] = True
        stats.steps += 1
        stats.new_tokens += len(emitted)
        stats.step_tokens.append(len(emitted))
        stats.tree_sizes.append(len(full))
        stats.margins.extend(acceptance.margins[: len(emitted)])
        stats.draft_s += (times.planned - times.start) + (t3 - t2)
        stats.verify_s += verify_s
        if hit is not None:
            stats.finish_reason = "eos"
            self._end()
        else:
            stats.total_s = time.perf_counter() - self._start
        return emitted

    def _log_probs(self, logits: torch.Tensor, rows: list[int], emitted: list[int]) -> None:
        """Append each emitted token's log-probability (row ``rows[i]`` predicted token i)."""
        assert self.top_logprobs is not None
        lp = torch.log_softmax(logits[rows[: len(emitted)]].float(), dim=-1)
        k = min(self.top_logprobs, lp.shape[-1])
        top = torch.topk(lp, k, dim=-1) if k > 0 else None
        for i, token in enumerate(emitted):
            alternatives = [] if top is None else list(zip(
                top.indices[i].tolist(), top.values[i].tolist(), strict=True))
            self.logprobs.append((float(lp[i, token]), alternatives))

    def close(self) -> None:
        """End the run where its caller stops early (a stop string, a client gone): what
        the run learned is kept as at a natural end. Does nothing after the end."""
        if self.started and not self.done:
            self._end()

    def _end(self) -> None:
        self.done = True
        self.stats.total_s = time.perf_counter() - self._start
        engine = self.engine
        if isinstance(engine.drafter, SharesSuffixCache):
            engine.drafter.end(self.tokens)
        if engine.learned is not None and engine.sizer is not None:
            engine.learned(engine.sizer)


@dataclass
class StepTimes:
    """A step's clock readings (``time.perf_counter``) and durations, in seconds.

    Attributes:
        start: when planning began.
        planned: when the tree was settled (sized, masked); ``start`` until then.
        propose_s: the drafter's proposal.
    """

    start: float
    planned: float = 0.0
    propose_s: float = 0.0

    def __post_init__(self) -> None:
        self.planned = self.planned or self.start


@dataclass
class Step:
    """One step of a :class:`Run` between :meth:`Run.plan` and :meth:`Run.finish`.

    Attributes:
        run: the request.
        forced: tokens the grammar forces, verified as free drafts at the top of the tree.
        tree: the drafter's tree (pruned by the grammar; sized once settled).
        times: when the step began and was planned, and the proposal's time.
        drafting: the sizer's gate let this step draft (or a prediction drafted).
        shared: the forward pass verifies other requests too (a server step): its time is no
            one request's, so the step does not feed the sizer's throughputs.
        emitted: tokens the grammar forced that end the run without a model step.
        predicted: the chain of predicted tokens at the top of ``tree`` (see
            :mod:`draftwise.prediction`), or empty.
        full: what the model verifies: ``forced`` with ``tree`` below them (set by
            :meth:`settle`).
        masks: the grammar's masks over ``full``'s rows, or None.
    """

    run: Run
    forced: list[int]
    tree: DraftTree
    times: StepTimes
    drafting: bool = False
    shared: bool = False
    emitted: list[int] = field(default_factory=list)
    predicted: tuple[int, ...] = ()
    full: DraftTree = field(init=False)
    masks: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.full = self.tree

    @property
    def predicted_nodes(self) -> int:
        """How many of ``tree``'s first nodes are the predicted chain (it comes first; the
        grammar, the cache rows or the sizer may have cut its end)."""
        count, tree = 0, self.tree
        for i, token in enumerate(self.predicted[: len(tree)]):
            if tree.tokens[i] != token or tree.parents[i] != i - 1:
                break
            count += 1
        return count

    def settle(self, tree: DraftTree) -> None:
        """Fix the (sized) tree: graft it below the forced tokens and mask it."""
        self.tree = tree
        self.full = _graft(self.forced, tree)
        constraint = self.run.constraint
        if constraint is not None:
            self.full, self.masks = constraint.tree_masks(self.full)
        self.times.planned = time.perf_counter()


def _with_chain(chain: Sequence[int], tree: DraftTree) -> DraftTree:
    """``chain`` as the first path below the root, ``tree``'s nodes merged below it by shared
    prefixes. A tree whose drafts carry probabilities (sampled from a draft model) is kept as
    it is: the rejection rule needs every node's distribution, which a predicted token has
    not."""
    if not chain or tree.draft_probs is not None:
        return tree if tree.draft_probs is not None else DraftTree.chain(chain)
    builder = TreeBuilder()
    builder.add_path(chain)
    mapped: dict[int, int] = {}
    for i, (token, parent) in enumerate(zip(tree.tokens, tree.parents, strict=True)):
        node = builder.add(-1 if parent < 0 else mapped[parent], token)
        assert node is not None  # (no budget)
        mapped[i] = node
    return builder.build()


def _graft(forced: list[int], tree: DraftTree) -> DraftTree:
    """``tree`` hung below a chain of ``forced`` tokens (forced drafts carry a one-hot
    ``draft_probs`` row when the tree has them: a certain draft of a certain token)."""
    if not forced:
        return tree
    k = len(forced)
    parents = tuple(range(-1, k - 1)) + tuple(p + k if p >= 0 else k - 1 for p in tree.parents)
    probs = None
    if tree.draft_probs is not None:
        certain = torch.zeros(k, tree.draft_probs.shape[1], dtype=tree.draft_probs.dtype)
        certain[torch.arange(k), torch.tensor(forced)] = 1.0
        probs = torch.cat([certain, tree.draft_probs])
    return DraftTree(tuple(forced) + tree.tokens, parents, probs)


def _below(k: int, full: DraftTree) -> DraftTree:
    """The part of ``full`` below its first ``k`` (forced, chained) nodes, renumbered."""
    if k == 0:
        return full
    parents = tuple(p - k if p >= k else -1 for p in full.parents[k:])
    probs = None if full.draft_probs is None else full.draft_probs[k:]
    return DraftTree(full.tokens[k:], parents, probs)


def _ungraft(k: int, tree: DraftTree, acceptance: Acceptance) -> Acceptance:
    """The step as the drafter saw it: acceptance within ``tree``, below ``k`` forced tokens."""
    if k == 0:
        return acceptance
    path = tuple(n - k for n in acceptance.path if n >= k)
    return Acceptance(path, acceptance.tokens[k:], acceptance.bonus, acceptance.margins[k:],
                      acceptance.argmax[k:])
