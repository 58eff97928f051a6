"""`graysteer serve`: wire the rules, the decider and the gRPC servicers together."""

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from prometheus_client import start_http_server

from sidecar.deciding import Decider, TableHolder
from sidecar.extproc import ExtProcServicer
from sidecar.metrics import Metrics
from sidecar.rules_file import load_rules

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
    listen: str = "127.0.0.1:50051"
    metrics_listen: str | None = None
    grace_seconds: float = 5.0


def split_host_port(address: str, what: str) -> tuple[str, int]:
    """'127.0.0.1:50051' -> ('127.0.0.1', 50051), or ValueError naming the flag."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what}: expected HOST:PORT (e.g. 127.0.0.1:50051), got {address!r}")
    return host.strip("[]"), int(port)


async def serve(options: ServeOptions) -> None:
    """Serve until SIGTERM/SIGINT, then drain streams for up to the grace period."""
    table = load_rules(options.config)  # no last good table yet: refuse to start on error
    holder = TableHolder(table)
    metrics = Metrics()
    decider = Decider(holder, metrics)

    server = grpc.aio.server(options=GRPC_OPTIONS)
    ep_grpc.add_ExternalProcessorServicer_to_server(ExtProcServicer(decider), server)
    host, _ = split_host_port(options.listen, "--listen")
    try:
        port = server.add_insecure_port(options.listen)
    except RuntimeError as error:
        raise OSError(f"--listen: cannot listen on {options.listen}: {error}") from error
    if options.metrics_listen:
        metrics_host, metrics_port = split_host_port(options.metrics_listen, "--metrics-listen")
        start_http_server(metrics_port, metrics_host, registry=metrics.registry)
    await server.start()
    log.info("serving ext_proc on %s:%d with rules %s version %s (%d rules)",
             host, port, table.source, table.version, len(table.rules))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining streams for up to %.1fs", options.grace_seconds)
    await server.stop(options.grace_seconds)
    log.info("stopped")
