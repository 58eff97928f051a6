"""Property tests of every transport against hostile input: any message, with arbitrary header
bytes, attributes, XFCC, baggage, lanes and SPIFFE IDs, gets exactly one well-formed answer and
never an exception; every metric label stays in its closed set."""

from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as authz
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from sidecar.ops.metrics import Metrics
from sidecar.table.decider import Decider
from sidecar.table.holder import TableHolder
from sidecar.transports.ext_authz import AuthorizationServicer
from sidecar.transports.ext_proc import ATTRIBUTES_KEY, ExtProcServicer
from sidecar.transports.http_check import answer_bytes, check_request
from tests.helpers import table_from_yaml

TABLE = table_from_yaml("""
version: 1
clusters: [stable, canary]
default: stable
trust:
  identities: [{glob: "spiffe://example.org/ns/qa/*"}]
  override_headers: [x-canary]
  xfcc: true
coloring:
  lanes: {stable: stable, canary: canary}
rules:
  - name: no-admin
    match: {path: {prefix: /admin}, headers: {x-internal: {regex: "[a-z]+[0-9]*"}}}
    deny: {status: 451, reason: "no"}
  - name: qa
    match: {identity: {glob: "spiffe://example.org/ns/qa/*"}}
    route: canary
  - name: ramp
    split:
      key: [header:x-user-id, cookie:uid, query:gid]
      to: [{cluster: stable, weight: 70}, {cluster: canary, weight: 30}]
""")

HEADER_NAMES = st.sampled_from(
    [
        ":path",
        ":method",
        ":authority",
        "x-user-id",
        "cookie",
        "baggage",
        "x-graysteer-lane",
        "x-canary",
        "x-forwarded-client-cert",
        "x-internal",
        "x-route-cluster",
        "content-type",
    ]
) | st.text(min_size=1, max_size=20)
HOSTILE_TEXT = st.one_of(
    st.text(max_size=200),
    st.sampled_from(
        [
            "spiffe://example.org/ns/qa/sa/x",
            "spiffe://Example.org//",
            "URI=spiffe://a/b;URI=spiffe://c/d",
            "graysteer.lane=canary,graysteer.lane=stable",
            "stable, canary",
            "x" * 5000,
            '=;,"\\',
            "/admin/../admin",
            "%00",
            "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
        ]
    ),
)
RAW = st.binary(max_size=300) | HOSTILE_TEXT.map(lambda t: t.encode("utf-8", "replace"))
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decider() -> tuple[Decider, Metrics]:
    metrics = Metrics(CollectorRegistry())
    return Decider(TableHolder(TABLE), metrics), metrics


def closed_labels(metrics: Metrics) -> None:
    rules = {"no-admin", "qa", "ramp", "default", "lane:stable", "lane:canary", "lane:unknown"}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if family.name == "graysteer_decisions":
                assert sample.labels["rule"] in rules, sample
                assert sample.labels["cluster"] in {"stable", "canary"}, sample
            if family.name == "graysteer_decision_errors":
                assert sample.labels["reason"] in {"engine_error", "adapter_error"}, sample


ATTRIBUTE_VALUES = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), HOSTILE_TEXT)


@FUZZ
@given(
    headers=st.lists(st.tuples(HEADER_NAMES, RAW), max_size=12),
    attributes=st.dictionaries(
        st.sampled_from(
            [
                "connection.mtls",
                "connection.uri_san_peer_certificate",
                "connection.dns_san_peer_certificate",
                "connection.subject_peer_certificate",
                "destination.port",
            ]
        ),
        ATTRIBUTE_VALUES,
        max_size=5,
    ),
    end_of_stream=st.booleans(),
)
def test_ext_proc_answers_any_request_headers_message(
    headers: list[tuple[str, bytes]], attributes: dict[str, Any], end_of_stream: bool
) -> None:
    the_decider, metrics = decider()
    servicer = ExtProcServicer(the_decider)
    message = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in headers]
            ),
            end_of_stream=end_of_stream,
        )
    )
    fields = struct_pb2.Struct()
    for key, value in attributes.items():
        if value is not None:
            fields.update({key: value})
    message.attributes[ATTRIBUTES_KEY].CopyFrom(fields)
    answer = ep.ProcessingResponse.FromString(servicer.answer(message) or b"")
    assert answer.WhichOneof("response") in ("request_headers", "immediate_response")
    if answer.WhichOneof("response") == "request_headers":
        for option in answer.request_headers.response.header_mutation.set_headers:
            assert b"\r" not in option.header.raw_value and b"\n" not in option.header.raw_value
    closed_labels(metrics)


@FUZZ
@given(
    headers=st.dictionaries(HEADER_NAMES, HOSTILE_TEXT, max_size=12),
    principal=HOSTILE_TEXT,
    certificate=HOSTILE_TEXT,
    port=st.integers(min_value=-5, max_value=70000),
)
def test_ext_authz_answers_any_check_request(
    headers: dict[str, str], principal: str, certificate: str, port: int
) -> None:
    the_decider, metrics = decider()
    request = authz.CheckRequest()
    request.attributes.request.http.headers.update(headers)
    request.attributes.source.principal = principal
    request.attributes.source.certificate = certificate
    request.attributes.destination.address.socket_address.port_value = max(port, 0)
    response, _ = AuthorizationServicer(the_decider).check(request)
    assert response.WhichOneof("http_response") in ("ok_response", "denied_response")
    closed_labels(metrics)


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "HEAD", "DELETE"]) | st.text(max_size=10),
    target=HOSTILE_TEXT,
    headers=st.dictionaries(HEADER_NAMES.map(str.lower), HOSTILE_TEXT, max_size=12),
)
def test_http_authz_answers_any_check(method: str, target: str, headers: dict[str, str]) -> None:
    from sidecar.transports.authz_http import AuthzHttpServer

    the_decider, metrics = decider()
    server = AuthzHttpServer(the_decider, lambda: True)
    steering = server.steer(method, "/graysteer-check" + target, dict(headers))
    answer = answer_bytes(steering)
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 ")
    assert 200 <= int(status_line.split()[1]) < 500
    assert all(b": " in line for line in lines)  # no value broke the framing
    length = next(int(line.split(b": ")[1]) for line in lines if line.startswith(b"content-length: "))
    assert length == len(body)
    check_request(method, target, dict(headers))  # the pure part alone never raises either
    closed_labels(metrics)
