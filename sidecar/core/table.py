"""The compiled, immutable rule table and the per-request decision.

A `Table` is built once by `compile.compile_table` and never changes. Deciding a
request walks the rules top to bottom with pre-built matchers; it takes no lock
and parses no configuration, so any number of requests can read a table while a
reload builds the next one and swaps a single reference.
"""

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sidecar.core.bucketing import bucket, entry_for
from sidecar.core.cookies import CookieSpec, Issued
from sidecar.core.model import Coloring, Decision, ErrorCode, Reason, Trust
from sidecar.core.request import Request
from sidecar.core.schema import DEFAULT_MIRROR_HEADER

DEFAULT_RULE = "default"

if TYPE_CHECKING:
    from sidecar.core.rollout import RolloutSpec

Condition = Callable[[Request], bool]
KeyGetter = Callable[[Request], "str | None"]
KeySources = tuple[tuple[str, KeyGetter], ...]  # (source label, getter), first present wins


def first_key(keys: KeySources, request: Request) -> tuple[str, str] | None:
    """(source label, key) of the first key source present and non-empty in `request`."""
    for source, getter in keys:
        key = getter(request)
        if key:
            return source, key
    return None


@dataclass(frozen=True, slots=True)
class Split:
    """A sticky weighted split: key sources, seed and cumulative weight bounds."""

    rule: str
    version: str
    keys: KeySources
    seed: str
    clusters: tuple[str, ...]
    weights: tuple[int, ...]
    bounds: tuple[int, ...]  # cumulative weights
    when_key_missing: str | None  # a cluster name, or None for a random (non-sticky) pick
    # `when_key_missing: {assign: ...}`: a new key and its cookie (then `when_key_missing` is None)
    assign: CookieSpec | None = None

    @property
    def total(self) -> int:
        return self.bounds[-1]

    def issue(self, request: Request) -> Decision:
        """The decision for a visitor without a key: a new one, bucketed like any key."""
        assert self.assign is not None
        key = request.new_key()
        b = bucket(self.seed, key, self.bounds[-1])
        return Decision(
            self.clusters[entry_for(self.bounds, b)],
            self.rule,
            self.version,
            b,
            self.assign.source,
            reason=Reason.SPLIT,
            issued=Issued(self.assign.name, key, self.assign.set_cookie(key)),
        )

    def decide(self, request: Request) -> Decision:
        total = self.bounds[-1]
        found = first_key(self.keys, request)
        if found is not None:
            source, key = found
            b = bucket(self.seed, key, total)
            return Decision(
                self.clusters[entry_for(self.bounds, b)],
                self.rule,
                self.version,
                b,
                source,
                reason=Reason.SPLIT,
            )
        if self.assign is not None:
            return self.issue(request)
        if self.when_key_missing is not None:
            return Decision(
                self.when_key_missing, self.rule, self.version, None, "missing", reason=Reason.SPLIT
            )
        b = random.randrange(total)
        return Decision(
            self.clusters[entry_for(self.bounds, b)],
            self.rule,
            self.version,
            b,
            "random",
            reason=Reason.SPLIT,
        )


MIRROR_BUCKETS = 10_000  # a mirror's percent in steps of 0.01


@dataclass(frozen=True, slots=True)
class Mirror:
    """A share of a rule's requests copied to another cluster: sticky by the rule's split key
    when it has one (hashed with its own seed, so independent of the split's buckets), else
    random."""

    cluster: str
    share: int  # of MIRROR_BUCKETS
    keys: KeySources  # the split's, or none (a route rule)
    seed: str

    def picks(self, request: Request) -> bool:
        found = first_key(self.keys, request)
        if found is not None:
            return bucket(self.seed, found[1], MIRROR_BUCKETS) < self.share
        return random.randrange(MIRROR_BUCKETS) < self.share


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule: all conditions must hold; then either a fixed route or a split."""

    name: str
    conditions: tuple[Condition, ...]
    route: Decision | None  # pre-built: a fixed route allocates nothing per request
    split: Split | None
    mirror: Mirror | None = None

    def decide(self, request: Request) -> Decision:
        if self.route is not None:  # a fixed route or a deny
            decision = self.route
        else:
            assert self.split is not None
            decision = self.split.decide(request)
        mirror = self.mirror
        if mirror is not None and decision.cluster != mirror.cluster and mirror.picks(request):
            return decision.mirrored(mirror.cluster)  # never a copy to where the request goes
        return decision


@dataclass(frozen=True, slots=True)
class Table:
    """An immutable, compiled rules file."""

    version: str
    source: str
    clusters: tuple[str, ...]
    default: str
    routing_header: str
    rules: tuple[Rule, ...]
    document: dict[str, object] = field(repr=False, compare=False)
    trust: Trust = field(default_factory=Trust, repr=False)
    coloring: Coloring | None = field(default=None, repr=False)
    deny_rules: tuple[Rule, ...] = ()  # the rules whose action is deny, in table order
    rollouts: "dict[str, RolloutSpec]" = field(default_factory=dict, compare=False)
    version_headers: frozenset[str] = frozenset()  # headers a `semver` condition reads
    mirror_header: str = DEFAULT_MIRROR_HEADER
    # What a decision log shows of a request: the headers the rules read (matches, split and
    # mirror keys, trust, coloring), and those whose values it replaces by <redacted>.
    read_headers: frozenset[str] = frozenset()
    redacted_headers: frozenset[str] = frozenset()

    @property
    def assigns(self) -> tuple[CookieSpec, ...]:
        """The cookies the table's splits issue to visitors without a key, by name."""
        specs = {r.split.assign.name: r.split.assign for r in self.rules if r.split and r.split.assign}
        return tuple(specs.values())

    @property
    def mirrors(self) -> bool:
        """Whether any rule copies requests to a mirror cluster."""
        return any(rule.mirror is not None for rule in self.rules)

    @property
    def default_decision(self) -> Decision:
        return Decision(self.default, DEFAULT_RULE, self.version, reason=Reason.DEFAULT)

    def decide(self, request: Request) -> Decision:
        """The first rule whose conditions all hold decides; else the default cluster."""
        for rule in self.rules:
            for condition in rule.conditions:
                if not condition(request):
                    break
            else:
                return rule.decide(request)
        return self.default_decision

    def denied(self, request: Request) -> Decision | None:
        """The first deny rule whose conditions hold, checked before lanes and routes."""
        for rule in self.deny_rules:
            if all(condition(request) for condition in rule.conditions):
                return rule.decide(request)
        return None

    def fallback(self, error: ErrorCode) -> Decision:
        """The decision used when deciding failed: the default cluster, with the error."""
        return Decision(self.default, DEFAULT_RULE, self.version, error=error, reason=Reason.FALLBACK)

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)
