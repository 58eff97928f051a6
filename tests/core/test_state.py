"""The runtime state's schema: what the sidecar writes passes; anything a hand, a bug or an
attacker could put in the store that would move traffic if read does not."""

from typing import Any

import pytest

from sidecar.core.rollout import RolloutState, StepClock
from sidecar.core.state import STATE_FORMAT, state_problems


def test_what_the_sidecar_writes_passes() -> None:
    rollout = RolloutState("paused", 1, 1.7e9, "why", {"n": 1}, "abc123", 1.7e9, StepClock("boot", 12.5))
    document = {
        "format": STATE_FORMAT,
        "weight_overrides": {
            "ramp": {"weights": {"stable": 80, "canary": 20}, "base": {"stable": 90, "canary": 10}}
        },
        "rollouts": {"ramp": rollout.to_json()},
        "a_newer_section": {"kept": True},  # a newer sidecar's addition does not stop this one
    }
    assert state_problems(document) == []


@pytest.mark.parametrize(
    ("document", "where"),
    [
        ({}, "format"),
        ({"format": 2}, "format"),
        (
            {"format": 1, "weight_overrides": {"r": {"weights": {"a": -1}, "base": {}}}},
            "weight_overrides/r/weights/a",
        ),
        (
            {"format": 1, "weight_overrides": {"r": {"weights": {"a": 1.5}, "base": {}}}},
            "weight_overrides/r/weights/a",
        ),
        ({"format": 1, "weight_overrides": {"r": {"weights": {}}}}, "weight_overrides/r"),
        (
            {"format": 1, "rollouts": {"r": {"phase": "dancing", "step": 0, "step_started": 0}}},
            "rollouts/r/phase",
        ),
        (
            {"format": 1, "rollouts": {"r": {"phase": "paused", "step": -1, "step_started": 0}}},
            "rollouts/r/step",
        ),
        (
            {"format": 1, "rollouts": {"r": {"phase": "paused", "step": 0, "step_started": "x"}}},
            "step_started",
        ),
        (
            {
                "format": 1,
                "rollouts": {"r": {"phase": "paused", "step": 0, "step_started": 0, "step_clock": {}}},
            },
            "step_clock",
        ),
        (
            {
                "format": 1,
                "rollouts": {"r": {"phase": "progressing", "step": 0, "step_started": 0, "waiting": "x"}},
            },
            "rollouts/r/waiting",
        ),
        (
            {
                "format": 1,
                "rollouts": {
                    "r": {"phase": "ramping_down", "step": 0, "step_started": 0, "ramp": {"from": 5}}
                },
            },
            "rollouts/r/ramp",
        ),
        (
            {
                "format": 1,
                "rollouts": {"r": {"phase": "paused", "step": 0, "step_started": 0, "approved_step": -1}},
            },
            "rollouts/r/approved_step",
        ),
        ([], "(document)"),
    ],
)
def test_a_state_that_would_move_traffic_is_refused_with_its_place(document: Any, where: str) -> None:
    problems = state_problems(document)
    assert problems and any(where in p for p in problems), problems
