"""An operator's actions on a rollout (`graysteer rollout ACTION RULE`, the admin API's
Rollout, the live page's buttons): pure, as the state machine they act on."""

from dataclasses import replace

from sidecar.core.rollout import (
    ABORTED,
    PAUSED,
    PROGRESSING,
    PROMOTED,
    RAMPING_DOWN,
    RolloutSpec,
    RolloutState,
)

ACTIONS = ("promote", "pause", "resume", "abort", "approve")


def act(spec: RolloutSpec, state: RolloutState, action: str, now: float) -> RolloutState:
    """An operator's action: promote, pause, resume, abort, approve. ValueError if it makes
    no sense."""
    done = replace(state, changed_at=now, waiting="", ramp=None)  # what every action but approve clears
    if action == "promote":
        return replace(
            done,
            phase=PROMOTED,
            step=len(spec.steps) - 1,
            step_started=now,
            step_clock=None,
            reason="promoted by an operator",
        )
    if action == "abort":  # while ramping down too: the canary's weight goes to 0 at once
        return replace(done, phase=ABORTED, reason="aborted by an operator")
    if action == "pause":
        if state.phase != PROGRESSING:
            raise ValueError(f"cannot pause a rollout that is {state.phase}")
        return replace(done, phase=PAUSED, reason="paused by an operator")
    if action == "resume":
        if state.phase == PROGRESSING:
            raise ValueError("the rollout is already progressing")
        step = 0 if state.phase in (ABORTED, PROMOTED, RAMPING_DOWN) else state.step
        return replace(
            done,
            phase=PROGRESSING,
            step=step,
            step_started=now,
            step_clock=None,
            reason="resumed by an operator",
            approved_step=None,  # the step is held again before it can be approved again
        )
    if action == "approve":
        return _approve(spec, state, now)
    raise ValueError(f"unknown action {action!r} ({', '.join(ACTIONS)})")


def _approve(spec: RolloutSpec, state: RolloutState, now: float) -> RolloutState:
    """The current step's approval: counts whether its hold is over or not."""
    if state.phase != PROGRESSING:
        raise ValueError(f"cannot approve a rollout that is {state.phase}: only a progressing step waits")
    step = spec.steps[state.step]
    if not step.approve:
        asking = ", ".join(str(i) for i, s in enumerate(spec.steps) if s.approve)
        which = f"steps that do: {asking}" if asking else "no step of this rollout asks for one"
        raise ValueError(f"step {state.step} (weight {step.weight}) needs no approval ({which})")
    if state.approved_step == state.step:
        return state
    return replace(
        state,
        approved_step=state.step,
        waiting="",
        reason=f"step {state.step} (weight {step.weight}) approved by an operator",
        changed_at=now,
    )
