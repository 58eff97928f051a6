"""The live view's model, from the status the admin API really sends (a real reloader, a
real rollout controller, the servicer's own converter): steps, checks against thresholds,
traffic, bypass, the fleet, and fields it does not know."""

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from sidecar.admin.client import as_dict
from sidecar.admin.servicer import table_status
from sidecar.fleet.fleet import FleetClusters
from sidecar.ops import view, view_rollout, view_text
from sidecar.ops.metrics import Metrics
from sidecar.rollouts.controller import RolloutController
from sidecar.sources.file import RulesFile
from sidecar.sources.state_file import StateFile
from sidecar.stats.clusters import ClusterCounts
from sidecar.table.reload import Reloader

RULES: dict[str, Any] = {
    "version": 1,
    "clusters": ["stable", "canary"],
    "default": "stable",
    "rules": [
        {"name": "pin", "match": {"headers": {"x-canary": "1"}}, "route": "canary"},
        {
            "name": "ramp",
            "split": {
                "key": ["header:u"],
                "to": [{"cluster": "stable", "weight": 100}, {"cluster": "canary", "weight": 0}],
            },
            "rollout": {
                "canary": "canary",
                "steps": [{"weight": 10, "hold": "30s"}, {"weight": 50, "hold": "1m"}, {"weight": 100}],
                "analysis": {
                    "window": "30s",
                    "min_requests": 10,
                    "max_error_rate": 0.05,
                    "max_error_rate_vs_stable": 2,
                    "max_p99_ms": 200,
                },
            },
        },
        {
            "name": "other",
            "split": {
                "key": ["header:u"],
                "to": [{"cluster": "stable", "weight": 3}, {"cluster": "canary", "weight": 1}],
            },
        },
    ],
}


def clusters_seen(at: float, canary_errors: float) -> FleetClusters:
    """1000 responses per cluster in the window, the canary's with `canary_errors` 5xx."""
    seen = FleetClusters()
    bounds = (100.0, 1000.0, float("inf"))
    seen.record("r", at - 20, {c: ClusterCounts(0, 0, bounds, (0, 0, 0)) for c in ("canary", "stable")})
    seen.record(
        "r",
        at - 10,
        {
            "canary": ClusterCounts(1000, canary_errors, bounds, (1000, 1000, 1000)),
            "stable": ClusterCounts(1000, 10, bounds, (1000, 1000, 1000)),
        },
    )
    seen.read_at = float("inf")
    return seen


def status(tmp_path: Path, canary_errors: float = 0) -> dict[str, Any]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(RULES))
    metrics = Metrics(CollectorRegistry())
    reloader = Reloader(RulesFile(rules), metrics, StateFile(tmp_path / "state.json"))
    now = time.time()
    controller = RolloutController(reloader, metrics, clusters_seen(now, canary_errors), 1.0)
    asyncio.run(controller.tick())
    return as_dict(table_status(reloader, controller=controller))


def test_splits_are_bars_of_their_weights_and_the_rollouts_one_says_so(tmp_path: Path) -> None:
    shown = view.build(status(tmp_path))
    splits = {s["rule"]: s for s in shown["splits"]}
    assert set(splits) == {"ramp", "other"}  # a route rule is no split
    assert splits["ramp"]["note"] == "set by its rollout"
    stable, canary = splits["other"]["clusters"]
    assert (stable["shown"], canary["shown"]) == ("3 (75%)", "1 (25%)")
    assert stable["bar"] == "█" * 15 + "░" * 5


def test_a_rollout_shows_each_step_done_current_with_its_time_left_and_to_come(tmp_path: Path) -> None:
    (rollout,) = view.build(status(tmp_path))["rollouts"]
    assert rollout["status"] == "progressing: started"
    assert rollout["step_shown"] == "step 1 of 3" and rollout["weight_shown"] == "canary weight 10 of 100"
    first, second, last = rollout["steps"]
    assert (first["place"], second["place"], last["place"]) == ("current", "pending", "pending")
    assert first["note"].endswith("left of 30s") and 29 <= first["time_left"] <= 30
    assert (second["note"], last["note"]) == ("hold 60s", "last")
    report = {**json.loads(status(tmp_path)["rollouts"][0]["report_json"]), "step": 1}
    assert [s["place"] for s in view_rollout.steps_view(report)] == ["done", "current", "pending"]
    promoted = {**report, "phase": "promoted", "step": 2, "hold_remaining_seconds": None}
    assert [s["place"] for s in view_rollout.steps_view(promoted)] == ["done", "done", "done"]


@pytest.mark.parametrize(
    ("canary_errors", "error_rate", "versus", "states"),
    [
        (0, "0.00%", "0.00x", ["ok", "ok", "ok"]),
        (30, "3.00%", "3.00x", ["ok", "over", "ok"]),  # within the rate, three times stable's
        (80, "8.00%", "8.00x", ["over", "over", "ok"]),
    ],
)
def test_the_analysis_values_stand_against_their_thresholds_per_cluster(
    tmp_path: Path, canary_errors: float, error_rate: str, versus: str, states: list[str]
) -> None:
    (rollout,) = view.build(status(tmp_path, canary_errors))["rollouts"]
    canary, baseline = rollout["clusters"]
    assert (canary["cluster"], canary["role"], baseline["cluster"]) == ("canary", "canary", "stable")
    names = [c["name"] for c in canary["checks"]]
    assert names == ["error rate", "vs stable", "p99"]
    assert [c["shown"] for c in canary["checks"][:2]] == [error_rate, versus]
    assert [c["limit_shown"] for c in canary["checks"]] == ["5.00%", "2x", "200 ms"]
    assert [c["state"] for c in canary["checks"]] == states
    assert [c["state"] for c in baseline["checks"]] == ["no limit", "no limit"]  # compared with, not judged
    assert canary["requests_shown"] == "1000 responses in 30s (min 10)"


def test_a_canary_with_errors_against_a_flawless_baseline_is_infinitely_worse() -> None:
    checks = view_rollout.checks_view(
        {
            "analysis": {
                "canary_error_rate": 0.01,
                "baseline_error_rate": 0.0,
                "max_error_rate_vs_stable": 2,
                "max_error_rate": 0.1,
            }
        }
    )[0]["checks"]
    assert (checks[1]["shown"], checks[1]["state"], checks[1]["value"]) == ("inf", "over", None)
    json.dumps(checks, allow_nan=False)  # the web page receives it as JSON


def test_a_field_the_view_does_not_know_shows_under_its_rollout() -> None:
    """A gate that makes a rollout wait adds its own field and reason: both show as they are."""
    shown = view_rollout.rollout_view(
        {"rule": "r", "phase": "paused", "reason": "waiting for approval", "gate": "approval"}
    )
    assert shown["status"] == "paused: waiting for approval"
    assert shown["details"] == ["gate: approval"]
    assert "  gate: approval" in view_text.rollout_lines(shown)


def test_every_wait_is_a_line_an_approval_the_gates_last_answers_a_ramp(tmp_path: Path) -> None:
    report = json.loads(status(tmp_path)["rollouts"][0]["report_json"])
    plan = [{**step, "approve": index == 0} for index, step in enumerate(report["step_plan"])]
    gate = {"url": "http://g/ok", "before": "promote", "timeout_seconds": 5.0, "guards_next_move": True}
    waiting = {
        **report,
        "step_plan": plan,
        "waiting": {"on": "approval", "reason": "held 30s at weight 10; waiting for approval", "since": 1.0},
        "approval_needed": True,
        "gates": [{**gate, "checking": False, "last": None}],
    }
    shown = view_rollout.rollout_view(waiting)
    assert (shown["waiting"], shown["can_approve"], shown["details"]) == ("approval", True, [])
    assert shown["waits"] == [
        "waiting for approval: graysteer rollout approve ramp",
        "gate before promote http://g/ok: not asked yet",
    ]
    assert [s["note"] for s in shown["steps"]] == ["waiting for approval", "hold 60s", "last"]
    holding = view_rollout.rollout_view({**waiting, "waiting": None})
    assert (
        holding["waits"][0]
        == "approval needed after the hold (may be given now: graysteer rollout approve ramp)"
    )
    assert holding["steps"][0]["note"].endswith("left of 30s, then approval")
    last = {"passed": False, "detail": "HTTP 503: frozen", "seconds_ago": 2.5, "for_step": 1}
    gated = {
        **report,
        "step": 1,
        "waiting": {"on": "webhook", "reason": "waiting for the gate", "since": 1.0},
        "gates": [{**gate, "checking": True, "last": last}],
    }
    assert view_rollout.rollout_view(gated)["waits"] == [
        "gate before promote http://g/ok: waiting for it: "
        "not passed: HTTP 503: frozen, 2.5s ago (asking again)"
    ]
    ramp = {"from_weight": 50, "weight": 20, "seconds": 30.0, "remaining_seconds": 18.0}
    ramping = view_rollout.rollout_view({**report, "phase": "ramping_down", "ramp": ramp})
    assert ramping["waits"] == ["ramping down: canary weight 20 (from 50) to 0, 18s left of 30s"]
    assert "  ramping down: canary weight 20 (from 50) to 0, 18s left of 30s" in view_text.rollout_lines(
        ramping
    )


def test_traffic_not_read_is_said_never_shown_as_zero(tmp_path: Path) -> None:
    shown = view.build(status(tmp_path))
    assert shown["traffic"] == {
        "watching": False,
        "note": "not read by this process (serve --envoy-admin HOST:PORT)",
        "clusters": [],
    }
    traffic = view.traffic_view(
        {
            "watching": True,
            "source": "Envoy at 127.0.0.1:9901",
            "seconds": 5,
            "clusters": [
                {"cluster": "canary", "requests_per_second": 20, "error_ratio": 0.5},
                {"cluster": "graysteer", "requests_per_second": 25, "error_ratio": 0},  # not steered
            ],
        },
        ["stable", "canary"],
    )
    assert [(c["cluster"], c["shown"]) for c in traffic["clusters"]] == [
        ("stable", "0.0/s, 0.0% 5xx"),
        ("canary", "20.0/s, 50.0% 5xx"),
    ]
    assert traffic["note"] == "from Envoy at 127.0.0.1:9901, last 5s"


def test_bypass_is_the_last_reads_share_and_the_total() -> None:
    shown = view.bypass_view(
        {
            "watching": True,
            "stats_readable": True,
            "modes": [
                {
                    "mode": "ext_proc",
                    "bypassed_requests": "5",
                    "requests": "1000",
                    "window_bypassed": "1",
                    "window_requests": "50",
                }
            ],
        }
    )
    assert shown["modes"][0]["shown"] == "2.0% of the last read's 50 requests; 5 of 1000 (0.5%) in all"
    assert view.bypass_view({"watching": True, "stats_readable": False, "error": "refused"})["note"] == (
        "cannot read Envoy's stats: refused"
    )


def test_a_fleet_shows_its_replicas_versions_and_leader() -> None:
    fleet = {
        "fleet": "etcd://127.0.0.1:2379/app",
        "rules_version": "v2",
        "leader": "b",
        "replicas": [
            {
                "id": "a",
                "version": "v1",
                "file_version": "v1",
                "ready": True,
                "source_connected": True,
                "leader": False,
                "seen_seconds_ago": 0.4,
            },
            {
                "id": "b",
                "version": "v2",
                "file_version": "v2",
                "ready": True,
                "source_connected": True,
                "leader": True,
                "seen_seconds_ago": 0.2,
            },
        ],
    }
    shown = view.build(None, fleet, ["admin API at 127.0.0.1:1 is not reachable"])
    assert shown["table"] is None and shown["problems"] == ["admin API at 127.0.0.1:1 is not reachable"]
    a, b = shown["fleet"]["replicas"]
    assert a["shown"] == "serving v1, seen 0.4 s ago [not the pushed version]"
    assert b["shown"] == "serving v2, seen 0.2 s ago [leader]"
    text = view_text.lines(shown)
    assert "fleet etcd://127.0.0.1:2379/app: rules version v2, leader b" in text
    assert "! admin API at 127.0.0.1:1 is not reachable" in text


def test_the_plain_lines_carry_every_part_of_the_view(tmp_path: Path) -> None:
    shown = view.build(status(tmp_path, 80))
    text = "\n".join(view_text.lines(shown))
    for expected in (
        "split other",
        "rollout ramp: aborted: canary error rate 0.080 > max_error_rate 0.05",
        "[>] step 1: weight 10 (aborted)",
        "[ ] step 3: weight 100 (last)",
        "canary canary: 1000 responses in 30s (min 10); error rate 8.00% (max 5.00%, over)",
        "requests per cluster: not read by this process",
        "envoy bypass: not read by this process",
    ):
        assert expected in text, expected
    json.dumps(shown, allow_nan=False)
