"""A request Envoy decided itself (envoy_decides), read back from the inputs its Lua filed.

With a decision log or a shadow table, the generated Lua files each decided request's inputs
as dynamic metadata (sidecar.core.lua_table.capture_inputs), and Envoy's gRPC access log
streams them to the sidecar: one string of fields joined by line feeds (the layout, method, path,
local address, the peer's kind and SANs, then header names and values: those the live and
the shadow table read, as received). This module turns them into the core's Request, as the
fast path would have seen the same request, so that the decision log and the shadow table
treat it as they treat every other mode's.

Everything here is untrusted input (anyone on the loopback can open the stream): another
layout, a method that is no token, a path without its `/`, a header name that is no
lower-case token or given twice, a SAN that `x-forwarded-client-cert` could not carry, text
that UTF-8 cannot encode, over MAX_HEADERS headers or MAX_INPUT_CHARS in all is refused
(InputsRefused, with a reason from a closed set, counted by the caller); nothing from it
becomes a label.
"""

import re

from sidecar.core import NO_IDENTITY, Identity, Request
from sidecar.core.lua_table import INPUTS_FORMAT
from sidecar.core.text import is_encodable

MAX_INPUT_CHARS = 96 * 1024  # Envoy's default header limit is 60 KiB, the path included
MAX_HEADERS = 128
FIXED_FIELDS = 7  # layout, method, path, address, peer kind, URI SANs, DNS SANs
_NAME = re.compile(r":authority|[a-z0-9!#$%&'*+.^_`|~-]+")
_METHOD = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,32}")
_BARE = re.compile(r"[!#-+\--:<>-~]+")  # printable ASCII but `"` `,` `;` `=`: what XFCC carries
MTLS_UNNAMED = Identity(mtls=True)  # as the fast path: a SAN XFCC cannot carry names no one


class InputsRefused(ValueError):
    """The inputs are not what the generated Lua writes; the message says what (a closed set)."""


def inputs_request(text: str) -> Request:
    """The Request of one entry's inputs (the string the Lua filed)."""
    if not text:
        raise InputsRefused("unread")  # a header that is not UTF-8: the Lua filed nothing
    if len(text) > MAX_INPUT_CHARS:
        raise InputsRefused("oversized")
    if not is_encodable(text):
        raise InputsRefused("text")
    fields = text.split("\n")
    if len(fields) < FIXED_FIELDS or (len(fields) - FIXED_FIELDS) % 2 or fields[0] != INPUTS_FORMAT:
        raise InputsRefused("layout")
    _, method, path, address, peer, uris, dns = fields[:FIXED_FIELDS]
    if not _METHOD.fullmatch(method) or not path.startswith("/"):
        raise InputsRefused("request_line")
    names, values = fields[FIXED_FIELDS::2], fields[FIXED_FIELDS + 1 :: 2]
    if len(names) > MAX_HEADERS or not all(_NAME.fullmatch(name) for name in names):
        raise InputsRefused("headers")
    headers = dict(zip(names, values, strict=True))
    if len(headers) != len(names):
        raise InputsRefused("headers")
    port_text = address.rpartition(":")[2]
    port = int(port_text) if port_text.isascii() and port_text.isdecimal() and len(port_text) <= 5 else None
    headers[":method"], headers[":path"] = method, path
    return Request(headers, method, path, _identity(peer, uris, dns), port)


def _identity(peer: str, uris: str, dns: str) -> Identity:
    if peer == "" and not uris and not dns:
        return NO_IDENTITY
    if peer == "u" and not uris and not dns:
        return MTLS_UNNAMED
    if peer != "m":
        raise InputsRefused("peer")
    uri_sans, dns_sans = tuple(uris.split(",")) if uris else (), tuple(dns.split(",")) if dns else ()
    if not all(_BARE.fullmatch(san) for san in (*uri_sans, *dns_sans)):
        raise InputsRefused("peer")
    return Identity.from_sans(True, uri_sans, dns_sans)
