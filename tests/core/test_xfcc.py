"""x-forwarded-client-cert read strictly as Envoy writes it, and the identities it names."""

import pytest

from sidecar.core.xfcc import XfccError, identity_from_first_sans, identity_from_xfcc, parse_xfcc

QA = "spiffe://example.org/ns/qa/sa/tester"


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
    identity = identity_from_first_sans(QA, "c.example.org", "CN=c", xfcc)
    assert (str(identity.spiffe) if identity.spiffe else None) == spiffe
    assert (QA in identity.malformed) is (spiffe is None)  # counted as malformed_spiffe_id
    assert identity.dns_sans == ("c.example.org",) and identity.subject == "CN=c"


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
