"""SPIFFE IDs, identity matchers, XFCC and W3C baggage: the pure pieces of trust and color."""

import pytest

from sidecar.core.baggage import MAX_BYTES, member_value, with_member, without_member
from sidecar.core.identity import Identity, identity_from_xfcc, identity_matcher, parse_spiffe_id

QA = "spiffe://example.org/ns/qa/sa/tester"


@pytest.mark.parametrize(("uri", "domain", "path"), [
    (QA, "example.org", "/ns/qa/sa/tester"),
    ("spiffe://example.org", "example.org", ""),
    ("spiffe://a-b_c.9/x.y-z_1", "a-b_c.9", "/x.y-z_1"),
])
def test_valid_spiffe_ids(uri: str, domain: str, path: str) -> None:
    parsed = parse_spiffe_id(uri)
    assert parsed is not None and (parsed.trust_domain, parsed.path) == (domain, path)
    assert str(parsed) == uri


@pytest.mark.parametrize("uri", [
    "spiffe://Example.org/x",        # upper case trust domain
    "spiffe:///x",                   # empty trust domain
    "spiffe://example.org/",         # trailing slash: empty segment
    "spiffe://example.org//x",       # empty segment
    "spiffe://example.org/./x",      # dot segment
    "spiffe://example.org/../x",
    "spiffe://example.org/x?y=1",    # query
    "spiffe://example.org/x#f",      # fragment
    "spiffe://user@example.org/x",   # userinfo
    "spiffe://example.org:8080/x",   # port
    "https://example.org/x",
    "spiffe://example.org/" + "a" * 2050,
])
def test_malformed_spiffe_ids_are_no_identity(uri: str) -> None:
    assert parse_spiffe_id(uri) is None
    identity = Identity.from_sans(True, (uri,))
    assert identity.spiffe is None and identity.principal == ""
    if uri.startswith("spiffe:"):
        assert identity.malformed == (uri,)


def test_first_valid_spiffe_id_wins_and_dns_is_the_fallback_principal() -> None:
    identity = Identity.from_sans(True, ("spiffe://bad//x", QA), ("svc.example.org",))
    assert identity.principal == QA
    assert Identity.from_sans(True, (), ("svc.example.org",)).principal == "svc.example.org"


@pytest.mark.parametrize(("form", "identity", "expected"), [
    ({"exact": QA}, Identity.from_sans(True, (QA,)), True),
    ({"exact": QA}, Identity.from_sans(True, (QA + "2",)), False),
    ({"glob": "spiffe://example.org/ns/qa/*"}, Identity.from_sans(True, (QA,)), True),
    ({"glob": "spiffe://example.org/ns/qa/*"},
     Identity.from_sans(True, ("spiffe://example.org/ns/prod/sa/x",)), False),
    ({"trust_domain": "example.org"}, Identity.from_sans(True, (QA,)), True),
    ({"trust_domain": "example.org"}, Identity.from_sans(True, ("spiffe://other.org/x",)), False),
    ({"regex": r"spiffe://example\.org/ns/(qa|dev)/.*"}, Identity.from_sans(True, (QA,)), True),
    ({"regex": r"ns/qa"}, Identity.from_sans(True, (QA,)), False),  # full match
    ({"dns": "*.example.org"}, Identity.from_sans(True, (), ("Api.Example.org",)), True),
    ({"dns": "*.example.org"}, Identity.from_sans(True, (QA,)), False),
    ({"present": True}, Identity.from_sans(True, (QA,)), True),
    ({"present": True}, Identity(), False),
    ({"absent": True}, Identity(), True),
    ({"absent": True}, Identity.from_sans(True, ("spiffe://bad//x",)), True),  # malformed = none
    ({"glob": "spiffe://*"}, Identity.from_sans(True, ("spiffe://bad//x",)), False),
])
def test_identity_matchers(form: dict, identity: Identity, expected: bool) -> None:
    assert identity_matcher(form)(identity) is expected


def test_xfcc_uses_the_nearest_element() -> None:
    header = ('By=spiffe://example.org/edge;URI=spiffe://example.org/ns/prod/sa/far,'
              'Hash=abc;Subject="CN=client,O=Example";URI=' + QA + ";DNS=client.example.org;"
              "DNS=alt.example.org")
    identity = identity_from_xfcc(header)
    assert identity is not None
    assert identity.principal == QA
    assert identity.dns_sans == ("client.example.org", "alt.example.org")
    assert identity.subject == "CN=client,O=Example"


@pytest.mark.parametrize("header", ["garbage", "Hash=abc", 'Subject="CN=x"', ";;;"])
def test_malformed_or_empty_xfcc_gives_no_identity(header: str) -> None:
    assert identity_from_xfcc(header) is None


def test_baggage_member_set_preserving_others() -> None:
    header = "userId=alice, graysteer.lane=stable;ttl=3,serverNode=DF%2028"
    assert member_value(header, "graysteer.lane") == "stable"
    updated, added = with_member(header, "graysteer.lane", "canary")
    assert added
    assert updated == "userId=alice,serverNode=DF%2028,graysteer.lane=canary"
    assert without_member(updated, "graysteer.lane") == "userId=alice,serverNode=DF%2028"
    assert with_member("", "k", "v") == ("k=v", True)
    assert member_value("no-equals-sign,k=v", "k") == "v"  # malformed members are kept, not fatal


def test_baggage_limits_are_respected() -> None:
    full = ",".join(f"m{i}=v" for i in range(64))
    assert with_member(full, "graysteer.lane", "canary") == (full, False)
    big = "k=" + "x" * (MAX_BYTES - 10)
    updated, added = with_member(big, "graysteer.lane", "canary")
    assert (updated, added) == (big, False)
