"""Health: the gRPC health service and readiness, which the operator HTTP endpoint's /readyz
shows (sidecar.ops.operator_http).

Readiness is one flag with two views: gRPC `grpc.health.v1` (for Envoy's health checks
of the sidecar cluster) and HTTP /readyz (for Kubernetes). NOT_SERVING until a table is
loaded and from the moment shutdown begins.
"""

from collections.abc import Callable
from typing import Protocol

from grpc_health.v1 import health, health_pb2
from prometheus_client import CollectorRegistry

from sidecar.contract import HEALTH_SERVICES


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
        for name in HEALTH_SERVICES:
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
