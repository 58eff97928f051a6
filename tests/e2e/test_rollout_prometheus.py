"""Rollout metric checks against a real Prometheus (Debian's `prometheus`, installed through
ensure_tool) scraping the sample backends' business metric (`checkout_total`) and Envoy's
own stats every second, through the real Envoy: a canary whose checkouts fail inside 200
answers is rolled back while its HTTP error rate is clean; the same breach on a dry_run
check changes nothing and is shown; Prometheus stopped mid-rollout holds the step
(inconclusive) until it is back; hostile label values cannot change a query's meaning."""

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.core.metric_checks import NO_DATA, OK, fill
from sidecar.dev.backend import BackendServer
from sidecar.dev.devstack import Stack
from sidecar.dev.load import BackgroundLoad
from sidecar.dev.processes import free_port, wait_for
from sidecar.dev.prometheus import PrometheusServer
from sidecar.rollouts.prometheus import Prometheus, PrometheusTarget
from tests.e2e.conftest import ENVOY_CONFIG

CHECKOUT_FAILURES = (
    'sum(rate(checkout_total{version="{lane}",outcome="failure"}[{window}])) '
    '/ sum(rate(checkout_total{version="{lane}"}[{window}]))'
)
# Flagger's request-success-rate, on Envoy's stats as Prometheus scrapes them
SUCCESS_RATE = (
    'sum(rate(envoy_cluster_upstream_rq_xx{envoy_cluster_name="{lane}",envoy_response_code_class!="5"}'
    '[{window}])) / sum(rate(envoy_cluster_upstream_rq_xx{envoy_cluster_name="{lane}"}[{window}]))'
)
RULES = f"""
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
      steps: STEPS
      analysis:
        window: 5s
        min_requests: 20
        max_error_rate: 0.1
        metrics:
          - {{name: checkout-failures, query: '{CHECKOUT_FAILURES}', max: 0.1, DRY}}
          - {{name: request-success-rate, query: '{SUCCESS_RATE}', min: 0.9, timeout: 2s}}
"""


@contextmanager
def stack_with_prometheus(
    tmp_path: Path, steps: str, dry_run: bool
) -> Iterator[tuple[Stack, PrometheusServer]]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("STEPS", steps).replace("DRY", f"dry_run: {str(dry_run).lower()}"))
    prometheus = PrometheusServer(tmp_path)
    admin = free_port()
    args = ["--envoy-admin", f"127.0.0.1:{admin}", "--rollout-poll", "0.25", "--prometheus", prometheus.url]
    with Stack(rules, ENVOY_CONFIG, tmp_path, envoy_admin_port=admin, sidecar_args=args) as stack:
        backends = [f"127.0.0.1:{b.port}" for b in stack.backends.values()]
        prometheus.scrape(
            {"backends": ("/metrics", backends), "envoy": ("/stats/prometheus", [f"127.0.0.1:{admin}"])}
        )
        try:
            yield stack, prometheus
        finally:
            prometheus.stop()


def rollout(stack: Stack) -> dict:
    assert stack.sidecar is not None
    status, body = stack.sidecar.http_get("/rollouts/ramp")
    assert status == 200
    return json.loads(body)


def metric_checks(stack: Stack) -> dict[str, dict]:
    return {m["name"]: m for m in rollout(stack)["metrics"]}


def exposed(stack: Stack, prefix: str) -> float:
    assert stack.sidecar is not None
    lines = stack.sidecar.http_get("/metrics")[1].splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))


def status_text(stack: Stack, capsys: pytest.CaptureFixture[str]) -> str:
    assert stack.sidecar is not None
    capsys.readouterr()
    assert main(["status", "--admin", stack.sidecar.admin]) == 0
    return capsys.readouterr().out


def both_pass(stack: Stack) -> bool:
    return all(m["outcome"] == "pass" for m in metric_checks(stack).values())


def test_a_canary_whose_checkouts_fail_inside_200s_is_rolled_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with stack_with_prometheus(tmp_path, "[{weight: 50, hold: 300s}, {weight: 100}]", False) as (stack, _):
        load = BackgroundLoad(stack.port, {}, threads=3, vary_user=True)
        try:
            wait_for(lambda: both_pass(stack), 60, "both metric checks to pass")
            assert "metric checkout-failures: 0 / max 0.1: ok" in status_text(stack, capsys)
            stack.backends["canary"].checkout_fail_rate = 0.6
            wait_for(lambda: rollout(stack)["phase"] == "aborted", 30, "the rollback")
        finally:
            results = load.stop()
        report = rollout(stack)
        assert report["reason"].startswith("metric checkout-failures "), report["reason"]
        assert "> max 0.1" in report["reason"]
        assert report["canary_weight"] == 0
        assert report["numbers"]["canary_error_rate"] == 0  # Envoy saw no error
        assert {status for status, _ in results} == {200}
        assert exposed(
            stack, 'graysteer_rollout_metric_checks_total{metric="checkout-failures",result="breach"'
        )
        assert exposed(stack, 'graysteer_rollout_metric_value{metric="checkout-failures",rule="ramp"}') > 0.1


def test_the_same_breach_on_a_dry_run_check_is_shown_and_counted_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with stack_with_prometheus(tmp_path, "[{weight: 50, hold: 8s}, {weight: 100}]", True) as (stack, _):
        stack.backends["canary"].checkout_fail_rate = 0.6
        load = BackgroundLoad(stack.port, {}, threads=3, vary_user=True)
        try:
            wait_for(
                lambda: metric_checks(stack)["checkout-failures"]["outcome"] == "breach", 60, "the breach"
            )
            shown = status_text(stack, capsys)
            assert "metric checkout-failures (dry run): " in shown and "/ max 0.1: over" in shown
            wait_for(lambda: rollout(stack)["phase"] == "promoted", 60, "the promotion")
        finally:
            load.stop()
        assert rollout(stack)["canary_weight"] == 100
        assert exposed(
            stack, 'graysteer_rollout_metric_checks_total{metric="checkout-failures",result="breach"'
        )


def test_prometheus_stopped_mid_rollout_holds_the_step_until_it_is_back(tmp_path: Path) -> None:
    steps = "[{weight: 20, hold: 1s, approve: true}, {weight: 50, hold: 1s}, {weight: 100}]"
    with stack_with_prometheus(tmp_path, steps, False) as (stack, prometheus):
        assert stack.sidecar is not None
        load = BackgroundLoad(stack.port, {}, threads=3, vary_user=True)
        try:
            wait_for(
                lambda: (rollout(stack)["waiting"] or {}).get("on") == "approval", 30, "the approval wait"
            )
            wait_for(lambda: both_pass(stack), 60, "both metric checks to pass")
            prometheus.stop()
            wait_for(lambda: rollout(stack)["verdict"] == "inconclusive", 30, "an inconclusive verdict")
            assert main(["rollout", "approve", "ramp", "--admin", stack.sidecar.admin]) == 0
            errors = 'graysteer_rollout_metric_checks_total{metric="request-success-rate",result="error"'
            seen = exposed(stack, errors)
            wait_for(lambda: exposed(stack, errors) >= seen + 4, 30, "more failed queries")
            report = rollout(stack)
            assert (report["phase"], report["step"], report["canary_weight"]) == ("progressing", 0, 20)
            assert "Prometheus" in report["verdict_reason"]
            assert all(m["outcome"] == "inconclusive" for m in report["metrics"])
            prometheus.start()
            wait_for(
                lambda: rollout(stack)["phase"] == "promoted", 60, "the promotion once Prometheus is back"
            )
        finally:
            load.stop()


def test_hostile_label_values_cannot_change_what_a_query_means(tmp_path: Path) -> None:
    hostile = 'ca"na\\ry"} or vector(1) #'
    backends = [BackendServer(name).start_in_thread() for name in (hostile, "stable")]
    prometheus = PrometheusServer(tmp_path)
    try:
        for backend in backends:  # one checkout each, counted under its own name
            backend.checkouts.labels(backend.name, "success").inc(1 + backends.index(backend))
        prometheus.scrape({"backends": ("/metrics", [f"127.0.0.1:{b.port}" for b in backends])})
        scraped = "count by (version) (checkout_total)"
        wait_for(lambda: len(prometheus.query(scraped)) == 2, 30, "both backends scraped")
        template = 'sum(checkout_total{version="{lane}"})'

        async def ask(lane: str) -> tuple[float | None, str]:
            client = Prometheus(PrometheusTarget(prometheus.url))
            try:
                answer = await client.query(fill(template, lane, "stable", 5), 5)
            finally:
                await client.close()
            return answer.value, answer.result

        assert asyncio.run(ask(hostile)) == (1.0, OK)  # exactly the series with that label value
        assert asyncio.run(ask("stable")) == (2.0, OK)
        for attack in (
            'x"} or vector(1) #',
            'x"}) or vector(1',
            "x\\",
            '"',
            "stable\"} + 0 * {__name__=~'.+'",
        ):
            assert asyncio.run(ask(attack)) == (None, NO_DATA), attack  # a label value, matching nothing
    finally:
        prometheus.stop()
        for backend in backends:
            backend.stop()
