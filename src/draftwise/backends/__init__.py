"""Backends: a model and its KV cache, stepping a draft tree per forward pass."""

from draftwise.backends.base import Backend, KVBackend, PromptTooLongError

__all__ = ["Backend", "KVBackend", "PromptTooLongError"]
