"""The impact of a rules change, against expectations computed by hand from the bucketing
formula (mmh3 of seed + key, times the total, over 2^32): a weight ramp moves exactly the
users whose bucket enters the canary's range and none backwards; a new seed re-assigns users
both ways; a reordered rule list and an edited regex move the requests they select."""

from sidecar.core import Request
from sidecar.core.bucketing import bucket
from sidecar.core.diff import Move, compare, synthetic_requests
from tests.helpers import table_from_yaml

SPLIT = """
version: 1
clusters: [stable, canary, v2]
default: stable
rules:
  - name: tier
    match: {headers: {x-tier: {regex: "beta-[0-9]+"}}}
    route: canary
  - name: tier-b
    match: {headers: {x-tier: {prefix: b}}}
    route: v2
  - name: ramp
    split:
      key: [header:x-user-id]
      seed: SEED
      to: [{cluster: stable, weight: STABLE}, {cluster: canary, weight: CANARY}]
"""
USERS = [f"user-{i}" for i in range(2000)]


def table(stable: int = 90, canary: int = 10, seed: str = "s1", text: str = SPLIT):  # type: ignore[no-untyped-def]
    doc = text.replace("STABLE", str(stable)).replace("CANARY", str(canary)).replace("SEED", seed)
    return table_from_yaml(doc)


def users() -> list[Request]:
    return [Request({"x-user-id": user}) for user in USERS]


def test_a_weight_ramp_moves_exactly_the_users_entering_the_canary_range_and_none_back() -> None:
    report = compare(table(90, 10), table(80, 20), users())
    expected = [u for u in USERS if 80 <= bucket("s1", u, 100) < 90]
    assert report.requests == len(USERS) and report.moved_requests == len(expected)
    assert set(report.moved) == {Move("ramp", "ramp", "stable", "canary")}
    assert report.moved[Move("ramp", "ramp", "stable", "canary")].keys == {
        f"header:x-user-id={u}" for u in expected
    }
    assert not report.backwards
    assert abs(report.moved_share - 0.1) < 0.03 and report.moved_key_share == report.moved_share


def test_ramping_down_is_not_backwards() -> None:
    report = compare(table(80, 20), table(90, 10), users())
    assert set(report.moved) == {Move("ramp", "ramp", "canary", "stable")} and not report.backwards


def test_a_new_seed_reassigns_users_both_ways_and_is_backwards() -> None:
    report = compare(table(seed="s1"), table(seed="s2"), users())
    was = {u for u in USERS if bucket("s1", u, 100) >= 90}
    now = {u for u in USERS if bucket("s2", u, 100) >= 90}
    assert report.moved_requests == len(was ^ now)
    back = report.backwards[Move("ramp", "ramp", "canary", "stable")]
    assert back.requests == len(was - now) and len(back.examples) == 3


def test_reordered_rules_move_the_requests_both_select() -> None:
    reordered = SPLIT.replace(
        """  - name: tier
    match: {headers: {x-tier: {regex: "beta-[0-9]+"}}}
    route: canary
  - name: tier-b
    match: {headers: {x-tier: {prefix: b}}}
    route: v2
""",
        """  - name: tier-b
    match: {headers: {x-tier: {prefix: b}}}
    route: v2
  - name: tier
    match: {headers: {x-tier: {regex: "beta-[0-9]+"}}}
    route: canary
""",
    )
    requests = [Request({"x-tier": t, "x-user-id": "u"}) for t in ("beta-1", "beta-22", "bronze", "gold")]
    report = compare(table(), table(text=reordered), requests)
    assert {m: c.requests for m, c in report.moved.items()} == {Move("tier", "tier-b", "canary", "v2"): 2}


def test_an_edited_regex_moves_what_it_no_longer_selects() -> None:
    edited = SPLIT.replace("beta-[0-9]+", "beta-[0-9]")
    requests = [Request({"x-tier": t, "x-user-id": "u"}) for t in ("beta-1", "beta-22", "beta-333")]
    report = compare(table(), table(text=edited), requests)
    assert {m: c.requests for m, c in report.moved.items()} == {Move("tier", "tier-b", "canary", "v2"): 2}


def test_synthetic_requests_reach_the_rules_and_spread_split_keys() -> None:
    old, new = table(90, 10), table(80, 20)
    requests = synthetic_requests([old, new], 3000)
    assert len(requests) >= 2900 and len({r.headers["x-user-id"] for r in requests}) == len(requests)
    assert any(r.headers.get("x-tier") == "bx" for r in requests)  # the prefix rule's value
    report = compare(old, new, requests)
    # a third of them reach the split (the others stop at tier-b); a tenth of those move
    assert set(report.moved) == {Move("ramp", "ramp", "stable", "canary")} and not report.backwards
    assert 0.02 < report.moved_share < 0.06
