"""The per-request metrics counted as plain numbers expose exactly what prometheus_client's own
objects expose (the multiprocess mode's way): the same families, help texts, labels, samples
and values for the same requests; only the `_created` timestamps differ."""

import re

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from sidecar.core import NO_IDENTITY, Decision, Identity, Reason, Steering
from sidecar.ops.metrics import Metrics
from sidecar.ops.request_metrics import ClientCounts, PlainCounts

WEIRD = Identity.from_sans(True, ("spiffe://a/b", "spiffe://c/d"), ("not a name!",))
STEERINGS = [
    Steering(Decision("stable", "by-user", "v1", 3, "header:x-user-id", reason=Reason.SPLIT)),
    Steering(Decision("canary", "force", "v1"), remove_headers=("x-canary",)),
    Steering(
        Decision("canary", "ramp", "v1", mirror="v2"), baggage_dropped=True, malformed=("lane", "version")
    ),
    Steering(Decision("stable", "default", "v1", reason=Reason.DEFAULT), identity=WEIRD),
    Steering(Decision("stable", "by-user", "v1", 3, "header:x-user-id", reason=Reason.SPLIT)),
]
SECONDS = [1e-6, 2e-6, 3e-5, 0.02, 5.0]  # on a bound, between bounds, past the last


def exposition(counts: type[PlainCounts] | type[ClientCounts]) -> str:
    registry = CollectorRegistry()
    recorder = counts(registry)
    for number, (steering, seconds) in enumerate(zip(STEERINGS, SECONDS, strict=True)):
        if number % 2:  # the request path's one call, and its two parts
            recorder.count_request("ext_authz_http", steering, seconds, seconds * 2)
        else:
            recorder.count_steering(steering, seconds)
            recorder.observe_request("ext_authz_http", seconds * 2)
    recorder.count_event("malformed_xfcc")
    for change in (1, 1, -1, 1, -1):
        recorder.streams_open(change)
    recorder.observe_request("ext_proc", 1e-5)
    text = generate_latest(registry).decode()
    return re.sub(r"(_created\{?[^ ]*) [0-9.e+]+", r"\1 <time>", text)


def test_plain_numbers_expose_what_prometheus_client_exposes() -> None:
    plain, client = exposition(PlainCounts), exposition(ClientCounts)
    assert 'graysteer_decisions_total{cluster="stable",rule="by-user"} 2.0' in plain
    assert 'graysteer_steering_events_total{event="malformed_spiffe_id"} 1.0' in plain
    assert "graysteer_decision_duration_seconds_count 5.0" in plain
    assert "graysteer_inflight_streams 1.0" in plain
    assert sorted(plain.splitlines()) == sorted(client.splitlines())


def test_an_unknown_transport_is_refused() -> None:
    with pytest.raises(KeyError):
        PlainCounts(CollectorRegistry()).observe_request("carrier-pigeon", 1.0)
    with pytest.raises(KeyError):
        PlainCounts(CollectorRegistry()).count_request("carrier-pigeon", STEERINGS[0], 1.0, 1.0)


def test_metrics_counts_in_plain_numbers_in_one_process() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    assert isinstance(metrics.requests, PlainCounts)
    steering = Steering(Decision("stable", "default", "v1"), identity=NO_IDENTITY)
    metrics.count_request("ext_proc", steering, 1e-6, 1e-6)
    assert (
        registry.get_sample_value("graysteer_decisions_total", {"cluster": "stable", "rule": "default"}) == 1
    )
    assert registry.get_sample_value("graysteer_decision_duration_seconds_bucket", {"le": "2e-06"}) == 1
