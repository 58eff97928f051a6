"""Where a webhook gate may connect, with real sockets on loopback: a rules file chooses a
gate's URL, the operator of `serve` chooses what it may reach. Loopback, private and
link-local destinations are refused unless allowed, the sidecar's own listeners and Envoy's
admin always, and a refused destination receives nothing."""

import asyncio
import dataclasses
import ipaddress

import pytest
from prometheus_client import CollectorRegistry

from sidecar.core.gates import Gate, shown_url
from sidecar.core.rollout import start
from sidecar.ops.metrics import Metrics
from sidecar.rollouts.destinations import GateDestinations, Refused, parse_allowed
from sidecar.rollouts.gates import GateChecks
from sidecar.serving.build import gate_destinations
from sidecar.serving.options import ServeOptions
from tests.rollouts.gate_server import gate_server
from tests.rollouts.test_gates import VERDICT, answer_of, spec_with, until


def test_a_loopback_gate_is_refused_by_default_and_receives_nothing() -> None:
    with gate_server() as server:
        server.status = 200
        label, passed, detail = asyncio.run(
            answer_of(Gate(server.url, "step", 2.0), None, GateDestinations())
        )
        assert (label, passed) == ("blocked", False)
        assert "127.0.0.1" in detail and "loopback" in detail and "--gate-allow" in detail
        assert server.received == []


@pytest.mark.parametrize("entry", ["127.0.0.1", "127.0.0.0/8", "PORT", "localhost"])
def test_a_loopback_gate_is_asked_when_the_operator_allows_it(entry: str) -> None:
    with gate_server() as server:
        server.status = 200
        port = server.server_address[1]
        allowed = GateDestinations.parse([entry.replace("PORT", f"127.0.0.1:{port}")])
        url = server.url.replace("127.0.0.1", "localhost") if entry == "localhost" else server.url
        assert asyncio.run(answer_of(Gate(url, "step", 2.0), None, allowed)) == ("passed", True, "HTTP 200")
        assert len(server.received) == 1
        other_port = GateDestinations.parse([f"127.0.0.1:{port + 1}"])
        assert asyncio.run(answer_of(Gate(server.url, "step", 2.0), None, other_port))[0] == "blocked"
        assert len(server.received) == 1


def test_a_host_name_that_resolves_to_loopback_is_refused() -> None:
    with gate_server() as server:
        url = server.url.replace("127.0.0.1", "localhost")
        label, _, detail = asyncio.run(answer_of(Gate(url, "step", 2.0), None, GateDestinations()))
        assert label == "blocked" and "loopback" in detail
        assert server.received == []


def test_the_sidecars_own_listeners_and_envoys_admin_are_refused_even_when_allowed() -> None:
    with gate_server() as server:
        server.status = 200
        port = server.server_address[1]
        everything = ["0.0.0.0/0", "::/0", f"127.0.0.1:{port}", "localhost"]
        for flag in ("--http-listen", "--envoy-admin"):
            options = dataclasses.replace(
                ServeOptions(config="r.yaml", gate_allow=tuple(everything), envoy_admin="127.0.0.1:9"),
                **{flag.strip("-").replace("-", "_"): f"127.0.0.1:{port}"},
            )
            destinations = gate_destinations(options)
            for url in (server.url, server.url.replace("127.0.0.1", "localhost")):
                label, _, detail = asyncio.run(answer_of(Gate(url, "step", 2.0), None, destinations))
                assert label == "blocked" and "never a gate's destination" in detail, detail
        assert server.received == []


def test_a_listener_on_every_address_is_refused_on_each_of_this_machines_addresses() -> None:
    destinations = GateDestinations.parse(["0.0.0.0/0"])
    destinations.protect("the sidecar's --listen", "0.0.0.0", 50051)
    for address in ("127.0.0.1", "127.0.0.2", "0.0.0.0"):
        with pytest.raises(Refused, match="--listen"):
            destinations.check("h", ipaddress.ip_address(address), 50051)
    destinations.check("h", ipaddress.ip_address("127.0.0.1"), 50052)  # another port: allowed


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "0.0.0.0",
        "100.64.0.1",
        "224.0.0.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
    ],
)
def test_non_public_addresses_are_refused_by_default(address: str) -> None:
    with pytest.raises(Refused, match="not public"):
        GateDestinations().check("h", ipaddress.ip_address(address), 80)


def test_public_addresses_are_allowed() -> None:
    for address in ("8.8.8.8", "2001:4860:4860::8888"):
        GateDestinations().check("h", ipaddress.ip_address(address), 443)


@pytest.mark.parametrize("entry", ["10.0.0.0/8:80", "10.0.0.1/8", "1.2.3", "a b", "h:0", "h:99999", ""])
def test_a_bad_allow_entry_is_refused_at_start(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_allowed(entry)


def test_allowing_loopback_on_every_port_needs_envoys_admin_named() -> None:
    problems = ServeOptions(config="r.yaml", gate_allow=("127.0.0.0/8",)).problems()
    assert any("--envoy-admin" in p for p in problems)
    named = ServeOptions(config="r.yaml", gate_allow=("127.0.0.0/8",), envoy_admin="127.0.0.1:9901")
    assert not any("--gate-allow" in p for p in named.problems())
    assert not any(
        "--gate-allow" in p for p in ServeOptions(config="r", gate_allow=("127.0.0.1:9",)).problems()
    )


def test_the_whole_destination_is_shown_without_secrets() -> None:
    assert (
        shown_url("http://127.0.0.1:9901/quitquitquit?x=1&token=s3cret&Api-Key=k#frag")
        == "http://127.0.0.1:9901/quitquitquit?x=1&token=***&Api-Key=***"
    )
    assert shown_url("https://ops:pw@[::1]/runtime_modify?a=b") == "https://***@[::1]/runtime_modify?a=b"


def test_a_refused_check_counts_as_blocked() -> None:
    async def scenario(url: str) -> None:
        metrics = Metrics(CollectorRegistry())
        checks = GateChecks(metrics)
        spec = spec_with(url, before="step")
        checks.ask(spec, start(spec, 0.0), VERDICT, (0,))
        await until(lambda: not checks.checking("ramp", 0))
        labels = {"rule": "ramp", "before": "step", "result": "blocked"}
        assert metrics.registry.get_sample_value("graysteer_rollout_gate_checks_total", labels) == 1
        await checks.close()

    with gate_server() as server:
        asyncio.run(scenario(server.url))
        assert server.received == []
