"""Building a sidecar from its options: every part, wired, nothing listening yet.

`Sidecar.build(options)` reads the first table (refusing to build without one) and makes the
parts; sidecar.serving.run starts, follows and stops them. Which parts exist follows from the
options alone: a fleet with etcd, Envoy's statistics with --envoy-admin, the operator HTTP
endpoint with --http-listen, the gRPC and HTTP transports with their listen addresses.
"""

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from grpc_health.v1 import health_pb2_grpc
from prometheus_client import REGISTRY, CollectorRegistry

from sidecar import values
from sidecar.admin.api import admin_pb2_grpc
from sidecar.admin.security import AdminAuthInterceptor
from sidecar.admin.servicer import AdminServicer
from sidecar.fleet.fleet import Fleet
from sidecar.ops.decision_log import open_decision_log
from sidecar.ops.health import Readiness
from sidecar.ops.metrics import Metrics
from sidecar.rollouts.controller import ClusterSource, RolloutController
from sidecar.rollouts.destinations import GateDestinations
from sidecar.rollouts.prometheus import Prometheus, PrometheusTarget
from sidecar.serving.options import ServeOptions
from sidecar.sources import Source
from sidecar.sources.etcd import EtcdSource, default_cache_dir
from sidecar.sources.etcd_client import EtcdAddress
from sidecar.sources.file import FileSource
from sidecar.stats.bypass import BypassMonitor
from sidecar.stats.envoy import EnvoyStats
from sidecar.table.decider import Decider
from sidecar.table.reload import Reloader
from sidecar.table.shadow import Shadow, shadow_of
from sidecar.tlsfiles import TlsReloads
from sidecar.transports.access_log import MAX_MESSAGE_BYTES, DecisionLogServicer
from sidecar.transports.access_log import add_to_server as add_access_log
from sidecar.transports.authz_http import AuthzHttpServer
from sidecar.transports.ecds import EcdsServicer, TableAsLua
from sidecar.transports.ecds import add_to_server as add_ecds
from sidecar.transports.envoy_decided import Feeds
from sidecar.transports.ext_authz import AuthorizationServicer
from sidecar.transports.ext_proc import ExtProcServicer
from sidecar.transports.ext_proc import add_to_server as add_ext_proc

log = logging.getLogger("graysteer.server")

GRPC_OPTIONS = [
    # Refuse to share a port with another process: a second sidecar silently taking
    # half of Envoy's streams is worse than a clear "address in use" at start-up.
    ("grpc.so_reuseport", 0),
    ("grpc.max_concurrent_streams", 10_000),
]
# The admin API's streams (WatchTable, 16 at most) are held by clients: ping them, so that a
# peer that vanished without closing (a killed laptop, a dropped VPN) frees its slot within
# a minute, not after TCP's two hours.
ADMIN_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]
STATS_KEEP_SECONDS = 600.0  # the longest analysis window a rollout may ask for


@dataclass
class Sidecar:
    """The parts of one serving process."""

    options: ServeOptions
    metrics: Metrics
    readiness: Readiness
    source: Source
    reloader: Reloader
    decider: Decider
    grpc_server: grpc.aio.Server | None  # ext_proc, ext_authz, health (--listen)
    authz_http: AuthzHttpServer | None  # ext_authz over HTTP (--authz-http-listen)
    xds: tuple[grpc.aio.Server, TableAsLua] | None  # the table as Lua over ECDS (--xds-listen)
    stats: EnvoyStats | None  # Envoy's statistics (--envoy-admin)
    bypass: BypassMonitor | None
    fleet: Fleet | None  # with etcd
    controller: RolloutController
    admin_servicer: AdminServicer
    admin: grpc.aio.Server
    tls_reloads: TlsReloads  # the admin API's and etcd's TLS files read again

    @classmethod
    async def build(cls, options: ServeOptions, registry: CollectorRegistry = REGISTRY) -> "Sidecar":
        """Every part; ValueError/OSError (naming the source) when there is no first table."""
        metrics = Metrics(registry)
        tls_reloads = TlsReloads(registry)
        source, reloader = await first_table(options, metrics, tls_reloads)
        decision_log = open_decision_log(options.decision_log, options.decision_log_sample, metrics)
        decider = Decider(reloader.holder, metrics, decision_log, shadow_of(reloader))
        readiness = Readiness()
        fleet = None
        if isinstance(source, EtcdSource):
            fleet = Fleet(source.client, source.address, replica_name(options), metrics)
        stats = bypass = None
        # Workers share one Envoy: one process reads its statistics for the group, except in
        # a fleet, where every worker is a replica that judges (and may lead) on its own.
        if options.envoy_admin and (options.primary or fleet is not None):
            admin_address = values.host_port(options.envoy_admin, "--envoy-admin")
            bypass = BypassMonitor(
                metrics, options.envoy_admin, options.rollout_poll_seconds, options.ready_max_bypass_ratio
            )
            stats = EnvoyStats(
                admin_address, STATS_KEEP_SECONDS, options.rollout_poll_seconds, [bypass.observe]
            )
        analysis: ClusterSource | None = fleet.clusters if fleet is not None else stats
        controller = RolloutController(
            reloader,
            metrics,
            analysis,
            options.rollout_poll_seconds,
            leads=fleet.leads if fleet is not None else lambda: options.primary,
            gate_destinations=gate_destinations(options),
            prometheus=prometheus(options),
        )
        servicer = AdminServicer(reloader, controller, bypass, fleet.clusters if fleet is not None else stats)
        return cls(
            options,
            metrics,
            readiness,
            source,
            reloader,
            decider,
            grpc_server(decider, readiness) if options.listen is not None else None,
            AuthzHttpServer(decider, lambda: readiness.ready) if options.authz_http_listen else None,
            xds_server(reloader, decider, metrics) if options.xds_listen else None,
            stats,
            bypass,
            fleet,
            controller,
            servicer,
            admin_server(options, servicer),
            tls_reloads,
        )


def xds_server(reloader: Reloader, decider: Decider, metrics: Metrics) -> tuple[grpc.aio.Server, TableAsLua]:
    """The server Envoy's control plane calls are made to (--xds-listen): ECDS, the served
    table's Lua (sidecar.transports.ecds), and the access log stream of what Envoy decided
    with it (sidecar.transports.access_log), which also feeds the decision log, the shadow
    table and the steering events (sidecar.transports.envoy_decided)."""
    feeds = Feeds(decider, metrics)
    feed = TableAsLua(metrics, feeds.capture)
    # Envoy's messages are small (a batch of its access log, an ECDS request): a larger one,
    # from anyone on the loopback, is refused before it is read whole.
    server = grpc.aio.server(options=[*GRPC_OPTIONS, ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    add_ecds(EcdsServicer(feed, metrics), server)
    add_access_log(DecisionLogServicer(lambda: reloader.table, metrics, feeds), server)
    return server, feed


def prometheus(options: ServeOptions) -> Prometheus | None:
    """The Prometheus that rollouts' metric checks query (`--prometheus`), or None."""
    if not options.prometheus:
        return None
    token, ca = options.prometheus_token_file, options.prometheus_ca
    return Prometheus(
        PrometheusTarget(options.prometheus, Path(token) if token else None, Path(ca) if ca else None)
    )


def gate_destinations(options: ServeOptions) -> GateDestinations:
    """The operator's --gate-allow, and every listener no gate may reach as configured: this
    process's and its group's (sidecar.serving.run adds the ports chosen for port 0 once
    bound), Envoy's admin, etcd's client address."""
    destinations = GateDestinations.parse(options.gate_allow)
    listeners = [
        ("--listen", options.listen),
        ("--authz-http-listen", options.authz_http_listen),
        ("--xds-listen", options.xds_listen),
        ("--admin-listen", options.admin_listen),
        ("--http-listen", options.http_listen),
        *options.group_listeners,  # a worker's: every worker's, and the supervisor's
    ]
    for flag, address in listeners:
        if address is not None and not address.startswith("unix:"):
            destinations.protect(f"the sidecar's {flag}", *values.host_port(address))
    if options.envoy_admin:
        destinations.protect("Envoy's admin (--envoy-admin)", *values.host_port(options.envoy_admin))
    if options.is_etcd:
        for member in EtcdAddress.parse(options.config).members:
            destinations.protect(f"etcd member {member} (--config)", member.host, member.port)
    return destinations


async def first_table(
    options: ServeOptions, metrics: Metrics, tls_reloads: TlsReloads | None = None
) -> tuple[Source, Reloader]:
    """The source and a reloader with its first table: the source's, else (etcd) its local
    cache's; ValueError or OSError naming both when neither can be served."""
    source = open_source(options, metrics, tls_reloads)
    await source.start()

    def reloader() -> Reloader:
        next_rules = source.next_rules
        shadow = None
        if next_rules is not None:
            budget = options.shadow_budget_ms / 1000
            shadow = Shadow(next_rules, source.state, metrics, sample=options.shadow_sample, budget=budget)
        return Reloader(source.rules, metrics, source.state, shadow=shadow)

    try:
        return source, reloader()
    except ValueError as error:
        if not source.use_cache():
            raise
        log.error("what %s holds cannot be served (%s): starting from the local cache", options.config, error)
        try:
            return source, reloader()
        except ValueError as cached:
            raise ValueError(f"{error}; and the local cache: {cached}") from None


def open_source(options: ServeOptions, metrics: Metrics, tls_reloads: TlsReloads | None = None) -> Source:
    """The source `--config` names (not started)."""
    if options.is_etcd:
        address = EtcdAddress.parse(options.config)
        cache = Path(options.etcd_cache) if options.etcd_cache else default_cache_dir(address)
        if options.worker_index is not None:
            cache = cache / f"worker-{options.worker_index}"
        return EtcdSource(address, options.etcd_tls, cache, metrics, tls_reloads)
    state = Path(options.state_file) if options.state_file else None
    shadow = Path(options.shadow_config) if options.shadow_config else None
    return FileSource(Path(options.config), state, options.watch, options.watch_polling, shadow)


def grpc_server(decider: Decider, readiness: Readiness) -> grpc.aio.Server:
    """ext_proc, ext_authz and the health service on one gRPC server (not bound yet)."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    add_ext_proc(ExtProcServicer(decider), server)
    authz_grpc.add_AuthorizationServicer_to_server(AuthorizationServicer(decider), server)
    health_pb2_grpc.add_HealthServicer_to_server(readiness.grpc, server)
    return server


def admin_server(options: ServeOptions, servicer: AdminServicer) -> grpc.aio.Server:
    """The admin API, authenticated as the options say (not bound yet)."""
    auth = options.admin_auth
    server = grpc.aio.server(
        options=GRPC_OPTIONS + ADMIN_KEEPALIVE,
        interceptors=[AdminAuthInterceptor(auth)] if auth.authenticates else None,
    )
    admin_pb2_grpc.add_AdminServicer_to_server(servicer, server)
    return server


def replica_name(options: ServeOptions) -> str:
    """This replica's name in its fleet: --replica-id (default HOSTNAME-PID), -wN per worker."""
    base = options.replica_id or f"{socket.gethostname()}-{os.getpid()}"
    return base if options.worker_index is None else f"{base}-w{options.worker_index}"
