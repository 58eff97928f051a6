"""Each cluster's counts from Envoy's Prometheus text, and windows over a history of them."""

from sidecar.stats.clusters import ClusterCounts, ClusterHistory, ClusterRate, add_rates, parse_envoy_stats

ENVOY_SAMPLE = """# TYPE envoy_cluster_upstream_rq_xx counter
envoy_cluster_upstream_rq_xx{envoy_response_code_class="2",envoy_cluster_name="canary"} 90
envoy_cluster_upstream_rq_xx{envoy_response_code_class="5",envoy_cluster_name="canary"} 10
envoy_cluster_upstream_rq_xx{envoy_response_code_class="2",envoy_cluster_name="stable"} 500
# TYPE envoy_cluster_upstream_rq_time histogram
envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="canary",le="100"} 80
envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="canary",le="1000"} 100
envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="canary",le="+Inf"} 100
envoy_cluster_upstream_rq_time_sum{envoy_cluster_name="canary"} 5000
envoy_cluster_upstream_rq_time_count{envoy_cluster_name="canary"} 100
"""


def test_parse_envoy_prometheus_stats() -> None:
    counts = parse_envoy_stats(ENVOY_SAMPLE)
    assert (counts["canary"].requests, counts["canary"].errors) == (100, 10)
    assert counts["canary"].bounds == (100.0, 1000.0, float("inf"))
    assert counts["stable"].requests == 500


def test_a_window_is_the_increase_since_the_oldest_snapshot_inside_it() -> None:
    history = ClusterHistory(keep_seconds=60)
    bounds = (100.0, float("inf"))
    history.record(100.0, {"canary": ClusterCounts(10, 1, bounds, (10, 10))})
    history.record(110.0, {"canary": ClusterCounts(30, 2, bounds, (25, 30))})
    window = history.cluster_window("canary", 30, 110.0)
    assert (window.requests, window.errors) == (20, 1)
    assert history.cluster_window("canary", 30, 200.0).requests == 0  # nothing lies in the window


def test_a_rate_is_the_increase_over_the_real_distance_between_snapshots() -> None:
    history = ClusterHistory(keep_seconds=60)
    bounds = (100.0, float("inf"))
    history.record(100.0, {"canary": ClusterCounts(10, 0, bounds, (10, 10))})
    history.record(101.0, {"canary": ClusterCounts(20, 0, bounds, (20, 20))})
    history.record(
        103.0,
        {"canary": ClusterCounts(60, 4, bounds, (60, 60)), "stable": ClusterCounts(5, 0, bounds, (5, 5))},
    )
    # within 5 s: from the snapshot at 100 to the one at 103, 50 responses in 3 s
    rates = history.cluster_rates(5, 103.5)
    assert rates["canary"].requests_per_second == 50 / 3
    assert rates["canary"].error_ratio == 4 / 50
    # a cluster that appears in the window counts from zero, as the analysis windows do
    assert rates["stable"].requests_per_second == 5 / 3
    # within 2.5 s: only from 101 to 103
    assert history.cluster_rates(2.5, 103.5)["canary"].requests_per_second == 40 / 2
    assert history.cluster_rates(1, 103.5) == {}  # one snapshot: no rate
    assert history.cluster_rates(5, 200.0) == {}  # reading stopped: no rate, never the last one


def test_rates_add_up_weighting_the_error_ratio_by_requests() -> None:
    total: dict[str, ClusterRate] = {}
    add_rates(total, {"canary": ClusterRate(10.0, 0.5)})
    add_rates(total, {"canary": ClusterRate(30.0, 0.0), "stable": ClusterRate(1.0, 0.0)})
    assert total == {"canary": ClusterRate(40.0, 5 / 40), "stable": ClusterRate(1.0, 0.0)}
