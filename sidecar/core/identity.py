"""The client's workload identity and the matchers that test it.

An `Identity` is what the adapters could establish about the peer: whether the
connection used mTLS, the certificate's URI SANs, DNS SANs and subject, and its SPIFFE ID.
SPIFFE IDs are parsed and validated here (spec: trust domain of at most 255 lower-case
letters, digits, `.`, `-`, `_`; a non-empty path of segments of letters, digits, `.`, `-`,
`_`, no empty, `.` or `..` segment, no query or fragment); a malformed one is not an
identity. An X509-SVID has exactly one URI SAN: a certificate with several has no SPIFFE
identity at all. A DNS SAN must be a DNS name to count. (`x-forwarded-client-cert` is
sidecar.core.xfcc's; the rules' regexes sidecar.core.regex's.)
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sidecar.core.regex import FullMatch, compile_regex, regex_problem

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_PATH_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-/")
MAX_TRUST_DOMAIN = 255  # SPIFFE-ID spec
MAX_SPIFFE_ID = 2048  # SPIFFE-ID spec (bytes; the IDs accepted here are ASCII)


# ---- SPIFFE IDs ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    path: str  # "/seg/seg", never empty: a workload (leaf) ID

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"


def parse_spiffe_id(uri: str) -> SpiffeId | None:
    """`spiffe://example.org/ns/qa/sa/tester` -> SpiffeId, or None when not a valid workload
    SPIFFE ID (`spiffe://example.org` alone names the trust domain, no workload)."""
    if not uri.startswith("spiffe://") or len(uri) > MAX_SPIFFE_ID:
        return None
    domain, slash, path = uri[len("spiffe://") :].partition("/")
    if not slash or len(domain) > MAX_TRUST_DOMAIN or not _TRUST_DOMAIN.fullmatch(domain):
        return None
    if any(s in ("", ".", "..") or not _SEGMENT.fullmatch(s) for s in path.split("/")):
        return None
    return SpiffeId(domain, "/" + path)


def trust_domain_problem(domain: str) -> str | None:
    """Why `domain` is not a trust domain name, or None."""
    if domain.startswith("spiffe:") or "/" in domain:
        return f"{domain!r}: write the trust domain alone (e.g. 'example.org'), without spiffe:// or a path"
    if not domain:
        return "the trust domain is empty"
    if len(domain) > MAX_TRUST_DOMAIN:
        return f"trust domain longer than {MAX_TRUST_DOMAIN} characters"
    if _TRUST_DOMAIN.fullmatch(domain):
        return None
    if _TRUST_DOMAIN.fullmatch(domain.lower()):
        return (
            f"trust domains are lower-case: write {domain.lower()!r} ({domain!r} could never "
            "match a valid SPIFFE ID)"
        )
    return f"{domain!r}: a trust domain holds only lower-case letters, digits, '.', '-' and '_'"


def spiffe_id_problem(uri: str) -> str | None:
    """Why `uri` is not a valid workload SPIFFE ID, or None."""
    if parse_spiffe_id(uri) is not None:
        return None
    domain, slash, _ = uri.removeprefix("spiffe://").partition("/")
    if uri.startswith("spiffe://") and (problem := trust_domain_problem(domain)):
        return problem
    if uri.startswith("spiffe://") and not slash:
        return f"{uri!r} has no path: it names a trust domain, not a workload"
    return (
        f"{uri!r} is not a valid SPIFFE ID (spiffe://<trust domain>/<path>; path segments "
        "of letters, digits, '.', '-', '_'; no empty, '.' or '..' segment, query or fragment)"
    )


_DNS_NAME = re.compile(r"(\*\.)?[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*")
MAX_DNS_NAME = 253


def is_dns_name(name: str) -> bool:
    """A DNS SAN as a certificate should hold it: labels of letters, digits, '-' and '_', at
    most 63 characters each, joined by '.'; a leading `*.` wildcard label; at most 253
    characters."""
    return len(name) <= MAX_DNS_NAME and _DNS_NAME.fullmatch(name) is not None


def _looks_like_spiffe(uri: str) -> bool:
    return uri[:7].lower() == "spiffe:"


@dataclass(frozen=True, slots=True)
class Identity:
    """What is known of the peer. `spiffe` is the certificate's SPIFFE ID: its only URI SAN,
    when that is a valid one. `dns_sans` holds only DNS names; other DNS SANs are in
    `malformed_dns` and never match."""

    mtls: bool = False
    uri_sans: tuple[str, ...] = ()
    dns_sans: tuple[str, ...] = ()
    subject: str = ""
    spiffe: SpiffeId | None = None
    malformed: tuple[str, ...] = ()  # SANs that looked like SPIFFE IDs but are not (counted)
    malformed_dns: tuple[str, ...] = ()  # DNS SANs that are no DNS names (counted)

    @classmethod
    def from_sans(
        cls, mtls: bool, uri_sans: tuple[str, ...] = (), dns_sans: tuple[str, ...] = (), subject: str = ""
    ) -> "Identity":
        """From every SAN of a certificate. X509-SVID: an SVID has exactly one URI SAN and a
        certificate with several must be rejected; it gets no SPIFFE identity, and those of its
        URI SANs that look like SPIFFE IDs are reported malformed (so metrics show it). A DNS
        SAN that is no DNS name (`is_dns_name`) is set aside as malformed: `x,y.example.org`
        must not pass for a name under `*.example.org`."""
        spiffe = parse_spiffe_id(uri_sans[0]) if len(uri_sans) == 1 else None
        malformed = () if spiffe else tuple(u for u in uri_sans if _looks_like_spiffe(u))
        names = tuple(d for d in dns_sans if is_dns_name(d))
        odd = tuple(d for d in dns_sans if not is_dns_name(d)) if len(names) < len(dns_sans) else ()
        return cls(mtls, uri_sans, names, subject, spiffe, malformed, odd)

    @property
    def principal(self) -> str:
        """The name shown in decisions: the SPIFFE ID, else the first DNS SAN, else ""."""
        if self.spiffe is not None:
            return str(self.spiffe)
        return self.dns_sans[0] if self.dns_sans else ""


NO_IDENTITY = Identity()

IdentityMatcher = Callable[[Identity], bool]


# ---- identity matchers ---------------------------------------------------------------------------


def identity_form_problem(form: dict[str, Any]) -> str | None:
    """Why an identity matcher form (one key) is refused, or None. Refused: what could never
    match (an upper-case trust domain, an invalid SPIFFE ID) and what would match more than it
    says (a glob that crosses the trust domain, a DNS wildcard other than one left-most label)."""
    if "exact" in form:
        return spiffe_id_problem(str(form["exact"]))
    if "glob" in form:
        return _glob_problem(str(form["glob"]))
    if "trust_domain" in form:
        return trust_domain_problem(str(form["trust_domain"]))
    if "regex" in form:
        return regex_problem(str(form["regex"]))
    if "dns" in form:
        return _dns_problem(str(form["dns"]))
    return None


def _glob_problem(glob: str) -> str | None:
    if not glob.startswith("spiffe://") or "/" not in glob[len("spiffe://") :]:
        if glob.startswith("spiffe://") and not any(c in glob for c in "*?[]"):
            return spiffe_id_problem(glob)  # a glob without wildcards is exactly one ID
        return (
            f"{glob!r}: a SPIFFE glob needs a literal trust domain: it starts with "
            "spiffe://<trust domain>/ (e.g. spiffe://example.org/ns/qa/*) or is exactly a "
            "SPIFFE ID"
        )
    domain, _, path = glob[len("spiffe://") :].partition("/")
    if any(c in domain for c in "*?[]"):
        return (
            f"{glob!r}: a SPIFFE glob needs a literal trust domain: "
            "spiffe://<trust domain>/... (`*` matches within the path only)"
        )
    if problem := trust_domain_problem(domain):
        return problem
    if any(c in path for c in "?[]"):
        return (
            f"{glob!r}: only `*` is a wildcard in a SPIFFE glob (any characters within the "
            "path, `/` included); `?`, `[` and `]` are not supported"
        )
    if "*" not in path:
        return spiffe_id_problem(glob)
    foreign = sorted({c for c in path if c not in _PATH_CHARACTERS and c != "*"})
    if foreign:
        return (
            f"{glob!r} can never match: SPIFFE ID paths hold only letters, digits, '.', "
            f"'-', '_' and '/', not {', '.join(repr(c) for c in foreign)}"
        )
    return None


def _glob_matcher(glob: str) -> FullMatch:
    """`*` matches any characters, the rest is literal. Validated globs put the trust domain
    and the `/` after it before any `*`, so a match never leaves the trust domain. Matched
    without a regex: the literal pieces in order, leftmost first, which is exact for `*`-only
    patterns and linear in practice (no backtracking)."""
    if "*" not in glob:
        return lambda text: text == glob
    first, *middle, last = glob.split("*")

    def matches(text: str) -> bool:
        start, end = len(first), len(text) - len(last)
        if end < start or not text.startswith(first) or not text.endswith(last):
            return False
        for piece in middle:
            found = text.find(piece, start, end)
            if found < 0:
                return False
            start = found + len(piece)
        return True

    return matches


def _dns_problem(pattern: str) -> str | None:
    if any(c in pattern for c in "?[]"):
        return (
            f"{pattern!r}: only `*` is a wildcard in a DNS pattern, as the whole left-most "
            "label (`*.example.org`); `?`, `[` and `]` are not supported"
        )
    labels = pattern.split(".")
    if "*" in pattern and (labels[0] != "*" or len(labels) < 2 or "*" in ".".join(labels[1:])):
        return (
            f"{pattern!r}: a DNS wildcard is `*` as the whole left-most label "
            "(`*.example.org`, matching exactly one label, as RFC 6125 and Envoy)"
        )
    if "" in labels:
        return f"{pattern!r}: a DNS name has no empty label"
    return None


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _dns_matcher(pattern: str) -> Callable[[str], bool]:
    """A DNS SAN test, ASCII case-insensitive (as Envoy's). `*.example.org` matches exactly one
    left-most label: `a.example.org`, not `a.b.example.org`, `.example.org`, `example.org` or
    a SAN that is itself the wildcard `*.example.org`."""
    pattern = pattern.translate(_ASCII_LOWER)
    if not pattern.startswith("*."):
        return lambda name: name.translate(_ASCII_LOWER) == pattern
    suffix = pattern[1:]  # ".example.org"

    def matches(name: str) -> bool:
        name = name.translate(_ASCII_LOWER)
        label = name[: -len(suffix)]
        return name.endswith(suffix) and bool(label) and "." not in label and "*" not in label

    return matches


def identity_matcher(form: dict[str, Any]) -> IdentityMatcher:
    """One of: exact (a SPIFFE ID), glob (`spiffe://example.org/ns/qa/*`: `*` matches any
    characters within the path), trust_domain, regex (RE2, full match on the SPIFFE ID), dns
    (a DNS SAN; `*.` matches one left-most label), present, absent. The form must have passed
    `identity_form_problem`."""
    if "exact" in form:
        exact = parse_spiffe_id(str(form["exact"]))
        return lambda identity: identity.spiffe is not None and identity.spiffe == exact
    if "glob" in form:
        return _spiffe_test(_glob_matcher(str(form["glob"])))
    if "trust_domain" in form:
        domain = str(form["trust_domain"])
        return lambda identity: identity.spiffe is not None and identity.spiffe.trust_domain == domain
    if "regex" in form:
        return _spiffe_test(compile_regex(str(form["regex"])))
    if "dns" in form:
        dns = _dns_matcher(str(form["dns"]))
        return lambda identity: any(dns(name) for name in identity.dns_sans)
    if form.get("present"):
        return lambda identity: bool(identity.principal)
    return lambda identity: not identity.principal


def _spiffe_test(matches: FullMatch) -> IdentityMatcher:
    return lambda identity: identity.spiffe is not None and matches(str(identity.spiffe))
