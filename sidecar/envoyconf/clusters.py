"""The clusters of a generated config: the rules' clusters and the sidecar's own (health-
checked, one endpoint per worker, HTTP/2 for gRPC, a short-lived HTTP/1.1 pool for the fast path)."""

import ipaddress
from datetime import timedelta
from typing import Any

from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    Cluster,
    ClusterCommonLbConfig,
    ClusterDiscoveryType,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    HealthCheck,
    HealthCheckGrpcHealthCheck,
    HealthCheckHttpHealthCheck,
    Http1ProtocolOptions,
    Http2ProtocolOptions,
    Pipe,
    SocketAddress,
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
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
    HttpProtocolOptionsUseDownstreamHttpConfig,
)
from envoy_data_plane.envoy.type.v3 import Percent
from envoy_data_plane.google.protobuf import Any as AnyMessage

from sidecar.contract import (
    ENVOY_POOL_IDLE_TIMEOUT,
    ENVOY_SIDECAR_CONNECTIONS,
    HEALTH_PATH,
)

HostPort = tuple[str, int]

SIDECAR_CLUSTER = "graysteer"


SPIRE_AGENT_CLUSTER = "spire_agent"  # the SPIRE agent's SDS API (envoyconf.tls.SpireSds)


HEALTH_CHECK_INTERVAL = timedelta(milliseconds=500)


# How Envoy speaks to the rules' clusters: HTTP/1.1, HTTP/2 (gRPC backends), or the client's
# own protocol (gRPC and HTTP/1 clients behind one listener, each reaching backends that
# speak theirs).
UPSTREAM_PROTOCOLS = ("http1", "http2", "downstream")


def socket_address(host_port: HostPort) -> Address:
    return Address(socket_address=SocketAddress(address=host_port[0], port_value=host_port[1]))


def extension(name: str, config: Any) -> TypedExtensionConfig:
    return TypedExtensionConfig(name=name, typed_config=AnyMessage.pack(config))


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def make_cluster(name: str, addresses: list[HostPort], connect_timeout: timedelta) -> Cluster:
    """IP addresses as they are (STATIC); names (a Kubernetes Service, a compose service)
    resolved and re-resolved by Envoy (STRICT_DNS)."""
    static = all(is_ip(host) for host, _ in addresses)
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.STATIC if static else ClusterDiscoveryType.STRICT_DNS,
        connect_timeout=connect_timeout,
        load_assignment=ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                LocalityLbEndpoints(
                    lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=socket_address(a))) for a in addresses]
                )
            ],
        ),
    )


def protocol_options(options: HttpProtocolOptions) -> dict[str, AnyMessage]:
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": AnyMessage.pack(options)}


HTTP2_ONLY = HttpProtocolOptions(
    explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions())
)


def upstream_cluster(name: str, address: HostPort, protocol: str = "http1") -> Cluster:
    """A rules cluster: one address, spoken to in `protocol` (see UPSTREAM_PROTOCOLS)."""
    cluster = make_cluster(name, [address], timedelta(seconds=1))
    if protocol == "http2":
        cluster.typed_extension_protocol_options = protocol_options(HTTP2_ONLY)
    elif protocol == "downstream":
        cluster.typed_extension_protocol_options = protocol_options(
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
    cluster = make_cluster(
        SIDECAR_CLUSTER, [(host, port + i) for i in range(workers)], timedelta(milliseconds=250)
    )
    http_check = grpc_check = None
    if mode == "ext_authz_http":
        http_check = HealthCheckHttpHealthCheck(path=HEALTH_PATH)
        # Envoy closes an idle pooled connection before the sidecar would: a check sent on a
        # connection the sidecar is closing fails (and skips the sidecar when failing open).
        cluster.typed_extension_protocol_options = protocol_options(
            HttpProtocolOptions(
                common_http_protocol_options=CommonHttpProtocolOptions(
                    idle_timeout=timedelta(seconds=ENVOY_POOL_IDLE_TIMEOUT)
                ),
                explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                    http_protocol_options=Http1ProtocolOptions()
                ),
            )
        )
        cluster.circuit_breakers = fast_path_circuit_breakers()
    else:
        cluster.typed_extension_protocol_options = protocol_options(HTTP2_ONLY)  # gRPC
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


def fast_path_circuit_breakers() -> CircuitBreakers:
    """Envoy holds at most ENVOY_SIDECAR_CONNECTIONS connections (one check each, HTTP/1.1) to
    the fast path, and queues no more checks than that: under the sidecar's connection cap, so
    that at the cap the connections given up are never Envoy's (sidecar.transports.authz_http)."""
    return CircuitBreakers(
        thresholds=[
            CircuitBreakersThresholds(
                max_connections=ENVOY_SIDECAR_CONNECTIONS,
                max_pending_requests=ENVOY_SIDECAR_CONNECTIONS,
                max_requests=ENVOY_SIDECAR_CONNECTIONS,
            )
        ]
    )


def spire_agent_cluster(socket: str) -> Cluster:
    """The SPIRE agent's SDS API: gRPC (HTTP/2) on a unix socket."""
    return Cluster(
        name=SPIRE_AGENT_CLUSTER,
        type=ClusterDiscoveryType.STATIC,
        connect_timeout=timedelta(seconds=1),
        typed_extension_protocol_options=protocol_options(HTTP2_ONLY),
        load_assignment=ClusterLoadAssignment(
            cluster_name=SPIRE_AGENT_CLUSTER,
            endpoints=[
                LocalityLbEndpoints(
                    lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=Address(pipe=Pipe(path=socket))))]
                )
            ],
        ),
    )
