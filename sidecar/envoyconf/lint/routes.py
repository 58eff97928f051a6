"""Checks of what decides a request's route: the guarded cluster header, the fallback and
mirror policies, the backstop that holds while the sidecar is away, paths and XFCC."""

from collections.abc import Iterator
from typing import Any

from sidecar.core import Table
from sidecar.core.regex import RegexError, compile_regex
from sidecar.envoyconf.backstop import (
    LUA_FILTER,
    LUA_MARKER,
    RBAC_FILTER,
    baggage_key,
    deny_rules,
    protected_headers,
)
from sidecar.envoyconf.lint.common import LUA, RBAC, Finding

PROBES = ("", "unknown-cluster", "Stable", "a|b", ".*")


def check_routes(table: Table, hcm: dict[str, Any], clusters: dict[str, Any]) -> Iterator[Finding]:
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
        accepts = matcher(matchers[0]) if matchers else None
        if accepts is None:
            yield Finding(
                f"the cluster_header route does not check {header!r} against the known "
                "names: an unknown name makes Envoy answer 503 NC",
                f"match {header} with safe_regex {guard(table)}",
            )
            continue
        leaks = [
            p for p in PROBES + tuple(c + "x" for c in table.clusters) if accepts(p) and p not in clusters
        ]
        if leaks:
            yield Finding(
                f"the guard on {header!r} lets unknown cluster names through "
                f"(e.g. {leaks[0]!r}): Envoy answers 503 NC for them",
                f"use safe_regex {guard(table)}",
            )
        refused = [c for c in table.clusters if not accepts(c)]
        if refused:
            yield Finding(
                f"the guard on {header!r} refuses cluster(s) {', '.join(refused)}: their "
                "traffic takes the default route",
                f"use safe_regex {guard(table)}",
            )
    if table.mirrors and table.mirror_header not in mirror_headers(hcm):
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


def mirror_headers(hcm: dict[str, Any]) -> set[str]:
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


def guard(table: Table) -> str:
    return guard_regex(table.clusters)


def matcher(matcher: dict[str, Any]) -> Any:
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


def fallback_routes(hcm: dict[str, Any]) -> list[dict[str, Any]]:
    """The routes a request takes when no decision set the routing header."""
    return [
        r
        for vh in (hcm.get("route_config") or {}).get("virtual_hosts") or []
        for r in vh.get("routes") or []
        if not (r.get("match") or {}).get("headers") and (r.get("route") or {}).get("cluster")
    ]


def check_backstop(table: Table, hcm: dict[str, Any], filters: list[dict[str, Any]]) -> Iterator[Finding]:
    """Fail-open routing must not fail open on security: deny rules and the strip of what an
    untrusted caller may not carry must hold on the fallback route without the sidecar."""
    stat = hcm.get("stat_prefix", "?")
    fallbacks = fallback_routes(hcm)
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


def check_paths(table: Table, hcm: dict[str, Any]) -> Iterator[Finding]:
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


def check_xfcc(table: Table, hcm: dict[str, Any]) -> Iterator[Finding]:
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
