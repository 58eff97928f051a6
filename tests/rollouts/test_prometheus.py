"""Prometheus' answers read into one value or why none: several series, no sample, NaN, an
error status, a matrix and anything not in the API's shape are never a value (the check is
then inconclusive); a hostile server is bounded in bytes and time, a failed run never leaves
an earlier pass; and the views show each check's value against its threshold, a dry-run
one marked."""

import asyncio
import json

import httpx
import pytest
from prometheus_client import CollectorRegistry

from sidecar.core.metric_checks import ERROR, INCONCLUSIVE, NO_DATA, OK, PASS, TIMEOUT, Answer, MetricCheck
from sidecar.core.rollout import Analysis, RolloutSpec, Step
from sidecar.ops.metrics import Metrics
from sidecar.ops.view_rollout import metrics_view
from sidecar.rollouts.prometheus import MetricQueries, Prometheus, PrometheusTarget, _answer


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
    answer = _answer(response.status_code, response.content)
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


def success(data: object) -> bytes:
    return json.dumps({"status": "success", "data": data}).encode()


@pytest.mark.parametrize(
    "content",
    [
        success({"resultType": "scalar", "result": {"1": "5"}}),  # an object where the pair is
        success({"resultType": "scalar", "result": "x5"}),  # a string, its [1] a digit
        success({"resultType": "vector", "result": [{"value": "x5"}]}),
        success({"resultType": "vector", "result": [{"value": [1, True]}]}),  # float(True) is 1.0
        success({"resultType": "vector", "result": [{"value": [1, 5]}]}),  # a number, not Prometheus'
        success({"resultType": "vector", "result": [{"value": [1, "5", "6"]}]}),
        success({"resultType": "vector", "result": ["x5"]}),
        success(["vector"]),  # data that is no object
        success({"resultType": ["vector"], "result": []}),
        b'{"status": "success", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # a JSON bomb
        b'{"status": "success", "data": {"resultType": "scalar", "result": [1, "1"]}, "x": 1e999999}',
    ],
)
def test_an_answer_not_in_prometheus_shape_is_never_a_value(content: bytes) -> None:
    answer = _answer(200, content)
    assert answer.value is None and answer.result == ERROR


class HostilePrometheus:
    """A server on loopback that answers every query with `behaviour`'s bytes."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.sent = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        try:
            if self.behaviour == "endless":  # a fast, never-ending body
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n")
                chunk = b'{"status": "success", "data": {"resultType": "vector", "result": [' + b" " * 65536
                while self.sent < 64 * 1024 * 1024:  # bounded: the test fails long before
                    writer.write(chunk)
                    self.sent += len(chunk)
                    await writer.drain()
            else:  # "drip": a byte at a time, slower than the timeout allows in all
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n")
                for _ in range(100_000):
                    writer.write(b" ")
                    await writer.drain()
                    await asyncio.sleep(0.05)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@pytest.mark.parametrize(
    ("behaviour", "result", "said"), [("endless", ERROR, "over"), ("drip", TIMEOUT, "within")]
)
def test_a_hostile_prometheus_is_bounded_in_bytes_and_time(behaviour: str, result: str, said: str) -> None:
    async def scenario() -> tuple[Answer, int]:
        hostile = HostilePrometheus(behaviour)
        server = await asyncio.start_server(hostile.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        prometheus = Prometheus(PrometheusTarget(f"http://127.0.0.1:{port}"))
        try:
            return await prometheus.query("up", 2.0), hostile.sent
        finally:
            await prometheus.close()
            server.close()

    answer, sent = asyncio.run(scenario())
    assert (answer.value, answer.result) == (None, result) and said in answer.problem
    assert sent < 64 * 1024 * 1024  # not read to the server's own limit


def test_checks_that_fail_never_leave_an_earlier_pass() -> None:
    check = MetricCheck("errors", 'sum(rate(x{c="{lane}"}[{window}]))', max=1.0)
    spec = RolloutSpec(
        "ramp",
        "canary",
        "stable",
        (Step(100, 0.0),),
        Analysis(60.0, 1, 1.0, metrics=(check,)),
        "rollback",
        100,
        "f",
    )

    class Flaky:
        def __init__(self) -> None:
            self.answers: list[Answer | Exception] = [Answer(0.5), RuntimeError("a bug")]

        async def query(self, promql: str, timeout: float) -> Answer:
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    async def scenario() -> list[str]:
        queries = MetricQueries(Metrics(CollectorRegistry()), Flaky())  # type: ignore[arg-type]
        outcomes = []
        for _ in range(2):
            queries.ask(spec)
            await asyncio.gather(*queries._running.values())
            outcomes.append(queries.results(spec)[0].outcome)
        return outcomes

    assert asyncio.run(scenario()) == [PASS, INCONCLUSIVE]
