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

Each worker receives the options object itself (sidecar.serving.options: the supervisor's,
with the worker's index and addresses), pickled on its stdin by `python -m
sidecar.serving.worker`: no option is turned back into flags.
"""

import asyncio
import dataclasses
import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, multiprocess

from sidecar import values
from sidecar.ops.health import BypassGate, ReadinessView, registry_bypass_ratio
from sidecar.ops.operator_http import OperatorHttpServer, start_http
from sidecar.serving.options import ServeOptions

log = logging.getLogger("graysteer.workers")

RESTART_DELAY_SECONDS = 1.0


def worker_address(address: str | None, index: int) -> str | None:
    """The i-th worker's address: port + i, or port 0 (a free port) for each."""
    if address is None:
        return None
    if address.startswith("unix:"):
        return f"{address}.{index}" if index else address
    host, port = values.host_port(address)
    return f"{host}:{port + index if port else 0}"


@dataclass
class Worker:
    index: int
    listen: str | None  # after the first start: the address actually bound, reused by restarts
    admin_listen: str
    authz_http_listen: str | None
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    output: "asyncio.Task[None] | None" = None


class Supervisor:
    """Runs `options.workers` workers of `command` (a worker entry point reading its options
    on stdin; tests give a stand-in that does no serving)."""

    def __init__(self, options: ServeOptions, command: Sequence[str] = ()) -> None:
        self.options = options
        self.count = options.workers
        self.command = list(command) or [sys.executable, "-m", "sidecar.serving.worker"]
        self.workers = [
            Worker(
                i,
                worker_address(options.listen, i),
                str(worker_address(options.admin_listen, i)),
                options.authz_http_listen
                if options.authz_http_shared_port
                else worker_address(options.authz_http_listen, i),
            )
            for i in range(self.count)
        ]
        self.metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(
            prefix="graysteer-metrics-"
        )
        self._own_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
        self.stopping = False

    def options_of(self, worker: Worker) -> ServeOptions:
        """The worker's options: the supervisor's, with its index and its own addresses."""
        return dataclasses.replace(
            self.options,
            workers=1,
            worker_index=worker.index,
            listen=worker.listen,
            admin_listen=worker.admin_listen,
            authz_http_listen=worker.authz_http_listen,
            http_listen=None,  # the supervisor serves the group's /metrics, /healthz, /readyz
            group_listeners=self.group_listeners(),
        )

    def group_listeners(self) -> tuple[tuple[str, str], ...]:
        """(flag, HOST:PORT) of every listener of the group, for no webhook gate to reach."""
        options, found = self.options, []
        for index in range(options.workers):
            for flag, address in (
                ("--listen", options.listen),
                ("--admin-listen", options.admin_listen),
                ("--authz-http-listen", options.authz_http_listen),
            ):
                listen = worker_address(address, index)
                if listen is not None and not listen.startswith("unix:"):
                    found.append((flag, listen))
        if options.http_listen:
            found.append(("--http-listen", options.http_listen))
        return tuple(found)

    async def start(self, worker: Worker) -> None:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir}
        worker.ready = False
        worker.process = await asyncio.create_subprocess_exec(
            *self.command, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        assert worker.process.stdin is not None and worker.process.stdout is not None
        worker.process.stdin.write(pickle.dumps(self.options_of(worker)))
        worker.process.stdin.close()
        line = (await worker.process.stdout.readline()).decode().strip()
        if not line.startswith("ready "):
            await worker.process.stdout.read()  # to the end: the pipe closes with the process
            code = await worker.process.wait()
            raise RuntimeError(f"worker {worker.index} failed to start (exit code {code})")
        worker.output = asyncio.create_task(self._forward(worker.process.stdout))
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        # A restart must come back where Envoy sends this worker's streams.
        worker.admin_listen = fields["admin"]
        if worker.listen is not None:
            worker.listen = fields["ext_proc"]
        if worker.authz_http_listen is not None:
            worker.authz_http_listen = fields["authz_http"]
        worker.ready = True
        log.info("worker %d (pid %d) ready %s", worker.index, worker.process.pid, line[len("ready ") :])

    @staticmethod
    async def _forward(stdout: asyncio.StreamReader) -> None:
        """Whatever else a worker prints goes to our stdout; read to the end, so the pipe
        closes with the worker."""
        while line := await stdout.readline():
            sys.stdout.write(line.decode(errors="replace"))

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

    async def run(self, stop: asyncio.Event | None = None) -> int:
        """Start every worker, serve the group's /metrics, /healthz and /readyz, restart a
        worker that dies, until SIGTERM/SIGINT (or `stop`); then stop every worker. 0 when
        each of them stopped cleanly."""
        started = await asyncio.gather(*(self.start(w) for w in self.workers), return_exceptions=True)
        failed = [outcome for outcome in started if isinstance(outcome, BaseException)]
        if failed:  # stop those that started, then say why
            self.stopping = True
            await self._stop_all()
            raise failed[0]
        http = self._start_http() if self.options.http_listen else None
        watchers = [asyncio.create_task(self.watch(w)) for w in self.workers]
        if stop is None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            loop.add_signal_handler(signal.SIGHUP, lambda: self.signal_all(signal.SIGHUP))
        await stop.wait()
        self.stopping = True
        log.info("stopping %d workers", self.count)
        codes = await self._stop_all()
        for task in watchers:
            task.cancel()
        if http is not None:
            http.shutdown()
        if self._own_metrics_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        log.info("stopped (worker exit codes %s)", codes)
        return 0 if all(code == 0 for code in codes) else 1

    async def _stop_all(self) -> list[int]:
        """SIGTERM every worker and wait for it (each drains for --drain + --grace seconds);
        one still running 5 s after that is killed. Their exit codes."""
        self.signal_all(signal.SIGTERM)
        bound = self.options.drain_seconds + self.options.grace_seconds + 5
        codes = []
        for worker in self.workers:
            if worker.process is None:
                continue
            try:
                codes.append(await asyncio.wait_for(worker.process.wait(), bound))
            except TimeoutError:
                log.error("worker %d did not stop within %.0f s: killed", worker.index, bound)
                worker.process.kill()
                codes.append(await worker.process.wait())
            if worker.output is not None:
                await worker.output
        return codes

    def _start_http(self) -> OperatorHttpServer:
        """The group's /metrics (every worker's, aggregated), /healthz and /readyz."""
        assert self.options.http_listen is not None
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.metrics_dir)  # type: ignore[no-untyped-call]
        host, port = values.host_port(self.options.http_listen, "--http-listen")
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
            hosts=frozenset(self.options.http_host),
        )
        log.info("serving /metrics /healthz /readyz on http://%s:%d", host, http.server_address[1])
        return http

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


def run_workers(options: ServeOptions) -> int:
    return asyncio.run(Supervisor(options).run())
