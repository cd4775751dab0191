"""The server's scheduler shares a prompt prefix across slots (real default model, slow)."""

from __future__ import annotations

import pytest

from draftwise.api import Generator
from draftwise.engine import GenerationConfig
from draftwise.models import load_model
from draftwise.serve.scheduler import Event, Job, Scheduler

pytestmark = pytest.mark.slow

SYSTEM = ("You are a careful assistant for a hardware store. Answer in one or two short "
          "sentences, name the aisle when you can, and never invent a product. Aisles: 1 "
          "paint, 2 tools, 3 garden, 4 plumbing, 5 electrical, 6 fasteners.")
QUESTIONS = ["Where are the hammers?", "Do you sell garden hoses?", "I need wood screws.",
             "Where is the light bulb aisle?"]


def _run(generator: Generator, prompts: list[list[int]], cache: bool, max_batch: int
         ) -> tuple[list[list[int]], int]:
    scheduler = Scheduler(generator.methods, max_batch=max_batch)
    config = GenerationConfig(max_new_tokens=24, eos_token_ids=tuple(generator.model.eos_token_ids))
    errors: list[Event] = []
    jobs = [Job(list(p), config, "pld", lambda e: errors.append(e) if e.error else None,
                cache_prompt=cache) for p in prompts]
    scheduler.run_jobs(jobs)
    assert not errors
    return [list(job.run.tokens) for job in jobs if job.run is not None], scheduler.cached_tokens


def test_requests_sharing_a_system_prompt_copy_it_and_answer_as_alone() -> None:
    generator = Generator(load_model("default", progress=False), "none", backend="auto")
    if not generator.backend.capabilities.reuses_prefix:
        pytest.skip("this backend does not reuse a cached prefix exactly")
    prompts = [generator.encode_chat([{"role": "system", "content": SYSTEM},
                                      {"role": "user", "content": q}]) for q in QUESTIONS]
    shared = min(next(i for i, (a, b) in enumerate(zip(prompts[0], p, strict=False)) if a != b)
                 for p in prompts[1:])
    assert shared > 40  # (the template and the system message)
    alone, none_cached = _run(generator, prompts, cache=False, max_batch=3)
    assert none_cached == 0
    # three running at once copy from the first; the fourth from a running or a free slot
    together, cached = _run(generator, prompts, cache=True, max_batch=3)
    assert together == alone
    assert cached >= 3 * shared
