"""Running a built sidecar: listen, follow changes, and stop cleanly.

`serve(options)`: build (sidecar.serving.build), start every listener, report SERVING, follow
the source, the fleet, Envoy's statistics and the rollouts until SIGTERM/SIGINT; then
NOT_SERVING for --drain seconds (Envoy's health checks stop sending streams), let open
streams finish for up to --grace seconds, and stop. SIGHUP reloads the rules; SIGUSR1 logs
where each task waits.
"""

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Coroutine
from typing import Any

import grpc

from sidecar import values
from sidecar.admin.security import (
    AdminGate,
    HttpTls,
    TokenFile,
    admin_tls_files,
    restrict_socket,
    server_credentials,
)
from sidecar.admin.web import Access, LivePage
from sidecar.fleet.replicas import ReplicaRecord
from sidecar.ops.health import BypassGate, ReadinessView
from sidecar.ops.ofrep_http import OfrepEndpoint
from sidecar.ops.operator_http import OperatorHttpServer, Request, start_http
from sidecar.rollouts.controller import http_view
from sidecar.serving.build import Sidecar
from sidecar.serving.options import ServeOptions
from sidecar.tlsfiles import TlsFiles

log = logging.getLogger("graysteer.server")


async def serve(options: ServeOptions) -> None:
    """Serve until SIGTERM/SIGINT; then drain and stop within the grace period."""
    running = Running(await Sidecar.build(options))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, running.reload_soon)
    loop.add_signal_handler(signal.SIGUSR1, log_tasks)
    await running.start()
    running.follow(stop)
    await stop.wait()
    await running.stop()


class Running:
    """A sidecar's listeners and background tasks, from start to stop."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        self.grpc_address = "off"
        self.xds_address = "off"
        self.admin_address = ""
        self.http: OperatorHttpServer | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.fleet_task: asyncio.Task[Any] | None = None
        self.admin_tls: TlsFiles | None = None  # the admin API's and the operator HTTPS's

    async def start(self) -> None:
        """Bind and start every listener, then report SERVING (and, for a worker, tell the
        supervisor where it listens)."""
        s, options = self.sidecar, self.sidecar.options
        if s.grpc_server is not None and options.listen is not None:
            self.grpc_address = bind(s.grpc_server, options.listen, "--listen")
        if s.xds is not None and options.xds_listen:
            self.xds_address = bind(s.xds[0], options.xds_listen, "--xds-listen")
        auth = options.admin_auth
        self.admin_tls = admin_tls_files(auth, s.tls_reloads) if auth.tls else None
        credentials = server_credentials(self.admin_tls) if self.admin_tls is not None else None
        self.admin_address = bind(s.admin, options.admin_listen, "--admin-listen", credentials)
        if s.authz_http is not None and options.authz_http_listen:
            host, port = values.host_port(options.authz_http_listen, "--authz-http-listen")
            try:
                await s.authz_http.start(host, port, options.authz_http_shared_port)
            except OSError as error:
                raise OSError(
                    f"--authz-http-listen: cannot listen on {options.authz_http_listen}: "
                    f"{error.strerror or error}"
                ) from error
        if options.http_listen:
            self.http = self._start_http(options.http_listen)
        if s.grpc_server is not None:
            await s.grpc_server.start()
        if s.xds is not None:
            await s.xds[0].start()
        await s.admin.start()
        restrict_socket(self.admin_address)  # and again once it exists, whatever the umask did
        self._protect_listeners()
        await s.readiness.set(True, "serving")
        self._log_serving()

    def _protect_listeners(self) -> None:
        """No webhook gate may reach a listener of this process, on the port it was given."""
        s = self.sidecar
        bound = [
            ("--listen", self.grpc_address),
            ("--xds-listen", self.xds_address),
            ("--admin-listen", self.admin_address),
        ]
        if s.authz_http is not None:
            bound.append(("--authz-http-listen", f"{s.authz_http.host}:{s.authz_http.port}"))
        if self.http is not None:
            bound.append(("--http-listen", "{}:{}".format(*self.http.server_address)))
        for flag, address in bound:
            if address not in ("off", "") and not address.startswith("unix:"):
                host, port = values.host_port(address)
                s.controller.gates.destinations.protect(f"the sidecar's {flag}", host, port)

    def _start_http(self, address: str) -> OperatorHttpServer:
        s, options = self.sidecar, self.sidecar.options
        host, port = values.host_port(address, "--http-listen")
        view: ReadinessView = s.readiness
        ratio = options.ready_max_bypass_ratio
        if s.bypass is not None and ratio is not None:
            view = BypassGate(s.readiness, s.bypass.readiness_ratio, ratio)
        page = self._live_page(address)

        def extra(request: Request) -> tuple[int, object] | None:
            if (answer := page(request)) is not None:
                return answer
            return http_view(s.controller, request.path) if request.method == "GET" else None

        tls = HttpTls(self.admin_tls) if options.http_actions and self.admin_tls is not None else None
        http = start_http(
            host,
            port,
            s.metrics.registry,
            view,
            lambda: {"version": s.reloader.table.version, **s.source.health()},
            extra,
            ui=True,
            tls=tls,
            hosts=frozenset(options.http_host),
            ofrep=self._ofrep(address),
        )
        scheme = "https" if tls is not None else "http"
        log.info("serving /metrics /healthz /readyz on %s://%s:%d", scheme, host, http.server_address[1])
        log.info(
            "the live page: %s://%s:%d/ui/ (%s)",
            scheme,
            host,
            http.server_address[1],
            "with rollout actions for authenticated callers" if options.http_actions else "read-only",
        )
        return http

    def _ofrep(self, address: str) -> OfrepEndpoint:
        """OpenFeature remote evaluation on the operator endpoint: the current table's engine,
        behind --ofrep-token-file, else only on loopback."""
        s, token_file = self.sidecar, self.sidecar.options.ofrep_token_file
        authorized = None
        if token_file is not None:
            tokens = TokenFile(token_file, "OFREP token file")

            def authorized(header: str | None) -> bool:  # the header's bytes as sent (latin-1)
                return tokens.accepts_header(header.encode("latin-1") if header else None)

        holder = s.reloader.holder
        return OfrepEndpoint(lambda: holder.engine, authorized, values.is_local_address(address))

    def _live_page(self, address: str) -> LivePage:
        s, auth = self.sidecar, self.sidecar.options.admin_auth
        credentials = " and ".join(
            name for name, on in (("token", auth.token_file), ("certificate", auth.tls)) if on
        )
        access = Access(
            actions=s.options.http_actions,
            explain_open=values.is_local_address(address),
            gate=AdminGate(auth) if auth.authenticates else None,
            credentials=credentials,
        )
        fleet = s.fleet
        return LivePage(
            s.admin_servicer,
            asyncio.get_running_loop(),
            access,
            (lambda: fleet.report(s.reloader.loaded.file_version)) if fleet is not None else None,
        )

    def _log_serving(self) -> None:
        s = self.sidecar
        table = s.reloader.table
        http = "off" if s.authz_http is None else f"{s.authz_http.host}:{s.authz_http.port}"
        cap = "" if s.authz_http is None else f" (at most {s.authz_http.max_connections} connections)"
        log.info(
            "serving gRPC ext_proc and ext_authz on %s, HTTP ext_authz on %s, with rules %s "
            "version %s (%d rules)",
            self.grpc_address,
            http + cap,
            table.source,
            table.version,
            len(table.rules),
        )
        if s.xds is not None:
            log.info("serving Envoy the table as Lua over ECDS on %s", self.xds_address)
        log.info("admin API on %s; state in %s", self.admin_address, s.reloader.state.label)
        if s.options.worker_index is not None:  # tell the supervisor where this worker listens
            print(
                f"ready ext_proc={self.grpc_address} admin={self.admin_address} authz_http={http}", flush=True
            )

    def follow(self, stop: asyncio.Event) -> None:
        """Start the background work: following the source, the fleet, Envoy's statistics,
        the rollouts."""
        s = self.sidecar
        self._spawn(s.source.follow(s.reloader, stop))
        if s.fleet is not None:
            self.fleet_task = self._spawn(s.fleet.run(stop, self._record))
            self._spawn(self._publish_changes())
            log.info("following %s as replica %s", s.options.config, s.fleet.replica_id)
        if s.stats is not None:
            self._spawn(s.stats.run(stop))
        self._spawn(s.controller.run(stop))
        self._spawn(s.controller.follow())
        if s.xds is not None:
            self._spawn(s.xds[1].follow(s.reloader))

    def _record(self) -> ReplicaRecord:
        s = self.sidecar
        return ReplicaRecord(
            id="",  # the fleet sets its id, whether it leads and when it wrote
            at=0.0,
            version=s.reloader.table.version,
            file_version=s.reloader.loaded.file_version,
            ready=s.readiness.ready,
            source_connected=bool(s.source.health().get("connected", True)),
            # Workers share one Envoy: only the primary publishes its counts, or the fleet
            # would count them once per worker.
            clusters=s.stats.latest if s.stats is not None and s.options.primary else {},
        )

    async def _publish_changes(self) -> None:
        """Publish this replica's record as soon as the served table changes."""
        assert self.sidecar.fleet is not None
        queue = self.sidecar.reloader.subscribe()
        while True:
            await queue.get()
            self.sidecar.fleet.poke()

    def reload_soon(self) -> None:
        """SIGHUP: read the rules and the state again; reopen the decision log (logrotate)."""
        self._spawn(self.sidecar.reloader.reload("sighup", force=True))
        if self.sidecar.decider.log is not None:
            self.sidecar.decider.log.reopen()

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def stop(self) -> None:
        """NOT_SERVING, drain, stop the listeners within the grace period, then the rest."""
        s, options = self.sidecar, self.sidecar.options
        await s.readiness.set(False, "shutting down")
        log.info(
            "shutting down: NOT_SERVING for %.1fs, then draining streams for up to %.1fs",
            options.drain_seconds,
            options.grace_seconds,
        )
        await asyncio.sleep(options.drain_seconds)
        await asyncio.gather(
            *([s.grpc_server.stop(options.grace_seconds)] if s.grpc_server is not None else []),
            *([s.authz_http.close(options.grace_seconds)] if s.authz_http is not None else []),
            *([s.xds[0].stop(0)] if s.xds is not None else []),  # Envoy keeps the last table
        )
        await s.admin.stop(0)
        if self.fleet_task is not None:  # let the fleet give up its lease (the lead passes at once)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.fleet_task, 3)
        for task in list(self.tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await s.source.close()
        s.reloader.close()
        if s.decider.log is not None:
            s.decider.log.close()
        if self.http is not None:
            self.http.shutdown()
        log.info("stopped")


def bind(
    server: grpc.aio.Server, address: str, flag: str, credentials: grpc.ServerCredentials | None = None
) -> str:
    """Bind `address` (a unix socket: owner only); the address bound, with the port chosen."""
    mask = os.umask(0o177) if address.startswith("unix:") else None
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


def run_event_loop(main: Coroutine[Any, Any, None], choice: str) -> None:
    """Run on uvloop when asked for or (auto) installed; asyncio's loop otherwise."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ValueError(
                    "--event-loop uvloop: uvloop is not installed (a dependency of graysteer: "
                    "reinstall graysteer, or use --event-loop asyncio)"
                ) from None
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(main)
            return
    asyncio.run(main)
