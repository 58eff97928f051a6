"""What every check of an Envoy config shares: the finding, the type URLs, reading YAML
keys and values as Envoy does."""

import re
from dataclasses import dataclass
from typing import Any

from sidecar.core.regex import RegexError, compile_regex

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


def dotted_get(layer: dict[str, Any], key: str) -> Any:
    if key in layer:
        return layer[key]
    node: Any = layer
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def seconds(duration: Any) -> float | None:
    """A protobuf Duration as YAML writes it ("0.5s", or {seconds, nanos}) in seconds."""
    if isinstance(duration, str) and duration.endswith("s"):
        try:
            return float(duration[:-1])
        except ValueError:
            return None
    if isinstance(duration, dict):
        return float(duration.get("seconds", 0)) + float(duration.get("nanos", 0)) / 1e9
    return None


def matches(matcher: dict[str, Any], name: str) -> bool:
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


def matches_any(patterns: dict[str, Any] | None, name: str) -> bool:
    return any(matches(m, name) for m in (patterns or {}).get("patterns") or [])


def is_http2(cluster: dict[str, Any]) -> bool:
    if "http2_protocol_options" in cluster:
        return True
    options = (cluster.get("typed_extension_protocol_options") or {}).get(HTTP_OPTIONS) or {}
    explicit = options.get("explicit_http_config") or {}
    return "http2_protocol_options" in explicit or "use_downstream_protocol_config" in options
