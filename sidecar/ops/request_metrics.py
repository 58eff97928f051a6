"""The metrics counted on every request, counted in one of two ways with the same names,
labels, help texts and samples.

- `PlainCounts` (one process): plain integers and floats in dicts, exported by a custom
  collector when /metrics is read. prometheus_client's own objects take a lock and look up a
  label child per increment and per histogram bucket: a few microseconds per request, as
  much as deciding it (benchmarks/README.md). The serving loop is the only writer; the
  collector reads copies (`dict.copy` is atomic under the GIL), from any thread.
- `ClientCounts` (`serve --workers N`, PROMETHEUS_MULTIPROC_DIR set): prometheus_client's
  objects, whose values live in the files the supervisor aggregates across workers
  (sidecar.serving.workers). A collector inside a worker would never be read there.

tests/ops/test_request_metrics.py checks that both expose the same text for the same requests.
"""

import time
from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import metrics as client_metrics
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from sidecar.core import Steering
from sidecar.ops.metric_specs import ISSUED_KEYS, Spec, counter, gauge

# Deciding takes microseconds: buckets from 2 us to 10 ms.
DECISION_BUCKETS = (2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 1e-2)
# A transport's whole turn (read the message, decide): 10 us to 250 ms.
REQUEST_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.25)
# The transports (the `transport` label's closed set).
TRANSPORTS = ("ext_proc", "ext_authz", "ext_authz_http")


DECISIONS = Spec(
    "graysteer_decisions",
    "Routing decisions, by upstream cluster and deciding rule ('default' when no rule matched).",
    ("cluster", "rule"),
)
MIRRORED = Spec(
    "graysteer_mirrored",
    "Requests copied to a mirror cluster (answers ignored), by deciding rule and mirror cluster.",
    ("rule", "cluster"),
)
STEERING_EVENTS = Spec(
    "graysteer_steering_events",
    "Notable inputs, by event: untrusted_headers_removed "
    "(override/color headers from an untrusted caller, stripped), malformed_spiffe_id, "
    "malformed_dns_san (a DNS SAN that is no DNS name: never matched), "
    "malformed_certificate, malformed_xfcc, malformed_baggage, malformed_lane (a received lane "
    "that is no lane name or over 64 characters: ignored), malformed_version (no version where a "
    "semver condition reads one), baggage_over_limit.",
    ("event",),
)
DECISION_SECONDS = Spec(
    "graysteer_decision_duration_seconds",
    "Time to decide one request (matching and bucketing, without gRPC).",
    buckets=DECISION_BUCKETS,
)
INFLIGHT_STREAMS = Spec(
    "graysteer_inflight_streams", "ext_proc streams open now.", gauge=True, combine="livesum"
)
REQUEST_SECONDS = Spec(
    "graysteer_request_duration_seconds",
    "The sidecar's own time for one request, by transport (ext_proc, ext_authz, "
    "ext_authz_http): reading Envoy's message and deciding (a shadow table's decision and "
    "the decision log's hand-off included). Envoy's side of the "
    "call (network, its own queueing) is not in it: Envoy exports no ext_proc latency.",
    ("transport",),
    REQUEST_BUCKETS,
)


def steering_events(steering: Steering) -> Iterable[str]:
    """The steering events one steering counts (the `event` label)."""
    if steering.remove_headers:
        yield "untrusted_headers_removed"
    if steering.baggage_dropped:
        yield "baggage_over_limit"
    if steering.identity.malformed:
        yield "malformed_spiffe_id"
    if steering.identity.malformed_dns:
        yield "malformed_dns_san"
    for what in steering.malformed:
        yield f"malformed_{what}"


def _notable(steering: Steering) -> bool:
    identity = steering.identity
    return bool(
        steering.remove_headers
        or steering.baggage_dropped
        or steering.malformed
        or identity.malformed
        or identity.malformed_dns
    )


class ClientCounts:
    """The per-request metrics as prometheus_client objects (multiprocess mode)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def histogram(spec: Spec) -> Histogram:
            return Histogram(
                spec.name, spec.documentation, spec.labels, buckets=spec.buckets, registry=registry
            )

        self.decisions, self.mirrored = counter(DECISIONS, registry), counter(MIRRORED, registry)
        self.issued = counter(ISSUED_KEYS, registry)
        self.events = counter(STEERING_EVENTS, registry)
        self.decision_seconds = histogram(DECISION_SECONDS)
        request_seconds = histogram(REQUEST_SECONDS)
        self._requests = {t: request_seconds.labels(t) for t in TRANSPORTS}
        self._decisions: dict[tuple[str, str], MetricWrapperBase] = {}
        self._streams = gauge(INFLIGHT_STREAMS, registry)

    def count_steering(self, steering: Steering, seconds: float) -> None:
        self.decision_seconds.observe(seconds)
        decision = steering.decision
        key = (decision.cluster, decision.rule)
        child = self._decisions.get(key)
        if child is None:
            child = self._decisions[key] = self.decisions.labels(*key)
        child.inc()  # type: ignore[attr-defined]
        if decision.mirror is not None:
            self.mirrored.labels(decision.rule, decision.mirror).inc()
        if decision.issued is not None:
            self.issued.labels(decision.rule, decision.cluster).inc()
        if _notable(steering):
            for event in steering_events(steering):
                self.count_event(event)

    def count_event(self, event: str) -> None:
        self.events.labels(event).inc()

    def count_decided(self, cluster: str, rule: str, mirror: str | None, issued: bool = False) -> None:
        """A decision taken elsewhere (Envoy's Lua), read from its access log."""
        self.decisions.labels(cluster, rule).inc()
        if mirror is not None:
            self.mirrored.labels(rule, mirror).inc()
        if issued:
            self.issued.labels(rule, cluster).inc()

    def observe_request(self, transport: str, seconds: float) -> None:
        self._requests[transport].observe(seconds)  # KeyError: not a transport

    def count_request(self, transport: str, steering: Steering, deciding: float, seconds: float) -> None:
        self.count_steering(steering, deciding)
        self.observe_request(transport, seconds)

    def streams_open(self, change: int) -> None:
        self._streams.inc(change)


class _PlainHistogram:
    """One histogram series: counts per bucket (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = (*bounds, float("inf"))
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1  # the first bound >= seconds
        self.sum += seconds

    def samples(self, metric: Metric, name: str, labels: dict[str, str]) -> None:
        counts, total = list(self.counts), self.sum  # copies: another thread may be counting
        cumulative = 0.0
        for bound, count in zip(self.bounds, counts, strict=True):
            cumulative += count
            metric.add_sample(f"{name}_bucket", {**labels, "le": floatToGoString(bound)}, cumulative)  # type: ignore[no-untyped-call]
        metric.add_sample(f"{name}_count", labels, cumulative)
        metric.add_sample(f"{name}_sum", labels, total)
        if client_metrics._use_created:
            metric.add_sample(f"{name}_created", labels, self.created)


class PlainCounts(Collector):
    """The per-request metrics as plain numbers, exported by `collect` (one process)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._decisions: dict[tuple[str, ...], int] = {}
        self._mirrored: dict[tuple[str, ...], int] = {}
        self._issued: dict[tuple[str, ...], int] = {}
        self._events: dict[tuple[str, ...], int] = {}
        self._created: dict[tuple[str, tuple[str, ...]], float] = {}
        self._decision_seconds = _PlainHistogram(DECISION_BUCKETS)
        self._requests = {t: _PlainHistogram(REQUEST_BUCKETS) for t in TRANSPORTS}
        self._streams = 0
        registry.register(self)

    def count_steering(self, steering: Steering, seconds: float) -> None:
        histogram = self._decision_seconds  # observe(), inlined: once per request
        histogram.counts[bisect_left(histogram.bounds, seconds)] += 1
        histogram.sum += seconds
        decision = steering.decision
        key = (decision.cluster, decision.rule)
        known = self._decisions.get(key)
        if known is None:
            self._count(self._decisions, DECISIONS.name, key)
        else:
            self._decisions[key] = known + 1
        if decision.mirror is not None:
            self._count(self._mirrored, MIRRORED.name, (decision.rule, decision.mirror))
        if decision.issued is not None:
            self._count(self._issued, ISSUED_KEYS.name, (decision.rule, decision.cluster))
        if _notable(steering):
            for event in steering_events(steering):
                self.count_event(event)

    def count_event(self, event: str) -> None:
        self._count(self._events, STEERING_EVENTS.name, (event,))

    def count_decided(self, cluster: str, rule: str, mirror: str | None, issued: bool = False) -> None:
        """A decision taken elsewhere (Envoy's Lua), read from its access log."""
        self._count(self._decisions, DECISIONS.name, (cluster, rule))
        if mirror is not None:
            self._count(self._mirrored, MIRRORED.name, (rule, mirror))
        if issued:
            self._count(self._issued, ISSUED_KEYS.name, (rule, cluster))

    def observe_request(self, transport: str, seconds: float) -> None:
        self._requests[transport].observe(seconds)  # KeyError: not a transport

    def count_request(self, transport: str, steering: Steering, deciding: float, seconds: float) -> None:
        """`count_steering` and `observe_request` in one call, both inlined: once per request."""
        histogram = self._requests[transport]  # KeyError: not a transport
        histogram.counts[bisect_left(histogram.bounds, seconds)] += 1
        histogram.sum += seconds
        self.count_steering(steering, deciding)

    def streams_open(self, change: int) -> None:
        self._streams += change  # a prometheus_client Gauge takes a lock for this

    def _count(self, counts: dict[tuple[str, ...], int], name: str, key: tuple[str, ...]) -> None:
        known = counts.get(key)
        if known is None:
            self._created[(name, key)] = time.time()
            known = 0
        counts[key] = known + 1

    # the collector

    def describe(self) -> Iterable[Metric]:
        return [
            _metric(spec)
            for spec in (
                DECISIONS,
                MIRRORED,
                ISSUED_KEYS,
                STEERING_EVENTS,
                DECISION_SECONDS,
                INFLIGHT_STREAMS,
                REQUEST_SECONDS,
            )
        ]

    def collect(self) -> Iterable[Metric]:
        created = self._created.copy()
        for spec, counts in (
            (DECISIONS, self._decisions),
            (MIRRORED, self._mirrored),
            (ISSUED_KEYS, self._issued),
        ):
            yield self._counter(spec, counts.copy(), created)
        yield self._counter(STEERING_EVENTS, self._events.copy(), created)
        decision = _metric(DECISION_SECONDS)
        self._decision_seconds.samples(decision, DECISION_SECONDS.name, {})
        yield decision
        streams = _metric(INFLIGHT_STREAMS)
        streams.add_sample(INFLIGHT_STREAMS.name, {}, float(self._streams))
        yield streams
        request = _metric(REQUEST_SECONDS)
        for transport, histogram in self._requests.items():
            histogram.samples(request, REQUEST_SECONDS.name, {"transport": transport})
        yield request

    @staticmethod
    def _counter(
        spec: Spec, counts: dict[tuple[str, ...], int], created: dict[tuple[str, tuple[str, ...]], float]
    ) -> Metric:
        metric = _metric(spec)
        use_created = client_metrics._use_created
        for key, value in counts.items():
            labels = dict(zip(spec.labels, key, strict=True))
            metric.add_sample(f"{spec.name}_total", labels, float(value))
            if use_created:
                metric.add_sample(f"{spec.name}_created", labels, created.get((spec.name, key), 0.0))
        return metric


def _metric(spec: Spec) -> Metric:
    kind = "histogram" if spec.buckets else "gauge" if spec.gauge else "counter"
    return Metric(spec.name, spec.documentation, kind)


RequestCounts = PlainCounts | ClientCounts


def request_counts(registry: CollectorRegistry, multiprocess: bool) -> RequestCounts:
    """Plain numbers in one process; prometheus_client's shared files across workers."""
    return ClientCounts(registry) if multiprocess else PlainCounts(registry)
