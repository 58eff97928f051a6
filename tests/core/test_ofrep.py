"""OFREP mapped onto a table (sidecar.core.ofrep): a split rule's flag buckets as the router
does, flagd's fractional vectors give flagd's variants, the whole-table flag is the engine's
decision, and contexts that cannot be evaluated get OFREP's error codes."""

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core import Request, compile_table
from sidecar.core.engine import Engine
from sidecar.core.ofrep import (
    TABLE_FLAG,
    Failure,
    OfrepError,
    as_request,
    etag,
    evaluate,
    evaluate_all,
    flag_keys,
    read_context,
)
from tests.core.test_bucketing import FLAGD_V2_VECTORS

DOC: dict[str, Any] = {
    "version": 1,
    "clusters": ["stable", "canary", "blocked"],
    "default": "stable",
    "rules": [
        {"name": "deny-bots", "match": {"headers": {"user-agent": "bot"}}, "deny": {"status": 403}},
        {"name": "force-canary", "match": {"headers": {"x-canary": "1"}}, "route": "canary"},
        {
            "name": "ramp",
            "match": {"path": {"prefix": "/api/"}},
            "split": {
                "key": ["header:X-User-Id", "cookie:uid", "query:gray", "identity"],
                "seed": "s",
                "to": [{"cluster": "stable", "weight": 70}, {"cluster": "canary", "weight": 30}],
                "when_key_missing": "stable",
            },
        },
    ],
}


def engine(doc: dict[str, Any] = DOC, version: str = "v1") -> Engine:
    return Engine(compile_table(doc, version, "test"))


def failure(call: Any) -> Failure:
    with pytest.raises(Failure) as raised:
        call()
    return raised.value


def test_the_flags_are_the_split_rules_and_the_whole_table() -> None:
    assert flag_keys(engine().table) == ["ramp", TABLE_FLAG]


@given(st.text(min_size=1))
def test_a_split_flag_is_the_cluster_the_router_picks_for_that_key(user: str) -> None:
    e = engine()
    split = e.table.rules[2].split
    assert split is not None
    routed = split.decide(Request({"x-user-id": user}))
    for context in (
        {"targetingKey": user},
        {"header:x-user-id": user},
        {"targetingKey": "x", "header:X-USER-ID": user},
    ):
        answer = evaluate(e, "ramp", context)
        assert answer["value"] == answer["variant"] == routed.cluster
        assert answer["reason"] == "SPLIT"
        assert answer["metadata"]["bucket"] == routed.bucket  # type: ignore[index]


def test_the_splits_key_sources_are_read_in_its_order_then_the_targeting_key() -> None:
    e = engine()

    def source(context: dict[str, str]) -> object:
        return evaluate(e, "ramp", context)["metadata"]["key_source"]  # type: ignore[index]

    assert source({"targetingKey": "t", "query:gray": "q", "cookie:uid": "c"}) == "cookie:uid"
    assert source({"targetingKey": "t", "identity": "spiffe://td/a"}) == "identity"
    assert source({"targetingKey": "t", "cookie:uid": ""}) == "targetingKey"  # empty: not present


@pytest.mark.parametrize(("hashed", "variants", "expected"), FLAGD_V2_VECTORS)
def test_flagd_testbeds_fractional_vectors_give_flagds_variants(
    hashed: str, variants: list[tuple[str, int]], expected: str
) -> None:
    """flagd hashes flag key + targeting key: a split whose seed and key make that string."""
    split = {
        "key": ["header:x-k"],
        "seed": hashed[:1],
        "to": [{"cluster": n, "weight": w} for n, w in variants],
    }
    doc = {"version": 1, "clusters": [n for n, _ in variants], "default": variants[0][0]}
    doc["rules"] = [{"name": "flag", "split": split}]
    assert evaluate(engine(doc), "flag", {"targetingKey": hashed[1:]})["variant"] == expected


def test_unknown_flags_and_missing_keys_are_ofreps_errors() -> None:
    e = engine()
    for key in ("nope", "force-canary", "deny-bots", ""):
        assert (
            failure(lambda key=key: evaluate(e, key, {"targetingKey": "u"})).code is OfrepError.FLAG_NOT_FOUND
        )
    for context in ({}, {"targetingKey": ""}, {"plan": "gold", "header:x-other": "u"}):
        found = failure(lambda context=context: evaluate(e, "ramp", context))
        assert found.code is OfrepError.TARGETING_KEY_MISSING and "header:X-User-Id" in found.details
    answers = {a["key"]: a for a in evaluate_all(e, {})}
    assert answers["ramp"]["errorCode"] == "TARGETING_KEY_MISSING"
    assert answers[TABLE_FLAG]["value"] == "stable" and answers[TABLE_FLAG]["reason"] == "DEFAULT"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ([], OfrepError.PARSE_ERROR),
        ("context", OfrepError.PARSE_ERROR),
        (None, OfrepError.PARSE_ERROR),
        ({"context": []}, OfrepError.INVALID_CONTEXT),
        ({"context": "u"}, OfrepError.INVALID_CONTEXT),
        ({"context": {"targetingKey": 7}}, OfrepError.INVALID_CONTEXT),
        ({"context": {"header:x-user-id": ["a"]}}, OfrepError.INVALID_CONTEXT),
        ({"context": {"path": {"a": 1}}}, OfrepError.INVALID_CONTEXT),
        ({"context": {"identity": True}}, OfrepError.INVALID_CONTEXT),
        ({"context": {"targetingKey": "\ud800"}}, OfrepError.INVALID_CONTEXT),
        ({"context": {"header:\udcff": "u"}}, OfrepError.INVALID_CONTEXT),
        ({"context": {"other": [{"deep": "\udfff"}]}}, OfrepError.INVALID_CONTEXT),
    ],
)
def test_contexts_that_cannot_be_evaluated(body: object, code: OfrepError) -> None:
    assert failure(lambda: read_context(body)).code is code


def test_attributes_it_does_not_read_may_be_anything() -> None:
    context = {"targetingKey": "u", "plan": {"tier": [1, 2.5, None]}, "beta": True}
    assert read_context({"context": context}) == context
    assert read_context({}) == {}  # the Python provider's body without a context


@pytest.mark.parametrize(
    "context",
    [
        {},
        {"path": "/api/x", "header:x-user-id": "u1"},
        {"path": "/api/x", "cookie:uid": "u2", "cookie:other": "o"},
        {"path": "/api/x?gray=u3"},
        {"path": "/api/x", "query:gray": "u4"},
        {"path": "/api/x", "identity": "spiffe://example.org/ns/a/sa/b"},
        {"path": "/api/x", "identity": "client.example.org"},
        {"path": "/api/x"},
        {"header:x-canary": "1", "method": "post"},
        {"header:user-agent": "bot", "header:x-canary": "1"},
        {"host": "shop.example.com", "header:host": "ignored", "header::path": "/ignored"},
    ],
)
def test_the_whole_table_flag_is_the_engines_decision_of_the_request(context: dict[str, str]) -> None:
    e = engine()
    request = as_request(context)
    decision = e.steer(request).decision
    answer = evaluate(e, TABLE_FLAG, context)
    assert answer["value"] == answer["variant"] == decision.cluster
    metadata: Any = answer["metadata"]
    assert (metadata["rule"], metadata["reason"]) == (decision.rule, str(decision.reason))
    assert metadata.get("bucket") == decision.bucket and "identity" not in metadata
    reasons = {"route": "TARGETING_MATCH", "deny": "TARGETING_MATCH", "split": "SPLIT", "default": "DEFAULT"}
    assert answer["reason"] == reasons[str(decision.reason)]


def test_a_context_stands_for_the_request_explain_describes() -> None:
    request = as_request(
        {"path": "/p?a=1", "query:b": "2", "host": "h", "cookie:uid": "u", "header:Cookie": "c=1"}
    )
    assert (request.method, request.path, request.query_param("a"), request.query_param("b")) == (
        "GET",
        "/p",
        "1",
        "2",
    )
    assert (
        request.headers[":authority"] == "h" and request.cookie("uid") == "u" and request.cookie("c") == "1"
    )
    assert as_request({}).headers[":authority"] == "graysteer.local"
    assert as_request({"identity": "spiffe://example.org/a"}).identity.principal == "spiffe://example.org/a"


def test_the_etag_changes_with_the_weights_the_version_and_the_context() -> None:
    base = etag(engine().table, {"targetingKey": "u"})
    assert base == etag(engine().table, {"targetingKey": "u"})
    assert base != etag(engine(version="v2").table, {"targetingKey": "u"})
    assert base != etag(engine().table, {"targetingKey": "w"})
    moved = {**DOC, "rules": [*DOC["rules"][:2], {**DOC["rules"][2], "split": {**DOC["rules"][2]["split"]}}]}
    moved["rules"][2]["split"]["to"] = [
        {"cluster": "stable", "weight": 50},
        {"cluster": "canary", "weight": 50},
    ]
    assert base != etag(engine(moved).table, {"targetingKey": "u"})  # even under the same version
