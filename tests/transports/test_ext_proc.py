"""The ext_proc servicer with real protos: every message kind, errors, a real gRPC channel."""

import asyncio
import dataclasses
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from sidecar.core.bucketing import bucket
from sidecar.core.table import Rule
from sidecar.ops.metrics import Metrics
from sidecar.table.decider import Decider
from sidecar.table.holder import TableHolder
from sidecar.transports.explain import headers_message
from sidecar.transports.ext_proc import ExtProcServicer, add_to_server
from tests.helpers import table_from_rules

RULES = [
    {"name": "force", "match": {"headers": {"x-canary": "1"}}, "route": "canary"},
    {
        "name": "ramp",
        "split": {
            "key": ["header:x-user-id"],
            "seed": "s",
            "to": [{"cluster": "stable", "weight": 50}, {"cluster": "canary", "weight": 50}],
        },
    },
]


def make_servicer() -> tuple[ExtProcServicer, Metrics]:
    metrics = Metrics(CollectorRegistry())
    table = table_from_rules(RULES)
    return ExtProcServicer(Decider(TableHolder(table), metrics)), metrics


def routed_to(response: ep.ProcessingResponse) -> dict[str, bytes]:
    mutation = response.request_headers.response.header_mutation
    return {h.header.key: h.header.raw_value for h in mutation.set_headers}


def test_request_headers_set_routing_header_and_clear_route_cache() -> None:
    servicer, metrics = make_servicer()
    response = servicer.respond(headers_message("GET", "/", [("x-canary", "1")]))
    assert response is not None
    assert response.WhichOneof("response") == "request_headers"
    common = response.request_headers.response
    assert common.clear_route_cache is True
    (option,) = common.header_mutation.set_headers
    assert option.header.key == "x-route-cluster"
    assert option.header.raw_value == b"canary"
    assert option.header.value == ""  # Envoy reads raw_value; never rely on value
    assert option.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    metadata = json_format.MessageToDict(response.dynamic_metadata)["graysteer"]
    assert metadata == {"cluster": "canary", "rule": "force", "reason": "route", "version": "test"}
    assert (
        metrics.registry.get_sample_value("graysteer_decisions_total", {"cluster": "canary", "rule": "force"})
        == 1
    )


def test_split_decision_metadata_carries_bucket_and_key_source() -> None:
    servicer, _ = make_servicer()
    response = servicer.respond(headers_message("GET", "/", [("x-user-id", "42")]))
    assert response is not None
    metadata = json_format.MessageToDict(response.dynamic_metadata)["graysteer"]
    assert metadata["rule"] == "ramp"
    assert metadata["key_source"] == "header:x-user-id"
    assert 0 <= metadata["bucket"] < 50 if metadata["cluster"] == "stable" else metadata["bucket"] >= 50


def test_raw_values_and_repeated_headers() -> None:
    servicer, _ = make_servicer()
    headers = base_pb2.HeaderMap(
        headers=[
            base_pb2.HeaderValue(key=":path", raw_value=b"/x"),
            base_pb2.HeaderValue(key="X-Canary", raw_value=b"1"),
            base_pb2.HeaderValue(key="cookie", raw_value=b"a=1"),
            base_pb2.HeaderValue(key="cookie", raw_value=b"uid=2"),
        ]
    )
    message = ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=headers))
    _, decision = servicer.on_request_headers(message)
    assert decision.rule == "force"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("response_headers", ep.HttpHeaders()),
        ("request_body", ep.HttpBody(body=b"x", end_of_stream=True)),
        ("response_body", ep.HttpBody(body=b"y")),
        ("request_trailers", ep.HttpTrailers()),
        ("response_trailers", ep.HttpTrailers()),
    ],
)
def test_every_other_message_kind_gets_its_own_empty_answer(kind: str, message: Any) -> None:
    servicer, _ = make_servicer()
    response = servicer.respond(ep.ProcessingRequest(**{kind: message}))
    assert response is not None
    assert response.WhichOneof("response") == kind
    assert response.ListFields()[0][1].ByteSize() == 0  # "continue", no mutation


def test_engine_failure_routes_to_default_and_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    servicer, metrics = make_servicer()
    holder = servicer.decider.holder

    def broken(request: Any) -> bool:
        raise KeyError("boom")

    # A rule whose matcher raises stands in for a bug in the engine.
    bad_rule = Rule("buggy", (broken,), holder.table.rules[0].route, None)
    holder.table = dataclasses.replace(holder.table, rules=(bad_rule,))
    for _ in range(3):
        response, decision = servicer.on_request_headers(headers_message("GET", "/", []))
        # No routing header: Envoy's fallback route (default cluster, deny backstop) applies.
        assert routed_to(response) == {}
        assert response.request_headers.response.clear_route_cache is True
        assert (decision.rule, decision.error) == ("default", "engine_error")
    assert (
        metrics.registry.get_sample_value("graysteer_decision_errors_total", {"reason": "engine_error"}) == 3
    )
    assert len([r for r in caplog.records if "deciding failed" in r.message]) == 1  # logged once


def test_non_utf8_header_values_are_decided_not_dropped() -> None:
    servicer, metrics = make_servicer()
    headers = base_pb2.HeaderMap(
        headers=[
            base_pb2.HeaderValue(key=":method", raw_value=b"\xff"),
            base_pb2.HeaderValue(key="x-user-id", raw_value=b"u\xff"),
        ]
    )
    response, decision = servicer.on_request_headers(
        ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=headers))
    )
    assert (decision.rule, decision.error) == ("ramp", None)
    assert decision.bucket == bucket("s", "u!", 100)  # each invalid byte -> "!", as Envoy's ext_authz
    assert routed_to(response) == {"x-route-cluster": decision.cluster.encode()}
    assert (
        metrics.registry.get_sample_value("graysteer_decision_errors_total", {"reason": "adapter_error"})
        is None
    )


def test_observability_mode_gets_no_answers() -> None:
    servicer, _ = make_servicer()

    async def run() -> list[ep.ProcessingResponse]:
        async def messages() -> Any:
            yield ep.ProcessingRequest(request_headers=ep.HttpHeaders(), observability_mode=True)

        return [ep.ProcessingResponse.FromString(r) async for r in servicer.Process(messages(), None)]

    assert asyncio.run(run()) == []


def test_full_stream_over_a_real_grpc_channel() -> None:
    """request_headers, body, response_headers, trailers on one stream, as Envoy sends them."""
    servicer, _ = make_servicer()

    async def run() -> list[str]:
        server = grpc.aio.server()
        add_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = ep_grpc.ExternalProcessorStub(channel)
                call = stub.Process()
                kinds = []
                for message in [
                    headers_message("POST", "/", [("x-canary", "1")]),
                    ep.ProcessingRequest(request_body=ep.HttpBody(body=b"{}", end_of_stream=True)),
                    ep.ProcessingRequest(response_headers=ep.HttpHeaders()),
                    ep.ProcessingRequest(response_trailers=ep.HttpTrailers()),
                ]:
                    await call.write(message)
                    response = await call.read()
                    kinds.append(response.WhichOneof("response"))
                    if kinds == ["request_headers"]:
                        assert routed_to(response) == {"x-route-cluster": b"canary"}
                await call.done_writing()
                assert await call.read() == grpc.aio.EOF
                return kinds
        finally:
            await server.stop(None)

    assert asyncio.run(run()) == ["request_headers", "request_body", "response_headers", "response_trailers"]


GUARDED = {
    "trust": {"identities": [{"trust_domain": "example.org"}], "override_headers": ["x-canary"]},
    "coloring": {"lanes": {"stable": "stable", "canary": "canary"}},
}
SMUGGLED = [
    ("x-canary", "1"),
    ("x-graysteer-lane", "canary"),
    ("baggage", "graysteer.lane=canary,tenant=acme"),
]


def guarded_servicer(rules: list[dict[str, Any]]) -> ExtProcServicer:
    table = table_from_rules(rules, **GUARDED)
    return ExtProcServicer(Decider(TableHolder(table), Metrics(CollectorRegistry())))


def removed_and_set(response: ep.ProcessingResponse) -> tuple[set[str], dict[str, bytes]]:
    mutation = response.request_headers.response.header_mutation
    return set(mutation.remove_headers), routed_to(response)


def test_adapter_failure_still_strips_what_an_untrusted_caller_sent() -> None:
    servicer = guarded_servicer(RULES)
    message = headers_message("GET", "/", SMUGGLED)
    # A malformed attribute (a port of +inf) makes the adapter fail after reading headers.
    message.attributes["envoy.filters.http.ext_proc"].fields["destination.port"].number_value = float("inf")
    response, decision = servicer.on_request_headers(message)
    assert decision.error == "adapter_error"
    removed, set_headers = removed_and_set(response)
    assert {"x-canary", "x-graysteer-lane"} <= removed
    assert set_headers == {"baggage": b"tenant=acme"}  # only our member is cut out


def test_engine_failure_strips_the_headers_as_received() -> None:
    servicer = guarded_servicer(RULES)
    holder = servicer.decider.holder

    def broken(request: Any) -> bool:
        raise KeyError("boom")

    holder.table = dataclasses.replace(holder.table, rules=(Rule("buggy", (broken,), None, None),))
    response, decision = servicer.on_request_headers(headers_message("GET", "/", SMUGGLED))
    assert decision.error == "engine_error"
    removed, set_headers = removed_and_set(response)
    assert {"x-canary", "x-graysteer-lane"} <= removed
    assert set_headers == {"baggage": b"tenant=acme"}


def test_a_header_the_sidecar_sets_is_never_also_removed() -> None:
    """ext_authz applies removals after additions: a removed lane header would vanish."""
    servicer = guarded_servicer(RULES)
    response, decision = servicer.on_request_headers(headers_message("GET", "/", SMUGGLED))
    removed, set_headers = removed_and_set(response)
    assert set_headers["x-graysteer-lane"] == decision.cluster.encode()
    assert set_headers["baggage"] == f"tenant=acme,graysteer.lane={decision.cluster}".encode()
    assert removed == {"x-canary"}
