"""Fixtures that run real Envoy, the sidecar and sample backends on loopback."""

import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.dev.devstack import Stack
from sidecar.dev.processes import envoy_binary

REPO = Path(__file__).parents[2]
ENVOY_CONFIG = REPO / "envoy" / "envoy.yaml"

E2E_RULES = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    rules:
      - name: force-canary
        match: {headers: {x-canary: "1"}}
        route: canary
      - name: ramp
        split:
          key: [header:x-user-id, cookie:uid]
          seed: e2e
          to: [{cluster: stable, weight: 70}, {cluster: canary, weight: 30}]
          when_key_missing: stable
    """)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


def envoy_validate(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config)], capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(E2E_RULES)
    return path


@pytest.fixture(scope="module")
def stack(rules_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack shared by a module's read-only tests."""
    with Stack(rules_file, ENVOY_CONFIG, tmp_path_factory.mktemp("stack")) as running:
        yield running


@pytest.fixture()
def own_stack(rules_file: Path, tmp_path: Path) -> Iterator[Stack]:
    """A stack for a test that breaks something (kills the sidecar)."""
    with Stack(rules_file, ENVOY_CONFIG, tmp_path) as running:
        yield running


# Figures the fault tests measure (failed requests, requests that skipped the sidecar,
# recovery times), printed at the end of the run: docs/operations figures come from here.
FAULT_FIGURES: dict[str, dict[str, object]] = {}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FAULT_FIGURES:
        terminalreporter.section("fault figures (through the real Envoy, under load)")
        for name, figures in FAULT_FIGURES.items():
            terminalreporter.write_line(f"{name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
