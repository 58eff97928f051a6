"""`envoy-config --mode envoy_decides`: Envoy decides each request itself, from the table the
sidecar serves it as a Lua filter over ECDS (sidecar.transports.ecds); the sidecar's fast
path (ext_authz over HTTP) decides only what the Lua leaves to it.

The HTTP filters, in order:
1. the Lua filter, configured by ECDS (`config_discovery`). Its default, used from start-up
   until the first table arrives (`apply_default_config_without_warming`), decides nothing
   and marks every request for the sidecar: nothing is decided without the table. Envoy keeps
   the last table it was given while the sidecar is away.
2. the fast path's ext_authz filter, enabled only for requests the Lua marked
   (`filter_enabled_metadata`): exactly the ext_authz_http mode's filter otherwise.
3. the backstop (sidecar.envoyconf.backstop) and the router, as in every mode.

Beside the stdout access log, a gRPC access log streams the decisions the Lua took to the
sidecar (`decision_access_log`), which counts them in its metrics.
"""

from datetime import timedelta

from envoy_data_plane.envoy.config.accesslog.v3 import (
    AccessLog,
    AccessLogFilter,
    AndFilter,
    MetadataFilter,
    OrFilter,
)
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.core.v3 import (
    ApiConfigSource,
    ApiConfigSourceApiType,
    ApiVersion,
    ConfigSource,
    DataSource,
    ExtensionConfigSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
)
from envoy_data_plane.envoy.extensions.access_loggers.grpc.v3 import (
    CommonGrpcAccessLogConfig,
    HttpGrpcAccessLogConfig,
)
from envoy_data_plane.envoy.extensions.filters.http.lua.v3 import Lua
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpFilter
from envoy_data_plane.envoy.type.matcher.v3 import MetadataMatcher, MetadataMatcherPathSegment, ValueMatcher
from envoy_data_plane.google.protobuf import Any as AnyMessage

from sidecar.contract import (
    LUA_FILTER_NAME,
    LUA_NAMES,
    LUA_TYPE_URL,
    METADATA_NAMESPACE,
    UNDECIDED_KEY,
    XDS_CLUSTER,
)
from sidecar.core import Table
from sidecar.core.lua_table import LUA_ERROR_KEY, mark_everything
from sidecar.envoyconf.clusters import HTTP2_ONLY, HostPort, make_cluster, protocol_options
from sidecar.envoyconf.filters import ext_authz_http_filter

MODE = "envoy_decides"
# How long Envoy waits for the first table before serving with the default: the default
# applies at once (without warming), this only bounds the listener's start.
INITIAL_FETCH_TIMEOUT = timedelta(seconds=5)


def lua_filter() -> HttpFilter:
    """The Lua filter, its code served by the sidecar over ECDS (sidecar.transports.ecds)."""
    source = ConfigSource(
        api_config_source=ApiConfigSource(
            api_type=ApiConfigSourceApiType.GRPC,
            transport_api_version=ApiVersion.V3,
            grpc_services=[GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=XDS_CLUSTER))],
        ),
        resource_api_version=ApiVersion.V3,
        initial_fetch_timeout=INITIAL_FETCH_TIMEOUT,
    )
    default = Lua(default_source_code=DataSource(inline_string=mark_everything(LUA_NAMES)))
    return HttpFilter(
        name=LUA_FILTER_NAME,
        config_discovery=ExtensionConfigSource(
            config_source=source,
            default_config=AnyMessage.pack(default),
            apply_default_config_without_warming=True,
            type_urls=[LUA_TYPE_URL],
        ),
    )


def fallback_filter(table: Table, timeout_ms: int, mtls: bool) -> HttpFilter:
    """The fast path's ext_authz filter, run only for the requests the Lua marked."""
    marked = MetadataMatcher(
        filter=METADATA_NAMESPACE,
        path=[MetadataMatcherPathSegment(key=UNDECIDED_KEY)],
        value=ValueMatcher(bool_match=True),
    )
    return ext_authz_http_filter(table, timeout_ms, mtls, enabled_by=marked)


def xds_cluster(address: HostPort) -> Cluster:
    """The sidecar's ECDS endpoint (serve --xds-listen): gRPC, so HTTP/2."""
    cluster = make_cluster(XDS_CLUSTER, [address], timedelta(milliseconds=250))
    cluster.typed_extension_protocol_options = protocol_options(HTTP2_ONLY)
    return cluster


ACCESS_LOG_BUFFER_BYTES = 256 * 1024  # per worker: a batch; what the stream cannot take is dropped
ACCESS_LOG_FLUSH = timedelta(seconds=1)


def decision_access_log() -> AccessLog:
    """The decisions the Lua took, streamed to the sidecar's AccessLogService (on the ECDS
    endpoint) to be counted in its metrics: only those (the fast path counts its own), and
    the requests on which the Lua failed (left to the fast path, counted as errors), off
    the request path, in batches of ACCESS_LOG_BUFFER_BYTES or ACCESS_LOG_FLUSH per worker
    (what the stream cannot take Envoy drops, counted in
    `access_logs.grpc_access_log.logs_dropped`). Large batches: the sidecar's cost is per
    message more than per entry (16 KiB batches cost it 2.5x the CPU of 256 KiB ones)."""
    decided = _metadata_filter(
        LUA_NAMES.namespace, f"{LUA_NAMES.key_prefix}rule", ValueMatcher(present_match=True), if_missing=False
    )
    by_lua = _metadata_filter(
        METADATA_NAMESPACE, UNDECIDED_KEY, ValueMatcher(bool_match=True), if_missing=True, invert=True
    )
    failed = _metadata_filter(
        METADATA_NAMESPACE, LUA_ERROR_KEY, ValueMatcher(bool_match=True), if_missing=False
    )
    stream = HttpGrpcAccessLogConfig(
        common_config=CommonGrpcAccessLogConfig(
            log_name="graysteer.decisions",
            grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=XDS_CLUSTER)),
            transport_api_version=ApiVersion.V3,
            buffer_flush_interval=ACCESS_LOG_FLUSH,
            buffer_size_bytes=ACCESS_LOG_BUFFER_BYTES,
        )
    )
    return AccessLog(
        name="envoy.access_loggers.http_grpc",
        filter=AccessLogFilter(
            or_filter=OrFilter(
                filters=[AccessLogFilter(and_filter=AndFilter(filters=[decided, by_lua])), failed]
            )
        ),
        typed_config=AnyMessage.pack(stream),
    )


def _metadata_filter(
    namespace: str, key: str, value: ValueMatcher, if_missing: bool, invert: bool = False
) -> AccessLogFilter:
    """An access log filter on one dynamic metadata key: `value` matched (or not, `invert`),
    and `if_missing` when the request has no such key."""
    return AccessLogFilter(
        metadata_filter=MetadataFilter(
            matcher=MetadataMatcher(
                filter=namespace, path=[MetadataMatcherPathSegment(key=key)], value=value, invert=invert
            ),
            match_if_key_not_found=if_missing,
        )
    )
