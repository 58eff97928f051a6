"""Prometheus metrics of the sidecar. Every metric takes an injectable registry."""

from prometheus_client import REGISTRY, CollectorRegistry, Counter
from prometheus_client.metrics import MetricWrapperBase


class Metrics:
    """Counters the request path increments; label children are cached per label set."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.decisions = Counter(
            "graysteer_decisions",
            "Routing decisions made, by upstream cluster and deciding rule ('default' when none matched).",
            ["cluster", "rule"],
            registry=registry,
        )
        self.decision_errors = Counter(
            "graysteer_decision_errors",
            "Requests that could not be decided and were sent to the default cluster, by reason.",
            ["reason"],
            registry=registry,
        )
        self._children: dict[tuple[str, ...], MetricWrapperBase] = {}

    def count_decision(self, cluster: str, rule: str) -> None:
        key = (cluster, rule)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.decisions.labels(cluster, rule)
        child.inc()  # type: ignore[attr-defined]

    def count_error(self, reason: str) -> None:
        self.decision_errors.labels(reason).inc()
