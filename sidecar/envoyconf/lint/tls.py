"""Checks of the listeners' TLS when its certificates come by SDS (envoyconf.sds): what makes
Envoy refuse the config, miss a rotation, or accept any certificate its CA signed."""

from collections.abc import Iterator
from typing import Any

from sidecar.envoyconf.lint.common import HTTP_OPTIONS, Finding, is_http2

DOWNSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


def tls_contexts(config: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(listener name, common_tls_context) of every downstream TLS filter chain."""
    for listener in (config.get("static_resources") or {}).get("listeners") or []:
        for chain in listener.get("filter_chains") or []:
            typed = (chain.get("transport_socket") or {}).get("typed_config") or {}
            if typed.get("@type") == DOWNSTREAM_TLS:
                yield listener.get("name", "?"), typed.get("common_tls_context") or {}


def sds_configs(common: dict[str, Any]) -> list[dict[str, Any]]:
    """Every SDS secret config of a common_tls_context: certificates and validation."""
    combined = common.get("combined_validation_context") or {}
    found = list(common.get("tls_certificate_sds_secret_configs") or [])
    for holder in (common, combined):
        if holder.get("validation_context_sds_secret_config"):
            found.append(holder["validation_context_sds_secret_config"])
    return found


def check_tls(config: dict[str, Any], clusters: dict[str, Any]) -> Iterator[Finding]:
    node = config.get("node") or {}
    contexts = list(tls_contexts(config))
    if any(sds_configs(common) for _, common in contexts) and not (node.get("id") and node.get("cluster")):
        yield Finding(
            "the listener's certificates come by SDS but the bootstrap has no node id and "
            "cluster: Envoy refuses to start (`TlsCertificateSdsApi: node 'id' and 'cluster' "
            "are required`)",
            "add `node: {id: ..., cluster: ...}` (or start Envoy with --service-node and --service-cluster)",
        )
    for name, common in contexts:
        for secret in sds_configs(common):
            yield from check_source(name, secret, clusters)
        yield from check_san_matcher(name, common)


def check_source(listener: str, secret: dict[str, Any], clusters: dict[str, Any]) -> Iterator[Finding]:
    source = secret.get("sds_config") or {}
    secret_name = secret.get("name", "?")
    path = (source.get("path_config_source") or {}).get("path") or source.get("path")
    if path and not (source.get("path_config_source") or {}).get("watched_directory"):
        yield Finding(
            f"listener {listener!r} reads secret {secret_name!r} from {path} without a watched "
            "directory: Envoy sees a rotation only when that file itself is moved over, never "
            "when a Kubernetes volume swaps its `..data` link",
            "use path_config_source with watched_directory: {path: <the file's directory>} "
            "(`graysteer envoy-config --sds file:DIR`)",
        )
    for service in (source.get("api_config_source") or {}).get("grpc_services") or []:
        cluster = (service.get("envoy_grpc") or {}).get("cluster_name")
        if cluster is None:
            continue
        if cluster not in clusters:
            yield Finding(
                f"listener {listener!r} asks cluster {cluster!r} for secret {secret_name!r}, "
                "but there is no such cluster: the listener never gets a certificate",
                f"define cluster {cluster!r} (the SPIRE agent's socket: `envoy-config --sds spire:unix:///PATH`)",
            )
        elif not is_http2(clusters[cluster]):
            yield Finding(
                f"SDS cluster {cluster!r} does not speak HTTP/2: the gRPC SDS stream fails and "
                "the listener never gets a certificate",
                f"set typed_extension_protocol_options {HTTP_OPTIONS} "
                "explicit_http_config.http2_protocol_options: {}",
            )


def check_san_matcher(listener: str, common: dict[str, Any]) -> Iterator[Finding]:
    """The trust that comes by SDS is a CA or a bundle: the SAN matcher must stay beside it."""
    combined = common.get("combined_validation_context")
    if common.get("validation_context_sds_secret_config"):
        matchers = None
    elif combined is not None:
        matchers = (combined.get("default_validation_context") or {}).get("match_typed_subject_alt_names")
    else:
        return
    if not matchers:
        yield Finding(
            f"listener {listener!r} takes its client CA by SDS with no SAN matcher in the "
            "bootstrap: every certificate that CA (or SPIRE's trust bundle) signed is accepted, "
            "whatever its SPIFFE ID",
            "use combined_validation_context with default_validation_context."
            "match_typed_subject_alt_names: [{san_type: URI, matcher: {prefix: spiffe://DOMAIN/}}]",
        )
