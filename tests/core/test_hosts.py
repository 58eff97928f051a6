"""`match.host`: Envoy's virtual-host domain forms, case-insensitive, port ignored unless written."""

import pytest

from sidecar.core import Request, steer
from sidecar.core.hosts import host_matcher, host_problem, split_port
from tests.helpers import table_from_rules


@pytest.mark.parametrize(
    ("pattern", "authority", "expected"),
    [
        ("api.example.com", "api.example.com", True),
        ("api.example.com", "API.Example.COM", True),  # case-insensitive
        ("API.example.com", "api.example.com", True),
        ("api.example.com", "api.example.com:8080", True),  # port ignored unless written
        ("api.example.com", "www.example.com", False),
        ("api.example.com:8443", "api.example.com:8443", True),
        ("api.example.com:8443", "api.example.com:80", False),
        ("api.example.com:8443", "api.example.com", False),
        ("*.example.com", "a.example.com", True),  # suffix wildcard
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "a.example.com:9000", True),
        ("*.example.com", "example.com", False),  # never the empty string
        ("*.example.com", ".example.com", False),
        ("*-api.example.com", "eu-api.example.com", True),
        ("*-api.example.com", "-api.example.com", False),
        ("example.*", "example.org", True),  # prefix wildcard
        ("example.*", "example.org:8080", True),
        ("example.*", "example.", False),
        ("example.*", "www.example.org", False),
        ("*", "anything:1", True),
        ("[::1]", "[::1]:8080", True),  # IPv6 literals keep their brackets
        ("[::1]:8080", "[::1]:8080", True),
        ("[::1]:8080", "[::1]:9090", False),
        ("10.0.0.1", "10.0.0.1:80", True),
    ],
)
def test_host_forms(pattern: str, authority: str, expected: bool) -> None:
    assert host_problem(pattern) is None
    assert host_matcher([pattern])(authority) is expected


def test_no_authority_matches_nothing() -> None:
    assert not host_matcher(["*"])(None) and not host_matcher(["*"])("")


def test_any_of_several_patterns() -> None:
    matches = host_matcher(["a.example.com", "*.test", "beta.*"])
    assert matches("a.example.com") and matches("x.test") and matches("beta.io")
    assert not matches("b.example.com")


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("", "not a host pattern"),
        ("a.*.com", "first or last character"),
        ("*.*", "first or last character"),
        ("**", "first or last character"),
        ("api.example.com:http", "not a number"),
        ("api.example.com:\u0668\u0660", "not a number"),  # ASCII digits only
        ("http://api.example.com", "not a host pattern"),
        ("api.example.com/path", "not a host pattern"),
        (" api.example.com", "not a host pattern"),
    ],
)
def test_bad_patterns(pattern: str, problem: str) -> None:
    found = host_problem(pattern)
    assert found is not None and problem in found


def test_split_port() -> None:
    assert split_port("a:1") == ("a", "1") and split_port("a") == ("a", None)
    assert split_port("[::1]:2") == ("[::1]", "2") and split_port("[::1]") == ("[::1]", None)
    assert split_port("::1") == ("::1", None)  # a bare IPv6 literal has no port


def test_a_host_rule_reads_authority_and_host_alike() -> None:
    table = table_from_rules([{"name": "beta-host", "match": {"host": "beta.*"}, "route": "canary"}])
    assert steer(table, Request({":authority": "beta.shop.io"})).decision.rule == "beta-host"
    assert steer(table, Request({"host": "beta.shop.io:443"})).decision.rule == "beta-host"
    assert steer(table, Request({":authority": "shop.io"})).decision.rule == "default"


def test_a_bad_host_pattern_is_refused_with_the_rule_and_field_named() -> None:
    from sidecar.core import RulesError

    with pytest.raises(RulesError, match=r"rule 'h' \(rules\[0\]\) field match.host\[1\]: a wildcard"):
        table_from_rules([{"name": "h", "match": {"host": ["ok.example.com", "a.*.b"]}, "route": "canary"}])
