"""Webhook gates asked for real over HTTP: a 2xx passes, anything else (a refusal with its
reason, a redirect, no answer within the timeout, a refused connection) keeps the move
waiting; at most one check is in flight per gate, a gate is asked again at a bounded pace,
and an answer counts only for the move it was asked about."""

import asyncio
import copy
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from sidecar.core import compile_table
from sidecar.core.gates import Gate
from sidecar.core.rollout import ClusterWindow, RolloutSpec, judge, start
from sidecar.ops.metrics import Metrics
from sidecar.rollouts.destinations import GateDestinations
from sidecar.rollouts.gates import GateChecks, ask, request_body
from tests.rollouts.gate_server import closed_port, gate_server, silent_port
from tests.rollouts.test_controller import DOC, Clock

LOOPBACK = GateDestinations.parse(["127.0.0.1"])  # the test gates listen on loopback
VERDICT = judge(
    compile_table(DOC, "v", "r").rollouts["ramp"].analysis, ClusterWindow(100, 1), ClusterWindow(100, 0)
)


def spec_with(url: str, before: str = "promote") -> RolloutSpec:
    doc = copy.deepcopy(DOC)
    doc["rules"][0]["rollout"]["gates"] = [{"url": url, "before": before, "timeout": "2s"}]
    return compile_table(doc, "v", "rules.yaml").rollouts["ramp"]


async def answer_of(
    gate: Gate, body: dict[str, Any] | None = None, destinations: GateDestinations = LOOPBACK
) -> tuple[str, bool, str]:
    async with httpx.AsyncClient() as client:
        result, label = await ask(client, gate, body or {}, destinations)
    return label, result.passed, result.detail


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_a_2xx_passes_and_the_gate_gets_the_move_it_guards() -> None:
    with gate_server() as server:
        server.status = 204
        spec = spec_with(server.url)
        state = replace(start(spec, 0.0), step=1)
        body = request_body(spec, state, VERDICT, spec.gates[0])
        assert asyncio.run(answer_of(spec.gates[0], body)) == ("passed", True, "HTTP 204")
    (received,) = server.received
    assert received == {
        "rule": "ramp",
        "canary": "canary",
        "baseline": "stable",
        "before": "promote",
        "phase": "progressing",
        "from": {"step": 1, "weight": 25},
        "to": {"step": 2, "weight": 100},
        "total_weight": 100,
        "verdict": "healthy",
        "numbers": VERDICT.numbers(),
    }


@pytest.mark.parametrize(
    ("status", "body", "detail"),
    [
        (503, b"change freeze\nuntil 18:00", "HTTP 503: change freeze until 18:00"),
        (302, b"", "HTTP 302"),  # a redirect is not followed: not a pass
        (500, b"x" * 100_000, "HTTP 500: " + "x" * 200),  # the reason is bounded
    ],
)
def test_any_other_answer_keeps_the_move_waiting_with_its_reason(
    status: int, body: bytes, detail: str
) -> None:
    with gate_server() as server:
        server.status, server.body = status, body
        assert asyncio.run(answer_of(Gate(server.url, "promote", 2.0))) == ("refused", False, detail)


def test_no_answer_within_the_timeout_and_a_refused_connection_keep_it_waiting() -> None:
    with silent_port() as port:
        gate = Gate(f"http://127.0.0.1:{port}/gate", "promote", 0.3)
        assert asyncio.run(answer_of(gate)) == ("timeout", False, "no answer within 0.3s")
    label, passed, detail = asyncio.run(answer_of(Gate(f"http://127.0.0.1:{closed_port()}/", "step", 2.0)))
    assert (label, passed) == ("error", False) and detail.startswith("no answer: ")


def test_one_check_in_flight_per_gate_asked_again_at_a_bounded_pace_for_its_move_only() -> None:
    async def scenario(server: Any) -> None:
        steady = Clock(0.0)
        metrics = Metrics(CollectorRegistry())
        checks = GateChecks(metrics, steady, recheck=5.0, destinations=LOOPBACK)
        spec = spec_with(server.url)
        state = replace(start(spec, 0.0), step=1)
        server.release.clear()  # the gate is slow
        checks.ask(spec, state, VERDICT, (0,))
        await until(lambda: len(server.received) == 1)
        checks.ask(spec, state, VERDICT, (0,))  # one is in flight: not asked again
        assert checks.checking("ramp", 0) and checks.answers("ramp", state) == {}
        server.release.set()
        await until(lambda: not checks.checking("ramp", 0))
        assert checks.answers("ramp", state)[0].detail == "HTTP 503: change freeze"
        steady.now = 4.9
        checks.ask(spec, state, VERDICT, (0,))  # a refusal is asked again only after the pace
        assert not checks.checking("ramp", 0) and len(server.received) == 1
        server.status = 200
        steady.now = 5.0
        checks.ask(spec, state, VERDICT, (0,))
        await until(lambda: not checks.checking("ramp", 0))
        assert len(server.received) == 2 and checks.answers("ramp", state)[0].passed
        # the answer was about step 1 of this rollout: not about another step, nor another rollout
        assert checks.answers("ramp", replace(state, step=0)) == {}
        assert checks.answers("ramp", replace(state, fingerprint="other")) == {}
        steady.now = 10.0  # a pass is fresh for the pace, then asked again before the move
        assert checks.answers("ramp", state) == {}
        labels = {"rule": "ramp", "before": "promote"}
        registry = metrics.registry
        assert (
            registry.get_sample_value("graysteer_rollout_gate_checks_total", {**labels, "result": "refused"})
            == 1
        )
        assert (
            registry.get_sample_value("graysteer_rollout_gate_checks_total", {**labels, "result": "passed"})
            == 1
        )
        server.release.clear()
        checks.ask(spec, state, VERDICT, (0,))
        await until(lambda: len(server.received) == 3)
        await checks.close()  # the controller's end: the check in flight is cancelled
        assert not checks.checking("ramp", 0)

    with gate_server() as server:
        asyncio.run(scenario(server))
