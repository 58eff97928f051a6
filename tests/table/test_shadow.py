"""The shadow table with real files: it follows its own document and the live weights, keeps
its last good table, never touches the served one, and counts each request against it."""

import asyncio
import dataclasses
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sidecar.core import Request, steer
from sidecar.core import engine as engine_module
from sidecar.ops.decision_log import DecisionLog
from sidecar.ops.metrics import Metrics
from sidecar.ops.view import shadow_view
from sidecar.sources.file import RulesFile
from sidecar.sources.state_file import StateFile, default_state_path
from sidecar.table.decider import Decider
from sidecar.table.reload import Reloader
from sidecar.table.shadow import DEFAULT_BUDGET, Shadow
from sidecar.transports.ecds import TableAsLua
from sidecar.transports.envoy_decided import Feeds

LIVE = """version: 1
clusters: [stable, canary]
default: stable
rules:
  - name: beta
    match: {headers: {x-tier: beta}}
    route: canary
  - name: ramp
    split: {key: ["header:u"], to: [{cluster: stable, weight: 90}, {cluster: canary, weight: 10}]}
"""
# The next rules: beta users go to stable instead, the ramp goes on to 50%.
NEXT = (
    LIVE.replace("route: canary", "route: stable")
    .replace("weight: 90", "weight: 50")
    .replace("weight: 10", "weight: 50")
)
BROKEN = NEXT.replace("weight: 50}]", "weight: -1}]")


def setup(
    tmp_path: Path, next_text: str | None = NEXT, sample: float | None = 1.0, budget: float = DEFAULT_BUDGET
) -> tuple[Path, Reloader, Shadow, Metrics]:
    """By default the shadow decides every request (its sample does not depend on the
    machine's speed)."""
    live, upcoming = tmp_path / "rules.yaml", tmp_path / "next.yaml"
    live.write_text(LIVE)
    if next_text is not None:
        upcoming.write_text(next_text)
    metrics = Metrics(CollectorRegistry())
    state = StateFile(default_state_path(live))
    shadow = Shadow(RulesFile(upcoming), state, metrics, sample=sample, budget=budget)
    return upcoming, Reloader(RulesFile(live), metrics, state, shadow=shadow), shadow, metrics


def requests() -> list[Request]:
    users = [Request({"u": f"user-{i}"}) for i in range(400)]
    return users + [Request({"x-tier": "beta", "u": f"beta-{i}"}) for i in range(20)]


def shadow_counts(metrics: Metrics) -> dict[tuple[str, str, str], float]:
    found = {}
    for metric in metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "graysteer_shadow_decisions_total":
                labels = sample.labels
                found[(labels["rule"], labels["cluster"], labels["shadow_cluster"])] = sample.value
    return found


def test_every_request_is_decided_by_both_and_the_differences_counted(tmp_path: Path) -> None:
    _, reloader, shadow, metrics = setup(tmp_path)
    live_table, next_table = reloader.table, shadow.table
    assert next_table is not None and next_table.version != live_table.version
    decider = Decider(reloader.holder, metrics, shadow=shadow)
    expected: dict[tuple[str, str, str], int] = {}
    for request in requests():
        served = decider.steer_input("ext_proc", partial(dict, request.headers), Request)
        live = served.decision
        assert live == steer(live_table, request).decision  # the live decision is served
        other = steer(next_table, request).decision.cluster
        key = (live.rule, live.cluster, other)
        expected[key] = expected.get(key, 0) + 1
    assert shadow_counts(metrics) == expected
    differing = {k: v for k, v in expected.items() if k[1] != k[2]}
    status = shadow.status()
    assert status.requests == 420
    assert status.differing == sum(differing.values())
    assert ("beta", "canary", "stable", 20) in status.top
    # hand-computed: every beta request moves; of the users, those whose bucket is in
    # [10, 50) of the ramp move to canary (none moves back: the weights only grow)
    assert 0 < differing[("ramp", "stable", "canary")] < 400
    assert ("ramp", "canary", "stable") not in differing
    assert metrics.registry.get_sample_value("graysteer_shadow_info", {"version": next_table.version}) == 1


def test_the_shadow_follows_its_document_keeps_the_last_good_and_goes_away(tmp_path: Path) -> None:
    upcoming, reloader, shadow, metrics = setup(tmp_path, next_text=None)
    assert shadow.table is None and shadow.status().error == ""  # none yet: nothing wrong

    async def scenario() -> None:
        upcoming.write_text(NEXT)
        await reloader.reload("watch")
        first = shadow.table
        assert first is not None
        shadow.record(
            reloader.table.decide(Request({"x-tier": "beta"})), first.decide(Request({"x-tier": "beta"}))
        )
        assert shadow.status().differing == 1
        upcoming.write_text(BROKEN)
        await reloader.reload("watch")
        assert shadow.table is first  # the last good shadow stays, and says why
        assert "weight" in shadow.status().error
        assert shadow.status().differing == 1  # the same pair of tables: counts go on
        upcoming.write_text(LIVE)  # the same rules as served: nothing differs any more
        await reloader.reload("watch")
        assert shadow.table is not None and shadow.table.version == reloader.table.version
        assert shadow.status().requests == 0  # a new pair: counted from zero
        upcoming.unlink()
        await reloader.reload("watch")
        assert shadow.table is None

    asyncio.run(scenario())
    assert reloader.failures == 0  # the shadow's documents never count against the served rules
    shown = [s for m in metrics.registry.collect() for s in m.samples if s.name == "graysteer_shadow_info"]
    assert shown == []  # no shadow table: no series


def test_runtime_weights_apply_to_the_shadow_too(tmp_path: Path) -> None:
    _, reloader, shadow, _ = setup(tmp_path, next_text=LIVE)

    async def scenario() -> None:
        await reloader.set_weights("ramp", {"stable": 70, "canary": 30})
        assert shadow.table is not None
        weights = shadow.table.document["rules"][1]["split"]["to"]  # type: ignore[attr-defined]
        assert [w["weight"] for w in weights] == [70, 30]
        assert shadow.table.version == reloader.table.version.partition("+")[0]

    asyncio.run(scenario())


def test_a_sampled_decision_log_line_carries_the_shadow_decision_when_it_differs(tmp_path: Path) -> None:
    _, reloader, shadow, metrics = setup(tmp_path)
    target = tmp_path / "decisions.jsonl"
    log = DecisionLog(str(target), 1.0, metrics)
    log.start()
    decider = Decider(reloader.holder, metrics, log, shadow)
    assert shadow.table is not None
    same = next(  # a user the ramp keeps where it was
        r.headers
        for r in requests()
        if steer(reloader.table, r).decision.cluster == steer(shadow.table, r).decision.cluster
    )
    for headers in ({"x-tier": "beta"}, same):
        decider.steer_input("ext_authz", partial(dict, headers), Request)
    log.close()
    beta, gold = (json.loads(line) for line in target.read_text().splitlines())
    assert beta["decision"]["cluster"] == "canary" and beta["shadow"]["cluster"] == "stable"
    assert beta["shadow"]["rule"] == "beta"
    assert "shadow" not in gold  # decided alike: nothing to add


def test_a_shadow_that_cannot_decide_never_changes_the_served_decision(tmp_path: Path) -> None:
    _, reloader, shadow, metrics = setup(tmp_path)

    class Broken:
        def __getattr__(self, name: str) -> object:
            raise RuntimeError("a bug in the shadow table")

    shadow.engine = Broken()  # type: ignore[assignment]
    decider = Decider(reloader.holder, metrics, shadow=shadow)
    served = decider.steer_input("ext_proc", lambda: {"x-tier": "beta"}, lambda h: Request(h))
    assert served.decision.cluster == "canary" and served.decision.rule == "beta"
    assert (
        metrics.registry.get_sample_value("graysteer_steering_events_total", {"event": "shadow_failed"}) == 1
    )


def test_a_shadow_table_the_generator_refuses_is_served_by_the_reference_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def failing(_: object) -> None:
        raise RuntimeError("a bug in the generator")

    monkeypatch.setattr(engine_module, "generate", failing)
    _, _, shadow, _ = setup(tmp_path)  # the reloader loads the shadow table with the live one
    assert shadow.engine is not None and not shadow.engine.generated  # the reference walk
    assert f"rules {shadow.engine.table.version} served by the reference engine" in caplog.text
    request = Request({"u": "user-1"})
    assert shadow.engine.steer(request) == steer(shadow.engine.table, request)


def decide_all(reloader: Reloader, shadow: Shadow, metrics: Metrics, count: int) -> None:
    decider = Decider(reloader.holder, metrics, shadow=shadow)
    for i in range(count):
        served = decider.steer_input("ext_proc", partial(dict, {"u": f"user-{i}"}), Request)
        assert served.decision == steer(reloader.table, Request({"u": f"user-{i}"})).decision


def test_a_costly_shadow_decides_the_share_of_requests_its_budget_allows(tmp_path: Path) -> None:
    """A 4,900-rule shadow table made every check 15.8 ms instead of 0.047 ms: the shadow
    decides the share of requests that keeps its mean cost under the budget, measured when it
    loads, and its counts and status say they are of a sample."""
    _, reloader, shadow, metrics = setup(tmp_path, sample=None, budget=1e-9)  # any table costs more
    assert shadow.cost > 0 and 0 < shadow.rate < 0.01
    decide_all(reloader, shadow, metrics, 300)
    status = shadow.status()
    assert status.seen == 300 and status.requests < 300
    assert status.sample_ratio == shadow.rate and status.budget_seconds == 1e-9
    assert sum(shadow_counts(metrics).values()) == status.requests  # the counts are the sample's
    assert metrics.registry.get_sample_value("graysteer_shadow_sample_ratio") == pytest.approx(shadow.rate)
    assert (metrics.registry.get_sample_value("graysteer_shadow_decision_seconds") or 0) > 0
    view = shadow_view({"following": True, "version": "v", "source": "next.yaml", **dataclass_fields(status)})
    assert view is not None and "sampled from 300 requests" in view["note"] and "budget" in view["note"]


def test_a_fixed_sample_decides_that_share_whatever_the_cost(tmp_path: Path) -> None:
    _, reloader, shadow, metrics = setup(tmp_path, sample=0.25, budget=1e-9)
    decide_all(reloader, shadow, metrics, 2000)
    status = shadow.status()
    assert shadow.rate == 0.25 and status.seen == 2000
    assert 350 < status.requests < 650  # binomial(2000, 0.25): 500 +- 19
    assert sum(shadow_counts(metrics).values()) == status.requests
    assert status.budget_seconds == 0  # fixed: no budget applies


def test_a_cheap_shadow_within_its_budget_decides_every_request(tmp_path: Path) -> None:
    _, reloader, shadow, metrics = setup(tmp_path, sample=None, budget=10.0)
    decide_all(reloader, shadow, metrics, 50)
    assert shadow.rate == 1.0 and shadow.status().requests == shadow.status().seen == 50


def dataclass_fields(status: object) -> dict[str, object]:
    return dataclasses.asdict(status)  # type: ignore[call-overload,no-any-return]


def test_envoys_filter_files_the_headers_the_shadow_reads_and_follows_it(tmp_path: Path) -> None:
    """envoy_decides: a shadow table that appears or goes is a new version of Envoy's filter,
    which files the headers it reads (sidecar.transports.envoy_decided), and nothing without."""
    upcoming, reloader, shadow, metrics = setup(tmp_path, next_text=None)
    feed = TableAsLua(metrics, Feeds(Decider(reloader.holder, metrics, shadow=shadow), metrics).capture)

    async def filed(change: Callable[[], None]) -> str:
        version = feed.version
        change()
        await reloader.reload("watch")
        _, config = await asyncio.wait_for(feed.next_version(version), 10)  # generated in a thread
        return str(config.typed_config.value)

    async def scenario() -> None:
        follower = asyncio.create_task(feed.follow(reloader))
        try:
            _, first = await asyncio.wait_for(feed.next_version(""), 10)
            assert "local CAPTURE = nil" in str(first.typed_config.value)
            with_shadow = await filed(lambda: upcoming.write_text(NEXT.replace("x-tier", "x-next-tier")))
            assert "local CAPTURE = nil" not in with_shadow and "x-next-tier" in with_shadow
            without = await filed(upcoming.unlink)
            assert "local CAPTURE = nil" in without
        finally:
            follower.cancel()

    asyncio.run(scenario())


def test_a_new_visitor_is_bucketed_by_the_shadow_table_with_the_key_issued_live(tmp_path: Path) -> None:
    """Both tables issue keys: the shadow decides a new visitor with the live key, so a move is
    a real one (the weights), never two random draws."""
    issuing = "], when_key_missing: {assign: {cookie: gs}}}"
    live, upcoming = tmp_path / "rules.yaml", tmp_path / "next.yaml"
    live.write_text(LIVE.replace("weight: 10}]}", "weight: 10}" + issuing))
    upcoming.write_text(NEXT.replace("weight: 50}]}", "weight: 50}" + issuing))
    metrics = Metrics(CollectorRegistry())
    state = StateFile(default_state_path(live))
    shadow = Shadow(RulesFile(upcoming), state, metrics, sample=1.0)
    reloader = Reloader(RulesFile(live), metrics, state, shadow=shadow)
    keys = iter(f"{n:04d}" + "k" * 18 for n in range(300))
    decider = Decider(reloader.holder, metrics, shadow=shadow, draw_key=lambda: next(keys))
    for _ in range(300):
        assert decider.steer_input("ext_proc", dict, Request).decision.issued is not None
    counts = shadow_counts(metrics)
    # the ramp 10 -> 50 moves new visitors only from stable to canary, never back
    assert ("ramp", "canary", "stable") not in counts
    assert counts[("ramp", "stable", "canary")] > 0 and counts[("ramp", "canary", "canary")] > 0
