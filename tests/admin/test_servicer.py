"""`graysteer status` describes every kind of rule the rules file may hold."""

import shutil
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from sidecar.admin.client import as_dict, format_status
from sidecar.admin.servicer import table_status
from sidecar.ops.metrics import Metrics
from sidecar.sources.file import RulesFile
from sidecar.sources.state_file import StateFile, default_state_path
from sidecar.stats.clusters import ClusterCounts
from sidecar.stats.envoy import EnvoyStats
from sidecar.table.reload import Reloader

REPO = Path(__file__).parents[2]


def test_status_describes_route_split_and_deny_rules(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    shutil.copy(REPO / "examples" / "rules.yaml", rules)  # route, split and deny rules
    reloader = Reloader(RulesFile(rules), Metrics(CollectorRegistry()), StateFile(default_state_path(rules)))
    status = as_dict(table_status(reloader))
    actions = {rule["name"]: rule["action"] for rule in status["rules"]}
    assert actions == {
        "block-admin": "deny",
        "force-canary": "route",
        "beta-tier": "route",
        "checkout-ramp": "split",
    }
    text = format_status(status)
    assert "block-admin              deny 403: the admin API is internal" in text
    assert "checkout-ramp            split stable=90 canary=10" in text


def test_status_carries_each_clusters_live_traffic_from_envoys_statistics(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    shutil.copy(REPO / "examples" / "rules.yaml", rules)
    reloader = Reloader(RulesFile(rules), Metrics(CollectorRegistry()), StateFile(default_state_path(rules)))
    assert as_dict(table_status(reloader))["traffic"]["watching"] is False  # never a made-up 0
    stats = EnvoyStats(("127.0.0.1", 9901), keep_seconds=60)
    bounds = (100.0, float("inf"))
    now = time.time()
    stats.record(now - 2, {"canary": ClusterCounts(0, 0, bounds, (0, 0))})
    stats.record(now - 1, {"canary": ClusterCounts(30, 3, bounds, (30, 30))})
    traffic = as_dict(table_status(reloader, traffic=stats))["traffic"]
    assert (traffic["watching"], traffic["source"], traffic["problem"]) == (
        True,
        "Envoy at 127.0.0.1:9901",
        "",
    )
    assert traffic["clusters"] == [{"cluster": "canary", "requests_per_second": 30.0, "error_ratio": 0.1}]
