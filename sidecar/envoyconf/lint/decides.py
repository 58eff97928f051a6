"""Checks of the decision inside Envoy (envoy-config --mode envoy_decides): the Lua filter
served over ECDS and the fast path's ext_authz filter that decides what the Lua leaves."""

from collections.abc import Iterator
from typing import Any

from sidecar.contract import LUA_FILTER_NAME, LUA_TYPE_URL, METADATA_NAMESPACE, UNDECIDED_KEY
from sidecar.envoyconf.lint.common import EXT_AUTHZ, Finding, is_http2


def ecds_lua(hcm: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
    """(position, filter) of the Lua filter the sidecar serves over ECDS, when there is one."""
    for position, entry in enumerate(hcm.get("http_filters") or []):
        discovery = entry.get("config_discovery")
        if discovery and LUA_TYPE_URL in (discovery.get("type_urls") or []):
            return position, entry
    return None


def check_decides(hcm: dict[str, Any], clusters: dict[str, Any]) -> Iterator[Finding]:
    found = ecds_lua(hcm)
    if found is None:
        return
    position, entry = found
    stat = hcm.get("stat_prefix", "?")
    discovery = entry["config_discovery"]
    if entry.get("name") != LUA_FILTER_NAME:
        yield Finding(
            f"listener {stat!r} asks ECDS for a Lua filter named {entry.get('name')!r}: the "
            f"sidecar serves {LUA_FILTER_NAME!r}, so Envoy never gets the table",
            f"name the filter {LUA_FILTER_NAME!r}",
        )
    default = discovery.get("default_config") or {}
    code = str((default.get("default_source_code") or {}).get("inline_string", ""))
    if UNDECIDED_KEY not in code or not discovery.get("apply_default_config_without_warming"):
        yield Finding(
            f"listener {stat!r}: before the first table the Lua filter does not leave every "
            "request to the sidecar: requests are held or decided without the table",
            "use the default config of `graysteer envoy-config --mode envoy_decides` with "
            "apply_default_config_without_warming: true",
        )
    yield from _source(stat, discovery, clusters)
    yield from _fallback(stat, hcm, position)


def _source(stat: str, discovery: dict[str, Any], clusters: dict[str, Any]) -> Iterator[Finding]:
    api = (discovery.get("config_source") or {}).get("api_config_source") or {}
    services = api.get("grpc_services") or [{}]
    cluster = (services[0].get("envoy_grpc") or {}).get("cluster_name")
    if cluster not in clusters:
        yield Finding(
            f"listener {stat!r}: the Lua filter's ECDS source names cluster {cluster!r}, "
            "which does not exist",
            "point config_discovery at a cluster for the sidecar's --xds-listen address",
        )
    elif not is_http2(clusters[cluster]):
        yield Finding(
            f"ECDS cluster {cluster!r} does not speak HTTP/2: Envoy never gets the table over gRPC",
            "set explicit_http_config.http2_protocol_options: {} on it",
        )


def _fallback(stat: str, hcm: dict[str, Any], position: int) -> Iterator[Finding]:
    filters = hcm.get("http_filters") or []
    after = [(f.get("typed_config") or {}) for f in filters[position + 1 :]]
    authz = [f for f in after if f.get("@type") == EXT_AUTHZ and "http_service" in f]
    if not authz:
        yield Finding(
            f"listener {stat!r}: no fast-path ext_authz filter after the Lua filter: what the "
            "Lua leaves to the sidecar (regexes, version ranges, baggage) is never decided",
            "add the ext_authz filter of `graysteer envoy-config --mode envoy_decides` after it",
        )
        return
    enabled = authz[0].get("filter_enabled_metadata") or {}
    path = [segment.get("key") for segment in enabled.get("path") or []]
    marked = (enabled.get("value") or {}).get("bool_match") is True
    if enabled.get("filter") != METADATA_NAMESPACE or path != [UNDECIDED_KEY] or not marked:
        yield Finding(
            f"listener {stat!r}: the fast path's ext_authz filter does not run exactly for the "
            "requests the Lua left undecided: it asks the sidecar again for every request, "
            "or never",
            f"set filter_enabled_metadata: {{filter: {METADATA_NAMESPACE}, path: [{{key: "
            f"{UNDECIDED_KEY}}}], value: {{bool_match: true}}}}",
        )
