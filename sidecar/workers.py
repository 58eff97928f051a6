"""`graysteer serve --workers N`: N sidecar processes behind one Envoy cluster.

Python decides one request at a time per process; more cores need more processes.
Each worker is a complete `graysteer serve` on its own port (the listen port + i, or a
free port each with port 0) and Envoy balances streams across them as the N endpoints
of the sidecar cluster (`graysteer envoy-config --workers N`). Balancing per stream by
Envoy beats SO_REUSEPORT here: Envoy opens only one or two HTTP/2 connections to the
sidecar, and the kernel balances connections, not streams.

The supervisor (this module) starts the workers, serves the aggregated /metrics
(prometheus multiprocess mode), /healthz and /readyz, forwards SIGHUP, restarts a worker
that dies, and on SIGTERM stops all of them, each draining its streams. Workers agree on
the table because each reads the same rules and state files (runtime weight changes go
through the state file, which every worker watches).
"""

import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, multiprocess

from sidecar.runtime.health import BypassGate, ReadinessView, registry_bypass_ratio
from sidecar.runtime.operator_http import start_http
from sidecar.server import ServeOptions, split_host_port

log = logging.getLogger("graysteer.workers")

RESTART_DELAY_SECONDS = 1.0


def worker_address(address: str | None, index: int) -> str | None:
    """The i-th worker's address: port + i, or port 0 (a free port) for each."""
    if address is None:
        return None
    if address.startswith("unix:"):
        return f"{address}.{index}" if index else address
    host, port = split_host_port(address, "address")
    return f"{host}:{port + index if port else 0}"


@dataclass
class Worker:
    index: int
    listen: str | None  # after the first start: the address actually bound, reused by restarts
    admin_listen: str
    authz_http_listen: str | None
    process: asyncio.subprocess.Process | None = None
    ready: bool = False


class Supervisor:
    def __init__(self, options: ServeOptions, count: int, log_level: str) -> None:
        self.options = options
        self.count = count
        self.log_level = log_level
        self.workers = [
            Worker(
                i,
                worker_address(options.listen, i),
                str(worker_address(options.admin_listen, i)),
                options.authz_http_listen
                if options.authz_http_shared_port
                else worker_address(options.authz_http_listen, i),
            )
            for i in range(count)
        ]
        self.metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(
            prefix="graysteer-metrics-"
        )
        self._own_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
        self.stopping = False

    def argv(self, worker: Worker) -> list[str]:
        o = self.options
        argv = [
            sys.executable,
            "-m",
            "sidecar",
            "--log-level",
            self.log_level,
            "serve",
            "--config",
            o.config,
            "--listen",
            worker.listen or "off",
            "--admin-listen",
            worker.admin_listen,
            "--drain",
            str(o.drain_seconds),
            "--grace",
            str(o.grace_seconds),
            "--worker-index",
            str(worker.index),
            "--event-loop",
            o.event_loop,
        ]
        if worker.authz_http_listen:
            argv += ["--authz-http-listen", worker.authz_http_listen]
            if o.authz_http_shared_port:
                argv.append("--authz-http-shared-port")
        auth = o.admin_auth
        for flag, value in (
            ("--admin-token-file", auth.token_file),
            ("--admin-tls-cert", auth.tls_cert),
            ("--admin-tls-key", auth.tls_key),
            ("--admin-tls-ca", auth.tls_ca),
        ):
            if value is not None:
                argv += [flag, value]
        for identity in auth.allow:
            argv += ["--admin-allow", identity]
        if o.admin_allow_remote:
            argv.append("--admin-allow-remote")
        if o.state_file:
            argv += ["--state-file", o.state_file]
        tls = o.etcd_tls
        for flag, path in (
            ("--etcd-ca", tls and tls.ca),
            ("--etcd-cert", tls and tls.cert),
            ("--etcd-key", tls and tls.key),
            ("--etcd-cache", o.etcd_cache),
            ("--replica-id", o.replica_id),
        ):
            if path:
                argv += [flag, str(path)]
        if o.envoy_admin:
            argv += ["--envoy-admin", o.envoy_admin, "--rollout-poll", str(o.rollout_poll_seconds)]
        if not o.watch:
            argv.append("--no-watch")
        if o.watch_polling:
            argv.append("--watch-poll")
        return argv

    async def start(self, worker: Worker) -> None:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir}
        worker.ready = False
        worker.process = await asyncio.create_subprocess_exec(
            *self.argv(worker), env=env, stdout=asyncio.subprocess.PIPE
        )
        assert worker.process.stdout is not None
        line = (await worker.process.stdout.readline()).decode().strip()
        if not line.startswith("ready "):
            code = await worker.process.wait()
            raise RuntimeError(f"worker {worker.index} failed to start (exit code {code})")
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        # A restart must come back where Envoy sends this worker's streams.
        worker.admin_listen = fields["admin"]
        if worker.listen is not None:
            worker.listen = fields["ext_proc"]
        if worker.authz_http_listen is not None:
            worker.authz_http_listen = fields["authz_http"]
        worker.ready = True
        log.info("worker %d (pid %d) ready %s", worker.index, worker.process.pid, line[len("ready ") :])

    async def watch(self, worker: Worker) -> None:
        """Restart a worker that exits while the supervisor is not stopping."""
        while not self.stopping:
            assert worker.process is not None
            code = await worker.process.wait()
            worker.ready = False
            multiprocess.mark_process_dead(worker.process.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
            if self.stopping:
                return
            log.error(
                "worker %d exited with %s; restarting in %.0fs", worker.index, code, RESTART_DELAY_SECONDS
            )
            await asyncio.sleep(RESTART_DELAY_SECONDS)
            if not self.stopping:
                try:
                    await self.start(worker)
                except RuntimeError as error:
                    log.error("%s", error)

    def signal_all(self, sig: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(sig)

    async def run(self) -> int:
        try:
            await asyncio.gather(*(self.start(w) for w in self.workers))
        except RuntimeError:
            self.stopping = True
            self.signal_all(signal.SIGTERM)
            raise
        http = None
        if self.options.http_listen:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.metrics_dir)  # type: ignore[no-untyped-call]
            host, port = split_host_port(self.options.http_listen, "--http-listen")
            view: ReadinessView = self.readiness
            if self.options.ready_max_bypass_ratio is not None:  # worker 0 reads the ratio
                view = BypassGate(
                    view, lambda: registry_bypass_ratio(registry), self.options.ready_max_bypass_ratio
                )
            http = start_http(
                host,
                port,
                registry,
                view,
                lambda: {"workers": self.count, "ready_workers": sum(w.ready for w in self.workers)},
            )
            log.info("serving /metrics /healthz /readyz on http://%s:%d", host, http.server_address[1])
        watchers = [asyncio.create_task(self.watch(w)) for w in self.workers]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.signal_all(signal.SIGHUP))
        await stop.wait()
        self.stopping = True
        log.info("stopping %d workers", self.count)
        self.signal_all(signal.SIGTERM)
        codes = [await w.process.wait() for w in self.workers if w.process is not None]
        for task in watchers:
            task.cancel()
        if http is not None:
            http.shutdown()
        if self._own_metrics_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        log.info("stopped (worker exit codes %s)", codes)
        return 0 if all(code == 0 for code in codes) else 1

    @property
    def readiness(self) -> "_AllReady":
        return _AllReady(self)


class _AllReady:
    """/readyz for the supervisor: ready while every worker is."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    @property
    def ready(self) -> bool:
        return not self.supervisor.stopping and all(w.ready for w in self.supervisor.workers)

    @property
    def reason(self) -> str:
        if self.supervisor.stopping:
            return "shutting down"
        waiting = [str(w.index) for w in self.supervisor.workers if not w.ready]
        return f"workers not ready: {', '.join(waiting)}" if waiting else "serving"


def run_workers(options: ServeOptions, count: int, log_level: str) -> int:
    return asyncio.run(Supervisor(options, count, log_level).run())
