"""Progressive delivery through the real Envoy: the sidecar reads each lane's responses
from Envoy's admin endpoint, steps the canary forward, and pulls a bad one out in seconds.
Durations are scaled down by the rules file (holds of 1 s, a 3 s window)."""

import json
import time
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.dev.devstack import Sidecar, Stack
from sidecar.dev.load import BackgroundLoad
from sidecar.dev.processes import free_port, wait_for
from tests.e2e.conftest import ENVOY_CONFIG

RULES = """
version: 1
clusters: [stable, canary]
default: stable
rules:
  - name: force-canary
    match: {headers: {x-canary: "1"}}
    route: canary
  - name: ramp
    split:
      key: [header:x-user-id]
      to: [{cluster: stable, weight: 100}, {cluster: canary, weight: 0}]
    rollout:
      canary: canary
      steps: [{weight: 20, hold: HOLD}, {weight: 50, hold: HOLD}, {weight: 100}]
      analysis: {window: 3s, min_requests: MIN, max_error_rate: 0.1, max_p99_ms: 150}
      on_failure: rollback
"""


def start(tmp_path: Path, hold: str = "1s", min_requests: int = 20) -> Stack:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("HOLD", hold).replace("MIN", str(min_requests)))
    admin = free_port()
    return Stack(
        rules,
        ENVOY_CONFIG,
        tmp_path,
        envoy_admin_port=admin,
        sidecar_args=["--envoy-admin", f"127.0.0.1:{admin}", "--rollout-poll", "0.25"],
    )


def rollout(stack: Stack) -> dict:
    assert stack.sidecar is not None
    status, body = stack.sidecar.http_get("/rollouts/ramp")
    assert status == 200
    return json.loads(body)


def test_a_healthy_canary_advances_through_every_step(tmp_path: Path) -> None:
    with start(tmp_path) as stack:
        load = BackgroundLoad(stack.port, {}, threads=3, vary_user=True)
        seen = []
        wait_for(
            lambda: seen.append(rollout(stack)["canary_weight"]) or rollout(stack)["phase"] == "promoted",
            40,
            "the rollout to be promoted",
        )
        results = load.stop()
        assert {20, 50}.issubset(seen) and seen == sorted(seen)  # every step, never back
        assert rollout(stack)["canary_weight"] == 100
        assert {status for status, _ in results} == {200}
        # promoted: every user now lands on the canary
        client = stack.client()
        assert {client.get("/", {"x-user-id": f"p{i}"})[1]["backend"] for i in range(30)} == {"canary"}


def test_a_failing_canary_is_pulled_out_within_seconds(tmp_path: Path) -> None:
    with start(tmp_path, hold="60s") as stack:
        load = BackgroundLoad(stack.port, {}, threads=3, vary_user=True)
        wait_for(lambda: rollout(stack)["verdict"] == "healthy", 20, "a healthy verdict")
        broke = time.monotonic()
        stack.backends["canary"].fail_rate = 0.3
        wait_for(lambda: rollout(stack)["phase"] == "aborted", 15, "the rollout to abort")
        reaction = time.monotonic() - broke
        load.stop()
        report = rollout(stack)
        # the window reaches min_requests canary responses well within a second at this load
        assert reaction < 6, reaction
        assert "max_error_rate" in report["reason"]
        assert report["numbers"]["canary_error_rate"] > 0.1
        assert report["canary_weight"] == 0
        assert stack.sidecar is not None and stack.sidecar.http_get("/rollouts/ramp/check")[0] == 503
        client = stack.client()
        assert {client.get("/", {"x-user-id": f"after{i}"})[1]["backend"] for i in range(100)} == {"stable"}
        stack.backends["canary"].fail_rate = 0.0
        assert client.get("/", {"x-canary": "1"})[1]["backend"] == "canary"  # explicit override


def test_a_slow_canary_is_rolled_back(tmp_path: Path) -> None:
    with start(tmp_path, hold="60s") as stack:
        load = BackgroundLoad(stack.port, {}, threads=4, vary_user=True)
        wait_for(lambda: rollout(stack)["verdict"] == "healthy", 20, "a healthy verdict")
        stack.backends["canary"].delay_ms = 250
        wait_for(lambda: rollout(stack)["phase"] == "aborted", 20, "the rollout to abort")
        load.stop()
        report = rollout(stack)
        assert "p99" in report["reason"] and report["numbers"]["canary_p99_ms"] > 150


def test_too_little_traffic_gives_no_verdict_no_step_no_rollback(tmp_path: Path) -> None:
    with start(tmp_path, min_requests=500) as stack:
        stack.backends["canary"].fail_rate = 1.0
        client = stack.client()
        for i in range(60):
            client.get("/", {"x-user-id": f"thin{i}"})
        time.sleep(2.5)  # more than a hold: nothing may happen without a verdict
        report = rollout(stack)
        assert (report["phase"], report["step"], report["verdict"]) == ("progressing", 0, "inconclusive")
        assert report["canary_weight"] == 20


@pytest.mark.parametrize("action", ["progress", "pause", "abort", "promote"])
def test_a_restart_keeps_the_rollout_state(
    tmp_path: Path, action: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with start(tmp_path, hold="60s") as stack:
        assert stack.sidecar is not None
        wait_for(lambda: rollout(stack)["canary_weight"] == 20, 10, "the first step")
        if action != "progress":
            assert main(["rollout", action, "ramp", "--admin", stack.sidecar.admin]) == 0
            capsys.readouterr()
        before = rollout(stack)
        stack.sidecar.stop()
        restarted = Sidecar(tmp_path / "rules.yaml", tmp_path, name="restarted")
        try:
            wait_for(lambda: restarted.http_get("/rollouts/ramp")[0] == 200, 10, "the restart")
            after = json.loads(restarted.http_get("/rollouts/ramp")[1])
            assert (after["phase"], after["step"], after["canary_weight"]) == (
                before["phase"],
                before["step"],
                before["canary_weight"],
            )
            if action == "progress":  # the hold goes on from where it was, not from zero
                assert after["hold_remaining_seconds"] <= before["hold_remaining_seconds"]
            assert main(["status", "--admin", restarted.admin]) == 0
            assert f"rollout ramp: {before['phase']}" in capsys.readouterr().out
        finally:
            restarted.stop()


def test_set_weight_on_a_rollout_rule_is_refused_in_every_phase_and_nothing_undoes_an_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """set-weight used to report success on a paused, aborted or promoted rollout, and the
    controller undid it within a second. Only the rollout sets a rollout rule's weights."""
    with start(tmp_path, hold="60s") as stack:
        assert stack.sidecar is not None
        admin = stack.sidecar.admin
        wait_for(lambda: rollout(stack)["canary_weight"] == 20, 10, "the first step")
        for action, phase, weight in (
            (None, "progressing", 20),
            ("pause", "paused", 20),
            ("abort", "aborted", 0),
            ("promote", "promoted", 100),
        ):
            if action:
                assert main(["rollout", action, "ramp", "--admin", admin]) == 0
            capsys.readouterr()
            assert main(["set-weight", "ramp", "canary=33", "--admin", admin]) == 1
            err = capsys.readouterr().err
            assert "rule 'ramp' has a rollout" in err and f"now {phase}" in err, err
            time.sleep(1.5)  # the controller polls every 0.25 s: nothing changes the answer
            report = rollout(stack)
            assert (report["phase"], report["canary_weight"]) == (phase, weight)
            _, metrics = stack.sidecar.http_get("/metrics")
            assert f'graysteer_split_weight{{cluster="canary",rule="ramp"}} {weight}.0' in metrics


def test_a_removed_or_emptied_state_file_never_restarts_an_aborted_rollout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A deleted state file used to read as "no state": the rolled-back canary came back."""
    state = tmp_path / ".rules.yaml.graysteer-state.json"
    with start(tmp_path, hold="60s") as stack:
        assert stack.sidecar is not None
        wait_for(lambda: rollout(stack)["canary_weight"] == 20, 10, "the first step")
        assert main(["rollout", "abort", "ramp", "--admin", stack.sidecar.admin]) == 0
        capsys.readouterr()
        aborted = state.read_bytes()
        state.unlink()  # the watcher sees it gone, and the state in force is written back
        wait_for(lambda: state.exists() and state.read_bytes() == aborted, 10, "the state written back")
        time.sleep(1.0)  # four rollout polls: none may start the rollout again
        report = rollout(stack)
        assert (report["phase"], report["canary_weight"], report["state_problem"]) == ("aborted", 0, None)
        client = stack.client()
        assert {client.get("/", {"x-user-id": f"gone{i}"})[1]["backend"] for i in range(50)} == {"stable"}
        stack.sidecar.stop()
        state.write_bytes(b"")  # a crashed writer, `> file`, a full disk
        with pytest.raises(RuntimeError, match=f"{state}.*empty"):
            Sidecar(tmp_path / "rules.yaml", tmp_path, name="restarted")
        assert state.read_bytes() == b""  # never overwritten
        # no sidecar: Envoy sends requests on to the default route, never to the canary
        assert {client.get("/", {"x-user-id": f"empty{i}"})[1]["backend"] for i in range(50)} == {"stable"}
