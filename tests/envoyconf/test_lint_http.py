"""`graysteer check --envoy` on the ext_authz-over-HTTP front proxy (envoy/ext_authz_http.yaml):
each part the HTTP transport relies on is checked, and each breakage is found with its fix."""

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.envoyconf.generate import EnvoyOptions, bootstrap, bootstrap_document, render_yaml
from sidecar.envoyconf.lint import check
from sidecar.envoyconf.tls import TlsOptions
from sidecar.table.load import load_rules
from tests.helpers import table_from_yaml

REPO = Path(__file__).parents[2]
SHIPPED = yaml.safe_load((REPO / "envoy" / "ext_authz_http.yaml").read_text())
TABLE = load_rules(REPO / "examples" / "rules.yaml")
IDENTITY_RULES = """\
version: 1
clusters: [stable, canary]
default: stable
rules:
  - name: qa
    match: {identity: {glob: "spiffe://example.org/ns/qa/*"}}
    route: canary
"""

Config = Any  # a parsed Envoy bootstrap


def hcm(config: Config) -> Config:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def authz(config: Config) -> Config:
    return hcm(config)["http_filters"][0]["typed_config"]


def service(config: Config) -> Config:
    return authz(config)["http_service"]


def cluster(config: Config) -> Config:
    return config["static_resources"]["clusters"][0]


def test_the_shipped_config_is_clean() -> None:
    assert check(TABLE, SHIPPED) == []


def test_the_generated_mtls_config_is_clean_for_identity_rules() -> None:
    table = table_from_yaml(IDENTITY_RULES)
    config = yaml.safe_load(
        render_yaml(bootstrap(table, EnvoyOptions(mode="ext_authz_http", mtls=TlsOptions())))
    )
    assert check(table, config) == []


def test_identity_rules_without_envoys_xfcc_are_flagged() -> None:
    table = table_from_yaml(IDENTITY_RULES)
    config = bootstrap_document(table, EnvoyOptions(mode="ext_authz_http"))
    assert any("identity rules never match" in str(f) for f in check(table, config))


@pytest.mark.parametrize("drop", ["x-graysteer-peer-uri-sans", "x-graysteer-peer-dns-sans", "dns"])
def test_xfcc_without_the_san_lists_to_confirm_it_is_flagged(drop: str) -> None:
    table = table_from_yaml(IDENTITY_RULES)
    config = yaml.safe_load(
        render_yaml(bootstrap(table, EnvoyOptions(mode="ext_authz_http", mtls=TlsOptions())))
    )
    if drop == "dns":
        hcm(config)["set_current_client_cert_details"].pop("dns")
    else:
        added = service(config)["authorization_request"]["headers_to_add"]
        added[:] = [h for h in added if h["key"] != drop]
    assert any("cannot tell a SAN holding ';' from two SANs" in str(f) for f in check(table, config))


def _set(path: Callable[[Config], Config], key: str, value: Any) -> Callable[[Config], None]:
    return lambda config: path(config).__setitem__(key, value)


def _drop(path: Callable[[Config], Config], key: str) -> Callable[[Config], None]:
    return lambda config: path(config).pop(key)


HTTP2 = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}

CASES: list[tuple[str, Callable[[Config], None], str]] = [
    ("cluster speaks HTTP/2", _set(cluster, "typed_extension_protocol_options", HTTP2), "speaks HTTP/2"),
    (
        "gRPC health check",
        lambda c: cluster(c)["health_checks"][0].update({"grpc_health_check": {}, "http_health_check": None}),
        "not health-checked over HTTP",
    ),
    ("no health check", _drop(cluster, "health_checks"), "has no health check"),
    (
        "idle health check",
        lambda c: cluster(c)["health_checks"][0].pop("no_traffic_interval"),
        "re-checked only every",
    ),
    (
        "slow timeout",
        lambda c: service(c)["server_uri"].update(timeout="5s"),
        "a stalled sidecar holds every request",
    ),
    ("other path prefix", _set(service, "path_prefix", "/auth"), "the wrong path"),
    ("no clear_route_cache", _set(authz, "clear_route_cache", False), "does not clear the route cache"),
    (
        "listed headers only",
        _set(authz, "allowed_headers", {"patterns": [{"exact": "x-user-id"}]}),
        "does not pass every request header",
    ),
    (
        "baggage disallowed",
        _set(authz, "disallowed_headers", {"patterns": [{"exact": "baggage"}]}),
        "keeps 'baggage' from the sidecar",
    ),
    (
        "listener port not set by Envoy",
        _drop(service, "authorization_request"),
        "a client can claim a trusted listener port",
    ),
    (
        "routing header not copied",
        lambda c: service(c)["authorization_response"]["allowed_upstream_headers"]["patterns"].pop(0),
        "nothing is routed",
    ),
    (
        "lane not copied",
        lambda c: service(c)["authorization_response"]["allowed_upstream_headers"]["patterns"].pop(1),
        "the lane does not travel on",
    ),
    (
        "no decision metadata",
        lambda c: service(c)["authorization_response"].pop("dynamic_metadata_from_headers"),
        "access logs cannot show rule",
    ),
    (
        "every deny header to the client",
        lambda c: service(c)["authorization_response"].pop("allowed_client_headers"),
        "decision headers included",
    ),
    (
        "client XFCC forwarded",
        _set(hcm, "forward_client_cert_details", "ALWAYS_FORWARD_ONLY"),
        "a client can name its own identity",
    ),
    ("no backstop", lambda c: hcm(c)["http_filters"].pop(1), "while the sidecar is away"),
    (
        "pool keeps idle connections",
        lambda c: cluster(c).pop("typed_extension_protocol_options"),
        "the request skips the sidecar",
    ),
    (
        "pool outlives the sidecar's idle timeout",
        lambda c: cluster(c)["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]["common_http_protocol_options"].update(idle_timeout="300s"),
        "the request skips the sidecar",
    ),
    (
        "no circuit breaker (Envoy's 1,024)",
        _drop(cluster, "circuit_breakers"),
        "max_requests 1024 (the default)",
    ),
    (
        "a circuit breaker above the sidecar's room",
        lambda c: cluster(c)["circuit_breakers"]["thresholds"][0].update(max_requests=4096),
        "at its connection cap Envoy's own may be given up",
    ),
    (
        "more headers than the sidecar reads",
        _set(hcm, "common_http_protocol_options", {"max_headers_count": 200}),
        "the sidecar refuses requests Envoy accepted",
    ),
]


@pytest.mark.parametrize(("name", "breakage", "expected"), CASES, ids=[c[0] for c in CASES])
def test_each_breakage_is_found(name: str, breakage: Callable[[Config], None], expected: str) -> None:
    config = copy.deepcopy(SHIPPED)
    breakage(config)
    findings = [str(f) for f in check(TABLE, config)]
    assert any(expected in f for f in findings), findings
