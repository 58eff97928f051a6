"""Each upstream cluster's responses as Envoy counts them: cumulative counts from its
Prometheus statistics (`/stats/prometheus`: responses by status class and the
`upstream_rq_time` histogram), their increases over a window, and a bounded history of
snapshots to take windows from. Pure: the reading is sidecar.stats.envoy's.
"""

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

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


@dataclass(frozen=True)
class ClusterRate:
    """One cluster's responses per second over the last seconds, and their 5xx share."""

    requests_per_second: float
    error_ratio: float


class TrafficSource(Protocol):
    """Where the live traffic per cluster is read: one Envoy (EnvoyStats) or a fleet."""

    label: str  # for people: which Envoy, or the fleet

    def cluster_rates(self, seconds: float, now: float) -> dict[str, ClusterRate]: ...

    def problem(self) -> str | None: ...


def add_rates(into: dict[str, ClusterRate], rates: dict[str, ClusterRate]) -> None:
    """Sum `rates` into `into` (the error ratio weighted by each part's requests)."""
    for cluster, rate in rates.items():
        had = into.get(cluster)
        if had is None:
            into[cluster] = rate
            continue
        total = had.requests_per_second + rate.requests_per_second
        errors = had.requests_per_second * had.error_ratio + rate.requests_per_second * rate.error_ratio
        into[cluster] = ClusterRate(total, errors / total if total else 0.0)


class ClusterHistory:
    """A bounded ring of snapshots (cumulative counts per cluster) of one Envoy."""

    label = "Envoy's statistics"

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

    def cluster_rates(self, seconds: float, now: float) -> dict[str, ClusterRate]:
        """Each cluster's responses per second between the oldest snapshot within the last
        `seconds` and the newest (their real distance, not `seconds`); empty without two
        such snapshots, or when the newest is older than `seconds` (reading stopped)."""
        inside = [(t, counts) for t, counts in self.snapshots if now - t <= seconds]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return {}
        (began, oldest), (ended, newest) = inside[0], inside[-1]
        rates = {}
        for cluster, counts in newest.items():
            part = delta(oldest.get(cluster), counts)
            if part is not None:
                ratio = part.errors / part.requests if part.requests else 0.0
                rates[cluster] = ClusterRate(part.requests / (ended - began), ratio)
        return rates
