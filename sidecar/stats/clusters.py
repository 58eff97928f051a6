"""Each upstream cluster's responses as Envoy counts them: cumulative counts from its
Prometheus statistics (`/stats/prometheus`: responses by status class and the
`upstream_rq_time` histogram), their increases over a window, and a bounded history of
snapshots to take windows from. Pure: the reading is sidecar.stats.envoy's.
"""

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from sidecar.core.rollout import ClusterWindow, p99_from_buckets


@dataclass(frozen=True)
class ClusterCounts:
    """Cumulative counts of one cluster at one moment."""

    requests: float
    errors: float
    bounds: tuple[float, ...]  # histogram upper bounds in ms, the last +Inf
    buckets: tuple[float, ...]  # cumulative counts per bound


def parse_envoy_stats(text: str) -> dict[str, ClusterCounts]:
    """Envoy's Prometheus text -> counts per cluster."""
    return cluster_counts(text_string_to_metric_families(text))


def cluster_counts(families: Iterable[Metric]) -> dict[str, ClusterCounts]:
    """Envoy's Prometheus metric families -> counts per cluster."""
    requests: dict[str, float] = {}
    errors: dict[str, float] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in families:
        for sample in family.samples:
            cluster = sample.labels.get("envoy_cluster_name")
            if cluster is None:
                continue
            if sample.name in ("envoy_cluster_upstream_rq_xx", "envoy_cluster_upstream_rq_xx_total"):
                requests[cluster] = requests.get(cluster, 0) + sample.value
                if sample.labels.get("envoy_response_code_class") == "5":
                    errors[cluster] = errors.get(cluster, 0) + sample.value
            elif sample.name == "envoy_cluster_upstream_rq_time_bucket":
                buckets.setdefault(cluster, []).append((float(sample.labels["le"]), sample.value))
    counts = {}
    for cluster, total in requests.items():
        pairs = sorted(buckets.get(cluster, []))
        counts[cluster] = ClusterCounts(
            total, errors.get(cluster, 0.0), tuple(b for b, _ in pairs), tuple(c for _, c in pairs)
        )
    return counts


def delta(old: ClusterCounts | None, new: ClusterCounts | None) -> ClusterCounts | None:
    """A cluster's responses between two snapshots (counts since `old`, as cumulative histogram
    buckets). Counters that went down were reset (Envoy restarted): counted from zero."""
    if new is None:
        return None
    if old is None or new.requests < old.requests or new.bounds != old.bounds:
        old = ClusterCounts(0, 0, new.bounds, tuple(0.0 for _ in new.buckets))
    return ClusterCounts(
        new.requests - old.requests,
        new.errors - old.errors,
        new.bounds,
        tuple(n - o for n, o in zip(new.buckets, old.buckets, strict=False)),
    )


def as_window(counts: ClusterCounts | None) -> ClusterWindow:
    if counts is None:
        return ClusterWindow()
    buckets = list(counts.buckets)
    return ClusterWindow(
        int(counts.requests),
        int(counts.errors),
        p99_from_buckets(list(counts.bounds), buckets) if buckets else None,
    )


def window(old: ClusterCounts | None, new: ClusterCounts | None) -> ClusterWindow:
    """A cluster's responses between two snapshots."""
    return as_window(delta(old, new))


class ClusterHistory:
    """A bounded ring of snapshots (cumulative counts per cluster) of one Envoy."""

    def __init__(self, keep_seconds: float) -> None:
        self.keep_seconds = keep_seconds
        self.snapshots: deque[tuple[float, dict[str, ClusterCounts]]] = deque()

    def record(self, now: float, counts: dict[str, ClusterCounts]) -> None:
        self.snapshots.append((now, counts))
        while self.snapshots and now - self.snapshots[0][0] > self.keep_seconds + 1:
            self.snapshots.popleft()

    def cluster_delta(self, cluster: str, seconds: float, now: float) -> ClusterCounts | None:
        """The cluster's counts over the last `seconds`; None when no snapshot lies in them (a
        history that stopped, e.g. a replica gone, adds nothing to the window)."""
        if not self.snapshots or now - self.snapshots[-1][0] > seconds:
            return None
        newest = self.snapshots[-1][1].get(cluster)
        oldest = next((counts.get(cluster) for t, counts in self.snapshots if now - t <= seconds), None)
        return delta(oldest, newest)

    def cluster_window(self, cluster: str, seconds: float, now: float) -> ClusterWindow:
        return as_window(self.cluster_delta(cluster, seconds, now))

    @property
    def latest(self) -> dict[str, ClusterCounts]:
        return self.snapshots[-1][1] if self.snapshots else {}
