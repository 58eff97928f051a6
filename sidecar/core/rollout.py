"""Progressive delivery, the pure part: a rollout's spec, the analysis of a window of cluster
statistics, the verdict, and the state machine that turns time and verdicts into weights.

No clock, no I/O: the controller (sidecar/rollouts/controller.py) passes `now` (wall time, for
the record), how long the current step has been held (measured on its own clock, see there)
and the observed counts in, and applies the weights that come out.
"""

import bisect
import re
from dataclasses import dataclass, field, replace
from typing import Any

PROGRESSING, PAUSED, PROMOTED, ABORTED = "progressing", "paused", "promoted", "aborted"
PHASES = (PROGRESSING, PAUSED, PROMOTED, ABORTED)
HEALTHY, BREACH, INCONCLUSIVE = "healthy", "breach", "inconclusive"
# The analysis could not run (its statistics unreadable, or invalid): never healthy, never a
# step forward, never a rollback on its own.
UNAVAILABLE = "unavailable"

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """'500ms', '30s', '2m', '1h' -> seconds; ValueError otherwise."""
    match = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a duration (e.g. 500ms, 30s, 2m, 1h)")
    return float(match.group(1)) * _SECONDS[match.group(2)]


@dataclass(frozen=True)
class Step:
    weight: int
    hold: float  # seconds; 0 for the last step


@dataclass(frozen=True)
class Analysis:
    window: float
    min_requests: int
    max_error_rate: float
    max_error_rate_vs_stable: float | None = None
    max_p99_ms: float | None = None


@dataclass(frozen=True)
class RolloutSpec:
    rule: str
    canary: str
    baseline: str  # the cluster the canary is compared with: the split's first other entry
    steps: tuple[Step, ...]
    analysis: Analysis
    on_failure: str  # "rollback" or "pause"
    total: int  # the split's total weight
    fingerprint: str  # changes when the rollout section changes


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

    def numbers(self) -> dict[str, Any]:
        return {
            "canary_requests": self.canary.requests,
            "canary_error_rate": round(self.canary.error_rate, 4),
            "canary_p99_ms": self.canary.p99_ms,
            "baseline_requests": self.baseline.requests,
            "baseline_error_rate": round(self.baseline.error_rate, 4),
            "baseline_p99_ms": self.baseline.p99_ms,
        }


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
class RolloutState:
    phase: str
    step: int
    step_started: float  # wall-clock seconds, for people; holds are measured on StepClock
    reason: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    changed_at: float = 0.0
    step_clock: StepClock | None = None

    def to_json(self) -> dict[str, Any]:
        data = {
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
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RolloutState":
        """From a state document that passed the state schema (sidecar.core.state)."""
        clock = data.get("step_clock")
        return cls(
            data["phase"],
            data["step"],
            float(data["step_started"]),
            str(data.get("reason", "")),
            dict(data.get("numbers") or {}),
            str(data.get("fingerprint", "")),
            float(data.get("changed_at", 0.0)),
            StepClock(clock["boot"], float(clock["at"])) if clock else None,
        )


def state_problem(spec: RolloutSpec, state: RolloutState) -> str | None:
    """Why a saved state cannot continue `spec` (a state file edited by hand, or written for
    other steps under the same fingerprint), or None."""
    if not 0 <= state.step < len(spec.steps):
        return f"step {state.step} is outside the rollout's {len(spec.steps)} steps"
    if state.step_started != state.step_started or state.step_started in (float("inf"), float("-inf")):
        return "its step start time is not a number"
    return None


def start(spec: RolloutSpec, now: float) -> RolloutState:
    return RolloutState(PROGRESSING, 0, now, "started", {}, spec.fingerprint, now)


def canary_weight(spec: RolloutSpec, state: RolloutState) -> int:
    """The canary weight the state calls for: 0 when aborted, else the current step's (the
    last step's when promoted)."""
    if state.phase == ABORTED:
        return 0
    return spec.steps[min(state.step, len(spec.steps) - 1)].weight


def advance(
    spec: RolloutSpec, state: RolloutState, now: float, verdict: Verdict, held: float
) -> RolloutState:
    """One controller tick: abort/pause on a breach; the next step once the current one has
    been `held` for its hold with a healthy verdict; promoted on reaching the last step."""
    if state.phase != PROGRESSING:
        return state
    if verdict.outcome == BREACH:
        phase = ABORTED if spec.on_failure == "rollback" else PAUSED
        return replace(state, phase=phase, reason=verdict.reason, numbers=verdict.numbers(), changed_at=now)
    hold = spec.steps[state.step].hold
    if verdict.outcome != HEALTHY or held < hold:
        return state
    step = state.step + 1
    if step >= len(spec.steps) - 1:
        return replace(
            state,
            phase=PROMOTED,
            step=len(spec.steps) - 1,
            step_started=now,
            step_clock=None,
            reason="every step passed its analysis",
            numbers=verdict.numbers(),
            changed_at=now,
        )
    return replace(
        state,
        step=step,
        step_started=now,
        step_clock=None,
        reason=f"step {step} after a healthy hold of {hold:g}s",
        numbers=verdict.numbers(),
        changed_at=now,
    )


def act(spec: RolloutSpec, state: RolloutState, action: str, now: float) -> RolloutState:
    """An operator's action: promote, pause, resume, abort. ValueError if it makes no sense."""
    if action == "promote":
        return replace(
            state,
            phase=PROMOTED,
            step=len(spec.steps) - 1,
            step_started=now,
            step_clock=None,
            reason="promoted by an operator",
            changed_at=now,
        )
    if action == "abort":
        return replace(state, phase=ABORTED, reason="aborted by an operator", changed_at=now)
    if action == "pause":
        if state.phase != PROGRESSING:
            raise ValueError(f"cannot pause a rollout that is {state.phase}")
        return replace(state, phase=PAUSED, reason="paused by an operator", changed_at=now)
    if action == "resume":
        if state.phase == PROGRESSING:
            raise ValueError("the rollout is already progressing")
        step = 0 if state.phase in (ABORTED, PROMOTED) else state.step
        return replace(
            state,
            phase=PROGRESSING,
            step=step,
            step_started=now,
            step_clock=None,
            reason="resumed by an operator",
            changed_at=now,
        )
    raise ValueError(f"unknown action {action!r} (promote, pause, resume, abort)")
