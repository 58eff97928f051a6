"""Replacing the served table: the one place it happens.

Sources only say "look again" (the directory watcher, SIGHUP, start-up) or bring a
weight change (the admin API). The Reloader reads, validates and compiles off the
event loop, then swaps the table with one assignment. A bad or missing file keeps the
last good table; the reason is logged, counted and kept for `graysteer status`.
"""

import asyncio
import enum
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.core import RulesError, Table, compile_table
from sidecar.core.overrides import WeightOverride, reconcile, resolve_weights, split_weights
from sidecar.runtime.decider import TableHolder
from sidecar.runtime.load import MAX_FILE_BYTES, config_version, parse_rules, read_regular_file
from sidecar.runtime.metrics import Metrics
from sidecar.runtime.state_file import StateFile

log = logging.getLogger("graysteer.reload")

# An in-place write (truncate, then write) can be read half-done. A watch-triggered read
# that is invalid or missing is read again after this long; only if it reads the same
# does it count as a failed reload.
SETTLE_SECONDS = 0.1
SETTLE_ATTEMPTS = 5


class Outcome(enum.Enum):
    LOADED = "loaded"
    UNCHANGED = "unchanged"
    INVALID = "invalid"
    MISSING = "missing"


@dataclass(frozen=True)
class ReloadResult:
    outcome: Outcome
    trigger: str
    error: str = ""
    version: str = ""  # the file version that was read ("" when unreadable)
    at: float = field(default_factory=time.time)
    inputs: str = field(default="", repr=False)  # rules and state content read: the dedup key


@dataclass(frozen=True)
class Loaded:
    """Everything the status shows about the table being served."""

    table: Table
    file_version: str
    document: dict[str, Any]  # the rules file as written (before overrides)
    overrides: dict[str, WeightOverride]
    loaded_at: float


class Reloader:
    """The rules file (and state file) behind the served table. Built with a first valid
    table, loaded synchronously: there is never a reloader, and so never a holder, without
    one. Raises ValueError naming the file and every problem when there is none."""

    def __init__(self, path: Path, metrics: Metrics, state: StateFile) -> None:
        self.path = path
        self.metrics = metrics
        self.state = state
        self.failures = 0
        self._lock = asyncio.Lock()
        self._subscribers: set[asyncio.Queue[tuple[Loaded, ReloadResult]]] = set()
        result, loaded = self._build("startup", force=True)
        if loaded is None:
            raise ValueError(result.error)  # already names the file and every problem
        self.metrics.count_reload(result.outcome.value)
        self._last_read = result.inputs  # the inputs (rules + state content) last evaluated
        self.holder = TableHolder(loaded.table)
        self.loaded = loaded
        self.last_result = result
        self._install(loaded, result)

    @property
    def table(self) -> Table:
        return self.holder.table

    async def reload(self, trigger: str, force: bool = False) -> ReloadResult:
        """Re-read the rules file (and the state file); swap the table if it is valid."""
        async with self._lock:
            result, loaded = await asyncio.to_thread(self._build, trigger, force)
            for _ in range(SETTLE_ATTEMPTS if trigger == "watch" else 0):
                if loaded is not None or result.outcome is Outcome.UNCHANGED:
                    break
                await asyncio.sleep(SETTLE_SECONDS)
                again, loaded = await asyncio.to_thread(self._build, trigger, force)
                settled = again.outcome is result.outcome and again.version == result.version
                result = again
                if settled:
                    break
            self._last_read = result.inputs
            self._finish(result, loaded)
            return result

    def _build(self, trigger: str, force: bool = False) -> tuple[ReloadResult, Loaded | None]:
        try:
            content = read_regular_file(self.path, MAX_FILE_BYTES)
        except OSError as error:
            reason = f"{self.path}: cannot read: {error.strerror or error}"
            return ReloadResult(Outcome.MISSING, trigger, reason), None
        version = config_version(content)
        # The state file (runtime weights) is an input too: when another worker process
        # changes it, this one converges on the same table.
        state = self.state.read_bytes()
        inputs = f"{version}/{config_version(state)}"
        if not force and inputs == self._last_read:
            return ReloadResult(Outcome.UNCHANGED, trigger, version=version, inputs=inputs), None
        try:
            file_table = parse_rules(content, str(self.path))
        except RulesError as error:
            return ReloadResult(Outcome.INVALID, trigger, str(error), version, inputs=inputs), None
        overrides = _overrides_from_state(self.state.parse(state))
        loaded = self._with_overrides(file_table.document, version, overrides)
        return ReloadResult(Outcome.LOADED, trigger, version=version, inputs=inputs), loaded

    def _with_overrides(
        self, document: dict[str, Any], file_version: str, overrides: Mapping[str, WeightOverride]
    ) -> Loaded:
        effective, kept, dropped = reconcile(document, overrides)
        for rule, why in dropped.items():
            log.warning("runtime weights for rule %r dropped: %s", rule, why)
        version = file_version
        if kept:
            digest = hashlib.sha256(
                json.dumps({r: o.weights for r, o in sorted(kept.items())}, sort_keys=True).encode()
            ).hexdigest()
            version = f"{file_version}+o{digest[:6]}"
        table = compile_table(effective, version, str(self.path))
        if dropped:
            self._save_overrides(kept)
        return Loaded(table, file_version, document, dict(kept), time.time())

    # -- weights from the admin API -----------------------------------------------------------

    async def set_weights(
        self, rule: str, requested: Mapping[str, int], trigger: str = "set_weights"
    ) -> Loaded:
        """Apply and persist a runtime weight change; ValueError explains a refusal."""
        async with self._lock:
            loaded = self.loaded
            current = split_weights(loaded.table.document, rule)
            if current is None:
                kind = "not a split" if loaded.table.rule(rule) else "no such rule"
                raise ValueError(
                    f"rule {rule!r}: {kind} (split rules: {', '.join(_split_names(loaded)) or 'none'})"
                )
            weights = resolve_weights(current, requested)
            base = split_weights(loaded.document, rule)
            assert base is not None
            overrides = dict(loaded.overrides)
            if weights == base:
                overrides.pop(rule, None)  # back to what the file says: no override needed
            else:
                overrides[rule] = WeightOverride(rule, weights, base)
            new = self._with_overrides(loaded.document, loaded.file_version, overrides)
            self._save_overrides(new.overrides)
            inputs = f"{loaded.file_version}/{config_version(self.state.read_bytes())}"
            self._last_read = inputs
            result = ReloadResult(Outcome.LOADED, trigger, version=loaded.file_version, inputs=inputs)
            self._finish(result, new)
            log.info("weights of rule %r set to %s (version %s)", rule, weights, new.table.version)
            return new

    def _save_overrides(self, overrides: Mapping[str, WeightOverride]) -> None:
        state = self.state.load()
        state["weight_overrides"] = {r: o.to_json() for r, o in sorted(overrides.items())}
        self.state.save(state)

    def save_state_section(self, key: str, data: Any) -> None:
        """Persist another part of the runtime state (e.g. rollouts) in the same state file,
        without this change looking like new input to our own watcher."""
        state = self.state.load()
        state[key] = data
        self.state.save(state)
        if self._last_read.startswith(self.loaded.file_version + "/"):
            self._last_read = f"{self.loaded.file_version}/{config_version(self.state.read_bytes())}"

    # -- swapping and telling -----------------------------------------------------------------

    def _finish(self, result: ReloadResult, loaded: Loaded | None) -> None:
        self.metrics.count_reload(result.outcome.value)
        if result.outcome is Outcome.UNCHANGED:
            return
        self.last_result = result
        if loaded is None:
            self.failures += 1
            log.error("reload (%s) refused, keeping the last good table: %s", result.trigger, result.error)
        else:
            self._install(loaded, result)
            log.info("serving rules %s version %s (%s)", self.path, loaded.table.version, result.trigger)
        for queue in self._subscribers:
            queue.put_nowait((self.loaded, result))

    def _install(self, loaded: Loaded, result: ReloadResult) -> None:
        self.loaded = loaded
        self.last_result = result
        self.holder.table = loaded.table  # the one reference swap readers see
        self.metrics.show_table(loaded.table)

    def subscribe(self) -> "asyncio.Queue[tuple[Loaded, ReloadResult]]":
        queue: asyncio.Queue[tuple[Loaded, ReloadResult]] = asyncio.Queue()
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: "asyncio.Queue[tuple[Loaded, ReloadResult]]") -> None:
        self._subscribers.discard(queue)


def _split_names(loaded: Loaded) -> list[str]:
    return [r.name for r in loaded.table.rules if r.split is not None]


def _overrides_from_state(state: Mapping[str, Any]) -> dict[str, WeightOverride]:
    overrides: dict[str, WeightOverride] = {}
    for rule, data in (state.get("weight_overrides") or {}).items():
        try:
            overrides[rule] = WeightOverride.from_json(rule, data)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            log.error("ignoring unreadable weight override for rule %r: %s", rule, error)
    return overrides
