"""Each cluster's counts from Envoy's Prometheus text, and windows over a history of them."""

from sidecar.stats.clusters import ClusterCounts, ClusterHistory, parse_envoy_stats

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
