"""`serve --workers N` through the real Envoy: balanced, one table, aggregate metrics, drain."""

import os
import re
import signal
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from sidecar.admin.api import admin_pb2 as pb
from sidecar.admin.api import admin_pb2_grpc as pb_grpc
from sidecar.dev.devstack import Stack
from sidecar.dev.load import BackgroundLoad
from sidecar.dev.processes import wait_for
from tests.e2e.conftest import ENVOY_CONFIG


def versions(admins: list[str]) -> list[str]:
    found = []
    for admin in admins:
        with grpc.insecure_channel(admin) as channel:
            found.append(pb_grpc.AdminStub(channel).GetTable(pb.GetTableRequest(), timeout=5).version)
    return found


def per_worker_requests(stack: Stack) -> dict[str, int]:
    assert stack.envoy is not None
    text = stack.envoy.admin_get("/clusters")[1]
    counts = {}
    for line in text.splitlines():
        parts = line.split("::")
        if parts[0] == "graysteer" and parts[2] == "rq_total":
            counts[parts[1]] = int(parts[3])
    return counts


def test_three_workers_share_the_load_and_the_table(rules_file: Path, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_file.read_text())
    with Stack(rules, ENVOY_CONFIG, tmp_path, sidecar_args=["--workers", "3"]) as stack:
        sidecar = stack.sidecar
        assert sidecar is not None and len(sidecar.ports) == 3 and len(set(sidecar.ports)) == 3
        client = stack.client()
        for i in range(300):
            assert client.get("/", {"x-user-id": f"wk{i}"} if i % 3 else {"x-canary": "1"})[0] == 200
        # Envoy spread the streams over every worker
        counts = per_worker_requests(stack)
        assert len(counts) == 3 and all(n > 30 for n in counts.values()), counts

        # the supervisor's /metrics adds the workers up
        families = {f.name: f for f in text_string_to_metric_families(sidecar.http_get("/metrics")[1])}
        decisions = sum(
            s.value for s in families["graysteer_decisions"].samples if s.name == "graysteer_decisions_total"
        )
        assert decisions == 300
        canary = [
            s.value
            for s in families["graysteer_decisions"].samples
            if s.labels == {"cluster": "canary", "rule": "force-canary"}
        ]
        assert canary == [100]
        assert sidecar.http_get("/readyz")[0] == 200

        # a reload reaches every worker
        first = set(versions(sidecar.admins))
        assert len(first) == 1
        rules.write_text(rules.read_text() + "# edited\n")
        wait_for(
            lambda: (
                len(set(versions(sidecar.admins)) - first) == 1 and len(set(versions(sidecar.admins))) == 1
            ),
            15,
            "all workers to reload",
        )

        # runtime weights set through one worker reach the others (state file)
        with grpc.insecure_channel(sidecar.admins[0]) as channel:
            pb_grpc.AdminStub(channel).SetWeights(
                pb.SetWeightsRequest(rule="ramp", weights={"canary": 100}), timeout=5
            )
        wait_for(
            lambda: (
                all("+o" in v for v in versions(sidecar.admins)) and len(set(versions(sidecar.admins))) == 1
            ),
            15,
            "all workers to take the weights",
        )
        assert {client.get("/", {"x-user-id": f"all{i}"})[1]["backend"] for i in range(60)} == {"canary"}


def test_a_dead_worker_is_restarted_and_sigterm_drains_all(rules_file: Path, tmp_path: Path) -> None:
    # --drain: NOT_SERVING long enough for Envoy's health check (every 0.5 s) to see it on a
    # loaded machine before the listeners stop (1 s, two checks, once let a stream in late)
    drain = ["--drain", "3"]
    with Stack(rules_file, ENVOY_CONFIG, tmp_path, sidecar_args=["--workers", "2", *drain]) as stack:
        sidecar = stack.sidecar
        assert sidecar is not None
        load = BackgroundLoad(stack.port, {"x-canary": "1"}, threads=3)
        load.wait_for_more(100, "load")
        pid = int(re.search(r"worker 1 \(pid (\d+)\)", sidecar.log_text()).group(1))  # type: ignore[union-attr]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: "worker 1 exited" in sidecar.log_text(), 10, "the supervisor to notice")
        wait_for(lambda: sidecar.log_text().count("worker 1 (pid") == 2, 20, "worker 1 to restart")
        assert sidecar.http_get("/readyz")[0] == 200
        # the restarted worker is back on its port, and Envoy sends it streams again
        worker1 = f"127.0.0.1:{sidecar.ports[1]}"
        before = per_worker_requests(stack)[worker1]
        wait_for(
            lambda: per_worker_requests(stack)[worker1] > before + 50,
            20,
            "streams to reach the restarted worker",
        )

        assert stack.envoy is not None
        cut = "cluster.graysteer.upstream_cx_destroy_remote_with_active_rq"
        cut_by_the_kill = stack.envoy.stats()[cut]  # the SIGKILL cut the streams it had
        sidecar.signal(signal.SIGTERM)
        assert sidecar.popen.wait(30) == 0
        results = load.stop()
        stats = stack.envoy.stats()
    assert {status for status, _ in results} == {200}  # the killed worker's streams failed open; none failed
    assert "stopped (worker exit codes [0, 0])" in sidecar.log_text()
    assert stats[cut] == cut_by_the_kill  # the drain cut no stream


def test_http_workers_share_the_checks_and_a_dead_one_comes_back(rules_file: Path, tmp_path: Path) -> None:
    """ext_authz over HTTP with two workers on ports +0, +1: Envoy's HTTP pool spreads checks
    over both; a killed worker is restarted on its port and gets checks again; nothing fails."""
    config = ENVOY_CONFIG.parent / "ext_authz_http.yaml"
    with Stack(rules_file, config, tmp_path, sidecar_args=["--workers", "2"]) as stack:
        sidecar = stack.sidecar
        assert sidecar is not None and sidecar.transport == "http" and len(set(sidecar.ports)) == 2
        load = BackgroundLoad(stack.port, {}, threads=3, users=[f"u{i}" for i in range(20)])
        load.wait_for_more(200, "load")
        counts = per_worker_requests(stack)
        assert all(counts[f"127.0.0.1:{port}"] > 0 for port in sidecar.ports)
        pid = int(re.search(r"worker 1 \(pid (\d+)\)", sidecar.log_text()).group(1))  # type: ignore[union-attr]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: sidecar.log_text().count("worker 1 (pid") == 2, 20, "worker 1 to restart")
        worker1 = f"127.0.0.1:{sidecar.ports[1]}"
        before = per_worker_requests(stack)[worker1]
        wait_for(
            lambda: per_worker_requests(stack)[worker1] > before + 50,
            20,
            "checks to reach the restarted worker",
        )
        load.stop()
    assert {s.status for s in load.samples} == {200}
    assert all(s.backend for s in load.samples)
