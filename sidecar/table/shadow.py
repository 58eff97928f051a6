"""A shadow table: the next rules, deciding every request beside the live ones without
serving any (`serve --shadow-config NEXT`, or a fleet's `PREFIX/rules.next` in etcd).

Every request is decided by both (sidecar.table.decider); the live decision is served, and
each pair is counted in `graysteer_shadow_decisions_total{rule, cluster, shadow_cluster}`
(the live rule, what it did and what the shadow table would have done: a cluster, or
`deny:STATUS`; bounded by the two documents' names), so the disagreement rate is the share
of series with `cluster != shadow_cluster`. This process also keeps the counts since the
pair of tables last changed, for `graysteer status`. A sampled decision log line carries
the shadow decision when it differs.

Deciding twice costs: a 4,900-rule shadow table made a 0.047 ms check 15.8 ms. So the
shadow decides a sample of the requests: `--shadow-sample R` fixes the share, else it is
the share that keeps the shadow's mean cost per request under `--shadow-budget` (0.05 ms by
default), from its cost measured on synthetic requests when it loads (sidecar.core.cost),
then on the requests it decides. The counts are of the sampled requests (status says how
many were seen, and the share; `graysteer_shadow_sample_ratio`).

The next rules get the same runtime weights as the live ones (the state's overrides, where
they still fit the next document's splits), and the shadow never writes the state. It
follows its source like the live table: the reloader loads it again after every look at
the live rules (a watch event, an etcd change, SIGHUP, a weight change), a broken next
document keeps the last good shadow table, an absent one means no shadow. It is never a
reason to refuse to start or to stop serving.
"""

import logging
import random
import time
from collections import Counter
from dataclasses import dataclass

from sidecar.core import Decision, RulesError, Table, compile_table
from sidecar.core.cost import DEFAULT_SHADOW_BUDGET_MS, sample_rate, steering_cost
from sidecar.core.diff import outcome
from sidecar.core.engine import Engine
from sidecar.core.overrides import reconcile
from sidecar.core.state import StateError
from sidecar.ops.metrics import Metrics
from sidecar.table.documents import DocumentReader
from sidecar.table.holder import serving_engine
from sidecar.table.load import config_version
from sidecar.table.reload import Reloader, RulesSource, StateStore, overrides_from_state

log = logging.getLogger("graysteer.shadow")

TOP = 10  # the most frequent disagreements status shows
DEFAULT_BUDGET = DEFAULT_SHADOW_BUDGET_MS / 1000  # seconds a shadow decision may add, on average
COST_WEIGHT = 0.1  # of each sampled decision's time in the running cost
SHOW_EVERY = 256  # sampled decisions between updates of the cost and sample gauges


@dataclass(frozen=True)
class ShadowStatus:
    source: str
    version: str  # "" while there is no shadow table
    error: str  # why the last read failed, or was refused ("" when it did not)
    loaded_at: float
    live_version: str  # the live table the counts compare with
    requests: int  # sampled and decided by both since the pair of tables changed
    differing: int  # of which the shadow table would have done something else
    top: list[tuple[str, str, str, int]]  # (rule, cluster, shadow outcome, requests), most first
    seen: int = 0  # requests served since the pair of tables changed, sampled or not
    sample_ratio: float = 1.0  # the share of requests the shadow decides now
    decision_seconds: float = 0.0  # what one shadow decision costs (running mean)
    budget_seconds: float = 0.0  # the mean cost per request the sample keeps under (0: fixed)


class Shadow:
    def __init__(
        self,
        rules: RulesSource,
        state: StateStore,
        metrics: Metrics,
        reader: DocumentReader | None = None,
        *,
        sample: float | None = None,
        budget: float = DEFAULT_BUDGET,
    ) -> None:
        """`sample`: the share of requests the shadow decides; None: the share that keeps its
        mean cost per request under `budget` seconds."""
        self.rules = rules
        self.state = state
        self.metrics = metrics
        self.reader = reader or DocumentReader()
        # The shadow table's serving engine (the table's generated code); readers take it
        # once per request, a load replaces it with one assignment.
        self.engine: Engine | None = None
        self.error = ""
        self.loaded_at = 0.0
        self._read = ""  # the inputs the table was built from
        self._live = ""  # the live table version the counts are for
        self.requests = 0
        self.moves: Counter[tuple[str, str, str]] = Counter()
        self.sample, self.budget = sample, budget
        self.rate = sample if sample is not None else 1.0  # read once per request
        self.cost = 0.0  # seconds per shadow decision: measured at load, then a running mean
        self.seen = 0
        self._draw = random.Random().random  # its own: the splits' draws stay the reference's

    @property
    def table(self) -> Table | None:
        engine = self.engine
        return engine.table if engine is not None else None

    # -- the serving side ------------------------------------------------------------------------

    def take(self) -> bool:
        """Whether the shadow decides this request too (the sample)."""
        self.seen += 1
        rate = self.rate
        return rate >= 1.0 or self._draw() < rate

    def record(self, live: Decision, shadow: Decision, seconds: float = 0.0) -> bool:
        """Count one request decided by both, the shadow's decision taking `seconds`; True
        when the shadow table differs."""
        served, other = outcome(live), outcome(shadow)
        self.metrics.count_shadow(live.rule, served, other)
        self.requests += 1
        if seconds:
            self.cost += (seconds - self.cost) * COST_WEIGHT
            if self.sample is None:
                self.rate = sample_rate(self.cost, self.budget)
            if not self.requests % SHOW_EVERY:
                self._show()
        if served == other:
            return False
        self.moves[(live.rule, served, other)] += 1
        return True

    # -- following the next rules (blocking: the reloader runs it in a thread) --------------------

    def load(self, live_version: str) -> bool:
        """Read the next rules and the state again; True when the shadow table changed. The
        counts start again when either table changed. A missing document removes the shadow;
        a broken one keeps the last good."""
        changed = self._load()
        if changed or live_version != self._live:
            self._live, self.requests, self.seen = live_version, 0, 0
            self.moves = Counter()
        self._show()
        return changed

    def _show(self) -> None:
        table = self.table
        self.metrics.show_shadow(
            table.version if table is not None else None, self.rate, self.cost if table is not None else 0.0
        )

    def _measure(self, engine: Engine) -> None:
        """The new table's cost on synthetic requests, and the sample it allows."""
        cost = steering_cost(engine)
        self.cost = cost.seconds
        self.rate = self.sample if self.sample is not None else sample_rate(cost.seconds, self.budget)
        log.info(
            "shadow table %s: %s; it decides %.2f%% of requests (%s)",
            engine.table.version,
            cost.describe(),
            self.rate * 100,
            "--shadow-sample" if self.sample is not None else f"budget {self.budget * 1000:g} ms per request",
        )

    def _load(self) -> bool:
        try:
            content = self.rules.read()
        except FileNotFoundError:  # none (now): the usual state of a fleet's rules.next
            if self.table is not None:
                log.info("shadow table removed: no %s", self.rules.label)
            changed = self.table is not None
            self.engine, self.error, self._read = None, "", ""
            return changed
        except OSError as error:
            why = f"cannot read: {error.strerror or error}"
            if self.table is not None or why != self.error:
                log.warning("no shadow table: %s: %s", self.rules.label, why)
            changed = self.table is not None
            self.engine, self.error, self._read = None, why, ""
            return changed
        try:
            state = self.state.read_bytes()
        except StateError:
            state = b""  # the live table keeps its weights; the shadow decides without overrides
        inputs = f"{config_version(content)}/{config_version(state)}"
        if inputs == self._read:
            return False
        try:
            document = self.reader.read(content, self.rules.label)
            overrides = overrides_from_state(self.state.parse(state))
        except (RulesError, StateError, ValueError) as error:
            if str(error) != self.error:
                log.error("the shadow table keeps its last good rules: %s", error)
            self.error, self._read = str(error), inputs
            return False
        effective, _, _ = reconcile(document, overrides)
        table = compile_table(effective, config_version(content), self.rules.label, validated=True)
        engine = serving_engine(table)
        self._measure(engine)  # before it decides a request: its first sample is within budget
        self.engine = engine
        self.error, self.loaded_at, self._read = "", time.time(), inputs
        log.info("shadow table: %s version %s", self.rules.label, table.version)
        return True

    def close(self) -> None:
        self.reader.close()

    def status(self) -> ShadowStatus:
        return ShadowStatus(
            self.rules.label,
            self.table.version if self.table is not None else "",
            self.error,
            self.loaded_at,
            self._live,
            self.requests,
            sum(self.moves.values()),
            [(*move, count) for move, count in self.moves.most_common(TOP)],
            self.seen,
            self.rate,
            self.cost,
            self.budget if self.sample is None else 0.0,
        )


def shadow_of(reloader: Reloader) -> Shadow | None:
    """The reloader's shadow table, when it follows one."""
    return reloader.shadow if isinstance(reloader.shadow, Shadow) else None
