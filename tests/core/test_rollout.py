"""Progressive delivery, pure parts: spec validation, verdicts, p99, the state machine."""

import copy
from dataclasses import replace
from typing import Any

import pytest

from sidecar.core import RulesError, compile_table
from sidecar.core.actions import act
from sidecar.core.gates import GateResult
from sidecar.core.rollout import (
    ABORTED,
    BREACH,
    HEALTHY,
    INCONCLUSIVE,
    PAUSED,
    PROGRESSING,
    PROMOTED,
    RAMPING_DOWN,
    UNAVAILABLE,
    Analysis,
    ClusterWindow,
    Ramp,
    RolloutState,
    StepClock,
    advance,
    canary_weight,
    due_gates,
    judge,
    p99_from_buckets,
    parse_duration,
    ramp_weight,
    start,
    state_problem,
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


@pytest.mark.parametrize("text", ["\u0663s", "\uff130s", "1\u066b5s", "30", "s", "-1s", "1e3s", "30 s"])
def test_durations_are_ascii_numbers_with_a_unit(text: str) -> None:
    """Other scripts' digits read as numbers by float(): refused, as everywhere else."""
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


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
    spec = spec_of()
    state = start(spec, 0.0)
    assert state_problem(spec, state) is None
    assert "outside" in (state_problem(spec, replace(state, step=7)) or "")
    assert "outside" in (state_problem(spec, replace(state, step=-1)) or "")
    assert state_problem(spec, replace(state, step_started=float("nan")))


# ---- approvals, webhook gates, ramp-down -------------------------------------------------------

APPROVAL_STEPS = [
    {"weight": 5, "hold": "60s"},
    {"weight": 25, "hold": "2m", "approve": True},
    {"weight": 100},
]
GATES = [
    {"url": "http://gates.example:8080/promote?token=s3cret", "before": "promote"},
    {"url": "https://user:pw@gates.example/every", "before": "step", "timeout": "2s"},
]


def at_step_1(spec: Any) -> RolloutState:
    return replace(
        start(spec, 0.0), step=1, step_started=61.0, reason="step 2 of 3 after a healthy hold of 60s"
    )


def test_the_new_fields_compile() -> None:
    spec = spec_of(with_rollout(steps=APPROVAL_STEPS, gates=GATES, on_failure={"ramp_down": "30s"}))
    assert [s.approve for s in spec.steps] == [False, True, False]
    assert [(g.before, g.timeout) for g in spec.gates] == [("promote", 5.0), ("step", 2.0)]
    assert (spec.on_failure, spec.ramp_down) == ("ramp_down", 30.0)
    assert (spec_of().ramp_down, spec_of().gates) == (0.0, ())


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        (
            {"steps": [{"weight": 5, "hold": "1s"}, {"weight": 100, "approve": True}]},
            "the last step is the promotion",
        ),
        (
            {"steps": [{"weight": 5, "hold": "1s", "approve": "yes"}, {"weight": 100}]},
            "must be true or false",
        ),
        ({"gates": [{"url": "ftp://gates.example/x", "before": "promote"}]}, "absolute http:// or https://"),
        ({"gates": [{"url": "/relative", "before": "promote"}]}, "absolute http:// or https://"),
        ({"gates": [{"url": "http://", "before": "promote"}]}, "with a host"),
        ({"gates": [{"url": "http://h:99999/", "before": "promote"}]}, "is not a URL"),
        ({"gates": [{"url": "http://h/", "before": "later"}]}, "field rollout.gates[0].before"),
        ({"gates": [{"url": "http://h/", "before": "step", "timeout": "2m"}]}, "at most 60s"),
        ({"gates": [{"url": "http://h/", "before": "step", "timeout": "0s"}]}, "longer than 0"),
        ({"gates": [{"before": "step"}]}, "'url' is required"),
        (
            {"on_failure": {"ramp_down": "soon"}},
            "field rollout.on_failure.ramp_down: 'soon' is not a duration",
        ),
        ({"on_failure": {"ramp_down": 30}}, "must be rollback, pause, or {ramp_down: DURATION}"),
        ({"on_failure": {"rampdown": "30s"}}, "must be rollback, pause, or {ramp_down: DURATION}"),
    ],
)
def test_the_new_fields_are_validated(changes: dict[str, Any], fragment: str) -> None:
    test_spec_validation(with_rollout(**changes), fragment)


def test_an_approval_step_holds_then_waits_for_approval_and_no_longer() -> None:
    spec = spec_of(with_rollout(steps=APPROVAL_STEPS))
    state = at_step_1(spec)
    assert advance(spec, state, 100.0, HEALTHY_V, held=100.0) == state  # still holding
    waiting = advance(spec, state, 182.0, HEALTHY_V, held=121.0)
    assert (waiting.phase, waiting.step, waiting.waiting, canary_weight(spec, waiting)) == (
        PROGRESSING,
        1,
        "approval",
        25,
    )
    assert waiting.reason == "held 120s at weight 25; waiting for approval (graysteer rollout approve ramp)"
    assert waiting.changed_at == 182.0
    assert advance(spec, waiting, 500.0, HEALTHY_V, held=439.0) == waiting  # waits, unchanged
    assert advance(spec, waiting, 500.0, THIN_V, held=439.0) == waiting  # an approval is no verdict
    approved = act(spec, waiting, "approve", 501.0)
    assert (approved.waiting, approved.approved_step) == ("", 1)
    assert approved.reason == "step 1 (weight 25) approved by an operator"
    assert advance(spec, approved, 502.0, THIN_V, held=441.0) == approved  # the verdict still counts
    promoted = advance(spec, approved, 503.0, HEALTHY_V, held=442.0)
    assert (promoted.phase, canary_weight(spec, promoted)) == (PROMOTED, 100)
    assert promoted.reason == "every step passed its analysis and an operator's approval"
    assert (promoted.waiting, promoted.approved_step) == ("", None)


def test_an_approval_given_during_the_hold_counts_when_the_hold_ends() -> None:
    spec = spec_of(with_rollout(steps=APPROVAL_STEPS))
    approved = act(spec, at_step_1(spec), "approve", 70.0)
    assert act(spec, approved, "approve", 71.0) == approved  # twice is once
    assert advance(spec, approved, 100.0, HEALTHY_V, held=39.0) == approved  # the hold still counts
    assert advance(spec, approved, 182.0, HEALTHY_V, held=121.0).phase == PROMOTED


def test_a_breach_while_waiting_for_approval_fails_as_ever() -> None:
    spec = spec_of(with_rollout(steps=APPROVAL_STEPS))
    waiting = advance(spec, at_step_1(spec), 182.0, HEALTHY_V, held=121.0)
    aborted = advance(spec, waiting, 183.0, BAD_V, held=122.0)
    assert (aborted.phase, aborted.waiting, canary_weight(spec, aborted)) == (ABORTED, "", 0)


def test_approve_is_refused_where_nothing_waits_for_it() -> None:
    spec = spec_of(with_rollout(steps=APPROVAL_STEPS))
    with pytest.raises(ValueError, match=r"step 0 \(weight 5\) needs no approval \(steps that do: 1\)"):
        act(spec, start(spec, 0.0), "approve", 1.0)
    with pytest.raises(ValueError, match="no step of this rollout asks for one"):
        act(spec_of(), start(spec_of(), 0.0), "approve", 1.0)
    paused = act(spec, at_step_1(spec), "pause", 70.0)
    with pytest.raises(ValueError, match="cannot approve a rollout that is paused"):
        act(spec, paused, "approve", 71.0)
    # a resumed step is held, then approved, again
    resumed = act(spec, act(spec, act(spec, at_step_1(spec), "approve", 70.0), "pause", 71.0), "resume", 72.0)
    assert resumed.approved_step is None


def test_gates_guard_the_moves_they_name_and_are_asked_only_when_the_move_is_due() -> None:
    spec = spec_of(with_rollout(gates=GATES))
    state = start(spec, 0.0)
    # step 0 -> 1 is not the promotion: only the `before: step` gate guards it
    assert due_gates(spec, state, HEALTHY_V, held=59.0) == ()  # still holding
    assert due_gates(spec, state, THIN_V, held=61.0) == ()  # no verdict
    assert due_gates(spec, state, HEALTHY_V, held=61.0) == (1,)
    asking = advance(spec, state, 61.0, HEALTHY_V, held=61.0)
    assert (asking.step, asking.waiting) == (0, "webhook")
    assert asking.reason == "waiting for the gate before step https://***@gates.example/every: asking"
    failing = advance(spec, asking, 62.0, HEALTHY_V, held=62.0, gates={1: GateResult(False, "HTTP 503")})
    assert failing.reason == "waiting for the gate before step https://***@gates.example/every: HTTP 503"
    assert (failing.changed_at, canary_weight(spec, failing)) == (61.0, 5)  # waiting since 61
    stepped = advance(spec, failing, 63.0, HEALTHY_V, held=63.0, gates={1: GateResult(True, "HTTP 200")})
    assert (stepped.step, stepped.waiting) == (1, "")
    assert stepped.reason == "step 2 of 3 after a healthy hold of 60s and its gates"
    # step 1 -> 2 is the promotion: both guard it, each must pass
    assert due_gates(spec, stepped, HEALTHY_V, held=121.0) == (0, 1)
    one = advance(spec, stepped, 200.0, HEALTHY_V, held=121.0, gates={1: GateResult(True, "HTTP 200")})
    # the whole destination, its query's secrets hidden
    assert (
        one.reason
        == "waiting for the gate before promote http://gates.example:8080/promote?token=***: asking"
    )
    assert advance(spec, one, 201.0, BAD_V, held=122.0).phase == ABORTED  # a breach never waits
    both = {0: GateResult(True, "HTTP 204"), 1: GateResult(True, "HTTP 200")}
    assert advance(spec, one, 202.0, HEALTHY_V, held=123.0, gates=both).phase == PROMOTED


def test_an_approval_comes_before_the_gates() -> None:
    spec = spec_of(with_rollout(steps=APPROVAL_STEPS, gates=GATES[:1]))
    state = at_step_1(spec)
    assert due_gates(spec, state, HEALTHY_V, held=121.0) == ()
    assert advance(spec, state, 182.0, HEALTHY_V, held=121.0).waiting == "approval"
    approved = act(spec, state, "approve", 100.0)
    assert due_gates(spec, approved, HEALTHY_V, held=121.0) == (0,)
    promoted = advance(spec, approved, 182.0, HEALTHY_V, held=121.0, gates={0: GateResult(True, "HTTP 200")})
    assert promoted.reason == "every step passed its analysis and an operator's approval and its gates"


@pytest.mark.parametrize(
    ("start_weight", "seconds", "elapsed", "weight"),
    [
        (25, 30, 0, 25),
        (25, 30, 6, 20),  # 25 x 24/30
        (25, 30, 12, 15),
        (25, 30, 29, 1),  # 0.83, rounded up: 0 only when the ramp ends
        (25, 30, 30, 0),
        (25, 3, 1.2, 15),  # 25 x 1.8/3 = 15.000000000000002 in floats: still 15
        (25, 0, 0, 0),
    ],
)
def test_ramp_weights(start_weight: int, seconds: float, elapsed: float, weight: int) -> None:
    assert ramp_weight(start_weight, seconds, elapsed) == weight


def test_a_breach_with_ramp_down_lowers_the_canary_over_the_duration_then_aborts() -> None:
    spec = spec_of(with_rollout(on_failure={"ramp_down": "30s"}))
    state = at_step_1(spec)
    ramping = advance(spec, state, 100.0, BAD_V, held=39.0)
    assert (ramping.phase, canary_weight(spec, ramping), ramping.ramp) == (RAMPING_DOWN, 25, Ramp(25, 25))
    assert (ramping.step_started, ramping.step_clock) == (100.0, None)  # the ramp's own clock starts
    assert "max_error_rate" in ramping.reason and ramping.numbers["canary_error_rate"] == 0.3
    weights = []
    for held in (6.0, 12.0, 29.0):
        ramping = advance(spec, ramping, 100.0 + held, HEALTHY_V, held=held)  # verdicts no longer count
        weights.append(canary_weight(spec, ramping))
    assert weights == [20, 15, 1]
    assert advance(spec, ramping, 129.5, HEALTHY_V, held=29.5) == ramping  # no change, no write
    assert advance(spec, ramping, 110.0, HEALTHY_V, held=3.0) == ramping  # a new leader's clock: never up
    aborted = advance(spec, ramping, 130.0, HEALTHY_V, held=30.0)
    assert (aborted.phase, canary_weight(spec, aborted), aborted.ramp) == (ABORTED, 0, None)
    assert aborted.reason == ramping.reason and aborted.numbers["canary_error_rate"] == 0.3


def test_operator_actions_during_a_ramp() -> None:
    spec = spec_of(with_rollout(on_failure={"ramp_down": "30s"}))
    ramping = advance(spec, at_step_1(spec), 100.0, BAD_V, held=39.0)
    aborted = act(spec, ramping, "abort", 101.0)
    assert (aborted.phase, canary_weight(spec, aborted), aborted.ramp) == (ABORTED, 0, None)
    with pytest.raises(ValueError, match="cannot pause a rollout that is ramping_down"):
        act(spec, ramping, "pause", 101.0)
    resumed = act(spec, ramping, "resume", 102.0)
    assert (resumed.phase, resumed.step, resumed.ramp, canary_weight(spec, resumed)) == (
        PROGRESSING,
        0,
        None,
        5,
    )


def test_the_new_state_fields_round_trip_and_old_states_load() -> None:
    spec = spec_of(with_rollout(on_failure={"ramp_down": "30s"}))
    ramping = advance(spec, at_step_1(spec), 100.0, BAD_V, held=39.0)
    waiting = replace(at_step_1(spec), waiting="approval", approved_step=0)
    for state in (ramping, waiting):
        assert RolloutState.from_json(state.to_json()) == state
    old = RolloutState.from_json({"phase": "paused", "step": 1, "step_started": 5.0})
    assert (old.waiting, old.approved_step, old.ramp) == ("", None, None)
    assert "ramping down without a ramp" in (state_problem(spec, replace(ramping, ramp=None)) or "")
    assert state_problem(spec, replace(ramping, ramp=Ramp(500, 500)))


def test_a_wait_for_many_gates_stays_within_the_stored_states_bounds() -> None:
    from sidecar.core.state import STATE_FORMAT, state_problems

    gates = [{"url": f"https://gate{i}.example/{'p' * 1000}", "before": "step"} for i in range(8)]
    spec = spec_of(with_rollout(gates=gates))
    waiting = advance(spec, start(spec, 0.0), 61.0, HEALTHY_V, held=61.0)
    assert waiting.waiting == "webhook" and len(waiting.reason) == 1000
    assert state_problems({"format": STATE_FORMAT, "rollouts": {"ramp": waiting.to_json()}}) == []
