"""The client's workload identity and the matchers that test it.

An `Identity` is what the adapters could establish about the peer: whether the
connection used mTLS, the certificate's URI SANs (SPIFFE IDs among them), DNS SANs and
subject. SPIFFE IDs are parsed and validated here (spec: trust domain of lower-case
letters, digits, `.`, `-`, `_`; path segments of letters, digits, `.`, `-`, `_`, no
empty, `.` or `..` segment, no query or fragment); a malformed one is not an identity.
"""

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    path: str  # "" or "/seg/seg"

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"


def parse_spiffe_id(uri: str) -> SpiffeId | None:
    """`spiffe://example.org/ns/qa/sa/tester` -> SpiffeId, or None when not a valid SPIFFE ID."""
    if not uri.startswith("spiffe://") or len(uri) > 2048:
        return None
    rest = uri[len("spiffe://"):]
    domain, slash, path = rest.partition("/")
    if not _TRUST_DOMAIN.fullmatch(domain):
        return None
    if not slash:
        return SpiffeId(domain, "")
    segments = path.split("/")
    if any(s in ("", ".", "..") or not _SEGMENT.fullmatch(s) for s in segments):
        return None
    return SpiffeId(domain, "/" + path)


@dataclass(frozen=True, slots=True)
class Identity:
    """What is known of the peer. `spiffe_ids` are the valid SPIFFE IDs among the URI SANs
    (matchers accept any of them); `spiffe` is the first, the one decisions show."""

    mtls: bool = False
    uri_sans: tuple[str, ...] = ()
    dns_sans: tuple[str, ...] = ()
    subject: str = ""
    spiffe_ids: tuple[SpiffeId, ...] = ()
    malformed: tuple[str, ...] = ()  # SANs that looked like SPIFFE IDs but were not valid

    @property
    def spiffe(self) -> SpiffeId | None:
        return self.spiffe_ids[0] if self.spiffe_ids else None

    @classmethod
    def from_sans(cls, mtls: bool, uri_sans: tuple[str, ...] = (), dns_sans: tuple[str, ...] = (),
                  subject: str = "") -> "Identity":
        valid, malformed = [], []
        for uri in uri_sans:
            parsed = parse_spiffe_id(uri)
            if parsed is not None:
                valid.append(parsed)
            elif uri.startswith("spiffe:"):
                malformed.append(uri)
        return cls(mtls, uri_sans, dns_sans, subject, tuple(valid), tuple(malformed))

    @property
    def principal(self) -> str:
        """The name shown in decisions: the SPIFFE ID, else the first DNS SAN, else ""."""
        if self.spiffe is not None:
            return str(self.spiffe)
        return self.dns_sans[0] if self.dns_sans else ""


NO_IDENTITY = Identity()

IdentityMatcher = Callable[[Identity], bool]


def identity_matcher(form: dict[str, object]) -> IdentityMatcher:
    """One of: exact (a SPIFFE ID), glob (`spiffe://example.org/ns/qa/*`), trust_domain,
    regex (full match on the SPIFFE ID), dns (a DNS SAN, glob allowed), present, absent."""
    if "exact" in form:
        exact = str(form["exact"])
        return lambda identity: any(str(i) == exact for i in identity.spiffe_ids)
    if "glob" in form:
        pattern = re.compile(fnmatch.translate(str(form["glob"])))
        return lambda identity: any(pattern.match(str(i)) for i in identity.spiffe_ids)
    if "trust_domain" in form:
        domain = str(form["trust_domain"])
        return lambda identity: any(i.trust_domain == domain for i in identity.spiffe_ids)
    if "regex" in form:
        regex = re.compile(str(form["regex"]))
        return lambda identity: any(regex.fullmatch(str(i)) for i in identity.spiffe_ids)
    if "dns" in form:
        dns = re.compile(fnmatch.translate(str(form["dns"]).lower()))
        return lambda identity: any(dns.match(name.lower()) for name in identity.dns_sans)
    if form.get("present"):
        return lambda identity: bool(identity.principal)
    return lambda identity: not identity.principal


def _split_unquoted(text: str, separator: str) -> list[str]:
    """Split on `separator` outside double quotes (backslash escapes inside quotes)."""
    parts, current, quoted, escaped = [], [], False, False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def identity_from_xfcc(header: str) -> Identity | None:
    """The identity in the last (nearest) element of an `x-forwarded-client-cert` header:
    `Hash=..;Subject="CN=a";URI=spiffe://..;DNS=a.example.org`. None if malformed."""
    elements = _split_unquoted(header, ",")
    uris: list[str] = []
    dns: list[str] = []
    subject = ""
    for pair in _split_unquoted(elements[-1], ";"):
        key, sep, value = pair.strip().partition("=")
        if not sep:
            return None
        key = key.strip().lower()
        if key == "uri":
            uris.append(value)
        elif key == "dns":
            dns.append(value)
        elif key == "subject":
            subject = value
    if not uris and not dns:
        return None
    return Identity.from_sans(True, tuple(uris), tuple(dns), subject)
