"""The OpenAI request bodies the server accepts (pydantic): what is checked, and how.

Unknown fields are ignored, as OpenAI's own server does for fields it has no use for; a field
it knows with a bad value is an HTTP 400 with an OpenAI-style error body. ``draftwise`` is
this server's extra field: ``{"method": "pld", "budget": "auto" | "off" | N, "cache_prompt":
true, "deadline_s": S}`` (``cache_prompt``, llama-server's name: whether the request may reuse
a cached prefix, default true; ``deadline_s``: the request ends, finish reason ``length``, once
it has run that long). ``cache_salt`` (vLLM's name): requests reuse cached prefixes only with
requests of the same salt (and, with API keys, of the same key). A positive ``temperature``
below :data:`MIN_TEMPERATURE` is greedy; ``seed`` is any 64-bit integer, signed or not.
``prediction`` (OpenAI's Predicted Outputs): text the output is expected to resemble, drafted
from; ``usage.completion_tokens_details`` then counts its accepted and rejected tokens.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["MIN_TEMPERATURE", "ChatRequest", "CompletionRequest", "DraftwiseOptions",
           "ResponseFormat"]

MIN_TEMPERATURE = 1e-5  # a smaller positive temperature is greedy


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class DraftwiseOptions(_Body):
    method: str | None = Field(default=None, max_length=512)
    budget: str | int | None = None
    cache_prompt: bool = True
    deadline_s: float | None = Field(default=None, gt=0.0, le=86_400.0)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class JsonSchemaFormat(_Body):
    name: str = "output"
    schema_: dict[str, Any] | bool = Field(default=True, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class PredictionContent(_Body):
    """OpenAI's ``prediction``: ``{"type": "content", "content": text or text parts}``."""

    type: Literal["content"]
    content: str | list[TextPart] = Field(max_length=1 << 20)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    # a vLLM name: requests with different salts never share cached prompt prefixes
    cache_salt: str | None = Field(default=None, max_length=256)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=16)
    response_format: ResponseFormat | None = None
    ignore_eos: bool = False  # as vLLM and llama-server: generate max_tokens whatever comes
    draftwise: DraftwiseOptions | None = None
    prediction: PredictionContent | None = None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        # below this, logits / temperature leaves float32's range and the distribution is its
        # argmax to within float32 anyway: decode greedily
        return 0.0 if value < MIN_TEMPERATURE else value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The content as text (a list of parts: their ``text`` parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @property
    def alternatives(self) -> int | None:
        """Alternatives per token to report, or None for no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[int]
    echo: bool = False
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=5)

    @property
    def alternatives(self) -> int | None:
        return self.logprobs
