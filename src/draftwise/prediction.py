"""Predicted outputs: a text the caller expects the output to resemble, as a draft source.

OpenAI's ``prediction`` field (Predicted Outputs): when most of an answer is known in advance —
a file regenerated with small changes, a document rewritten, JSON filled from a source — the
known text can be verified many tokens per step instead of decoded one by one. The prediction
never changes the output: it only adds a chain of draft nodes, which the target verifies like
any other draft.

:class:`Prediction` keeps a *cursor*: the position in the predicted tokens that the output is
expected to continue with. While the output follows the prediction the cursor advances with it;
where the output departs (an edit), the cursor is lost until the output's last ``anchor``
tokens occur in the prediction again — the occurrence nearest at or after the old cursor is
taken, so an insertion rejoins where it left and a deletion skips ahead, as a diff would. Each
step proposes the predicted tokens after the cursor as one chain. The engine merges that chain
with the method's own tree (the chain first), so the prediction composes with every drafter.

Counts, as OpenAI reports them: ``accepted`` prediction tokens are drafted chain tokens the
target accepted; ``rejected`` are the prediction's other tokens (``len(tokens) - accepted``).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["Prediction"]


class Prediction:
    """A predicted output aligned with the output as it grows.

    Parameters:
        tokens: the predicted output's token ids.
        anchors: suffix lengths tried, longest first, when re-aligning after a departure.
    """

    def __init__(self, tokens: Sequence[int], anchors: Sequence[int] = (8, 4, 3)) -> None:
        if any(k < 1 for k in anchors):
            raise ValueError(f"anchor lengths must be >= 1, got {tuple(anchors)}")
        self.tokens = [int(t) for t in tokens]
        self.anchors = tuple(sorted(set(anchors), reverse=True))
        # k-gram -> the positions just after each occurrence, ascending
        self._index: dict[int, dict[tuple[int, ...], list[int]]] = {
            k: {} for k in self.anchors}
        for k in self.anchors:
            for end in range(k, len(self.tokens) + 1):
                self._index[k].setdefault(tuple(self.tokens[end - k:end]), []).append(end)
        self.cursor: int | None = 0  # None: lost (the output departed from the prediction)
        self._departed = 0  # where the cursor was when the output last departed
        self._seen = 0  # output tokens the cursor has followed
        self.accepted = 0

    @property
    def rejected(self) -> int:
        """Prediction tokens that did not appear in the output as accepted drafts."""
        return max(0, len(self.tokens) - self.accepted)

    def propose(self, output: Sequence[int], max_depth: int) -> list[int]:
        """The predicted tokens expected after ``output`` (the tokens generated so far), at
        most ``max_depth`` of them; empty while the output has departed from the prediction."""
        self._follow(output)
        if self.cursor is None or max_depth <= 0:
            return []
        return self.tokens[self.cursor:self.cursor + max_depth]

    def _follow(self, output: Sequence[int]) -> None:
        """Move the cursor along the output's new tokens; re-align after a departure."""
        for token in output[self._seen:]:
            if (self.cursor is not None and self.cursor < len(self.tokens)
                    and self.tokens[self.cursor] == token):
                self.cursor += 1
            else:
                if self.cursor is not None:
                    self._departed = self.cursor
                self.cursor = None
        self._seen = len(output)
        if self.cursor is None:
            self.cursor = self._realign(output)

    def _realign(self, output: Sequence[int]) -> int | None:
        """Just after the latest occurrence in the prediction of the output's last tokens (the
        longest anchor found), preferring occurrences at or after where the cursor was."""
        for k in self.anchors:
            if len(output) < k:
                continue
            ends = self._index[k].get(tuple(output[-k:]))
            if ends:
                ahead = [end for end in ends if end >= self._departed]
                return ahead[0] if ahead else ends[-1]
        return None
