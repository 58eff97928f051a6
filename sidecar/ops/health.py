"""Health: the gRPC health service and the HTTP /metrics, /healthz, /readyz endpoints.

Readiness is one flag with two views: gRPC `grpc.health.v1` (for Envoy's health checks
of the sidecar cluster) and HTTP /readyz (for Kubernetes). NOT_SERVING until a table is
loaded and from the moment shutdown begins.
"""

import contextlib
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from grpc_health.v1 import health, health_pb2
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

SERVICE_NAMES = ("", "envoy.service.ext_proc.v3.ExternalProcessor", "envoy.service.auth.v3.Authorization")


class ReadinessView(Protocol):
    @property
    def ready(self) -> bool: ...

    @property
    def reason(self) -> str: ...


class Readiness:
    """The serving state, shared by the gRPC health service and /readyz."""

    def __init__(self) -> None:
        self.grpc = health.aio.HealthServicer()
        self.ready = False
        self.reason = "starting: no table loaded yet"

    async def set(self, ready: bool, reason: str) -> None:
        self.ready, self.reason = ready, reason
        status = (
            health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in SERVICE_NAMES:
            await self.grpc.set(name, status)


class BypassGate:
    """/readyz that also answers 503 while Envoy sends more than `max_ratio` of requests on
    without a decision (`serve --ready-max-bypass-ratio`), the ratio of the last read of
    Envoy's stats; `ratio()` gives None when that is unknown, which never fails readiness.

    Only the HTTP view: the gRPC health that Envoy checks must not follow it, or a sidecar
    that Envoy bypasses would turn itself NOT_SERVING, Envoy would then bypass it entirely,
    and the ratio could never come down again.
    """

    def __init__(self, base: ReadinessView, ratio: Callable[[], float | None], max_ratio: float) -> None:
        self.base = base
        self.ratio = ratio
        self.max_ratio = max_ratio

    def _over(self) -> float | None:
        ratio = self.ratio()
        return ratio if ratio is not None and ratio > self.max_ratio else None

    @property
    def ready(self) -> bool:
        return self.base.ready and self._over() is None

    @property
    def reason(self) -> str:
        over = self._over() if self.base.ready else None
        if over is None:
            return self.base.reason
        return (
            f"Envoy sent {over:.1%} of requests on without a decision from the sidecar "
            f"between the last two reads of its stats (limit {self.max_ratio:.1%}, "
            "--ready-max-bypass-ratio)"
        )


def registry_bypass_ratio(registry: CollectorRegistry) -> float | None:
    """The highest graysteer_envoy_bypass_ratio in a registry (the supervisor's view of its
    workers), or None while graysteer_envoy_stats_up is not 1."""
    up = registry.get_sample_value("graysteer_envoy_stats_up")
    if up != 1:
        return None
    ratios = [
        sample.value
        for metric in registry.collect()
        if metric.name == "graysteer_envoy_bypass_ratio"
        for sample in metric.samples
    ]
    return max(ratios, default=0.0)


Extra = Callable[[str], "tuple[int, object] | None"]


MAX_CONNECTIONS = 32  # requests answered at once; more are refused at once with 503
READ_TIMEOUT_SECONDS = 5.0  # a request (or a write to a client that does not read) gets this long


class BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per request, at most MAX_CONNECTIONS of them: a connection over the limit is
    answered 503 and closed at once, never queued, so slow or half-open clients cannot hold
    threads or starve the scrape and the probes for longer than the read timeout."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: connections over the limit get their 503 fast

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def start_http(
    host: str,
    port: int,
    registry: CollectorRegistry,
    readiness: ReadinessView,
    details: Callable[[], dict[str, object]],
    extra: Extra | None = None,
) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz and /readyz (and whatever `extra` answers, as JSON) from a
    daemon thread; returns the server."""

    class Handler(BaseHTTPRequestHandler):
        timeout = READ_TIMEOUT_SECONDS  # the socket's: a slow or half-open client is cut off

        def do_GET(self) -> None:
            path = self.path.partition("?")[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":  # liveness: the process answers
                self._send(200, b"ok\n", "text/plain")
            elif path == "/readyz":
                body = {"ready": readiness.ready, "reason": readiness.reason, **details()}
                self._send(
                    200 if readiness.ready else 503, json.dumps(body).encode() + b"\n", "application/json"
                )
            elif extra is not None and (answer := extra(path)) is not None:
                self._send(answer[0], json.dumps(answer[1], indent=1).encode() + b"\n", "application/json")
            else:
                self._send(404, b"not found: try /metrics, /healthz, /readyz, /rollouts\n", "text/plain")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = BoundedHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="graysteer-http", daemon=True).start()
    return server
