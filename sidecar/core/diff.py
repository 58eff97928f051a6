"""What a change of the rules does to traffic, before it lands: decide the same requests with
the old and the new table and count what moves.

Pure and deterministic (a split's bucket depends only on its seed and key), so the answer is
exact for the requests given: real ones (an access log, a decision log) or synthetic ones
built from the rules' own match values and many split keys (`synthetic_requests`).

A *backwards* move is a request that leaves a cluster whose weight in the same split did
not go down (a user on the canary at 10% who is on stable at 20%): a ramp must never do
that, and flagd's bucketing (entries keep their order, the last owns the top of the range)
guarantees it for a weight change alone; a new seed, reordered entries or a reordered rule
list break it.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sidecar.core.cookies import derived_key
from sidecar.core.model import Decision
from sidecar.core.request import Request
from sidecar.core.steering import steer
from sidecar.core.table import Table

EXAMPLES = 3  # per kind of move
UNKNOWN_KEY = ("random",)  # a split that drew at random: not comparable ("missing" is its when_key_missing)
# A key issued to a visitor without one (when_key_missing: assign) is random too: such a
# request is counted with the random draws, not compared.


@dataclass(frozen=True)
class Move:
    old_rule: str
    new_rule: str
    old_cluster: str
    new_cluster: str


@dataclass
class MoveCount:
    requests: int = 0
    keys: set[str] = field(default_factory=set)
    examples: list[Request] = field(default_factory=list)


@dataclass
class DiffReport:
    requests: int = 0  # requests compared (random split draws left out)
    random: int = 0  # requests a split drew at random (or issued a new key) in either table
    moved: dict[Move, MoveCount] = field(default_factory=dict)
    keys: set[str] = field(default_factory=set)  # distinct split keys seen
    moved_keys: set[str] = field(default_factory=set)
    backwards: dict[Move, MoveCount] = field(default_factory=dict)

    @property
    def moved_requests(self) -> int:
        return sum(count.requests for count in self.moved.values())

    @property
    def moved_share(self) -> float:
        return self.moved_requests / self.requests if self.requests else 0.0

    @property
    def moved_key_share(self) -> float:
        return len(self.moved_keys) / len(self.keys) if self.keys else 0.0


def outcome(decision: Decision) -> str:
    """What a decision does with a request: its cluster, or `deny:STATUS`."""
    return decision.cluster if decision.deny_status is None else f"deny:{decision.deny_status}"


def split_weight(table: Table, rule: str, cluster: str) -> int | None:
    """The weight of `cluster` in the split rule `rule` (None: no such split or entry)."""
    found = table.rule(rule)
    if found is None or found.split is None or cluster not in found.split.clusters:
        return None
    return found.split.weights[found.split.clusters.index(cluster)]


def is_backwards(old_table: Table, new_table: Table, old: Decision, new: Decision) -> bool:
    """A request that left a split's cluster whose weight did not go down (same rule)."""
    if old.rule != new.rule or old.cluster == new.cluster or old.bucket is None:
        return False
    before = split_weight(old_table, old.rule, old.cluster)
    after = split_weight(new_table, new.rule, old.cluster)
    return before is not None and after is not None and after >= before > 0


def compare(old_table: Table, new_table: Table, requests: Iterable[Request]) -> DiffReport:
    """Decide every request with both tables (the full steering: trust, lanes, deny)."""
    report = DiffReport()
    for request in requests:
        old, new = steer(old_table, request).decision, steer(new_table, request).decision
        if (
            old.key_source in UNKNOWN_KEY
            or new.key_source in UNKNOWN_KEY
            or old.issued is not None
            or new.issued is not None
        ):
            report.random += 1
            continue
        report.requests += 1
        key = split_key(request, old) or split_key(request, new)
        if key is not None:
            report.keys.add(key)
        if outcome(old) == outcome(new):
            continue
        move = Move(old.rule, new.rule, outcome(old), outcome(new))
        _count(report.moved, move, request, key)
        if key is not None:
            report.moved_keys.add(key)
        if is_backwards(old_table, new_table, old, new):
            _count(report.backwards, move, request, key)
    return report


def _count(into: dict[Move, MoveCount], move: Move, request: Request, key: str | None) -> None:
    count = into.setdefault(move, MoveCount())
    count.requests += 1
    if key is not None:
        count.keys.add(key)
    if len(count.examples) < EXAMPLES:
        count.examples.append(request)


def split_key(request: Request, decision: Decision) -> str | None:
    """`source=value` of the key a split decided on, or None (no split decided)."""
    if decision.bucket is None or decision.key_source is None:
        return None
    kind, _, name = decision.key_source.partition(":")
    if kind == "header":
        value = request.headers.get(name.lower())
    elif kind == "cookie":
        value = request.cookie(name)
    elif kind == "query":
        value = request.query_param(name)
    else:  # identity
        value = decision.identity
    return f"{decision.key_source}={value}" if value else None


def synthetic_requests(tables: Sequence[Table], users: int) -> list[Request]:
    """Requests built from the rules' own match values (one per rule that a header, path,
    host or gRPC condition selects, and one that matches nothing), each sent by `users`
    users: the users' ids fill every split key source of both tables (a cookie a split issues
    gets a key of the shape issued, so that it is read as a key)."""
    from sidecar.core.samples import rule_requests

    bases = rule_requests(tables)
    sources = sorted(
        {source for table in tables for rule in table.rules if rule.split for source, _ in rule.split.keys}
    )
    issued = {spec.name for table in tables for spec in table.assigns}
    per_base = max(1, users // len(bases))
    out = []
    for index, (method, path, headers, identity) in enumerate(bases):
        for user in range(per_base):
            uid = f"user-{index}-{user}"
            h = dict(headers)
            query = []
            cookies = []
            for source in sources:
                kind, _, name = source.partition(":")
                if kind == "header":
                    h[name.lower()] = uid
                elif kind == "cookie":
                    cookies.append(f"{name}={derived_key({}, uid) if name in issued else uid}")
                elif kind == "query":
                    query.append(f"{name}={uid}")
            if cookies:
                h["cookie"] = "; ".join(cookies)
            full = path + ("?" + "&".join(query) if query else "")
            out.append(Request({**h, ":method": method, ":path": full}, method, full, identity))
    return out
