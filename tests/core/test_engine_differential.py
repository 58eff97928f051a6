"""The serving engine (generated rule chain, short steering path) against the reference
(`steer`, `Table.decide`, `Table.denied`) on generated tables and requests: the same answer,
the same random draws, every time. The rules and requests are drawn from small vocabularies
so that conditions match, indexes form (runs of exact-header rules), trust and coloring
apply, and the reference's general path is taken as often as the short one."""

import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.core import NO_IDENTITY, Identity, Request, Table, chain, compile_table
from sidecar.core.chain import MIN_INDEXED_RUN
from sidecar.core.engine import Engine
from sidecar.core.validate import problems
from tests.core.conftest import REFERENCE_DECIDE, REFERENCE_DENIED, REFERENCE_STEER

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
CLUSTERS = ["stable", "canary", "v2"]
HEADERS = ["x-a", "x-tenant", "x-user-id", "x-version", "x-canary", "x-graysteer-lane", "x-mirror-cluster"]
VALUES = ["1", "2", "t0", "t1", "beta-7", "1.2.3", "2.0.0-rc.1", "", "a,b"]
PATHS = ["/", "/api/v1", "/admin/x", "/shop.v1.Cart/Get", "/shop.v1.Cart/Get/x", "/search?gray_id=9"]
SPIFFE = ["spiffe://example.org/ns/qa/sa/t", "spiffe://other.org/ns/prod/sa/web"]

header_forms = st.one_of(
    st.sampled_from(VALUES[:6]),
    st.builds(lambda v: {"exact": v}, st.sampled_from(VALUES[:6])),
    st.builds(lambda v: {"prefix": v}, st.sampled_from(["t", "beta", "1."])),
    st.builds(lambda v: {"regex": v}, st.sampled_from(["t[0-9]", "beta-[0-9]+", ".*"])),
    st.builds(lambda v: {"semver": v}, st.sampled_from(["^1.2", ">=2.0.0-rc.0", "*"])),
    st.just({"present": True}),
    st.just({"absent": True}),
)
identity_forms = st.sampled_from(
    [
        {"glob": "spiffe://example.org/ns/qa/*"},
        {"trust_domain": "other.org"},
        {"exact": SPIFFE[1]},
        {"dns": "*.example.org"},
        {"present": True},
        {"absent": True},
    ]
)
matches = st.fixed_dictionaries(
    {},
    optional={
        "headers": st.dictionaries(st.sampled_from(HEADERS[:4]), header_forms, min_size=1, max_size=2),
        "path": st.sampled_from([{"prefix": "/api/"}, {"exact": "/"}, {"regex": "/admin/.*"}]),
        "method": st.sampled_from(["GET", ["POST", "PUT"]]),
        "identity": identity_forms,
        "host": st.sampled_from(["*.example.org", ["shop.example.org", "beta.*"]]),
        "grpc": st.sampled_from([{"service": "shop.v1.Cart"}, {"service": "shop.v1.Cart", "method": "Get"}]),
    },
)
keys = st.lists(
    st.sampled_from(["header:x-user-id", "cookie:uid", "query:gray_id", "identity", "header:X-A"]),
    min_size=1,
    max_size=3,
    unique=True,
)
splits = st.builds(
    lambda key, weights, missing: {
        "key": key,
        "to": [{"cluster": c, "weight": w} for c, w in zip(CLUSTERS, weights, strict=False)],
        **({"when_key_missing": missing} if missing else {}),
    },
    keys,
    st.lists(st.integers(0, 100), min_size=1, max_size=3).filter(lambda w: sum(w) > 0),
    # a new key in a cookie; `uid` is also a key source drawn above, and requests send it
    st.sampled_from([None, "random", "canary", {"assign": {"cookie": "uid"}}, {"assign": {"cookie": "gs"}}]),
)
actions = st.one_of(
    st.builds(lambda c: {"route": c}, st.sampled_from(CLUSTERS)),
    st.just({"deny": {"status": 403}}),
    st.builds(lambda s: {"split": s}, splits),
)
mirrors = st.one_of(
    st.none(), st.builds(lambda p: {"cluster": "v2", "percent": p}, st.sampled_from([5, 50, 100]))
)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    rules: list[dict[str, Any]] = []
    for i in range(draw(st.integers(0, 6))):
        rule: dict[str, Any] = {"name": f"r{i}", **draw(actions)}
        match = draw(matches)
        if match:
            rule["match"] = match
        mirror = draw(mirrors)
        if mirror is not None and "deny" not in rule:
            rule["mirror"] = mirror
        rules.append(rule)
    if draw(st.booleans()):  # a run of per-tenant rules: indexed by x-tenant
        at = draw(st.integers(0, len(rules)))
        run = [
            {
                "name": f"tenant{i}",
                "match": {"headers": {"x-tenant": f"t{i % 3}", **draw(st.sampled_from([{}, {"x-a": "1"}]))}},
                **draw(actions),
            }
            for i in range(draw(st.integers(MIN_INDEXED_RUN, MIN_INDEXED_RUN + 3)))
        ]
        rules[at:at] = run
    document: dict[str, Any] = {"version": 1, "clusters": CLUSTERS, "default": "stable", "rules": rules}
    none: dict[str, st.SearchStrategy[Any]] = {}
    trust = draw(
        st.fixed_dictionaries(
            none,
            optional={
                "identities": st.just([{"glob": "spiffe://example.org/ns/qa/*"}]),
                "plaintext": st.booleans(),
                "listener_ports": st.just([15001]),
                "xfcc": st.booleans(),
                "override_headers": st.just(["x-canary"]),
            },
        )
    )
    if trust:
        document["trust"] = trust
    lanes: dict[str, st.SearchStrategy[Any]] = {
        "lanes": st.sampled_from([{"stable": "stable", "canary": "canary"}, {"blue": "v2"}])
    }
    colorings: dict[str, st.SearchStrategy[Any]] = {
        "baggage": st.sampled_from(["graysteer.lane", ""]),
        "fallback": st.just("canary"),
    }
    coloring = draw(st.one_of(st.none(), st.fixed_dictionaries(lanes, optional=colorings)))
    if coloring is not None:
        document["coloring"] = coloring
    return document


identities = st.sampled_from(
    [
        NO_IDENTITY,
        Identity(),
        Identity.from_sans(True, (SPIFFE[0],)),
        Identity.from_sans(True, (SPIFFE[1],), ("api.example.org",)),
        Identity.from_sans(True, (), ("bad name!",)),
    ]
)
request_headers = st.dictionaries(
    st.sampled_from([*HEADERS, "baggage", "cookie", ":authority", "x-forwarded-client-cert", "x-version"]),
    st.sampled_from(
        [
            *VALUES,
            "uid=u1; theme=dark",
            "uid=Kq3vX9bT2mWn8pLr4sYd6f; gs=Zz-_09azAZbcdefghijklmno",  # keys of the issued shape
            # cookie headers as ext_authz joins an HTTP/1.1 client's repeated ones (with `,`)
            "theme=dark,uid=Kq3vX9bT2mWn8pLr4sYd6f",
            "gs=canary , uid=u1;theme=dark,gs=Zz-_09azAZbcdefghijklmno",
            "graysteer.lane=canary,other=1",
            "bad baggage",
            "shop.example.org",
            "By=spiffe://x;URI=spiffe://example.org/ns/qa/sa/t",
        ]
    ),
    max_size=6,
)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    return Request(
        draw(request_headers),
        draw(st.sampled_from(["GET", "POST", "put"])),
        draw(st.sampled_from(PATHS)),
        draw(identities),
        draw(st.sampled_from([None, 15001, 8080])),
    )


def same(table: Table, engine: Engine, request: Request, seed: int) -> None:
    for reference, served in (
        (lambda: REFERENCE_STEER(table, request), lambda: engine.steer(request)),
        (lambda: REFERENCE_DECIDE(table, request), lambda: engine.decide(request)),
        (lambda: REFERENCE_DENIED(table, request), lambda: engine.denied(request)),
    ):
        random.seed(seed)
        expected = reference()
        after = random.getstate()
        random.seed(seed)
        assert served() == expected
        assert random.getstate() == after


BOUNDS = {  # (CHUNK_CHARS, MAX_RULE_CHARS)
    "as-written": (chain.CHUNK_CHARS, chain.MAX_RULE_CHARS),
    "small-chunks": (600, chain.MAX_RULE_CHARS),
    "rules-as-data": (600, 0),
}


@pytest.mark.parametrize("bounds", BOUNDS.values(), ids=BOUNDS.keys())
@SETTINGS
@given(documents(), st.lists(requests(), min_size=1, max_size=8), st.integers(0, 2**32))
def test_the_engine_answers_as_the_reference(
    bounds: tuple[int, int], document: dict[str, Any], batch: list[Request], seed: int
) -> None:
    """Also with the chain compiled in small pieces, as a long table's is (runs of
    exact-header rules and rules that always match cut at chunk borders), and with every
    rule's conditions and split keys too long to write out, as a huge rule's are (the
    reference's matchers and key getters called as data)."""
    found = problems(document)
    if found:  # a drawn combination the rules file refuses (e.g. a fallback no lane has)
        return
    table = compile_table(document, "v1", "rules.yaml")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chain, "CHUNK_CHARS", bounds[0])
        patch.setattr(chain, "MAX_RULE_CHARS", bounds[1])
        engine = Engine(table)
    assert engine.generated
    for request in batch * 2:  # twice: the second time from the shared decisions and steerings
        same(table, engine, request, seed)


def test_generated_tables_are_not_mostly_refused() -> None:
    """The property above checks something: most drawn documents compile."""
    compiled = []

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(documents())
    def count(document: dict[str, Any]) -> None:
        compiled.append(not problems(document))

    count()
    assert sum(compiled) > len(compiled) / 2
