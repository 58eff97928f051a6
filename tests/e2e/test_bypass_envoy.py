"""Requests Envoy sends on without asking the sidecar are counted, through the real Envoy:
the sidecar reads Envoy's own counters (`serve --envoy-admin`), exports them, shows them in
`graysteer status`, and can take /readyz down while Envoy routes without it."""

import json
import signal
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.cli import main
from sidecar.dev.devstack import Sidecar, Stack
from sidecar.dev.load import BackgroundLoad
from sidecar.dev.processes import free_port, wait_for
from tests.e2e.conftest import E2E_RULES, ENVOY_CONFIG

ROUTING_HEADER = "x-route-cluster"


def sidecar_metrics(sidecar: Sidecar) -> dict[tuple[str, str], float]:
    """(sample name, mode label) -> value, from the sidecar's /metrics."""
    status, body = sidecar.http_get("/metrics")
    assert status == 200
    return {
        (s.name, s.labels.get("mode", "")): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.name.startswith("graysteer_envoy_")
    }


def bypassed(sidecar: Sidecar) -> float:
    return sidecar_metrics(sidecar).get(("graysteer_envoy_bypassed_requests_total", "ext_proc"), 0)


def watching(sidecar: Sidecar) -> bool:
    """Envoy's stats are read and the ext_proc series exist (a baseline read is done)."""
    values = sidecar_metrics(sidecar)
    return (
        values.get(("graysteer_envoy_stats_up", "")) == 1
        and ("graysteer_envoy_requests_total", "ext_proc") in values
    )


def test_a_frozen_sidecar_is_counted_and_shown_in_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(E2E_RULES)
    admin = free_port()
    with Stack(
        rules,
        ENVOY_CONFIG,
        tmp_path,
        envoy_admin_port=admin,
        sidecar_args=["--envoy-admin", f"127.0.0.1:{admin}", "--rollout-poll", "0.25"],
    ) as stack:
        sidecar = stack.sidecar
        assert sidecar is not None
        wait_for(lambda: watching(sidecar), 20, "the sidecar to read Envoy's stats")
        client = stack.client()
        wait_for(lambda: ROUTING_HEADER in client.get("/")[1].get("headers", {}), 20, "a decided request")
        before = bypassed(sidecar)

        sidecar.signal(signal.SIGSTOP)  # beyond message_timeout: Envoy fails open
        try:
            echoes = [client.get("/", {"x-user-id": f"frozen-{i}"}) for i in range(8)]
        finally:
            sidecar.signal(signal.SIGCONT)
        assert {status for status, _ in echoes} == {200}
        undecided = sum(ROUTING_HEADER not in echo.get("headers", {}) for _, echo in echoes)
        assert undecided == len(echoes)  # the sidecar could not answer any of them

        wait_for(
            lambda: bypassed(sidecar) - before >= undecided, 15, f"the bypass counter to grow by {undecided}"
        )
        values = sidecar_metrics(sidecar)
        assert values[("graysteer_envoy_stats_up", "")] == 1
        assert (
            values[("graysteer_envoy_requests_total", "ext_proc")]
            >= (values[("graysteer_envoy_bypassed_requests_total", "ext_proc")])
        )

        assert main(["status", "--admin", sidecar.admin]) == 0
        out = capsys.readouterr().out
        line = next(line for line in out.splitlines() if line.strip().startswith("ext_proc:"))
        assert int(line.split()[1]) >= undecided, out
        assert "without a decision" in line and f"127.0.0.1:{admin}" in out

        assert main(["status", "--admin", sidecar.admin, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)["envoy_bypass"]
        assert report["watching"] and report["stats_readable"]
        (mode,) = report["modes"]
        assert mode["mode"] == "ext_proc" and int(mode["bypassed_requests"]) >= undecided


def test_readyz_fails_while_envoy_has_no_healthy_sidecar(tmp_path: Path) -> None:
    """Envoy points at a port nobody serves: the sidecar cluster has no healthy host, so
    Envoy starts no ext_proc stream at all (streams_started stays put) and fails open. A
    sidecar that only watches Envoy's stats sees every request bypassed."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(E2E_RULES)
    admin = free_port()
    with Stack(rules, ENVOY_CONFIG, tmp_path, envoy_admin_port=admin, sidecar_first=False) as stack:
        watcher = Sidecar(
            rules,
            tmp_path,
            [
                "--envoy-admin",
                f"127.0.0.1:{admin}",
                "--rollout-poll",
                "0.25",
                "--ready-max-bypass-ratio",
                "0.5",
            ],
            name="watcher",
        )
        load = None
        try:
            wait_for(lambda: watching(watcher), 20, "the watcher to read Envoy's stats")
            assert watcher.http_get("/readyz")[0] == 200  # no traffic yet: nothing bypassed
            load = BackgroundLoad(stack.port, {}, threads=2)

            def not_ready() -> dict[str, object] | None:
                status, body = watcher.http_get("/readyz")
                return json.loads(body) if status == 503 else None

            answer = wait_for(not_ready, 15, "/readyz to fail while Envoy bypasses")
            assert "without a decision" in str(answer["reason"])
            assert "--ready-max-bypass-ratio" in str(answer["reason"])
            values = sidecar_metrics(watcher)
            assert values[("graysteer_envoy_bypass_ratio", "ext_proc")] > 0.5
            load.stop()
            assert load.samples and not any(s.decided for s in load.samples)
            total = len(load.samples)
            wait_for(lambda: bypassed(watcher) >= total, 15, "every request to be counted")
            wait_for(
                lambda: watcher.http_get("/readyz")[0] == 200,
                15,
                "/readyz to recover without bypassed traffic",
            )
            assert stack.envoy is not None
            stats = stack.envoy.stats()
            assert stats["http.ingress.ext_proc.streams_started"] == 0  # hence downstream_rq_total
        finally:
            if load is not None:
                load.stop()
            watcher.stop()
