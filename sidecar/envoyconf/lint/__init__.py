"""`graysteer check rules.yaml --envoy envoy.yaml`: find Envoy config that breaks steering.

Works on the plain YAML (snake_case or camelCase), so any bootstrap can be checked,
whatever other extensions it uses. Each finding is one line: what is wrong and the fix.
"""

from collections.abc import Iterator
from typing import Any

from sidecar.contract import DECISION_HEADER_PREFIX
from sidecar.core import Table
from sidecar.envoyconf.lint.common import (
    EXT_AUTHZ,
    EXT_PROC,
    HCM,
    RAW_VALUE_FLAG,
    Finding,
    dotted_get,
    snake_keys,
)
from sidecar.envoyconf.lint.cookies import check_cookies
from sidecar.envoyconf.lint.decides import check_decides, ecds_lua
from sidecar.envoyconf.lint.filters import check_filter, check_http_service, check_tracing
from sidecar.envoyconf.lint.routes import (
    check_backstop,
    check_paths,
    check_routes,
    check_xfcc,
    guard_regex,
    mirror_headers,
)
from sidecar.envoyconf.lint.tls import check_tls

__all__ = ["Finding", "check", "guard_regex", "snake_keys"]


def check(table: Table, envoy: dict[str, Any]) -> list[Finding]:
    """Every finding for `envoy` (a bootstrap as parsed YAML) against the rules."""
    return list(findings(table, snake_keys(envoy)))


def findings(table: Table, config: dict[str, Any]) -> Iterator[Finding]:
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
        yield from check_manager(table, hcm, clusters)
    yield from check_tls(config, clusters)
    layers = (config.get("layered_runtime") or {}).get("layers") or []
    for layer in layers:
        value = dotted_get(layer.get("static_layer") or {}, RAW_VALUE_FLAG)
        if value is False or value == "false":
            yield Finding(
                f"the runtime sets {RAW_VALUE_FLAG} to false: Envoy then reads header "
                "`value`, but ext_proc mutations carry `raw_value`, so the routing "
                "header arrives empty",
                f"remove the {RAW_VALUE_FLAG} override",
            )


def check_manager(table: Table, hcm: dict[str, Any], clusters: dict[str, Any]) -> Iterator[Finding]:
    header = table.routing_header
    stat = hcm.get("stat_prefix", "?")
    filters = [f.get("typed_config") or {} for f in hcm.get("http_filters") or []]
    sidecar_filters = [f for f in filters if f.get("@type") in (EXT_PROC, EXT_AUTHZ)]
    yield from check_decides(hcm, clusters)
    if not sidecar_filters and ecds_lua(hcm) is None:
        yield Finding(
            f"listener {stat!r} has no ext_proc or ext_authz filter: the sidecar is never asked",
            "add the ext_proc filter (see `graysteer envoy-config`)",
        )
    yield from check_cookies(table, hcm, sidecar_filters)
    for config in sidecar_filters:
        if "http_service" in config:
            yield from check_http_service(table, config, hcm, clusters)
        else:
            yield from check_filter(config, clusters)
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
    prefixes = {
        ((m.get("remove_on_match") or {}).get("key_matcher") or {}).get("prefix", "").lower()
        for ext in hcm.get("early_header_mutation_extensions") or []
        for m in (ext.get("typed_config") or {}).get("mutations") or []
    }
    if not any(p and DECISION_HEADER_PREFIX.startswith(p) for p in prefixes):
        yield Finding(
            f"listener {stat!r} does not strip client-sent {DECISION_HEADER_PREFIX}* headers: they "
            "reach the backends as if the sidecar had decided them",
            "add `{remove_on_match: {key_matcher: {prefix: "
            f"{DECISION_HEADER_PREFIX}}}}}}}` to the early_header_mutation_extensions' mutations",
        )
    for mirror_header in sorted(mirror_headers(hcm) - stripped):
        yield Finding(
            f"listener {stat!r} mirrors by {mirror_header!r} but does not strip a client-sent "
            "one before routing: a client can copy its requests to any cluster",
            f"add `{{remove: {mirror_header}}}` to the early_header_mutation_extensions' mutations",
        )
    yield from check_routes(table, hcm, clusters)
    if any(f.get("failure_mode_allow") for f in sidecar_filters):
        yield from check_backstop(table, hcm, filters)
    yield from check_paths(table, hcm)
    yield from check_xfcc(table, hcm)
    yield from check_tracing(hcm, clusters)
