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
        # ext_proc streams opened (+1) and closed (-1): once each per request over ext_proc
        self.streams_open: Callable[[int], None] = self.requests.streams_open
        self.decision_errors = Counter(
            "graysteer_decision_errors",
            "Requests that could not be decided and went to the default cluster, by reason.",
            ["reason"],
            registry=registry,
        )
        self.shadow_decisions = Counter(
            "graysteer_shadow_decisions",
            "Requests decided by the shadow table too (serve --shadow-config, or a fleet's rules.next), "
            "by the live rule, the live cluster and the shadow table's (a cluster, or deny:STATUS for a "
            "denied request), and whether they differ (cluster != shadow_cluster).",
            ["rule", "cluster", "shadow_cluster", "differs"],
            registry=registry,
        )
        self.shadow_info = Gauge(
            "graysteer_shadow_info",
            "The shadow table decided beside the live one (value 1), by version; no series without one.",
            ["version"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.shadow_sample = Gauge(
            "graysteer_shadow_sample_ratio",
            "The share of requests the shadow table decides too (serve --shadow-sample, else what keeps "
            "its cost under --shadow-budget); graysteer_shadow_decisions_total counts only those.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.shadow_cost = Gauge(
            "graysteer_shadow_decision_seconds",
            "What one decision by the shadow table costs (measured on synthetic requests when it loads, "
            "then a running mean of the sampled requests); 0 without a shadow table.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self._shadow_children: dict[tuple[str, str, str], MetricWrapperBase] = {}
        self.decision_log_lines = Counter(
            "graysteer_decision_log_lines",
            "Decision log lines, by outcome: written; dropped_queue_full (the writer fell behind: "
            "a slow disk or pipe never slows a decision); dropped_write_error (a full disk, a "
            "closed pipe); truncated (over the line limit: headers cut).",
            ["outcome"],
            registry=registry,
        )
        self.admin_watchers = Gauge(
            "graysteer_admin_watchers",
            "Admin API WatchTable streams open now (each process refuses more than its limit).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.reloads = Counter(
            "graysteer_reloads",
            "Attempts to load the rules file, by result (loaded, unchanged, invalid, missing).",
            ["result"],
            registry=registry,
        )
        self.config_info = Gauge(
            "graysteer_config_info",
            "The rules being served (value 1): version, file version and source.",
            ["version", "file_version", "source"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.config_loaded = Gauge(
            "graysteer_config_loaded_timestamp_seconds",
            "When the table being served was loaded (Unix time).",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.source_connected = Gauge(
            "graysteer_source_connected",
            "1 while the rules source can bring changes (etcd reachable; always 1 for a file), "
            "0 while this replica serves its last table without being able to follow changes.",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.source_connected.set(1)
        self.fleet_leader = Gauge(
            "graysteer_fleet_leader",
            "1 while this replica leads its fleet's rollouts (etcd leader election), else 0.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.fleet_records_refused = Counter(
            "graysteer_fleet_records_refused",
            "Replica records under the fleet's etcd prefix left out because they do not pass "
            "validation (types, finite numbers, sizes).",
            registry=registry,
        )
        self.split_weight = Gauge(
            "graysteer_split_weight",
            "Weight of each cluster in each split rule, as served.",
            ["rule", "cluster"],
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.rollout_step = Gauge(
            "graysteer_rollout_step",
            "The step each rollout is at (0-based).",
            ["rule"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.rollout_state = Gauge(
            "graysteer_rollout_state",
            "1 for the phase each rollout is in (progressing, paused, promoted, aborted, ramping_down).",
            ["rule", "state"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.rollout_canary_weight = Gauge(
            "graysteer_rollout_canary_weight",
            "The canary weight each rollout sets.",
            ["rule"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.rollout_waiting = Gauge(
            "graysteer_rollout_waiting",
            "1 while a rollout's held step waits for `on`: approval (an operator's) or webhook (its gates).",
            ["rule", "on"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.rollout_gate_checks = Counter(
            "graysteer_rollout_gate_checks_total",
            "Webhook gate checks of each rollout, by the move the gate guards (before: promote, step) "
            "and result (passed, refused: a non-2xx answer, timeout, error: no answer).",
            ["rule", "before", "result"],
            registry=registry,
        )
        self.rollout_verdict = Gauge(
            "graysteer_rollout_verdict",
            "1 for the verdict of each rollout's last analysis (healthy, breach, inconclusive, "
            "unavailable: the analysis could not run).",
            ["rule", "verdict"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        # A rollout's limits, labelled with its canary cluster: drawn against
        # graysteer_cluster_error_ratio / _p99_seconds{cluster} (a limit not set: no series).
        self.rollout_max_error_ratio = Gauge(
            "graysteer_rollout_max_error_ratio",
            "The rollout's max_error_rate: the 5xx share of its canary cluster's responses above which "
            "it fails.",
            ["rule", "cluster"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.rollout_max_p99_seconds = Gauge(
            "graysteer_rollout_max_p99_seconds",
            "The rollout's max_p99_ms, in seconds: the canary cluster's p99 above which it fails.",
            ["rule", "cluster"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        # graysteer_cluster_* were graysteer_lane_*{lane} before 0.2 (docs/operations.md)
        self.cluster_error_ratio = Gauge(
            "graysteer_cluster_error_ratio",
            "5xx share of each rollout cluster's responses in the analysis window.",
            ["cluster"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.cluster_p99_seconds = Gauge(
            "graysteer_cluster_p99_seconds",
            "99th percentile response time of each rollout cluster in the analysis window.",
            ["cluster"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.cluster_requests = Gauge(
            "graysteer_cluster_window_requests",
            "Responses of each rollout cluster in the analysis window.",
            ["cluster"],
            registry=registry,
            multiprocess_mode="livemax",
        )
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
        self.envoy_bypassed = Counter(
            "graysteer_envoy_bypassed_requests",
            "Requests Envoy sent on without a decision from "
            "the sidecar (Envoy's failure_mode_allowed: sidecar away or unhealthy, message "
            "timeout, gRPC error), by filter (mode: ext_proc, ext_authz).",
            ["mode"],
            registry=self.registry,
        )
        self.envoy_requests = Counter(
            "graysteer_envoy_requests",
            "Requests on Envoy's connection managers that run the "
            "filter (their downstream_rq_total), by filter: the bypass ratio's denominator.",
            ["mode"],
            registry=self.registry,
        )
        self.envoy_bypass_ratio = Gauge(
            "graysteer_envoy_bypass_ratio",
            "Share of requests Envoy sent on without a decision "
            "between the last two reads of its stats, by filter.",
            ["mode"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.envoy_stats_up = Gauge(
            "graysteer_envoy_stats_up",
            "1 when the last read of Envoy's stats (--envoy-admin) succeeded, 0 when it failed.",
            registry=self.registry,
            multiprocess_mode="livemax",
        )

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
