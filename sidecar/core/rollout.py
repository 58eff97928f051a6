"""Progressive delivery, the pure part: a rollout's spec, the analysis of a window of cluster
statistics, the verdict, and the state machine that turns time and verdicts into weights.

No clock, no I/O: the controller (sidecar/rollouts/controller.py) passes `now` (wall time, for
the record), how long the current step has been held (measured on its own clock, see there),
the observed counts and the webhook gates' last answers in, and applies the weights that come
out.
"""

import bisect
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sidecar.core.gates import Gate, GateResult, gate_wait
from sidecar.core.metric_checks import BREACH as METRIC_BREACH
from sidecar.core.metric_checks import INCONCLUSIVE as METRIC_INCONCLUSIVE
from sidecar.core.metric_checks import MetricCheck, MetricResult

PROGRESSING, PAUSED, PROMOTED, ABORTED = "progressing", "paused", "promoted", "aborted"
# After a breach with `on_failure: {ramp_down: DURATION}`: the canary's weight goes down to 0
# over the duration (a cold stable lane takes the traffic back gradually), then aborted.
RAMPING_DOWN = "ramping_down"
PHASES = (PROGRESSING, PAUSED, PROMOTED, ABORTED, RAMPING_DOWN)
ROLLBACK, PAUSE, RAMP_DOWN = "rollback", "pause", "ramp_down"  # on_failure
# What a progressing rollout whose step is held may wait for before it moves on.
APPROVAL, WEBHOOK = "approval", "webhook"
WAITS = (APPROVAL, WEBHOOK)
MAX_WAIT_REASON = 1000  # characters: many gates with long URLs stay within the stored state's bounds
HEALTHY, BREACH, INCONCLUSIVE = "healthy", "breach", "inconclusive"
# The analysis could not run (its statistics unreadable, or invalid): never healthy, never a
# step forward, never a rollback on its own.
UNAVAILABLE = "unavailable"

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")  # ASCII digits: see values.py
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """'500ms', '30s', '2m', '1h' -> seconds; ValueError otherwise."""
    match = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a duration (e.g. 500ms, 30s, 2m, 1h)")
    return float(match.group(1)) * _SECONDS[match.group(2)]


@dataclass(frozen=True)
class Step:
    weight: int
    hold: float  # seconds; 0 for the last step
    approve: bool = False  # after its hold, wait for an operator's approval (never the last step)


@dataclass(frozen=True)
class Analysis:
    window: float
    min_requests: int
    max_error_rate: float
    max_error_rate_vs_stable: float | None = None
    max_p99_ms: float | None = None
    metrics: tuple[MetricCheck, ...] = ()  # PromQL checks (sidecar.core.metric_checks)


@dataclass(frozen=True)
class RolloutSpec:
    rule: str
    canary: str
    baseline: str  # the cluster the canary is compared with: the split's first other entry
    steps: tuple[Step, ...]
    analysis: Analysis
    on_failure: str  # ROLLBACK, PAUSE or RAMP_DOWN
    total: int  # the split's total weight
    fingerprint: str  # changes when the rollout section changes
    ramp_down: float = 0.0  # seconds, with on_failure RAMP_DOWN
    gates: tuple[Gate, ...] = ()

    def next_step(self, step: int) -> int:
        return min(step + 1, len(self.steps) - 1)


@dataclass(frozen=True)
class ClusterWindow:
    """One cluster's responses in the analysis window."""

    requests: int = 0
    errors: int = 0  # 5xx
    p99_ms: float | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Verdict:
    outcome: str  # healthy, breach, inconclusive
    reason: str
    canary: ClusterWindow
    baseline: ClusterWindow
    canary_cluster: str = "canary"
    baseline_cluster: str = "stable"
    metrics: tuple[MetricResult, ...] = ()  # the metric checks' results, dry-run ones too

    def numbers(self) -> dict[str, Any]:
        return {
            "canary_requests": self.canary.requests,
            "canary_error_rate": round(self.canary.error_rate, 4),
            "canary_p99_ms": self.canary.p99_ms,
            "baseline_requests": self.baseline.requests,
            "baseline_error_rate": round(self.baseline.error_rate, 4),
            "baseline_p99_ms": self.baseline.p99_ms,
            **{f"metric:{r.check.name}": r.value for r in self.metrics},
        }


def with_metrics(verdict: Verdict, results: tuple[MetricResult, ...]) -> Verdict:
    """The verdict with the metric checks' results: a breach of one that acts is a breach; one
    that acts and has no value (Prometheus failed, timed out, or gave no sample) makes a
    healthy verdict inconclusive, never the reverse. Dry-run checks are only carried along.
    A verdict that is already a breach or unavailable stays so."""
    verdict = replace(verdict, metrics=results)
    acting = [r for r in results if r.acts]
    breaches = [r.reason for r in acting if r.outcome == METRIC_BREACH]
    if verdict.outcome in (BREACH, UNAVAILABLE):
        return verdict
    if breaches:
        return replace(verdict, outcome=BREACH, reason="; ".join(breaches))
    waits = [r.reason for r in acting if r.outcome == METRIC_INCONCLUSIVE]
    if not waits:
        return verdict
    if verdict.outcome == HEALTHY:
        return replace(verdict, outcome=INCONCLUSIVE, reason="; ".join(waits))
    return replace(verdict, reason="; ".join([verdict.reason, *waits]))


def judge(
    analysis: Analysis,
    canary: ClusterWindow,
    baseline: ClusterWindow,
    clusters: tuple[str, str] = ("canary", "stable"),
) -> Verdict:
    """The verdict on a window. No verdict on fewer than min_requests canary responses; the
    comparison with the baseline cluster is skipped while it has fewer than min_requests."""
    return replace(
        _judge(analysis, canary, baseline), canary_cluster=clusters[0], baseline_cluster=clusters[1]
    )


def _judge(analysis: Analysis, canary: ClusterWindow, baseline: ClusterWindow) -> Verdict:
    if canary.requests < analysis.min_requests:
        return Verdict(
            INCONCLUSIVE,
            f"{canary.requests} canary responses in the window, "
            f"fewer than min_requests {analysis.min_requests}",
            canary,
            baseline,
        )
    if canary.error_rate > analysis.max_error_rate:
        return Verdict(
            BREACH,
            f"canary error rate {canary.error_rate:.3f} > max_error_rate {analysis.max_error_rate}",
            canary,
            baseline,
        )
    ratio = analysis.max_error_rate_vs_stable
    if (
        ratio is not None
        and baseline.requests >= analysis.min_requests
        and canary.errors
        and canary.error_rate > ratio * baseline.error_rate
    ):
        return Verdict(
            BREACH,
            f"canary error rate {canary.error_rate:.3f} > {ratio} x baseline {baseline.error_rate:.3f}",
            canary,
            baseline,
        )
    if analysis.max_p99_ms is not None and canary.p99_ms is not None and canary.p99_ms > analysis.max_p99_ms:
        return Verdict(
            BREACH,
            f"canary p99 {canary.p99_ms:.0f} ms > max_p99_ms {analysis.max_p99_ms:.0f}",
            canary,
            baseline,
        )
    return Verdict(HEALTHY, "within every threshold", canary, baseline)


def p99_from_buckets(bounds: list[float], counts: list[float]) -> float | None:
    """The 99th percentile from histogram bucket deltas (cumulative counts per upper bound,
    the last bound +Inf), interpolating inside the bucket; None when there are no samples."""
    if not counts or counts[-1] <= 0:
        return None
    target = 0.99 * counts[-1]
    index = bisect.bisect_left(counts, target)
    upper = bounds[index]
    lower = bounds[index - 1] if index else 0.0
    below = counts[index - 1] if index else 0.0
    if upper == float("inf"):
        return lower
    inside = counts[index] - below
    return lower + (upper - lower) * ((target - below) / inside if inside else 1.0)


def unavailable(reason: str, clusters: tuple[str, str] = ("canary", "stable")) -> Verdict:
    """The verdict when the analysis cannot run (see UNAVAILABLE)."""
    return Verdict(
        UNAVAILABLE, f"analysis unavailable: {reason}", ClusterWindow(), ClusterWindow(), *clusters
    )


@dataclass(frozen=True)
class StepClock:
    """Where a step's start was read on a clock that is the same for every process of one
    machine boot (the writer's boot id and its boot-time clock): a replica on the same boot
    measures the hold from it exactly, across restarts; any other counts from when it saw
    the step (wall clocks of different machines disagree)."""

    boot: str
    at: float


@dataclass(frozen=True)
class Ramp:
    """A ramp-down under way: the canary's weight at the breach, and the weight it has now."""

    from_weight: int
    weight: int


@dataclass(frozen=True)
class RolloutState:
    phase: str
    step: int
    step_started: float  # wall-clock seconds, for people; holds are measured on StepClock
    reason: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    changed_at: float = 0.0
    step_clock: StepClock | None = None  # while ramping down: where the ramp began
    waiting: str = ""  # APPROVAL or WEBHOOK: what the held step waits for (progressing only)
    approved_step: int | None = None  # the step an operator approved, during its hold or after
    ramp: Ramp | None = None  # while ramping down

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "phase": self.phase,
            "step": self.step,
            "step_started": self.step_started,
            "reason": self.reason,
            "numbers": self.numbers,
            "fingerprint": self.fingerprint,
            "changed_at": self.changed_at,
        }
        if self.step_clock is not None:
            data["step_clock"] = {"boot": self.step_clock.boot, "at": self.step_clock.at}
        if self.waiting:
            data["waiting"] = self.waiting
        if self.approved_step is not None:
            data["approved_step"] = self.approved_step
        if self.ramp is not None:
            data["ramp"] = {"from": self.ramp.from_weight, "weight": self.ramp.weight}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RolloutState":
        """From a state document that passed the state schema (sidecar.core.state); a state
        written before approvals, gates and ramps has none of their fields."""
        clock, ramp = data.get("step_clock"), data.get("ramp")
        return cls(
            data["phase"],
            data["step"],
            float(data["step_started"]),
            str(data.get("reason", "")),
            dict(data.get("numbers") or {}),
            str(data.get("fingerprint", "")),
            float(data.get("changed_at", 0.0)),
            StepClock(clock["boot"], float(clock["at"])) if clock else None,
            str(data.get("waiting", "")),
            data.get("approved_step"),
            Ramp(int(ramp["from"]), int(ramp["weight"])) if ramp else None,
        )


def state_problem(spec: RolloutSpec, state: RolloutState) -> str | None:
    """Why a saved state cannot continue `spec` (a state file edited by hand, or written for
    other steps under the same fingerprint), or None."""
    if not 0 <= state.step < len(spec.steps):
        return f"step {state.step} is outside the rollout's {len(spec.steps)} steps"
    if state.step_started != state.step_started or state.step_started in (float("inf"), float("-inf")):
        return "its step start time is not a number"
    if state.phase == RAMPING_DOWN and (state.ramp is None or state.ramp.weight > spec.total):
        return "it is ramping down without a ramp within the split's total weight"
    return None


def start(spec: RolloutSpec, now: float) -> RolloutState:
    return RolloutState(PROGRESSING, 0, now, "started", {}, spec.fingerprint, now)


def canary_weight(spec: RolloutSpec, state: RolloutState) -> int:
    """The canary weight the state calls for: 0 when aborted, the ramp's while ramping down,
    else the current step's (the last step's when promoted)."""
    if state.phase == ABORTED:
        return 0
    if state.phase == RAMPING_DOWN:
        return state.ramp.weight if state.ramp is not None else 0
    return spec.steps[min(state.step, len(spec.steps) - 1)].weight


def guarding_gates(spec: RolloutSpec, state: RolloutState) -> tuple[int, ...]:
    """The gates (indexes into spec.gates) that guard the move from the state's step."""
    to = spec.next_step(state.step)
    return tuple(i for i, gate in enumerate(spec.gates) if gate.guards(to, len(spec.steps) - 1))


def needs_approval(spec: RolloutSpec, state: RolloutState) -> bool:
    """Whether the current step still waits for an operator's approval."""
    return spec.steps[state.step].approve and state.approved_step != state.step


def due_gates(spec: RolloutSpec, state: RolloutState, verdict: Verdict, held: float) -> tuple[int, ...]:
    """The gates to ask now: those guarding a move that is otherwise due (progressing, the
    step held and approved, a healthy verdict). A webhook is never asked before."""
    if (
        state.phase != PROGRESSING
        or verdict.outcome != HEALTHY
        or held < spec.steps[state.step].hold
        or needs_approval(spec, state)
    ):
        return ()
    return guarding_gates(spec, state)


def advance(
    spec: RolloutSpec,
    state: RolloutState,
    now: float,
    verdict: Verdict,
    held: float,
    gates: Mapping[int, GateResult] | None = None,
) -> RolloutState:
    """One controller tick. On a breach: aborted, paused or ramping down (`on_failure`). Once
    the current step has been `held` for its hold: it waits for an operator's approval if it
    asks for one; then, on a healthy verdict, for every gate that guards the move to pass
    (`gates`: their last answers for this move); then the next step, promoted on reaching
    the last one. While ramping down, `held` is how long the ramp has been under way."""
    if state.phase == RAMPING_DOWN:
        return _ramp_down(spec, state, held)
    if state.phase != PROGRESSING:
        return state
    if verdict.outcome == BREACH:
        return _fail(spec, state, now, verdict)
    step = spec.steps[state.step]
    if held < step.hold:
        return state
    if needs_approval(spec, state):
        reason = (
            f"held {step.hold:g}s at weight {step.weight}; waiting for approval "
            f"(graysteer rollout approve {spec.rule})"
        )
        return _wait(state, APPROVAL, reason, now)
    if verdict.outcome != HEALTHY:
        return state
    answers = gates or {}
    guarding = guarding_gates(spec, state)
    closed = [i for i in guarding if not (i in answers and answers[i].passed)]
    if closed:
        reason = "; ".join(gate_wait(spec.gates[i], answers.get(i)) for i in closed)
        return _wait(state, WEBHOOK, reason, now)
    return _move(spec, state, now, verdict, bool(guarding))


def _wait(state: RolloutState, on: str, reason: str, now: float) -> RolloutState:
    reason = reason[:MAX_WAIT_REASON]
    if (state.waiting, state.reason) == (on, reason):
        return state
    changed_at = now if state.waiting != on else state.changed_at
    return replace(state, waiting=on, reason=reason, changed_at=changed_at)


def _move(spec: RolloutSpec, state: RolloutState, now: float, verdict: Verdict, gated: bool) -> RolloutState:
    hold = spec.steps[state.step].hold
    also = ("an operator's approval" if spec.steps[state.step].approve else "", "its gates" if gated else "")
    extra = "".join(f" and {what}" for what in also if what)
    moved = replace(
        state,
        step_started=now,
        step_clock=None,
        numbers=verdict.numbers(),
        changed_at=now,
        waiting="",
        approved_step=None,
    )
    step = state.step + 1
    if step >= len(spec.steps) - 1:
        return replace(
            moved, phase=PROMOTED, step=len(spec.steps) - 1, reason=f"every step passed its analysis{extra}"
        )
    shown = f"step {step + 1} of {len(spec.steps)}"  # counted from 1, as every view shows steps
    return replace(moved, step=step, reason=f"{shown} after a healthy hold of {hold:g}s{extra}")


def _fail(spec: RolloutSpec, state: RolloutState, now: float, verdict: Verdict) -> RolloutState:
    """A breach: the reason and numbers are kept through a ramp-down to the abort."""
    failed = replace(state, reason=verdict.reason, numbers=verdict.numbers(), changed_at=now, waiting="")
    failed = replace(failed, approved_step=None)
    if spec.on_failure == RAMP_DOWN:
        weight = canary_weight(spec, state)
        # The ramp's own clock: its start is stamped as a step's is (see the controller).
        ramp = Ramp(weight, weight)
        return replace(failed, phase=RAMPING_DOWN, ramp=ramp, step_started=now, step_clock=None)
    return replace(failed, phase=ABORTED if spec.on_failure == ROLLBACK else PAUSED)


def ramp_weight(from_weight: int, seconds: float, elapsed: float) -> int:
    """The canary's weight `elapsed` seconds into a linear ramp from `from_weight` down to 0
    over `seconds`: rounded up, so that it reaches 0 when the ramp ends, not before."""
    if seconds <= 0 or elapsed >= seconds:
        return 0
    return math.ceil(round(from_weight * (seconds - elapsed) / seconds, 6))


def _ramp_down(spec: RolloutSpec, state: RolloutState, held: float) -> RolloutState:
    ramp = state.ramp or Ramp(0, 0)
    # Never up again: a new leader measures the ramp from when it first saw it.
    weight = min(ramp.weight, ramp_weight(ramp.from_weight, spec.ramp_down, held))
    if weight == 0:
        return replace(state, phase=ABORTED, ramp=None)  # the breach's reason and numbers stay
    if weight == ramp.weight:
        return state
    return replace(state, ramp=replace(ramp, weight=weight))
