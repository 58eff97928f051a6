"""Table-driven tests of every match form, precedence and split key source."""

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from sidecar.core import Request
from tests.helpers import request, table_from_rules, table_from_yaml

MATCH_CASES = [
    # (match, request, matches?)
    ({"headers": {"x-canary": "1"}}, request(x_canary="1"), True),
    ({"headers": {"x-canary": "1"}}, request(x_canary="2"), False),
    ({"headers": {"x-canary": "1"}}, request(), False),
    ({"headers": {"X-Canary": "1"}}, request(x_canary="1"), True),  # names case-insensitive
    ({"headers": {"x-canary": {"exact": "1"}}}, request(x_canary="1"), True),
    ({"headers": {"x-tier": {"prefix": "beta"}}}, request(x_tier="beta-7"), True),
    ({"headers": {"x-tier": {"prefix": "beta"}}}, request(x_tier="alpha"), False),
    ({"headers": {"x-tier": {"prefix": "beta"}}}, request(), False),
    ({"headers": {"x-tier": {"regex": "b[0-9]+"}}}, request(x_tier="b12"), True),
    ({"headers": {"x-tier": {"regex": "b[0-9]+"}}}, request(x_tier="b12x"), False),  # full match
    ({"headers": {"x-tier": {"regex": ".*"}}}, request(), False),
    ({"headers": {"x-tier": {"present": True}}}, request(x_tier=""), True),
    ({"headers": {"x-tier": {"present": True}}}, request(), False),
    ({"headers": {"x-tier": {"absent": True}}}, request(), True),
    ({"headers": {"x-tier": {"absent": True}}}, request(x_tier="x"), False),
    ({"path": {"exact": "/api"}}, request("/api"), True),
    ({"path": {"exact": "/api"}}, request("/api?x=1"), True),  # the query is not the path
    ({"path": {"exact": "/api"}}, request("/api/"), False),
    ({"path": {"prefix": "/api/"}}, request("/api/v1"), True),
    ({"path": {"prefix": "/api/"}}, request("/apx/v1"), False),
    ({"path": {"regex": "/u/[0-9]+"}}, request("/u/42"), True),
    ({"path": {"regex": "/u/[0-9]+"}}, request("/u/42/x"), False),
    # regexes are RE2, as Envoy's safe_regex: \d is ASCII only (Python's `re` matches any digit)
    ({"headers": {"x-tier": {"regex": r"b\d+"}}}, request(x_tier="b\u0663"), False),
    # paths and header values are case-sensitive, as in Envoy
    ({"path": {"regex": "/API/.*"}}, request("/api/x"), False),
    ({"path": {"prefix": "/API"}}, request("/api"), False),
    ({"headers": {"x-tier": "Beta"}}, request(x_tier="beta"), False),
    ({"method": ["GET", "post"]}, request(method="POST"), True),
    ({"method": ["GET"]}, request(method="DELETE"), False),
    ({"method": "get"}, request(method="GET"), True),
    # all conditions must hold
    ({"headers": {"a": "1", "b": "2"}}, request(a="1", b="2"), True),
    ({"headers": {"a": "1", "b": "2"}}, request(a="1"), False),
    ({"headers": {"a": "1"}, "path": {"prefix": "/x"}, "method": ["GET"]}, request("/x/y", a="1"), True),
    (
        {"headers": {"a": "1"}, "path": {"prefix": "/x"}, "method": ["GET"]},
        request("/x/y", "PUT", a="1"),
        False,
    ),
    ({}, request(), True),
]


@pytest.mark.parametrize(("match", "req", "expected"), MATCH_CASES)
def test_match_forms(match: dict, req: Request, expected: bool) -> None:
    table = table_from_rules([{"name": "r", "match": match, "route": "canary"}])
    decision = table.decide(req)
    assert (decision.rule == "r") is expected
    assert decision.cluster == ("canary" if expected else "stable")


def test_rule_without_match_always_applies() -> None:
    table = table_from_rules([{"name": "all", "route": "canary"}])
    assert table.decide(request("/anything")).rule == "all"


def test_first_matching_rule_wins() -> None:
    table = table_from_rules(
        [
            {"name": "first", "match": {"headers": {"x": "1"}}, "route": "canary"},
            {"name": "second", "match": {"headers": {"x": "1"}}, "route": "stable"},
            {"name": "catch-all", "route": "stable"},
        ]
    )
    assert table.decide(request(x="1")).rule == "first"
    assert table.decide(request(x="2")).rule == "catch-all"


def test_unmatched_goes_to_default_with_rule_default() -> None:
    table = table_from_rules(
        [{"name": "r", "match": {"headers": {"x": "1"}}, "route": "canary"}],
        clusters=("v1", "canary", "stable"),
        default="v1",
    )
    decision = table.decide(request())
    assert (decision.cluster, decision.rule, decision.bucket) == ("v1", "default", None)
    assert decision.version == "test"


SPLIT = """
version: 1
clusters: [stable, canary]
default: stable
rules:
  - name: ramp
    split:
      key: [header:X-User-Id, cookie:uid, query:gray_id]
      seed: s1
      to: [{cluster: stable, weight: 50}, {cluster: canary, weight: 50}]
      when_key_missing: {missing}
"""


@pytest.mark.parametrize(
    ("req", "source", "key"),
    [
        (request(x_user_id="42"), "header:X-User-Id", "42"),
        (Request({"cookie": "a=1; uid=42; b=2"}), "cookie:uid", "42"),
        (Request({"cookie": 'uid="42"'}), "cookie:uid", "42"),
        (Request({}, "GET", "/p?x=1&gray_id=42"), "query:gray_id", "42"),
        (Request({}, "GET", "/p?gray_id=a%20b"), "query:gray_id", "a b"),
        # the first source present wins
        (Request({"x-user-id": "42", "cookie": "uid=9"}, "GET", "/?gray_id=8"), "header:X-User-Id", "42"),
        (Request({"cookie": "uid=9"}, "GET", "/?gray_id=8"), "cookie:uid", "9"),
        # an empty value counts as missing
        (Request({"x-user-id": "", "cookie": "uid=9"}), "cookie:uid", "9"),
    ],
)
def test_split_key_sources(req: Request, source: str, key: str) -> None:
    from sidecar.core.bucketing import bucket

    decision = table_from_yaml(SPLIT.replace("{missing}", "random")).decide(req)
    assert decision.key_source == source
    assert decision.bucket == bucket("s1", key, 100)
    assert decision.cluster == ("stable" if decision.bucket < 50 else "canary")


def test_key_missing_to_named_cluster() -> None:
    decision = table_from_yaml(SPLIT.replace("{missing}", "canary")).decide(request())
    assert (decision.cluster, decision.key_source, decision.bucket) == ("canary", "missing", None)


def test_key_missing_random_keeps_weights() -> None:
    table = table_from_yaml(
        SPLIT.replace("{missing}", "random")
        .replace("50}, {", "80}, {")
        .replace("weight: 50}]", "weight: 20}]")
    )
    decisions = [table.decide(request()) for _ in range(20_000)]
    assert {d.key_source for d in decisions} == {"random"}
    canary = sum(d.cluster == "canary" for d in decisions) / len(decisions)
    assert 0.18 < canary < 0.22  # 20% +- 7 standard deviations


def test_seed_defaults_to_rule_name() -> None:
    from sidecar.core.bucketing import bucket

    table = table_from_rules(
        [
            {
                "name": "ramp",
                "split": {
                    "key": ["header:u"],
                    "to": [{"cluster": "stable", "weight": 1}, {"cluster": "canary", "weight": 999}],
                },
            }
        ]
    )
    assert table.decide(request(u="k")).bucket == bucket("ramp", "k", 1000)


def test_zero_weight_entry_gets_nothing() -> None:
    table = table_from_rules(
        [
            {
                "name": "ramp",
                "split": {
                    "key": ["header:u"],
                    "to": [{"cluster": "stable", "weight": 0}, {"cluster": "canary", "weight": 10}],
                },
            }
        ]
    )
    assert {table.decide(request(u=str(i))).cluster for i in range(500)} == {"canary"}


def test_routing_header_default_and_override() -> None:
    assert table_from_rules([]).routing_header == "x-route-cluster"
    assert table_from_rules([], routing_header="X-Lane").routing_header == "x-lane"


def test_route_decisions_are_prebuilt() -> None:
    table = table_from_rules([{"name": "r", "route": "canary"}])
    assert table.decide(request()) is table.decide(request())


# The decision runs in a child process: a thread cannot bound Python's `re`, which holds the GIL
# while it backtracks (a join(timeout) returns only when the match ends), so with a backtracking
# engine this test would hang instead of failing. The bound is for liveness, not performance.
CATASTROPHIC = textwrap.dedent("""
    from sidecar.core import Request, compile_table

    table = compile_table({"version": 1, "clusters": ["stable", "canary"], "default": "stable",
                           "rules": [
        {"name": "tier", "match": {"headers": {"x-user-tier": {"regex": "(a+)+$"}}},
         "route": "canary"},
        {"name": "path", "match": {"path": {"regex": "/(x+x+)+y"}}, "route": "canary"}]},
        "v", "rules.yaml")
    print(table.decide(Request({"x-user-tier": "a" * 9_999 + "!"})).rule,
          table.decide(Request({}, "GET", "/" + "x" * 10_000)).rule,
          table.decide(Request({"x-user-tier": "a" * 10_000}, "GET", "/" + "x" * 10_000 + "y")).rule)
""")


def test_catastrophic_backtracking_patterns_decide_at_once() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CATASTROPHIC],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["default", "default", "tier"]


# ---- mirror: a share of a rule's requests copied to another cluster -----------------------------

MIRRORED_SPLIT: dict[str, Any] = {
    "name": "ramp",
    "split": {"key": ["header:x-user-id"], "to": [{"cluster": "stable", "weight": 100}]},
    "mirror": {"cluster": "canary", "percent": 20},
}


def test_a_split_mirrors_its_share_sticky_by_the_split_key() -> None:
    table = table_from_rules([MIRRORED_SPLIT])
    users = [f"user-{i}" for i in range(4000)]
    mirrored = {u for u in users if table.decide(request(x_user_id=u)).mirror == "canary"}
    assert 0.17 < len(mirrored) / len(users) < 0.23
    again = {u for u in users if table.decide(request(x_user_id=u)).mirror == "canary"}
    assert again == mirrored  # sticky: the same users are copied every time
    decision = table.decide(request(x_user_id=next(iter(mirrored))))
    assert (decision.cluster, decision.rule, decision.mirror) == ("stable", "ramp", "canary")


def test_the_mirror_share_is_independent_of_the_split_buckets() -> None:
    rule = {
        **MIRRORED_SPLIT,
        "split": {
            **MIRRORED_SPLIT["split"],
            "to": [{"cluster": "stable", "weight": 80}, {"cluster": "canary", "weight": 20}],
        },
    }
    table = table_from_rules([rule])
    decisions = [table.decide(request(x_user_id=f"u{i}")) for i in range(4000)]
    to_stable = [d for d in decisions if d.cluster == "stable"]
    share = sum(d.mirror == "canary" for d in to_stable) / len(to_stable)
    assert 0.16 < share < 0.24  # the split's canary users are not the mirrored ones
    assert not any(d.mirror for d in decisions if d.cluster == "canary")  # never a copy to itself


def test_a_route_rule_mirrors_at_random_and_without_a_key_a_split_too() -> None:
    table = table_from_rules(
        [{"name": "all", "route": "stable", "mirror": {"cluster": "canary", "percent": 50}}]
    )
    share = sum(table.decide(request()).mirror == "canary" for _ in range(2000)) / 2000
    assert 0.4 < share < 0.6
    keyless = table_from_rules([MIRRORED_SPLIT]).decide(request())
    assert keyless.key_source == "random"


def test_percent_100_mirrors_everything_and_small_shares_are_kept() -> None:
    every = table_from_rules([{**MIRRORED_SPLIT, "mirror": {"cluster": "canary", "percent": 100}}])
    assert all(every.decide(request(x_user_id=f"u{i}")).mirror == "canary" for i in range(200))
    tiny = table_from_rules([{**MIRRORED_SPLIT, "mirror": {"cluster": "canary", "percent": 0.001}}])
    assert tiny.rules[0].mirror is not None and tiny.rules[0].mirror.share == 1  # 0.01%, not zero


def test_a_rule_without_mirror_and_the_default_copy_nothing() -> None:
    table = table_from_rules([{"name": "r", "match": {"path": {"prefix": "/x"}}, "route": "canary"}])
    assert table.decide(request("/x")).mirror is None and table.decide(request("/")).mirror is None
    assert not table.mirrors and table_from_rules([MIRRORED_SPLIT]).mirrors
