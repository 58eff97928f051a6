"""Replacing the served table: the one place it happens.

Sources only say "look again" (the directory watcher, SIGHUP, an etcd watch, start-up) or
bring a weight change (the admin API). The Reloader reads the rules (a `RulesSource`: a
file, or etcd's latest value; sidecar.sources) and the runtime state (a `StateStore`: the
state file, or an etcd key), validates and compiles off the event loop, then swaps the
table with one assignment. A bad or missing document keeps the last good table; the reason is logged,
counted and kept for `graysteer status`. So does a runtime state that cannot be read
(sidecar.core.state): reading it as "no state" would move traffic. A state removed after it
was read is written back from the one in force (StateRemoved).
"""

import asyncio
import enum
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from sidecar.core import RulesError, Table, compile_table
from sidecar.core.engine import prepare
from sidecar.core.overrides import WeightOverride, reconcile, resolve_weights, split_weights
from sidecar.core.state import StateError, StateRemoved
from sidecar.ops.metrics import Metrics
from sidecar.table.documents import DocumentReader
from sidecar.table.holder import TableHolder
from sidecar.table.load import config_version

log = logging.getLogger("graysteer.reload")

# An in-place write (truncate, then write) can be read half-done. A watch-triggered read
# that is invalid or missing is read again after this long; only if it reads the same
# does it count as a failed reload.
SETTLE_SECONDS = 0.1
SETTLE_ATTEMPTS = 5


class RulesSource(Protocol):
    """Where the rules document comes from."""

    @property
    def label(self) -> str: ...  # names it in messages and as the table's source

    def read(self) -> bytes: ...  # the document; OSError when missing or unreadable


class StateStore(Protocol):
    """Where the runtime state (weights, rollouts) is kept (state_file.StateFile, or etcd).
    Reading raises StateError when the state exists but cannot be read or is invalid."""

    @property
    def label(self) -> str: ...

    def read_bytes(self) -> bytes: ...  # b"" when there is no state

    def parse(self, raw: bytes) -> dict[str, Any]: ...

    def load(self) -> dict[str, Any]: ...

    async def save(self, state: dict[str, Any]) -> None: ...  # StateConflict, OSError

    # Write back a removed state, only where there is none: True when written; OSError.
    async def restore(self, raw: bytes) -> bool: ...


class Follower(Protocol):
    """A table built beside the served one (sidecar.table.shadow): looked at again after
    every look at the rules, and every weight change."""

    def load(self, live_version: str) -> bool: ...  # blocking: run in a thread

    def close(self) -> None: ...


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
    state_removed: bool = field(default=False, repr=False)  # refused: the state read before is gone


@dataclass(frozen=True)
class Loaded:
    """Everything the status shows about the table being served."""

    table: Table
    file_version: str
    document: dict[str, Any]  # the rules file as written (before overrides)
    overrides: dict[str, WeightOverride]
    loaded_at: float
    rules_bytes: bytes = field(default=b"", repr=False)  # the inputs it was built from, as read
    state_bytes: bytes = field(default=b"", repr=False)


class DrivenByRollout(ValueError):
    """A weight change refused because the rule's weights follow its rollout."""


class Reloader:
    """The rules (and runtime state) behind the served table. Built with a first valid
    table, loaded synchronously: there is never a reloader, and so never a holder, without
    one. Raises ValueError naming the source and every problem when there is none."""

    def __init__(
        self,
        rules: RulesSource,
        metrics: Metrics,
        state: StateStore,
        reader: DocumentReader | None = None,
        shadow: Follower | None = None,
    ) -> None:
        self.rules = rules
        self.metrics = metrics
        self.state = state
        self.reader = reader or DocumentReader()
        self.shadow = shadow
        self.failures = 0
        self._lock = asyncio.Lock()
        self._subscribers: set[asyncio.Queue[tuple[Loaded, ReloadResult]]] = set()
        self._shadow_watchers: set[asyncio.Event] = set()
        result, loaded, _ = self._build("startup", force=True)
        if loaded is None:
            raise ValueError(result.error)  # already names the source and every problem
        self.metrics.count_reload(result.outcome.value)
        self._last_read = result.inputs  # the inputs (rules + state content) last evaluated
        self.holder = TableHolder(loaded.table)
        self.loaded = loaded
        self.last_result = result
        self._install(loaded, result)
        if shadow is not None:
            _quietly(shadow.load, loaded.table.version)

    @property
    def table(self) -> Table:
        return self.holder.table

    async def reload(self, trigger: str, force: bool = False) -> ReloadResult:
        """Re-read the rules file (and the state file); swap the table if it is valid."""
        async with self._lock:
            result, loaded, dropped = await asyncio.to_thread(self._build, trigger, force)
            for _ in range(SETTLE_ATTEMPTS if trigger == "watch" else 0):
                if loaded is not None or result.outcome is Outcome.UNCHANGED:
                    break
                await asyncio.sleep(SETTLE_SECONDS)
                again, loaded, dropped = await asyncio.to_thread(self._build, trigger, force)
                settled = again.outcome is result.outcome and again.version == result.version
                result = again
                if settled:
                    break
            if result.state_removed:
                result, loaded, dropped = await self._restore_state(result, trigger, force)
            self._last_read = result.inputs
            self._finish(result, loaded)
            if loaded is not None and dropped:  # the file's edit won: forget the stale overrides
                await self._save_overrides_quietly(loaded.overrides)
            await self._follow_shadow()
            return result

    def _build(self, trigger: str, force: bool = False) -> tuple[ReloadResult, Loaded | None, bool]:
        """(result, the table to serve or None, whether stale overrides were dropped)."""
        source = self.rules.label
        try:
            content = self.rules.read()
        except OSError as error:
            reason = f"{source}: cannot read: {error.strerror or error}"
            return ReloadResult(Outcome.MISSING, trigger, reason), None, False
        version = config_version(content)
        # The runtime state (weights, rollouts) is an input too: when another worker process
        # or replica changes it, this one converges on the same table.
        state: bytes | StateError
        try:
            state = self.state.read_bytes()
            inputs = f"{version}/{config_version(state)}"
        except StateError as error:
            state, inputs = error, f"{version}/unreadable:{error}"
        if not force and inputs == self._last_read:
            return ReloadResult(Outcome.UNCHANGED, trigger, version=version, inputs=inputs), None, False
        try:
            document = self.reader.read(content, source)  # large ones in another process
            if isinstance(state, StateError):
                raise state
            overrides = overrides_from_state(self.state.parse(state))
        except RulesError as error:
            return ReloadResult(Outcome.INVALID, trigger, str(error), version, inputs=inputs), None, False
        except StateRemoved as error:
            removed = ReloadResult(Outcome.INVALID, trigger, str(error), version, inputs=inputs)
            return replace(removed, state_removed=True), None, False
        except StateError as error:
            why = (
                f"{error}: fix it, or remove it to start from the rules' own weights (rollouts "
                "then start again)"
                if trigger == "startup"
                else f"{error}: the weights and rollout states last read stay in force"
            )
            return ReloadResult(Outcome.INVALID, trigger, why, version, inputs=inputs), None, False
        loaded, dropped = self._with_overrides(document, version, overrides, content, state)
        return ReloadResult(Outcome.LOADED, trigger, version=version, inputs=inputs), loaded, dropped

    async def _restore_state(
        self, refused: ReloadResult, trigger: str, force: bool
    ) -> tuple[ReloadResult, Loaded | None, bool]:
        """Write the state in force back where it was removed (held under the lock), then read
        again; the refusal stands when it cannot be written back."""
        state = self.loaded.state_bytes
        try:
            if not state:  # the table in force was built from no state: nothing to write back
                return refused, None, False
            if await self.state.restore(state):
                log.warning("%s was removed: wrote back the state in force", self.state.label)
        except OSError as error:
            log.error("%s was removed and cannot be written back: %s", self.state.label, error)
            return refused, None, False
        return await asyncio.to_thread(self._build, trigger, force)

    def _with_overrides(
        self,
        document: dict[str, Any],
        file_version: str,
        overrides: Mapping[str, WeightOverride],
        rules_bytes: bytes,
        state_bytes: bytes,
    ) -> tuple[Loaded, bool]:
        effective, kept, dropped = reconcile(document, overrides)
        for rule, why in dropped.items():
            log.warning("runtime weights for rule %r dropped: %s", rule, why)
        version = file_version
        if kept:
            digest = hashlib.sha256(
                json.dumps({r: o.weights for r, o in sorted(kept.items())}, sort_keys=True).encode()
            ).hexdigest()
            version = f"{file_version}+o{digest[:6]}"
        # Validated: the document as read, with only override weights in place (non-negative,
        # a positive total, the split's own clusters: see overrides.reconcile).
        table = compile_table(effective, version, self.rules.label, validated=True)
        prepare(table)  # its serving engine too, here off the loop; the swap takes it (TableHolder)
        loaded = Loaded(table, file_version, document, dict(kept), time.time(), rules_bytes, state_bytes)
        return loaded, bool(dropped)

    # -- weights from the admin API -----------------------------------------------------------

    async def set_weights(
        self, rule: str, requested: Mapping[str, int], trigger: str = "set_weights", by_rollout: bool = False
    ) -> Loaded:
        """Apply and persist a runtime weight change; ValueError explains a refusal
        (DrivenByRollout: the rule has a rollout, and only the rollout changes its weights),
        StateError an unreadable stored state, StateConflict a write that lost a race
        (nothing changed in any case)."""
        async with self._lock:
            await self._catch_up()
            loaded = self.loaded
            current = split_weights(loaded.table.document, rule)
            if current is None:
                kind = "not a split" if loaded.table.rule(rule) else "no such rule"
                raise ValueError(
                    f"rule {rule!r}: {kind} (split rules: {', '.join(_split_names(loaded)) or 'none'})"
                )
            if rule in loaded.table.rollouts and not by_rollout:
                raise DrivenByRollout(
                    f"rule {rule!r} has a rollout: its weights follow the rollout's steps in every "
                    f"phase; act on the rollout instead (graysteer rollout promote|pause|resume|abort "
                    f"{rule}), or remove the rollout from the rules to set weights by hand"
                )
            weights = resolve_weights(current, requested)
            base = split_weights(loaded.document, rule)
            assert base is not None
            overrides = dict(loaded.overrides)
            if weights == base:
                overrides.pop(rule, None)  # back to what the file says: no override needed
            else:
                overrides[rule] = WeightOverride(rule, weights, base)
            state = await self._save_overrides(overrides)
            new, _ = await asyncio.to_thread(  # compiling a large table must not hold the loop
                self._with_overrides,
                loaded.document,
                loaded.file_version,
                overrides,
                loaded.rules_bytes,
                state,
            )
            inputs = f"{loaded.file_version}/{config_version(state)}"
            self._last_read = inputs
            result = ReloadResult(Outcome.LOADED, trigger, version=loaded.file_version, inputs=inputs)
            self._finish(result, new)
            log.info("weights of rule %r set to %s (version %s)", rule, weights, new.table.version)
            await self._follow_shadow()
            return new

    async def _follow_shadow(self) -> None:
        """The shadow table follows its own document and the weights (held under the lock)."""
        if self.shadow is not None and await asyncio.to_thread(
            _quietly, self.shadow.load, self.table.version
        ):
            for event in self._shadow_watchers:
                event.set()

    def watch_shadow(self) -> asyncio.Event:
        """An event set each time the shadow table changes (loaded, replaced or removed)."""
        event = asyncio.Event()
        self._shadow_watchers.add(event)
        return event

    def unwatch_shadow(self, event: asyncio.Event) -> None:
        self._shadow_watchers.discard(event)

    async def _catch_up(self) -> None:
        """Serve the latest rules and state before changing the state (held under the lock):
        a change is computed from, and written over, what the store holds now."""
        result, loaded, _ = await asyncio.to_thread(self._build, "catch-up")
        if result.outcome is not Outcome.UNCHANGED:
            self._last_read = result.inputs
            self._finish(result, loaded)

    async def _save_overrides(self, overrides: Mapping[str, WeightOverride]) -> bytes:
        """Write the overrides into the stored state; returns the state as stored."""
        state = self.state.load()
        state["weight_overrides"] = {r: o.to_json() for r, o in sorted(overrides.items())}
        await self.state.save(state)
        return self.state.read_bytes()

    async def _save_overrides_quietly(self, overrides: Mapping[str, WeightOverride]) -> None:
        try:
            await self._save_overrides(overrides)
        except Exception as error:  # dropped anyway on every load; saving only tidies up
            log.warning("could not remove dropped weight overrides from %s: %s", self.state.label, error)

    async def save_state_section(self, key: str, data: Any) -> bytes:
        """Persist another part of the runtime state (e.g. rollouts) in the same store,
        without this change looking like new input to our own watcher; returns the state as
        stored (StateError when the stored state cannot be read: it is not overwritten)."""
        state = self.state.load()
        state[key] = data
        await self.state.save(state)
        stored = self.state.read_bytes()
        if self._last_read.startswith(self.loaded.file_version + "/"):
            self._last_read = f"{self.loaded.file_version}/{config_version(stored)}"
        return stored

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
            log.info(
                "serving rules %s version %s (%s)", self.rules.label, loaded.table.version, result.trigger
            )
        change = (self.loaded, result)  # one object for every subscriber: built once per change
        for queue in self._subscribers:  # each holds only the newest change: a slow reader skips
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(change)

    def _install(self, loaded: Loaded, result: ReloadResult) -> None:
        self.loaded = loaded
        self.last_result = result
        self.holder.table = loaded.table  # the one reference swap readers see
        self.metrics.show_table(loaded.table)

    def close(self) -> None:
        """Stop the document readers' processes, if any was started."""
        self.reader.close()
        if self.shadow is not None:
            self.shadow.close()

    def subscribe(self) -> "asyncio.Queue[tuple[Loaded, ReloadResult]]":
        """A queue of the changes (the table served, what caused it) that holds only the newest
        one: a subscriber that reads late gets the latest table and result, never a backlog,
        and one that never reads holds one change at most. So a LOADED result read from it is
        the newest change: its table is the one served. The same (Loaded, ReloadResult)
        object goes to every subscriber."""
        queue: asyncio.Queue[tuple[Loaded, ReloadResult]] = asyncio.Queue(maxsize=1)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: "asyncio.Queue[tuple[Loaded, ReloadResult]]") -> None:
        self._subscribers.discard(queue)


def _split_names(loaded: Loaded) -> list[str]:
    return [r.name for r in loaded.table.rules if r.split is not None]


def overrides_from_state(state: Mapping[str, Any]) -> dict[str, WeightOverride]:
    """The overrides of a state document that passed the state schema."""
    return {
        rule: WeightOverride.from_json(rule, data)
        for rule, data in (state.get("weight_overrides") or {}).items()
    }


def _quietly(load: Callable[[str], bool], live_version: str) -> bool:
    """A shadow table that fails to load (a bug) is logged: it never stops the served one.
    Whether the shadow table changed."""
    try:
        return load(live_version)
    except Exception:
        log.exception("loading the shadow table failed; the served table is not affected")
        return False
