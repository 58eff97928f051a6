"""The differential property through the real Envoy: tables drawn as for the generated Python
engine (tests/core/test_engine_differential.py), each served to one Envoy over ECDS, and
requests drawn likewise, decided by Envoy's Lua and by the reference steering: 0 differences.
A request the Lua leaves to the sidecar is no difference (the fast path decides it as the
reference), but a Lua runtime error is. Random draws (a split without a key, a mirror without
one) are compared for what they must be, not for the number drawn."""

import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sidecar.core import Table, compile_table
from sidecar.core.bucketing import entry_for
from sidecar.core.validate import problems
from sidecar.dev.processes import wait_for
from tests.core.test_engine_differential import PATHS, documents, request_headers
from tests.lua_envoy import EcdsServer, LuaEnvoy, applied_version, bootstrap, ecds_filter, reference, view

TABLES = 30
REQUESTS = 40
TALLY = {"decided": 0, "undecided": 0}

# Envoy replaces a client's x-forwarded-client-cert (SANITIZE), reads Host as :authority and
# answers 400 to a Host that is no host.
requests = st.tuples(
    st.sampled_from(["GET", "POST", "PUT"]),
    st.sampled_from(PATHS),
    request_headers.map(
        lambda headers: [
            ("host" if name == ":authority" else name, value)
            for name, value in headers.items()
            if name != "x-forwarded-client-cert"
            and (name != ":authority" or re.fullmatch("[a-z0-9.-]+", value))
        ]
    ),
)


@pytest.fixture(scope="module")
def envoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EcdsServer, LuaEnvoy]]:
    server = EcdsServer()
    decision, clusters = ecds_filter(server.port)
    envoy = LuaEnvoy(bootstrap(decision, clusters), tmp_path_factory.mktemp("lua-differential"))
    try:
        yield server, envoy
    finally:
        envoy.stop()
        server.stop()
        print(f"decided by the Lua {TALLY['decided']}, left to the sidecar {TALLY['undecided']}")


def settle(table: Table, result: dict[str, Any]) -> dict[str, Any]:
    """`result` with what a random draw chose replaced by a check that it is a possible draw."""
    metadata = result.get("metadata")
    if metadata is None:
        return result
    rule = table.rule(metadata["rule"])
    # a new visitor's key is random: the Lua's from x-request-id, the reference's from the request
    issued = "issued_cookie" in metadata
    random_split = metadata.get("key_source") == "random" or issued
    random_mirror = rule is not None and rule.mirror is not None and not rule.mirror.keys
    random_mirror = random_mirror or (
        rule is not None
        and rule.mirror is not None
        and (metadata.get("key_source") in ("random", "missing") or issued)
    )
    if not (random_split or random_mirror):
        return result
    settled = {**result, "metadata": dict(metadata), "set": dict(result["set"])}
    settled["metadata"].pop("set_cookie", None)  # the Lua files it for its response handler
    if random_split:
        assert rule is not None and rule.split is not None
        bucket = int(metadata["bucket"])
        assert rule.split.clusters[entry_for(rule.split.bounds, bucket)] == metadata["cluster"]
        for name in ("bucket", "cluster", "lane"):
            settled["metadata"].pop(name, None)
        settled["set"] = {}
    if random_mirror:
        assert rule is not None and rule.mirror is not None
        assert metadata.get("mirror") in (None, rule.mirror.cluster)
        settled["metadata"].pop("mirror", None)
        settled["set"] = {k: v for k, v in settled["set"].items() if k != table.mirror_header}
        settled["removed"] = [name for name in result["removed"] if name != table.mirror_header]
        # the mirror header removed (no mirror drawn) is an untrusted_headers_removed of its own
        removed = ["untrusted_headers_removed"] if settled["removed"] else []
        settled["events"] = sorted(
            [e for e in result["events"] if e != "untrusted_headers_removed"] + removed
        )
    if random_split:  # the lane drawn decides whether its baggage member fits
        settled["events"] = [e for e in settled["events"] if e != "baggage_over_limit"]
    return settled


@settings(max_examples=TABLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(documents(), st.lists(requests, min_size=REQUESTS, max_size=REQUESTS))
def test_envoy_decides_as_the_reference(
    envoy: tuple[EcdsServer, LuaEnvoy],
    document: dict[str, Any],
    batch: list[tuple[str, str, list[tuple[str, str]]]],
) -> None:
    server, lua = envoy
    assume(not problems(document))  # a drawn combination the rules file refuses
    table = compile_table(document, "v1", "rules.yaml")
    version = server.push(table)
    wait_for(lambda: applied_version(lua.envoy) == version, 10, f"Envoy to apply {version}")
    port = lua.envoy.port
    for method, path, headers in batch:
        got = view(table, lua.ask(method, path, headers), headers)
        assert not got.get("lua_error"), (document, method, path, headers)
        if got.get("undecided"):
            TALLY["undecided"] += 1
            continue
        TALLY["decided"] += 1
        want = reference(table, method, path, headers, listener_port=port)
        assert settle(table, got) == settle(table, want), (document, method, path, headers)
