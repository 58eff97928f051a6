"""The shipped Prometheus alerting rules only use metrics the sidecar exports, and have the
shape Prometheus' rule files need."""

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from sidecar.ops.metrics import Metrics
from sidecar.stats.bypass import BypassMonitor
from tests.stats.test_bypass import EXT_AUTHZ, EXT_PROC, families

RULES = Path(__file__).parents[2] / "deploy" / "prometheus" / "graysteer-alerts.yaml"
METRIC = re.compile(r"\bgraysteer_[a-z0-9_]+\b")
DURATION = re.compile(r"^\d+[smhd]$")


def load() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    assert set(document) == {"groups"}
    return [rule for group in document["groups"] for rule in group["rules"]]


def exported() -> set[str]:
    """Every sample name a sidecar with --envoy-admin exports once it has read Envoy."""
    registry = CollectorRegistry()
    monitor = BypassMonitor(Metrics(registry), "127.0.0.1:9901", 1.0)
    monitor.observe(1.0, families(EXT_PROC + EXT_AUTHZ))
    return {sample.name for metric in registry.collect() for sample in metric.samples}


@pytest.mark.parametrize("rule", load(), ids=lambda rule: rule["alert"])
def test_every_metric_an_alert_uses_is_exported(rule: dict[str, Any]) -> None:
    used = set(METRIC.findall(rule["expr"]))
    assert used, rule["expr"]
    assert used <= exported(), used - exported()


@pytest.mark.parametrize("rule", load(), ids=lambda rule: rule["alert"])
def test_every_alert_is_complete(rule: dict[str, Any]) -> None:
    assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}
    assert re.fullmatch(r"Graysteer[A-Za-z]+", rule["alert"])
    assert DURATION.match(rule["for"])
    assert rule["labels"]["severity"] in {"warning", "critical"}
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    # ratios divide two counters with the same labels: both must be rated over one range
    ranges = set(re.findall(r"\[(\d+[smh])\]", rule["expr"]))
    assert len(ranges) <= 1, ranges


def test_alert_names_are_unique() -> None:
    names = [rule["alert"] for rule in load()]
    assert len(names) == len(set(names))
