"""`graysteer envoy-config`: render a complete Envoy bootstrap for a rules file.

Built from the typed dataclasses of `envoy-data-plane`, so a misspelt field is a
Python error, not an Envoy start-up failure. The route guard lists exactly the rules'
clusters; envoy/envoy.yaml is this output (with comments) for examples/rules.yaml.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import yaml
from betterproto2 import Casing
from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog, AccessLogFilter, ExtensionFilter
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutation as Mutation
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutationRemoveOnMatch
from envoy_data_plane.envoy.config.core.v3 import (
    DataSource,
    Node,
    SubstitutionFormatString,
)
from envoy_data_plane.envoy.config.core.v3 import (
    HttpProtocolOptions as CommonHttpProtocolOptions,
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
from envoy_data_plane.envoy.type.matcher.v3 import RegexMatcher, StringMatcher
from envoy_data_plane.google.protobuf import Any as AnyMessage

from sidecar.contract import (
    DECISION_HEADER_PREFIX,
    ENVOY_MAX_HEADERS,
    EXT_AUTHZ_NAMESPACE,
    METADATA_NAMESPACE,
)
from sidecar.core import Table
from sidecar.core.steering import steered_headers
from sidecar.envoyconf.backstop import backstop_filters, decided_route_overrides, protected_headers
from sidecar.envoyconf.clusters import (
    extension,
    sidecar_cluster,
    socket_address,
    spire_agent_cluster,
    upstream_cluster,
)
from sidecar.envoyconf.decides import MODE as DECIDES_MODE
from sidecar.envoyconf.decides import decision_access_log, fallback_filter, lua_filter, xds_cluster
from sidecar.envoyconf.filters import ext_authz_filter, ext_authz_http_filter, ext_proc_filter
from sidecar.envoyconf.lint import guard_regex
from sidecar.envoyconf.sds import SpireSds
from sidecar.envoyconf.tls import TlsOptions, tls_socket
from sidecar.envoyconf.tracing import DEFAULT_SERVICE_NAME, collector_cluster, tracing

HostPort = tuple[str, int]


MODES = ("ext_proc", "ext_authz", "ext_authz_http", DECIDES_MODE)


def access_log_format(namespace: str, key_prefix: str = "", headers: Sequence[str] = ()) -> str:
    """One line per request with the decision's fields, read from dynamic metadata under
    `namespace` (keys `key_prefix` + field: ext_authz over HTTP files them by header name),
    then `h:NAME=VALUE` for each of `headers` (what the rules read: `graysteer diff
    --requests` decides these requests again)."""

    def field(name: str) -> str:
        return f"{name}=%DYNAMIC_METADATA({namespace}:{key_prefix}{name})%"

    read = "".join(f" h:{name}=%REQ({name.upper()})%" for name in headers)
    return (
        '[%START_TIME%] "%REQ(:METHOD)% %REQ(:PATH)%" %RESPONSE_CODE% %RESPONSE_FLAGS% '
        f"cluster=%UPSTREAM_CLUSTER% {field('rule')} {field('bucket')} {field('lane')} "
        f"{field('identity')} {field('version')} {field('mirror')} %DURATION%ms{read}\n"
    )


def logged_headers(table: Table) -> list[str]:
    """The headers an access log line carries: those the rules read, less credentials and
    what the rules redact, less what the sidecar itself sets (Envoy logs the request as
    forwarded: a lane or baggage there is the sidecar's, not the caller's)."""
    steered = set(steered_headers(table))
    return sorted(table.read_headers - table.redacted_headers - steered)


@dataclass(frozen=True)
class EnvoyOptions:
    listen: HostPort = ("127.0.0.1", 10000)
    admin: HostPort = ("127.0.0.1", 9901)
    sidecar: HostPort = ("127.0.0.1", 50051)
    xds: HostPort = ("127.0.0.1", 18000)  # envoy_decides: the sidecar's ECDS endpoint (serve --xds-listen)
    sidecar_workers: int = 1  # `serve --workers N`: N endpoints on consecutive ports
    upstreams: Mapping[str, HostPort] = field(default_factory=dict)  # default 127.0.0.1:8081+i
    message_timeout_ms: int = 250
    mode: str = "ext_proc"  # one of MODES
    mtls: TlsOptions | None = None
    upstream_protocol: str = "http1"  # one of UPSTREAM_PROTOCOLS
    otlp: HostPort | None = None  # an OTLP/gRPC collector: traces with the decision as tags
    otlp_service_name: str = DEFAULT_SERVICE_NAME


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


def sidecar_filters(table: Table, options: EnvoyOptions) -> tuple[str, list[HttpFilter]]:
    """(the access log format, the filters that decide) of `options.mode`."""
    mtls = options.mtls is not None
    if options.mode in ("ext_authz_http", DECIDES_MODE):  # the Lua files its decision as the fast path
        log_format = access_log_format(EXT_AUTHZ_NAMESPACE, DECISION_HEADER_PREFIX, logged_headers(table))
        if options.mode == DECIDES_MODE:
            return log_format, [lua_filter(), fallback_filter(table, options.message_timeout_ms, mtls)]
        return log_format, [ext_authz_http_filter(table, options.message_timeout_ms, mtls)]
    if options.mode == "ext_authz":
        log_format = access_log_format(EXT_AUTHZ_NAMESPACE, headers=logged_headers(table))
        return log_format, [ext_authz_filter(options.message_timeout_ms, mtls)]
    log_format = access_log_format(METADATA_NAMESPACE, headers=logged_headers(table))
    return log_format, [ext_proc_filter(options.message_timeout_ms)]


def connection_manager(table: Table, options: EnvoyOptions) -> HttpConnectionManager:
    log_format, deciding = sidecar_filters(table, options)
    access_log = StdoutAccessLog(
        log_format=SubstitutionFormatString(text_format_source=DataSource(inline_string=log_format))
    )
    manager = HttpConnectionManager(
        stat_prefix="ingress",
        early_header_mutation_extensions=[
            extension(
                "envoy.http.early_header_mutation.header_mutation",
                EarlyHeaderMutation(
                    mutations=[
                        Mutation(remove=table.routing_header),
                        Mutation(remove=table.mirror_header),
                        # the decision's own headers (the HTTP fast path's answer): a client's
                        # would reach the backends as if this hop had decided them
                        Mutation(
                            remove_on_match=HeaderMutationRemoveOnMatch(
                                key_matcher=StringMatcher(prefix=DECISION_HEADER_PREFIX)
                            )
                        ),
                    ]
                ),
            )
        ],
        access_log=[
            AccessLog(name="envoy.access_loggers.stdout", typed_config=AnyMessage.pack(access_log)),
            *([decision_access_log()] if options.mode == DECIDES_MODE else []),
        ],
        http_filters=[
            *deciding,
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
    if options.otlp is not None:
        manager.tracing = tracing(options.mode, options.otlp_service_name)
    if options.mtls is not None:
        # Replace any client-sent XFCC with Envoy's own account of the client certificate.
        manager.forward_client_cert_details = HttpConnectionManagerForwardClientCertDetails.SANITIZE_SET
        manager.set_current_client_cert_details = HttpConnectionManagerSetCurrentClientCertDetails(
            subject=True, uri=True, dns=True
        )
    return manager


SDS_NODE = Node(id="graysteer-front", cluster="graysteer-front")


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
    listener = Listener(name="ingress", address=socket_address(options.listen), filter_chains=[chain])
    # envoy_decides: the fast path's cluster (HTTP), and the ECDS endpoint
    fast_path = "ext_authz_http" if options.mode == DECIDES_MODE else options.mode
    clusters = [sidecar_cluster(options.sidecar, options.sidecar_workers, fast_path)] + [
        upstream_cluster(name, address, options.upstream_protocol) for name, address in upstreams.items()
    ]
    if options.mode == DECIDES_MODE:
        clusters.append(xds_cluster(options.xds))
    if options.otlp is not None:
        clusters.append(collector_cluster(options.otlp))
    sds = options.mtls.sds if options.mtls is not None else None
    if isinstance(sds, SpireSds):
        clusters.append(spire_agent_cluster(sds.socket))
    return Bootstrap(
        # Envoy refuses SDS and ECDS without a node; `envoy --service-node/--service-cluster` override it.
        node=SDS_NODE if sds is not None or options.mode == DECIDES_MODE else None,
        admin=Admin(address=socket_address(options.admin)),
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


def bootstrap_document(table: Table, options: EnvoyOptions) -> dict[str, Any]:
    """The bootstrap for `table` as the document `render_yaml` writes (snake case, plain
    values): what `graysteer envoy-config` prints, to adjust or to hand to Envoy."""
    return dict(bootstrap(table, options).to_dict(casing=Casing.SNAKE))


def parse_bootstrap(document: Mapping[str, Any]) -> Bootstrap:
    """An Envoy bootstrap (YAML/JSON as a dict, snake or camel case) as typed objects."""
    return Bootstrap.from_dict(dict(document))
