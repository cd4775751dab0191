"""What a server lets clients choose: methods, option bounds, and no option naming a file."""

from __future__ import annotations

import pytest

from draftwise.method import MethodSpec
from draftwise.serve.policy import ClientPolicy, MethodRefused


def refusal(policy: ClientPolicy, spec: str) -> str:
    with pytest.raises(MethodRefused) as caught:
        policy.check(MethodSpec.parse(spec))
    return str(caught.value)


def test_options_naming_files_are_refused_alike_whether_or_not_the_file_exists() -> None:
    policy = ClientPolicy()
    for option in ("medusa:heads", "hydra:heads", "retrieval:datastore", "draft:model"):
        there = refusal(policy, f"{option}=/etc/hostname")
        missing = refusal(policy, f"{option}=/nonexistent/x")
        assert there == missing
        assert "names a file" in there and "/etc" not in there
    # a composite's parts are held to the same rules
    assert "names a file" in refusal(policy, "composite:parts=pld+retrieval:datastore=/etc/x")


def test_integer_options_and_budgets_are_bounded() -> None:
    policy = ClientPolicy(max_option=64)
    assert "max_ngram=2000" in refusal(policy, "pld:max_ngram=2000")
    assert "limit of 64" in refusal(policy, "pld@100000")
    assert "max_ngram=900" in refusal(policy, "composite:parts=pld:max_ngram=900;depth=4+aded")
    policy.check(MethodSpec.parse("pld:max_ngram=8,depth=6@32"))  # within bounds
    policy.check(MethodSpec.parse("composite:parts=pld:max_ngram=4;depth=6+recycling"))
    with pytest.raises(ValueError, match="max_option"):
        ClientPolicy(max_option=0)


def test_only_allowed_methods_are_offered() -> None:
    policy = ClientPolicy.of(["pld", " none", ""])
    assert policy.allowed == frozenset({"pld", "none"})
    assert "not offered" in refusal(policy, "aded")
    policy.check(MethodSpec.parse("pld@4"))
