"""`steer()` itself, table-driven: trust x received lane x deny order x split, each row the
whole outcome (cluster, reason, lane, headers set and removed), and the request untouched."""

from dataclasses import dataclass

import pytest

from sidecar.core import Identity, Reason, Request, decision_fields, steer
from sidecar.core.bucketing import bucket
from tests.helpers import table_from_yaml

QA = "spiffe://example.org/ns/qa/sa/tester"
TABLE = table_from_yaml("""
version: 1
clusters: [stable, canary, v3]
default: stable
trust:
  identities: [{glob: "spiffe://example.org/ns/qa/*"}]
  override_headers: [x-canary]
coloring:
  lanes: {stable: stable, canary: canary}
rules:
  - name: no-admin
    match: {path: {prefix: /admin}}
    deny: {status: 403, reason: internal}
  - name: force
    match: {headers: {x-canary: "1"}}
    route: canary
  - name: ramp
    split:
      key: [header:x-user-id]
      seed: s
      to: [{cluster: stable, weight: 70}, {cluster: canary, weight: 30}]
      when_key_missing: stable
""")
TRUSTED = Identity.from_sans(True, (QA,))
UNTRUSTED = Identity.from_sans(True, ("spiffe://example.org/ns/prod/sa/web",))
LANE_CANARY = {"x-graysteer-lane": "canary"}
BAGGAGE_CANARY = {"baggage": "t=1,graysteer.lane=canary"}


def split_cluster(user: str) -> str:
    return "stable" if bucket("s", user, 100) < 70 else "canary"


@dataclass(frozen=True)
class Row:
    name: str
    identity: Identity
    headers: dict[str, str]
    path: str
    cluster: str
    reason: Reason
    lane: str | None
    removed: tuple[str, ...] = ()
    deny: int | None = None


ROWS = [
    Row("trusted lane header decides", TRUSTED, LANE_CANARY, "/", "canary", Reason.LANE, "canary"),
    Row("trusted baggage lane decides", TRUSTED, BAGGAGE_CANARY, "/", "canary", Reason.LANE, "canary"),
    Row(
        "untrusted lane is removed, rules decide",
        UNTRUSTED,
        LANE_CANARY,
        "/",
        "stable",
        Reason.SPLIT,
        "stable",
    ),  # the lane header is set again (to stable), not removed
    Row(
        "plaintext lane is removed",
        Identity(),
        {**LANE_CANARY, "x-user-id": "u-1"},
        "/",
        split_cluster("u-1"),
        Reason.SPLIT,
        split_cluster("u-1"),
    ),
    Row(
        "deny comes before a trusted lane",
        TRUSTED,
        LANE_CANARY,
        "/admin/x",
        "stable",
        Reason.DENY,
        None,
        deny=403,
    ),
    Row(
        "deny comes before an untrusted override",
        UNTRUSTED,
        {"x-canary": "1"},
        "/admin",
        "stable",
        Reason.DENY,
        None,
        removed=("x-canary",),
        deny=403,
    ),
    Row("trusted override routes", TRUSTED, {"x-canary": "1"}, "/", "canary", Reason.ROUTE, "canary"),
    Row(
        "untrusted override is removed and ignored",
        UNTRUSTED,
        {"x-canary": "1", "x-user-id": "u-2"},
        "/",
        split_cluster("u-2"),
        Reason.SPLIT,
        split_cluster("u-2"),
        removed=("x-canary",),
    ),
    Row("split without a key", UNTRUSTED, {}, "/", "stable", Reason.SPLIT, "stable"),
    *[
        Row(
            f"split user u-{i}",
            UNTRUSTED,
            {"x-user-id": f"u-{i}"},
            "/",
            split_cluster(f"u-{i}"),
            Reason.SPLIT,
            split_cluster(f"u-{i}"),
        )
        for i in range(3, 9)
    ],
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_steer(row: Row) -> None:
    headers = dict(row.headers)
    request = Request(headers, "GET", row.path, row.identity)
    steering = steer(TABLE, request)
    decision = steering.decision
    assert (decision.cluster, decision.reason, decision.lane, decision.deny_status) == (
        row.cluster,
        row.reason,
        row.lane,
        row.deny,
    )
    assert steering.remove_headers == row.removed
    assert steering.identity is row.identity
    assert request.headers is headers and headers == row.headers  # steer() changes nothing it is given
    assert request.identity is row.identity
    if row.deny is None:
        assert dict(steering.set_headers)["x-route-cluster"] == row.cluster
        assert dict(steering.set_headers)["x-graysteer-lane"] == row.lane
        assert f"graysteer.lane={row.lane}" in dict(steering.set_headers)["baggage"]
    else:
        assert steering.set_headers == ()
    fields = decision_fields(decision)
    assert fields["reason"] == str(row.reason) and "error" not in fields


def test_every_reason_is_reached_and_the_set_is_closed() -> None:
    assert {row.reason for row in ROWS} | {Reason.DEFAULT, Reason.FALLBACK} == set(Reason)


def test_carrying_and_mirrored_keep_every_other_field() -> None:
    from dataclasses import fields, replace

    from sidecar.core import Decision, ErrorCode
    from sidecar.core.cookies import Issued

    issued = Issued("gs", "k" * 22, "gs=" + "k" * 22)
    full = Decision(
        "c", "r", "v", 7, "header:x", ErrorCode.ENGINE, "l0", "id0", 418, "why", Reason.FALLBACK, "m0", issued
    )
    assert full.carrying("l1", "id1") == replace(full, lane="l1", identity="id1")
    assert full.mirrored("m1") == replace(full, mirror="m1")
    assert len(fields(Decision)) == 13  # a new field must be added to carrying() and mirrored() too


@pytest.mark.parametrize("sent", ["stable, canary", "x" * 7000, "canary;evil=1", " canary", "ca nary"])
def test_a_malformed_lane_from_a_trusted_caller_is_ignored_never_passed_on(sent: str) -> None:
    steering = steer(TABLE, Request({"x-graysteer-lane": sent, "x-user-id": "u-3"}, "GET", "/", TRUSTED))
    assert steering.decision.reason is Reason.SPLIT  # the rules decided
    assert steering.malformed == ("lane",)
    headers = dict(steering.set_headers)
    assert headers["x-graysteer-lane"] == split_cluster("u-3")
    assert headers["baggage"] == f"graysteer.lane={split_cluster('u-3')}"


def test_lane_labels_are_bounded_by_the_rules_file() -> None:
    labels = set()
    for i in range(500):  # as many distinct well-formed lanes as callers care to send
        steering = steer(TABLE, Request({"x-graysteer-lane": f"lane-{i}"}, "GET", "/", TRUSTED))
        assert steering.decision.cluster == "stable"  # coloring.fallback: this service has no such lane
        assert steering.decision.lane == f"lane-{i}"  # passed on: the next hop may have it
        labels.add(steering.decision.rule)
    labels.add(steer(TABLE, Request({"x-graysteer-lane": "canary"}, "GET", "/", TRUSTED)).decision.rule)
    assert labels == {"lane:unknown", "lane:canary"}


def test_a_mirrored_decision_sets_the_mirror_header_and_a_sent_one_is_removed() -> None:
    from sidecar.core import steer
    from tests.helpers import request, table_from_rules

    table = table_from_rules(
        [{"name": "all", "route": "stable", "mirror": {"cluster": "canary", "percent": 100}}],
        mirror_header="X-Shadow-To",
    )
    steering = steer(table, request(x_shadow_to="stable"))
    assert steering.set_headers[:2] == (("x-route-cluster", "stable"), ("x-shadow-to", "canary"))
    assert "x-shadow-to" not in steering.remove_headers  # replaced, not removed
    plain = table_from_rules([{"name": "all", "route": "stable"}], mirror_header="X-Shadow-To")
    unmirrored = steer(plain, request(x_shadow_to="canary"))
    assert "x-shadow-to" in unmirrored.remove_headers and len(unmirrored.set_headers) == 1
