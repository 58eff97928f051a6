"""`graysteer explain`: decide a described request through the serving code path.

The request is turned into the very ext_proc message Envoy would send and handed
to the same servicer method that answers Envoy, so explain cannot drift from serving.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry

from sidecar.contract import ATTRIBUTES_KEY
from sidecar.core.request import DEFAULT_AUTHORITY
from sidecar.ops.metrics import Metrics
from sidecar.table.decider import Decider
from sidecar.table.holder import TableHolder
from sidecar.table.load import load_rules
from sidecar.transports.ext_proc import ExtProcServicer


@dataclass(frozen=True)
class Peer:
    """The connection a described request arrives on (what Envoy's attributes would say)."""

    uri_san: str = ""  # e.g. spiffe://example.org/ns/qa/sa/tester; implies mTLS
    dns_san: str = ""  # implies mTLS
    listener_port: int | None = None

    def attributes(self) -> struct_pb2.Struct:
        fields: dict[str, object] = {"connection.mtls": bool(self.uri_san or self.dns_san)}
        if self.uri_san:
            fields["connection.uri_san_peer_certificate"] = self.uri_san
        if self.dns_san:
            fields["connection.dns_san_peer_certificate"] = self.dns_san
        if self.listener_port is not None:
            fields["destination.port"] = self.listener_port
        attributes = struct_pb2.Struct()
        attributes.update(fields)
        return attributes


def headers_message(
    method: str,
    path: str,
    headers: Sequence[tuple[str, str]],
    cookies: Sequence[tuple[str, str]] = (),
    params: Sequence[tuple[str, str]] = (),
    peer: Peer = Peer(),
) -> ep.ProcessingRequest:
    """The ext_proc request_headers message Envoy would send for this request. A `host` or
    `:authority` header is the request's authority (Envoy turns HTTP/1's Host into
    `:authority`); without one it is DEFAULT_AUTHORITY."""
    if params:
        path += ("&" if "?" in path else "?") + urlencode(list(params))
    authority = DEFAULT_AUTHORITY
    rest = []
    for name, value in headers:
        if name.lower() in ("host", ":authority"):
            authority = value
        else:
            rest.append((name, value))
    pairs = [
        (":method", method.upper()),
        (":path", path),
        (":scheme", "http"),
        (":authority", authority),
        *rest,
    ]
    if cookies:
        pairs.append(("cookie", "; ".join(f"{k}={v}" for k, v in cookies)))
    header_map = base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k.lower(), raw_value=v.encode()) for k, v in pairs]
    )
    message = ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=header_map, end_of_stream=True))
    message.attributes[ATTRIBUTES_KEY].CopyFrom(peer.attributes())
    return message


def explain_local(
    config: str,
    method: str,
    path: str,
    headers: Sequence[tuple[str, str]],
    cookies: Sequence[tuple[str, str]] = (),
    params: Sequence[tuple[str, str]] = (),
    peer: Peer = Peer(),
) -> dict[str, object]:
    """The decision for a described request, against a rules file."""
    table = load_rules(config)
    # draw_key None: a visitor's new key derived from the request, the same answer each time
    servicer = ExtProcServicer(Decider(TableHolder(table), Metrics(CollectorRegistry()), draw_key=None))
    response, decision = servicer.on_request_headers(
        headers_message(method, path, headers, cookies, params, peer)
    )
    effects = response_effects(response)
    if decision.issued is not None:  # what the client's response gets besides the backend's
        effects["response_headers"] = {"set-cookie": decision.issued.set_cookie}
    return {**decision.as_dict(), **effects, "source": table.source}


def response_effects(response: ep.ProcessingResponse) -> dict[str, object]:
    """What an ext_proc answer does to the request: headers set and removed."""
    mutation = response.request_headers.response.header_mutation
    return {
        "set_headers": {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers},
        "remove_headers": list(mutation.remove_headers),
    }


# The decision's fields that say where a request went and why (not the table's version,
# which changes with any edit, nor the identity, which the request carries).
COMPARED = ("cluster", "rule", "reason", "bucket", "lane", "mirror", "deny_status")
NEW_KEY_FIELDS = ("cluster", "bucket", "lane", "mirror")  # follow a new visitor's random key


def read_log_line(line: str) -> dict[str, Any]:
    """A decision log line's record; ValueError when it is not JSON that orjson reads: it
    refuses lone surrogates (the C extensions' hazard, see sidecar.core.text) and nesting past
    1,024 levels, where the standard json module takes the one and recurses out on the other."""
    record = orjson.loads(line)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    return record


def logged_request(line: str) -> tuple[str, str, list[tuple[str, str]], Peer, list[str]]:
    """(method, path, headers, peer, redacted header names) of a decision log line
    (sidecar.ops.decision_log); ValueError when it is not one."""
    from sidecar.ops.decision_log import REDACTED, replayed_path

    try:
        record = read_log_line(line)
        method, headers = str(record["method"]), dict(record["headers"])
        path, params = replayed_path(str(record["path"]))
        decision = dict(record["decision"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"not a decision log line: {error}") from None
    if not isinstance(decision, dict):
        raise ValueError("not a decision log line: no decision")
    identity = str(record.get("identity") or "")
    port = record.get("listener_port")
    peer = Peer(
        identity if identity.startswith("spiffe://") else "",
        identity if identity and not identity.startswith("spiffe://") else "",
        port if isinstance(port, int) else None,
    )
    redacted = sorted(name for name, value in headers.items() if value == REDACTED)
    redacted += [f"query:{name}" for name in params]
    kept = [(name, str(value)) for name, value in headers.items() if value != REDACTED]
    return method, path, kept, peer, redacted


def compare_logged(line: str, today: dict[str, object]) -> dict[str, object]:
    """The logged decision beside today's, and whether it is the same (see COMPARED)."""
    record = read_log_line(line)
    logged = dict(record["decision"])
    compared: tuple[str, ...] = COMPARED
    if logged.get("issued_cookie") or today.get("issued_cookie"):
        # a key issued to a visitor without one is random: where it went cannot be replayed
        compared = tuple(name for name in COMPARED if name not in NEW_KEY_FIELDS)
    differences = {
        name: [logged.get(name), today.get(name)] for name in compared if logged.get(name) != today.get(name)
    }
    result = {"logged": logged, "today": today, "same": not differences, "differences": differences}
    if record.get("truncated"):  # values and the path cut: decided on what was kept
        result["truncated"] = True
    return result
