"""Steering one request: trust, traffic color (lanes), deny, rules -> headers to set/remove.

The order, for every adapter:
1. Identity: the connection's mTLS identity; when the rules trust XFCC and the connection
   has none, the nearest element of `x-forwarded-client-cert`.
2. Trust: a caller is trusted when its identity matches `trust.identities`, or it came
   in on one of `trust.listener_ports`, or it is plaintext and `trust.plaintext` is true.
   From an untrusted caller the override headers, the color header and the baggage lane
   member are ignored for the decision and removed from the request sent upstream.
3. Deny rules (in table order) are checked first: a color cannot bypass them.
4. A lane received from a trusted caller (color header, else baggage member) decides:
   this service's cluster for that lane, or `coloring.fallback` when it has none.
5. Otherwise the rules decide, first match wins.
6. The decision's lane travels on: the color header and the baggage member are set.
"""

from collections.abc import Callable, Mapping

from sidecar.core.baggage import well_formed, with_member, without_member
from sidecar.core.cookies import with_cookie
from sidecar.core.model import Coloring, Decision, Reason, Steering, Trust, lane_problem
from sidecar.core.request import Request
from sidecar.core.table import Table
from sidecar.core.versions import is_version
from sidecar.core.xfcc import XFCC, identity_from_xfcc

__all__ = [
    "Coloring",
    "Steering",
    "Trust",
    "fallback",
    "steer",
    "steer_with",
    "steered_headers",
    "strip_untrusted",
]


def strip_untrusted(
    table: Table, headers: Mapping[str, str]
) -> tuple[Mapping[str, str], list[str], list[tuple[str, str]]]:
    """What an untrusted caller may not carry: the protected headers and the lane member of
    `baggage`. Returns (the headers without them, names to remove, headers to set)."""
    coloring = table.coloring
    remove = [name for name in table.trust.protected if name in headers]
    set_headers: list[tuple[str, str]] = []
    baggage = headers.get("baggage")
    stripped = (
        without_member(baggage, coloring.baggage)
        if baggage is not None and coloring is not None and coloring.baggage
        else None
    )
    if not remove and (stripped is None or stripped == baggage):
        return headers, [], []
    kept = {k: v for k, v in headers.items() if k not in remove}
    if stripped is not None and stripped != baggage:
        if stripped:
            kept["baggage"] = stripped
            set_headers.append(("baggage", stripped))
        else:
            del kept["baggage"]
            remove.append("baggage")
    return kept, remove, set_headers


def steered_headers(table: Table) -> list[str]:
    """Every header a Steering may set on the request: what Envoy must let the sidecar set
    (ext_authz over HTTP copies only the listed ones), in this order."""
    names = [table.routing_header]
    if table.coloring is not None:
        names.append(table.coloring.header)
        if table.coloring.baggage:
            names.append("baggage")
    names.append(table.mirror_header)
    if table.assigns:
        names.append("cookie")  # carrying a key issued to a visitor without one
    return names


def fallback(table: Table, decision: Decision, headers: Mapping[str, str] | None) -> Steering:
    """The answer when deciding failed (`decision` is `table.fallback(reason)`).

    The caller is treated as untrusted: protected headers and the lane baggage member are
    removed (all protected names when the headers could not even be read). No routing header
    is set, so Envoy takes its fallback route to the default cluster, where the backstop
    (sidecar.envoyconf.backstop) still applies the deny rules this failed attempt could not."""
    if headers is None:
        names = set(table.trust.protected)
        if table.coloring is not None and table.coloring.baggage:
            names.add("baggage")  # unreadable: the lane member cannot be cut out of it
        return Steering(decision, remove_headers=tuple(sorted(names)))
    _, remove, set_headers = strip_untrusted(table, headers)
    return Steering(decision, set_headers=tuple(set_headers), remove_headers=tuple(remove))


def steer(table: Table, request: Request) -> Steering:
    """Steer one request (see the module docstring). `request` is left as it is: the
    Steering says which identity was used; the headers it was decided on are the request's
    less `remove_headers`."""
    return steer_with(table, request, table.denied, table.decide)


def steer_with(
    table: Table,
    request: Request,
    denied: Callable[[Request], Decision | None],
    decide: Callable[[Request], Decision],
) -> Steering:
    """`steer`, with the table's rules walked by `denied` and `decide`: the table's own, or
    the same rules generated as code (sidecar.core.engine)."""
    trust, coloring = table.trust, table.coloring
    identity = request.identity
    malformed: list[str] = []
    if trust.xfcc and not identity.mtls and XFCC in request.headers:
        from_xfcc = identity_from_xfcc(request.headers[XFCC])
        if from_xfcc is None:
            malformed.append("xfcc")  # no identity from it: the request is decided without one
        else:
            identity = from_xfcc
    if coloring is not None and coloring.baggage and not well_formed(request.headers.get("baggage", "")):
        malformed.append("baggage")  # members kept as written; only ours is read and replaced
    trusted = trust.allows(identity, request.listener_port)
    headers = request.headers
    remove: list[str] = []
    set_headers: list[tuple[str, str]] = []
    if not trusted:
        headers, remove, set_headers = strip_untrusted(table, headers)
    seen = request.seen_as(headers, identity)
    for name in table.version_headers:
        value = headers.get(name)
        if value is not None and not is_version(value):
            malformed.append("version")  # no `semver` condition matches it
            break

    decision = denied(seen)
    lane = coloring.received_lane(headers) if coloring and trusted else None
    if lane is not None and lane_problem(lane):
        malformed.append("lane")  # ignored: the rules decide, and the decided lane travels on
        lane = None
    if decision is None and lane is not None and coloring is not None:
        decision = Decision(
            coloring.lanes.get(lane, coloring.fallback),
            coloring.rule_label(lane),
            table.version,
            reason=Reason.LANE,
        )
    if decision is None:
        decision = decide(seen)
    if decision.deny_status is not None:
        if identity.principal:
            decision = decision.carrying(decision.lane, identity.principal)
        return Steering(decision, remove_headers=tuple(remove), malformed=tuple(malformed), identity=identity)

    set_headers.insert(0, (table.routing_header, decision.cluster))
    if decision.mirror is not None:
        set_headers.insert(1, (table.mirror_header, decision.mirror))
    elif table.mirror_header in headers:  # Envoy's early strip removes it; so do we
        remove.append(table.mirror_header)
    dropped = False
    if coloring is not None:
        lane = lane or coloring.lane_of.get(decision.cluster, decision.cluster)
    if identity.principal or lane is not None:
        decision = decision.carrying(lane, identity.principal or decision.identity)
    if coloring is not None and lane is not None:
        set_headers.append((coloring.header, lane))
        if coloring.baggage:
            current = dict(set_headers).get("baggage", headers.get("baggage", ""))
            baggage, added = with_member(current, coloring.baggage, lane)
            dropped = not added
            set_headers = [(k, v) for k, v in set_headers if k != "baggage"]
            if baggage:
                set_headers.append(("baggage", baggage))
    answer: tuple[tuple[str, str], ...] = ()
    if decision.issued is not None:
        set_headers.append(issued_cookie_header(headers, decision))
        answer = (("set-cookie", decision.issued.set_cookie),)
    # A header set here replaces the caller's: never also remove it (ext_authz applies
    # removals after additions, which would drop the lane we just set).
    kept_removals = tuple(h for h in remove if h not in dict(set_headers))
    return Steering(decision, tuple(set_headers), kept_removals, dropped, tuple(malformed), identity, answer)


def issued_cookie_header(headers: Mapping[str, str], decision: Decision) -> tuple[str, str]:
    """The request's `cookie` header carrying the key issued to it, for the backend to read
    (a malformed value of the cookie replaced)."""
    assert decision.issued is not None
    return "cookie", with_cookie(headers.get("cookie", ""), decision.issued.name, decision.issued.key)
