"""Bytes that are not UTF-8 from clients, through the real Envoy in each mode: in a split key
from a header, a cookie and the query, in a semver and a regex condition, in XFCC and baggage.
Every request is decided by the sidecar (none skips it), exactly as `graysteer explain` decides
the same request with each of those bytes read as `!` (as Envoy hands them to ext_authz), so
the modes agree, and the sidecar lives on: no lone surrogate reaches mmh3, re2 or node-semver
from a request."""

import textwrap
from pathlib import Path
from typing import Any

import pytest

from sidecar.core.text import ENVOY_REPLACE
from sidecar.dev.devstack import Stack
from sidecar.envoyconf.generate import MODES, EnvoyOptions, bootstrap_document
from sidecar.table.load import load_rules
from sidecar.transports.explain import explain_local

RULES = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    coloring:
      lanes: {stable: stable, canary: canary}
    rules:
      - name: beta
        match: {headers: {x-user-tier: {regex: "beta-.+"}}}
        route: canary
      - name: new-clients
        match: {headers: {x-client-version: {semver: ">=2.3.0"}}}
        route: canary
      - name: by-user
        split:
          key: [header:x-user-id, cookie:uid, query:gid]
          to: [{cluster: stable, weight: 50}, {cluster: canary, weight: 50}]
          when_key_missing: stable
    """)
# A str given to http.client goes out as its Latin-1 bytes: "\xed\xa0\x80" is the UTF-8 form
# of the surrogate U+D800 (invalid UTF-8), "\xff" a byte UTF-8 never uses.
SURROGATE, BAD, CUT = "\xed\xa0\x80", "\xff\xfe", "\xe2\x82"  # CUT: a 3-byte form cut short
CASES: list[tuple[str, dict[str, str]]] = [
    *[("/", {"x-user-id": f"u{i}{SURROGATE}"}) for i in range(6)],
    *[("/", {"x-user-id": f"{BAD}{i}"}) for i in range(6)],
    *[("/", {"x-user-id": f"{CUT}{i}"}) for i in range(6)],
    *[("/", {"cookie": f"uid=c{i}{SURROGATE}"}) for i in range(6)],
    *[(f"/p?gid=q{i}%ED%A0%80", {}) for i in range(6)],
    ("/", {"x-user-tier": f"beta-{SURROGATE}"}),
    ("/", {"x-client-version": f"2.4.0-{SURROGATE}"}),
    ("/", {"x-client-version": f"3.0.{BAD}"}),
    ("/", {"x-forwarded-client-cert": f"By=spiffe://a/{SURROGATE};URI=spiffe://b/{BAD}", "x-user-id": "u"}),
    ("/", {"baggage": f"graysteer.lane={SURROGATE},k={BAD}", "x-user-id": "v"}),
]


def as_read(text: str) -> str:
    """What the sidecar reads for `text` sent as Latin-1 bytes: UTF-8, with `!` for each byte
    that is not, as Envoy gives ext_authz services."""
    return text.encode("latin-1").decode("utf-8", ENVOY_REPLACE)


def skipped(stats: dict[str, int]) -> int:
    """Requests Envoy let through without the sidecar's answer, in any mode."""
    return sum(v for name, v in stats.items() if name.endswith(("failure_mode_allowed", "ext_authz.error")))


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("unencodable") / "rules.yaml"
    path.write_text(RULES)
    return path


@pytest.mark.parametrize("mode", MODES)
def test_bytes_that_are_not_utf8_are_decided_by_the_sidecar(
    rules: Path, mode: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    config = bootstrap_document(load_rules(rules), EnvoyOptions(mode=mode))
    with Stack(rules, config, tmp_path_factory.mktemp(mode)) as stack:
        http = stack.client()
        seen: list[tuple[int, Any, Any]] = []
        for path, headers in CASES:
            status, echo = http.get(path, headers)
            seen.append((status, echo.get("backend"), echo.get("headers", {}).get("x-route-cluster")))
        assert stack.envoy is not None and stack.sidecar is not None
        assert stack.sidecar.popen.poll() is None, "the sidecar died"
        assert skipped(stack.envoy.stats()) == 0, "requests skipped the sidecar"
    for (path, headers), (status, backend, routed) in zip(CASES, seen, strict=True):
        read = [
            (name, as_read(value)) for name, value in headers.items() if name != "x-forwarded-client-cert"
        ]
        expected = explain_local(str(rules), "GET", path, read)
        assert (status, backend, routed) == (200, expected["cluster"], expected["cluster"]), (
            mode,
            path,
            headers,
        )
    assert {backend for _, backend, _ in seen} == {"stable", "canary"}  # a real mix of decisions
