"""`x-forwarded-client-cert`, read strictly as Envoy writes it, and the identities it names."""

import re
from dataclasses import dataclass, replace

from sidecar.core.identity import Identity, is_dns_name

XFCC = "x-forwarded-client-cert"  # the header Envoy writes the client certificate's details in

# What Envoy writes for one certificate (HCM `set_current_client_cert_details`, conn_manager_utility.cc):
# `By=` per URI SAN of its own certificate, `Hash=`, then Cert, Chain, Subject, URI and DNS in
# that order, `;` between pairs. Cert, Chain and Subject are quoted; By, Hash, URI and DNS are
# written as they are, so a SAN holding `,` `;` `"` or `=` reads as more pairs or elements.
_XFCC_ORDER = {"By": 0, "Hash": 1, "Cert": 2, "Chain": 3, "Subject": 4, "URI": 5, "DNS": 6}
_XFCC_QUOTED = frozenset(("Cert", "Chain", "Subject"))
_XFCC_REPEATED = frozenset(("By", "URI", "DNS"))
_XFCC_BARE = re.compile(r'[^\x00-\x20",;=\x7f-\U0010ffff]*')  # printable ASCII but , ; " =


class XfccError(ValueError):
    """An x-forwarded-client-cert header that is not one element as Envoy writes it."""


@dataclass(frozen=True, slots=True)
class XfccElement:
    uris: tuple[str, ...]
    dns: tuple[str, ...]
    subject: str

    def identity(self) -> Identity:
        return Identity.from_sans(True, self.uris, self.dns, self.subject)


def _xfcc_pairs(header: str) -> list[tuple[str, str]]:
    """The key=value pairs of one element; quoted values unquoted (backslash escapes)."""
    pairs: list[tuple[str, str]] = []
    at, end = 0, len(header)
    while True:
        key, sep, _ = header[at:].partition("=")
        if not sep or key not in _XFCC_ORDER:
            raise XfccError(f"no pair of a key Envoy writes at {header[at : at + 20]!r}")
        at += len(key) + 1
        if key in _XFCC_QUOTED:
            if header[at : at + 1] != '"':
                raise XfccError(f"{key} is not quoted")
            value, at = _quoted(header, at + 1)
        else:
            value = _XFCC_BARE.match(header, at).group()  # type: ignore[union-attr]
            at += len(value)
        pairs.append((key, value))
        if at == end:
            return pairs
        if header[at] == ",":
            raise XfccError("more than one element (Envoy's SANITIZE_SET writes one), or a SAN holding ','")
        if header[at] != ";":
            raise XfccError(f"{key}'s value holds {header[at]!r}")
        at += 1


def _quoted(header: str, at: int) -> tuple[str, int]:
    """A quoted value starting after its opening quote, as written (Envoy does not escape
    for XFCC; an RFC 2253 subject escapes `"` and `\\` itself), and where it ends."""
    start = at
    while at < len(header):
        if header[at] == "\\":
            at += 2
        elif header[at] == '"':
            return header[start:at], at + 1
        else:
            at += 1
    raise XfccError("a quoted value is not closed")


def parse_xfcc(header: str) -> XfccElement:
    """The one element of an `x-forwarded-client-cert` header as Envoy writes it with
    `SANITIZE_SET`: `Hash=..;Subject="CN=a";URI=spiffe://..;DNS=a.example.org`. Raises
    XfccError for anything else: several elements, a pair out of Envoy's order, a repeated
    Hash or Subject, a `URI=` that is empty beside others, a DNS value that is no DNS name.
    Values Envoy does not quote cannot be told from the separators around them, so a SAN
    holding `,` or `;` shows here as one of these (or as extra SANs, which only the caller
    can rule out: see the HTTP transport)."""
    uris: list[str] = []
    dns: list[str] = []
    subject = ""
    rank = -1
    for key, value in _xfcc_pairs(header):
        order = _XFCC_ORDER[key]
        if order < rank or (order == rank and key not in _XFCC_REPEATED):
            raise XfccError(f"{key} out of Envoy's order or repeated")
        rank = order
        if key == "URI":
            uris.append(value)
        elif key == "DNS":
            if not is_dns_name(value):
                raise XfccError(f"DNS value {value[:64]!r} is no DNS name")
            dns.append(value)
        elif key == "Subject":
            subject = value
    if "" in uris and len(uris) > 1:
        raise XfccError("an empty URI beside others (Envoy writes `URI=` only for no URI SAN)")
    return XfccElement(tuple(u for u in uris if u), tuple(dns), subject)


def identity_from_xfcc(header: str) -> Identity | None:
    """The identity named in an `x-forwarded-client-cert` header (see `parse_xfcc`); None if
    the header is not one element as Envoy writes it or names no URI or DNS SAN."""
    try:
        element = parse_xfcc(header)
    except XfccError:
        return None
    return element.identity() if element.uris or element.dns else None


def identity_from_first_sans(uri: str, dns: str, subject: str, xfcc: str | None) -> Identity:
    """From what Envoy's ext_proc attributes give: the certificate's FIRST URI SAN and first
    DNS SAN only. Whether the certificate has more URI SANs (then it is no SVID, as
    `from_sans` decides with all of them) shows in the `x-forwarded-client-cert` header
    Envoy writes (`parse_xfcc`): when it lists `uri` together with other URI SANs, they
    are taken as the certificate's and the peer gets no SPIFFE identity. So does a header
    that is not one element as Envoy writes it: a SAN of this certificate holds a
    separator, and its other URI SANs cannot be told (the DNS SAN Envoy gives is exact and
    stays).

    This is safe even when the client wrote that header itself (Envoy not sanitizing it):
    it can only take away the identity of the connection the request came on (the element
    must list that connection's URI SAN alone), never give one."""
    uri_sans: tuple[str, ...] = (uri,) if uri else ()
    unsure = False
    if uri and xfcc is not None:
        try:
            listed = parse_xfcc(xfcc).uris
        except XfccError:
            unsure = True
        else:
            if uri in listed and len(listed) > 1:
                others = list(listed)
                others.remove(uri)
                uri_sans = (uri, *others)
    identity = Identity.from_sans(True, uri_sans, (dns,) if dns else (), subject)
    if unsure and identity.spiffe is not None:
        return replace(identity, spiffe=None, malformed=uri_sans)
    return identity
