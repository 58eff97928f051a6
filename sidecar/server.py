"""`graysteer serve`: wire the rules, the decider and the gRPC servicers together."""

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from grpc_health.v1 import health_pb2_grpc

from sidecar.admin.api import admin_pb2_grpc
from sidecar.admin.security import AdminAuth, AdminAuthInterceptor, restrict_socket, server_credentials
from sidecar.admin.servicer import AdminServicer
from sidecar.runtime.bypass import BypassMonitor
from sidecar.runtime.decider import Decider
from sidecar.runtime.etcd import EtcdAddress, EtcdTls, is_etcd
from sidecar.runtime.fleet import Fleet, lanes_to_json
from sidecar.runtime.health import BypassGate, Readiness, ReadinessView
from sidecar.runtime.metrics import Metrics
from sidecar.runtime.operator_http import start_http
from sidecar.runtime.reload import Reloader
from sidecar.runtime.rollouts import EnvoyStats, RolloutController, http_view
from sidecar.runtime.sources.etcd import EtcdSource, default_cache_dir
from sidecar.runtime.sources.file import watch_directory
from sidecar.runtime.state_file import StateFile, default_state_path
from sidecar.transports.authz_http import AuthzHttpServer, start_authz_http
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


@dataclass(frozen=True)
class ServeOptions:
    config: str
    listen: str | None = "127.0.0.1:50051"  # gRPC: ext_proc, ext_authz, health; None: off
    authz_http_listen: str | None = None  # ext_authz over plain HTTP/1.1 (sidecar.transports.authz_http)
    authz_http_shared_port: bool = False  # workers share the HTTP port (SO_REUSEPORT)
    admin_listen: str = "127.0.0.1:50052"
    http_listen: str | None = None
    state_file: str | None = None
    grace_seconds: float = 5.0
    drain_seconds: float = 1.0
    watch: bool = True
    watch_polling: bool = False
    admin_allow_remote: bool = False
    admin_auth: AdminAuth = field(
        default_factory=AdminAuth
    )  # token and/or TLS client certificates (admin.security)
    event_loop: str = "auto"
    envoy_admin: str | None = None  # Envoy's admin: rollouts and the bypass count read its stats
    rollout_poll_seconds: float = 1.0  # also how often Envoy's bypass counters are read
    ready_max_bypass_ratio: float | None = None  # /readyz 503 above this share of bypasses
    worker_index: int | None = None  # set when run by `serve --workers N`
    # --config etcd://HOST:PORT/PREFIX (runtime.etcd): TLS, the local cache, this replica's name
    etcd_tls: EtcdTls | None = None
    etcd_cache: str | None = None
    replica_id: str | None = None


def is_ascii_number(text: str) -> bool:
    """Whether `text` is ASCII digits: str.isdigit() and int() also take other scripts' digits
    (Arabic-Indic digits for 15001 are 15001 to int()), and isdigit() superscripts that int() refuses."""
    return text.isascii() and text.isdecimal()


def split_host_port(address: str, what: str) -> tuple[str, int]:
    """'127.0.0.1:50051' -> ('127.0.0.1', 50051), or ValueError naming the flag."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not is_ascii_number(port) or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what}: expected HOST:PORT (e.g. 127.0.0.1:50051), got {address!r}")
    return host.strip("[]"), int(port)


def is_local_address(address: str) -> bool:
    """True for a unix socket or a loopback HOST:PORT."""
    if address.startswith("unix:"):
        return True
    host, _ = split_host_port(address, "address")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(
    server: grpc.aio.Server, address: str, flag: str, credentials: grpc.ServerCredentials | None = None
) -> str:
    mask = os.umask(0o177) if address.startswith("unix:") else None  # the socket: owner only
    try:
        port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError as error:
        raise OSError(f"{flag}: cannot listen on {address}: {error}") from error
    finally:
        if mask is not None:
            os.umask(mask)
    return address if address.startswith("unix:") else f"{address.rpartition(':')[0]}:{port}"


def log_tasks() -> None:
    """SIGUSR1: log where every task of the serving loop waits (for a stuck process)."""
    for task in asyncio.all_tasks():
        chain: list[str] = []
        awaited: Any = task.get_coro()
        while awaited is not None and len(chain) < 12:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
            if frame is None:
                chain.append(type(awaited).__name__)
                break
            chain.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
        log.warning("task %s: %s", task.get_name(), " -> ".join(chain))


def replica_name(options: ServeOptions) -> str:
    """This replica's name in its fleet: --replica-id (default HOSTNAME-PID), -wN per worker."""
    base = options.replica_id or f"{socket.gethostname()}-{os.getpid()}"
    return base if options.worker_index is None else f"{base}-w{options.worker_index}"


async def open_etcd(options: ServeOptions, metrics: Metrics) -> tuple[EtcdSource, Reloader]:
    """The etcd source (or its local cache, etcd being unreachable) and the first table."""
    address = EtcdAddress.parse(options.config)
    cache = Path(options.etcd_cache) if options.etcd_cache else default_cache_dir(address)
    if options.worker_index is not None:
        cache = cache / f"worker-{options.worker_index}"
    source = EtcdSource(address, options.etcd_tls, cache, metrics)
    await source.start()
    try:
        return source, Reloader(source.rules, metrics, source.state)
    except ValueError as error:
        if not source.use_cached_rules():
            raise
        log.error("the rules in etcd cannot be served (%s): starting from the local cache", error)
        return source, Reloader(source.rules, metrics, source.state)


async def serve(options: ServeOptions) -> None:
    """Serve until SIGTERM/SIGINT; then NOT_SERVING, drain, and stop within the grace period."""
    metrics = Metrics()
    readiness = Readiness()
    source: EtcdSource | None = None
    if is_etcd(options.config):
        source, reloader = await open_etcd(options, metrics)
    else:
        rules = Path(options.config)
        state_path = Path(options.state_file) if options.state_file else default_state_path(rules)
        reloader = Reloader(rules, metrics, StateFile(state_path))  # refuses to start on error
    table = reloader.table
    decider = Decider(reloader.holder, metrics)

    server = None
    listen = "off"
    if options.listen is not None:
        server = grpc.aio.server(options=GRPC_OPTIONS)
        add_ext_proc(ExtProcServicer(decider), server)
        authz_grpc.add_AuthorizationServicer_to_server(AuthorizationServicer(decider), server)
        health_pb2_grpc.add_HealthServicer_to_server(readiness.grpc, server)
        listen = _bind(server, options.listen, "--listen")
    authz_http: AuthzHttpServer | None = None
    if options.authz_http_listen is not None:
        host, port = split_host_port(options.authz_http_listen, "--authz-http-listen")
        try:
            authz_http = await start_authz_http(
                decider, host, port, lambda: readiness.ready, reuse_port=options.authz_http_shared_port
            )
        except OSError as error:
            raise OSError(
                f"--authz-http-listen: cannot listen on {options.authz_http_listen}: "
                f"{error.strerror or error}"
            ) from error

    controller = None
    bypass = None
    fleet = None
    if source is not None:
        fleet = Fleet(source.client, source.address, replica_name(options), metrics)
    # One controller per process group (workers follow the state file), or per replica in a
    # fleet, where only the elected leader's acts.
    if options.worker_index in (None, 0) or fleet is not None:
        stats = (
            EnvoyStats(split_host_port(options.envoy_admin, "--envoy-admin"), 60.0)
            if options.envoy_admin
            else None
        )
        if options.envoy_admin:  # count what Envoy sends on without asking, from the same poll
            bypass = BypassMonitor(
                metrics, options.envoy_admin, options.rollout_poll_seconds, options.ready_max_bypass_ratio
            )
        controller = RolloutController(
            reloader,
            metrics,
            stats,
            options.rollout_poll_seconds,
            observers=[bypass.observe] if bypass else (),
            leads=fleet.leads if fleet is not None else lambda: True,
            analysis=fleet.lanes if fleet is not None else None,
        )
        if table.rollouts and stats is None and fleet is None:
            log.warning(
                "the rules have rollouts but no --envoy-admin: they cannot be analysed and will not advance"
            )

    auth = options.admin_auth
    admin = grpc.aio.server(
        options=GRPC_OPTIONS, interceptors=[AdminAuthInterceptor(auth)] if auth.authenticates else None
    )
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(reloader, controller, bypass), admin)
    admin_listen = _bind(
        admin, options.admin_listen, "--admin-listen", server_credentials(auth) if auth.tls else None
    )

    http = None
    if options.http_listen:
        host, port = split_host_port(options.http_listen, "--http-listen")
        view: ReadinessView = readiness
        if bypass is not None and options.ready_max_bypass_ratio is not None:
            view = BypassGate(readiness, bypass.readiness_ratio, options.ready_max_bypass_ratio)
        http = start_http(
            host,
            port,
            metrics.registry,
            view,
            lambda: {"version": reloader.table.version, **(source.health() if source else {})},
            (lambda path: http_view(controller, path)) if controller else None,
        )
        log.info("serving /metrics /healthz /readyz on http://%s:%d", host, http.server_address[1])

    if server is not None:
        await server.start()
    await admin.start()
    restrict_socket(admin_listen)  # and again once it exists, whatever the umask did
    await readiness.set(True, "serving")
    http_address = "off" if authz_http is None else f"{authz_http.host}:{authz_http.port}"
    log.info(
        "serving gRPC ext_proc and ext_authz on %s, HTTP ext_authz on %s, with rules %s "
        "version %s (%d rules)",
        listen,
        http_address
        if authz_http is None
        else f"{http_address} (at most {authz_http.max_connections} connections)",
        table.source,
        table.version,
        len(table.rules),
    )
    log.info("admin API on %s; state in %s", admin_listen, reloader.state.label)
    if options.worker_index is not None:  # tell the supervisor where this worker listens
        print(f"ready ext_proc={listen} admin={admin_listen} authz_http={http_address}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[object]] = set()

    def reload_on_sighup() -> None:
        task = asyncio.create_task(reloader.reload("sighup", force=True))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_on_sighup)
    loop.add_signal_handler(signal.SIGUSR1, log_tasks)
    watchers = []
    if source is not None:
        assert fleet is not None
        # Workers share one Envoy: only worker 0 publishes its lanes, or the fleet would count
        # them once per worker.
        stats_for_record = (
            controller.stats if controller is not None and options.worker_index in (None, 0) else None
        )

        def record() -> dict[str, object]:
            return {
                "version": reloader.table.version,
                "file_version": reloader.loaded.file_version,
                "ready": readiness.ready,
                "source_connected": source.connected,
                "lanes": lanes_to_json(stats_for_record.latest) if stats_for_record else {},
            }

        async def publish_changes() -> None:
            queue = reloader.subscribe()
            while True:
                await queue.get()
                fleet.poke()

        watchers.append(asyncio.create_task(source.run(reloader, stop)))
        fleet_task = asyncio.create_task(fleet.run(stop, record))
        watchers.append(fleet_task)
        watchers.append(asyncio.create_task(publish_changes()))
        log.info("following %s as replica %s", source.address, fleet.replica_id)
    elif options.watch:
        # The rules' directory, and the state file's: runtime weights set by another worker.
        watched = {path.parent.resolve(): path for path in (state_path, rules)}
        watchers = [
            asyncio.create_task(
                watch_directory(path, lambda: reloader.reload("watch"), stop, options.watch_polling)
            )
            for path in watched.values()
        ]

    if controller is not None:
        watchers.append(asyncio.create_task(controller.run(stop)))

    await stop.wait()
    await readiness.set(False, "shutting down")
    log.info(
        "shutting down: NOT_SERVING for %.1fs, then draining streams for up to %.1fs",
        options.drain_seconds,
        options.grace_seconds,
    )
    await asyncio.sleep(options.drain_seconds)
    await asyncio.gather(
        *([server.stop(options.grace_seconds)] if server is not None else []),
        *([authz_http.close(options.grace_seconds)] if authz_http is not None else []),
    )
    await admin.stop(0)
    if fleet is not None:  # let the fleet task give up its lease (the lead passes at once)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(fleet_task, 3)
    for watcher in watchers:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if source is not None:
        await source.close()
    if http is not None:
        http.shutdown()
    log.info("stopped")
