"""The Envoy ext_proc servicer: one bidirectional stream per HTTP request.

On request headers it steers (sidecar.core.steering) and answers with the routing and
color headers (raw_value, OVERWRITE_IF_EXISTS_OR_ADD), the removal of untrusted
override headers, clear_route_cache, and the decision as dynamic metadata under the
`graysteer` namespace; a deny rule gets an immediate response. Every other message kind gets the one
empty answer of its own kind, so no processing_mode produces spurious messages.
"""

import logging
from collections.abc import AsyncIterator
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from sidecar.contract import ATTRIBUTES_KEY, DENIED_DETAILS, METADATA_NAMESPACE, XFCC
from sidecar.core import NO_IDENTITY, Decision, Identity, Request, Steering, decision_fields
from sidecar.core.request import add_header
from sidecar.core.text import header_text
from sidecar.core.xfcc import identity_from_first_sans
from sidecar.table.decider import Decider
from sidecar.transports.answers import AnswerCache

log = logging.getLogger("graysteer.extproc")

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
# What a request that is issued a key asks Envoy for (`mode_override`): its response headers,
# to add the cookie. The generated filter allows exactly this override (sidecar.envoyconf.filters).
RESPONSE_HEADERS_MODE = ProcessingMode(
    request_header_mode=ProcessingMode.SEND,
    response_header_mode=ProcessingMode.SEND,
    request_body_mode=ProcessingMode.NONE,
    response_body_mode=ProcessingMode.NONE,
    request_trailer_mode=ProcessingMode.SKIP,
    response_trailer_mode=ProcessingMode.SKIP,
)

# The answer to each message kind that carries no decision: "continue unchanged".
_PASS_THROUGH = {
    "response_headers": ep.ProcessingResponse(response_headers=ep.HeadersResponse()),
    "request_body": ep.ProcessingResponse(request_body=ep.BodyResponse()),
    "response_body": ep.ProcessingResponse(response_body=ep.BodyResponse()),
    "request_trailers": ep.ProcessingResponse(request_trailers=ep.TrailersResponse()),
    "response_trailers": ep.ProcessingResponse(response_trailers=ep.TrailersResponse()),
}
_PASS_THROUGH_BYTES = {kind: answer.SerializeToString() for kind, answer in _PASS_THROUGH.items()}

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


def add_to_server(servicer: "ExtProcServicer", server: Any) -> None:
    """Register the servicer. Its stream yields answers already serialized (bytes, from the
    servicer's AnswerCache), which grpc passes through when there is no serializer: no
    Python call per answer."""
    import grpc

    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Process": grpc.stream_stream_rpc_method_handler(
                        servicer.Process,
                        request_deserializer=ep.ProcessingRequest.FromString,
                        response_serializer=None,
                    )
                },
            ),
        )
    )


def header_dict(header_map: Any) -> dict[str, str]:
    """Envoy's HeaderMap -> {lower-case name: value}. Envoy sends values in raw_value;
    repeated headers are joined as HTTP allows (`,`; `; ` for cookie)."""
    headers: dict[str, str] = {}
    for entry in header_map.headers:  # once per header: each protobuf field read once
        raw = entry.raw_value
        value = header_text(raw) if raw else entry.value
        name = entry.key.lower()
        if name in headers:
            add_header(headers, name, value)
        else:
            headers[name] = value
    return headers


def decision_metadata(decision: Decision) -> struct_pb2.Struct:
    """The decision as dynamic metadata: `%DYNAMIC_METADATA(graysteer:rule)%` in access logs."""
    metadata = struct_pb2.Struct()
    metadata.get_or_create_struct(METADATA_NAMESPACE).update(decision_fields(decision))
    return metadata


def connection_identity(message: ep.ProcessingRequest) -> tuple[Identity, int | None]:
    """The peer's identity and the local port from the request attributes Envoy sends
    (`connection.mtls`, `connection.*_peer_certificate`, `destination.port`). Envoy gives
    only the first URI SAN and the first DNS SAN; whether the certificate has other URI SANs
    (then it is no SVID: no SPIFFE identity, as in ext_authz, which reads them all) is read
    from the request's `x-forwarded-client-cert` when present (see core.xfcc.identity_from_first_sans).
    That header can only take the connection's identity away, never add one, so this holds
    even when the client sent it itself and Envoy passed it on."""
    attributes = message.attributes.get(ATTRIBUTES_KEY)  # one lookup per map: `in` then `[]` is two
    if attributes is None:
        return NO_IDENTITY, None
    fields = attributes.fields

    def text(name: str) -> str:
        value = fields.get(name)
        return "" if value is None else value.string_value

    port_value = fields.get("destination.port")
    port = None if port_value is None else int(port_value.number_value)
    mtls = fields.get("connection.mtls")
    if mtls is None or not mtls.bool_value:
        return NO_IDENTITY, port
    uri = text("connection.uri_san_peer_certificate")
    xfcc = None
    if uri:  # repeated headers joined with "," (XFCC's element separator), as header_dict does
        values = [
            header_text(entry.raw_value) if entry.raw_value else entry.value
            for entry in message.request_headers.headers.headers
            if entry.key.lower() == XFCC
        ]
        xfcc = ",".join(values) or None
    identity = identity_from_first_sans(
        uri, text("connection.dns_san_peer_certificate"), text("connection.subject_peer_certificate"), xfcc
    )
    return identity, port


def steering_response(steering: Steering) -> ep.ProcessingResponse:
    """Deny with an immediate response; or set the routing (and color) headers, remove the
    untrusted ones, and make Envoy pick the route again."""
    decision = steering.decision
    if decision.deny_status is not None:
        return ep.ProcessingResponse(
            immediate_response=ep.ImmediateResponse(
                status=http_status_pb2.HttpStatus(code=decision.deny_status),
                body=(decision.deny_reason or "").encode(),
                details=DENIED_DETAILS,
            ),
            dynamic_metadata=decision_metadata(decision),
        )
    mutation = ep.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=name, raw_value=value.encode()), append_action=_OVERWRITE
            )
            for name, value in steering.set_headers
        ],
        remove_headers=list(steering.remove_headers),
    )
    answer = ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(
            response=ep.CommonResponse(header_mutation=mutation, clear_route_cache=True)
        ),
        dynamic_metadata=decision_metadata(decision),
    )
    if steering.response_headers:  # a cookie to set: Envoy sends this stream's response headers
        answer.mode_override.CopyFrom(RESPONSE_HEADERS_MODE)
    return answer


def response_headers_answer(steering: Steering) -> bytes:
    """The answer to the response headers of a request that asked for them: the headers
    added to the client's response (an issued key's `set-cookie`, beside the backend's own)."""
    mutation = ep.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=name, raw_value=value.encode()), append_action=_APPEND
            )
            for name, value in steering.response_headers
        ]
    )
    answer = ep.ProcessingResponse(
        response_headers=ep.HeadersResponse(response=ep.CommonResponse(header_mutation=mutation))
    )
    serialized: bytes = answer.SerializeToString()
    return serialized


class ExtProcServicer(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Thin: loops over the stream and answers each message exactly once."""

    def __init__(self, decider: Decider) -> None:
        self.decider = decider
        self.answers = AnswerCache(lambda steering: steering_response(steering).SerializeToString())

    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: Any
    ) -> AsyncIterator[bytes]:
        streams_open = self.decider.metrics.streams_open
        streams_open(1)
        later: dict[str, bytes] = {}  # this stream's answers to later messages (a cookie to set)
        try:
            async for message in request_iterator:
                if message.observability_mode:
                    continue  # "send and go": Envoy ignores answers in observability mode
                answer = self.answer(message, later)
                if answer is not None:
                    yield answer
        finally:  # also when Envoy resets the stream after its last message (normal)
            streams_open(-1)

    def answer(self, message: ep.ProcessingRequest, later: dict[str, bytes] | None = None) -> bytes | None:
        """The serialized answer to one message (the serving path). `later` holds the answers
        this stream's request decided for its later messages."""
        kind = message.WhichOneof("request")
        if kind == "request_headers":
            steering = self.steering(message)
            if steering.response_headers:  # a new key: an answer of its own, never kept
                if later is not None:
                    later["response_headers"] = response_headers_answer(steering)
                serialized: bytes = steering_response(steering).SerializeToString()
                return serialized
            return self.answers.get(steering)
        if later:
            answer = later.pop(kind or "", None)
            if answer is not None:
                return answer
        answer = _PASS_THROUGH_BYTES.get(kind or "")
        if answer is None:
            log.warning("ext_proc message of unknown kind %r left unanswered", kind)
        return answer

    def respond(self, message: ep.ProcessingRequest) -> ep.ProcessingResponse | None:
        """The answer to one message, as a message."""
        answer = self.answer(message)
        return None if answer is None else ep.ProcessingResponse.FromString(answer)

    def on_request_headers(self, message: ep.ProcessingRequest) -> tuple[ep.ProcessingResponse, Decision]:
        """Decide one request from its headers message. The explain CLI calls this too."""
        steering = self.steering(message)
        return steering_response(steering), steering.decision

    def steering(self, message: ep.ProcessingRequest) -> Steering:
        return self.decider.steer_input(
            "ext_proc",
            lambda: header_dict(message.request_headers.headers),
            lambda headers: Request.from_headers(headers, *connection_identity(message)),
        )
