"""A rollout's report: what /rollouts, the admin API (report_json), `graysteer status` and
the live views show of it, every wait included (an approval, a webhook gate with its last
answer, a ramp-down's progress)."""

from typing import Any

from sidecar.core.gates import shown_url
from sidecar.core.rollout import (
    PROGRESSING,
    RAMP_DOWN,
    RAMPING_DOWN,
    RolloutSpec,
    RolloutState,
    Verdict,
    canary_weight,
    guarding_gates,
    needs_approval,
)
from sidecar.rollouts.gates import GateChecks


def rollout_report(
    spec: RolloutSpec,
    state: RolloutState,
    verdict: Verdict,
    held: float,
    gates: GateChecks,
    state_problem: str | None,
) -> dict[str, Any]:
    """`held`: how long the current step (or the ramp) has been under way."""
    progressing = state.phase == PROGRESSING
    return {
        "rule": spec.rule,
        "phase": state.phase,
        "step": state.step,
        "steps": len(spec.steps),
        "canary": spec.canary,
        "baseline": spec.baseline,
        "canary_weight": canary_weight(spec, state),
        "total_weight": spec.total,
        "hold_remaining_seconds": max(0.0, round(spec.steps[state.step].hold - held, 3))
        if progressing
        else None,
        "reason": state.reason,
        "numbers": state.numbers,
        "verdict": verdict.outcome,
        "verdict_reason": verdict.reason,
        "state_problem": state_problem,
        "waiting": (
            {"on": state.waiting, "reason": state.reason, "since": state.changed_at}
            if progressing and state.waiting
            else None
        ),
        "approval_needed": progressing and needs_approval(spec, state),
        "approved_step": state.approved_step,
        "gates": gates_report(spec, state, gates),
        "on_failure": spec.on_failure,
        "ramp": ramp_report(spec, state, held),
        "analysis": {
            **verdict.numbers(),
            "window_seconds": spec.analysis.window,
            "min_requests": spec.analysis.min_requests,
            "max_error_rate": spec.analysis.max_error_rate,
            "max_error_rate_vs_stable": spec.analysis.max_error_rate_vs_stable,
            "max_p99_ms": spec.analysis.max_p99_ms,
        },
        "step_plan": [{"weight": s.weight, "hold_seconds": s.hold, "approve": s.approve} for s in spec.steps],
    }


def gates_report(spec: RolloutSpec, state: RolloutState, gates: GateChecks) -> list[dict[str, Any]]:
    """Each gate, whether it guards the pending move, and its last answer (known to the
    process that asked it: the leader of a fleet; elsewhere the stored reason says it)."""
    guarding = guarding_gates(spec, state) if state.phase == PROGRESSING else ()
    out = []
    for index, gate in enumerate(spec.gates):
        last = gates.last(spec.rule, index)
        out.append(
            {
                "url": shown_url(gate.url),
                "before": gate.before,
                "timeout_seconds": gate.timeout,
                "guards_next_move": index in guarding,
                "checking": gates.checking(spec.rule, index),
                "last": {
                    "passed": last[0].result.passed,
                    "detail": last[0].result.detail,
                    "seconds_ago": round(last[1], 1),
                    "for_step": last[0].move[1],
                }
                if last is not None and last[0].move[0] == state.fingerprint
                else None,
            }
        )
    return out


def ramp_report(spec: RolloutSpec, state: RolloutState, held: float) -> dict[str, Any] | None:
    if state.phase != RAMPING_DOWN or state.ramp is None or spec.on_failure != RAMP_DOWN:
        return None
    return {
        "from_weight": state.ramp.from_weight,
        "weight": state.ramp.weight,
        "seconds": spec.ramp_down,
        "remaining_seconds": max(0.0, round(spec.ramp_down - held, 1)),
    }


def metrics_report(spec: RolloutSpec, verdict: Verdict, age: float | None) -> list[dict[str, Any]]:
    """Each PromQL metric check: its value (and the baseline's) against its threshold, its
    outcome and why. `age`: seconds since the checks last ran here (None: they never did:
    only the process that moves the rollouts, a fleet's leader, queries Prometheus)."""
    results = {r.check.name: r for r in verdict.metrics}
    out = []
    for check in spec.analysis.metrics:
        result = results.get(check.name)
        out.append(
            {
                "name": check.name,
                "query": check.query,
                "threshold": check.threshold(),
                "limits": {
                    "max": check.max,
                    "min": check.min,
                    "max_vs_baseline": check.max_vs_baseline,
                    "min_vs_baseline": check.min_vs_baseline,
                },
                "dry_run": check.dry_run,
                "outcome": result.outcome if result else NOT_QUERIED,
                "reason": result.reason if result else NOT_QUERIED_REASON,
                "value": result.value if result else None,
                "baseline_value": result.baseline_value if result else None,
                "seconds_ago": round(age, 1) if age is not None and result else None,
            }
        )
    return out


NOT_QUERIED = "not queried"
NOT_QUERIED_REASON = "not queried by this process: the one that moves the rollouts (a fleet's leader) does"
