"""Client-sent `x-graysteer-decision-*` headers never reach a backend, in any mode: they are the
sidecar's own answer (the HTTP fast path's decision headers), and a backend that reads them
would take a client's words for this hop's decision. Envoy strips them before routing, also
while the sidecar is away, and the decision the access log shows is still the sidecar's."""

import re
from pathlib import Path

import pytest

from sidecar.contract import DECISION_HEADER_PREFIX
from sidecar.dev.devstack import Stack
from sidecar.dev.processes import wait_for
from sidecar.envoyconf.generate import MODES, EnvoyOptions, bootstrap_document
from sidecar.table.load import load_rules

RULES = """\
version: 1
clusters: [stable, canary]
default: stable
rules:
  - name: beta
    match: {headers: {x-tier: beta}}
    route: canary
"""
FORGED = {f"{DECISION_HEADER_PREFIX}rule": "forged", f"{DECISION_HEADER_PREFIX}cluster": "canary"}


@pytest.mark.parametrize("mode", MODES)
def test_client_sent_decision_headers_are_stripped(mode: str, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    config = bootstrap_document(load_rules(rules), EnvoyOptions(mode=mode))
    with Stack(rules, config, tmp_path) as stack:
        status, echo = stack.client().get("/marker", {**FORGED, "x-tier": "beta"})
        assert (status, echo["backend"]) == (200, "canary")
        assert not [name for name in echo["headers"] if name.startswith(DECISION_HEADER_PREFIX)]
        assert stack.envoy is not None
        log = stack.envoy.process
        line = wait_for(lambda: re.search(r".*/marker.*", log.log_text()), 10, "the access log line")
        assert "rule=beta" in line.group(0) and "forged" not in line.group(0)
