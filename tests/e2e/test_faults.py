"""Faults under load through the real Envoy, counted the way users feel them: failed
requests, requests that silently skipped the sidecar (the backend got no routing header),
and sticky users back on their lanes after a restart.

Envoy and the sidecar start in either order, and the sidecar is killed, stopped, frozen
beyond `message_timeout`, and fed 40 rewrites and a broken file, each while 3 clients send
requests. The figures are printed at the end of the run (see conftest.FAULT_FIGURES).
"""

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.dev.devstack import Stack
from sidecar.dev.load import BackgroundLoad, Sample
from sidecar.dev.processes import wait_for
from tests.e2e.conftest import E2E_RULES, ENVOY_CONFIG, FAULT_FIGURES, REPO

USERS = [f"user-{i}" for i in range(60)]
# The shipped front proxies of the two transports: gRPC ext_proc, and ext_authz over HTTP.
CONFIGS = {"ext_proc": ENVOY_CONFIG, "ext_authz_http": REPO / "envoy" / "ext_authz_http.yaml"}
# Envoy's count of checks it gave up on, per transport (the sidecar answered too late).
TIMEOUT_STATS = {
    "ext_proc": "http.ingress.ext_proc.message_timeouts",
    "ext_authz_http": "http.ingress.ext_authz.error",
}


@pytest.fixture(params=list(CONFIGS))
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture()
def rules(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(E2E_RULES)
    return path


def failed(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if s.status != 200 or not s.backend]


def skipped(samples: list[Sample]) -> int:
    return sum(not s.decided for s in samples)


def lanes(samples: list[Sample]) -> dict[str, str]:
    """Each user's backend, from the requests the sidecar decided."""
    return {s.user: s.backend for s in samples if s.decided}


def decided_again(load: BackgroundLoad, what: str) -> float:
    """Seconds until 20 requests in a row were decided."""
    started = time.monotonic()
    wait_for(lambda: len(load.samples) > 20 and all(s.decided for s in load.samples[-20:]), 20, what)
    return round(time.monotonic() - started, 2)


@pytest.fixture()
def load_on() -> Iterator[list[BackgroundLoad]]:
    loads: list[BackgroundLoad] = []
    yield loads
    for load in loads:
        load.stop()


def start_load(loads: list[BackgroundLoad], stack: Stack) -> BackgroundLoad:
    load = BackgroundLoad(stack.port, {}, threads=3, users=USERS)
    loads.append(load)
    return load


@pytest.mark.parametrize("order", ["sidecar_first", "envoy_first"])
def test_start_order(
    order: str, mode: str, rules: Path, tmp_path: Path, load_on: list[BackgroundLoad]
) -> None:
    with Stack(rules, CONFIGS[mode], tmp_path, sidecar_first=order == "sidecar_first") as stack:
        load = start_load(load_on, stack)
        load.wait_for_more(100, "load before the sidecar")
        before = len(load.samples)
        if stack.sidecar is None:
            stack.start_sidecar()
        # Within 20 s (decided_again's deadline), not Envoy's 60 s idle health-check interval.
        recovery = decided_again(load, "Envoy to consult the sidecar")
        load.wait_for_more(300, "load with the sidecar")
        samples = load.stop()
        after = load.samples[before:]
    FAULT_FIGURES[f"{mode}: start {order}"] = {
        "requests": len(load.samples),
        "failed": len(failed(load.samples)),
        "skipped_before_sidecar_ready": skipped(load.samples[:before]),
        "seconds_to_first_decisions": recovery,
    }
    assert failed(load.samples) == []
    assert samples
    assert all(s.decided for s in after[-300:])


def test_sigkill_and_restart_keeps_users_on_their_lanes(
    mode: str, rules: Path, tmp_path: Path, load_on: list[BackgroundLoad]
) -> None:
    with Stack(rules, CONFIGS[mode], tmp_path) as stack:
        assert stack.sidecar is not None
        load = start_load(load_on, stack)
        load.wait_for_more(400, "load before the kill")
        before = lanes(load.samples)
        mark = len(load.samples)
        stack.sidecar.kill()
        wait_for(lambda: skipped(load.samples[mark:]) >= 50, 20, "requests to fail open")
        stack.start_sidecar()
        recovery = decided_again(load, "decisions after the restart")
        restarted = len(load.samples)
        load.wait_for_more(400, "load after the restart")
        load.stop()
    after = lanes(load.samples[restarted:])
    FAULT_FIGURES[f"{mode}: sigkill + restart"] = {
        "requests": len(load.samples),
        "failed": len(failed(load.samples)),
        "skipped_while_down": skipped(load.samples[mark:restarted]),
        "seconds_to_decisions_after_restart": recovery,
        "users_on_same_lane": f"{sum(after[u] == before[u] for u in after if u in before)}"
        f"/{len([u for u in after if u in before])}",
    }
    assert failed(load.samples) == []
    assert len(before) == len(USERS) and set(after) == set(USERS)
    assert {u: after[u] for u in USERS} == {u: before[u] for u in USERS}  # sticky across restarts


def test_sigterm_drains_without_failures(
    mode: str, rules: Path, tmp_path: Path, load_on: list[BackgroundLoad]
) -> None:
    with Stack(rules, CONFIGS[mode], tmp_path) as stack:
        sidecar = stack.sidecar
        assert sidecar is not None
        load = start_load(load_on, stack)
        load.wait_for_more(300, "load before SIGTERM")
        mark = len(load.samples)
        sidecar.signal(signal.SIGTERM)
        assert sidecar.popen.wait(20) == 0
        load.wait_for_more(200, "load after the sidecar stopped")
        stopped = len(load.samples)
        stack.start_sidecar()
        recovery = decided_again(load, "decisions after the restart")
        load.stop()
    FAULT_FIGURES[f"{mode}: sigterm + restart"] = {
        "requests": len(load.samples),
        "failed": len(failed(load.samples)),
        "skipped_while_stopped": skipped(load.samples[mark:stopped]),
        "seconds_to_decisions_after_restart": recovery,
    }
    assert failed(load.samples) == []
    assert all(s.decided for s in load.samples[:mark])


def test_a_frozen_sidecar_fails_open_after_message_timeout(
    mode: str, rules: Path, tmp_path: Path, load_on: list[BackgroundLoad]
) -> None:
    with Stack(rules, CONFIGS[mode], tmp_path) as stack:
        sidecar = stack.sidecar
        assert sidecar is not None and stack.envoy is not None
        load = start_load(load_on, stack)
        load.wait_for_more(300, "load before the freeze")
        mark = len(load.samples)
        sidecar.signal(signal.SIGSTOP)  # alive but answering nothing: slower than any timeout
        try:
            wait_for(lambda: skipped(load.samples[mark:]) >= 30, 20, "requests to time out")
        finally:
            sidecar.signal(signal.SIGCONT)
        thawed = len(load.samples)
        recovery = decided_again(load, "decisions after the freeze")
        load.stop()
        timeouts = stack.envoy.stats()[TIMEOUT_STATS[mode]]
    FAULT_FIGURES[f"{mode}: frozen beyond message_timeout"] = {
        "requests": len(load.samples),
        "failed": len(failed(load.samples)),
        "skipped_while_frozen": skipped(load.samples[mark:thawed]),
        "envoy_timeouts_or_errors": timeouts,
        "seconds_to_decisions_after_thaw": recovery,
    }
    assert failed(load.samples) == []
    assert timeouts > 0


def test_40_rewrites_and_a_broken_file_lose_nothing(
    mode: str, rules: Path, tmp_path: Path, load_on: list[BackgroundLoad]
) -> None:
    with Stack(rules, CONFIGS[mode], tmp_path) as stack:
        sidecar = stack.sidecar
        assert sidecar is not None
        load = start_load(load_on, stack)
        load.wait_for_more(200, "load before the rewrites")
        for i in range(40):
            rules.write_text(E2E_RULES.replace("weight: 70", f"weight: {70 - i % 5}"))
            load.wait_for_more(15, f"load after rewrite {i}")
        rules.write_text("version: 1\nclusters: [stable\n")  # broken YAML
        wait_for(
            lambda: "keeping the last good table" in sidecar.log_text(), 20, "the broken file to be refused"
        )
        load.wait_for_more(200, "load after the broken file")
        load.stop()
    FAULT_FIGURES[f"{mode}: 40 rewrites + broken file"] = {
        "requests": len(load.samples),
        "failed": len(failed(load.samples)),
        "skipped": skipped(load.samples),
    }
    assert failed(load.samples) == []
    assert skipped(load.samples) == 0
