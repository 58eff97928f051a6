"""Envoy's own decisions fed to the decision log and the steering events, from the inputs its
Lua files (sidecar.transports.envoy_decided, sidecar.transports.envoy_inputs), without Envoy.
(Through the real Envoy: tests/e2e/test_envoy_decides_feeds.py.)"""

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sidecar.core import Decision
from sidecar.core.model import Reason
from sidecar.ops.decision_log import DecisionLog
from sidecar.ops.metrics import Metrics
from sidecar.table.decider import Decider
from sidecar.table.holder import TableHolder
from sidecar.transports.envoy_decided import Feeds, issued_key, served_decision
from sidecar.transports.envoy_inputs import InputsRefused, inputs_request
from tests.helpers import table_from_yaml

TABLE = table_from_yaml("""\
version: 1
clusters: [stable, canary]
default: stable
trust: {override_headers: [x-force]}
rules:
  - {name: forced, match: {headers: {x-force: "1"}}, route: canary}
  - name: ramp
    split:
      key: [header:x-user-id]
      to: [{cluster: stable, weight: 50}, {cluster: canary, weight: 50}]
      when_key_missing: random
""")


def inputs(headers: dict[str, str], peer: tuple[str, str, str] = ("", "", ""), **more: str) -> str:
    """Inputs as the Lua files them (sidecar.core.lua_table.capture_inputs)."""
    fixed = [more.get("layout", "1"), more.get("method", "GET"), more.get("path", "/a?b=c"), "10.0.0.1:8080"]
    return "\n".join([*fixed, *peer, *(part for item in headers.items() for part in item)])


def feeds(tmp_path: Path, log: bool = True) -> tuple[Feeds, DecisionLog | None, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    decision_log = DecisionLog(str(tmp_path / "d.jsonl"), 1.0, metrics) if log else None
    return Feeds(Decider(TableHolder(TABLE), metrics, decision_log), metrics), decision_log, registry


def test_nothing_is_filed_without_a_decision_log_or_a_shadow_table(tmp_path: Path) -> None:
    without, _, _ = feeds(tmp_path, log=False)
    assert not without.wanted() and without.capture(TABLE) == ()
    with_log, _, _ = feeds(tmp_path)
    assert with_log.capture(TABLE) == ("traceparent", "x-force", "x-request-id", "x-user-id")


def test_a_request_envoy_decided_is_logged_with_envoys_decision_and_its_events(tmp_path: Path) -> None:
    fed, decision_log, registry = feeds(tmp_path)
    assert decision_log is not None
    filed = {"cluster": "canary", "rule": "ramp", "reason": "split", "bucket": "7", "key_source": "random"}
    fed.replay(TABLE, filed, inputs({"x-force": "1", "x-request-id": "rid-1"}))  # untrusted: stripped
    ((_, transport, request, steering, table, shadow),) = decision_log._pending
    line = decision_log.line(0.0, transport, request, steering, table, shadow)
    assert '"transport":"envoy_decides"' in line and '"decision_id":"rid-1"' in line
    assert '"listener_port":8080' in line and '"removed_headers":["x-force"]' in line
    assert steering.decision.rule == "ramp" and steering.decision.bucket == 7  # Envoy's draw, as it filed it
    value = registry.get_sample_value
    assert value("graysteer_steering_events_total", {"event": "untrusted_headers_removed"}) == 1


def test_the_replayed_decision_is_envoys_when_they_agree() -> None:
    replayed = Decision("canary", "forced", "v1")
    assert served_decision(replayed, {"cluster": "canary", "rule": "forced", "reason": "route"}) is replayed
    built = served_decision(
        replayed,
        {"cluster": "stable", "rule": "ramp", "reason": "no-reason", "bucket": "٣", "version": "v" * 5000},
    )
    assert (built.cluster, built.rule, built.reason, built.bucket, built.version) == (
        "stable",
        "ramp",
        Reason.ROUTE,  # a reason that is none: the replayed one's
        None,  # not ASCII digits
        "v1",  # over the limit: the replayed one's
    )


KEY = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"issued_cookie": "gs", "set_cookie": f"gs={KEY}; Max-Age=60; Path=/; HttpOnly"}, KEY),
        ({"set_cookie": f"gs={KEY}"}, None),  # no key issued
        ({"issued_cookie": "gs"}, None),  # no cookie filed
        ({"issued_cookie": "gs", "set_cookie": f"other={KEY}"}, None),  # another cookie's
        ({"issued_cookie": "gs", "set_cookie": "gs=short; Path=/"}, None),  # no key of ours
        ({"issued_cookie": "gs", "set_cookie": f"gs={KEY}<x>"}, None),
        ({"issued_cookie": "gs", "set_cookie": f"gs={KEY}; " + "a" * 5000}, None),  # oversized
    ],
)
def test_the_key_envoy_issued_is_taken_from_its_set_cookie(fields: dict[str, str], key: str | None) -> None:
    issued = issued_key(fields)
    assert (issued.key if issued is not None else None) == key
    if issued is not None:  # a decision built from the fields carries it
        built = served_decision(
            Decision("stable", "ramp", "v1"), {"cluster": "canary", "rule": "ramp"}, issued
        )
        assert built.issued == issued


HOSTILE: list[tuple[str, str]] = [
    ("upper-case name", inputs({"X-Up": "1"})),
    ("space in a name", inputs({"a b": "1"})),
    ("a name given twice", inputs({"x-user-id": "1"}) + "\nx-user-id\n" + "2"),
    ("a name without its value", inputs({"x-user-id": "1"}) + "\nx-a"),
    ("another layout", inputs({}, layout="2")),
    ("too few fields", "1\nGET\n/"),
    ("no method", inputs({}, method="")),
    ("a method that is no token", inputs({}, method="GET /x")),
    ("a path without /", inputs({}, path="no-slash")),
    ("oversized", inputs({"x-user-id": "v" * (100 * 1024)})),
    ("too many headers", inputs({f"h{i}": "1" for i in range(129)})),
    ("an unknown peer", inputs({}, peer=("x", "", ""))),
    ("an unnamed peer with SANs", inputs({}, peer=("u", "spiffe://a/b", ""))),
    ("a SAN XFCC cannot carry", inputs({}, peer=("m", "spiffe://a/b;DNS=c", ""))),
    ("a lone surrogate", inputs({"x-user-id": "\ud800"})),
    ("nothing filed (not UTF-8)", ""),
]


@pytest.mark.parametrize(("why", "hostile"), HOSTILE, ids=[why for why, _ in HOSTILE])
def test_inputs_the_lua_never_writes_are_refused(why: str, hostile: str) -> None:
    with pytest.raises(InputsRefused):
        inputs_request(hostile)


def test_refused_inputs_are_counted_and_nothing_is_logged(tmp_path: Path) -> None:
    fed, decision_log, registry = feeds(tmp_path)
    assert decision_log is not None
    for _, hostile in HOSTILE:
        fed.replay(TABLE, {"cluster": "stable", "rule": "default"}, hostile)
    assert not decision_log._pending
    assert registry.get_sample_value(
        "graysteer_access_log_entries_total", {"result": "refused_inputs"}
    ) == len(HOSTILE)


def test_a_certificates_sans_are_read_as_the_fast_path_reads_them() -> None:
    named = inputs_request(inputs({}, peer=("m", "spiffe://example.org/ns/a/sa/b", "a.example.org")))
    assert named.identity.principal == "spiffe://example.org/ns/a/sa/b"
    assert named.identity.dns_sans == ("a.example.org",)
    two = inputs_request(inputs({}, peer=("m", "spiffe://example.org/a,spiffe://example.org/b", "")))
    assert two.identity.mtls and two.identity.principal == ""  # two URI SANs: no SVID
    unnamed = inputs_request(inputs({}, peer=("u", "", "")))  # the Lua: a SAN XFCC could not carry
    assert unnamed.identity.mtls and unnamed.identity.principal == ""
    plain = inputs_request(inputs({}))
    assert not plain.identity.mtls and plain.listener_port == 8080 and plain.query == "b=c"
