"""A request Envoy decided itself (envoy_decides), read back from the inputs its Lua filed.

With a decision log or a shadow table, the generated Lua files each decided request's inputs
as dynamic metadata (sidecar.core.lua_table.capture_inputs), and Envoy's gRPC access log
streams them to the sidecar: the headers the live and the shadow table read, `:path`,
`:method`, the local address and the peer certificate's SANs, as received. This module
turns them into the core's Request, as the fast path would have seen the same request, so
the decision log and the shadow table treat it as they treat every other mode's.

Everything here is untrusted input (anyone on the loopback can open the stream): a value of
the wrong type, a header name that is no lower-case token, text that UTF-8 cannot encode,
more than MAX_HEADERS headers or MAX_INPUT_BYTES in all is refused (InputsRefused, a short
reason, counted by the caller); nothing from it becomes a label.
"""

import re
from collections.abc import Mapping

from google.protobuf import struct_pb2

from sidecar.core import NO_IDENTITY, Identity, Request
from sidecar.core.text import is_encodable

MAX_INPUT_BYTES = 96 * 1024  # Envoy's default header limit is 60 KiB, the path included
MAX_HEADERS = 128
MAX_SANS = 64
_NAME = re.compile(r":authority|[a-z0-9!#$%&'*+.^_`|~-]+")
_BARE = re.compile(r"[!#-+\--:<>-~]+")  # printable ASCII but `"` `,` `;` `=`: what XFCC carries
MTLS_UNNAMED = Identity(mtls=True)  # as the fast path: a SAN XFCC cannot carry names no one


class InputsRefused(ValueError):
    """The inputs are not what the generated Lua writes; the message says what (bounded)."""


def inputs_request(inputs: struct_pb2.Struct) -> Request:
    """The Request of one entry's inputs."""
    if inputs.ByteSize() > MAX_INPUT_BYTES:
        raise InputsRefused("oversized")
    fields = inputs.fields
    if "unread" in fields:
        raise InputsRefused("unread")  # a header that is not UTF-8: the Lua left it out
    headers = _headers(fields.get("headers"))
    method, path = _text(fields, "method"), _text(fields, "path")
    if not method or not path.startswith("/"):
        raise InputsRefused("request_line")
    address = _text(fields, "address")
    port_text = address.rpartition(":")[2]
    port = int(port_text) if port_text.isascii() and port_text.isdecimal() and len(port_text) <= 5 else None
    identity = NO_IDENTITY
    if _flag(fields, "mtls"):
        uris, dns = _list(fields.get("uri")), _list(fields.get("dns"))
        bare = all(_BARE.fullmatch(san) for san in (*uris, *dns))
        identity = Identity.from_sans(True, uris, dns) if bare else MTLS_UNNAMED
    headers[":method"], headers[":path"] = method, path
    return Request(headers, method, path, identity, port)


def _headers(value: struct_pb2.Value | None) -> dict[str, str]:
    if value is None:
        return {}
    kind = value.WhichOneof("kind")
    if kind == "list_value" and not value.list_value.values:
        return {}  # an empty Lua table may arrive as an empty list
    if kind != "struct_value":
        raise InputsRefused("headers")
    fields = value.struct_value.fields
    if len(fields) > MAX_HEADERS:
        raise InputsRefused("headers")
    headers = {}
    for name, item in fields.items():
        if not _NAME.fullmatch(name) or item.WhichOneof("kind") != "string_value":
            raise InputsRefused("headers")
        headers[name] = _checked(item.string_value)
    return headers


def _text(fields: Mapping[str, struct_pb2.Value], name: str) -> str:
    item = fields.get(name)
    if item is None or item.WhichOneof("kind") != "string_value":
        raise InputsRefused(name)
    return _checked(item.string_value)


def _flag(fields: Mapping[str, struct_pb2.Value], name: str) -> bool:
    item = fields.get(name)
    return item is not None and item.WhichOneof("kind") == "bool_value" and item.bool_value


def _list(value: struct_pb2.Value | None) -> tuple[str, ...]:
    if value is None:
        return ()
    kind = value.WhichOneof("kind")
    if kind == "struct_value" and not value.struct_value.fields:
        return ()  # an empty Lua table may arrive as an empty struct
    if kind != "list_value" or len(value.list_value.values) > MAX_SANS:
        raise InputsRefused("sans")
    items = value.list_value.values
    if any(item.WhichOneof("kind") != "string_value" for item in items):
        raise InputsRefused("sans")
    return tuple(_checked(item.string_value) for item in items)


def _checked(text: str) -> str:
    if not is_encodable(text):
        raise InputsRefused("text")
    return text
