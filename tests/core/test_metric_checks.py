"""Rollout metric checks, the pure part: placeholders filled so that no value changes what a
query means (checked with Prometheus' own grammar), queries refused at load with the field
named, values judged against each kind of threshold, and how the results change a verdict
(a dry-run check never does)."""

import promql_parser
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.compile import RulesError, compile_table
from sidecar.core.metric_checks import (
    BREACH,
    INCONCLUSIVE,
    NO_DATA,
    PASS,
    TIMEOUT,
    Answer,
    MetricCheck,
    MetricResult,
    fill,
    judge_metric,
    promql_duration,
    query_problem,
)
from sidecar.core.rollout import HEALTHY, ClusterWindow, Verdict, with_metrics
from sidecar.core.rollout import INCONCLUSIVE as VERDICT_INCONCLUSIVE

HOSTILE = ['"', "\\", '"}', 'x"} or vector(1) #', 'a\\"}) or up{b="', "\n", "`'", "\x00\x7f\u2028"]


def matchers(query: str) -> list[tuple[str, str, str]]:
    found: list[tuple[str, str, str]] = []

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.extend((m.name, str(m.op), m.value) for m in node.matchers.matchers)

    promql_parser.walk(promql_parser.parse(query), visit)
    return found


@pytest.mark.parametrize("value", HOSTILE)
def test_a_hostile_cluster_name_stays_one_label_value(value: str) -> None:
    template = 'sum(rate(x{a="{lane}",b!="{baseline}"}[{window}])) / sum(rate(x{a="{lane}"}[{window}]))'
    query = fill(template, value, value + "b", 30)
    assert matchers(query) == [("a", "MatchOp.Equal", value), ("b", "MatchOp.NotEqual", value + "b")] + [
        ("a", "MatchOp.Equal", value)
    ]
    assert "[30s]" in query


@given(st.text(st.characters(exclude_categories=["Cs"]), max_size=40))
def test_any_value_reads_back_exactly(value: str) -> None:
    assert matchers(fill('up{cluster="{lane}"}', value, "", 1)) == [("cluster", "MatchOp.Equal", value)]


def test_a_window_is_a_promql_duration() -> None:
    assert (promql_duration(30), promql_duration(2.5), promql_duration(120)) == ("30s", "2500ms", "120s")


@pytest.mark.parametrize(
    "query",
    [
        'sum(rate(checkout_total{version="{lane}",outcome="failure"}[{window}]))',
        'x{a="{lane}"} / on() x{a="{baseline}"}',
        'x{a="prefix-{lane}"}',
        "sum(up)",
    ],
)
def test_queries_that_run(query: str) -> None:
    assert query_problem(query) is None


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("sum(rate(x[{window}])", "is not PromQL"),
        ('x{a=~"{lane}"}', "go inside the double-quoted value"),
        ("x{a='{lane}'}", "go inside the double-quoted value"),
        ('label_replace(up, "a", "{lane}", "b", "c")', "go inside the double-quoted value"),
        ("x{a=`{lane}`}", "go inside the double-quoted value"),
    ],
)
def test_queries_refused_with_the_reason(query: str, said: str) -> None:
    problem = query_problem(query)
    assert problem is not None and said in problem


def rules(metric: str) -> str:
    return f"""
version: 1
clusters: [stable, canary]
default: stable
rules:
  - name: ramp
    split:
      key: [header:x-user-id]
      to: [{{cluster: stable, weight: 100}}, {{cluster: canary, weight: 0}}]
    rollout:
      canary: canary
      steps: [{{weight: 50, hold: 1s}}, {{weight: 100}}]
      analysis:
        window: 30s
        min_requests: 10
        max_error_rate: 0.1
        metrics: [{metric}]
"""


@pytest.mark.parametrize(
    ("metric", "field", "said"),
    [
        ("{name: m, query: 'sum(x'}", "metrics[0].query", "is not PromQL"),
        ("{name: m, query: 'x{a=~\"{lane}\"}', max: 1}", "metrics[0].query", "double-quoted"),
        ("{name: m, query: 'sum(x)'}", "metrics[0]", "needs a threshold"),
        ("{name: m, query: 'sum(x)', min: 2, max: 1}", "metrics[0].min", "above max"),
        ("{name: m, query: 'sum(x)', max: 1, timeout: 2m}", "metrics[0].timeout", "at most 60s"),
        (
            "{name: m, query: 'sum(x)', max: 1}, {name: m, query: 'sum(y)', max: 1}",
            "metrics[1].name",
            "twice",
        ),
    ],
)
def test_a_bad_metric_is_refused_at_load_with_the_rule_and_field(metric: str, field: str, said: str) -> None:
    import yaml

    with pytest.raises(RulesError) as refused:
        compile_table(yaml.safe_load(rules(metric)), "v1", "rules.yaml")
    text = str(refused.value)
    assert "ramp" in text and field in text and said in text, text


def test_a_metric_compiles_with_its_defaults() -> None:
    import yaml

    table = compile_table(yaml.safe_load(rules("{name: m, query: 'sum(x)', max: 1}")), "v1", "rules.yaml")
    check = table.rollouts["ramp"].analysis.metrics[0]
    assert (check.name, check.max, check.dry_run, check.timeout) == ("m", 1, False, 5.0)


CHECK = MetricCheck("m", "q", max=0.1)
MIN_VS, MAX_VS = MetricCheck("m", "q", min_vs_baseline=0.9), MetricCheck("m", "q", max_vs_baseline=2)


@pytest.mark.parametrize(
    ("check", "canary", "baseline", "outcome", "reason"),
    [
        (CHECK, Answer(0.05), None, PASS, "metric m 0.05 within max 0.1"),
        (CHECK, Answer(0.5), None, BREACH, "metric m 0.5 > max 0.1"),
        (MetricCheck("m", "q", min=0.9), Answer(0.5), None, BREACH, "metric m 0.5 < min 0.9"),
        (MAX_VS, Answer(0.5), Answer(0.2), BREACH, "> 2 x baseline 0.2"),
        (MIN_VS, Answer(0.5), Answer(1.0), BREACH, "< 0.9 x baseline 1"),
        (MIN_VS, Answer(0.95), Answer(1.0), PASS, "within min 0.9x baseline"),
        (CHECK, Answer(None, TIMEOUT, "no answer within 5s"), None, INCONCLUSIVE, "m: no answer within 5s"),
        (MAX_VS, Answer(0.5), Answer(None, NO_DATA, "none"), INCONCLUSIVE, "for the baseline: none"),
    ],
)  # fmt: skip
def test_each_threshold(
    check: MetricCheck, canary: Answer, baseline: Answer | None, outcome: str, reason: str
) -> None:
    result = judge_metric(check, canary, baseline)
    assert result.outcome == outcome and reason in result.reason, result


HEALTHY_VERDICT = Verdict(HEALTHY, "within every threshold", ClusterWindow(100), ClusterWindow(100))


def result(outcome: str, dry_run: bool = False) -> MetricResult:
    return MetricResult(MetricCheck("m", "q", max=1, dry_run=dry_run), outcome, f"metric m {outcome}", 1.0)


def test_a_breach_of_a_check_that_acts_is_a_breach_and_a_failed_query_is_never_healthy() -> None:
    assert with_metrics(HEALTHY_VERDICT, (result(BREACH),)).outcome == "breach"
    waiting = with_metrics(HEALTHY_VERDICT, (result(INCONCLUSIVE),))
    assert (waiting.outcome, waiting.reason) == (VERDICT_INCONCLUSIVE, "metric m inconclusive")
    assert with_metrics(HEALTHY_VERDICT, (result(PASS),)).outcome == HEALTHY


@pytest.mark.parametrize("outcome", [BREACH, INCONCLUSIVE])
def test_a_dry_run_check_is_carried_along_and_never_acts(outcome: str) -> None:
    verdict = with_metrics(HEALTHY_VERDICT, (result(outcome, dry_run=True),))
    assert verdict.outcome == HEALTHY
    assert verdict.metrics[0].outcome == outcome
    assert verdict.numbers()["metric:m"] == 1.0


def test_the_prometheus_example_loads() -> None:
    import yaml

    from tests.cli.test_cli import EXAMPLE

    path = EXAMPLE.replace("rules.yaml", "rollout-prometheus.yaml")
    with open(path) as handle:
        table = compile_table(yaml.safe_load(handle), "v1", path)
    checks = table.rollouts["checkout-ramp"].analysis.metrics
    assert [c.name for c in checks] == [
        "request-success-rate",
        "checkout-failure-rate",
        "checkout-latency-p95",
    ]
    assert checks[2].dry_run and checks[1].compares
