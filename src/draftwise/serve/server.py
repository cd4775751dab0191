"""The server's state between HTTP and the scheduler: admission, per-request events, counters.

:class:`Server` checks a request against the model (its window, the method, the grammar) and
turns it into the scheduler's :class:`~draftwise.serve.scheduler.Job` s, one per choice, so a
bad request is refused (:class:`~draftwise.serve.openai.ApiError`) before it takes a slot.
Events a job reports on the scheduler's thread reach the request's coroutine through a
:class:`Mailbox`. It knows the model, the methods and the scheduler; nothing of HTTP routes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from draftwise.constraints import Compiler, ConstraintError, ConstraintSpec, constraint_spec
from draftwise.drafters.base import UnknownMethodError
from draftwise.engine import GenerationConfig
from draftwise.method import MethodBuilder, MethodSpec, parse_budget
from draftwise.prediction import Prediction
from draftwise.sampling import SamplingConfig
from draftwise.serve.openai import ApiError, Choice, LogprobEntry
from draftwise.serve.policy import ClientPolicy
from draftwise.serve.protocol import ChatRequest, CompletionRequest
from draftwise.serve.scheduler import Event, Job, Scheduler

__all__ = ["COMPILES_WAITING", "Mailbox", "Pending", "Server"]

COMPILES_WAITING = 4  # grammars that may wait to compile; more get 429

Request = ChatRequest | CompletionRequest


class Mailbox:
    """Events from the scheduler thread into one event loop's queues, one loop wake-up per
    burst: a step reports to every active request at once, and waking the loop once per event
    (a write to its self-pipe each) would take the scheduler thread's time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Event], Event]] = []

    def post(self, queue: asyncio.Queue[Event], event: Event) -> None:
        with self._lock:
            self._pending.append((queue, event))
            first = len(self._pending) == 1
        if first:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


@dataclass
class Pending(Choice):
    """A choice in flight: its job, and the events its job has reported."""

    mailbox: Mailbox | None = None
    job: Job | None = None
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)

    def emit(self, event: Event) -> None:  # called from the scheduler thread
        assert self.mailbox is not None
        self.mailbox.post(self.events, event)

    def cancel_unfinished(self) -> None:
        if self.finish_reason is None and self.job is not None:
            self.job.cancel()


class Server:
    """State shared by the endpoints: the model, the scheduler and the counters.

    Parameters:
        methods: builds the methods requests name (its model, backend and default budget).
        method: the method of requests that name none.
        max_batch, max_queue: the scheduler's slots and queue bound (see
            :class:`~draftwise.serve.scheduler.Scheduler`).
        policy: what clients may ask for (:class:`~draftwise.serve.policy.ClientPolicy`).
    """

    def __init__(self, methods: MethodBuilder, method: str, max_batch: int,
                 max_queue: int, policy: ClientPolicy | None = None) -> None:
        self.model = methods.model
        self.backend = methods.backend
        self.method = method
        self.policy = policy or ClientPolicy()
        self.scheduler = Scheduler(methods, max_batch, max_queue)
        self.scheduler.check_method(method)
        self.model_id = self.model.name
        self.created = int(time.time())
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.compiler = Compiler(self.model.tokenizer, self.backend.vocab_size,
                                 self.model.eos_token_ids)
        self._compile_lock = threading.Lock()
        # grammars compile one at a time on a thread of their own, at most COMPILES_WAITING
        # more waiting: a flood of slow schemas gets 429s and never holds up the admission of
        # other requests (whose preparation shares the HTTP side's thread pool)
        self._compile_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="draftwise-compile")
        self._compiling = 0
        self._mailboxes: dict[asyncio.AbstractEventLoop, Mailbox] = {}

    def check_model(self, name: str) -> None:
        if name not in (self.model_id, "default", self.model.source):
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.model_id!r}", "invalid_request_error", "model",
                           "model_not_found")

    def piece(self, token: int) -> str:
        """One token's text (logprobs name tokens by it)."""
        text: str = self.model.tokenizer.decode([token])
        return text

    def prepare(self, body: Request, prompt_ids: list[int], loop: asyncio.AbstractEventLoop,
                tenant: str = "") -> tuple[list[Job], list[Pending]]:
        """Jobs for the request's ``n`` choices; raises :class:`ApiError` on a bad request.
        ``tenant``: who the request is (an API key's digest): cached prompt prefixes are reused
        only within one tenant and cache salt."""
        window = self.backend.max_length
        if len(prompt_ids) >= window:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; the context window "
                                f"is {window}",
                           param="messages" if isinstance(body, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        method = self._method(body)
        limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
        max_new = min(limit or window, window - len(prompt_ids))
        sampling = SamplingConfig(temperature=body.temperature, top_p=body.top_p)
        options = body.draftwise
        if body.cache_salt is not None:
            tenant = f"{tenant}|{body.cache_salt}"
        deadline = None
        if options is not None and options.deadline_s is not None:
            deadline = time.perf_counter() + options.deadline_s
        constraint_args = self._constraint_args(body)
        try:
            spec = constraint_spec(**constraint_args) if constraint_args is not None else None
        except ConstraintError as error:
            raise ApiError(400, f"response_format: {error}", param="response_format") from error
        if loop not in self._mailboxes:
            self._mailboxes[loop] = Mailbox(loop)
        predicted = None
        if body.prediction is not None:  # its tokens as they would appear in the output
            predicted = self.model.tokenizer(body.prediction.text(),
                                             add_special_tokens=False).input_ids
        jobs, choices = [], []
        for i in range(body.n):
            constraint = None
            if spec is not None:  # a fresh grammar state per choice (compiled once, cached)
                try:
                    with self._compile_lock:
                        constraint = self.compiler.compile(spec)
                except ConstraintError as error:
                    raise ApiError(400, f"response_format: {error}",
                                   param="response_format") from error
            # any 64-bit seed, signed or not, as the generator's unsigned 64-bit one
            seed = ((body.seed if body.seed is not None else uuid.uuid4().int % 2**31) + i) % 2**64
            config = GenerationConfig(max_new_tokens=max_new, sampling=sampling, seed=seed,
                                      eos_token_ids=self.model.eos_token_ids)
            if body.ignore_eos:
                config = dataclasses.replace(config, eos_token_ids=())
            choice = Pending(i, logprobs_wanted=body.alternatives is not None, method=method,
                             mailbox=self._mailboxes[loop])
            job = Job(list(prompt_ids), config, method, choice.emit, body.stops, constraint,
                      body.alternatives, cache_prompt=options.cache_prompt if options else True,
                      tenant=tenant, deadline=deadline,
                      prediction=Prediction(predicted) if predicted is not None else None)
            choice.job = job
            jobs.append(job)
            choices.append(choice)
        return jobs, choices

    async def precompile(self, body: Request) -> None:
        """Compile the request's grammar, if it has one and it is not compiled yet, on the
        compile thread (see above); raises :class:`ApiError`: 400 for a bad grammar, 429 when
        too many are waiting."""
        args = self._constraint_args(body)
        if args is None:
            return
        try:
            spec = constraint_spec(**args)
        except ConstraintError as error:
            raise ApiError(400, f"response_format: {error}", param="response_format") from error
        if spec is None or self.compiler.is_cached(spec):
            return
        if self._compiling > COMPILES_WAITING:
            raise ApiError(429, "too many schemas are compiling; retry shortly",
                           "rate_limit_error", code="compile_queue_full")
        self._compiling += 1
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._compile_pool, self._compile, spec)
        except ConstraintError as error:
            raise ApiError(400, f"response_format: {error}", param="response_format") from error
        finally:
            self._compiling -= 1

    def _compile(self, spec: ConstraintSpec) -> None:
        with self._compile_lock:
            self.compiler.compile(spec)

    def absorb(self, choice: Pending, event: Event) -> list[LogprobEntry]:
        """Take one of ``choice``'s events in; returns its tokens' logprob entries."""
        entries = [(t, lp, top) for t, (lp, top)
                   in zip(event.tokens, event.logprobs, strict=False)]
        choice.text += event.text
        choice.tokens += len(event.tokens)
        choice.logprobs.extend(entries)
        self.completion_tokens += len(event.tokens)
        run = choice.job.run if choice.job is not None else None
        if run is not None:
            choice.steps, choice.cached_tokens = run.stats.steps, run.stats.cached_tokens
            if run.prediction is not None:
                choice.prediction = (run.stats.accepted_prediction_tokens,
                                     run.stats.rejected_prediction_tokens)
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
        return entries

    def _method(self, body: Request) -> str:
        """The request's method spec: the server's default, or the client's choice held to the
        server's policy, with the client's budget; raises :class:`ApiError` (400)."""
        options = body.draftwise
        try:
            if options is not None and options.method:
                spec = MethodSpec.parse(options.method)
                self.policy.check(spec)
                method = options.method
            else:
                method = self.method
            if options is not None and options.budget is not None:
                budget = parse_budget(options.budget)
                self.policy.check_budget(budget)
                method = f"{MethodSpec.parse(method).drafter}@{budget}"
            self.scheduler.check_method(method)
        except (UnknownMethodError, ValueError, OSError) as error:
            raise ApiError(400, str(error), param="draftwise.method") from error
        return method

    @staticmethod
    def _constraint_args(body: Request) -> dict[str, Any] | None:
        fmt = body.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"json_schema": {"type": "object"}, "whitespace": "flexible"}
        if fmt.json_schema is None:
            raise ApiError(400, "response_format json_schema needs a json_schema field",
                           param="response_format")
        return {"json_schema": fmt.json_schema.schema_, "whitespace": "flexible"}

    def health(self) -> tuple[int, dict[str, Any]]:
        """``(HTTP status, body)``: 503 once the scheduler's loop has died."""
        s = self.scheduler
        if s.failure is not None:
            return 503, {"status": "error", "model": self.model_id, "error": s.failure}
        return 200, {"status": "ok", "model": self.model_id, "active": s.active,
                     "queued": s.queue_depth}

    def metrics(self) -> str:
        """Prometheus text: requests, tokens, queue, steps and per-method acceptance."""
        s = self.scheduler
        lines = [
            "# HELP draftwise_requests_total HTTP requests by endpoint and status.",
            "# TYPE draftwise_requests_total counter",
            *(f'draftwise_requests_total{{endpoint="{e}",status="{c}"}} {n}'
              for (e, c), n in sorted(self.requests.items())),
            "# TYPE draftwise_prompt_tokens_total counter",
            f"draftwise_prompt_tokens_total {self.prompt_tokens}",
            "# HELP draftwise_prompt_tokens_cached_total Prompt tokens whose cache entries a"
            " slot held from its request before (reused, not computed).",
            "# TYPE draftwise_prompt_tokens_cached_total counter",
            f"draftwise_prompt_tokens_cached_total {s.cached_tokens}",
            "# TYPE draftwise_completion_tokens_total counter",
            f"draftwise_completion_tokens_total {self.completion_tokens}",
            "# TYPE draftwise_queue_depth gauge",
            f"draftwise_queue_depth {s.queue_depth}",
            "# TYPE draftwise_active_requests gauge",
            f"draftwise_active_requests {s.active}",
            "# HELP draftwise_steps_total Batched forward passes.",
            "# TYPE draftwise_steps_total counter",
            f"draftwise_steps_total {s.steps}",
            "# HELP draftwise_step_seconds Time in batched forward passes.",
            "# TYPE draftwise_step_seconds summary",
            f"draftwise_step_seconds_sum {s.step_seconds:.6f}",
            f"draftwise_step_seconds_count {s.steps}",
            "# HELP draftwise_step_rows_total Rows (roots and draft nodes) verified.",
            "# TYPE draftwise_step_rows_total counter",
            f"draftwise_step_rows_total {s.rows}",
            "# HELP draftwise_batch_size_steps_total Steps by the number of requests batched.",
            "# TYPE draftwise_batch_size_steps_total counter",
            *(f'draftwise_batch_size_steps_total{{size="{b}"}} {n}'
              for b, n in sorted(s.batch_sizes.items())),
            "# HELP draftwise_method_mat Mean tokens committed per request step.",
            "# TYPE draftwise_method_mat gauge",
            *(f'draftwise_method_mat{{method="{m}"}} {st.tokens / st.steps:.4f}'
              for m, st in sorted(s.methods.items()) if st.steps),
            "# HELP draftwise_method_acceptance Share of verified draft nodes accepted.",
            "# TYPE draftwise_method_acceptance gauge",
            *(f'draftwise_method_acceptance{{method="{m}"}} {st.accepted / st.drafted:.4f}'
              for m, st in sorted(s.methods.items()) if st.drafted),
        ]
        return "\n".join(lines) + "\n"
