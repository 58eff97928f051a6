"""Prometheus' answers read into one value or why none: several series, no sample, NaN, an
error status and a matrix are never a value (the check is then inconclusive); and the
views show each check's value against its threshold, a dry-run one marked."""

import httpx
import pytest

from sidecar.core.metric_checks import ERROR, NO_DATA, OK
from sidecar.ops.view_rollout import metrics_view
from sidecar.rollouts.prometheus import _answer


def vector(*values: str) -> dict:
    return {
        "status": "success",
        "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, v]} for v in values]},
    }


@pytest.mark.parametrize(
    ("status", "body", "value", "result", "said"),
    [
        (200, vector("0.25"), 0.25, OK, ""),
        (200, {"status": "success", "data": {"resultType": "scalar", "result": [1, "3"]}}, 3.0, OK, ""),
        (200, vector(), None, NO_DATA, "no sample"),
        (200, vector("1", "2"), None, NO_DATA, "2 series, not one"),
        (200, vector("NaN"), None, NO_DATA, "nan"),
        (200, vector("+Inf"), None, NO_DATA, "inf"),
        (400, {"status": "error", "error": "parse error"}, None, ERROR, "HTTP 400: parse error"),
        (200, {"status": "success", "data": {"resultType": "matrix", "result": []}}, None, ERROR, "matrix"),
        (502, "bad gateway", None, ERROR, "HTTP 502: bad gateway"),
    ],
)
def test_an_answer_is_one_finite_value_or_why_not(
    status: int, body: object, value: float | None, result: str, said: str
) -> None:
    response = (
        httpx.Response(status, json=body) if isinstance(body, dict) else httpx.Response(status, text=body)
    )
    answer = _answer(response)
    assert (answer.value, answer.result) == (value, result)
    assert said in answer.problem


def test_the_views_show_each_value_against_its_threshold() -> None:
    report = {
        "metrics": [
            {"name": "a", "value": 0.5, "threshold": "max 0.1", "outcome": "breach", "dry_run": True},
            {
                "name": "b",
                "value": 0.99,
                "baseline_value": 1.0,
                "threshold": "min 0.9x baseline",
                "outcome": "pass",
            },
            {
                "name": "c",
                "value": None,
                "threshold": "max 1",
                "outcome": "inconclusive",
                "reason": "metric c: timeout",
            },
        ]
    }
    assert [m["line"] for m in metrics_view(report)] == [
        "metric a (dry run): 0.5 / max 0.1: over",
        "metric b: 0.99 (baseline 1) / min 0.9x baseline: ok",
        "metric c: - / max 1: no data (metric c: timeout)",
    ]
