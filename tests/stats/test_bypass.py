"""Requests Envoy sent on without a decision: parsing Envoy's real stats text, increases
between reads (Envoy restarts included), the metrics, and the one poll that feeds them."""

from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from sidecar.ops.metrics import Metrics
from sidecar.stats.bypass import (
    BypassMonitor,
    EnvoyCounts,
    ModeCounts,
    ModeWindow,
    parse_counts,
    window,
)

# Envoy 1.40 `/stats/prometheus` (envoy/envoy.yaml, ext_proc), trimmed: 3 requests failed
# open on message timeouts, so message_timeouts and failure_mode_allowed both say 3. The
# admin interface has a connection manager of its own.
EXT_PROC = """\
# TYPE envoy_http_downstream_rq_total counter
envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix="admin"} 4
envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix="ingress"} 8
# TYPE envoy_http_ext_proc_failure_mode_allowed counter
envoy_http_ext_proc_failure_mode_allowed{envoy_http_conn_manager_prefix="ingress"} 3
# TYPE envoy_http_ext_proc_message_timeouts counter
envoy_http_ext_proc_message_timeouts{envoy_http_conn_manager_prefix="ingress"} 3
# TYPE envoy_http_ext_proc_streams_failed counter
envoy_http_ext_proc_streams_failed{envoy_http_conn_manager_prefix="ingress"} 0
# TYPE envoy_http_ext_proc_streams_started counter
envoy_http_ext_proc_streams_started{envoy_http_conn_manager_prefix="ingress"} 8
# TYPE envoy_cluster_upstream_rq_xx counter
envoy_cluster_upstream_rq_xx{envoy_response_code_class="2",envoy_cluster_name="stable"} 6
# TYPE envoy_server_uptime gauge
envoy_server_uptime{} 12
"""

# ext_authz with the filter's stat_prefix "gs": Envoy charges the same failures to the
# upstream cluster too (cluster.stable.ext_authz.*), which must not count twice.
EXT_AUTHZ = """\
# TYPE envoy_cluster_ext_authz_failure_mode_allowed counter
envoy_cluster_ext_authz_failure_mode_allowed{envoy_cluster_name="stable",envoy_ext_authz_prefix="gs"} 3
# TYPE envoy_http_downstream_rq_total counter
envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix="admin"} 3
envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix="ingress"} 7
# TYPE envoy_http_ext_authz_error counter
envoy_http_ext_authz_error{envoy_ext_authz_prefix="gs",envoy_http_conn_manager_prefix="ingress"} 3
# TYPE envoy_http_ext_authz_failure_mode_allowed counter
envoy_http_ext_authz_failure_mode_allowed{envoy_ext_authz_prefix="gs",envoy_http_conn_manager_prefix="ingress"} 3
# TYPE envoy_http_ext_authz_ok counter
envoy_http_ext_authz_ok{envoy_ext_authz_prefix="gs",envoy_http_conn_manager_prefix="ingress"} 4
"""  # noqa: E501 (Envoy's lines as they are)

# ext_proc with the filter's own stat_prefix "gs" (http.ingress.ext_proc.gs.*): no label for it.
EXT_PROC_PREFIXED = """\
# TYPE envoy_http_ext_proc_gs_failure_mode_allowed counter
envoy_http_ext_proc_gs_failure_mode_allowed{envoy_http_conn_manager_prefix="ingress"} 2
# TYPE envoy_http_downstream_rq_total counter
envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix="ingress"} 5
"""


def families(text: str) -> list[Any]:
    return list(text_string_to_metric_families(text))


def ext_proc(bypassed: float, requests: float, uptime: float | None = 100.0) -> EnvoyCounts:
    """An ext_proc read with one connection manager, `ingress`."""
    series = (
        "envoy_http_ext_proc_failure_mode_allowed_total",
        (("envoy_http_conn_manager_prefix", "ingress"),),
    )
    return EnvoyCounts({"ext_proc": ModeCounts({series: bypassed}, {"ingress": requests})}, uptime)


def total(counts: EnvoyCounts, mode: str) -> tuple[float, float]:
    part = counts.modes[mode]
    return sum(part.bypassed.values()), sum(part.requests.values())


def test_ext_proc_bypass_is_failure_mode_allowed_over_the_ingress_requests() -> None:
    counts = parse_counts(families(EXT_PROC))
    assert set(counts.modes) == {"ext_proc"}
    # message_timeouts is a cause of the same 3 requests, not 3 more
    assert total(counts, "ext_proc") == (3, 8)  # not the admin interface's requests
    assert counts.uptime == 12


def test_ext_authz_counts_once_per_connection_manager_not_per_cluster() -> None:
    counts = parse_counts(families(EXT_AUTHZ))
    assert set(counts.modes) == {"ext_authz"}
    assert total(counts, "ext_authz") == (3, 7)
    assert counts.uptime is None


def test_a_filter_stat_prefix_inside_the_name_is_understood() -> None:
    assert total(parse_counts(families(EXT_PROC_PREFIXED)), "ext_proc") == (2, 5)


def test_no_filter_no_modes() -> None:
    text = (
        "# TYPE envoy_http_downstream_rq_total counter\n"
        'envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix="ingress"} 7\n'
    )
    assert parse_counts(families(text)).modes == {}


@pytest.mark.parametrize(
    ("old", "new", "expected", "restarted"),
    [
        pytest.param(None, ext_proc(5, 50), (0, 0), False, id="first read: the baseline"),
        pytest.param(ext_proc(5, 50), ext_proc(9, 70), (4, 20), False, id="increase"),
        pytest.param(ext_proc(5, 50), ext_proc(5, 50), (0, 0), False, id="idle"),
        pytest.param(
            ext_proc(5, 50, 100),
            ext_proc(2, 30, 3),
            (2, 30),
            True,
            id="Envoy restarted: uptime went down, all since the restart",
        ),
        pytest.param(
            ext_proc(5, 50, 100),
            ext_proc(60, 400, 4),
            (60, 400),
            True,
            id="restarted and already past the old values",
        ),
        pytest.param(
            ext_proc(5, 50, None),
            ext_proc(2, 60, None),
            (2, 10),
            False,
            id="no uptime: a counter that went down restarted from 0",
        ),
        pytest.param(
            EnvoyCounts({}, 10), ext_proc(3, 9), (3, 9), False, id="a filter that appears counts in full"
        ),
    ],
)
def test_window(
    old: EnvoyCounts | None, new: EnvoyCounts, expected: tuple[float, float], restarted: bool
) -> None:
    result = window(old, new)
    part = result.modes["ext_proc"]
    assert (part.bypassed, part.requests) == expected
    assert result.restarted == restarted


@pytest.mark.parametrize(
    ("bypassed", "requests", "ratio"),
    [
        (0, 0, 0.0),
        (0, 10, 0.0),
        (5, 10, 0.5),
        (10, 10, 1.0),
        (4, 3, 1.0),  # counted on arrival in one window, bypassed in the next: capped at 1
    ],
)
def test_ratio(bypassed: float, requests: float, ratio: float) -> None:
    assert ModeWindow(bypassed, requests).ratio == ratio


def read(text: str) -> list[Any]:
    return families(text)


def envoy_text(bypassed: int, requests: int, uptime: int) -> str:
    """EXT_PROC with other values."""
    prefix = '{envoy_http_conn_manager_prefix="ingress"}'
    return (
        "\n".join(
            f"envoy_http_ext_proc_failure_mode_allowed{prefix} {bypassed}"
            if line.startswith("envoy_http_ext_proc_failure_mode_allowed{")
            else f"envoy_http_downstream_rq_total{prefix} {requests}"
            if line.startswith(f"envoy_http_downstream_rq_total{prefix}")
            else f"envoy_server_uptime{{}} {uptime}"
            if line.startswith("envoy_server_uptime{")
            else line
            for line in EXT_PROC.splitlines()
        )
        + "\n"
    )


def sample(registry: CollectorRegistry, name: str, mode: str | None = "ext_proc") -> float | None:
    return registry.get_sample_value(name, {"mode": mode} if mode else {})


def test_monitor_exports_increases_ratio_and_readability() -> None:
    registry = CollectorRegistry()
    monitor = BypassMonitor(Metrics(registry), "127.0.0.1:9901", 1.0)
    assert sample(registry, "graysteer_envoy_stats_up", None) == 0  # not read yet
    assert monitor.readiness_ratio() is None

    monitor.observe(1.0, read(envoy_text(3, 8, 10)))  # baseline: history is not counted
    assert sample(registry, "graysteer_envoy_bypassed_requests_total") == 0
    assert sample(registry, "graysteer_envoy_stats_up", None) == 1

    monitor.observe(2.0, read(envoy_text(8, 18, 11)))
    assert sample(registry, "graysteer_envoy_bypassed_requests_total") == 5
    assert sample(registry, "graysteer_envoy_requests_total") == 10
    assert sample(registry, "graysteer_envoy_bypass_ratio") == 0.5
    assert monitor.readiness_ratio() == 0.5

    monitor.observe(3.0, None, "connection refused")  # Envoy restarting
    assert sample(registry, "graysteer_envoy_stats_up", None) == 0
    assert monitor.readiness_ratio() is None  # unknown: never fails readiness
    assert sample(registry, "graysteer_envoy_bypassed_requests_total") == 5

    monitor.observe(4.0, read(envoy_text(2, 4, 1)))  # the new Envoy's counters, from zero
    assert sample(registry, "graysteer_envoy_bypassed_requests_total") == 7
    assert sample(registry, "graysteer_envoy_requests_total") == 14
    assert sample(registry, "graysteer_envoy_stats_up", None) == 1

    report = monitor.report()
    assert report["stats_readable"] and report["last_read"] == 4.0
    assert report["modes"] == [
        {
            "mode": "ext_proc",
            "bypassed_requests": 7,
            "requests": 14,
            "window_bypassed": 2,
            "window_requests": 4,
            "window_ratio": 0.5,
        }
    ]


def test_without_envoy_admin_there_are_no_envoy_series() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    assert not [m for m in registry.collect() if m.name.startswith("graysteer_envoy")]


def test_the_mode_label_is_a_closed_set() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.watch_envoy()
    with pytest.raises(ValueError, match="unknown mode"):
        metrics.count_bypass("ingress", 1, 1, 1.0)
