"""Traces (`envoy-config --otlp HOST:PORT`): Envoy's OpenTelemetry tracer, exporting OTLP/gRPC
to a collector (Jaeger, Tempo, an OpenTelemetry Collector), with the decision on Envoy's own
`ingress` span as custom tags read from the decision's dynamic metadata. The sidecar does
nothing per request for it: the metadata is what every mode already sends back.

Tags: graysteer.cluster, .rule, .reason, .lane, .bucket and .version, and OpenTelemetry's
feature-flag pair (`feature_flag.key`: the deciding rule, `feature_flag.variant`: the
cluster). A field the decision does not have (no bucket outside a split) is absent from the
span. Envoy continues a client's W3C `traceparent` (same trace id, Envoy's span a child of
the client's) and starts a trace otherwise; its default sampling traces every request, and a
client's unsampled `traceparent` (`-00`) is respected.

Envoy exports in batches (runtime keys `tracing.opentelemetry.min_flush_spans`, default 5,
and `tracing.opentelemetry.flush_interval_ms`, default 5000). The collector's cluster pings
its HTTP/2 connection: a collector that accepts connections but never answers would
otherwise hold export streams until Envoy's limit, then lose spans silently.
"""

from datetime import timedelta

from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.core.v3 import (
    GrpcService,
    GrpcServiceEnvoyGrpc,
    Http2ProtocolOptions,
    KeepaliveSettings,
)
from envoy_data_plane.envoy.config.trace.v3 import OpenTelemetryConfig, TracingHttp
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManagerTracing,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.metadata.v3 import (
    MetadataKey,
    MetadataKeyPathSegment,
    MetadataKind,
    MetadataKindRequest,
)
from envoy_data_plane.envoy.type.tracing.v3 import CustomTag, CustomTagMetadata
from envoy_data_plane.google.protobuf import Any as AnyMessage

from sidecar.contract import DECISION_HEADER_PREFIX, EXT_AUTHZ_NAMESPACE, METADATA_NAMESPACE
from sidecar.envoyconf.clusters import HostPort, make_cluster, protocol_options

COLLECTOR_CLUSTER = "otel_collector"
DEFAULT_SERVICE_NAME = "envoy"
TAGGED = ("cluster", "rule", "reason", "lane", "bucket", "version")  # graysteer.<field>
FEATURE_FLAG = {"feature_flag.key": "rule", "feature_flag.variant": "cluster"}


def metadata_key(mode: str, field: str) -> MetadataKey:
    """Where a decision field is in the request's dynamic metadata in each mode."""
    if mode == "ext_proc":
        namespace, key = METADATA_NAMESPACE, field
    elif mode == "ext_authz":
        namespace, key = EXT_AUTHZ_NAMESPACE, field
    else:  # ext_authz_http: dynamic_metadata_from_headers, keyed by the answer's header name
        namespace, key = EXT_AUTHZ_NAMESPACE, DECISION_HEADER_PREFIX + field.replace("_", "-")
    return MetadataKey(key=namespace, path=[MetadataKeyPathSegment(key=key)])


def decision_tags(mode: str) -> list[CustomTag]:
    tags = {f"graysteer.{field}": field for field in TAGGED} | FEATURE_FLAG
    return [
        CustomTag(
            tag=tag,
            metadata=CustomTagMetadata(
                kind=MetadataKind(request=MetadataKindRequest()), metadata_key=metadata_key(mode, field)
            ),
        )
        for tag, field in tags.items()
    ]


def tracing(mode: str, service_name: str = DEFAULT_SERVICE_NAME) -> HttpConnectionManagerTracing:
    """The connection manager's tracing: OpenTelemetry to COLLECTOR_CLUSTER, the decision tagged."""
    exporter = OpenTelemetryConfig(
        grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=COLLECTOR_CLUSTER)),
        service_name=service_name,
    )
    return HttpConnectionManagerTracing(
        provider=TracingHttp(name="envoy.tracers.opentelemetry", typed_config=AnyMessage.pack(exporter)),
        custom_tags=decision_tags(mode),
    )


def collector_cluster(address: HostPort) -> Cluster:
    """The OTLP/gRPC collector: HTTP/2, its connection pinged (an unresponsive collector's
    connection is closed within seconds)."""
    cluster = make_cluster(COLLECTOR_CLUSTER, [address], timedelta(seconds=1))
    http2 = Http2ProtocolOptions(
        connection_keepalive=KeepaliveSettings(interval=timedelta(seconds=2), timeout=timedelta(seconds=1))
    )
    cluster.typed_extension_protocol_options = protocol_options(
        HttpProtocolOptions(
            explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=http2)
        )
    )
    return cluster
