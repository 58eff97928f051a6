"""`graysteer envoy-config`: render a complete Envoy bootstrap for a rules file.

Built from the typed dataclasses of `envoy-data-plane`, so a misspelt field is a
Python error, not an Envoy start-up failure. The route guard lists exactly the rules'
clusters; envoy/envoy.yaml is this output (with comments) for examples/rules.yaml.
"""

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import yaml
from betterproto2 import Casing
from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog, AccessLogFilter, ExtensionFilter
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterCommonLbConfig, ClusterDiscoveryType
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutation as Mutation
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    ApiVersion,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HealthCheck,
    HealthCheckGrpcHealthCheck,
    HealthCheckHttpHealthCheck,
    Http1ProtocolOptions,
    Http2ProtocolOptions,
    HttpUri,
    SocketAddress,
    SubstitutionFormatString,
    TransportSocket,
    TypedExtensionConfig,
)
from envoy_data_plane.envoy.config.core.v3 import (
    HttpProtocolOptions as CommonHttpProtocolOptions,
)
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.metrics.v3 import HistogramBucketSettings, StatsConfig
from envoy_data_plane.envoy.config.route.v3 import (
    HeaderMatcher,
    Route,
    RouteAction,
    RouteActionRequestMirrorPolicy,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.access_loggers.filters.cel.v3 import ExpressionFilter
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import (
    AuthorizationRequest,
    AuthorizationResponse,
    ExtAuthz,
    HttpService,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ExternalProcessor,
    MetadataOptions,
    MetadataOptionsMetadataNamespaces,
    ProcessingMode,
    ProcessingModeBodySendMode,
    ProcessingModeHeaderSendMode,
)
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerForwardClientCertDetails,
    HttpConnectionManagerSetCurrentClientCertDetails,
    HttpFilter,
    LocalReplyConfig,
    ResponseMapper,
)
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManagerPathWithEscapedSlashesAction as EscapedSlashes,
)
from envoy_data_plane.envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    HeaderMutation as EarlyHeaderMutation,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    DownstreamTlsContext,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    TlsCertificate,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
    HttpProtocolOptionsUseDownstreamHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import ListStringMatcher, RegexMatcher, StringMatcher
from envoy_data_plane.envoy.type.v3 import Percent
from envoy_data_plane.google.protobuf import Any as AnyMessage

from sidecar.contract import (
    DECISION_HEADER_PREFIX,
    ENVOY_MAX_HEADERS,
    ENVOY_POOL_IDLE_TIMEOUT,
    EXT_AUTHZ_NAMESPACE,
    HEALTH_PATH,
    LISTENER_PORT_HEADER,
    METADATA_NAMESPACE,
    PATH_PREFIX,
    PEER_SAN_HEADERS,
    REQUEST_ATTRIBUTES,
)
from sidecar.core import Table
from sidecar.core.steering import steered_headers
from sidecar.envoyconf.backstop import backstop_filters, decided_route_overrides, protected_headers
from sidecar.envoyconf.lint import guard_regex

HostPort = tuple[str, int]
SIDECAR_CLUSTER = "graysteer"
HEALTH_CHECK_INTERVAL = timedelta(milliseconds=500)


MODES = ("ext_proc", "ext_authz", "ext_authz_http")
# How Envoy speaks to the rules' clusters: HTTP/1.1, HTTP/2 (gRPC backends), or the client's
# own protocol (gRPC and HTTP/1 clients behind one listener, each reaching backends that
# speak theirs).
UPSTREAM_PROTOCOLS = ("http1", "http2", "downstream")


def access_log_format(namespace: str, key_prefix: str = "") -> str:
    """One line per request with the decision's fields, read from dynamic metadata under
    `namespace` (keys `key_prefix` + field: ext_authz over HTTP files them by header name)."""

    def field(name: str) -> str:
        return f"{name}=%DYNAMIC_METADATA({namespace}:{key_prefix}{name})%"

    return (
        '[%START_TIME%] "%REQ(:METHOD)% %REQ(:PATH)%" %RESPONSE_CODE% %RESPONSE_FLAGS% '
        f"cluster=%UPSTREAM_CLUSTER% {field('rule')} {field('bucket')} {field('lane')} "
        f"{field('identity')} {field('version')} {field('mirror')} %DURATION%ms\n"
    )


@dataclass(frozen=True)
class TlsOptions:
    """A listener that requires client certificates from `ca` with a URI SAN under `san_prefix`."""

    ca: str = "/etc/graysteer/tls/ca.pem"
    cert: str = "/etc/graysteer/tls/server.pem"
    key: str = "/etc/graysteer/tls/server.key"
    san_prefix: str = "spiffe://example.org/"


@dataclass(frozen=True)
class EnvoyOptions:
    listen: HostPort = ("127.0.0.1", 10000)
    admin: HostPort = ("127.0.0.1", 9901)
    sidecar: HostPort = ("127.0.0.1", 50051)
    sidecar_workers: int = 1  # `serve --workers N`: N endpoints on consecutive ports
    upstreams: Mapping[str, HostPort] = field(default_factory=dict)  # default 127.0.0.1:8081+i
    message_timeout_ms: int = 250
    mode: str = "ext_proc"  # one of MODES
    mtls: TlsOptions | None = None
    upstream_protocol: str = "http1"  # one of UPSTREAM_PROTOCOLS


def _address(host_port: HostPort) -> Address:
    return Address(socket_address=SocketAddress(address=host_port[0], port_value=host_port[1]))


def _extension(name: str, config: Any) -> TypedExtensionConfig:
    return TypedExtensionConfig(name=name, typed_config=AnyMessage.pack(config))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _cluster(name: str, addresses: list[HostPort], connect_timeout: timedelta) -> Cluster:
    """IP addresses as they are (STATIC); names (a Kubernetes Service, a compose service)
    resolved and re-resolved by Envoy (STRICT_DNS)."""
    static = all(_is_ip(host) for host, _ in addresses)
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.STATIC if static else ClusterDiscoveryType.STRICT_DNS,
        connect_timeout=connect_timeout,
        load_assignment=ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                LocalityLbEndpoints(
                    lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_address(a))) for a in addresses]
                )
            ],
        ),
    )


def _protocol_options(options: HttpProtocolOptions) -> dict[str, AnyMessage]:
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": AnyMessage.pack(options)}


HTTP2_ONLY = HttpProtocolOptions(
    explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions())
)


def upstream_cluster(name: str, address: HostPort, protocol: str = "http1") -> Cluster:
    """A rules cluster: one address, spoken to in `protocol` (see UPSTREAM_PROTOCOLS)."""
    cluster = _cluster(name, [address], timedelta(seconds=1))
    if protocol == "http2":
        cluster.typed_extension_protocol_options = _protocol_options(HTTP2_ONLY)
    elif protocol == "downstream":
        cluster.typed_extension_protocol_options = _protocol_options(
            HttpProtocolOptions(
                use_downstream_protocol_config=HttpProtocolOptionsUseDownstreamHttpConfig(
                    http_protocol_options=Http1ProtocolOptions(),
                    http2_protocol_options=Http2ProtocolOptions(),
                )
            )
        )
    elif protocol != "http1":
        raise ValueError(f"unknown upstream protocol {protocol!r} (one of {', '.join(UPSTREAM_PROTOCOLS)})")
    return cluster


def sidecar_cluster(address: HostPort, workers: int = 1, mode: str = "ext_proc") -> Cluster:
    """The sidecar's cluster, health-checked and never used while unhealthy; one endpoint per
    worker process (Envoy balances across them). gRPC modes: HTTP/2 and the gRPC health
    service; ext_authz_http: HTTP/1.1 keep-alive and the sidecar's HTTP health path."""
    host, port = address
    cluster = _cluster(
        SIDECAR_CLUSTER, [(host, port + i) for i in range(workers)], timedelta(milliseconds=250)
    )
    http_check = grpc_check = None
    if mode == "ext_authz_http":
        http_check = HealthCheckHttpHealthCheck(path=HEALTH_PATH)
        # Envoy closes an idle pooled connection before the sidecar would: a check sent on a
        # connection the sidecar is closing fails (and skips the sidecar when failing open).
        cluster.typed_extension_protocol_options = _protocol_options(
            HttpProtocolOptions(
                common_http_protocol_options=CommonHttpProtocolOptions(
                    idle_timeout=timedelta(seconds=ENVOY_POOL_IDLE_TIMEOUT)
                ),
                explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                    http_protocol_options=Http1ProtocolOptions()
                ),
            )
        )
    else:
        cluster.typed_extension_protocol_options = _protocol_options(HTTP2_ONLY)  # gRPC
        grpc_check = HealthCheckGrpcHealthCheck(
            service_name=(
                "envoy.service.auth.v3.Authorization"
                if mode == "ext_authz"
                else "envoy.service.ext_proc.v3.ExternalProcessor"
            )
        )
    # Every interval is 0.5 s, the idle ones too: Envoy checks a cluster that never had
    # traffic only every `no_traffic_interval` (default 60 s), so an Envoy that started
    # before its sidecar (every pod, `compose up`) would skip the sidecar for a minute.
    cluster.health_checks = [
        HealthCheck(
            timeout=timedelta(milliseconds=250),
            interval=HEALTH_CHECK_INTERVAL,
            no_traffic_interval=HEALTH_CHECK_INTERVAL,
            no_traffic_healthy_interval=HEALTH_CHECK_INTERVAL,
            unhealthy_interval=HEALTH_CHECK_INTERVAL,
            unhealthy_threshold=1,
            healthy_threshold=1,
            http_health_check=http_check,
            grpc_health_check=grpc_check,
        )
    ]
    cluster.common_lb_config = ClusterCommonLbConfig(healthy_panic_threshold=Percent(value=0))
    return cluster


def ext_proc_filter(message_timeout_ms: int) -> HttpFilter:
    processor = ExternalProcessor(
        grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=SIDECAR_CLUSTER)),
        failure_mode_allow=True,
        message_timeout=timedelta(milliseconds=message_timeout_ms),
        processing_mode=ProcessingMode(
            request_header_mode=ProcessingModeHeaderSendMode.SEND,
            response_header_mode=ProcessingModeHeaderSendMode.SKIP,
            request_body_mode=ProcessingModeBodySendMode.NONE,
            response_body_mode=ProcessingModeBodySendMode.NONE,
            request_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
            response_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
        ),
        metadata_options=MetadataOptions(
            receiving_namespaces=MetadataOptionsMetadataNamespaces(untyped=[METADATA_NAMESPACE])
        ),
        request_attributes=list(REQUEST_ATTRIBUTES),
    )
    return HttpFilter(name="envoy.filters.http.ext_proc", typed_config=AnyMessage.pack(processor))


def ext_authz_filter(timeout_ms: int, mtls: bool) -> HttpFilter:
    authz = ExtAuthz(
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=SIDECAR_CLUSTER),
            timeout=timedelta(milliseconds=timeout_ms),
        ),
        transport_api_version=ApiVersion.V3,
        failure_mode_allow=True,
        clear_route_cache=True,  # re-route on the header the sidecar sets
        include_peer_certificate=mtls,
    )  # every SAN, not only the first
    return HttpFilter(name="envoy.filters.http.ext_authz", typed_config=AnyMessage.pack(authz))


def ext_authz_http_filter(table: Table, timeout_ms: int, mtls: bool = False) -> HttpFilter:
    """ext_authz over plain HTTP/1.1 (sidecar.transports.authz_http): the check carries every request
    header (XFCC is Envoy's own with --mtls, with the certificate's SAN lists beside it to
    confirm it) and the listener port, set by Envoy; a 200's
    steered headers are copied to the request, its `x-envoy-auth-headers-to-remove` are
    removed, its decision headers become dynamic metadata; a deny answer reaches the client
    with its status, body and content-type only."""

    def exact(*names: str) -> ListStringMatcher:
        return ListStringMatcher(patterns=[StringMatcher(exact=name) for name in names])

    authz = ExtAuthz(
        http_service=HttpService(
            server_uri=HttpUri(
                uri=f"http://{SIDECAR_CLUSTER}",
                cluster=SIDECAR_CLUSTER,
                timeout=timedelta(milliseconds=timeout_ms),
            ),
            path_prefix=PATH_PREFIX,
            authorization_request=AuthorizationRequest(
                headers_to_add=[
                    HeaderValue(key=LISTENER_PORT_HEADER, value="%DOWNSTREAM_LOCAL_PORT%"),
                    *(HeaderValue(key=k, value=v) for k, v in PEER_SAN_HEADERS.items() if mtls),
                ]
            ),
            authorization_response=AuthorizationResponse(
                allowed_upstream_headers=exact(*steered_headers(table)),
                allowed_client_headers=exact("content-type"),
                dynamic_metadata_from_headers=ListStringMatcher(
                    patterns=[StringMatcher(prefix=DECISION_HEADER_PREFIX)]
                ),
            ),
        ),
        allowed_headers=ListStringMatcher(patterns=[StringMatcher(safe_regex=RegexMatcher(regex=".*"))]),
        failure_mode_allow=True,
        clear_route_cache=True,
    )  # re-route on the header the sidecar sets
    return HttpFilter(name="envoy.filters.http.ext_authz", typed_config=AnyMessage.pack(authz))


def tls_socket(tls: TlsOptions) -> TransportSocket:
    context = DownstreamTlsContext(
        require_client_certificate=True,
        common_tls_context=CommonTlsContext(
            alpn_protocols=["h2", "http/1.1"],  # gRPC clients over TLS require h2 by ALPN
            tls_certificates=[
                TlsCertificate(
                    certificate_chain=DataSource(filename=tls.cert), private_key=DataSource(filename=tls.key)
                )
            ],
            validation_context=CertificateValidationContext(
                trusted_ca=DataSource(filename=tls.ca),
                match_typed_subject_alt_names=[
                    SubjectAltNameMatcher(
                        san_type=SubjectAltNameMatcherSanType.URI,
                        matcher=StringMatcher(prefix=tls.san_prefix),
                    )
                ],
            ),
        ),
    )
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=AnyMessage.pack(context))


def routes(table: Table) -> RouteConfiguration:
    """The decided route (a known cluster named by the routing header, which only the sidecar
    sets) and the fallback route, which carries the backstop (sidecar.envoyconf.backstop)."""
    guarded = Route(
        match=RouteMatch(
            prefix="/",
            headers=[
                HeaderMatcher(
                    name=table.routing_header,
                    string_match=StringMatcher(safe_regex=RegexMatcher(regex=guard_regex(table.clusters))),
                )
            ],
        ),
        route=RouteAction(
            cluster_header=table.routing_header,
            # Emitted whether or not a rule mirrors today, so that a reload adding one needs no
            # Envoy change; without the header (set only by the sidecar) nothing is copied.
            request_mirror_policies=[RouteActionRequestMirrorPolicy(cluster_header=table.mirror_header)],
        ),
        typed_per_filter_config=decided_route_overrides(table),
    )
    fallback = Route(
        match=RouteMatch(prefix="/"),
        route=RouteAction(cluster=table.default),
        request_headers_to_remove=protected_headers(table),
    )
    return RouteConfiguration(
        name="local_route", virtual_hosts=[VirtualHost(name="app", domains=["*"], routes=[guarded, fallback])]
    )


# What Envoy answers when the request, once the sidecar's answer is applied, exceeds the
# listener's header limits: it checks again after the pseudo-headers, the headers it added
# itself (x-request-id, x-forwarded-proto) and the steered ones, so the last few header
# counts its codec accepts fail there, with a 500. They are a 431, as above the limit.
OVER_LIMIT_DETAILS = ("ext_authz_invalid", "header_mutation_result_exceeds_limit")
HEADERS_TOO_LARGE = "Request Header Fields Too Large"  # the body of Envoy's own 431


def over_limit_replies() -> LocalReplyConfig:
    """Envoy's 500 for a request that no longer fits its header limits, answered 431."""
    expression = " || ".join(f"response.code_details == '{details}'" for details in OVER_LIMIT_DETAILS)
    return LocalReplyConfig(
        mappers=[
            ResponseMapper(
                filter=AccessLogFilter(
                    extension_filter=ExtensionFilter(
                        name="envoy.access_loggers.extension_filters.cel",
                        typed_config=AnyMessage.pack(ExpressionFilter(expression=expression)),
                    )
                ),
                status_code=431,
                body=DataSource(inline_string=HEADERS_TOO_LARGE),
            )
        ]
    )


def connection_manager(table: Table, options: EnvoyOptions) -> HttpConnectionManager:
    if options.mode == "ext_authz_http":
        log_format = access_log_format(EXT_AUTHZ_NAMESPACE, DECISION_HEADER_PREFIX)
        sidecar_filter = ext_authz_http_filter(table, options.message_timeout_ms, options.mtls is not None)
    elif options.mode == "ext_authz":
        log_format = access_log_format(EXT_AUTHZ_NAMESPACE)
        sidecar_filter = ext_authz_filter(options.message_timeout_ms, options.mtls is not None)
    else:
        log_format = access_log_format(METADATA_NAMESPACE)
        sidecar_filter = ext_proc_filter(options.message_timeout_ms)
    access_log = StdoutAccessLog(
        log_format=SubstitutionFormatString(text_format_source=DataSource(inline_string=log_format))
    )
    manager = HttpConnectionManager(
        stat_prefix="ingress",
        early_header_mutation_extensions=[
            _extension(
                "envoy.http.early_header_mutation.header_mutation",
                EarlyHeaderMutation(
                    mutations=[Mutation(remove=table.routing_header), Mutation(remove=table.mirror_header)]
                ),
            )
        ],
        access_log=[AccessLog(name="envoy.access_loggers.stdout", typed_config=AnyMessage.pack(access_log))],
        http_filters=[
            sidecar_filter,
            *backstop_filters(table),
            HttpFilter(name="envoy.filters.http.router", typed_config=AnyMessage.pack(Router())),
        ],
        route_config=routes(table),
        # Envoy's default, written out: the sidecar's HTTP server accepts this many client
        # headers plus those Envoy adds to a check (authz_http.Limits.max_headers).
        common_http_protocol_options=CommonHttpProtocolOptions(max_headers_count=ENVOY_MAX_HEADERS),
        local_reply_config=over_limit_replies(),
        # Rules and RBAC see the path a backend will serve: `//admin`, `/./admin`,
        # `/%61dmin` and `/api/../admin` are all `/admin` before any filter runs.
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action=EscapedSlashes.UNESCAPE_AND_REDIRECT,
    )
    if options.mtls is not None:
        # Replace any client-sent XFCC with Envoy's own account of the client certificate.
        manager.forward_client_cert_details = HttpConnectionManagerForwardClientCertDetails.SANITIZE_SET
        manager.set_current_client_cert_details = HttpConnectionManagerSetCurrentClientCertDetails(
            subject=True, uri=True, dns=True
        )
    return manager


def bootstrap(table: Table, options: EnvoyOptions) -> Bootstrap:
    """A complete front-proxy bootstrap for `table`."""
    upstreams = {c: options.upstreams.get(c, ("127.0.0.1", 8081 + i)) for i, c in enumerate(table.clusters)}
    chain = FilterChain(
        filters=[
            Filter(
                name="envoy.filters.network.http_connection_manager",
                typed_config=AnyMessage.pack(connection_manager(table, options)),
            )
        ]
    )
    if options.mtls is not None:
        chain.transport_socket = tls_socket(options.mtls)
    listener = Listener(name="ingress", address=_address(options.listen), filter_chains=[chain])
    clusters = [sidecar_cluster(options.sidecar, options.sidecar_workers, options.mode)] + [
        upstream_cluster(name, address, options.upstream_protocol) for name, address in upstreams.items()
    ]
    return Bootstrap(
        admin=Admin(address=_address(options.admin)),
        static_resources=BootstrapStaticResources(listeners=[listener], clusters=clusters),
        stats_flush_interval=timedelta(seconds=1),
        stats_config=stats_config(),
    )


# Rollout analysis reads each lane's p99 from Envoy's upstream_rq_time histogram: buckets
# fine enough around typical latency limits, refreshed every second (stats_flush_interval).
RQ_TIME_BUCKETS_MS = [
    1,
    2,
    5,
    10,
    25,
    50,
    100,
    150,
    200,
    300,
    400,
    500,
    600,
    700,
    800,
    900,
    1000,
    1500,
    2000,
    3000,
    5000,
    10000,
    30000,
]


def stats_config() -> StatsConfig:
    return StatsConfig(
        histogram_bucket_settings=[
            HistogramBucketSettings(
                match=StringMatcher(suffix="upstream_rq_time"), buckets=[float(b) for b in RQ_TIME_BUCKETS_MS]
            )
        ]
    )


def render_yaml(config: Bootstrap) -> str:
    document = config.to_dict(casing=Casing.SNAKE)
    return yaml.safe_dump(document, sort_keys=False, width=100)


def parse_bootstrap(document: Mapping[str, Any]) -> Bootstrap:
    """An Envoy bootstrap (YAML/JSON as a dict, snake or camel case) as typed objects."""
    return Bootstrap.from_dict(dict(document))
