"""Prometheus metrics of the sidecar. Every metric takes an injectable registry.

Names follow Prometheus conventions (base units, `_total` counters, `_info` gauges);
README.md lists each one. With `serve --workers N` every worker writes its values to
PROMETHEUS_MULTIPROC_DIR and the supervisor serves their aggregate; each gauge says how
workers' values combine.
"""

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from prometheus_client.metrics import MetricWrapperBase

from sidecar.core import Steering, Table
from sidecar.ops import metric_specs as specs
from sidecar.ops.request_metrics import request_counts

if TYPE_CHECKING:
    from sidecar.core.rollout import Verdict

MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ

BYPASS_MODES = ("ext_proc", "ext_authz")  # the only values of the bypass metrics' `mode` label


class Metrics:
    """What the request path and the reloader record; label children are cached."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        # decisions, mirrored, steering events, the two latency histograms and the open ext_proc
        # streams: counted per request
        self.requests = request_counts(registry, MULTIPROCESS)
        # Bound once: called on every request. `count_request`: one decided request (its
        # decision, mirror, notable inputs, time to decide) and its transport's whole turn;
        # `observe_request`: the turn alone, of a request that could not be read (both:
        # KeyError for a transport not in TRANSPORTS).
        self.observe_request: Callable[[str, float], None] = self.requests.observe_request
        self.count_request: Callable[[str, Steering, float, float], None] = self.requests.count_request
        # a decision Envoy took itself (its Lua), counted from its access log stream
        self.count_decided: Callable[[str, str, str | None, bool], None] = self.requests.count_decided
        # ext_proc streams opened (+1) and closed (-1): once each per request over ext_proc
        self.streams_open: Callable[[int], None] = self.requests.streams_open
        self.decision_errors = specs.counter(specs.DECISION_ERRORS, registry)
        self.shadow_decisions = specs.counter(specs.SHADOW_DECISIONS, registry)
        self.shadow_info = specs.gauge(specs.SHADOW_INFO, registry)
        self.shadow_sample = specs.gauge(specs.SHADOW_SAMPLE, registry)
        self.shadow_cost = specs.gauge(specs.SHADOW_COST, registry)
        self._shadow_children: dict[tuple[str, str, str], MetricWrapperBase] = {}
        self.decision_log_lines = specs.counter(specs.DECISION_LOG_LINES, registry)
        self.admin_watchers = specs.gauge(specs.ADMIN_WATCHERS, registry)
        self.reloads = specs.counter(specs.RELOADS, registry)
        self.ecds_updates = specs.counter(specs.ECDS_UPDATES, registry)
        self.envoy_decision_logs = specs.counter(specs.ENVOY_DECISIONS_READ, registry)
        self.config_info = specs.gauge(specs.CONFIG_INFO, registry)
        self.config_loaded = specs.gauge(specs.CONFIG_LOADED, registry)
        self.source_connected = specs.gauge(specs.SOURCE_CONNECTED, registry)
        self.source_connected.set(1)
        self.fleet_leader = specs.gauge(specs.FLEET_LEADER, registry)
        self.fleet_records_refused = specs.counter(specs.FLEET_RECORDS_REFUSED, registry)
        self.etcd_changes = specs.counter(specs.ETCD_CHANGES, registry)
        self.etcd_changes_repeated = specs.counter(specs.ETCD_CHANGES_REPEATED, registry)
        self.etcd_failovers = specs.counter(specs.ETCD_FAILOVERS, registry)
        self.split_weight = specs.gauge(specs.SPLIT_WEIGHT, registry)
        self.rollout_step = specs.gauge(specs.ROLLOUT_STEP, registry)
        self.rollout_state = specs.gauge(specs.ROLLOUT_STATE, registry)
        self.rollout_canary_weight = specs.gauge(specs.ROLLOUT_CANARY_WEIGHT, registry)
        self.rollout_waiting = specs.gauge(specs.ROLLOUT_WAITING, registry)
        self.rollout_gate_checks = specs.counter(specs.ROLLOUT_GATE_CHECKS, registry)
        self.rollout_verdict = specs.gauge(specs.ROLLOUT_VERDICT, registry)
        self.rollout_metric_value = specs.gauge(specs.ROLLOUT_METRIC_VALUE, registry)
        self.rollout_metric_checks = specs.counter(specs.ROLLOUT_METRIC_CHECKS, registry)
        self.rollout_max_error_ratio = specs.gauge(specs.ROLLOUT_MAX_ERROR_RATIO, registry)
        self.rollout_max_p99_seconds = specs.gauge(specs.ROLLOUT_MAX_P99_SECONDS, registry)
        self.cluster_error_ratio = specs.gauge(specs.CLUSTER_ERROR_RATIO, registry)
        self.cluster_p99_seconds = specs.gauge(specs.CLUSTER_P99_SECONDS, registry)
        self.cluster_requests = specs.gauge(specs.CLUSTER_REQUESTS, registry)
        self._shown: dict[Gauge, set[tuple[str, ...]]] = {}
        # every series a rollout has, by its rule (retired when the rollout leaves the table)
        self._rollout_series: dict[str, set[tuple[Gauge, tuple[str, ...]]]] = {}
        self._limit_gauges = (self.rollout_max_error_ratio, self.rollout_max_p99_seconds)
        self.envoy_bypassed: Counter | None = None  # watch_envoy() creates these
        self.envoy_requests: Counter | None = None
        self.envoy_bypass_ratio: Gauge | None = None
        self.envoy_stats_up: Gauge | None = None

    def watch_envoy(self) -> None:
        """Create the series read from Envoy's stats (`serve --envoy-admin`): only a process
        that reads them exports them, so an absent series means "not watched", never 0."""
        if self.envoy_stats_up is not None:
            return
        self.envoy_bypassed = specs.counter(specs.ENVOY_BYPASSED, self.registry)
        self.envoy_requests = specs.counter(specs.ENVOY_REQUESTS, self.registry)
        self.envoy_bypass_ratio = specs.gauge(specs.ENVOY_BYPASS_RATIO, self.registry)
        self.envoy_stats_up = specs.gauge(specs.ENVOY_STATS_UP, self.registry)

    def count_bypass(self, mode: str, bypassed: float, requests: float, ratio: float) -> None:
        """One window between two reads of Envoy's stats, for one filter."""
        if mode not in BYPASS_MODES:  # a closed set: never a label built from input
            raise ValueError(f"unknown mode {mode!r}")
        assert self.envoy_bypassed is not None and self.envoy_requests is not None
        assert self.envoy_bypass_ratio is not None
        self.envoy_bypassed.labels(mode).inc(bypassed)
        self.envoy_requests.labels(mode).inc(requests)
        self.envoy_bypass_ratio.labels(mode).set(ratio)

    def show_envoy_stats_up(self, up: bool) -> None:
        assert self.envoy_stats_up is not None
        self.envoy_stats_up.set(1 if up else 0)

    def count_log(self, outcome: str, lines: int = 1) -> None:
        self.decision_log_lines.labels(outcome).inc(lines)

    def count_shadow(self, rule: str, cluster: str, shadow: str) -> None:
        key = (rule, cluster, shadow)
        child = self._shadow_children.get(key)
        if child is None:
            differs = "true" if cluster != shadow else "false"
            child = self._shadow_children[key] = self.shadow_decisions.labels(rule, cluster, shadow, differs)
        child.inc()  # type: ignore[attr-defined]

    def show_shadow(self, version: str | None, sample: float = 1.0, cost: float = 0.0) -> None:
        self._show(self.shadow_info, {(version,): 1} if version is not None else {})
        self.shadow_sample.set(sample)
        self.shadow_cost.set(cost)

    def count_error(self, reason: str) -> None:
        self.decision_errors.labels(reason).inc()

    def count_event(self, event: str) -> None:
        self.requests.count_event(event)

    def count_reload(self, result: str) -> None:
        self.reloads.labels(result).inc()

    def show_table(self, table: Table) -> None:
        """Point the info and weight gauges at a newly served table."""
        file_version = table.version.partition("+")[0]
        self._show(self.config_info, {(table.version, file_version, table.source): 1})
        self.config_loaded.set_to_current_time()
        self._show(
            self.split_weight,
            {
                (rule.name, cluster): weight
                for rule in table.rules
                if rule.split is not None
                for cluster, weight in zip(rule.split.clusters, rule.split.weights, strict=True)
            },
        )

    def show_rollout(self, rule: str, phase: str, step: int, weight: int, waiting: str = "") -> None:
        from sidecar.core.rollout import PHASES, WAITS

        self._set_rollout(rule, self.rollout_step, (rule,), step)
        self._set_rollout(rule, self.rollout_canary_weight, (rule,), weight)
        for name in PHASES:
            self._set_rollout(rule, self.rollout_state, (rule, name), 1 if name == phase else 0)
        for on in WAITS:
            self._set_rollout(rule, self.rollout_waiting, (rule, on), 1 if on == waiting else 0)

    def count_gate_check(self, rule: str, before: str, result: str) -> None:
        """One webhook gate check (result: passed, refused, timeout or error)."""
        self.rollout_gate_checks.labels(rule, before, result).inc()

    def count_metric_check(self, rule: str, metric: str, result: str) -> None:
        """One PromQL metric check (result: pass, breach, no_data, timeout or error)."""
        self.rollout_metric_checks.labels(rule, metric, result).inc()

    def show_metric_value(self, rule: str, metric: str, value: float | None) -> None:
        """A metric check's last value; no series while it has none."""
        labels = (rule, metric)
        if value is not None:
            self._set_rollout(rule, self.rollout_metric_value, labels, value)
        elif (self.rollout_metric_value, labels) in self._rollout_series.get(rule, set()):
            self._rollout_series[rule].discard((self.rollout_metric_value, labels))
            self._retire(self.rollout_metric_value, labels)

    def show_limits(self, rule: str, cluster: str, max_error_ratio: float, max_p99_ms: float | None) -> None:
        """A rollout's limits (a limit it does not set has no series; one for another canary
        cluster, from before the rollout changed, is retired)."""
        limits = {(self.rollout_max_error_ratio, (rule, cluster))}
        if max_p99_ms is not None:
            limits.add((self.rollout_max_p99_seconds, (rule, cluster)))
        shown = self._rollout_series.get(rule, set())
        for gauge, labels in [s for s in shown if s[0] in self._limit_gauges and s not in limits]:
            shown.discard((gauge, labels))
            self._retire(gauge, labels)
        self._set_rollout(rule, self.rollout_max_error_ratio, (rule, cluster), max_error_ratio)
        if max_p99_ms is not None:
            self._set_rollout(rule, self.rollout_max_p99_seconds, (rule, cluster), max_p99_ms / 1000)

    def keep_rollouts(self, rules: Iterable[str]) -> None:
        """Retire every series of a rollout no longer in the table: a dashboard must not go
        on showing a removed rollout's last step, weight and limits."""
        for rule in set(self._rollout_series) - set(rules):
            for gauge, labels in self._rollout_series.pop(rule):
                self._retire(gauge, labels)

    def show_verdict(self, rule: str, verdict: "Verdict") -> None:
        from sidecar.core.rollout import BREACH, HEALTHY, INCONCLUSIVE, UNAVAILABLE

        for outcome in (HEALTHY, BREACH, INCONCLUSIVE, UNAVAILABLE):
            self._set_rollout(
                rule, self.rollout_verdict, (rule, outcome), 1 if outcome == verdict.outcome else 0
            )
        if verdict.outcome != UNAVAILABLE:
            self.show_clusters(verdict)

    def show_clusters(self, verdict: "Verdict") -> None:
        for cluster, window in (
            (verdict.canary_cluster, verdict.canary),
            (verdict.baseline_cluster, verdict.baseline),
        ):
            self.cluster_requests.labels(cluster).set(window.requests)
            self.cluster_error_ratio.labels(cluster).set(window.error_rate)
            if window.p99_ms is not None:
                self.cluster_p99_seconds.labels(cluster).set(window.p99_ms / 1000)

    def _show(self, gauge: Gauge, values: dict[tuple[str, ...], float]) -> None:
        """Set a labelled gauge to exactly `values`, retiring series no longer shown."""
        for labels in self._shown.get(gauge, set()) - set(values):
            self._retire(gauge, labels)
        for labels, value in values.items():
            gauge.labels(*labels).set(value)
        self._shown[gauge] = set(values)

    def _set_rollout(self, rule: str, gauge: Gauge, labels: tuple[str, ...], value: float) -> None:
        gauge.labels(*labels).set(value)
        self._rollout_series.setdefault(rule, set()).add((gauge, labels))

    @staticmethod
    def _retire(gauge: Gauge, labels: tuple[str, ...]) -> None:
        if MULTIPROCESS:
            gauge.labels(*labels).set(0)  # a worker cannot delete from the shared files
        else:
            gauge.remove(*labels)
