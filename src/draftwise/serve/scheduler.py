"""Continuous batching: one thread steps every active request together.

Each iteration of :meth:`Scheduler._loop`:

1. admit queued requests into free slots of the :class:`~draftwise.backends.batch.SequencePool`
   (prefill each: one request's prompt, alone, as the CLI would — less the prefix its slot
   holds from its last request, or copies from another slot, where the backend reuses a
   prefix exactly);
2. ``plan`` every active run (its drafter proposes, its grammar prunes and forces) — a run
   whose sizer judges that no tree of its could pay in a pass this wide is not asked for one,
   but for an occasional exploring step (a wide pass is compute-bound: its drafts would only
   be pruned away, after the drafter's time was spent);
3. size all trees together (:func:`~draftwise.sizing.size_batch`: a wider pass gets smaller
   trees);
4. verify every tree in ONE forward pass (block-diagonal attention: each request in its own
   cache region);
5. ``finish`` every run (its own sampling state, seed, drafter, grammar) and hand each request
   its new tokens; finished, stopped or cancelled requests leave and free their slot.

A request's engine is the one the CLI runs (:class:`~draftwise.engine.Run`), on a backend that
is its slot's region of the pool, so its greedy output is that of the same request alone. One
request's failure (a grammar error at a step, a bug) fails that request only.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from draftwise.backends.batch import SequencePool
from draftwise.backends.decoder import DecoderBackend
from draftwise.constraints import Constraint
from draftwise.engine import Engine, GenerationConfig, Run, Step
from draftwise.method import MethodBuilder, MethodSpec
from draftwise.prediction import Prediction
from draftwise.sizing import size_batch
from draftwise.text import TextTracker

__all__ = ["CHECKED_METHODS", "ENGINES_PER_SLOT", "Job", "QueueFull", "Scheduler"]

ENGINES_PER_SLOT = 4  # engines (a drafter and sizer each) a slot keeps for the methods it ran
CHECKED_METHODS = 256  # method strings remembered as servable (more are checked again)


class QueueFull(RuntimeError):
    """The scheduler's queue is at its bound; retry later."""


@dataclass
class Event:
    """What a job reports: new ``text``/``tokens``, or the end (``finish_reason`` set), or an
    ``error`` that ended it."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)


@dataclass
class Job:
    """One sequence to generate. ``emit`` is called from the scheduler thread with each
    :class:`Event` (the server forwards them to its event loop)."""

    prompt_ids: list[int]
    config: GenerationConfig
    method: str
    emit: Callable[[Event], None]
    stop: tuple[str, ...] = ()
    constraint: Constraint | None = None
    logprobs: int | None = None  # None: off; else alternatives per token (see Run)
    cache_prompt: bool = True  # may reuse a slot's cached prefix of the prompt
    # prefixes are reused only between jobs of one tenant (an API key and cache salt)
    tenant: str = ""
    deadline: float | None = None  # time.perf_counter() after which the job ends ("length")
    prediction: Prediction | None = None  # a predicted output to draft from (its own state)
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    run: Run | None = None
    text: TextTracker | None = None
    slot: int = -1

    def cancel(self) -> None:
        """Stop generating (a client went away); the slot is freed at the next step."""
        self.cancelled = True


@dataclass
class MethodStats:
    """Per-method counters for /metrics."""

    steps: int = 0
    tokens: int = 0  # committed by steps (MAT = tokens / steps)
    drafted: int = 0  # draft nodes verified
    accepted: int = 0  # draft nodes accepted


class Scheduler:
    """Runs :class:`Job` s on the model ``methods`` builds for, up to ``max_batch`` at a time
    (each method built by ``methods``, its budget the default)."""

    def __init__(self, methods: MethodBuilder, max_batch: int = 8,
                 max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        if not isinstance(methods.backend, DecoderBackend):
            raise ValueError("the server runs on the quant or fast backend (a Llama/Qwen2 "
                             "model)")
        self.builder = methods
        self.tokenizer = methods.model.tokenizer
        self.pool = SequencePool(methods.backend, max_batch)
        self.max_queue = max_queue
        self.cost = methods.cost_curve() if methods.budget == "auto" else None
        self._queue: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._free = list(range(max_batch - 1, -1, -1))
        # the tokens each slot's cache holds from its last request (a prompt that begins with
        # them reuses them: a chat's next turn, a shared system prompt)
        self._held: dict[int, tuple[str, list[int]]] = {}  # slot -> (tenant, tokens)
        self.cached_tokens = 0  # prompt tokens reused, not computed
        # per slot, the engines (drafter, sizer) of the methods it ran last, most recent last:
        # a few, so that clients naming ever new method strings cannot grow them
        self._engines: dict[int, collections.OrderedDict[str, Engine]] = (
            collections.defaultdict(collections.OrderedDict))
        self.failure: str | None = None  # why the loop died, if it did
        # method strings check_method accepted, the most recent CHECKED_METHODS of them
        self._checked: collections.OrderedDict[str, MethodSpec] = collections.OrderedDict()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="draftwise-scheduler",
                                        daemon=True)
        # metrics (read by the server; plain counters, written by the scheduler thread)
        self.steps = 0
        self.step_seconds = 0.0
        self.rows = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.methods: dict[str, MethodStats] = collections.defaultdict(MethodStats)

    # the server's side -----------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop in a thread of its own (in-process servers, tests)."""
        self._thread.start()

    def run_jobs(self, jobs: list[Job]) -> None:
        """Run ``jobs`` to the end in the calling thread (offline batch generation; do not
        mix with :meth:`start`)."""
        self._queue.extend(jobs)
        while self._queue or self._active:
            while self._queue and self._free:
                job = self._queue.popleft()
                job.slot = self._take_slot(job)
                self._admit(job)
            if self._active:
                self._step()

    def run_forever(self) -> None:
        """Run the loop in the calling thread until :meth:`close` (``draftwise serve`` runs
        it on the main thread: the kernels' OpenMP teams then are the ones the model was
        loaded with, faster per step than a second thread's)."""
        self._loop()

    def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def check_method(self, method: str) -> MethodSpec:
        """The method's spec, if it can be served (see
        :meth:`~draftwise.method.MethodBuilder.check_servable`); raises UnknownMethodError or
        ValueError otherwise."""
        if method in self._checked:
            self._checked.move_to_end(method)
        else:
            self._checked[method] = self.builder.check_servable(method)
            while len(self._checked) > CHECKED_METHODS:
                self._checked.popitem(last=False)
        return self._checked[method]

    def submit(self, job: Job) -> None:
        """Queue ``job``; :class:`QueueFull` when the queue is at its bound."""
        self.submit_all([job])

    def submit_all(self, jobs: list[Job]) -> None:
        """Queue jobs (``n`` choices of one request) together, or none of them
        (:class:`QueueFull`): the bound counts the jobs that would wait for a slot."""
        with self._wake:
            waiting = len(self._queue) + len(jobs) - len(self._free)
            if waiting > self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting")
            self._queue.extend(jobs)
            self._wake.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return len(self._active)

    # the scheduler thread --------------------------------------------------------------------

    def _engine(self, slot: int, method: str) -> Engine:
        """The slot's engine for ``method``: its own drafter and sizer, kept across requests
        (the sizer's acceptance rates keep learning; ``begin`` resets the drafter)."""
        engines = self._engines[slot]
        if method in engines:
            engines.move_to_end(method)
        else:
            engines[method] = self.builder.engine(self.check_method(method),
                                                  backend=self.pool.sequences[slot])
            while len(engines) > ENGINES_PER_SLOT:
                engines.popitem(last=False)
        return engines[method]

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as error:
            # a bug in the loop itself (one request's failures are caught per request): every
            # request ends with the error, /health reports it, and the server exits
            self.failure = f"{type(error).__name__}: {error}"
            for job in [*self._active, *self._queue]:
                job.emit(Event(finish_reason="error", error=f"the scheduler failed: "
                                                           f"{self.failure}"))
            self._active.clear()
            self._queue.clear()
            raise

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._queue and not self._active:
                    self._wake.wait()
                if self._stopping:
                    break
                admitted = []
                while self._queue and self._free:
                    job = self._queue.popleft()
                    job.slot = self._take_slot(job)
                    admitted.append(job)
            for job in admitted:
                self._admit(job)
            if self._active:
                self._step()
        for job in [*self._active, *self._queue]:
            job.emit(Event(finish_reason="cancelled", error="the server is shutting down"))

    def _take_slot(self, job: Job) -> int:
        """The free slot whose cache holds the longest prefix of ``job``'s prompt for its
        tenant (the most recently freed among equals), taken off the free list."""
        if not job.prompt_ids:
            return self._free.pop()
        best = max(range(len(self._free)),
                   key=lambda i: (self._common_held(self._free[i], job), i))
        return self._free.pop(best)

    def _common_held(self, slot: int, job: Job) -> int:
        """How much of ``job``'s prompt slot ``slot`` holds from its last request, if that was
        the same tenant's (else nothing: one tenant's prompts never shorten another's
        prefill, so cached counts and timings tell nothing across tenants)."""
        tenant, tokens = self._held.get(slot, ("", []))
        return _common(tokens, job.prompt_ids) if tenant == job.tenant else 0

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            self._release(job)
            return
        try:
            engine = self._engine(job.slot, job.method)
            job.run = engine.run(job.prompt_ids, job.config, job.constraint, job.prediction,
                                 job.tenant)
            own = self._common_held(job.slot, job)
            self._held.pop(job.slot, None)
            job.run.reuse = self._shared_prefix(job, own) if job.cache_prompt else 0
            job.run.top_logprobs = job.logprobs
            job.text = TextTracker(self.tokenizer, job.stop)
            job.run.start()
            self.cached_tokens += job.run.stats.cached_tokens
        except Exception as error:  # noqa: BLE001 - one request's failure is its own
            self._fail(job, error)
            return
        self._active.append(job)

    def _shared_prefix(self, job: Job, own: int) -> int:
        """How many of ``job``'s prompt tokens its slot will hold cached: the ``own`` its slot
        holds from its last request, or a longer run of them that another slot holds for the
        same tenant (a shared system prompt or document: another request's, running or done),
        copied into this slot — where the backend reuses a prefix exactly, so the copy holds
        the bits a prefill computes."""
        prompt = job.prompt_ids
        if not self.builder.backend.capabilities.reuses_prefix:
            return own
        best, source = own, -1
        for slot, tokens in self._holdings(job.slot, job.tenant):
            common = _common(tokens, prompt)
            if common > best:
                best, source = common, slot
        if source >= 0:
            self.pool.copy_prefix(source, job.slot, best)
        return best

    def _holdings(self, exclude: int, tenant: str) -> list[tuple[int, list[int]]]:
        """``(slot, tokens its cache holds committed)`` for every other slot that holds some
        of ``tenant``'s: free slots' last requests and running requests' prompts and tokens so
        far."""
        out = [(slot, tokens) for slot, (owner, tokens) in self._held.items()
               if slot != exclude and owner == tenant]
        for other in self._active:
            run = other.run
            if (run is not None and run.started and other.slot not in (exclude, -1)
                    and other.tenant == tenant):
                cached = self.pool.sequences[other.slot].length - 1  # (the root is not cached)
                out.append((other.slot, (run.prompt_ids + run.tokens)[:cached]))
        return out

    def _step(self) -> None:
        planned: list[tuple[Job, Step]] = []
        width = len(self._active)  # the requests this step's pass verifies, at most
        for job in list(self._active):
            run = job.run
            assert run is not None
            if job.cancelled:
                self._finish(job, "cancelled")
                continue
            if job.deadline is not None and time.perf_counter() >= job.deadline:
                run.stats.finish_reason = "length"
                self._finish(job, "length")
                continue
            try:
                step = run.plan(size=False, batch=width)
            except Exception as error:  # noqa: BLE001
                self._fail(job, error)
                continue
            if step is None:
                self._finish(job, run.stats.finish_reason)
            elif step.emitted:
                self._deliver(job, step.emitted)
                if job in self._active:
                    self._finish(job, run.stats.finish_reason)
            else:
                planned.append((job, step))
        if not planned:
            return
        sizers = [(job.run.engine.sizer if job.run else None) for job, _ in planned]
        if self.cost is not None:
            trees = size_batch(
                [(s, step.tree) for s, (_, step) in zip(sizers, planned, strict=True)],
                self.cost, predicted=[(step.predicted_nodes, step.run.prediction_rate)
                                      for _, step in planned])
        else:
            trees = [s.size(step.tree, step.predicted_nodes, step.run.prediction_rate)
                     if s is not None else step.tree
                     for s, (_, step) in zip(sizers, planned, strict=True)]
        for (_, step), tree in zip(planned, trees, strict=True):
            step.settle(tree)
        start = time.perf_counter()
        try:
            logits = self.pool.forward([(job.slot, step.full) for job, step in planned])
        except Exception as error:  # noqa: BLE001 - fail the step's requests, keep serving
            for job, _ in planned:
                self._fail(job, error)
            return
        elapsed = time.perf_counter() - start
        self.steps += 1
        self.step_seconds += elapsed
        self.rows += sum(len(step.full) + 1 for _, step in planned)
        self.batch_sizes[len(planned)] += 1
        for (job, step), rows in zip(planned, logits, strict=True):
            run = job.run
            assert run is not None
            try:
                emitted = run.finish(step, rows, forward_s=elapsed)
            except Exception as error:  # noqa: BLE001
                self._fail(job, error)
                continue
            stats = self.methods[job.method.partition(":")[0].partition("@")[0]]
            stats.steps += 1
            stats.tokens += len(emitted)
            stats.drafted += len(step.tree)
            stats.accepted += len(emitted) - 1
            self._deliver(job, emitted)
            if job in self._active and run.done:
                self._finish(job, run.stats.finish_reason)

    def _deliver(self, job: Job, tokens: list[int]) -> None:
        run, text = job.run, job.text
        assert run is not None and text is not None
        try:
            piece, stopped = text.update(run.tokens)
            logprobs = (run.logprobs[len(run.tokens) - len(tokens) :]
                        if job.logprobs is not None else [])
            job.emit(Event(text=piece, tokens=list(tokens), logprobs=logprobs))
        except Exception as error:  # noqa: BLE001 - one request's delivery failing is its own
            self._fail(job, error)
            return
        if stopped:
            run.stats.finish_reason = "stop"
            self._finish(job, "stop")

    def _finish(self, job: Job, reason: str) -> None:
        run, text = job.run, job.text
        try:
            if reason not in ("stop", "cancelled") and run is not None and text is not None:
                piece = text.final(run.tokens)
                if piece:
                    job.emit(Event(text=piece))
            self._release(job)
            job.emit(Event(finish_reason=reason))
        except Exception as error:  # noqa: BLE001 - one request's delivery failing is its own
            self._fail(job, error)

    def _fail(self, job: Job, error: Exception) -> None:
        self._release(job)
        try:
            job.emit(Event(finish_reason="error", error=f"{type(error).__name__}: {error}"))
        except Exception:  # noqa: BLE001 - its own channel is what failed: nothing to tell it
            pass

    def _release(self, job: Job) -> None:
        if job in self._active:
            self._active.remove(job)
        if job.slot >= 0:
            run = job.run
            if run is not None:
                with contextlib.suppress(Exception):  # what it learned is only kept, not needed
                    run.close()
            if run is not None and run.started:  # the slot's cache holds its first committed
                held = self.pool.sequences[job.slot].length - 1  # tokens (the root is not cached)
                self._held[job.slot] = (job.tenant, (run.prompt_ids + run.tokens)[:held])
            with self._wake:
                self._free.append(job.slot)
            job.slot = -1


def _common(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
