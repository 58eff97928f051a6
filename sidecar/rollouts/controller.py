"""The rollout controller: judges each rollout's canary on its clusters' windows (one
Envoy's statistics, sidecar.stats.envoy, or the fleet's, sidecar.fleet), moves rollouts
through their steps and applies the weights through the reloader.
"""

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from sidecar.core.actions import act
from sidecar.core.metric_checks import MetricResult
from sidecar.core.overrides import split_weights
from sidecar.core.rollout import (
    ABORTED,
    PROGRESSING,
    RAMPING_DOWN,
    UNAVAILABLE,
    ClusterWindow,
    RolloutSpec,
    RolloutState,
    StepClock,
    Verdict,
    advance,
    canary_weight,
    due_gates,
    judge,
    start,
    state_problem,
    unavailable,
    with_metrics,
)
from sidecar.core.state import StateError
from sidecar.ops.metrics import Metrics
from sidecar.rollouts.destinations import GateDestinations
from sidecar.rollouts.gates import GateChecks
from sidecar.rollouts.prometheus import MetricQueries, Prometheus
from sidecar.rollouts.report import metrics_report, rollout_report
from sidecar.table.reload import Reloader

log = logging.getLogger("graysteer.rollout")


class ClusterSource(Protocol):
    """Each cluster's responses over the last `seconds`: one Envoy (EnvoyStats) or a fleet."""

    def cluster_window(self, cluster: str, seconds: float, now: float) -> ClusterWindow: ...

    def problem(self) -> str | None: ...  # why the windows cannot be trusted now, or None


def rollout_weights(spec: RolloutSpec, file_weights: dict[str, int], canary: int) -> dict[str, int]:
    """The split's weights for a canary weight: the total stays; the other entries share the
    rest in proportion to the file's weights (the first takes the rounding)."""
    others = {c: w for c, w in file_weights.items() if c != spec.canary}
    rest = spec.total - canary
    base = sum(others.values())
    shares = {c: (rest * w // base if base else 0) for c, w in others.items()}
    first = next(iter(others))
    shares[first] += rest - sum(shares.values()) if base else rest
    return {**shares, spec.canary: canary}


def read_boot_id() -> str | None:
    """This machine boot's id (Linux): processes that share it share the boot-time clock."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def boot_clock() -> float:
    """Seconds on a clock every process of this boot reads alike, steady (never stepped by
    NTP or an operator), counting through suspend: CLOCK_BOOTTIME, else CLOCK_MONOTONIC."""
    return time.clock_gettime(getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC))


class RolloutController:
    """Moves rollouts through their steps, every `poll_seconds`, judging each on `analysis`
    (this Envoy's statistics, or the fleet's). With a fleet (etcd), every replica runs one,
    and only the one for which `leads()` is true advances or aborts (the others follow the
    stored state, which every reload applies).

    Holds are measured on this process's steady clock, never by comparing wall clocks: from
    the step's start when the state says it began on this machine's current boot (same
    clock), else from when this process first saw the step. A replica whose clock is off by
    an hour holds each step exactly as long; a new leader on another machine holds at most
    one hold longer, never shorter.

    A stored state that cannot be read stops every change: the states last read stay, and
    `state_problem` says why (status, /rollouts, logs) until the store reads again."""

    def __init__(
        self,
        reloader: Reloader,
        metrics: Metrics,
        analysis: "ClusterSource | None",
        poll_seconds: float,
        clock: Callable[[], float] = time.time,
        leads: Callable[[], bool] = lambda: True,
        steady: Callable[[], float] = boot_clock,
        boot_id: str | None = read_boot_id(),
        gate_destinations: GateDestinations | None = None,
        prometheus: Prometheus | None = None,
    ) -> None:
        self.reloader = reloader
        self.metrics = metrics
        self.analysis = analysis
        self.poll_seconds = poll_seconds
        self.clock = clock
        self.steady = steady
        self.boot_id = boot_id
        self.leads = leads
        self.states: dict[str, RolloutState] = {}
        self.verdicts: dict[str, Verdict] = {}
        self.state_problem: str | None = None
        self._seen: dict[str, tuple[tuple[object, ...], float]] = {}  # rule -> (step, began)
        self._lock = asyncio.Lock()
        self._seen_state = b""
        # webhook gates, asked off the tick, only where the operator lets them connect
        self.gates = GateChecks(metrics, steady, destinations=gate_destinations)
        # PromQL metric checks, run off the tick by whoever moves the rollouts
        self.queries = MetricQueries(metrics, prometheus, steady)
        self._load_states()

    def _load_states(self) -> None:
        """The rollout states as stored (read again whenever the store changed: another
        replica, an operator through any replica's admin API, or the leader). A store that
        cannot be read, or a state that cannot continue its rollout, changes nothing."""
        state = self.reloader.state
        try:
            raw = state.read_bytes()
            if raw == self._seen_state and self.state_problem is None:
                return
            saved = state.parse(raw).get("rollouts") or {}
            states = {rule: RolloutState.from_json(data) for rule, data in saved.items()}
            for rule, loaded in states.items():
                spec = self.specs().get(rule)
                problem = (
                    state_problem(spec, loaded) if spec and spec.fingerprint == loaded.fingerprint else None
                )
                if problem:
                    raise StateError(f"rollout state of {rule!r} in {state.label}: {problem}")
        except StateError as error:
            if self.state_problem != str(error):
                log.error("%s: rollouts keep the states last read and change nothing until it reads", error)
            self.state_problem = str(error)
            return
        if self.state_problem is not None:
            log.info("the rollout states in %s read again", state.label)
        self.state_problem = None
        self._seen_state = raw
        self.states = states

    def specs(self) -> dict[str, RolloutSpec]:
        return self.reloader.table.rollouts

    def held(self, rule: str, state: RolloutState) -> float:
        """How long the state's current step has been held, on this process's steady clock."""
        now = self.steady()
        key = (state.phase, state.step, state.step_started, state.fingerprint)
        seen = self._seen.get(rule)
        if seen is None or seen[0] != key:
            mark = state.step_clock
            began = min(mark.at, now) if mark is not None and mark.boot == self.boot_id else now
            seen = self._seen[rule] = (key, began)
        return max(0.0, now - seen[1])

    def _stamped(self, new: RolloutState, old: RolloutState | None) -> RolloutState:
        """A step that begins now gets this machine's steady clock reading."""
        if (
            new.step_clock is None
            and self.boot_id is not None
            and (old is None or new.step_started != old.step_started)
        ):
            return replace(new, step_clock=StepClock(self.boot_id, self.steady()))
        return new

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    await self.tick()
                except Exception:  # one bad tick must not stop the controller
                    log.exception("rollout tick failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll_seconds)
        finally:
            await self.gates.close()
            await self.queries.close()

    async def follow(self) -> None:
        """Show every change of the stored state at once (a follower's gauges follow the
        leader's steps as the table does, not at the next poll)."""
        changes = self.reloader.subscribe()
        while True:
            await changes.get()
            async with self._lock:
                self._load_states()
                for rule, spec in self.specs().items():
                    state = self.states.get(rule)
                    if state is not None:
                        self._show(rule, spec, state, None)

    async def tick(self) -> None:
        now = self.clock()
        specs = self.specs()
        self.metrics.keep_rollouts(specs)
        if not specs:
            return
        async with self._lock:
            self._load_states()
            acting = self.leads() and self.state_problem is None
            for rule, spec in specs.items():
                if acting:
                    await self._step(rule, spec, now)
                else:  # a follower, or an unreadable store: what is stored is what is served
                    self.verdicts[rule] = self.verdict(spec, now)
                    self._show(rule, spec, self.states.get(rule) or start(spec, now), self.verdicts[rule])

    async def _step(self, rule: str, spec: RolloutSpec, now: float) -> None:
        saved = self.states.get(rule)
        state = saved
        if state is None or state.fingerprint != spec.fingerprint:
            if state is not None:
                log.info("rollout of %r changed in the rules file: starting again", rule)
            state = start(spec, now)
        self.queries.ask(spec)  # in the background: this tick judges on the last run's results
        verdict = self.verdict(spec, now, self.queries.results(spec))
        self.verdicts[rule] = verdict
        held = self.held(rule, state)
        due = due_gates(spec, state, verdict, held)
        if due:  # asked in the background: this tick goes on with the answers already in
            self.gates.ask(spec, state, verdict, due)
        new = advance(spec, state, now, verdict, held, self.gates.answers(rule, state))
        await self._apply(rule, spec, new, verdict, saved)  # a new rollout is saved at once

    def verdict(self, spec: RolloutSpec, now: float, metrics: tuple[MetricResult, ...] = ()) -> Verdict:
        """The analysis of the rollout's window, with its metric checks' results (none on a
        process that does not move rollouts: the leader queries); UNAVAILABLE (never healthy)
        when it cannot run: no statistics, unreadable ones, or an analysis that fails."""
        return with_metrics(self._envoy_verdict(spec, now), metrics)

    def _envoy_verdict(self, spec: RolloutSpec, now: float) -> Verdict:
        clusters = (spec.canary, spec.baseline)
        source = self.analysis
        if source is None:
            return unavailable("no statistics to analyse (serve --envoy-admin)", clusters)
        try:
            problem = source.problem()
            if problem is not None:
                return unavailable(problem, clusters)
            seconds = spec.analysis.window
            canary = source.cluster_window(spec.canary, seconds, now)
            baseline = source.cluster_window(spec.baseline, seconds, now)
            for window in (canary, baseline):
                if window.p99_ms is not None and not math.isfinite(window.p99_ms):
                    raise ValueError(f"a p99 of {window.p99_ms}")
            return judge(spec.analysis, canary, baseline, clusters)
        except Exception as error:  # a bug or data the analysis cannot take: say so
            log.exception("the analysis of %s failed", spec.rule)
            return unavailable(f"the analysis failed: {error}", clusters)

    async def _apply(
        self,
        rule: str,
        spec: RolloutSpec,
        new: RolloutState,
        verdict: Verdict | None,
        old: RolloutState | None,
    ) -> None:
        new = self._stamped(new, old)
        if new != old:
            await self._save({**self.states, rule: new})  # StateConflict: not applied
            self.states[rule] = new
            if old is None or (new.phase, new.step, new.fingerprint, new.waiting) != (
                old.phase,
                old.step,
                old.fingerprint,
                old.waiting,
            ):
                log.info(
                    "rollout %s: %s step %d (canary weight %d): %s %s",
                    rule,
                    new.phase,
                    new.step,
                    canary_weight(spec, new),
                    new.reason,
                    new.numbers or "",
                )
        weight = canary_weight(spec, new)
        current = split_weights(self.reloader.loaded.table.document, rule) or {}
        if current.get(spec.canary) != weight:
            file_weights = split_weights(self.reloader.loaded.document, rule) or {}
            await self.reloader.set_weights(
                rule,
                rollout_weights(spec, file_weights, weight),
                trigger=f"rollout:{new.phase}",
                by_rollout=True,
            )
            self._seen_state = self.reloader.state.read_bytes()
        self._show(rule, spec, new, verdict)

    def _show(self, rule: str, spec: RolloutSpec, state: RolloutState, verdict: Verdict | None) -> None:
        waiting = state.waiting if state.phase == PROGRESSING else ""
        self.metrics.show_rollout(rule, state.phase, state.step, canary_weight(spec, state), waiting)
        self.metrics.show_limits(rule, spec.canary, spec.analysis.max_error_rate, spec.analysis.max_p99_ms)
        if verdict is not None:
            self.metrics.show_verdict(rule, verdict)

    async def _save(self, states: dict[str, RolloutState]) -> None:
        stored = await self.reloader.save_state_section(
            "rollouts", {r: s.to_json() for r, s in states.items()}
        )
        self._seen_state = stored

    async def action(self, rule: str, action: str) -> RolloutState:
        """promote / pause / resume / abort; ValueError explains a refusal."""
        spec = self.specs().get(rule)
        if spec is None:
            raise ValueError(f"rule {rule!r} has no rollout (rollouts: {', '.join(self.specs()) or 'none'})")
        async with self._lock:
            self._load_states()
            if self.state_problem is not None:
                raise StateError(f"{self.state_problem}: fix the stored state first")
            now = self.clock()
            state = self.states.get(rule) or start(spec, now)
            new = act(spec, state, action, now)
            await self._apply(rule, spec, new, None, state)
            return self.states[rule]

    def report(self) -> list[dict[str, Any]]:
        """Each rollout's state, current analysis and waits, for /rollouts and the admin API."""
        now = self.clock()
        out = []
        for rule, spec in self.specs().items():
            state = self.states.get(rule) or start(spec, now)
            verdict = self.verdicts.get(rule) or self.verdict(spec, now)
            held = self.held(rule, state)
            report = rollout_report(spec, state, verdict, held, self.gates, self.state_problem)
            report["metrics"] = metrics_report(spec, verdict, self.queries.age(rule))
            out.append(report)
        return out


def http_view(controller: RolloutController, path: str) -> tuple[int, object] | None:
    """GET /rollouts, /rollouts/RULE, and /rollouts/RULE/check (200 unless the analysis is in
    breach or cannot run, the rollout was aborted or is ramping down, or its stored state cannot be read: a
    Flagger webhook or an Argo `web` metric gate)."""
    if path in ("/rollouts", "/rollouts/"):
        return 200, controller.report()
    parts = path.strip("/").split("/")
    if parts[0] != "rollouts" or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "check"):
        return None
    found = [r for r in controller.report() if r["rule"] == parts[1]]
    if not found:
        return 404, {"error": f"no rollout for rule {parts[1]!r}"}
    report = found[0]
    if len(parts) == 3:
        healthy = (
            report["verdict"] not in ("breach", UNAVAILABLE)
            and report["phase"] not in (ABORTED, RAMPING_DOWN)
            and report["state_problem"] is None
        )
        return (200 if healthy else 503), report
    return 200, report
