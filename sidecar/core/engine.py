"""The serving engine of one table: its rules as generated code (sidecar.core.chain) and a
`steer` specialized for the common request, with the reference steering for the rest.

`steer` (sidecar.core.steering) and `Table.decide` stay the reference: plain, general, what
`explain` and the tests read. An `Engine` gives the same answers, faster:

- the rules walk is the generated chain (`Table.decide`/`Table.denied` when the table is not
  generated);
- the common request takes a short path: no `x-forwarded-client-cert` to read (or not
  trusted), no `baggage` header, no protected header from an untrusted caller, no lane from a
  trusted one, no mirror header, and no deny. Then no header is removed, the headers set
  follow from the decision alone, and for a caller without an identity the whole Steering is
  built once per decision and shared (both are immutable);
- any other request is steered by the reference steering over the generated chain
  (`steer_with`), before anything is drawn at random, so that the answers, random splits
  included, are the reference's.

tests/core/test_engine_differential.py runs every core test of steering and tables through
both and compares them on generated tables and requests.
"""

from sidecar.core.baggage import with_member
from sidecar.core.chain import generate
from sidecar.core.identity import NO_IDENTITY, Identity
from sidecar.core.model import Decision, Steering
from sidecar.core.request import Request
from sidecar.core.steering import steer_with
from sidecar.core.table import Table
from sidecar.core.versions import is_version
from sidecar.core.xfcc import XFCC

SHARED_STEERINGS = 4096  # Steerings kept for callers without identity (then cleared)
MAX_PREPARED = 4  # engines built ahead and not yet taken (a reload builds one at a time)


class Engine:
    """Decides requests against one table, as `steer` and `Table.decide` do."""

    __slots__ = (
        "_baggage",
        "_bail_headers",
        "_color_header",
        "_lane_of",
        "_shared",
        "_short",
        "_trust_constant",
        "decide",
        "denied",
        "error",
        "generated",
        "table",
    )

    def __init__(self, table: Table) -> None:
        self.table = table
        self.error: str | None = None  # why the rules are not generated code (None: they are)
        try:
            chain = generate(table)
        except Exception as error:  # a bug in the generator must not refuse a valid table
            chain, self.error = None, f"generating its rules failed: {error!r}"
        self.generated = chain is not None
        self.decide, self.denied = chain if chain is not None else (table.decide, table.denied)
        trust, coloring = table.trust, table.coloring
        # Headers whose presence sends a request to the reference steering.
        bail = {table.mirror_header}
        if coloring is not None and coloring.baggage:
            bail.add("baggage")
        if trust.xfcc:
            bail.add(XFCC)
        self._bail_headers = tuple(sorted(bail))
        # The short path's headers never collide (the reference drops a set `baggage` it
        # replaces, and keeps one of two equal names): a table where they could is steered
        # by the reference alone.
        named = [table.routing_header, table.mirror_header, "baggage"]
        if coloring is not None:
            named.append(coloring.header)
        self._short = len(set(named)) == len(named)
        # Trust that cannot depend on the caller: nobody trusted (no identities, ports or plaintext).
        self._trust_constant = not (trust.identities or trust.listener_ports or trust.plaintext)
        self._color_header = coloring.header if coloring is not None else None
        self._baggage = coloring.baggage if coloring is not None else None
        self._lane_of = coloring.lane_of if coloring is not None else None
        self._shared: dict[int, tuple[Decision, Steering]] = {}

    def steer(self, request: Request) -> Steering:
        """`steer(self.table, request)`."""
        headers = request.headers
        table = self.table
        if not self._short:
            return steer_with(table, request, self.denied, self.decide)
        for name in self._bail_headers:
            if name in headers:
                return steer_with(table, request, self.denied, self.decide)
        identity = request.identity
        trusted = False if self._trust_constant else table.trust.allows(identity, request.listener_port)
        if trusted:
            if self._color_header is not None and headers.get(self._color_header):
                return steer_with(table, request, self.denied, self.decide)
        else:
            for name in table.trust.protected:
                if name in headers:
                    return steer_with(table, request, self.denied, self.decide)
        if self.denied(request) is not None:
            return steer_with(table, request, self.denied, self.decide)
        malformed: tuple[str, ...] = ()
        for name in table.version_headers:
            value = headers.get(name)
            if value is not None and not is_version(value):
                malformed = ("version",)
                break
        decision = self.decide(request)
        if decision.issued is not None:  # a new key: a request of its own, never shared
            return steer_with(table, request, self.denied, lambda _: decision)
        if identity is NO_IDENTITY and not malformed:
            shared = self._shared.get(id(decision))
            if shared is not None and shared[0] is decision:
                return shared[1]
            steering = self._steering(decision, identity, malformed)
            if len(self._shared) >= SHARED_STEERINGS:
                self._shared.clear()
            self._shared[id(decision)] = (decision, steering)  # holds `decision`: its id stays its own
            return steering
        return self._steering(decision, identity, malformed)

    def _steering(self, decision: Decision, identity: Identity, malformed: tuple[str, ...]) -> Steering:
        """The Steering of the short path: `steer_with`'s end, for a request that kept every
        header and carried no lane."""
        table = self.table
        set_headers = [(table.routing_header, decision.cluster)]
        if decision.mirror is not None:
            set_headers.append((table.mirror_header, decision.mirror))
        lane = None
        if self._lane_of is not None:
            lane = self._lane_of.get(decision.cluster, decision.cluster)
        principal = identity.principal
        if principal or lane is not None:
            decision = decision.carrying(lane, principal or decision.identity)
        dropped = False
        if self._color_header is not None and lane is not None:
            set_headers.append((self._color_header, lane))
            if self._baggage:
                baggage, added = with_member("", self._baggage, lane)
                dropped = not added
                if baggage:
                    set_headers.append(("baggage", baggage))
        return Steering(decision, tuple(set_headers), (), dropped, malformed, identity)


_prepared: dict[int, Engine] = {}  # id(table) -> its engine; the engine holds the table


def prepare(table: Table) -> Engine:
    """Build `table`'s engine now, for `engine_for` to hand out later: generating and compiling
    a large table's code takes as long as compiling the table, so a reload does both off the
    serving loop (sidecar.table.reload) and the swap on the loop only takes the result."""
    engine = Engine(table)
    if len(_prepared) >= MAX_PREPARED:
        _prepared.clear()
    _prepared[id(table)] = engine
    return engine


def engine_for(table: Table) -> Engine:
    """`table`'s engine: the one `prepare` built, else a new one."""
    engine = _prepared.pop(id(table), None)
    if engine is None or engine.table is not table:
        engine = Engine(table)
    return engine
