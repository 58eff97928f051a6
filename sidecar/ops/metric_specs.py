"""What every metric of the sidecar is: its name, help text, labels and kind, declared once
(sidecar.ops.metrics and sidecar.ops.request_metrics build them into a registry). README.md
lists each one; a gauge says how the values of `serve --workers N`'s workers combine."""

from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge

# How the values of `serve --workers N`'s workers combine (prometheus_client's multiprocess_mode)
Combine = Literal["livemax", "livemin", "livesum", "livemostrecent"]


@dataclass(frozen=True)
class Spec:
    name: str
    documentation: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # a histogram's upper bounds (without +Inf); () for a counter
    gauge: bool = False  # a value that goes up and down, not a counter
    combine: Combine = "livemax"  # a gauge's


def counter(spec: Spec, registry: CollectorRegistry) -> Counter:
    assert not spec.gauge and not spec.buckets, spec.name
    return Counter(spec.name, spec.documentation, spec.labels, registry=registry)


def gauge(spec: Spec, registry: CollectorRegistry) -> Gauge:
    assert spec.gauge, spec.name
    return Gauge(
        spec.name, spec.documentation, spec.labels, registry=registry, multiprocess_mode=spec.combine
    )


ISSUED_KEYS = Spec(
    "graysteer_issued_keys",
    "Visitors without a key given a new one and its cookie (`when_key_missing: {assign: ...}`), "
    "by deciding rule and the cluster the new key was bucketed to (Envoy's Lua included, from "
    "its access log).",
    ("rule", "cluster"),
)
DECISION_ERRORS = Spec(
    "graysteer_decision_errors",
    "Requests that could not be decided and went to the default cluster, by reason.",
    ("reason",),
)
SHADOW_DECISIONS = Spec(
    "graysteer_shadow_decisions",
    "Requests decided by the shadow table too (serve --shadow-config, or a fleet's rules.next), "
    "by the live rule, the live cluster and the shadow table's (a cluster, or deny:STATUS for a "
    "denied request), and whether they differ (cluster != shadow_cluster).",
    ("rule", "cluster", "shadow_cluster", "differs"),
)
SHADOW_INFO = Spec(
    "graysteer_shadow_info",
    "The shadow table decided beside the live one (value 1), by version; no series without one.",
    ("version",),
    gauge=True,
)
SHADOW_SAMPLE = Spec(
    "graysteer_shadow_sample_ratio",
    "The share of requests the shadow table decides too (serve --shadow-sample, else what keeps "
    "its cost under --shadow-budget); graysteer_shadow_decisions_total counts only those.",
    gauge=True,
)
SHADOW_COST = Spec(
    "graysteer_shadow_decision_seconds",
    "What one decision by the shadow table costs (measured on synthetic requests when it loads, "
    "then a running mean of the sampled requests); 0 without a shadow table.",
    gauge=True,
)
DECISION_LOG_LINES = Spec(
    "graysteer_decision_log_lines",
    "Decision log lines, by outcome: written; dropped_queue_full (the writer fell behind: "
    "a slow disk or pipe never slows a decision); dropped_write_error (a full disk, a "
    "closed pipe); truncated (over the line limit: headers cut).",
    ("outcome",),
)
ADMIN_WATCHERS = Spec(
    "graysteer_admin_watchers",
    "Admin API WatchTable streams open now (each process refuses more than its limit).",
    gauge=True,
    combine="livesum",
)
RELOADS = Spec(
    "graysteer_reloads",
    "Attempts to load the rules file, by result (loaded, unchanged, invalid, missing).",
    ("result",),
)
CONFIG_INFO = Spec(
    "graysteer_config_info",
    "The rules being served (value 1): version, file version and source.",
    ("version", "file_version", "source"),
    gauge=True,
)
CONFIG_LOADED = Spec(
    "graysteer_config_loaded_timestamp_seconds",
    "When the table being served was loaded (Unix time).",
    gauge=True,
)
SOURCE_CONNECTED = Spec(
    "graysteer_source_connected",
    "1 while the rules source can bring changes (etcd reachable; always 1 for a file), "
    "0 while this replica serves its last table without being able to follow changes.",
    gauge=True,
    combine="livemin",
)
FLEET_LEADER = Spec(
    "graysteer_fleet_leader",
    "1 while this replica leads its fleet's rollouts (etcd leader election), else 0.",
    gauge=True,
)
FLEET_RECORDS_REFUSED = Spec(
    "graysteer_fleet_records_refused",
    "Replica records under the fleet's etcd prefix left out because they do not pass "
    "validation (types, finite numbers, sizes).",
)
ETCD_CHANGES = Spec(
    "graysteer_etcd_changes",
    "Changes to the fleet's keys in etcd (rules, rules.next, state) seen by this replica, by "
    "key: one per etcd revision, however the connection or the member changed.",
    ("key",),
)
ETCD_CHANGES_REPEATED = Spec(
    "graysteer_etcd_changes_repeated",
    "Changes etcd delivered again (a revision this replica had seen, after a watch was "
    "resumed): ignored, counted to show that none is applied twice.",
    ("key",),
)
ETCD_FAILOVERS = Spec(
    "graysteer_etcd_failovers",
    "Times this replica left an etcd member that failed (down, refusing, not answering) for "
    "another member of the cluster.",
)
SPLIT_WEIGHT = Spec(
    "graysteer_split_weight",
    "Weight of each cluster in each split rule, as served.",
    ("rule", "cluster"),
    gauge=True,
    combine="livemostrecent",
)
ROLLOUT_STEP = Spec(
    "graysteer_rollout_step",
    "The step each rollout is at (0-based).",
    ("rule",),
    gauge=True,
)
ROLLOUT_STATE = Spec(
    "graysteer_rollout_state",
    "1 for the phase each rollout is in (progressing, paused, promoted, aborted, ramping_down).",
    ("rule", "state"),
    gauge=True,
)
ROLLOUT_CANARY_WEIGHT = Spec(
    "graysteer_rollout_canary_weight",
    "The canary weight each rollout sets.",
    ("rule",),
    gauge=True,
)
ROLLOUT_WAITING = Spec(
    "graysteer_rollout_waiting",
    "1 while a rollout's held step waits for `on`: approval (an operator's) or webhook (its gates).",
    ("rule", "on"),
    gauge=True,
)
ROLLOUT_GATE_CHECKS = Spec(
    "graysteer_rollout_gate_checks_total",
    "Webhook gate checks of each rollout, by the move the gate guards (before: promote, step) "
    "and result (passed, refused: a non-2xx answer, timeout, error: no answer).",
    ("rule", "before", "result"),
)
ROLLOUT_VERDICT = Spec(
    "graysteer_rollout_verdict",
    "1 for the verdict of each rollout's last analysis (healthy, breach, inconclusive, "
    "unavailable: the analysis could not run).",
    ("rule", "verdict"),
    gauge=True,
)
ROLLOUT_METRIC_VALUE = Spec(
    "graysteer_rollout_metric_value",
    "The canary's value of each PromQL metric check of each rollout (analysis.metrics), as last "
    "queried (no series while the query gives no value).",
    ("rule", "metric"),
    gauge=True,
)
ROLLOUT_METRIC_CHECKS = Spec(
    "graysteer_rollout_metric_checks_total",
    "PromQL metric checks of each rollout, dry-run ones included, by result: pass, breach, or why "
    "the check was inconclusive (no_data: no single finite sample, timeout, error: the query failed).",
    ("rule", "metric", "result"),
)
# A rollout's limits, labelled with its canary cluster: drawn against
# graysteer_cluster_error_ratio / _p99_seconds{cluster} (a limit not set: no series).
ROLLOUT_MAX_ERROR_RATIO = Spec(
    "graysteer_rollout_max_error_ratio",
    "The rollout's max_error_rate: the 5xx share of its canary cluster's responses above which it fails.",
    ("rule", "cluster"),
    gauge=True,
)
ROLLOUT_MAX_P99_SECONDS = Spec(
    "graysteer_rollout_max_p99_seconds",
    "The rollout's max_p99_ms, in seconds: the canary cluster's p99 above which it fails.",
    ("rule", "cluster"),
    gauge=True,
)
# graysteer_cluster_* were graysteer_lane_*{lane} before 0.2 (docs/operations.md)
CLUSTER_ERROR_RATIO = Spec(
    "graysteer_cluster_error_ratio",
    "5xx share of each rollout cluster's responses in the analysis window.",
    ("cluster",),
    gauge=True,
)
CLUSTER_P99_SECONDS = Spec(
    "graysteer_cluster_p99_seconds",
    "99th percentile response time of each rollout cluster in the analysis window.",
    ("cluster",),
    gauge=True,
)
CLUSTER_REQUESTS = Spec(
    "graysteer_cluster_window_requests",
    "Responses of each rollout cluster in the analysis window.",
    ("cluster",),
    gauge=True,
)
# Read from Envoy's stats (`serve --envoy-admin`): Metrics.watch_envoy() creates these.
ENVOY_BYPASSED = Spec(
    "graysteer_envoy_bypassed_requests",
    "Requests Envoy sent on without a decision from "
    "the sidecar (Envoy's failure_mode_allowed: sidecar away or unhealthy, message "
    "timeout, gRPC error), by filter (mode: ext_proc, ext_authz).",
    ("mode",),
)
ENVOY_REQUESTS = Spec(
    "graysteer_envoy_requests",
    "Requests on Envoy's connection managers that run the "
    "filter (their downstream_rq_total), by filter: the bypass ratio's denominator.",
    ("mode",),
)
ENVOY_BYPASS_RATIO = Spec(
    "graysteer_envoy_bypass_ratio",
    "Share of requests Envoy sent on without a decision between the last two reads of its stats, by filter.",
    ("mode",),
    gauge=True,
)
ENVOY_STATS_UP = Spec(
    "graysteer_envoy_stats_up",
    "1 when the last read of Envoy's stats (--envoy-admin) succeeded, 0 when it failed.",
    gauge=True,
)
ECDS_UPDATES = Spec(
    "graysteer_ecds_updates",
    "The table as Lua served to Envoy over ECDS (serve --xds-listen), by result: sent, acked, "
    "rejected (Envoy refused it and keeps its last good one), generation_failed (the last good "
    "filter is kept).",
    ("result",),
)
ENVOY_DECISIONS_READ = Spec(
    "graysteer_access_log_entries",
    "Access log entries of decisions Envoy took itself (envoy_decides), read from its gRPC access "
    "log stream, by result: counted (in graysteer_decisions_total), unknown (a rule or cluster the "
    "served table does not have: not counted), lua_error (the Lua failed on the request, which the "
    "fast path then decided and counted), malformed (metadata that is not Envoy's: not counted; "
    "or steering events the Lua never files: none counted, the decision is), "
    "refused_inputs (with a decision log or shadow table: the request's inputs were not as the "
    "Lua writes them, so neither logged nor compared; the decision is counted).",
    ("result",),
)
