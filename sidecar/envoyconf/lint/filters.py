"""Checks of the filters that call the sidecar (ext_proc, ext_authz over gRPC and HTTP) and
of the sidecar's cluster."""

from collections.abc import Iterator
from typing import Any

from sidecar.contract import (
    AUTHZ_HTTP_IDLE_SECONDS,
    DECISION_HEADER_PREFIX,
    ENVOY_MAX_HEADERS,
    ENVOY_POOL_IDLE_TIMEOUT,
    ENVOY_SIDECAR_CONNECTIONS,
    HEALTH_PATH,
    LISTENER_PORT_HEADER,
    METADATA_NAMESPACE,
    PATH_PREFIX,
    PEER_SAN_HEADERS,
)
from sidecar.core import Table
from sidecar.core.steering import steered_headers
from sidecar.envoyconf.lint.common import EXT_PROC, HTTP_OPTIONS, Finding, is_http2, matches_any, seconds


def check_filter(config: dict[str, Any], clusters: dict[str, Any]) -> Iterator[Finding]:
    is_ext_proc = config.get("@type") == EXT_PROC
    name = "ext_proc" if is_ext_proc else "ext_authz"
    cluster_name = ((config.get("grpc_service") or {}).get("envoy_grpc") or {}).get("cluster_name")
    if cluster_name and cluster_name not in clusters:
        yield Finding(
            f"the {name} filter points at cluster {cluster_name!r}, which does not exist",
            f"define the sidecar cluster {cluster_name!r}",
        )
    elif cluster_name and not is_http2(clusters[cluster_name]):
        yield Finding(
            f"sidecar cluster {cluster_name!r} does not speak HTTP/2: gRPC to the sidecar "
            "fails (status 14, HTTP 500)",
            "set typed_extension_protocol_options "
            f"{HTTP_OPTIONS} explicit_http_config.http2_protocol_options: {{}}",
        )
    if cluster_name in clusters:
        yield from check_health_checks(cluster_name, clusters[cluster_name])
    if is_ext_proc:
        if config.get("route_cache_action") == "RETAIN" or config.get("disable_clear_route_cache"):
            yield Finding(
                "ext_proc keeps the route cache: the routing header is set but the route "
                "(cluster) chosen before the sidecar answered is used",
                "remove route_cache_action: RETAIN / disable_clear_route_cache",
            )
        mode = config.get("processing_mode") or {}
        if mode.get("request_header_mode") == "SKIP":
            yield Finding(
                "ext_proc skips request headers: nothing is decided",
                "set processing_mode.request_header_mode: SEND",
            )
        namespaces = ((config.get("metadata_options") or {}).get("receiving_namespaces") or {}).get(
            "untyped"
        ) or []
        if METADATA_NAMESPACE not in namespaces:
            yield Finding(
                f"ext_proc drops the decision's dynamic metadata (namespace "
                f"{METADATA_NAMESPACE!r}): access logs cannot show rule and version",
                f"add metadata_options.receiving_namespaces.untyped: [{METADATA_NAMESPACE}]",
            )
        rules = config.get("mutation_rules") or {}
        if rules.get("disallow_all") or rules.get("disallow_expression"):
            yield Finding(
                "ext_proc mutation_rules may reject the routing header mutation",
                "drop disallow_all / make disallow_expression exclude the routing header",
            )
    else:
        if not config.get("clear_route_cache"):
            yield Finding(
                "ext_authz does not clear the route cache: the routing header it sets is ignored for routing",
                "set clear_route_cache: true on the ext_authz filter",
            )
        if config.get("encode_raw_headers"):
            yield Finding(
                "ext_authz has encode_raw_headers: true: Envoy then reads `raw_value` "
                "from the answer, but graysteer's ext_authz answer carries `value`, so "
                "the routing header arrives empty",
                "remove encode_raw_headers",
            )


MAX_CHECK_TIMEOUT_SECONDS = 1.0


# Headers the sidecar must see to decide, besides those the rules name.
NEEDED_HEADERS = ("cookie", "baggage", "x-forwarded-client-cert")


def check_http_service(
    table: Table, config: dict[str, Any], hcm: dict[str, Any], clusters: dict[str, Any]
) -> Iterator[Finding]:
    """ext_authz over plain HTTP (sidecar.transports.authz_http): what the check must carry and what
    Envoy must take from the answer."""
    service = config.get("http_service") or {}
    added = {
        h.get("key", "").lower(): h.get("value")
        for h in (service.get("authorization_request") or {}).get("headers_to_add") or []
    }
    yield from check_http_cluster((service.get("server_uri") or {}).get("cluster"), clusters)
    yield from check_http_call(config, service)
    yield from check_headers_sent(table, config, service)
    yield from check_listener_port(added)
    yield from check_header_count(hcm)
    yield from check_answer_taken(table, service.get("authorization_response") or {})
    yield from check_http_identity(table, hcm, added)


def check_http_cluster(cluster_name: Any, clusters: dict[str, Any]) -> Iterator[Finding]:
    """The sidecar's cluster: there, HTTP/1.1, health-checked on the sidecar's health path, and
    closing idle connections before the sidecar does."""
    if cluster_name not in clusters:
        yield Finding(
            f"the ext_authz http_service points at cluster {cluster_name!r}, which does not exist",
            "define the sidecar cluster and name it in server_uri.cluster",
        )
        return
    cluster = clusters[cluster_name]
    if is_http2(cluster):
        yield Finding(
            f"sidecar cluster {cluster_name!r} speaks HTTP/2, but the sidecar's HTTP "
            "authz server speaks HTTP/1.1: every check fails",
            "remove http2_protocol_options from the sidecar cluster",
        )
    yield from check_health_checks(cluster_name, cluster)
    options = (cluster.get("typed_extension_protocol_options") or {}).get(HTTP_OPTIONS) or {}
    idle = seconds((options.get("common_http_protocol_options") or {}).get("idle_timeout"))
    if idle is None or not 0 < idle <= AUTHZ_HTTP_IDLE_SECONDS / 2:
        yield Finding(
            f"sidecar cluster {cluster_name!r} keeps idle connections "
            f"{'an hour (the default)' if idle is None else f'{idle:g}s'}, the sidecar "
            f"{AUTHZ_HTTP_IDLE_SECONDS:g}s: a check Envoy sends as the sidecar closes one fails, "
            "and the request skips the sidecar",
            f"set the cluster's {HTTP_OPTIONS} common_http_protocol_options.idle_timeout: "
            f"{ENVOY_POOL_IDLE_TIMEOUT:g}s",
        )
    yield from check_circuit_breakers(cluster_name, cluster)
    for check in cluster.get("health_checks") or []:
        if (check.get("http_health_check") or {}).get("path") != HEALTH_PATH:
            yield Finding(
                f"sidecar cluster {cluster_name!r} is not health-checked over HTTP "
                f"on {HEALTH_PATH}: Envoy cannot see the sidecar draining or not "
                "ready",
                f"use http_health_check: {{path: {HEALTH_PATH}}}",
            )


def check_http_call(config: dict[str, Any], service: dict[str, Any]) -> Iterator[Finding]:
    """The check call: bounded in time, on the sidecar's path prefix, and re-routing on its answer."""
    timeout = seconds((service.get("server_uri") or {}).get("timeout"))
    if timeout is None or timeout > MAX_CHECK_TIMEOUT_SECONDS:
        yield Finding(
            f"the ext_authz check timeout is {timeout if timeout is not None else 'unset'}"
            ": a stalled sidecar holds every request that long",
            "set http_service.server_uri.timeout to 0.25s (at most 1s)",
        )
    if service.get("path_prefix") != PATH_PREFIX:
        yield Finding(
            f"ext_authz path_prefix is {service.get('path_prefix')!r}, not {PATH_PREFIX!r}: "
            "the sidecar would match path rules against the wrong path",
            f"set http_service.path_prefix: {PATH_PREFIX}",
        )
    if not config.get("clear_route_cache"):
        yield Finding(
            "ext_authz does not clear the route cache: the routing header it sets is ignored for routing",
            "set clear_route_cache: true on the ext_authz filter",
        )


def check_headers_sent(table: Table, config: dict[str, Any], service: dict[str, Any]) -> Iterator[Finding]:
    """Every request header reaches the sidecar, and none the sidecar needs is held back."""
    allowed = config.get("allowed_headers") or (
        (service.get("authorization_request") or {}).get("allowed_headers")
    )
    disallowed = config.get("disallowed_headers")
    needed = [*sorted(table.trust.protected), *NEEDED_HEADERS]
    if table.coloring is not None:
        needed.append(table.coloring.header)
    if not matches_any(allowed, "x-any-header-a-rule-reads"):
        yield Finding(
            "ext_authz allowed_headers does not pass every request header to the sidecar: "
            "rules on the headers it leaves out never match",
            "set allowed_headers: {patterns: [{safe_regex: {regex: '.*'}}]}",
        )
    for name in needed:
        if matches_any(disallowed, name):
            yield Finding(
                f"ext_authz disallowed_headers keeps {name!r} from the sidecar",
                f"remove the pattern matching {name!r} from disallowed_headers",
            )


def check_listener_port(added: dict[str, Any]) -> Iterator[Finding]:
    """Envoy, not the client, tells the sidecar which listener a request came in on."""
    if added.get(LISTENER_PORT_HEADER) != "%DOWNSTREAM_LOCAL_PORT%":
        yield Finding(
            f"ext_authz does not set {LISTENER_PORT_HEADER} itself: the sidecar then "
            "reads a client-sent value, and a client can claim a trusted listener port",
            f"add authorization_request.headers_to_add: [{{key: {LISTENER_PORT_HEADER}, "
            "value: '%DOWNSTREAM_LOCAL_PORT%'}]",
        )


def check_header_count(hcm: dict[str, Any]) -> Iterator[Finding]:
    """The listener accepts no more request headers than the sidecar's HTTP server does."""
    accepted = (hcm.get("common_http_protocol_options") or {}).get("max_headers_count", ENVOY_MAX_HEADERS)
    if int(accepted) > ENVOY_MAX_HEADERS:
        yield Finding(
            f"listener {hcm.get('stat_prefix', '?')!r} accepts {accepted} request headers, the "
            f"sidecar's HTTP server {ENVOY_MAX_HEADERS} and those Envoy adds to a check: the "
            "sidecar refuses requests Envoy accepted (431)",
            f"set common_http_protocol_options.max_headers_count: {ENVOY_MAX_HEADERS} (or fewer)",
        )


def check_answer_taken(table: Table, response: dict[str, Any]) -> Iterator[Finding]:
    """From the sidecar's answer Envoy copies the steered headers to the request and the decision
    headers to dynamic metadata, and passes only content-type of a deny to the client."""
    effect = {
        table.routing_header: "nothing is routed",
        table.mirror_header: "mirror rules copy nothing",
        "cookie": "the backend never sees the key issued to a new visitor",
    }
    for name in steered_headers(table):
        if name == table.mirror_header and not table.mirrors:
            continue
        if not matches_any(response.get("allowed_upstream_headers"), name):
            yield Finding(
                f"ext_authz does not copy {name!r} from the sidecar's answer to the "
                f"request (allowed_upstream_headers): {effect.get(name, 'the lane does not travel on')}",
                f"add {{exact: {name}}} to authorization_response.allowed_upstream_headers",
            )
    if not matches_any(response.get("dynamic_metadata_from_headers"), DECISION_HEADER_PREFIX + "rule"):
        yield Finding(
            "ext_authz drops the decision headers: access logs cannot show rule and version",
            "set authorization_response.dynamic_metadata_from_headers: "
            f"{{patterns: [{{prefix: {DECISION_HEADER_PREFIX}}}]}}",
        )
    if not (response.get("allowed_client_headers") or {}).get("patterns"):
        yield Finding(
            "ext_authz passes every header of a deny answer to the client, the "
            "sidecar's decision headers included",
            "set authorization_response.allowed_client_headers: {patterns: [{exact: content-type}]}",
        )


def check_http_identity(table: Table, hcm: dict[str, Any], added: dict[str, Any]) -> Iterator[Finding]:
    """Over HTTP the client certificate reaches the sidecar only as Envoy's own XFCC, confirmed
    by the SAN lists Envoy adds beside it (sidecar.transports.authz_http)."""
    stat = hcm.get("stat_prefix", "?")
    mode = hcm.get("forward_client_cert_details", "SANITIZE")
    if mode not in ("SANITIZE", "SANITIZE_SET"):
        yield Finding(
            f"listener {stat!r} forwards a client-sent x-forwarded-client-cert "
            f"({mode}) to the HTTP authz check: a client can name its own identity",
            "set forward_client_cert_details: SANITIZE_SET (or SANITIZE without mTLS)",
        )
    rules = table.document.get("rules") or []
    assert isinstance(rules, list)
    uses_identity = bool(table.trust.identities) or any("identity" in (r.get("match") or {}) for r in rules)
    sets_uri = (hcm.get("set_current_client_cert_details") or {}).get("uri")
    if uses_identity and not (mode == "SANITIZE_SET" and sets_uri):
        yield Finding(
            f"the rules use client identities, but over HTTP the sidecar learns the "
            f"client certificate only from Envoy's x-forwarded-client-cert, which "
            f"listener {stat!r} does not set: identity rules never match",
            "require client certificates and set forward_client_cert_details: "
            "SANITIZE_SET with set_current_client_cert_details {uri: true, dns: true} "
            "(`graysteer envoy-config --mode ext_authz_http --mtls`)",
        )
    details = hcm.get("set_current_client_cert_details") or {}
    unconfirmed = [name for name, value in PEER_SAN_HEADERS.items() if added.get(name) != value]
    if mode == "SANITIZE_SET" and (unconfirmed or not (details.get("uri") and details.get("dns"))):
        yield Finding(
            f"listener {stat!r} sends the sidecar x-forwarded-client-cert without the client "
            "certificate's SAN lists, or without its URI and DNS SANs: the sidecar cannot tell a "
            "SAN holding ';' from two SANs, so it takes no identity from it (every mTLS request "
            "is decided without one and counted malformed_xfcc)",
            "set set_current_client_cert_details {uri: true, dns: true} and add to "
            "authorization_request.headers_to_add "
            + ", ".join(f"{{key: {name}, value: '{value}'}}" for name, value in PEER_SAN_HEADERS.items()),
        )


# Envoy checks a cluster that never had traffic every `no_traffic_interval` (default 60 s).
MAX_IDLE_CHECK_SECONDS = 5.0


CIRCUIT_BREAKER_LIMITS = ("max_connections", "max_pending_requests", "max_requests")


def check_circuit_breakers(name: str, cluster: dict[str, Any]) -> Iterator[Finding]:
    """The fast path's cluster must keep Envoy's connections under the sidecar's cap, which
    assumes Envoy holds at most ENVOY_SIDECAR_CONNECTIONS (Envoy's default is 1,024 each)."""
    thresholds = (cluster.get("circuit_breakers") or {}).get("thresholds") or []
    default: dict[str, Any] = next(
        (t for t in thresholds if t.get("priority", "DEFAULT") in ("DEFAULT", 0)), {}
    )
    over = {
        limit: default.get(limit, 1024)
        for limit in CIRCUIT_BREAKER_LIMITS
        if not str(default.get(limit, 1024)).isdigit()
        or int(default.get(limit, 1024)) > ENVOY_SIDECAR_CONNECTIONS
    }
    if over:
        shown = ", ".join(f"{limit} {value}" for limit, value in over.items())
        yield Finding(
            f"sidecar cluster {name!r} lets Envoy open more connections to the fast path than the "
            f"sidecar keeps room for ({shown}{' (the default)' if not default else ''}; the sidecar "
            f"assumes {ENVOY_SIDECAR_CONNECTIONS}): at its connection cap Envoy's own may be given up",
            "set the cluster's circuit_breakers.thresholds: [{"
            + ", ".join(f"{limit}: {ENVOY_SIDECAR_CONNECTIONS}" for limit in CIRCUIT_BREAKER_LIMITS)
            + "}]",
        )


def check_health_checks(name: str, cluster: dict[str, Any]) -> Iterator[Finding]:
    checks = cluster.get("health_checks") or []
    if not checks:
        yield Finding(
            f"sidecar cluster {name!r} has no health check: while the sidecar is down or "
            "draining every request waits for a connect timeout",
            "add a grpc_health_check (see `graysteer envoy-config`)",
        )
    for check in checks:
        idle = seconds(check.get("no_traffic_interval", "60s"))
        if idle is None or idle > MAX_IDLE_CHECK_SECONDS:
            yield Finding(
                f"sidecar cluster {name!r} is re-checked only every "
                f"{check.get('no_traffic_interval', '60s (the default)')} while it has "
                "no traffic: an Envoy that starts before its sidecar (every pod, "
                "`compose up`) sends every request on without a decision until then",
                "set no_traffic_interval (and no_traffic_healthy_interval) to the "
                "health check interval, e.g. 0.5s",
            )


def check_tracing(hcm: dict[str, Any], clusters: dict[str, Any]) -> Iterator[Finding]:
    """An OpenTelemetry tracer exports over gRPC: its collector cluster must exist and speak
    HTTP/2, or every span is lost without a word."""
    provider = (hcm.get("tracing") or {}).get("provider") or {}
    if provider.get("name") != "envoy.tracers.opentelemetry":
        return
    config = provider.get("typed_config") or {}
    name = ((config.get("grpc_service") or {}).get("envoy_grpc") or {}).get("cluster_name")
    stat = hcm.get("stat_prefix", "?")
    if name is not None and name not in clusters:
        yield Finding(
            f"listener {stat!r} traces to cluster {name!r}, which Envoy does not define: no span is exported",
            f"add the collector's cluster {name!r} (graysteer envoy-config --otlp HOST:PORT)",
        )
    elif name is not None and not is_http2(clusters[name]):
        yield Finding(
            f"listener {stat!r} traces to cluster {name!r} over OTLP/gRPC, but the cluster does not "
            "speak HTTP/2: every export fails",
            "give the cluster explicit_http_config: {http2_protocol_options: {}}",
        )
