"""Live operations through the real Envoy: metrics, admin API, hot reload, drain on SIGTERM."""

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sidecar.admin.api import admin_pb2 as pb
from sidecar.admin.api import admin_pb2_grpc as pb_grpc
from sidecar.cli import main
from sidecar.core import Table
from sidecar.dev.devstack import Envoy, Sidecar, Stack, rewrite_envoy_config
from sidecar.dev.load import BackgroundLoad, HttpClient
from sidecar.dev.processes import wait_for
from sidecar.table.load import parse_rules
from tests.e2e.conftest import E2E_RULES, ENVOY_CONFIG
from tests.helpers import request


def scrape(sidecar: Sidecar) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = sidecar.http_get("/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_after_known_traffic(rules_file: Path, tmp_path: Path) -> None:
    version = parse_rules(rules_file.read_bytes(), "x").version
    with Stack(rules_file, ENVOY_CONFIG, tmp_path) as stack:
        assert stack.sidecar is not None
        client = stack.client()
        for _ in range(30):
            assert client.get("/", {"x-canary": "1"})[0] == 200
        for i in range(20):
            assert client.get("/", {"x-user-id": f"m{i}"})[0] == 200
        for _ in range(5):
            assert client.get("/")[0] == 200  # no key: when_key_missing -> stable
        sidecar = stack.sidecar

        # Envoy closes a request's ext_proc stream after the client has its answer: the last
        # one may still be open at the first scrape, but must close.
        def settled() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            scraped = scrape(sidecar)
            return scraped if scraped.get(("graysteer_inflight_streams", ())) == 0 else None

        metrics = wait_for(settled, 5, "the last ext_proc stream to close")

    def value(name: str, **labels: str) -> float:
        return metrics.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("graysteer_decisions_total", cluster="canary", rule="force-canary") == 30
    ramp = value("graysteer_decisions_total", cluster="stable", rule="ramp") + value(
        "graysteer_decisions_total", cluster="canary", rule="ramp"
    )
    assert ramp == 25
    assert value("graysteer_decision_duration_seconds_count") == 55
    assert value("graysteer_decision_duration_seconds_bucket", le="0.01") == 55
    assert value("graysteer_reloads_total", result="loaded") == 1
    assert value("graysteer_config_info", version=version, file_version=version, source=str(rules_file)) == 1
    assert value("graysteer_split_weight", rule="ramp", cluster="canary") == 30
    assert value("graysteer_split_weight", rule="ramp", cluster="stable") == 70
    assert not any(name == "graysteer_decision_errors_total" for name, _ in metrics)


def test_health_endpoints_and_grpc_health(stack: Stack) -> None:
    assert stack.sidecar is not None
    assert stack.sidecar.http_get("/healthz")[0] == 200
    status, body = stack.sidecar.http_get("/readyz")
    assert status == 200 and json.loads(body)["ready"] is True
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{stack.sidecar.port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="envoy.service.ext_proc.v3.ExternalProcessor"), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_admin_status_set_weight_explain_and_restart(
    rules_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_file.read_text())
    with Stack(rules, ENVOY_CONFIG, tmp_path) as stack:
        assert stack.sidecar is not None
        admin = stack.sidecar.admin
        assert main(["status", "--admin", admin]) == 0
        out = capsys.readouterr().out
        assert "ramp" in out and "split stable=70 canary=30" in out and "loaded (startup)" in out

        events = watch_events(admin, count=2)
        assert main(["set-weight", "ramp", "canary=100", "--admin", admin]) == 0
        assert "ramp: stable=0 canary=100" in capsys.readouterr().out
        # every user now reaches the canary, through Envoy
        client = stack.client()
        assert {client.get("/", {"x-user-id": f"w{i}"})[1]["backend"] for i in range(40)} == {"canary"}
        assert main(["explain", "--admin", admin, "-H", "x-user-id: w1"]) == 0
        explained = json.loads(capsys.readouterr().out)
        assert (explained["cluster"], explained["rule"]) == ("canary", "ramp")
        assert "+o" in explained["version"]
        assert main(["explain", "--config", str(rules), "-H", "x-user-id: w1"]) == 0
        local = json.loads(capsys.readouterr().out)  # the same fields, from the same conversion
        assert set(local) == set(explained)
        assert {k: local[k] for k in ("bucket", "key_source", "reason", "lane")} == {
            k: explained[k] for k in ("bucket", "key_source", "reason", "lane")
        }
        first, second = events.result(timeout=10)
        assert first.result.trigger == "startup" and second.result.trigger == "set_weights"
        assert [w.weight for w in second.table.rules[1].weights] == [0, 100]

        # bad requests are refused with the reason and change nothing
        assert main(["set-weight", "force-canary", "canary=1", "--admin", admin]) == 1
        assert "not a split" in capsys.readouterr().err
        assert main(["set-weight", "ramp", "nowhere=1", "--admin", admin]) == 1
        assert "unknown cluster(s) nowhere" in capsys.readouterr().err

        # the override survives a restart of the sidecar
        stack.sidecar.stop()
        restarted = Sidecar(rules, tmp_path, name="sidecar-restarted")
        try:
            assert main(["status", "--admin", restarted.admin, "--json"]) == 0
            status = json.loads(capsys.readouterr().out)
            (ramp,) = [r for r in status["rules"] if r["name"] == "ramp"]
            assert ramp["weights_overridden"] is True
            assert [w["weight"] for w in ramp["weights"]] == [0, 100]
            assert [w["weight"] for w in ramp["file_weights"]] == [70, 30]
        finally:
            restarted.stop()


def test_admin_unreachable_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--admin", "127.0.0.1:1"]) == 1
    assert "admin API at 127.0.0.1:1 is not reachable" in capsys.readouterr().err


def test_admin_refuses_remote_bind_without_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--config", "x.yaml", "--admin-listen", "0.0.0.0:50052"])
    assert exit_info.value.code == 2
    assert "--admin-allow-remote" in capsys.readouterr().err


def watch_events(admin: str, count: int) -> Any:
    """Start WatchTable in a thread; returns a future of the first `count` events."""
    from concurrent.futures import Future

    future: Future[list[Any]] = Future()
    ready = threading.Event()

    def run() -> None:
        with grpc.insecure_channel(admin) as channel:
            stream = pb_grpc.AdminStub(channel).WatchTable(pb.WatchTableRequest(), timeout=20)
            events = []
            for event in stream:
                events.append(event)
                ready.set()
                if len(events) == count:
                    future.set_result(events)
                    stream.cancel()
                    return

    threading.Thread(target=run, daemon=True).start()
    assert ready.wait(10), "WatchTable sent no initial event"
    return future


# ---- hot reload under load ----------------------------------------------------------------

TABLE_A = E2E_RULES.replace("name: ramp", "name: ramp-a").replace("seed: e2e", "seed: a")
TABLE_B = (
    E2E_RULES.replace("name: ramp", "name: ramp-b")
    .replace("seed: e2e", "seed: b")
    .replace("weight: 70", "weight: 40")
    .replace("weight: 30", "weight: 60")
)
BROKEN = TABLE_A.replace("weight: 30", "weight: -30")


def decision_echoing_envoy_config() -> dict[str, Any]:
    """envoy.yaml, plus request headers that show the upstream the decision's metadata."""
    config = yaml.safe_load(ENVOY_CONFIG.read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    vhost = hcm["typed_config"]["route_config"]["virtual_hosts"][0]
    vhost["request_headers_to_add"] = [
        {
            "header": {"key": f"x-test-{key}", "value": f"%DYNAMIC_METADATA(graysteer:{key})%"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
        for key in ("version", "rule")
    ]
    return config


def test_20000_requests_while_the_rules_are_rewritten_50_times(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(TABLE_A)
    tables = {t.version: t for t in (parse_rules(TABLE_A.encode(), "a"), parse_rules(TABLE_B.encode(), "b"))}
    sidecar = Sidecar(rules, tmp_path)
    from sidecar.dev.backend import BackendServer

    backends = {n: BackendServer(n).start_in_thread() for n in ("stable", "canary")}
    endpoints = {
        "graysteer": ("127.0.0.1", sidecar.port),
        **{n: ("127.0.0.1", b.port) for n, b in backends.items()},
    }
    envoy = Envoy(rewrite_envoy_config(decision_echoing_envoy_config(), endpoints), tmp_path)
    bad: list[str] = []
    seen_versions: set[str] = set()
    done = threading.Event()

    try:
        with ThreadPoolExecutor(5) as pool:
            writer = pool.submit(rewrite_rules, rules, sidecar.admin, done)
            loads = [pool.submit(send_and_check, envoy.port, w, tables, bad, seen_versions) for w in range(4)]
            total = sum(f.result() for f in loads)
            done.set()
            writer.result()
        assert total == 20_000
        assert bad == [], bad[:10]
        assert seen_versions == set(tables)
        metrics = scrape(sidecar)
        loaded = metrics[("graysteer_reloads_total", (("result", "loaded"),))]
        assert loaded >= 20  # most of the 50 rewrites were picked up and served
        assert metrics[("graysteer_reloads_total", (("result", "invalid"),))] == 1
        stats = envoy.stats()
        assert stats["http.ingress.ext_proc.failure_mode_allowed"] == 0
        assert stats["http.ingress.no_cluster"] == 0
    finally:
        envoy.stop()
        sidecar.stop()
        for backend in backends.values():
            backend.stop()


def send_and_check(
    port: int, worker: int, tables: dict[str, Table], bad: list[str], seen_versions: set[str]
) -> int:
    """5000 requests, each checked against the table whose version Envoy echoes: the problems
    into `bad`, the versions seen into `seen_versions`; returns how many were sent."""
    client = HttpClient(port)
    sent = 0
    try:
        for i in range(5000):
            user = f"u{worker}-{i % 997}"
            status, echo = client.get("/", {"x-user-id": user})
            sent += 1
            headers = echo.get("headers", {})
            version = headers.get("x-test-version", "")
            table = tables.get(version)
            if status != 200 or table is None:
                bad.append(f"{status} version={version!r}")
                continue
            seen_versions.add(version)
            expected = table.decide(request(x_user_id=user))
            if (echo["backend"], headers.get("x-test-rule")) != (expected.cluster, expected.rule):
                bad.append(
                    f"{user}: {echo['backend']}/{headers.get('x-test-rule')} under "
                    f"{version}, expected {expected.cluster}/{expected.rule}"
                )
    finally:
        client.close()
    return sent


def rewrite_rules(rules: Path, admin: str, done: threading.Event) -> None:
    """Rewrite the rules 50 times (table B, table A, ...), in place and by an editor's rename,
    with a broken file in the middle that changes nothing; until `done`."""
    for n in range(50):
        text = TABLE_B if n % 2 == 0 else TABLE_A
        if n == 25:  # a broken file in the middle changes nothing
            before = admin_status(admin)
            rules.write_text(BROKEN)
            wait_for(lambda: admin_status(admin).reload_failures == 1, 10, "the broken file to be refused")
            after = admin_status(admin)
            assert after.version == before.version
            assert after.last_reload.outcome == pb.ReloadResult.INVALID
            assert "field split.to[1].weight" in after.last_reload.error
        if n % 2:
            rules.write_text(text)  # in place
        else:
            tmp = rules.with_name(".rules.yaml.tmp")
            tmp.write_text(text)
            os.replace(tmp, rules)  # an editor's rename
        time.sleep(0.15)
        if done.is_set():
            break


def admin_status(address: str) -> pb.TableStatus:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.AdminStub(channel).GetTable(pb.GetTableRequest(), timeout=5)


# ---- SIGTERM under load -------------------------------------------------------------------


def test_sigterm_under_load_drains_without_failing_a_request(rules_file: Path, tmp_path: Path) -> None:
    with Stack(rules_file, ENVOY_CONFIG, tmp_path, sidecar_args=["--drain", "1.5", "--grace", "5"]) as stack:
        assert stack.sidecar is not None and stack.envoy is not None
        sidecar, envoy = stack.sidecar, stack.envoy
        load = BackgroundLoad(stack.port, {"x-canary": "1"})
        load.wait_for_more(300, "load to start")
        sidecar.signal(signal.SIGTERM)
        # readiness flips at once, while streams still get answers during the drain
        wait_for(lambda: sidecar.http_get("/readyz")[0] == 503, 5, "/readyz to report 503")
        exit_code = sidecar.popen.wait(20)
        load.wait_for_more(200, "load after the sidecar exited")
        results = load.stop()
        stats = envoy.stats()

    assert exit_code == 0
    assert "stopped" in sidecar.log_text()
    assert [r for r in results if r[0] != 200] == []
    # Envoy stopped sending streams once the health check saw NOT_SERVING; no stream the
    # sidecar had accepted was cut, and requests after that failed open to stable.
    assert stats["cluster.graysteer.upstream_rq_rx_reset"] == 0
    assert stats["cluster.graysteer.upstream_cx_destroy_remote_with_active_rq"] == 0
    assert (
        stats["http.ingress.ext_proc.streams_failed"] == stats["http.ingress.ext_proc.failure_mode_allowed"]
    )
    assert results[0][1] == "canary" and results[-1][1] == "stable"


def test_sighup_forces_a_reload(rules_file: Path, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_file.read_text())
    sidecar = Sidecar(rules, tmp_path, ["--no-watch"])
    try:
        first = admin_status(sidecar.admin).version
        rules.write_text(
            rules_file.read_text().replace("weight: 70", "weight: 60").replace("weight: 30", "weight: 40")
        )
        time.sleep(0.5)  # give a watcher, were there one, time to act: there must be none
        assert admin_status(sidecar.admin).version == first
        sidecar.signal(signal.SIGHUP)
        wait_for(lambda: admin_status(sidecar.admin).version != first, 10, "the SIGHUP reload")
        status = admin_status(sidecar.admin)
        assert status.last_reload.trigger == "sighup"
        assert [w.weight for w in status.rules[1].weights] == [60, 40]
    finally:
        sidecar.stop()
