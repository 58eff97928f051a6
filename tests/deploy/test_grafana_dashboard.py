"""deploy/grafana/graysteer.json is built from what the sidecar exports: every PromQL query
parses (Prometheus' grammar, PyPI promql-parser), and every metric it names, with every
label it matches on, is on the /metrics of a sidecar running against the real Envoy with a
rollout under way: a renamed metric or label fails here, not on a dashboard.

Series appear when what they count happens: the test makes it happen (traffic through
Envoy, a rollout stepping forward on Envoy's statistics, the bypass count read from them).
One series only counts failures the sidecar cannot be made to have from outside:
graysteer_decision_errors_total (a request that could not be decided, a bug or a malformed
message). For it the running sidecar must declare the family (# TYPE on /metrics); every
other name must have a sample."""

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
from prometheus_client.parser import text_string_to_metric_families

from sidecar.dev.load import BackgroundLoad
from sidecar.dev.processes import wait_for
from tests.e2e.test_live_terminal import rollout_stack

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "graysteer.json"
# Grafana's own variables, and the dashboard's, as Grafana would put them in a query.
VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "30s",
    "$__range": "1h",
    "$rule": ".*",
    "$datasource": "",
}
ONLY_ON_FAILURE = {"graysteer_decision_errors_total"}
LABEL_VALUES = re.compile(r"^label_values\((\w+),\s*(\w+)\)$")


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, Grafana's variables put in."""
    found = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{panel['title']}: a variable the test does not know: {target['expr']}"
            found.append((panel["title"], expr))
    return found


def selectors(node: Any) -> Iterator[tuple[str, list[str]]]:
    """(metric name, label names matched) of every selector in a parsed expression."""
    kind = type(node).__name__
    if kind == "VectorSelector":
        yield node.name, [m.name for m in node.matchers.matchers if m.name != "__name__"]
    elif kind == "MatrixSelector":
        yield from selectors(node.vector_selector)
    elif kind == "BinaryExpr":
        yield from selectors(node.lhs)
        yield from selectors(node.rhs)
    elif kind == "Call":
        for argument in node.args:
            yield from selectors(argument)
    elif kind in ("AggregateExpr", "ParenExpr", "UnaryExpr", "SubqueryExpr"):
        yield from selectors(node.expr)
    else:
        assert kind in ("NumberLiteral", "StringLiteral"), f"an expression the test does not walk: {kind}"


def dashboard_names() -> dict[str, set[str]]:
    """Every metric the dashboard reads, with the labels it matches on or asks values of."""
    dashboard = json.loads(DASHBOARD.read_text())
    names: dict[str, set[str]] = {}
    for title, expr in queries(dashboard):
        try:
            parsed = promql_parser.parse(expr)
        except Exception as error:
            raise AssertionError(f"{title}: {expr!r} does not parse: {error}") from None
        for name, labels in selectors(parsed):
            assert name, f"{title}: a selector without a metric name: {expr}"
            names.setdefault(name, set()).update(labels)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = LABEL_VALUES.match(variable["query"]["query"])
            assert match, f"variable {variable['name']}: only label_values(METRIC, LABEL) is checked"
            names.setdefault(match.group(1), set()).add(match.group(2))
    return names


def test_every_query_parses_and_names_only_the_sidecars_metrics() -> None:
    names = dashboard_names()
    assert all(name.startswith("graysteer_") for name in names), sorted(names)
    # what the issue asks the dashboard to show
    for wanted in (
        "graysteer_decisions_total",
        "graysteer_decision_duration_seconds_bucket",
        "graysteer_envoy_bypassed_requests_total",
        "graysteer_rollout_step",
        "graysteer_rollout_canary_weight",
        "graysteer_rollout_waiting",
        "graysteer_cluster_error_ratio",
        "graysteer_rollout_max_error_ratio",
        "graysteer_reloads_total",
        "graysteer_fleet_leader",
    ):
        assert wanted in names, wanted


def exported(text: str) -> tuple[dict[str, set[str]], set[str]]:
    """The sample names on /metrics with their label names, and every name a declared
    family would give its samples."""
    samples: dict[str, set[str]] = {}
    declared = set()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"]}
    for family in text_string_to_metric_families(text):
        declared.update(family.name + suffix for suffix in suffixes.get(family.type, [""]))
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples, declared


def test_every_metric_and_label_it_reads_is_exported_by_a_running_sidecar(tmp_path: Path) -> None:
    names = dashboard_names()
    with rollout_stack(tmp_path) as stack:
        assert stack.sidecar is not None
        load = BackgroundLoad(stack.port, {}, threads=2, vary_user=True)
        missing: list[str] = []

        def everything_shown() -> bool:
            assert stack.sidecar is not None
            samples, declared = exported(stack.sidecar.http_get("/metrics")[1])
            missing[:] = [
                f"{name}{sorted(labels - samples.get(name, set()))}"
                for name, labels in sorted(names.items())
                if (name not in samples and not (name in ONLY_ON_FAILURE and name in declared))
                or (name in samples and not labels <= samples[name])
            ]
            return not missing

        try:
            wait_for(everything_shown, 30, "every metric the dashboard reads")
        except TimeoutError:
            raise AssertionError(f"not exported by the running sidecar: {missing}") from None
        finally:
            load.stop()
