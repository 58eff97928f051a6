"""The rollout controller with real files and real clocks' stand-ins: a stored state it
cannot read moves nothing, holds are measured on the process's own steady clock (never by
comparing wall clocks), an analysis that cannot run says so, followers show each step as
the store changes, and only the rollout sets a rollout rule's weights."""

import asyncio
import copy
import json
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from sidecar.core import compile_table
from sidecar.core.rollout import ABORTED, PROGRESSING, PROMOTED, RAMPING_DOWN, UNAVAILABLE, RolloutSpec, start
from sidecar.core.state import StateError
from sidecar.fleet.fleet import FleetClusters
from sidecar.ops.metrics import Metrics
from sidecar.rollouts.controller import RolloutController, http_view, rollout_weights
from sidecar.rollouts.destinations import GateDestinations
from sidecar.sources.file import RulesFile, watch_directory
from sidecar.sources.state_file import StateFile
from sidecar.stats.clusters import ClusterCounts
from sidecar.stats.envoy import EnvoyStats
from sidecar.table.reload import DrivenByRollout, Reloader

DOC: dict[str, Any] = {
    "version": 1,
    "clusters": ["stable", "canary"],
    "default": "stable",
    "rules": [
        {
            "name": "ramp",
            "split": {
                "key": ["header:u"],
                "to": [{"cluster": "stable", "weight": 100}, {"cluster": "canary", "weight": 0}],
            },
            "rollout": {
                "canary": "canary",
                "steps": [{"weight": 5, "hold": "2s"}, {"weight": 25, "hold": "2s"}, {"weight": 100}],
                "analysis": {"window": "30s", "min_requests": 10, "max_error_rate": 0.1},
                "on_failure": "rollback",
            },
        }
    ],
}
HOUR = 3600.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def files(tmp_path: Path) -> tuple[Path, Path]:
    rules, state = tmp_path / "rules.yaml", tmp_path / "state.json"
    rules.write_text(yaml.safe_dump(DOC))
    return rules, state


def healthy_clusters(at: float) -> FleetClusters:
    """A fleet's windows with plenty of healthy canary and stable traffic around `at`."""
    lanes = FleetClusters()
    bounds = (10.0, float("inf"))
    for t, n in ((at - 20, 0.0), (at - 10, 1000.0)):
        lanes.record("r", t, {c: ClusterCounts(n, 0, bounds, (n, n)) for c in ("canary", "stable")})
    lanes.read_at = float("inf")  # "just read", for as long as the test runs
    return lanes


def controller(
    rules: Path,
    state: Path,
    *,
    wall: Clock | None = None,
    steady: Clock | None = None,
    boot: str | None = "boot-a",
    analysis: Any = None,
    leads: bool = True,
    poll: float = 1.0,
) -> RolloutController:
    wall = wall or Clock(1_800_000_000.0)
    return RolloutController(
        Reloader(RulesFile(rules), Metrics(CollectorRegistry()), StateFile(state)),
        Metrics(CollectorRegistry()),
        analysis if analysis is not None else healthy_clusters(wall()),
        poll,
        clock=wall,
        leads=lambda: leads,
        steady=steady or Clock(100.0),
        boot_id=boot,
        gate_destinations=GateDestinations.parse(["127.0.0.1"]),  # the test gates listen on loopback
    )


def weight(c: RolloutController) -> int:
    split = c.reloader.table.rules[0].split
    assert split is not None
    return split.weights[1]


# ---- holds and clocks ----------------------------------------------------------------------------


@pytest.mark.parametrize("skew", [-HOUR, +HOUR], ids=["an-hour-behind", "an-hour-ahead"])
def test_a_leader_on_another_machine_holds_each_step_for_its_hold_whatever_its_wall_clock(
    tmp_path: Path, skew: float
) -> None:
    rules, state = files(tmp_path)
    first = controller(rules, state)
    asyncio.run(first.tick())  # starts the rollout: step 0, stamped with its machine's clock
    assert first.states["ramp"].step == 0 and weight(first) == 5
    # The lead passes to a replica whose wall clock is off by an hour, on another machine.
    wall = Clock(1_800_000_000.0 + skew)
    steady = Clock(5_000.0)
    second = controller(
        rules, state, wall=wall, steady=steady, boot="boot-b", analysis=healthy_clusters(wall())
    )
    asyncio.run(second.tick())
    assert second.states["ramp"].step == 0  # an hour ahead: not advanced at once
    steady.now += 1.5
    wall.now += 1.5
    asyncio.run(second.tick())
    assert second.states["ramp"].step == 0
    assert 0 < second.report()[0]["hold_remaining_seconds"] <= 0.5
    steady.now += 1.0
    wall.now += 1.0
    asyncio.run(second.tick())  # an hour behind: not held for an hour
    assert second.states["ramp"].step == 1 and weight(second) == 25


def test_a_restart_on_the_same_machine_boot_goes_on_with_the_hold(tmp_path: Path) -> None:
    rules, state = files(tmp_path)
    steady = Clock(100.0)
    first = controller(rules, state, steady=steady)
    asyncio.run(first.tick())
    saved = json.loads(state.read_text())["rollouts"]["ramp"]
    assert saved["step_clock"] == {"boot": "boot-a", "at": 100.0}
    steady.now = 101.5  # the process restarts 1.5 s into the 2 s hold, its wall clock stepped
    restarted = controller(rules, state, wall=Clock(1_700_000_000.0), steady=steady)
    asyncio.run(restarted.tick())
    assert restarted.states["ramp"].step == 0
    assert restarted.report()[0]["hold_remaining_seconds"] == pytest.approx(0.5)
    steady.now = 102.1
    asyncio.run(restarted.tick())
    assert restarted.states["ramp"].step == 1


# ---- a stored state that cannot be read moves nothing --------------------------------------------


@pytest.mark.parametrize(
    "corrupt",
    [
        "{garbage",
        '{"format": 1, "rollouts": {"ramp": {"phase": "progressing", "step": 0, "step_started": NaN}}}',
        '{"format": 1, "rollouts": {"ramp": {"phase": "progressing", "step": 99, "step_started": 1}}}',
        "",
    ],
    ids=["not-json", "nan", "step-out-of-range", "empty"],
)
def test_an_aborted_rollout_stays_aborted_while_its_state_cannot_be_read(
    tmp_path: Path, corrupt: str
) -> None:
    rules, state = files(tmp_path)
    leader = controller(rules, state)
    asyncio.run(leader.tick())
    asyncio.run(leader.action("ramp", "abort"))
    assert weight(leader) == 0
    if "99" in corrupt:  # the right fingerprint, a step the rollout does not have
        fingerprint = leader.specs()["ramp"].fingerprint
        corrupt = corrupt.replace('"step_started": 1', f'"step_started": 1, "fingerprint": "{fingerprint}"')
    state.write_text(corrupt)
    for _ in range(3):
        asyncio.run(leader.reloader.reload("watch"))
        asyncio.run(leader.tick())
    assert leader.states["ramp"].phase == ABORTED and weight(leader) == 0
    problem = leader.state_problem
    assert problem is not None and str(state) in problem
    status, report = http_view(leader, "/rollouts/ramp/check") or (0, {})
    assert status == 503 and report["state_problem"] == problem  # type: ignore[index]
    with pytest.raises(StateError, match="fix the stored state first"):
        asyncio.run(leader.action("ramp", "resume"))
    assert state.read_text() == corrupt  # nothing overwrote it
    if "99" in corrupt:  # a restart keeps the stored weights and acts on nothing
        restarted = controller(rules, state)
        asyncio.run(restarted.tick())
        assert restarted.state_problem is not None and weight(restarted) == 0
    else:  # a restart refuses to start over from the rules' weights, naming the file
        with pytest.raises(ValueError, match=str(state)):
            controller(rules, state)


def test_an_aborted_rollout_stays_aborted_when_its_state_file_is_removed(tmp_path: Path) -> None:
    """Read as "no state", a removed state file would start the rolled-back canary again."""
    rules, state = files(tmp_path)
    leader = controller(rules, state)
    asyncio.run(leader.tick())
    asyncio.run(leader.action("ramp", "abort"))
    aborted = state.read_bytes()
    state.unlink()
    asyncio.run(leader.tick())  # before any reload: the controller reads it gone
    assert leader.states["ramp"].phase == ABORTED and weight(leader) == 0
    assert leader.state_problem is not None and "was removed" in leader.state_problem
    asyncio.run(leader.reloader.reload("watch"))  # the watch: written back
    assert state.read_bytes() == aborted
    for _ in range(3):
        asyncio.run(leader.tick())
    assert leader.state_problem is None
    assert leader.states["ramp"].phase == ABORTED and weight(leader) == 0
    restarted = controller(rules, state)
    asyncio.run(restarted.tick())
    assert restarted.states["ramp"].phase == ABORTED and weight(restarted) == 0


def test_the_report_carries_the_step_plan_and_the_thresholds_a_view_draws(tmp_path: Path) -> None:
    rules, state = files(tmp_path)
    c = controller(rules, state)
    asyncio.run(c.tick())
    report = c.report()[0]
    assert report["step_plan"] == [
        {"weight": 5, "hold_seconds": 2.0, "approve": False},
        {"weight": 25, "hold_seconds": 2.0, "approve": False},
        {"weight": 100, "hold_seconds": 0.0, "approve": False},
    ]
    analysis = report["analysis"]
    assert (analysis["max_error_rate"], analysis["max_error_rate_vs_stable"], analysis["max_p99_ms"]) == (
        0.1,
        None,
        None,
    )
    json.dumps(report)  # it travels as JSON (the admin API's report_json, /rollouts)
    registry = c.metrics.registry  # the limits, for a dashboard to draw against each cluster's values
    labels = {"rule": "ramp", "cluster": "canary"}
    assert registry.get_sample_value("graysteer_rollout_max_error_ratio", labels) == 0.1
    assert registry.get_sample_value("graysteer_rollout_max_p99_seconds", labels) is None  # not set


# ---- an analysis that cannot run -----------------------------------------------------------------


def test_an_analysis_that_cannot_run_is_unavailable_never_healthy(tmp_path: Path) -> None:
    rules, state = files(tmp_path)
    with socket.socket() as closed:  # a port nobody listens on: Envoy's admin is away
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    stats = EnvoyStats(("127.0.0.1", port), 60)
    c = controller(rules, state, analysis=stats)
    asyncio.run(stats.poll(0.0))
    asyncio.run(c.tick())
    report = c.report()[0]
    assert report["verdict"] == UNAVAILABLE and "cannot be read" in report["verdict_reason"]
    status, _ = http_view(c, "/rollouts/ramp/check") or (0, None)
    assert status == 503
    registry = c.metrics.registry
    assert (
        registry.get_sample_value("graysteer_rollout_verdict", {"rule": "ramp", "verdict": UNAVAILABLE}) == 1
    )
    assert c.states["ramp"].phase == PROGRESSING and c.states["ramp"].step == 0  # no step, no rollback


def test_a_failing_analysis_is_unavailable(tmp_path: Path) -> None:
    rules, state = files(tmp_path)

    class Broken(FleetClusters):
        def cluster_window(self, lane: str, seconds: float, now: float) -> Any:
            raise ValueError("cannot convert float NaN to integer")

    broken = Broken()
    broken.read_at = float("inf")
    c = controller(rules, state, analysis=broken)
    asyncio.run(c.tick())
    assert c.report()[0]["verdict"] == UNAVAILABLE and "NaN" in c.report()[0]["verdict_reason"]


def rollout_series(c: RolloutController) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in c.metrics.registry.collect()
        if family.name.startswith("graysteer_rollout_") and family.type == "gauge"
        for sample in family.samples
    }


def test_a_rollout_that_leaves_the_table_leaves_no_series_behind(tmp_path: Path) -> None:
    doc = copy.deepcopy(DOC)
    doc["rules"][0]["rollout"]["analysis"]["max_p99_ms"] = 800
    rules, state = files(tmp_path)
    rules.write_text(yaml.safe_dump(doc))
    c = controller(rules, state)
    asyncio.run(c.reloader.reload("test"))
    asyncio.run(c.tick())
    names = {name for name, _ in rollout_series(c)}
    assert {
        "graysteer_rollout_step",
        "graysteer_rollout_max_p99_seconds",
        "graysteer_rollout_verdict",
    } <= names

    del doc["rules"][0]["rollout"]["analysis"]["max_p99_ms"]  # a limit the rollout no longer sets
    rules.write_text(yaml.safe_dump(doc))
    asyncio.run(c.reloader.reload("test"))
    asyncio.run(c.tick())
    names = {name for name, _ in rollout_series(c)}
    assert "graysteer_rollout_max_p99_seconds" not in names and "graysteer_rollout_step" in names

    del doc["rules"][0]["rollout"]  # the rollout is over: the rule is a plain split again
    rules.write_text(yaml.safe_dump(doc))
    asyncio.run(c.reloader.reload("test"))
    asyncio.run(c.tick())
    assert rollout_series(c) == set()


# ---- followers ----------------------------------------------------------------------------------


def test_a_follower_shows_each_step_when_the_store_changes_not_at_its_next_poll(tmp_path: Path) -> None:
    rules, state = files(tmp_path)
    leader = controller(rules, state)
    asyncio.run(leader.tick())
    follower = controller(rules, state, leads=False, poll=HOUR)

    def step_shown() -> float | None:
        return follower.metrics.registry.get_sample_value("graysteer_rollout_step", {"rule": "ramp"})

    async def scenario() -> None:
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(follower.run(stop)),  # one tick now, the next in an hour
            asyncio.create_task(follower.follow()),
            asyncio.create_task(watch_directory(state, lambda: follower.reloader.reload("watch"), stop)),
        ]
        try:
            for _ in range(100):
                if step_shown() == 0:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # the watch is set up
            await leader.action("ramp", "promote")
            for _ in range(250):  # up to 5 s
                if step_shown() == 2:
                    break
                await asyncio.sleep(0.02)
            assert step_shown() == 2
            assert follower.states["ramp"].phase == PROMOTED
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())


# ---- only the rollout sets a rollout rule's weights ----------------------------------------------


@pytest.mark.parametrize("phase", ["progressing", "pause", "abort", "promote"])
def test_set_weights_is_refused_on_a_rollout_rule_in_every_phase(tmp_path: Path, phase: str) -> None:
    rules, state = files(tmp_path)
    c = controller(rules, state)
    asyncio.run(c.tick())
    if phase != "progressing":
        asyncio.run(c.action("ramp", phase))
    before = weight(c)
    with pytest.raises(DrivenByRollout, match=r"rule 'ramp' has a rollout.*graysteer rollout"):
        asyncio.run(c.reloader.set_weights("ramp", {"canary": 33}))
    for _ in range(3):  # and the next ticks keep the rollout's weight
        asyncio.run(c.tick())
    assert weight(c) == before


def test_a_new_rollout_state_is_schema_valid(tmp_path: Path) -> None:
    rules, state = files(tmp_path)
    c = controller(rules, state)
    asyncio.run(c.tick())
    stored = StateFile(state).load()  # parses and validates what the controller wrote
    assert stored["rollouts"]["ramp"]["phase"] == PROGRESSING
    assert start(c.specs()["ramp"], 0.0).fingerprint == stored["rollouts"]["ramp"]["fingerprint"]


def spec_of(doc: dict[str, Any]) -> RolloutSpec:
    return compile_table(doc, "v", "rules.yaml").rollouts["ramp"]


def test_split_weights_keep_the_total() -> None:
    spec = spec_of(DOC)
    assert rollout_weights(spec, {"stable": 100, "canary": 0}, 25) == {"stable": 75, "canary": 25}
    three = copy.deepcopy(DOC)
    three["clusters"].append("v3")
    three["rules"][0]["split"]["to"] = [
        {"cluster": "stable", "weight": 60},
        {"cluster": "v3", "weight": 30},
        {"cluster": "canary", "weight": 10},
    ]
    spec3 = spec_of(three)
    assert rollout_weights(spec3, {"stable": 60, "v3": 30, "canary": 10}, 40) == {
        "stable": 40,
        "v3": 20,
        "canary": 40,
    }


# ---- approvals, webhook gates, ramp-down ---------------------------------------------------------


def files_with(tmp_path: Path, **rollout: Any) -> tuple[Path, Path]:
    doc = copy.deepcopy(DOC)
    doc["rules"][0]["rollout"].update(rollout)
    rules, state = tmp_path / "rules.yaml", tmp_path / "state.json"
    rules.write_text(yaml.safe_dump(doc))
    return rules, state


def waiting_shown(c: RolloutController, on: str) -> float | None:
    return c.metrics.registry.get_sample_value("graysteer_rollout_waiting", {"rule": "ramp", "on": on})


def test_an_approval_then_a_webhook_gate_hold_the_rollout_and_each_wait_is_reported(tmp_path: Path) -> None:
    from tests.rollouts.gate_server import gate_server
    from tests.rollouts.test_gates import until

    steps = [{"weight": 5, "hold": "2s", "approve": True}, {"weight": 25, "hold": "2s"}, {"weight": 100}]

    async def scenario(server: Any) -> None:
        rules, state = files_with(tmp_path, steps=steps, gates=[{"url": server.url, "before": "promote"}])
        steady, wall = Clock(100.0), Clock(1_800_000_000.0)
        c = controller(rules, state, steady=steady, wall=wall)

        def later(seconds: float) -> None:
            steady.now += seconds
            wall.now += seconds

        await c.tick()
        assert c.report()[0]["approval_needed"] and c.report()[0]["waiting"] is None  # holding
        later(2.5)
        await c.tick()
        report = c.report()[0]
        assert (report["waiting"]["on"], report["step"], weight(c)) == ("approval", 0, 5)
        assert (waiting_shown(c, "approval"), waiting_shown(c, "webhook")) == (1, 0)
        assert json.loads(state.read_text())["rollouts"]["ramp"]["waiting"] == "approval"  # followers see it
        assert server.received == []  # the promotion's gate is not asked before its move
        await c.action("ramp", "approve")
        await c.action("ramp", "approve")  # twice is once
        await c.tick()
        assert (c.states["ramp"].step, weight(c)) == (1, 25)
        with pytest.raises(ValueError, match=r"step 1 \(weight 25\) needs no approval"):
            await c.action("ramp", "approve")
        later(2.5)
        await c.tick()  # the promotion is due: its gate is asked, in the background
        assert c.report()[0]["waiting"]["on"] == "webhook" and waiting_shown(c, "webhook") == 1
        await until(lambda: c.report()[0]["gates"][0]["last"] is not None)
        await c.tick()
        report = c.report()[0]
        assert "HTTP 503: change freeze" in report["reason"] and report["phase"] == "progressing"
        assert report["gates"][0]["last"]["detail"] == "HTTP 503: change freeze" and weight(c) == 25
        server.status = 200
        later(5.0)  # the gate's next check, at the recheck pace
        await c.tick()
        await until(lambda: c.report()[0]["gates"][0]["last"]["passed"])
        await c.tick()
        assert (c.states["ramp"].phase, weight(c)) == (PROMOTED, 100)
        assert waiting_shown(c, "webhook") == 0 and len(server.received) == 2
        assert server.received[-1]["from"] == {"step": 1, "weight": 25}

    with gate_server() as server:
        asyncio.run(scenario(server))


def breaching_clusters(at: float) -> FleetClusters:
    """Windows in which half the canary's responses fail."""
    lanes = FleetClusters()
    bounds = (10.0, float("inf"))
    for t, n in ((at - 20, 0.0), (at - 10, 1000.0)):
        lanes.record(
            "r",
            t,
            {
                c: ClusterCounts(n, n / 2 if c == "canary" else 0, bounds, (n, n))
                for c in ("canary", "stable")
            },
        )
    lanes.read_at = float("inf")
    return lanes


def test_a_ramp_down_lowers_the_applied_weight_each_tick_then_aborts(tmp_path: Path) -> None:
    rules, state = files_with(tmp_path, on_failure={"ramp_down": "10s"})
    steady, wall = Clock(100.0), Clock(1_800_000_000.0)
    c = controller(rules, state, steady=steady, wall=wall, analysis=breaching_clusters(wall()))
    asyncio.run(c.tick())  # started at weight 5, breached at once: the ramp begins at 5
    assert (c.states["ramp"].phase, weight(c)) == (RAMPING_DOWN, 5)
    shown = []
    for _ in range(5):
        steady.now += 2.0
        asyncio.run(c.tick())
        shown.append((c.states["ramp"].phase, weight(c), c.report()[0]["canary_weight"]))
    # 5 x 8/10, 6/10, 4/10, 2/10 rounded up; then 0 and aborted at 10 s
    assert shown == [(RAMPING_DOWN, w, w) for w in (4, 3, 2, 1)] + [(ABORTED, 0, 0)]
    assert (
        "max_error_rate" in c.states["ramp"].reason and c.states["ramp"].numbers["canary_error_rate"] == 0.5
    )
    assert StateFile(state).load()["rollouts"]["ramp"]["phase"] == ABORTED  # schema-valid all along


def test_an_abort_during_a_ramp_goes_to_zero_at_once_and_check_fails_while_ramping(tmp_path: Path) -> None:
    rules, state = files_with(tmp_path, on_failure={"ramp_down": "10s"})
    wall = Clock(1_800_000_000.0)
    c = controller(rules, state, wall=wall, analysis=breaching_clusters(wall()))
    asyncio.run(c.tick())
    report = c.report()[0]
    assert report["ramp"] == {"from_weight": 5, "weight": 5, "seconds": 10.0, "remaining_seconds": 10.0}
    assert (http_view(c, "/rollouts/ramp/check") or (0,))[0] == 503
    asyncio.run(c.action("ramp", "abort"))
    assert (c.states["ramp"].phase, weight(c), c.report()[0]["ramp"]) == (ABORTED, 0, None)
