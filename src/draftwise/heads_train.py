"""``draftwise train-heads``: train Medusa/Hydra draft heads on the target's own choices.

1. A corpus of conversations (default: the Python documentation topics that ship with CPython,
   ``pydoc_data.topics`` — nothing the bench measures), each encoded with the model's chat
   template (the topic's text as the assistant's answer), cut into chunks.
2. One pass of the target over each chunk, on the same backend and code path decoding uses,
   gives every position's final-normed hidden state h_t and the target's greedy choice
   ``y_t = argmax logits_t`` (the label: heads learn what the target would say, not the corpus).
   These features are cached, so a resumed or repeated run skips this pass.
3. Head k (0-based) learns, from h_t and (hydra) the embedding of the token x_{t+k+1} before
   its guess, the target's choice y_{t+k+1}: cross-entropy over the draft vocabulary (the
   ``vocab`` most frequent choices). Adam, a checkpoint after each epoch (``--resume`` continues
   from it), a time budget, and each epoch's held-out accuracy printed per head: top-1 (what
   rank 0 of that depth would accept) and the chained rate (heads 1..k all right at once).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from draftwise.drafters.heads import DraftHeads, target_fingerprint, target_rows
from draftwise.progress import progress_bar

__all__ = ["TrainConfig", "corpus", "extract_features", "train_heads"]


@dataclass(frozen=True)
class TrainConfig:
    """Attributes:
    kind: medusa or hydra.
    heads: number of heads (draft depth).
    vocab: draft vocabulary size (most frequent target choices).
    chunk: tokens per target pass.
    epochs: passes over the training positions.
    minutes: stop after this many minutes of training (features not counted).
    lr: Adam learning rate.
    batch: positions per optimizer step.
    held_out: share of conversations held out for evaluation.
    seed: seed of the split and the batch order.
    """

    kind: str = "hydra"
    heads: int = 3
    vocab: int = 4096
    chunk: int = 512
    epochs: int = 6
    minutes: float = 20.0
    lr: float = 3e-3
    batch: int = 512
    held_out: float = 0.1
    seed: int = 0


# Self-distillation prompts: templates over subjects. The answers are the target's own greedy
# output, so the heads learn the target's chat distribution (not the Spec-Bench questions, which
# are never read here).
_SUBJECTS = ("bread baking", "photosynthesis", "the French Revolution", "compound interest",
             "volcanoes", "a job interview", "time management", "the water cycle", "chess",
             "recursion", "vaccines", "solar panels", "a birthday party", "climate change",
             "the Roman Empire", "machine learning", "gardening", "public speaking", "black holes",
             "saving money", "a road trip", "electric cars", "sleep", "the stock market",
             "friendship", "coffee", "the ocean", "renewable energy", "a small business",
             "learning a language")
_TEMPLATES = ("Explain {s} to a beginner.", "Write a short story about {s}.",
              "Give three tips about {s}.", "What are the pros and cons of {s}?",
              "Write a short poem about {s}.", "Summarize the history of {s} in a paragraph.",
              "Write an email to a friend about {s}.", "What questions do people often ask "
              "about {s}? Answer two of them.")


def distill_prompts(count: int, seed: int = 0) -> list[str]:
    """At most ``count`` chat prompts: templates over subjects, Python documentation topics,
    and arithmetic word problems with random numbers (see the constants above)."""
    import pydoc_data.topics
    import random

    rng = random.Random(seed)
    prompts = [t.format(s=s) for t in _TEMPLATES for s in _SUBJECTS]
    topics = sorted(pydoc_data.topics.topics)
    prompts += [f"How do I use {t} in Python? Show an example." for t in topics]
    # paragraphs of the documentation as material: summarize, explain, rewrite, translate
    paragraphs = [p.strip() for text in pydoc_data.topics.topics.values()
                  for p in text.split("\n\n") if 200 <= len(p.strip()) <= 700]
    rng.shuffle(paragraphs)
    asks = ("Summarize this in two sentences:\n\n{p}", "Explain this in simple words:\n\n{p}",
            "Rewrite this more clearly:\n\n{p}", "What is the main point of this text?\n\n{p}",
            "Translate the first sentence to French:\n\n{p}",
            "Write one question a student could ask about this, and answer it:\n\n{p}")
    prompts += [asks[i % len(asks)].format(p=p) for i, p in enumerate(paragraphs)]
    for _ in range(count // 4):  # a quarter of them: arithmetic
        a, b, c = rng.randint(2, 90), rng.randint(2, 40), rng.randint(2, 12)
        prompts.append(rng.choice((
            f"A shop sells {a} apples on Monday and {b} more each day after that. How many "
            f"apples does it sell on day {c}? Think step by step.",
            f"Tom has {a} dollars. He spends {b} dollars and then earns {c} times as much as he "
            "spent. How much money does he have now? Explain.",
            f"A train travels {a * c} km in {c} hours. What is its average speed? Show your work.",
            f"What is {a} times {b} plus {c}? Explain each step.")))
    rng.shuffle(prompts)
    return prompts[:count]


# Prompts the target writes itself: a kind of request about a topic word drawn from its own
# vocabulary, sampled. Templates alone taught heads their templates' answers (held-out top-1
# 0.55, novel prompts 0.20-0.51); the model's own notion of what users ask spreads wider.
_REQUESTS = ("a question about", "a request to explain", "a request for advice about",
             "a math word problem involving", "a request to write a short story about",
             "a request to write a poem about", "a request to write Python code about",
             "a request to compare two kinds of", "a request to summarize facts about",
             "a request to translate a sentence about {w} into French", "a role-play request "
             "involving", "a request to brainstorm ideas about", "a history question about",
             "a science question about", "a request to write a formal email about",
             "a riddle about", "a request to plan a day around", "a request to list steps for")


def topic_words(tokenizer: Any, count: int, seed: int = 0) -> list[str]:
    """``count`` distinct lowercase words (5+ letters) from the tokenizer's vocabulary."""
    import random

    words = sorted({text.strip() for text in (tokenizer.decode([i]) for i in
                                              range(len(tokenizer)))
                    if text.startswith(" ") and text.strip().isalpha()
                    and text.strip().islower() and len(text.strip()) >= 5})
    random.Random(seed).shuffle(words)
    return words[:count]


def self_written_prompts(generator: Any, count: int, seed: int = 0, batch: int = 8,
                         progress: bool = True) -> list[str]:
    """``count`` user messages written by the target: for each, one of the request kinds above
    about a word of its vocabulary, sampled at temperature 0.9 / top-p 0.95 with its own seed;
    the first paragraph of each reply, when it has some words."""
    import random

    from draftwise.sampling import SamplingConfig

    rng = random.Random(seed)
    words = topic_words(generator.model.tokenizer, count, seed)
    asks = []
    for i in range(count):
        kind, word = rng.choice(_REQUESTS), words[i % len(words)]
        what = kind.format(w=word) if "{w}" in kind else f"{kind} {word}"
        asks.append(f"Write {what} that a user might send to an AI assistant. Reply with only "
                    "the user's message.")
    sampling = SamplingConfig(temperature=0.9, top_p=0.95)
    replies = _generate(generator, asks, 80, batch, "self-written prompts", "prompt", progress,
                        sampling=sampling, seed=seed)
    return [text for text in map(_user_message, replies) if text]


def _user_message(reply: str) -> str:
    """The message in a reply to "write a user's message": a quoted part of 4+ words if there
    is one, else the first paragraph of 4+ words that does not announce another (ends in ':')."""
    for quoted in re.findall(r'"([^"]{12,})"', reply):
        if len(quoted.split()) >= 4:
            return str(quoted).strip()
    for paragraph in reply.split("\n\n"):
        text = paragraph.strip().strip('"*').strip()
        if len(text.split()) >= 4 and not text.endswith(":"):
            return text
    return ""


def _generate(generator: Any, prompts: Sequence[str], max_new_tokens: int, batch: int,
              label: str, unit: str, progress: bool, sampling: Any = None,
              seed: int = 0) -> list[str]:
    """The target's replies to ``prompts`` (greedy unless ``sampling``; prompt i uses seed
    ``seed + i``), ``batch`` at a time through the server's scheduler."""
    from draftwise.method import MethodBuilder
    from draftwise.serve.scheduler import Job, Scheduler

    plain = MethodBuilder(generator.model, generator.backend, budget="off",
                          cache_dir=generator.cache_dir)
    scheduler = Scheduler(plain, batch, len(prompts))
    bar = progress_bar(len(prompts), label, enabled=progress, unit=unit)

    def done(event: Any) -> None:
        if event.finish_reason is not None:
            bar.update()

    jobs = [Job(generator.encode(p), generator.config(max_new_tokens=max_new_tokens,
                                                      sampling=sampling, seed=seed + i),
                "none", done) for i, p in enumerate(prompts)]
    scheduler.run_jobs(jobs)
    bar.close()
    tokenizer = generator.model.tokenizer
    return [tokenizer.decode(job.run.tokens, skip_special_tokens=True)
            if job.run is not None else "" for job in jobs]


def distill(generator: Any, prompts: Sequence[str], max_new_tokens: int, batch: int = 8,
            progress: bool = True) -> list[list[dict[str, str]]]:
    """Conversations whose answers are the target's own greedy output (generated ``batch`` at a
    time through the server's scheduler)."""
    answers = _generate(generator, prompts, max_new_tokens, batch, "self-distilled answers",
                        "answer", progress)
    return [[{"role": "user", "content": p}, {"role": "assistant", "content": a}]
            for p, a in zip(prompts, answers, strict=True) if a]


def corpus(data: str) -> list[list[dict[str, str]]]:
    """Conversations: ``pydoc`` (CPython's documentation topics) or a file (.jsonl with
    ``messages`` lists or ``text`` fields; else paragraphs of a text file)."""
    if data == "pydoc":
        import pydoc_data.topics

        return [[{"role": "user", "content": f"Explain the Python topic '{name}'."},
                 {"role": "assistant", "content": text.strip()}]
                for name, text in sorted(pydoc_data.topics.topics.items()) if text.strip()]
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"no corpus at {data!r}: give 'pydoc' or a .jsonl/.txt file")
    if path.suffix == ".jsonl":
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if "messages" in item:
                out.append(list(item["messages"]))
            else:
                out.append([{"role": "assistant", "content": str(item["text"])}])
        return out
    paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return [[{"role": "assistant", "content": p}] for p in paragraphs]


@dataclass
class Features:
    """Per chunk: tokens ``[T]``, hidden states ``[T, H]``, target choices ``[T]``."""

    tokens: list[torch.Tensor]
    hidden: list[torch.Tensor]
    labels: list[torch.Tensor]
    conversation: list[int]  # which conversation each chunk came from


@torch.inference_mode()
def extract_features(backend: Any, tokenizer: Any,
                     conversations: Sequence[Sequence[dict[str, str]]], chunk: int,
                     progress: bool = True) -> Features:
    """One target pass per chunk (see module docstring, step 2)."""
    encoded = []
    for i, messages in enumerate(conversations):
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(list(messages), tokenize=False)
            ids = tokenizer(text, add_special_tokens=False).input_ids
        else:
            ids = tokenizer("\n".join(m["content"] for m in messages)).input_ids
        for start in range(0, len(ids), chunk):
            piece = ids[start : start + chunk]
            if len(piece) >= 8:
                encoded.append((i, piece))
    features = Features([], [], [], [])
    bar = progress_bar(sum(len(p) for _, p in encoded), "target pass over the corpus",
                       enabled=progress, unit="tok")
    for i, piece in encoded:
        ids = torch.tensor(piece, dtype=torch.long)
        backend._reset_cache()
        logits = backend._forward(ids, torch.arange(len(ids)), None, last_only=False)
        hidden = backend._hidden
        if hidden is None:
            raise ValueError("draft heads need the fast or quant backend")
        features.tokens.append(ids)
        features.hidden.append(hidden.float().clone())
        features.labels.append(logits.argmax(dim=-1))
        features.conversation.append(i)
        bar.update(len(piece))
    bar.close()
    backend._reset_cache()
    return features


def _examples(features: Features, chunks: Sequence[int], heads: int, index: dict[int, int]
              ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per head k: (row of h_t in the stacked hidden states, prev token, label in the draft
    vocabulary or -100), over ``chunks``."""
    offsets, total = [], 0
    for hidden in features.hidden:
        offsets.append(total)
        total += hidden.shape[0]
    lookup = torch.full((max(index) + 1 if index else 1,), -100, dtype=torch.long)
    for token, i in index.items():
        lookup[token] = i
    out = []
    for k in range(heads):
        rows, prev, labels = [], [], []
        for c in chunks:  # the same positions t for every head (the chained rate needs it)
            n = features.tokens[c].shape[0] - heads
            if n <= 0:
                continue
            rows.append(offsets[c] + torch.arange(n))
            prev.append(features.tokens[c][k + 1 : k + 1 + n])
            label = features.labels[c][k + 1 : k + 1 + n]
            mapped = torch.full_like(label, -100)
            inside = label < lookup.shape[0]
            mapped[inside] = lookup[label[inside]]
            labels.append(mapped)
        out.append((torch.cat(rows), torch.cat(prev), torch.cat(labels)))
    return out


def train_heads(backend: Any, tokenizer: Any, model_name: str, data: str, out: Path,
                config: TrainConfig, cache_dir: Path, resume: bool = False,
                progress: bool = True,
                extra: Sequence[Sequence[dict[str, str]]] = ()) -> dict[str, Any]:
    """Train heads for the model on ``backend`` and write them to ``out`` (see module).
    ``extra``: more conversations (self-distilled answers, see :func:`distill`)."""
    torch.manual_seed(config.seed)
    conversations = [*corpus(data), *extra]
    key = hashlib.sha256(json.dumps([model_name, data, config.chunk, conversations,
                                     backend.capabilities.cost_tag]).encode()).hexdigest()[:16]
    cached = cache_dir / "heads" / f"features-{key}.pt"
    if cached.is_file():
        features = Features(**torch.load(cached))
        if progress:
            print(f"draftwise: target features from {cached}", file=sys.stderr)
    else:
        features = extract_features(backend, tokenizer, conversations, config.chunk, progress)
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(asdict(features), cached.with_suffix(".partial"))
        cached.with_suffix(".partial").rename(cached)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(conversations), generator=generator).tolist()
    held = set(order[: max(1, int(len(conversations) * config.held_out))])
    train_chunks = [c for c, i in enumerate(features.conversation) if i not in held]
    test_chunks = [c for c, i in enumerate(features.conversation) if i in held]
    counts = torch.bincount(torch.cat([features.labels[c] for c in train_chunks]),
                            minlength=backend.vocab_size)
    vocab = torch.argsort(counts, descending=True, stable=True)[: config.vocab]
    index = {int(t): i for i, t in enumerate(vocab)}
    lm_rows, embed = target_rows(backend, vocab)
    meta = {"model": model_name, "vocab_size": backend.vocab_size,
            "data": data + (f" + {len(extra)} self-distilled answers" if extra else ""),
            "fingerprint": target_fingerprint(lm_rows), "config": json.dumps(asdict(config))}
    heads = DraftHeads(config.kind, config.heads, lm_rows.shape[1], vocab, meta)
    optimizer = torch.optim.Adam(heads.parameters(), lr=config.lr)
    checkpoint = out.with_name(out.name + ".ckpt")
    start_epoch = 0
    if resume and checkpoint.is_file():
        state = torch.load(checkpoint)
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"]
        if progress:
            print(f"draftwise: resuming after epoch {start_epoch}", file=sys.stderr)
    hidden = torch.cat(features.hidden)
    train = _examples(features, train_chunks, config.heads, index)
    test = _examples(features, test_chunks, config.heads, index)
    with torch.inference_mode():
        prev_all = embed(torch.arange(backend.vocab_size))  # every token's input embedding
    history = []
    began = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        heads.train()
        count = len(train[0][0])
        perm = torch.randperm(count, generator=generator)
        steps = (count + config.batch - 1) // config.batch
        bar = progress_bar(steps, f"epoch {epoch + 1}/{config.epochs}", enabled=progress,
                           unit="step")
        total = 0.0
        for s in range(steps):
            pick = perm[s * config.batch : (s + 1) * config.batch]
            loss = torch.zeros(())
            for k, (rows, prev, labels) in enumerate(train):
                logits = heads.logits(k, hidden[rows[pick]], prev_all[prev[pick]], lm_rows)
                loss = loss + F.cross_entropy(logits, labels[pick], ignore_index=-100)
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += float(loss.detach())
            bar.update()
        bar.close()
        accuracy = evaluate(heads, hidden, test, prev_all, lm_rows)
        history.append({"epoch": epoch + 1, "train_loss": total / steps, **accuracy})
        if progress:
            top1 = " ".join(f"{a:.3f}" for a in accuracy["top1"])
            chained = " ".join(f"{a:.3f}" for a in accuracy["chained"])
            print(f"draftwise: epoch {epoch + 1}: train loss {total / steps:.3f}, held-out top-1 "
                  f"per head [{top1}], chained [{chained}]", file=sys.stderr, flush=True)
        torch.save({"heads": heads.state_dict(), "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1}, checkpoint)
        if time.perf_counter() - began > config.minutes * 60:
            break
    heads.meta["history"] = json.dumps(history)
    heads.save(out)
    return {"history": history, "positions": len(train[0][0]), "held_out": len(test[0][0]),
            "draft_vocab": int(vocab.numel()), "train_s": time.perf_counter() - began}


@torch.inference_mode()
def evaluate(heads: DraftHeads, hidden: torch.Tensor,
             test: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
             prev_all: torch.Tensor, lm_rows: torch.Tensor) -> dict[str, Any]:
    """Held-out top-1 accuracy per head, and the chained rate (heads 1..k all right at the
    same position, each given the true previous token), plus the loss."""
    heads.eval()
    top1, chained, losses = [], [], []
    right_so_far: torch.Tensor | None = None
    for k, (rows, prev, labels) in enumerate(test):
        count = len(rows)
        logits = torch.cat([heads.logits(k, hidden[rows[i : i + 4096]],
                                         prev_all[prev[i : i + 4096]], lm_rows)
                            for i in range(0, count, 4096)])
        right = logits.argmax(dim=-1) == labels
        losses.append(float(F.cross_entropy(logits, labels, ignore_index=-100)))
        top1.append(float(right.float().mean()))
        right_so_far = right if right_so_far is None else right_so_far & right
        chained.append(float(right_so_far.float().mean()))
    return {"top1": top1, "chained": chained, "held_out_loss": losses}
