"""OpenAI's wire format: error bodies, choices, usage, logprobs and stream chunks.

Plain functions from what a request produced (:class:`Choice`: its text, tokens, logprobs and
finish reason) to the JSON objects OpenAI's API returns. Nothing here knows the scheduler, the
model or HTTP; a ``piece`` function turns one token id into its text where logprobs need it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse

__all__ = ["ApiError", "Choice", "LogprobEntry", "choice_body", "chunk", "delta", "error_chunk",
           "finish_reason", "logprobs_object", "usage"]

LogprobEntry = tuple[int, float, list[tuple[int, float]]]  # (token, logprob, alternatives)
Piece = Callable[[int], str]


class ApiError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


@dataclass
class Choice:
    """What one choice of a request has produced so far.

    Attributes:
        index: the choice's index in the reply.
        logprobs_wanted: the request asked for logprobs.
        method: the method that decoded it; steps, cached: its engine's counts.
    """

    index: int
    logprobs_wanted: bool = False
    text: str = ""
    tokens: int = 0
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None
    method: str = ""
    steps: int = 0
    cached_tokens: int = 0
    prediction: tuple[int, int] | None = None  # (accepted, rejected) predicted tokens


def finish_reason(reason: str | None) -> str | None:
    """OpenAI's name for an engine's finish reason (``eos`` -> ``stop``, ``context`` ->
    ``length``)."""
    if reason is None:
        return None
    return {"eos": "stop", "context": "length"}.get(reason, reason)


def logprobs_object(choice: Choice, entries: list[LogprobEntry], chat: bool,
                    piece: Piece) -> dict[str, Any] | None:
    """OpenAI's logprobs object for ``entries``, or None when the request did not ask for
    logprobs (chat: ``content`` items with ``top_logprobs``; completions: parallel lists)."""
    if not choice.logprobs_wanted:
        return None
    if chat:
        def item(token: int, lp: float) -> dict[str, Any]:
            text = piece(token)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {"content": [{**item(t, lp), "top_logprobs": [item(a, b) for a, b in top]}
                            for t, lp, top in entries]}
    pieces = [piece(t) for t, _, _ in entries]
    offsets, at = [], 0
    for text in pieces:
        offsets.append(at)
        at += len(text)
    return {"tokens": pieces, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{piece(a): b for a, b in top} for _, _, top in entries],
            "text_offset": offsets}


def choice_body(choice: Choice, chat: bool, piece: Piece) -> dict[str, Any]:
    """One finished choice of a non-streamed reply."""
    reason = finish_reason(choice.finish_reason)
    logprobs = logprobs_object(choice, choice.logprobs, chat, piece)
    if chat:
        return {"index": choice.index, "finish_reason": reason, "logprobs": logprobs,
                "message": {"role": "assistant", "content": choice.text}}
    return {"index": choice.index, "text": choice.text, "finish_reason": reason,
            "logprobs": logprobs}


def usage(choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
    """The ``usage`` object: token counts, the prompt's cached tokens and draftwise's own
    (steps, MAT, method)."""
    completion = sum(c.tokens for c in choices)
    steps = sum(c.steps for c in choices)
    details: dict[str, Any] = {}
    predicted = [c.prediction for c in choices if c.prediction is not None]
    if predicted:
        details = {"accepted_prediction_tokens": sum(a for a, _ in predicted),
                   "rejected_prediction_tokens": sum(r for _, r in predicted)}
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": choices[0].cached_tokens},
            "completion_tokens_details": details,
            "draftwise": {"steps": steps, "mat": round(completion / steps, 4) if steps else 0.0,
                          "method": choices[0].method}}


def chunk(rid: str, kind: str, created: int, model: str, choices: list[dict[str, Any]],
          usage_object: dict[str, Any] | None = None) -> str:
    """One Server-Sent Event of a stream."""
    payload: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model,
                               "choices": choices}
    if usage_object is not None:
        payload["usage"] = usage_object
    return f"data: {json.dumps(payload)}\n\n"


def delta(choice: Choice, text: str, reason: str | None, logprobs: dict[str, Any] | None,
          chat: bool) -> dict[str, Any]:
    """A stream chunk's item for one choice: its new text and, at the end, its reason."""
    if chat:
        return {"index": choice.index, "delta": {"content": text} if text else {},
                "finish_reason": finish_reason(reason), "logprobs": logprobs}
    return {"index": choice.index, "text": text, "finish_reason": finish_reason(reason),
            "logprobs": logprobs}


def error_chunk(message: str) -> str:
    """A stream's event for an error that ended a choice after its first bytes were sent."""
    return "data: " + json.dumps({"error": {"message": message, "type": "server_error"}}) + "\n\n"
