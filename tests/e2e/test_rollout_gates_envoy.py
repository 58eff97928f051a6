"""Rollout gates through the real Envoy (its statistics judge the canary): a step that asks
for approval holds its weight and says so until `graysteer rollout approve`; a webhook gate
that answers 503 keeps the promotion waiting with its reason in `status`, and lets it
promote once it answers 200; a rollout with `on_failure: {ramp_down}` whose canary starts
failing lowers the canary's weight over seconds, then aborts. Holds of 1 s, a 3 s window."""

import json
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.dev.devstack import Stack
from sidecar.dev.load import BackgroundLoad
from sidecar.dev.processes import free_port, wait_for
from tests.e2e.conftest import ENVOY_CONFIG
from tests.rollouts.gate_server import gate_server

RULES = """
version: 1
clusters: [stable, canary]
default: stable
rules:
  - name: ramp
    split:
      key: [header:x-user-id]
      to: [{cluster: stable, weight: 100}, {cluster: canary, weight: 0}]
    rollout:
      canary: canary
      steps: STEPS
      analysis: {window: 3s, min_requests: 20, max_error_rate: 0.1}
      EXTRA
"""


def start(tmp_path: Path, steps: str, extra: str, *sidecar_args: str) -> Stack:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("STEPS", steps).replace("EXTRA", extra))
    admin = free_port()
    return Stack(
        rules,
        ENVOY_CONFIG,
        tmp_path,
        envoy_admin_port=admin,
        sidecar_args=[
            "--envoy-admin",
            f"127.0.0.1:{admin}",
            "--rollout-poll",
            "0.25",
            "--gate-allow",
            "127.0.0.1",  # the test gates listen on loopback
            *sidecar_args,
        ],
    )


def rollout(stack: Stack) -> dict:
    assert stack.sidecar is not None
    status, body = stack.sidecar.http_get("/rollouts/ramp")
    assert status == 200
    return json.loads(body)


def status_text(stack: Stack, capsys: pytest.CaptureFixture[str]) -> str:
    assert stack.sidecar is not None
    capsys.readouterr()
    assert main(["status", "--admin", stack.sidecar.admin]) == 0
    return capsys.readouterr().out


def metric(stack: Stack, line: str) -> bool:
    assert stack.sidecar is not None
    return line in stack.sidecar.http_get("/metrics")[1].splitlines()


def test_an_approval_step_waits_for_approve_and_a_failing_webhook_keeps_the_promotion_waiting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    steps = "[{weight: 20, hold: 1s, approve: true}, {weight: 50, hold: 1s}, {weight: 100}]"
    with gate_server() as gate:  # answers 503 "change freeze"
        extra = f"gates: [{{url: '{gate.url}', before: promote, timeout: 2s}}]"
        with start(tmp_path, steps, extra) as stack:
            assert stack.sidecar is not None
            load = BackgroundLoad(stack.port, {}, threads=3, vary_user=True)
            try:
                wait_for(
                    lambda: (rollout(stack)["waiting"] or {}).get("on") == "approval", 30, "the approval wait"
                )
                report = rollout(stack)
                assert (report["phase"], report["step"], report["canary_weight"]) == ("progressing", 0, 20)
                assert "waiting for approval: graysteer rollout approve ramp" in status_text(stack, capsys)
                assert metric(stack, 'graysteer_rollout_waiting{on="approval",rule="ramp"} 1.0')
                assert metric(stack, 'graysteer_split_weight{cluster="canary",rule="ramp"} 20.0')
                assert gate.received == []  # the promotion's gate is asked only when the promotion is due

                assert main(["rollout", "approve", "ramp", "--admin", stack.sidecar.admin]) == 0
                assert "approved by an operator" in capsys.readouterr().out
                wait_for(lambda: rollout(stack)["canary_weight"] == 50, 20, "the step after the approval")

                def refused() -> bool:
                    last = rollout(stack)["gates"][0]["last"]
                    return last is not None and last["detail"] == "HTTP 503: change freeze"

                wait_for(refused, 30, "the gate's refusal")
                wait_for(lambda: "HTTP 503" in rollout(stack)["reason"], 10, "the refusal in the reason")
                report = rollout(stack)
                assert (report["phase"], report["canary_weight"], report["waiting"]["on"]) == (
                    "progressing",
                    50,
                    "webhook",
                )
                shown = status_text(stack, capsys)
                assert "waiting for the gate before promote" in shown and "HTTP 503: change freeze" in shown
                assert metric(stack, 'graysteer_rollout_waiting{on="webhook",rule="ramp"} 1.0')
                assert gate.received[0]["from"] == {"step": 1, "weight": 50}
                assert gate.received[0]["to"] == {"step": 2, "weight": 100}

                gate.status = 200
                wait_for(
                    lambda: rollout(stack)["phase"] == "promoted", 30, "the promotion once the gate passes"
                )
            finally:
                results = load.stop()
            assert rollout(stack)["canary_weight"] == 100
            assert metric(stack, 'graysteer_rollout_waiting{on="webhook",rule="ramp"} 0.0')
            assert {status for status, _ in results} == {200}


def test_a_breach_with_ramp_down_lowers_the_canary_over_seconds_then_aborts(tmp_path: Path) -> None:
    steps = "[{weight: 60, hold: 60s}, {weight: 100}]"
    with start(tmp_path, steps, "on_failure: {ramp_down: 4s}") as stack:
        load = BackgroundLoad(stack.port, {}, threads=3, vary_user=True)
        try:
            wait_for(lambda: rollout(stack)["verdict"] == "healthy", 30, "a healthy verdict")
            stack.backends["canary"].fail_rate = 0.5
            wait_for(lambda: rollout(stack)["phase"] == "ramping_down", 20, "the ramp-down")
            seen: list[tuple[str, int]] = []

            def aborted() -> bool:
                report = rollout(stack)
                seen.append((report["phase"], report["canary_weight"]))
                return report["phase"] == "aborted"

            wait_for(aborted, 20, "the abort at the ramp's end")
        finally:
            load.stop()
        weights = [weight for phase, weight in seen if phase == "ramping_down"]
        assert weights == sorted(weights, reverse=True), weights  # never up
        assert len({w for w in weights if 0 < w < 60}) >= 3, weights  # through intermediate weights
        report = rollout(stack)
        assert (report["canary_weight"], report["ramp"]) == (0, None)
        assert "max_error_rate" in report["reason"] and report["numbers"]["canary_error_rate"] > 0.1
        client = stack.client()
        assert {client.get("/", {"x-user-id": f"after{i}"})[1]["backend"] for i in range(50)} == {"stable"}


def test_a_gate_at_envoys_admin_or_the_sidecars_own_listener_is_refused_even_when_allowed(
    tmp_path: Path,
) -> None:
    """A gate at Envoy's admin /quitquitquit used to stop Envoy: every request failed."""
    admin = free_port()
    url = f"http://127.0.0.1:{admin}/quitquitquit?why=gate&token=s3cret"
    steps = "[{weight: 20, hold: 1s}, {weight: 100}]"
    extra = f"gates: [{{url: '{url}', before: step, timeout: 2s}}]"
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("STEPS", steps).replace("EXTRA", extra))
    args = ["--envoy-admin", f"127.0.0.1:{admin}", "--rollout-poll", "0.25", "--gate-allow", "127.0.0.0/8"]
    with Stack(rules, ENVOY_CONFIG, tmp_path, envoy_admin_port=admin, sidecar_args=args) as stack:
        assert stack.sidecar is not None
        load = BackgroundLoad(stack.port, {}, threads=3, vary_user=True)
        try:

            def blocked(what: str) -> bool:
                last = rollout(stack)["gates"][0]["last"]
                return last is not None and what in last["detail"]

            wait_for(
                lambda: blocked("Envoy's admin (--envoy-admin)"), 30, "the gate at Envoy's admin refused"
            )
            report = rollout(stack)
            assert report["gates"][0]["url"] == f"http://127.0.0.1:{admin}/quitquitquit?why=gate&token=***"
            assert (report["phase"], report["canary_weight"]) == ("progressing", 20)
            counted = 'graysteer_rollout_gate_checks_total{before="step",result="blocked",rule="ramp"}'
            assert counted in stack.sidecar.http_get("/metrics")[1]
            own = f"http://127.0.0.1:{stack.sidecar.http}/rollouts"
            rules.write_text(rules.read_text().replace(url, own))  # the sidecar's own --http-listen
            wait_for(lambda: rollout(stack)["gates"][0]["url"] == own, 20, "the new gate")
            wait_for(lambda: blocked("the sidecar's --http-listen"), 30, "the gate at the sidecar refused")
        finally:
            results = load.stop()
        assert stack.envoy is not None and stack.envoy.process.popen.poll() is None  # Envoy still runs
        assert {status for status, _ in results} == {200}
