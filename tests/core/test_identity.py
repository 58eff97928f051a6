"""SPIFFE IDs, DNS SANs and the identity matchers: the pure pieces of trust."""

from fnmatch import fnmatchcase

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.identity import Identity, identity_matcher, is_dns_name, parse_spiffe_id

QA = "spiffe://example.org/ns/qa/sa/tester"


@pytest.mark.parametrize(
    ("uri", "domain", "path"),
    [
        (QA, "example.org", "/ns/qa/sa/tester"),
        ("spiffe://a-b_c.9/x.y-z_1", "a-b_c.9", "/x.y-z_1"),
        ("spiffe://" + "d" * 255 + "/x", "d" * 255, "/x"),
    ],
)
def test_valid_spiffe_ids(uri: str, domain: str, path: str) -> None:
    parsed = parse_spiffe_id(uri)
    assert parsed is not None and (parsed.trust_domain, parsed.path) == (domain, path)
    assert str(parsed) == uri


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://Example.org/x",  # upper case trust domain
        "spiffe://example.org",  # the trust domain itself, not a workload (no path)
        "spiffe://" + "d" * 256 + "/x",  # trust domain over 255 characters
        "spiffe:///x",  # empty trust domain
        "spiffe://example.org/",  # trailing slash: empty segment
        "spiffe://example.org//x",  # empty segment
        "spiffe://example.org/./x",  # dot segment
        "spiffe://example.org/../x",
        "spiffe://example.org/x?y=1",  # query
        "spiffe://example.org/x#f",  # fragment
        "spiffe://user@example.org/x",  # userinfo
        "spiffe://example.org:8080/x",  # port
        "https://example.org/x",
        "spiffe://example.org/" + "a" * 2050,
    ],
)
def test_malformed_spiffe_ids_are_no_identity(uri: str) -> None:
    assert parse_spiffe_id(uri) is None
    identity = Identity.from_sans(True, (uri,))
    assert identity.spiffe is None and identity.principal == ""
    if uri.startswith("spiffe:"):
        assert identity.malformed == (uri,)


def test_dns_is_the_fallback_principal() -> None:
    assert Identity.from_sans(True, (QA,), ("svc.example.org",)).principal == QA
    assert Identity.from_sans(True, (), ("svc.example.org",)).principal == "svc.example.org"


@pytest.mark.parametrize(
    "uris",
    [
        (QA, "spiffe://example.org/ns/prod/sa/web"),
        ("spiffe://other.org/first", QA),
        (QA, "https://example.org/not-spiffe"),
        (QA, QA),
    ],
)
def test_several_uri_sans_are_no_svid(uris: tuple[str, ...]) -> None:
    # X509-SVID: an SVID has exactly one URI SAN; a certificate with more must be rejected
    identity = Identity.from_sans(True, uris, ("svc.example.org",))
    assert identity.spiffe is None
    assert identity.malformed == tuple(u for u in uris if u.startswith("spiffe:"))  # counted
    assert not identity_matcher({"exact": QA})(identity)
    assert not identity_matcher({"glob": "spiffe://example.org/*"})(identity)
    assert not identity_matcher({"trust_domain": "example.org"})(identity)
    assert identity.principal == "svc.example.org"  # the DNS SAN is still the certificate's


@pytest.mark.parametrize(
    ("form", "identity", "expected"),
    [
        ({"exact": QA}, Identity.from_sans(True, (QA,)), True),
        ({"exact": QA}, Identity.from_sans(True, (QA + "2",)), False),
        ({"glob": "spiffe://example.org/ns/qa/*"}, Identity.from_sans(True, (QA,)), True),
        (
            {"glob": "spiffe://example.org/ns/qa/*"},
            Identity.from_sans(True, ("spiffe://example.org/ns/prod/sa/x",)),
            False,
        ),
        ({"trust_domain": "example.org"}, Identity.from_sans(True, (QA,)), True),
        ({"trust_domain": "example.org"}, Identity.from_sans(True, ("spiffe://other.org/x",)), False),
        ({"regex": r"spiffe://example\.org/ns/(qa|dev)/.*"}, Identity.from_sans(True, (QA,)), True),
        ({"regex": r"ns/qa"}, Identity.from_sans(True, (QA,)), False),  # full match
        ({"dns": "*.example.org"}, Identity.from_sans(True, (), ("Api.Example.org",)), True),
        ({"dns": "*.example.org"}, Identity.from_sans(True, (QA,)), False),
        # a DNS wildcard is exactly one left-most label (RFC 6125, as Envoy's SAN matchers)
        ({"dns": "*.example.org"}, Identity.from_sans(True, (), ("a.example.org",)), True),
        ({"dns": "*.Example.ORG"}, Identity.from_sans(True, (), ("a.example.org",)), True),
        ({"dns": "*.example.org"}, Identity.from_sans(True, (), ("a.b.example.org",)), False),
        ({"dns": "*.example.org"}, Identity.from_sans(True, (), (".example.org",)), False),
        ({"dns": "*.example.org"}, Identity.from_sans(True, (), ("*.example.org",)), False),
        ({"dns": "*.example.org"}, Identity.from_sans(True, (), ("example.org",)), False),
        ({"dns": "*.example.org"}, Identity.from_sans(True, (), ("a.example.org.evil",)), False),
        ({"dns": "*.example.org"}, Identity.from_sans(True, (), ("aexample.org",)), False),
        ({"dns": "api.example.org"}, Identity.from_sans(True, (), ("API.example.org",)), True),
        ({"dns": "api.example.org"}, Identity.from_sans(True, (), ("x.api.example.org",)), False),
        # ASCII case folding only: the Kelvin sign is not a "k"
        ({"dns": "kube.example.org"}, Identity.from_sans(True, (), ("\u212aube.example.org",)), False),
        # a glob stays in its trust domain; `*` spans `/` within the path
        (
            {"glob": "spiffe://example.org/*"},
            Identity.from_sans(True, ("spiffe://example.organization.evil/x",)),
            False,
        ),
        ({"glob": "spiffe://example.org/*"}, Identity.from_sans(True, (QA,)), True),
        ({"glob": "spiffe://example.org/ns/*/sa/tester"}, Identity.from_sans(True, (QA,)), True),
        ({"glob": "spiffe://example.org/ns/*/sa/Tester"}, Identity.from_sans(True, (QA,)), False),
        ({"glob": QA}, Identity.from_sans(True, (QA,)), True),
        ({"glob": "spiffe://example.org/ns/q.*"}, Identity.from_sans(True, (QA,)), False),  # `.` literal
        ({"present": True}, Identity.from_sans(True, (QA,)), True),
        ({"present": True}, Identity(), False),
        ({"absent": True}, Identity(), True),
        ({"absent": True}, Identity.from_sans(True, ("spiffe://bad//x",)), True),  # malformed = none
        ({"glob": "spiffe://bad/*"}, Identity.from_sans(True, ("spiffe://bad//x",)), False),
        ({"regex": "spiffe://example.org"}, Identity.from_sans(True, ("spiffe://example.org",)), False),
    ],
)
def test_identity_matchers(form: dict, identity: Identity, expected: bool) -> None:
    assert identity_matcher(form)(identity) is expected


@given(
    pattern=st.text("ab/*", max_size=12),
    path=st.lists(st.text("ab", min_size=1, max_size=4), min_size=1, max_size=4).map("/".join),
)
def test_glob_star_matches_any_characters_within_the_path(pattern: str, path: str) -> None:
    glob, spiffe_id = "spiffe://example.org/" + pattern, "spiffe://example.org/" + path
    matches = identity_matcher({"glob": glob})(Identity.from_sans(True, (spiffe_id,)))
    assert matches is fnmatchcase(spiffe_id, glob)


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("a.example.org", True),
        ("*.example.org", True),
        ("xn--bcher-kva.example", True),
        ("_srv.example-1.org", True),
        ("localhost", True),
        ("a" * 63 + ".org", True),
        ("a" * 64 + ".org", False),
        (".".join(["a" * 49] * 5) + ".org", True),  # 253 characters
        (".".join(["a" * 49] * 5) + ".orgs", False),
        ("x,y.example.org", False),
        ("a.example.org;DNS=b.example.org", False),
        ("a.example.org,URI=spiffe://example.org/x", False),
        ("a b.example.org", False),
        ("a..example.org", False),
        (".example.org", False),
        ("example.org.", False),
        ("a.*.example.org", False),
        ("*", False),
        ("\u212aube.example.org", False),
        ("", False),
    ],
)
def test_dns_names(name: str, valid: bool) -> None:
    assert is_dns_name(name) is valid


def test_a_dns_san_that_is_no_dns_name_never_matches() -> None:
    identity = Identity.from_sans(True, (), ("x,y.example.org", "ok.example.org"))
    assert identity.dns_sans == ("ok.example.org",) and identity.malformed_dns == ("x,y.example.org",)
    assert identity.principal == "ok.example.org"
    odd = Identity.from_sans(True, (), ("x,y.example.org",))
    assert not identity_matcher({"dns": "*.example.org"})(odd)
    assert not identity_matcher({"present": True})(odd)
