"""The self-distillation prompts the target writes itself: which part of a reply is kept, and
which vocabulary entries serve as topics."""

from __future__ import annotations

from draftwise.heads_train import _user_message, topic_words


def test_a_quoted_message_is_taken_over_the_text_around_it() -> None:
    reply = 'Sure! A user might send: "Can you explain why the sky looks blue at noon?" Thanks.'
    assert _user_message(reply) == "Can you explain why the sky looks blue at noon?"


def test_a_paragraph_announcing_the_message_is_skipped() -> None:
    reply = "Here is a math word problem:\n\nA farmer has 3 cows and buys 5 more. How many?"
    assert _user_message(reply) == "A farmer has 3 cows and buys 5 more. How many?"


def test_replies_without_a_message_give_nothing() -> None:
    assert _user_message("Okay.") == ""
    assert _user_message('Here is one "hi there" for you:') == ""  # short quote, announcement


class _Vocabulary:
    pieces = [" apple", " Paris", " running", "ing", " x", " harbor", " 12345", " glacier",
              "harbor", " harbor"]

    def __len__(self) -> int:
        return len(self.pieces)

    def decode(self, ids: list[int]) -> str:
        return self.pieces[ids[0]]


def test_topic_words_are_distinct_lowercase_words_of_five_letters_or_more() -> None:
    words = topic_words(_Vocabulary(), 10, seed=0)
    assert sorted(words) == ["apple", "glacier", "harbor", "running"]
    assert topic_words(_Vocabulary(), 2, seed=0) == words[:2]
