"""`when_key_missing: {assign: {cookie: ...}}`: a visitor without a key is issued one, bucketed
by it like any key; the cookie comes back as a key; a value that is no key of ours is missing."""

from typing import Any

import pytest

from sidecar.core import Request, RulesError, compile_table
from sidecar.core.bucketing import bucket
from sidecar.core.cookies import KEY_CHARS, derived_key, with_cookie
from sidecar.core.steering import steer, steered_headers
from sidecar.core.validate import problems
from tests.helpers import table_from_rules

ASSIGN = {"cookie": "gs", "max_age": "30d", "secure": True, "same_site": "lax", "path": "/"}


def rule(
    assign: Any = ASSIGN, key: list[str] | None = None, weights: tuple[int, int] = (50, 50)
) -> dict[str, Any]:
    return {
        "name": "web",
        "split": {
            "key": key or ["header:x-user-id"],
            "seed": "s",
            "to": [{"cluster": "stable", "weight": weights[0]}, {"cluster": "canary", "weight": weights[1]}],
            "when_key_missing": {"assign": assign},
        },
    }


def drawn(key: str, headers: dict[str, str] | None = None) -> Request:
    """A request whose new key, if one is drawn, is `key`."""
    request = Request(headers or {})
    request.draw_key = lambda: key
    return request


def lane(key: str, canary: int = 50) -> str:
    return "canary" if bucket("s", key, 100) >= 100 - canary else "stable"


KEYS = [f"{n:02d}" + "k" * 20 for n in range(40)]  # well-formed keys, each its own bucket


@pytest.mark.parametrize("key", KEYS)
def test_a_visitor_without_a_key_is_issued_one_bucketed_like_any_key(key: str) -> None:
    decision = table_from_rules([rule()]).decide(drawn(key))
    assert decision.issued is not None and decision.issued.key == key
    assert decision.cluster == lane(key) and decision.key_source == "cookie:gs"
    assert decision.issued.set_cookie == f"gs={key}; Max-Age=2592000; Path=/; HttpOnly; Secure; SameSite=Lax"
    assert decision.as_dict()["issued_cookie"] == "gs"


@pytest.mark.parametrize("key", KEYS[:10])
def test_the_cookie_comes_back_as_the_key_without_a_key_chain_to_edit(key: str) -> None:
    table = table_from_rules([rule()])
    assert [label for label, _ in table.rules[0].split.keys] == ["header:x-user-id", "cookie:gs"]  # type: ignore[union-attr]
    decision = table.decide(drawn("z" * 22, {"cookie": f"theme=dark; gs={key}"}))
    assert decision.issued is None and decision.cluster == lane(key) and decision.key_source == "cookie:gs"


def test_a_listed_cookie_source_keeps_its_place_and_a_header_key_wins_without_a_cookie() -> None:
    table = table_from_rules([rule(key=["cookie:gs", "header:x-user-id"])])
    assert [label for label, _ in table.rules[0].split.keys] == ["cookie:gs", "header:x-user-id"]  # type: ignore[union-attr]
    decision = table.decide(drawn("z" * 22, {"x-user-id": "u1"}))
    assert decision.issued is None and decision.key_source == "header:x-user-id"


@pytest.mark.parametrize(
    "value",
    [
        "canary",
        "stable",
        "a" * 21,
        "a" * 65,
        "a" * 1000,
        "abc.defghijklmnopqrstuvwxyz",
        "é" * 30,
        "a b" * 10,
        "",
    ],
)
def test_a_cookie_that_is_no_key_of_ours_is_missing_never_an_error(value: str) -> None:
    table = table_from_rules([rule()])
    request = drawn("N" * 22, {"cookie": f"gs={value}; other=1"})
    steering = steer(table, request)
    assert steering.decision.issued is not None and steering.decision.issued.key == "N" * 22
    assert ("cookie", f"other=1; gs={'N' * 22}") in steering.set_headers


def test_the_steering_carries_the_key_upstream_and_the_cookie_to_the_client() -> None:
    table = table_from_rules([rule()])
    steering = steer(table, drawn("K" * 22, {"cookie": "a=1"}))
    assert dict(steering.set_headers)["cookie"] == f"a=1; gs={'K' * 22}"
    assert steering.response_headers == (("set-cookie", steering.decision.issued.set_cookie),)  # type: ignore[union-attr]
    assert "cookie" in steered_headers(table)
    back = steer(table, drawn("X" * 22, {"cookie": f"gs={'K' * 22}"}))
    assert back.response_headers == () and "cookie" not in dict(back.set_headers)


def test_without_a_drawn_key_the_key_is_derived_from_the_request_for_explain() -> None:
    table = table_from_rules([rule()])
    first = table.decide(Request({"x-a": "1"}, path="/p"))
    assert first.issued is not None and KEY_CHARS.fullmatch(first.issued.key)
    assert first == table.decide(Request({"x-a": "1"}, path="/p"))
    assert derived_key({"x-a": "1"}, "/p?") != derived_key({"x-a": "2"}, "/p?")


def test_a_forced_lane_still_needs_a_trusted_caller() -> None:
    table = table_from_rules(
        [rule()],
        trust={"override_headers": ["x-canary"]},
        coloring={"lanes": {"stable": "stable", "canary": "canary"}},
    )
    key = next(k for k in KEYS if lane(k) == "stable")
    steering = steer(table, drawn(key, {"x-graysteer-lane": "canary", "x-canary": "1"}))
    assert steering.decision.cluster == "stable" and steering.decision.issued is not None
    assert "x-canary" in steering.remove_headers


def test_a_mirror_beside_an_issuing_split_draws_as_for_a_request_without_a_key() -> None:
    with_mirror = rule()
    with_mirror["mirror"] = {"cluster": "canary", "percent": 100}
    decision = table_from_rules([with_mirror]).decide(drawn(next(k for k in KEYS if lane(k) == "stable")))
    assert decision.issued is not None and decision.mirror == "canary"


@pytest.mark.parametrize(
    ("header", "name", "key", "expected"),
    [
        ("", "gs", "k", "gs=k"),
        ("a=1", "gs", "k", "a=1; gs=k"),
        ("gs=bad; a=1;  gs=worse ;b", "gs", "k", "a=1; b; gs=k"),
        (" gs = x ; gsx=1", "gs", "k", "gsx=1; gs=k"),
        # `,` separates too: ext_authz joins an HTTP/1.1 client's repeated cookie headers with it
        ("theme=dark,gs=canary; gs=x", "gs", "k", "theme=dark; gs=k"),
        ("a=1,gs=bad,b=2", "gs", "k", "a=1; b=2; gs=k"),
    ],
)
def test_with_cookie_replaces_every_value_of_the_name(
    header: str, name: str, key: str, expected: str
) -> None:
    assert with_cookie(header, name, key) == expected


def document(assign: Any) -> dict[str, Any]:
    return {"version": 1, "clusters": ["stable", "canary"], "default": "stable", "rules": [rule(assign)]}


@pytest.mark.parametrize(
    ("assign", "where", "message"),
    [
        ({}, "when_key_missing.assign", "'cookie' is required"),
        ({"cookie": "gs", "domain": "x"}, "when_key_missing.assign", "unknown key 'domain'"),
        ({"cookie": "g s"}, "assign.cookie", "is not valid"),
        ({"cookie": "gs;x"}, "assign.cookie", "is not valid"),
        ({"cookie": "gs", "path": "api"}, "assign.path", "is not valid"),
        ({"cookie": "gs", "path": "/a;b"}, "assign.path", "is not valid"),
        ({"cookie": "gs", "same_site": "None"}, "assign.same_site", "must be one of lax, strict, none"),
        ({"cookie": "gs", "secure": "yes"}, "assign.secure", "must be true or false"),
        ({"cookie": "gs", "max_age": "1y"}, "assign.max_age", "is not a duration"),
        ({"cookie": "gs", "max_age": 0}, "assign.max_age", "longer than 0"),
        ({"cookie": "gs", "max_age": "401d"}, "assign.max_age", "at most 400d"),
        ({"cookie": "gs", "same_site": "none", "secure": False}, "assign.same_site", "needs `secure: true`"),
        ({"cookie": "__Host-gs", "secure": False}, "assign.secure", "needs `secure: true`"),
        ({"cookie": "__Host-gs", "path": "/app"}, "assign.path", "needs `path: /`"),
    ],
)
def test_an_assign_form_with_a_problem_is_refused_with_a_clear_error(
    assign: Any, where: str, message: str
) -> None:
    found = problems(document(assign))
    assert len(found) == 1, found
    assert where in found[0].where and message in found[0].message, found[0]
    with pytest.raises(RulesError):
        compile_table(document(assign), "v", "rules.yaml")


def test_one_cookie_issued_by_two_rules_must_have_the_same_attributes() -> None:
    doc = document(ASSIGN)
    doc["rules"].append({**rule({**ASSIGN, "max_age": "1d"}), "name": "other"})
    found = problems(doc)
    assert len(found) == 1 and "cookie 'gs' is also issued by rules[0]" in found[0].message
    doc["rules"][1] = {**rule(ASSIGN), "name": "other"}
    assert problems(doc) == []


def test_defaults_are_safe() -> None:
    table = table_from_rules([rule({"cookie": "gs"})])
    spec = table.assigns[0]
    assert (spec.max_age, spec.secure, spec.same_site, spec.path) == (30 * 86400, True, "Lax", "/")


KEY = "Kq3vX9bT2mWn8pLr4sYd6f"  # of the issued shape


@pytest.mark.parametrize(
    "header",
    [
        f"theme=dark,gs={KEY}",  # two HTTP/1.1 headers as ext_authz joins them
        f"theme=dark; gs={KEY}",  # as ext_proc, the Lua and HTTP/2 join them
        f"theme=dark ,  gs={KEY} ;",
    ],
)
def test_a_key_in_a_joined_cookie_header_is_read_and_no_cookie_issued(header: str) -> None:
    request = drawn("N" * 22, {"cookie": header})
    assert request.cookie("gs") == KEY and request.cookie("theme") == "dark"
    steering = steer(table_from_rules([rule()]), request)
    assert steering.decision.issued is None and steering.decision.cluster == lane(KEY)


@pytest.mark.parametrize(
    ("header", "canonical"),
    [
        ("a=1,b=2", "a=1; b=2"),
        ("a=1;b=2", "a=1; b=2"),
        (" a=1 ; ; b=2,,c ", "a=1; b=2; c"),
        ("a=1; b=2", "a=1; b=2"),
        ("", ""),
    ],
)
def test_the_cookie_header_is_read_in_one_form_however_it_was_joined(header: str, canonical: str) -> None:
    """A `cookie` match condition (and a `header:cookie` key) sees the same value in every mode."""
    assert Request({"cookie": header}).headers["cookie"] == canonical
    table = table_from_rules(
        [{"name": "beta", "match": {"headers": {"cookie": canonical}}, "route": "canary"}, rule()]
    )
    assert steer(table, drawn(KEY, {"cookie": header})).decision.rule == "beta"
