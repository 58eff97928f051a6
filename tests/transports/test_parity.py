"""Trust, color, deny and identity rules through both servicers, with real protos."""

from urllib.parse import quote

import pytest
from envoy.service.auth.v3 import external_auth_pb2 as authz
from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from sidecar.ops.metrics import Metrics
from sidecar.table.decider import Decider
from sidecar.table.holder import TableHolder
from sidecar.transports.explain import Peer, explain_local, headers_message
from sidecar.transports.ext_authz import AuthorizationServicer
from sidecar.transports.ext_proc import ExtProcServicer
from tests.helpers import table_from_yaml
from tests.tls import make_ca, make_leaf

QA = "spiffe://example.org/ns/qa/sa/tester"
WEB = "spiffe://example.org/ns/prod/sa/web"
RULES = """
version: 1
clusters: [stable, canary]
default: stable
trust:
  identities: [{glob: "spiffe://example.org/ns/qa/*"}]
  override_headers: [x-canary]
  listener_ports: [15001]
coloring:
  lanes: {stable: stable, canary: canary}
rules:
  - name: admin-needs-identity
    match: {path: {prefix: /admin}, identity: {absent: true}}
    deny: {status: 403, reason: "admin needs a client certificate"}
  - name: force-canary
    match: {headers: {x-canary: "1"}}
    route: canary
  - name: qa
    match: {identity: {glob: "spiffe://example.org/ns/qa/*"}}
    route: canary
  - name: by-workload
    split:
      key: [identity, header:x-user-id]
      to: [{cluster: stable, weight: 50}, {cluster: canary, weight: 50}]
      when_key_missing: stable
"""


def servicers() -> tuple[ExtProcServicer, AuthorizationServicer, Metrics]:
    metrics = Metrics(CollectorRegistry())
    decider = Decider(TableHolder(table_from_yaml(RULES)), metrics)
    return ExtProcServicer(decider), AuthorizationServicer(decider), metrics


def ext_proc(headers: list[tuple[str, str]], peer: Peer | None = None, path: str = "/") -> dict:
    servicer = servicers()[0]
    response, decision = servicer.on_request_headers(
        headers_message("GET", path, headers, peer=peer or Peer())
    )
    mutation = response.request_headers.response.header_mutation
    return {
        "decision": decision,
        "response": response,
        "set": {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers},
        "removed": set(mutation.remove_headers),
    }


def test_identity_rule_routes_qa_to_canary_and_colors_it() -> None:
    out = ext_proc([], Peer(uri_san=QA))
    assert (out["decision"].cluster, out["decision"].rule) == ("canary", "qa")
    assert out["decision"].identity == QA
    assert out["set"] == {
        "x-route-cluster": "canary",
        "x-graysteer-lane": "canary",
        "baggage": "graysteer.lane=canary",
    }


def test_override_header_from_an_untrusted_identity_is_ignored_and_removed() -> None:
    out = ext_proc([("x-canary", "1"), ("x-user-id", "u")], Peer(uri_san=WEB))
    assert out["decision"].rule == "by-workload"  # not force-canary
    assert out["removed"] == {"x-canary"}
    trusted = ext_proc([("x-canary", "1")], Peer(uri_san=QA))
    assert (trusted["decision"].rule, trusted["removed"]) == ("force-canary", set())


def test_plaintext_is_untrusted_unless_it_comes_in_on_a_trusted_listener() -> None:
    assert ext_proc([("x-canary", "1")])["removed"] == {"x-canary"}
    on_trusted_port = ext_proc([("x-canary", "1")], Peer(listener_port=15001))
    assert on_trusted_port["decision"].rule == "force-canary"


def test_color_from_a_trusted_caller_decides_and_travels_on() -> None:
    out = ext_proc(
        [("x-graysteer-lane", "canary"), ("baggage", "a=1"), ("traceparent", "00-abc-def-01")],
        Peer(listener_port=15001),
    )
    assert (out["decision"].cluster, out["decision"].rule) == ("canary", "lane:canary")
    assert out["set"]["baggage"] == "a=1,graysteer.lane=canary"
    assert "traceparent" not in out["set"] and not out["removed"]  # trace context untouched


def test_color_in_baggage_alone_is_honoured() -> None:
    out = ext_proc([("baggage", "graysteer.lane=canary,x=y")], Peer(listener_port=15001))
    assert out["decision"].rule == "lane:canary"


def test_unknown_lane_goes_to_the_fallback_and_is_passed_on() -> None:
    out = ext_proc([("x-graysteer-lane", "blue")], Peer(listener_port=15001))
    assert (out["decision"].cluster, out["set"]["x-graysteer-lane"]) == ("stable", "blue")


def test_color_from_an_untrusted_caller_is_stripped_from_header_and_baggage() -> None:
    out = ext_proc(
        [("x-graysteer-lane", "canary"), ("baggage", "graysteer.lane=canary,a=1"), ("x-user-id", "u1")],
        Peer(uri_san=WEB),
    )
    assert out["decision"].rule == "by-workload"
    lane = out["decision"].lane
    assert out["set"]["x-graysteer-lane"] == lane  # overwritten with ours, not removed after
    assert out["set"]["baggage"] == f"a=1,graysteer.lane={lane}"  # ours, from the decision


def test_deny_is_an_immediate_response_and_cannot_be_bypassed_by_color() -> None:
    out = ext_proc([("x-graysteer-lane", "canary")], Peer(listener_port=15001), path="/admin/x")
    immediate = out["response"].immediate_response
    assert out["response"].WhichOneof("response") == "immediate_response"
    assert (immediate.status.code, immediate.body) == (403, b"admin needs a client certificate")
    assert immediate.details == "graysteer_denied"
    assert ext_proc([], Peer(uri_san=QA), path="/admin/x")["decision"].rule == "qa"


def test_split_by_workload_identity_is_sticky() -> None:
    first = ext_proc([], Peer(uri_san=WEB))["decision"]
    assert first.key_source == "identity"
    assert all(ext_proc([], Peer(uri_san=WEB))["decision"].cluster == first.cluster for _ in range(10))


def test_malformed_san_is_no_identity_and_counted() -> None:
    ext, _, metrics = servicers()
    _, decision = ext.on_request_headers(
        headers_message("GET", "/admin", [], peer=Peer(uri_san="spiffe://example.org//bad"))
    )
    assert decision.deny_status == 403  # treated as no identity
    assert (
        metrics.registry.get_sample_value("graysteer_steering_events_total", {"event": "malformed_spiffe_id"})
        == 1
    )


@pytest.mark.parametrize(
    ("xfcc", "trusted"),
    [
        (None, True),
        (f"Hash=h;URI={QA};DNS=tester.example.org", True),
        (f"Hash=h;URI={QA};URI=spiffe://other.org/second", False),
        (f"Hash=h;URI=spiffe://other.org/first;URI={QA}", False),
        # an element that does not list this connection's URI SAN says nothing about it
        ("Hash=h;URI=spiffe://other.org/x;URI=spiffe://other.org/y", True),
        # not one element as Envoy writes it (here: a DNS SAN holding `,URI=`): no SVID
        (f"Hash=h;URI={QA};URI=spiffe://other.org/x;DNS=a.example.org,URI={QA}", False),
        (f"Hash=h;URI={QA};URI=spiffe://other.org/x,Hash=h;URI=spiffe://other.org/y", False),
    ],
)
def test_ext_proc_checks_the_first_uri_san_against_xfcc(xfcc: str | None, trusted: bool) -> None:
    # Envoy gives ext_proc only the first URI SAN; its own XFCC lists every one. A certificate
    # with several is no SVID, as ext_authz (which reads the whole certificate) decides.
    ext, _, metrics = servicers()
    headers = [("x-canary", "1")] + ([("x-forwarded-client-cert", xfcc)] if xfcc else [])
    response, decision = ext.on_request_headers(headers_message("GET", "/", headers, peer=Peer(uri_san=QA)))
    assert (decision.rule == "force-canary") is trusted
    assert (decision.identity == QA) is trusted
    removed = set(response.request_headers.response.header_mutation.remove_headers)
    assert ("x-canary" in removed) is not trusted
    assert metrics.registry.get_sample_value(
        "graysteer_steering_events_total", {"event": "malformed_spiffe_id"}
    ) == (None if trusted else 1)


def test_xfcc_is_ignored_unless_trusted(tmp_path) -> None:  # type: ignore[no-untyped-def]
    xfcc = f"Hash=x;URI={QA}"
    out = ext_proc([("x-forwarded-client-cert", xfcc)])
    assert out["decision"].identity is None and out["decision"].rule != "qa"
    trusting = tmp_path / "rules.yaml"
    trusting.write_text(RULES.replace("  listener_ports: [15001]", "  xfcc: true"))
    result = explain_local(str(trusting), "GET", "/", [("x-forwarded-client-cert", xfcc)])
    assert (result["rule"], result["identity"]) == ("qa", QA)


# ---- ext_authz ------------------------------------------------------------------------------


def check_request(
    headers: dict[str, str], path: str = "/", principal: str = "", certificate: str = "", port: int = 0
) -> authz.CheckRequest:
    request = authz.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = "GET", path
    http.headers.update(headers)
    request.attributes.source.principal = principal
    request.attributes.source.certificate = certificate
    request.attributes.destination.address.socket_address.port_value = port
    return request


def test_ext_authz_sets_value_not_raw_value_and_removes_untrusted() -> None:
    _, authz_servicer, _ = servicers()
    response, decision = authz_servicer.check(
        check_request({"x-canary": "1", "x-user-id": "u"}, principal=WEB)
    )
    assert response.status.code == 0
    headers = {h.header.key: (h.header.value, h.header.raw_value) for h in response.ok_response.headers}
    assert headers["x-route-cluster"] == (decision.cluster, b"")
    assert list(response.ok_response.headers_to_remove) == ["x-canary"]
    metadata = json_format.MessageToDict(response.dynamic_metadata)
    assert metadata["rule"] == "by-workload" and metadata["identity"] == WEB


def test_ext_authz_reads_every_san_of_the_forwarded_certificate() -> None:
    ca = make_ca()
    _, pem = make_leaf(ca, "client", uris=[QA], dns=["first.example.org", "c.example.org"])
    _, authz_servicer, _ = servicers()
    _, decision = authz_servicer.check(check_request({}, principal=QA, certificate=quote(pem.decode())))
    assert (decision.rule, decision.identity) == ("qa", QA)


def test_ext_authz_certificate_with_several_uri_sans_has_no_spiffe_identity() -> None:
    # X509-SVID: exactly one URI SAN. Envoy's `principal` shows only the first (here QA); the
    # forwarded certificate shows the second, and then neither is the caller's identity.
    ca = make_ca()
    _, pem = make_leaf(ca, "client", uris=[QA, "spiffe://other.org/second"])
    _, authz_servicer, metrics = servicers()
    response, decision = authz_servicer.check(
        check_request({"x-canary": "1"}, path="/admin", principal=QA, certificate=quote(pem.decode()))
    )
    assert decision.identity is None and decision.deny_status == 403  # admin needs an identity
    assert response.denied_response.status.code == 403
    assert (
        metrics.registry.get_sample_value("graysteer_steering_events_total", {"event": "malformed_spiffe_id"})
        == 1
    )
    assert (
        metrics.registry.get_sample_value(
            "graysteer_steering_events_total", {"event": "malformed_certificate"}
        )
        is None
    )


def test_ext_authz_dns_san_that_is_no_dns_name_is_set_aside_and_counted() -> None:
    ca = make_ca()
    _, pem = make_leaf(ca, "client", dns=["x,y.example.org"])
    _, authz_servicer, metrics = servicers()
    _, decision = authz_servicer.check(
        check_request({}, principal="x,y.example.org", certificate=quote(pem.decode()))
    )
    assert decision.identity is None
    assert (
        metrics.registry.get_sample_value("graysteer_steering_events_total", {"event": "malformed_dns_san"})
        == 1
    )


def test_ext_authz_deny_and_malformed_certificate() -> None:
    _, authz_servicer, metrics = servicers()
    response, _ = authz_servicer.check(check_request({}, path="/admin", certificate="not-a-certificate"))
    assert response.status.code == 7  # PERMISSION_DENIED
    assert response.denied_response.status.code == 403
    assert (
        metrics.registry.get_sample_value(
            "graysteer_steering_events_total", {"event": "malformed_certificate"}
        )
        == 1
    )


@pytest.mark.parametrize("principal", ["CN=client,O=Example", "client.example.org"])
def test_ext_authz_principal_forms(principal: str) -> None:
    _, authz_servicer, _ = servicers()
    _, decision = authz_servicer.check(check_request({}, principal=principal))
    assert decision.cluster in ("stable", "canary")


def test_malformed_xfcc_and_baggage_are_counted_and_harmless(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trusting = tmp_path / "rules.yaml"
    trusting.write_text(RULES.replace("  listener_ports: [15001]", "  xfcc: true"))
    from sidecar.table.load import load_rules

    metrics = Metrics(CollectorRegistry())
    servicer = ExtProcServicer(Decider(TableHolder(load_rules(trusting)), metrics))
    response, decision = servicer.on_request_headers(
        headers_message("GET", "/", [("x-forwarded-client-cert", "garbage"), ("baggage", "ok=1,junk,also=2")])
    )
    assert decision.identity is None and decision.rule == "by-workload"
    baggage = {
        h.header.key: h.header.raw_value.decode()
        for h in response.request_headers.response.header_mutation.set_headers
    }["baggage"]
    assert baggage.startswith("ok=1,junk,also=2,graysteer.lane=")  # others kept as written
    for event in ("malformed_xfcc", "malformed_baggage"):
        assert metrics.registry.get_sample_value("graysteer_steering_events_total", {"event": event}) == 1
