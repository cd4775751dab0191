"""What a server lets its clients ask for: which methods, with which options, within what bounds.

A client's method spec is read like any other (:class:`~draftwise.method.MethodSpec`), then held
to the server's :class:`ClientPolicy` before anything is built: only the methods the server
allows; no option that names a file or folder (only the server's own flags may name files, and
the refusal reads the same whether or not such a file exists); every integer option and the
budget at most ``max_option`` (an n-gram length or a tree budget sizes per-request state).
Composite parts are held to the same rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from draftwise.drafters.base import UnknownMethodError, drafter_config, file_options, parse_method
from draftwise.method import MethodSpec

__all__ = ["ClientPolicy", "MethodRefused"]


class MethodRefused(UnknownMethodError):
    """A method or option this server does not let clients choose."""


@dataclass(frozen=True)
class ClientPolicy:
    """Attributes:
    allowed: method names clients may pick (empty: every method the server can run).
    max_option: the largest integer option value (and ``@N`` budget) a client may set.
    """

    allowed: frozenset[str] = frozenset()
    max_option: int = 64

    def __post_init__(self) -> None:
        if self.max_option < 1:
            raise ValueError(f"max_option must be >= 1, got {self.max_option}")

    @classmethod
    def of(cls, allowed: Iterable[str] = (), max_option: int = 64) -> ClientPolicy:
        return cls(frozenset(m.strip() for m in allowed if m.strip()), max_option)

    def check(self, spec: MethodSpec) -> None:
        """Raise :class:`MethodRefused` unless a client may run ``spec``."""
        if self.allowed and spec.name not in self.allowed:
            raise MethodRefused(f"method {spec.name!r} is not offered by this server; it offers "
                                f"{', '.join(sorted(self.allowed))}")
        if spec.budget is not None:
            self.check_budget(spec.budget)
        self._check_drafter(spec.drafter)

    def check_budget(self, budget: int | str) -> None:
        """Raise :class:`MethodRefused` for a node count above ``max_option``."""
        if isinstance(budget, int) and budget > self.max_option:
            raise MethodRefused(f"budget {budget} is above this server's limit of "
                                f"{self.max_option}")

    def _check_drafter(self, drafter: str) -> None:
        name, options = parse_method(drafter)
        for key in options:
            if key in file_options(name):
                raise MethodRefused(f"method option {name}:{key} names a file on the server; "
                                    "only the server's own flags may name files")
        config = drafter_config(drafter)
        for key in options:
            value = getattr(config, key)
            if isinstance(value, int) and not isinstance(value, bool) and value > self.max_option:
                raise MethodRefused(f"method option {name}:{key}={value} is above this "
                                    f"server's limit of {self.max_option}")
        for f in dataclasses.fields(config):  # a composite's parts, held to the same rules
            if f.metadata.get("methods"):
                for part in getattr(config, f.name):
                    self._check_drafter(str(part).replace(";", ","))
