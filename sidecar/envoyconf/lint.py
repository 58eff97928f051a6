"""`graysteer check rules.yaml --envoy envoy.yaml`: find Envoy config that breaks steering.

Works on the plain YAML (snake_case or camelCase), so any bootstrap can be checked,
whatever other extensions it uses. Each finding is one line: what is wrong and the fix.
"""

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sidecar.core import Table
from sidecar.core.identity import RegexError, compile_regex
from sidecar.core.steering import steered_headers
from sidecar.envoyconf.backstop import (
    LUA_FILTER,
    LUA_MARKER,
    RBAC_FILTER,
    baggage_key,
    deny_rules,
    protected_headers,
)
from sidecar.transports.authz_http import (
    DECISION_HEADER_PREFIX,
    ENVOY_MAX_HEADERS,
    ENVOY_POOL_IDLE_TIMEOUT,
    HEALTH_PATH,
    LISTENER_PORT_HEADER,
    PATH_PREFIX,
    PEER_SAN_HEADERS,
    Limits,
)
from sidecar.transports.ext_proc import METADATA_NAMESPACE

EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
EXT_AUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
LUA = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
RAW_VALUE_FLAG = "envoy.reloadable_features.send_header_raw_value"


@dataclass(frozen=True)
class Finding:
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.problem}. Fix: {self.fix}"


def snake_keys(node: Any) -> Any:
    """camelCase keys -> snake_case (keys with dots, such as extension names, are kept)."""
    if isinstance(node, dict):
        return {
            (
                re.sub(r"(?<!^)([A-Z])", r"_\1", k).lower() if re.fullmatch(r"[a-z][A-Za-z0-9]*", k) else k
            ): snake_keys(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [snake_keys(v) for v in node]
    return node


def check(table: Table, envoy: dict[str, Any]) -> list[Finding]:
    config = snake_keys(envoy)
    return list(_check(table, config))


def _check(table: Table, config: dict[str, Any]) -> Iterator[Finding]:
    resources = config.get("static_resources") or {}
    clusters = {c.get("name"): c for c in resources.get("clusters") or []}
    for name in table.clusters:
        if name not in clusters:
            yield Finding(
                f"the rules name cluster {name!r} but Envoy defines no such cluster",
                f"add a cluster named {name!r} to static_resources.clusters",
            )
    managers = [
        f["typed_config"]
        for listener in resources.get("listeners") or []
        for chain in listener.get("filter_chains") or []
        for f in chain.get("filters") or []
        if (f.get("typed_config") or {}).get("@type") == HCM
    ]
    if not managers:
        yield Finding("no HTTP connection manager found", "check the file is an Envoy bootstrap")
    for hcm in managers:
        yield from _check_manager(table, hcm, clusters)
    layers = (config.get("layered_runtime") or {}).get("layers") or []
    for layer in layers:
        value = _dotted_get(layer.get("static_layer") or {}, RAW_VALUE_FLAG)
        if value is False or value == "false":
            yield Finding(
                f"the runtime sets {RAW_VALUE_FLAG} to false: Envoy then reads header "
                "`value`, but ext_proc mutations carry `raw_value`, so the routing "
                "header arrives empty",
                f"remove the {RAW_VALUE_FLAG} override",
            )


def _dotted_get(layer: dict[str, Any], key: str) -> Any:
    if key in layer:
        return layer[key]
    node: Any = layer
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _check_manager(table: Table, hcm: dict[str, Any], clusters: dict[str, Any]) -> Iterator[Finding]:
    header = table.routing_header
    stat = hcm.get("stat_prefix", "?")
    filters = [f.get("typed_config") or {} for f in hcm.get("http_filters") or []]
    sidecar_filters = [f for f in filters if f.get("@type") in (EXT_PROC, EXT_AUTHZ)]
    if not sidecar_filters:
        yield Finding(
            f"listener {stat!r} has no ext_proc or ext_authz filter: the sidecar is never asked",
            "add the ext_proc filter (see `graysteer envoy-config`)",
        )
    for config in sidecar_filters:
        if "http_service" in config:
            yield from _check_http_service(table, config, hcm, clusters)
        else:
            yield from _check_filter(config, clusters)
    stripped = {
        m.get("remove", "").lower()
        for ext in hcm.get("early_header_mutation_extensions") or []
        for m in (ext.get("typed_config") or {}).get("mutations") or []
    }
    if header not in stripped:
        yield Finding(
            f"listener {stat!r} does not strip a client-sent {header!r} before routing: a "
            "client can pick its cluster (always when the sidecar is down)",
            f"add early_header_mutation_extensions with `mutations: [{{remove: {header}}}]`",
        )
    for mirror_header in sorted(_mirror_headers(hcm) - stripped):
        yield Finding(
            f"listener {stat!r} mirrors by {mirror_header!r} but does not strip a client-sent "
            "one before routing: a client can copy its requests to any cluster",
            f"add `{{remove: {mirror_header}}}` to the early_header_mutation_extensions' mutations",
        )
    yield from _check_routes(table, hcm, clusters)
    if any(f.get("failure_mode_allow") for f in sidecar_filters):
        yield from _check_backstop(table, hcm, filters)
    yield from _check_paths(table, hcm)
    yield from _check_xfcc(table, hcm)


def _check_filter(config: dict[str, Any], clusters: dict[str, Any]) -> Iterator[Finding]:
    is_ext_proc = config.get("@type") == EXT_PROC
    name = "ext_proc" if is_ext_proc else "ext_authz"
    cluster_name = ((config.get("grpc_service") or {}).get("envoy_grpc") or {}).get("cluster_name")
    if cluster_name and cluster_name not in clusters:
        yield Finding(
            f"the {name} filter points at cluster {cluster_name!r}, which does not exist",
            f"define the sidecar cluster {cluster_name!r}",
        )
    elif cluster_name and not _is_http2(clusters[cluster_name]):
        yield Finding(
            f"sidecar cluster {cluster_name!r} does not speak HTTP/2: gRPC to the sidecar "
            "fails (status 14, HTTP 500)",
            "set typed_extension_protocol_options "
            f"{HTTP_OPTIONS} explicit_http_config.http2_protocol_options: {{}}",
        )
    if cluster_name in clusters:
        yield from _check_health_checks(cluster_name, clusters[cluster_name])
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


def _matches(matcher: dict[str, Any], name: str) -> bool:
    """Whether an Envoy StringMatcher accepts `name` (a header name, lower case)."""
    if matcher.get("ignore_case"):
        matcher = {k: v.lower() if isinstance(v, str) else v for k, v in matcher.items()}
    if "exact" in matcher:
        return bool(name == matcher["exact"])
    if "prefix" in matcher:
        return name.startswith(matcher["prefix"])
    if "suffix" in matcher:
        return name.endswith(matcher["suffix"])
    if "contains" in matcher:
        return matcher["contains"] in name
    if "safe_regex" in matcher:
        try:
            return compile_regex((matcher["safe_regex"] or {}).get("regex", ""))(name)
        except RegexError:
            return False
    return False


def _matches_any(patterns: dict[str, Any] | None, name: str) -> bool:
    return any(_matches(m, name) for m in (patterns or {}).get("patterns") or [])


def _check_http_service(
    table: Table, config: dict[str, Any], hcm: dict[str, Any], clusters: dict[str, Any]
) -> Iterator[Finding]:
    """ext_authz over plain HTTP (sidecar.transports.authz_http): what the check must carry and what
    Envoy must take from the answer."""
    service = config.get("http_service") or {}
    cluster_name = (service.get("server_uri") or {}).get("cluster")
    if cluster_name not in clusters:
        yield Finding(
            f"the ext_authz http_service points at cluster {cluster_name!r}, which does not exist",
            "define the sidecar cluster and name it in server_uri.cluster",
        )
    else:
        cluster = clusters[cluster_name]
        if _is_http2(cluster):
            yield Finding(
                f"sidecar cluster {cluster_name!r} speaks HTTP/2, but the sidecar's HTTP "
                "authz server speaks HTTP/1.1: every check fails",
                "remove http2_protocol_options from the sidecar cluster",
            )
        yield from _check_health_checks(cluster_name, cluster)
        options = (cluster.get("typed_extension_protocol_options") or {}).get(HTTP_OPTIONS) or {}
        idle = _seconds((options.get("common_http_protocol_options") or {}).get("idle_timeout"))
        if idle is None or not 0 < idle <= Limits().idle_timeout / 2:
            yield Finding(
                f"sidecar cluster {cluster_name!r} keeps idle connections "
                f"{'an hour (the default)' if idle is None else f'{idle:g}s'}, the sidecar "
                f"{Limits().idle_timeout:g}s: a check Envoy sends as the sidecar closes one fails, "
                "and the request skips the sidecar",
                f"set the cluster's {HTTP_OPTIONS} common_http_protocol_options.idle_timeout: "
                f"{ENVOY_POOL_IDLE_TIMEOUT:g}s",
            )
        for check in cluster.get("health_checks") or []:
            if (check.get("http_health_check") or {}).get("path") != HEALTH_PATH:
                yield Finding(
                    f"sidecar cluster {cluster_name!r} is not health-checked over HTTP "
                    f"on {HEALTH_PATH}: Envoy cannot see the sidecar draining or not "
                    "ready",
                    f"use http_health_check: {{path: {HEALTH_PATH}}}",
                )
    timeout = _seconds((service.get("server_uri") or {}).get("timeout"))
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
    allowed = config.get("allowed_headers") or (
        (service.get("authorization_request") or {}).get("allowed_headers")
    )
    disallowed = config.get("disallowed_headers")
    needed = [*sorted(table.trust.protected), *NEEDED_HEADERS]
    if table.coloring is not None:
        needed.append(table.coloring.header)
    if not _matches_any(allowed, "x-any-header-a-rule-reads"):
        yield Finding(
            "ext_authz allowed_headers does not pass every request header to the sidecar: "
            "rules on the headers it leaves out never match",
            "set allowed_headers: {patterns: [{safe_regex: {regex: '.*'}}]}",
        )
    for name in needed:
        if _matches_any(disallowed, name):
            yield Finding(
                f"ext_authz disallowed_headers keeps {name!r} from the sidecar",
                f"remove the pattern matching {name!r} from disallowed_headers",
            )
    added = {
        h.get("key", "").lower(): h.get("value")
        for h in (service.get("authorization_request") or {}).get("headers_to_add") or []
    }
    if added.get(LISTENER_PORT_HEADER) != "%DOWNSTREAM_LOCAL_PORT%":
        yield Finding(
            f"ext_authz does not set {LISTENER_PORT_HEADER} itself: the sidecar then "
            "reads a client-sent value, and a client can claim a trusted listener port",
            f"add authorization_request.headers_to_add: [{{key: {LISTENER_PORT_HEADER}, "
            "value: '%DOWNSTREAM_LOCAL_PORT%'}]",
        )
    accepted = (hcm.get("common_http_protocol_options") or {}).get("max_headers_count", ENVOY_MAX_HEADERS)
    if int(accepted) > ENVOY_MAX_HEADERS:
        yield Finding(
            f"listener {hcm.get('stat_prefix', '?')!r} accepts {accepted} request headers, the "
            f"sidecar's HTTP server {ENVOY_MAX_HEADERS} and those Envoy adds to a check: the "
            "sidecar refuses requests Envoy accepted (431)",
            f"set common_http_protocol_options.max_headers_count: {ENVOY_MAX_HEADERS} (or fewer)",
        )
    response = service.get("authorization_response") or {}
    effect = {table.routing_header: "nothing is routed", table.mirror_header: "mirror rules copy nothing"}
    for name in steered_headers(table):
        if name == table.mirror_header and not table.mirrors:
            continue
        if not _matches_any(response.get("allowed_upstream_headers"), name):
            yield Finding(
                f"ext_authz does not copy {name!r} from the sidecar's answer to the "
                f"request (allowed_upstream_headers): {effect.get(name, 'the lane does not travel on')}",
                f"add {{exact: {name}}} to authorization_response.allowed_upstream_headers",
            )
    if not _matches_any(response.get("dynamic_metadata_from_headers"), DECISION_HEADER_PREFIX + "rule"):
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
    yield from _check_http_identity(table, hcm, added)


def _check_http_identity(table: Table, hcm: dict[str, Any], added: dict[str, Any]) -> Iterator[Finding]:
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


def _seconds(duration: Any) -> float | None:
    """A protobuf Duration as YAML writes it ("0.5s", or {seconds, nanos}) in seconds."""
    if isinstance(duration, str) and duration.endswith("s"):
        try:
            return float(duration[:-1])
        except ValueError:
            return None
    if isinstance(duration, dict):
        return float(duration.get("seconds", 0)) + float(duration.get("nanos", 0)) / 1e9
    return None


def _check_health_checks(name: str, cluster: dict[str, Any]) -> Iterator[Finding]:
    checks = cluster.get("health_checks") or []
    if not checks:
        yield Finding(
            f"sidecar cluster {name!r} has no health check: while the sidecar is down or "
            "draining every request waits for a connect timeout",
            "add a grpc_health_check (see `graysteer envoy-config`)",
        )
    for check in checks:
        idle = _seconds(check.get("no_traffic_interval", "60s"))
        if idle is None or idle > MAX_IDLE_CHECK_SECONDS:
            yield Finding(
                f"sidecar cluster {name!r} is re-checked only every "
                f"{check.get('no_traffic_interval', '60s (the default)')} while it has "
                "no traffic: an Envoy that starts before its sidecar (every pod, "
                "`compose up`) sends every request on without a decision until then",
                "set no_traffic_interval (and no_traffic_healthy_interval) to the "
                "health check interval, e.g. 0.5s",
            )


def _is_http2(cluster: dict[str, Any]) -> bool:
    if "http2_protocol_options" in cluster:
        return True
    options = (cluster.get("typed_extension_protocol_options") or {}).get(HTTP_OPTIONS) or {}
    explicit = options.get("explicit_http_config") or {}
    return "http2_protocol_options" in explicit or "use_downstream_protocol_config" in options


PROBES = ("", "unknown-cluster", "Stable", "a|b", ".*")


def _check_routes(table: Table, hcm: dict[str, Any], clusters: dict[str, Any]) -> Iterator[Finding]:
    header = table.routing_header
    routes = [
        r for vh in (hcm.get("route_config") or {}).get("virtual_hosts") or [] for r in vh.get("routes") or []
    ]
    by_header = [r for r in routes if (r.get("route") or {}).get("cluster_header")]
    if not any(r["route"]["cluster_header"].lower() == header for r in by_header):
        yield Finding(
            f"no route forwards with cluster_header: {header}: decisions are ignored",
            f"add a route `route: {{cluster_header: {header}}}` guarded by the cluster names",
        )
    for route in by_header:
        if route["route"]["cluster_header"].lower() != header:
            yield Finding(
                f"a route uses cluster_header {route['route']['cluster_header']!r} but the "
                f"rules set {header!r}",
                f"route on {header!r} or set routing_header",
            )
            continue
        matchers = [
            h for h in (route.get("match") or {}).get("headers") or [] if h.get("name", "").lower() == header
        ]
        accepts = _matcher(matchers[0]) if matchers else None
        if accepts is None:
            yield Finding(
                f"the cluster_header route does not check {header!r} against the known "
                "names: an unknown name makes Envoy answer 503 NC",
                f"match {header} with safe_regex {_guard(table)}",
            )
            continue
        leaks = [
            p for p in PROBES + tuple(c + "x" for c in table.clusters) if accepts(p) and p not in clusters
        ]
        if leaks:
            yield Finding(
                f"the guard on {header!r} lets unknown cluster names through "
                f"(e.g. {leaks[0]!r}): Envoy answers 503 NC for them",
                f"use safe_regex {_guard(table)}",
            )
        refused = [c for c in table.clusters if not accepts(c)]
        if refused:
            yield Finding(
                f"the guard on {header!r} refuses cluster(s) {', '.join(refused)}: their "
                "traffic takes the default route",
                f"use safe_regex {_guard(table)}",
            )
    if table.mirrors and table.mirror_header not in _mirror_headers(hcm):
        yield Finding(
            f"the rules mirror requests but no route copies them by {table.mirror_header!r}",
            f"add `request_mirror_policies: [{{cluster_header: {table.mirror_header}}}]` to the "
            "cluster_header route",
        )
    if not any(
        not (r.get("match") or {}).get("headers") and (r.get("route") or {}).get("cluster") for r in routes
    ):
        yield Finding(
            "no fallback route without a header match: requests without a decision get 404",
            f"add `- match: {{prefix: /}}` with `route: {{cluster: {table.default}}}`",
        )


def _mirror_headers(hcm: dict[str, Any]) -> set[str]:
    """The headers any route's request_mirror_policies take a cluster from."""
    return {
        policy["cluster_header"].lower()
        for vh in (hcm.get("route_config") or {}).get("virtual_hosts") or []
        for route in vh.get("routes") or []
        for policy in (route.get("route") or {}).get("request_mirror_policies") or []
        if policy.get("cluster_header")
    }


def guard_regex(clusters: tuple[str, ...]) -> str:
    """`^(stable|canary)$`: matches exactly the known names (only `.` needs escaping)."""
    return "^(" + "|".join(c.replace(".", r"\.") for c in clusters) + ")$"


def _guard(table: Table) -> str:
    return guard_regex(table.clusters)


def _matcher(matcher: dict[str, Any]) -> Any:
    """A predicate for an Envoy HeaderMatcher on one value, or None if it accepts anything."""
    if matcher.get("invert_match"):
        return None
    string = matcher.get("string_match") or {}
    if "safe_regex" in string or "safe_regex_match" in matcher:
        regex = (string.get("safe_regex") or matcher.get("safe_regex_match") or {}).get("regex", "")
        try:
            return compile_regex(regex)  # RE2 with Envoy's limits: what Envoy will match
        except RegexError:
            return None
    if "exact" in string or "exact_match" in matcher:
        exact = string.get("exact", matcher.get("exact_match"))
        return lambda value: value == exact
    return None


def _fallback_routes(hcm: dict[str, Any]) -> list[dict[str, Any]]:
    """The routes a request takes when no decision set the routing header."""
    return [
        r
        for vh in (hcm.get("route_config") or {}).get("virtual_hosts") or []
        for r in vh.get("routes") or []
        if not (r.get("match") or {}).get("headers") and (r.get("route") or {}).get("cluster")
    ]


def _check_backstop(table: Table, hcm: dict[str, Any], filters: list[dict[str, Any]]) -> Iterator[Finding]:
    """Fail-open routing must not fail open on security: deny rules and the strip of what an
    untrusted caller may not carry must hold on the fallback route without the sidecar."""
    stat = hcm.get("stat_prefix", "?")
    fallbacks = _fallback_routes(hcm)
    denied = deny_rules(table)
    policies = {
        name
        for f in filters
        if f.get("@type") == RBAC and (f.get("rules") or {}).get("action", "ALLOW") == "DENY"
        for name in (f.get("rules") or {}).get("policies") or {}
    }
    missing = [name for name in denied if name not in policies]
    if missing:
        yield Finding(
            f"listener {stat!r} lets deny rule(s) {', '.join(missing)} through while the "
            "sidecar is away (failure_mode_allow routes on without a decision)",
            "add the RBAC filter `graysteer envoy-config` generates from the deny rules",
        )
    for route in fallbacks:
        per_filter = route.get("typed_per_filter_config") or {}
        if denied and RBAC_FILTER in per_filter and not per_filter[RBAC_FILTER].get("rbac"):
            yield Finding(
                "the fallback route switches the RBAC deny backstop off",
                f"remove typed_per_filter_config {RBAC_FILTER} from the fallback route",
            )
        removed = {h.lower() for h in route.get("request_headers_to_remove") or []}
        kept = [h for h in protected_headers(table) if h not in removed]
        if kept:
            yield Finding(
                f"the fallback route passes client-sent {', '.join(kept)} to the backend "
                "while the sidecar is away: the next hop honours a smuggled override or "
                f"lane",
                f"add request_headers_to_remove: [{', '.join(kept)}] to it",
            )
        if (per_filter.get(LUA_FILTER) or {}).get("disabled"):
            yield Finding(
                "the fallback route switches the baggage strip (Lua) off",
                f"remove typed_per_filter_config {LUA_FILTER} from the fallback route",
            )
    key = baggage_key(table)
    marker = f'{LUA_MARKER} "{key}"'
    if key and not any(
        marker in ((f.get("default_source_code") or {}).get("inline_string") or "")
        for f in filters
        if f.get("@type") == LUA
    ):
        yield Finding(
            f"listener {stat!r} passes a client-sent baggage member {key!r} to the backend "
            "while the sidecar is away",
            "add the Lua filter `graysteer envoy-config` generates after the sidecar's filter",
        )


SAFE_SLASH_ACTIONS = ("UNESCAPE_AND_REDIRECT", "UNESCAPE_AND_FORWARD", "REJECT_REQUEST")


def _check_paths(table: Table, hcm: dict[str, Any]) -> Iterator[Finding]:
    rules = table.document.get("rules") or []
    assert isinstance(rules, list)
    if not any("path" in (r.get("match") or {}) for r in rules):
        return
    missing = [
        f"{key}: {value}"
        for key, value, ok in (
            ("normalize_path", "true", hcm.get("normalize_path") is True),
            ("merge_slashes", "true", hcm.get("merge_slashes") is True),
            (
                "path_with_escaped_slashes_action",
                "UNESCAPE_AND_REDIRECT",
                hcm.get("path_with_escaped_slashes_action") in SAFE_SLASH_ACTIONS,
            ),
        )
        if not ok
    ]
    if missing:
        yield Finding(
            f"rules match on the path but listener {hcm.get('stat_prefix', '?')!r} does not "
            "normalize it: `//admin`, `/./admin`, `/%61dmin` or `/api/../admin` walk "
            "around a path rule",
            f"set {', '.join(missing)} on the connection manager",
        )


def _check_xfcc(table: Table, hcm: dict[str, Any]) -> Iterator[Finding]:
    if not table.trust.xfcc:
        return
    stat = hcm.get("stat_prefix", "?")
    mode = hcm.get("forward_client_cert_details", "SANITIZE")
    if mode != "SANITIZE_SET":
        yield Finding(
            f"the rules trust x-forwarded-client-cert (trust.xfcc) but listener {stat!r} "
            f"has forward_client_cert_details {mode}: a client can claim any identity "
            "(or none reaches the sidecar)",
            "set forward_client_cert_details: SANITIZE_SET "
            "with set_current_client_cert_details {uri: true, dns: true}",
        )
    elif not (hcm.get("set_current_client_cert_details") or {}).get("uri"):
        yield Finding(
            f"listener {stat!r} sets x-forwarded-client-cert without the URI SAN: the "
            "sidecar sees no SPIFFE ID",
            "set set_current_client_cert_details.uri: true",
        )
