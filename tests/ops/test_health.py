"""Requests Envoy sent on without a decision, for operators: `graysteer status`, the opt-in
/readyz gate (single process and the --workers supervisor) and the serve flag's checks."""

import json

import pytest
from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from sidecar.admin import client as admin_client
from sidecar.admin.servicer import envoy_bypass
from sidecar.cli import main
from sidecar.ops.health import BypassGate, registry_bypass_ratio
from sidecar.ops.metrics import Metrics
from sidecar.stats.bypass import BypassMonitor
from tests.stats.test_bypass import EXT_PROC, envoy_text, read


class Ready:
    def __init__(self, ready: bool = True, reason: str = "serving") -> None:
        self.ready, self.reason = ready, reason


@pytest.mark.parametrize(
    ("base", "ratio", "ready", "reason"),
    [
        (Ready(), 0.0, True, "serving"),
        (Ready(), 0.05, True, "serving"),  # at the limit
        (Ready(), None, True, "serving"),  # Envoy's stats unreadable: unknown is not a failure
        (Ready(), 0.8, False, "Envoy sent 80.0% of requests on without a decision"),
        (Ready(False, "shutting down"), 0.8, False, "shutting down"),
    ],
)
def test_bypass_gate(base: Ready, ratio: float | None, ready: bool, reason: str) -> None:
    gate = BypassGate(base, lambda: ratio, 0.05)
    assert gate.ready == ready
    assert gate.reason.startswith(reason)


def test_the_supervisor_reads_the_ratio_from_the_registry() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    assert registry_bypass_ratio(registry) is None
    metrics.watch_envoy()
    metrics.show_envoy_stats_up(True)
    assert registry_bypass_ratio(registry) == 0.0
    metrics.count_bypass("ext_proc", 1, 4, 0.25)
    metrics.count_bypass("ext_authz", 3, 4, 0.75)
    assert registry_bypass_ratio(registry) == 0.75
    metrics.show_envoy_stats_up(False)
    assert registry_bypass_ratio(registry) is None


def status_lines(monitor: BypassMonitor | None) -> list[str]:
    message = json_format.MessageToDict(
        envoy_bypass(monitor), preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return admin_client.format_bypass(message)


def test_status_shows_the_counts_and_when_they_cannot_be_read() -> None:
    assert "not read by this process" in status_lines(None)[0]
    monitor = BypassMonitor(Metrics(CollectorRegistry()), "127.0.0.1:9901", 1.0, 0.05)
    assert "CANNOT READ THEM: not read yet" in status_lines(monitor)[0]
    monitor.observe(1.0, read(envoy_text(3, 8, 10)))
    monitor.observe(2.0, read(envoy_text(8, 108, 11)))
    head, line = status_lines(monitor)
    assert head.startswith(
        "envoy bypass: reading Envoy's stats at 127.0.0.1:9901 every 1s; last read 1970-01-01T00:00:02Z"
    )
    assert line == (
        "  ext_proc: 5 of 100 requests sent on without a decision (5.0%) since the "
        "sidecar began reading; last window 5 of 100 (5.0%); /readyz limit 5.0%"
    )
    monitor.observe(3.0, None, "HTTP 503")
    assert "CANNOT READ THEM: HTTP 503" in status_lines(monitor)[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ready-max-bypass-ratio", "0.1"], "needs --envoy-admin"),
        (["--ready-max-bypass-ratio", "0.1", "--envoy-admin", "127.0.0.1:9901"], "--http-listen"),
        (
            [
                "--ready-max-bypass-ratio",
                "1.5",
                "--envoy-admin",
                "127.0.0.1:9901",
                "--http-listen",
                "127.0.0.1:0",
            ],
            "expected a share from 0 to below 1",
        ),
        (["--ready-max-bypass-ratio", "x"], "expected a share"),
    ],
)
def test_ready_max_bypass_ratio_flag_errors(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--config", "rules.yaml", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_status_json_is_what_the_admin_api_sends() -> None:
    monitor = BypassMonitor(Metrics(CollectorRegistry()), "127.0.0.1:9901", 0.5)
    monitor.observe(1.0, read(EXT_PROC))
    data = json.loads(json_format.MessageToJson(envoy_bypass(monitor), preserving_proto_field_name=True))
    assert data["watching"] and data["stats_readable"] and data["poll_seconds"] == 0.5
    assert data["modes"][0]["mode"] == "ext_proc"
