"""Text of a growing token list, piece by piece, cut before the first stop string.

:class:`TextTracker` is how generated tokens become streamed text: the library's
:class:`~draftwise.api.Generator` and the server's scheduler both use it. It knows a tokenizer
(anything with ``decode(ids, skip_special_tokens=True)``) and nothing of models or methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["TextTracker"]


class TextTracker:
    """The text of a growing token list, piece by piece, cut before the first stop string.

    :meth:`update` after each step returns the new text and whether a stop string appeared.
    Held back until the next tokens decide: a multi-byte character split across tokens, and a
    tail that begins a stop string (so no piece ever shows part of one; it is released if the
    stop string does not follow, or at :meth:`final`). :attr:`text` is what the pieces have
    given so far.

    Each update decodes only a window: the tokens read last time (the decoder's context: a
    leading space, a merge) and the new ones, and keeps what the new ones add to the window's
    text — decoding the whole list each step would cost O(length) per token, and a server pays
    it for every request. Where the window's text does not
    extend its context's text (a decoder that revises earlier text: rare), that update decodes
    everything and the pieces resync silently; :meth:`final` decodes everything once, so
    :attr:`text` ends as the true decode."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.longest = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self._decoded = ""  # tokens[:_read] decoded (cut at a stop string)
        self._context = 0  # tokens[_context:_read]: the window's context
        self._read = 0

    def update(self, tokens: Sequence[int]) -> tuple[str, bool]:
        # a context of special tokens alone decodes to nothing, and the next word would lose
        # its leading space: reach back to a token that has text
        before = self._decode(tokens[self._context : self._read])
        while not before and self._context > 0:
            self._context -= 1
            before = self._decode(tokens[self._context : self._read])
        window = self._decode(tokens[self._context :])
        if window.startswith(before):
            decoded = self._decoded + window[len(before) :]
        else:  # the decoder revised the context: resync on the whole text
            decoded = self._decode(tokens)
        start = max(0, len(self._decoded) - self.longest)
        hits = [i for s in self.stop if (i := decoded.find(s, start)) >= 0]
        if hits:
            decoded = decoded[: min(hits)]
        elif decoded.endswith("\ufffd"):
            return "", False  # a multi-byte character is split across tokens: wait for the rest
        self._decoded, self._context, self._read = decoded, self._read, len(tokens)
        ready = decoded if hits else decoded[: len(decoded) - self._stop_prefix(decoded)]
        return self._advance(ready), bool(hits)

    def final(self, tokens: Sequence[int]) -> str:
        """What is left once the run has ended (held-back text included)."""
        return self._advance(self._decode(tokens))

    def _stop_prefix(self, text: str) -> int:
        """The length of the longest tail of ``text`` that a stop string begins with."""
        for k in range(min(self.longest - 1, len(text)), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop):
                return k
        return 0

    def _decode(self, tokens: Sequence[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True)) if tokens else ""

    def _advance(self, text: str) -> str:
        piece = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text = text
        return piece
