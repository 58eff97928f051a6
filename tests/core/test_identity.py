"""SPIFFE IDs, identity matchers, XFCC and W3C baggage: the pure pieces of trust and color."""

from fnmatch import fnmatchcase

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.baggage import MAX_BYTES, member_value, with_member, without_member
from sidecar.core.identity import (
    MAX_PROGRAM_SIZE,
    Identity,
    RegexError,
    XfccError,
    compile_regex,
    identity_from_xfcc,
    identity_matcher,
    is_dns_name,
    parse_spiffe_id,
    parse_xfcc,
)

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


# ext_proc: Envoy sends only the first URI SAN; the nearest XFCC element shows the others
@pytest.mark.parametrize(
    ("xfcc", "spiffe"),
    [
        (None, QA),
        (f"Hash=h;URI={QA};DNS=c.example.org", QA),
        (f'Hash=h;Subject="CN=c";URI={QA};URI=spiffe://other.org/x', None),
        (f"Hash=h;URI=spiffe://other.org/x;URI={QA}", None),
        (f"Hash=h;URI={QA};URI=https://example.org/x", None),
        (f"Hash=h;URI={QA};URI={QA}", None),
        # an element that does not list this connection's URI SAN (a client's own header,
        # where Envoy does not sanitize) says nothing about it
        ("Hash=h;URI=spiffe://other.org/x;URI=spiffe://other.org/y", QA),
        # not one element as Envoy writes it: a SAN of this certificate holds a separator, so
        # its other URI SANs cannot be told
        (f"URI={QA};URI=spiffe://other.org/x,Hash=h;URI={QA}", None),
        (f"Hash=h;URI={QA};URI=spiffe://example.org/web;DNS=e.example.org,URI={QA}", None),
        ("garbage", None),
    ],
)
def test_first_uri_san_is_checked_against_xfcc(xfcc: str | None, spiffe: str | None) -> None:
    identity = Identity.from_first_sans(QA, "c.example.org", "CN=c", xfcc)
    assert (str(identity.spiffe) if identity.spiffe else None) == spiffe
    assert (QA in identity.malformed) is (spiffe is None)  # counted as malformed_spiffe_id
    assert identity.dns_sans == ("c.example.org",) and identity.subject == "CN=c"


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


# ---- regexes: RE2 as Envoy's safe_regex ---------------------------------------------------------


def test_regexes_are_real_re2_never_python_re() -> None:
    # A module named `re2` that fell back to Python's `re` would accept these.
    for pattern in (r"(a)\1", "(?=a)", "(?<=a)b", "(?!a)", r"a\Z", "a++"):
        with pytest.raises(RegexError, match="RE2"):
            compile_regex(pattern)
    # RE2 semantics, not Python's: \d is ASCII only, `$` does not match before a final newline
    assert not compile_regex(r"b\d+")("b\u0663")  # ARABIC-INDIC DIGIT THREE: Python's \d matches
    assert not compile_regex("a$\n")("a\n")  # Python's `$` also matches before a final newline


def test_program_size_limit_is_envoys() -> None:
    assert MAX_PROGRAM_SIZE == 100
    assert compile_regex("a{96}")("a" * 96)  # program size 100: allowed
    with pytest.raises(RegexError, match=r"program size 101 > 100"):
        compile_regex("a{97}")
    with pytest.raises(RegexError, match=r"program size 1004 > 100"):
        compile_regex("a{1000}")


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        ("b[0-9]+", "b12", True),
        ("b[0-9]+", "b12x", False),  # the whole value, as Envoy
        ("b[0-9]+", "xb12", False),
        ("(?i)beta", "BeTa", True),
        ("é+", "éé", True),  # UTF-8, as Envoy's RE2
    ],
)
def test_regexes_match_the_whole_value(pattern: str, text: str, expected: bool) -> None:
    assert compile_regex(pattern)(text) is expected


@given(
    pattern=st.text("ab/*", max_size=12),
    path=st.lists(st.text("ab", min_size=1, max_size=4), min_size=1, max_size=4).map("/".join),
)
def test_glob_star_matches_any_characters_within_the_path(pattern: str, path: str) -> None:
    glob, spiffe_id = "spiffe://example.org/" + pattern, "spiffe://example.org/" + path
    matches = identity_matcher({"glob": glob})(Identity.from_sans(True, (spiffe_id,)))
    assert matches is fnmatchcase(spiffe_id, glob)


def test_xfcc_is_one_element_as_envoy_writes_it() -> None:
    # Envoy 1.40's own header for a certificate with these SANs (subject in RFC 2253 with its
    # escapes, `By` for the listener's own URI SAN)
    header = (
        "By=spiffe://example.org/edge;Hash=9ee752a455e0dfcb7c45a5402d10c46e7adbf7bbc9ea9f2c95e2919429c2d1f3;"
        'Subject="O=Example,CN=q\\"u\\,o\\;te";URI=' + QA + ";DNS=client.example.org;DNS=*.alt.example.org"
    )
    element = parse_xfcc(header)
    assert element.uris == (QA,)
    assert element.dns == ("client.example.org", "*.alt.example.org")
    assert element.subject == 'O=Example,CN=q\\"u\\,o\\;te'  # as Envoy's own subject text
    identity = identity_from_xfcc(header)
    assert identity is not None and identity.principal == QA
    assert parse_xfcc('Hash=ab;Subject="";URI=').uris == ()  # no URI SAN: Envoy still writes `URI=`


@pytest.mark.parametrize(
    "header",
    [
        f"By=spiffe://example.org/edge;URI=spiffe://example.org/far,Hash=ab;URI={QA}",  # two elements
        f"Hash=ab;URI=spiffe://example.org/ns/prod/a,URI={QA}",  # a URI SAN holding `,`
        f"Hash=ab;URI=spiffe://example.org/ns/prod/a;DNS=a.example.org,URI={QA}",  # a DNS SAN, too
        f"Hash=ab;URI=spiffe://example.org/ns/prod/a;DNS=a.example.org;URI={QA}",  # `;`: out of order
        f"URI={QA};Hash=ab",
        f'Hash=ab;URI={QA};Subject="CN=x"',
        f"Hash=ab;Hash=cd;URI={QA}",
        f'Subject="CN=a";Subject="CN=b";URI={QA}',
        f'Hash=ab;URI={QA}"x',
        f"Hash=ab;URI={QA}=x",
        f"Hash=ab;URI={QA} x",
        f"Hash=ab;URI={QA};DNS=a b.example.org",
        f"Hash=ab;URI={QA};DNS=",
        f"Hash=ab;URI={QA};DNS=a..example.org",
        f"Hash=ab;URI={QA};DNS=a.example.org|x",
        f"Hash=ab;URI=;URI={QA}",
        f"Hash=ab;Subject=CN=x;URI={QA}",  # Envoy quotes the subject
        f'Hash=ab;Subject="CN=x;URI={QA}',  # never closed
        f'Hash=ab;Subject="CN=x"y;URI={QA}',
        f"Hash=ab;uri={QA}",  # Envoy's keys are written as they are
        f"Hash=ab;Peer={QA}",
        f"Hash=ab;;URI={QA}",
        f"Hash=ab;URI={QA};",
        "",
        "garbage",
    ],
)
def test_xfcc_not_as_envoy_writes_it_gives_no_identity(header: str) -> None:
    with pytest.raises(XfccError):
        parse_xfcc(header)
    assert identity_from_xfcc(header) is None


@pytest.mark.parametrize("header", ["Hash=abc", 'Subject="CN=x"', 'Hash=ab;Subject="CN=x";URI='])
def test_xfcc_without_a_name_gives_no_identity(header: str) -> None:
    assert identity_from_xfcc(header) is None


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
