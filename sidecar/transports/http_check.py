"""The fast path's messages, pure: an Envoy ext_authz check request (HTTP) -> the core
Request; a Steering -> the HTTP answer's bytes. The contract with the generated Envoy config
(paths, headers, what Envoy must sanitize) is sidecar.transports.authz_http's docstring."""

import http
import re

from sidecar.contract import (
    DECISION_HEADER_PREFIX,
    HEADERS_TO_REMOVE,
    LISTENER_PORT_HEADER,
    PATH_PREFIX,
    PEER_SAN_HEADERS,
    XFCC,
)
from sidecar.core import NO_IDENTITY, Identity, Request, Steering, decision_fields
from sidecar.core.xfcc import XfccError, parse_xfcc

DENY_STATUS_INSTEAD_OF_5XX = 403
# A connection with a client certificate whose XFCC element names no URI or DNS SAN.
MTLS_UNNAMED = Identity(mtls=True)
# Headers that describe the check request itself (Envoy's async client adds the x-envoy ones),
# not the request being checked.
_CHECK_ONLY = (
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "x-envoy-internal",
    "x-envoy-expected-rq-timeout-ms",
)
_URI_SANS, _DNS_SANS = PEER_SAN_HEADERS
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def check_request(
    method: str, target: str, headers: dict[str, str], path_prefix: str = PATH_PREFIX
) -> Request:
    """The core Request for one check: `target` without `path_prefix`, `headers` lower-cased
    (repeats joined), as the ext_proc adapter sees them (`:method`, `:path`, `:authority`).
    Consumes `headers`."""
    pop = headers.pop
    for name in _CHECK_ONLY:
        pop(name, None)
    port_text = pop(LISTENER_PORT_HEADER, "")
    # ASCII digits only: str.isdecimal() and int() also take other scripts' digits (Arabic-Indic, full-width)
    port = int(port_text) if port_text.isascii() and port_text.isdecimal() and len(port_text) <= 5 else None
    if "host" in headers:
        headers[":authority"] = pop("host")
    path = target[len(path_prefix) :] if path_prefix and target.startswith(path_prefix) else target
    path = path or "/"
    headers[":method"] = method
    headers[":path"] = path
    uri_sans, dns_sans = pop(_URI_SANS, None), pop(_DNS_SANS, None)
    identity = xfcc_identity(headers[XFCC], uri_sans, dns_sans) if XFCC in headers else NO_IDENTITY
    return Request(headers, method, path, identity, port)


def xfcc_identity(xfcc: str, uri_sans: str | None, dns_sans: str | None) -> Identity:
    """The identity in Envoy's `x-forwarded-client-cert`, when its SANs are exactly those of
    the PEER_SAN_HEADERS (see the module docstring); else MTLS_UNNAMED. The header has no
    `,` (one element), so each list joined by `,` is the certificate's only when equal."""
    try:
        element = parse_xfcc(xfcc)
    except XfccError:
        return MTLS_UNNAMED
    if uri_sans != f"[{','.join(element.uris)}]" or dns_sans != f"[{','.join(element.dns)}]":
        return MTLS_UNNAMED
    return element.identity()


def _value(text: str) -> str:
    """A header value that cannot break the answer's framing (rule texts are free-form)."""
    return _CONTROL.sub(lambda m: f"%{ord(m.group()):02X}", text)


def _head(status: int, fields: list[tuple[str, str]], body: bytes, head_only: bool = False) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Denied"
    lines = [f"HTTP/1.1 {status} {phrase}", f"content-length: {len(body)}"]
    lines += [f"{name}: {_value(value)}" for name, value in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else body)


def answer_bytes(steering: Steering, head_only: bool = False) -> bytes:
    """The HTTP answer to one check (see the module docstring). `head_only` for HEAD."""
    decision = steering.decision
    fields = [
        (DECISION_HEADER_PREFIX + key.replace("_", "-"), str(value))
        for key, value in decision_fields(decision).items()
    ]
    if decision.deny_status is not None:
        status = decision.deny_status if decision.deny_status < 500 else DENY_STATUS_INSTEAD_OF_5XX
        body = (decision.deny_reason or "").encode()
        return _head(status, [("content-type", "text/plain; charset=utf-8"), *fields], body, head_only)
    fields = list(steering.set_headers) + fields
    # for the client's response (Envoy's allowed_client_headers_on_success): an issued key's cookie
    fields += steering.response_headers
    if steering.remove_headers:
        fields.append((HEADERS_TO_REMOVE, ",".join(steering.remove_headers)))
    return _head(200, fields, b"", head_only)


def plain_answer(status: int, text: str, close: bool = False) -> bytes:
    fields = [("content-type", "text/plain; charset=utf-8")] + ([("connection", "close")] if close else [])
    return _head(status, fields, text.encode())
