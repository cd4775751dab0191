"""TextTracker: pieces from a window of tokens add up to the whole list's decode."""

from __future__ import annotations

import random
from collections.abc import Sequence

from draftwise.text import TextTracker


class Bytes:
    """A byte-level tokenizer: token i is byte i (a multi-byte character spans tokens)."""

    def __init__(self, cleanup: bool = False) -> None:
        self.cleanup = cleanup
        self.calls: list[int] = []

    def decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.calls.append(len(tokens))
        text = bytes(tokens).decode("utf-8", errors="replace")
        # like transformers' clean_up_tokenization: the text of " ." depends on its neighbour
        return text.replace(" .", ".") if self.cleanup else text


def _feed(tokenizer: Bytes, text: str, seed: int, stop: tuple[str, ...] = ()
          ) -> tuple[list[str], TextTracker, bool]:
    ids = list(text.encode())
    rng = random.Random(seed)
    tracker, pieces, n, stopped = TextTracker(tokenizer, stop), [], 0, False
    while n < len(ids) and not stopped:
        n = min(len(ids), n + rng.randint(1, 3))
        piece, stopped = tracker.update(ids[:n])
        pieces.append(piece)
        assert "\ufffd" not in tracker.text  # split characters are held back
        if not tokenizer.cleanup:
            assert "".join(pieces) == tracker.text
            # no piece shows a stop string, nor the beginning of one before it is decided
            assert not any(tracker.text.endswith(s[:k])
                           for s in stop for k in range(1, len(s) + 1))
    if not stopped:
        pieces.append(tracker.final(ids))
    return pieces, tracker, stopped


def test_pieces_add_up_to_the_whole_decode_and_split_characters_wait() -> None:
    text = "Grüße aus Zürich! 你好，世界。 🤖🚀 and plain ASCII to end."
    for seed in range(30):
        pieces, tracker, _ = _feed(Bytes(), text, seed)
        assert "".join(pieces) == text == tracker.text


def test_each_update_decodes_a_window_not_the_whole_list() -> None:
    tokenizer = Bytes()
    text = "x" * 3000
    _feed(tokenizer, text, 0)
    *updates, last = tokenizer.calls  # the final decode reads everything once
    assert last == 3000
    assert max(updates) <= 6  # (context + new tokens: two steps of at most 3)


def test_a_decoder_that_revises_its_context_resyncs() -> None:
    # " ." becomes "." once the dot arrives: the window's text no longer extends its context
    text = "one . two . three ."
    for seed in range(20):
        pieces, tracker, _ = _feed(Bytes(cleanup=True), text, seed)
        assert tracker.text == "one. two. three."


def test_a_stop_string_across_pieces_cuts_the_text_and_no_piece_shows_part_of_it() -> None:
    for seed in range(20):
        pieces, tracker, stopped = _feed(Bytes(), "alpha STAR beta STOP gamma", seed,
                                         stop=("STOP",))
        assert stopped
        assert tracker.text == "".join(pieces) == "alpha STAR beta "


def test_a_held_tail_is_released_at_the_end() -> None:
    pieces, tracker, stopped = _feed(Bytes(), "ends with ST", 0, stop=("STOP",))
    assert not stopped
    assert "".join(pieces) == tracker.text == "ends with ST"


class Words:
    """A word-level tokenizer that joins words with spaces and skips special tokens, as
    transformers' WordLevel tokenizers decode (token 0 is special)."""

    def decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return " ".join(f"w{t}" for t in tokens if t != 0 or not skip_special_tokens)


def test_a_special_token_between_words_keeps_their_space() -> None:
    """A window whose context is only special tokens decodes to nothing, which lost the space
    before the next word ('w5w7'); the context now reaches back to a token with text."""
    ids = [3, 5, 0, 7, 9]
    whole = Words().decode(ids)
    for steps in ([1] * 5, [2, 1, 2], [3, 2], [1, 2, 1, 1]):
        tracker, pieces, n = TextTracker(Words()), [], 0
        for step in steps:
            n += step
            pieces.append(tracker.update(ids[:n])[0])
        pieces.append(tracker.final(ids))
        assert "".join(pieces) == whole == "w3 w5 w7 w9", steps
