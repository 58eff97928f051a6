"""Progressive delivery, pure parts: spec validation, verdicts, p99, the state machine."""

import copy
from dataclasses import replace
from typing import Any

import pytest

from sidecar.core import RulesError, compile_table
from sidecar.core.rollout import (
    ABORTED,
    BREACH,
    HEALTHY,
    INCONCLUSIVE,
    PAUSED,
    PROGRESSING,
    PROMOTED,
    UNAVAILABLE,
    Analysis,
    ClusterWindow,
    RolloutState,
    StepClock,
    act,
    advance,
    canary_weight,
    judge,
    p99_from_buckets,
    parse_duration,
    start,
    unavailable,
)

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
                "steps": [{"weight": 5, "hold": "60s"}, {"weight": 25, "hold": "2m"}, {"weight": 100}],
                "analysis": {
                    "window": "30s",
                    "min_requests": 50,
                    "max_error_rate": 0.05,
                    "max_error_rate_vs_stable": 2.0,
                    "max_p99_ms": 800,
                },
                "on_failure": "rollback",
            },
        }
    ],
}


def spec_of(doc: dict[str, Any] = DOC) -> Any:
    return compile_table(doc, "v", "rules.yaml").rollouts["ramp"]


def with_rollout(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(DOC)
    doc["rules"][0]["rollout"].update(changes)
    return doc


def test_spec_compiles() -> None:
    spec = spec_of()
    assert (spec.canary, spec.baseline, spec.total) == ("canary", "stable", 100)
    assert [(s.weight, s.hold) for s in spec.steps] == [(5, 60.0), (25, 120.0), (100, 0.0)]
    assert spec.analysis.window == 30.0


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        (with_rollout(canary="cnary"), "field rollout.canary: 'cnary' is not an entry"),
        (with_rollout(steps=[{"weight": 50, "hold": "1s"}, {"weight": 10}]), "must not go down"),
        (with_rollout(steps=[{"weight": 150}]), "more than the split's total weight 100"),
        (with_rollout(steps=[{"weight": 5}, {"weight": 10}]), "every step but the last needs a hold"),
        (with_rollout(steps=[{"weight": 5, "hold": "soon"}, {"weight": 10}]), "is not a duration"),
        (with_rollout(steps=[{"weight": 5, "hold": "0s"}, {"weight": 10}]), "longer than 0"),
        (with_rollout(steps=[]), "field rollout.steps: must not be empty"),
        (with_rollout(on_failure="panic"), "field rollout.on_failure"),
        (
            with_rollout(analysis={"window": "30s", "min_requests": 0, "max_error_rate": 0.1}),
            "field rollout.analysis.min_requests",
        ),
        (
            with_rollout(analysis={"window": "30s", "min_requests": 5, "max_error_rate": 1.5}),
            "field rollout.analysis.max_error_rate",
        ),
        (
            with_rollout(analysis={"window": "1 minute", "min_requests": 5, "max_error_rate": 0.1}),
            "field rollout.analysis.window",
        ),
        (with_rollout(speed=3), "unknown key 'speed'"),
    ],
)
def test_spec_validation(doc: dict[str, Any], fragment: str) -> None:
    with pytest.raises(RulesError) as caught:
        compile_table(doc, "v", "rules.yaml")
    assert any(fragment in str(p) and "rule 'ramp' (rules[0])" in str(p) for p in caught.value.problems), (
        caught.value.problems
    )


def test_rollout_needs_a_split() -> None:
    doc = copy.deepcopy(DOC)
    doc["rules"][0]["route"] = "stable"
    del doc["rules"][0]["split"]
    with pytest.raises(RulesError, match="a rollout drives a split"):
        compile_table(doc, "v", "rules.yaml")


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("30s", 30), ("2m", 120), ("1h", 3600), ("1.5s", 1.5)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


ANALYSIS = Analysis(
    window=30, min_requests=50, max_error_rate=0.05, max_error_rate_vs_stable=2.0, max_p99_ms=800
)


@pytest.mark.parametrize(
    ("canary", "baseline", "outcome", "reason"),
    [
        (ClusterWindow(49, 49), ClusterWindow(1000, 0), INCONCLUSIVE, "fewer than min_requests"),
        (ClusterWindow(100, 1, 100.0), ClusterWindow(1000, 10), HEALTHY, "within"),
        (ClusterWindow(100, 6), ClusterWindow(1000, 0), BREACH, "max_error_rate"),
        (ClusterWindow(100, 3), ClusterWindow(1000, 10), BREACH, "x baseline"),  # 3% > 2 x 1%
        (ClusterWindow(100, 3), ClusterWindow(40, 0), HEALTHY, "within"),  # baseline too small: skipped
        (ClusterWindow(100, 0, 900.0), ClusterWindow(1000, 0), BREACH, "p99"),
    ],
)
def test_verdicts(canary: ClusterWindow, baseline: ClusterWindow, outcome: str, reason: str) -> None:
    verdict = judge(ANALYSIS, canary, baseline)
    assert verdict.outcome == outcome and reason in verdict.reason


def test_p99_from_bucket_deltas() -> None:
    bounds = [10.0, 100.0, 1000.0, float("inf")]
    assert p99_from_buckets(bounds, [0, 0, 0, 0]) is None
    assert p99_from_buckets(bounds, [100, 100, 100, 100]) == pytest.approx(9.9)
    assert p99_from_buckets(bounds, [50, 90, 100, 100]) == pytest.approx(100 + 900 * 0.9)
    assert p99_from_buckets(bounds, [0, 0, 0, 100]) == 1000.0


HEALTHY_V = judge(ANALYSIS, ClusterWindow(100, 0, 10.0), ClusterWindow(100, 0, 10.0))
THIN_V = judge(ANALYSIS, ClusterWindow(10, 0), ClusterWindow(100, 0))
BAD_V = judge(ANALYSIS, ClusterWindow(100, 30), ClusterWindow(100, 0))


def test_steps_advance_only_after_the_hold_with_a_healthy_verdict() -> None:
    spec = spec_of()
    state = start(spec, 0.0)
    assert canary_weight(spec, state) == 5
    assert advance(spec, state, 59.0, HEALTHY_V, held=59.0) == state  # hold not over
    assert advance(spec, state, 61.0, THIN_V, held=61.0) == state  # no verdict: no step
    assert advance(spec, state, 1e9, HEALTHY_V, held=59.0) == state  # the hold, not the wall clock
    state = advance(spec, state, 61.0, HEALTHY_V, held=61.0)
    assert (state.phase, state.step, canary_weight(spec, state)) == (PROGRESSING, 1, 25)
    assert (state.step_started, state.step_clock) == (61.0, None)  # the controller stamps its clock
    state = advance(spec, state, 61.0 + 121, HEALTHY_V, held=121.0)
    assert (state.phase, canary_weight(spec, state)) == (PROMOTED, 100)
    assert advance(spec, state, 1e9, BAD_V, held=1e9) == state  # promoted is final


@pytest.mark.parametrize(("on_failure", "phase", "weight"), [("rollback", ABORTED, 0), ("pause", PAUSED, 5)])
def test_breach(on_failure: str, phase: str, weight: int) -> None:
    spec = spec_of(with_rollout(on_failure=on_failure))
    state = advance(spec, start(spec, 0.0), 1.0, BAD_V, held=1.0)
    assert (state.phase, canary_weight(spec, state)) == (phase, weight)
    assert "max_error_rate" in state.reason and state.numbers["canary_error_rate"] == 0.3
    assert advance(spec, state, 100.0, HEALTHY_V, held=100.0) == state  # stays until an operator acts


def test_an_unavailable_analysis_neither_advances_nor_rolls_back() -> None:
    spec = spec_of()
    state = start(spec, 0.0)
    verdict = unavailable("Envoy's stats cannot be read")
    assert verdict.outcome == UNAVAILABLE and "analysis unavailable" in verdict.reason
    assert advance(spec, state, 1e6, verdict, held=1e6) == state


def test_operator_actions() -> None:
    spec = spec_of()
    state = start(spec, 0.0)
    paused = act(spec, state, "pause", 1.0)
    assert paused.phase == PAUSED
    resumed = act(spec, paused, "resume", 5.0)
    assert (resumed.phase, resumed.step_started) == (PROGRESSING, 5.0)
    aborted = act(spec, resumed, "abort", 6.0)
    assert canary_weight(spec, aborted) == 0
    assert act(spec, aborted, "resume", 7.0).step == 0
    promoted = act(spec, state, "promote", 8.0)
    assert (promoted.phase, canary_weight(spec, promoted)) == (PROMOTED, 100)
    with pytest.raises(ValueError, match="already progressing"):
        act(spec, state, "resume", 9.0)
    with pytest.raises(ValueError, match="unknown action"):
        act(spec, state, "yolo", 9.0)


def test_state_round_trip() -> None:
    state = advance(spec_of(), start(spec_of(), 0.0), 1.0, BAD_V, held=1.0)
    assert RolloutState.from_json(state.to_json()) == state
    clocked = replace(state, step_clock=StepClock("boot-1", 12.5))
    assert RolloutState.from_json(clocked.to_json()) == clocked


def test_a_saved_step_outside_the_spec_is_a_problem() -> None:
    from sidecar.core.rollout import state_problem

    spec = spec_of()
    state = start(spec, 0.0)
    assert state_problem(spec, state) is None
    assert "outside" in (state_problem(spec, replace(state, step=7)) or "")
    assert "outside" in (state_problem(spec, replace(state, step=-1)) or "")
    assert state_problem(spec, replace(state, step_started=float("nan")))
