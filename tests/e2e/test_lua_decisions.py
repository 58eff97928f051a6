"""The table as Lua, decided by the real Envoy: every request the Lua decides is decided as
the reference steering decides it (headers set and removed, the decision's metadata, deny
answers), and what it cannot decide exactly is marked for the sidecar, never guessed."""

import re
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.core import Identity, Table, compile_table
from sidecar.core.lua_table import lua_source
from sidecar.transports.http_check import MTLS_UNNAMED
from tests.core.test_bucketing import FLAGD_V2_VECTORS
from tests.core.test_lua_table import HOSTILE
from tests.e2e.test_transport_parity import CASES, RULES
from tests.lua_envoy import NAMES, LuaEnvoy, bootstrap, reference, static_lua, view
from tests.tls import Authority, make_ca, make_leaf, write_pair

Case = tuple[str, str, list[tuple[str, str]]]


def decided_by_lua(
    table: Table, workdir: Path, cases: list[Case]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(Envoy's answer, the reference's) per case, from one Envoy running the table's Lua."""
    envoy = LuaEnvoy(bootstrap(static_lua(lua_source(table, NAMES).source)), workdir)
    try:
        port = envoy.envoy.port
        return [
            (view(table, envoy.ask(m, p, h), h), reference(table, m, p, h, listener_port=port))
            for m, p, h in cases
        ]
    finally:
        envoy.stop()


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[dict[str, Any], dict[str, Any]]]]:
    table = compile_table(yaml.safe_load(RULES), "v1", "rules.yaml")
    cases = [(m, p, list(h.items())) for m, p, h in CASES]
    cases += [
        ("GET", "/", [("x-graysteer-lane", "canary")]),  # untrusted: removed, the rules decide
        ("GET", "/", [("x-user-id", "ü-é-日本-\U0001f600")]),
        ("GET", "/p?gid=%C3%BC+x&gid=2", []),
        ("GET", "/", [("cookie", 'a=1; uid=" q1 "'), ("cookie", "uid=q2")]),
        ("GET", "/", [("x-user-id", "a"), ("x-user-id", "b")]),
        ("DELETE", "/admin", []),
        # baggage: the lane member of an untrusted caller goes, every other member stays
        ("GET", "/", [("baggage", "t=1, graysteer.lane=canary;p=1 ,k=v")]),
        ("GET", "/", [("baggage", "graysteer.lane=canary")]),
        ("GET", "/", [("baggage", "no-equals, ,a=1"), ("x-user-id", "u7")]),
        ("GET", "/", [("baggage", ",".join(f"m{i}=v" for i in range(63)))]),
        ("GET", "/", [("baggage", ",".join(f"m{i}=v" for i in range(64)))]),  # no room for the lane
        ("GET", "/", [("baggage", "big=" + "x" * 8170)]),
    ]
    yield decided_by_lua(table, tmp_path_factory.mktemp("lua-parity"), cases)


def test_every_decided_request_is_decided_as_the_reference(
    parity: list[tuple[dict[str, Any], dict[str, Any]]],
) -> None:
    for got, want in parity:
        if not got.get("undecided"):
            assert got == want


def test_only_regexes_and_versions_are_left_to_the_sidecar(
    parity: list[tuple[dict[str, Any], dict[str, Any]]],
) -> None:
    undecided = [CASES[i] for i, (got, _) in enumerate(parity[: len(CASES)]) if got.get("undecided")]
    assert not any(got.get("lua_error") for got, _ in parity)
    assert all({"x-user-tier", "x-client-version"} & set(headers) for _, _, headers in undecided), undecided
    assert len(undecided) == 7  # 2 regex, 5 versions of the shared cases
    assert all(not got.get("undecided") for got, _ in parity[len(CASES) :])  # non-ASCII keys included


def test_hostile_rule_texts_decide_as_written(tmp_path: Path) -> None:
    rules: list[dict[str, Any]] = [
        {"name": f"h{i}", "match": {"headers": {"x-a": text}}, "route": "canary"}
        for i, text in enumerate(HOSTILE)
    ]
    rules += [
        {
            "name": "d",
            "match": {"headers": {"x-d": {"prefix": HOSTILE[1]}}},
            "deny": {"status": 503, "reason": HOSTILE[0]},
        },
        {
            "name": "s",
            "split": {
                "key": ["header:x-u"],
                "seed": HOSTILE[5],
                "to": [{"cluster": "stable", "weight": 5}, {"cluster": "canary", "weight": 5}],
            },
        },
    ]
    document = {"version": 1, "clusters": ["stable", "canary"], "default": "stable", "rules": rules}
    table = compile_table(document, "v1", "rules.yaml")
    sendable = [t for t in HOSTILE if "\n" not in t and "\x00" not in t and "\r" not in t]
    cases: list[Case] = [("GET", "/", [("x-a", t)]) for t in sendable]
    cases += [("GET", "/", [("x-d", HOSTILE[1] + "x")])]  # a 5xx deny is answered 403, as the fast path
    cases += [("GET", "/", [("x-u", f"user-{i}")]) for i in range(20)]
    for got, want in decided_by_lua(table, tmp_path, cases):
        assert got == want


def test_flagd_edge_vectors_and_non_ascii_keys_bucket_as_mmh3(tmp_path: Path) -> None:
    """flagd-testbed's vectors (their last five keys hash to 0, 1, 2^31-1, 2^31, 2^32-1),
    with an empty seed so that the key is the whole hashed string, and non-ASCII keys."""
    rules = []
    for i, (_, variants, _) in enumerate(FLAGD_V2_VECTORS):
        to = [{"cluster": f"c{j}", "weight": w} for j, (_, w) in enumerate(variants)]
        rules.append(
            {
                "name": f"v{i}",
                "match": {"headers": {"x-vector": str(i)}},
                "split": {"key": ["header:x-key"], "seed": "", "to": to},
            }
        )
    rules.append(
        {
            "name": "wide",
            "split": {
                "key": ["header:x-key"],
                "to": [{"cluster": "c0", "weight": 3}, {"cluster": "c1", "weight": 2**35}],
            },
        }
    )
    document = {"version": 1, "clusters": ["c0", "c1", "c2", "c3"], "default": "c0", "rules": rules}
    table = compile_table(document, "v1", "rules.yaml")
    cases: list[Case] = [
        ("GET", "/", [("x-vector", str(i)), ("x-key", h)]) for i, (h, _, _) in enumerate(FLAGD_V2_VECTORS)
    ]
    keys = ["ü", "é日本", "\U0001f600x", "Ωmega-42", "ß" * 7, "a" * 1000]
    cases += [("GET", "/", [("x-key", key)]) for key in keys + [h for h, _, _ in FLAGD_V2_VECTORS]]
    results = decided_by_lua(table, tmp_path, cases)
    for got, want in results:
        assert got == want
    for (got, _), (_, variants, expected) in zip(results, FLAGD_V2_VECTORS, strict=False):
        assert got["set"]["x-route-cluster"] == f"c{[name for name, _ in variants].index(expected)}"


QA = "spiffe://example.org/ns/qa/sa/tester"
WEB = "spiffe://example.org/ns/prod/sa/web"
CERTIFICATES: dict[str, tuple[list[str], list[str]]] = {
    "qa": ([QA], []),
    "web": ([WEB], ["web.example.org"]),
    "dns-only": ([], ["API.Example.org", "not.a..name"]),
    "two-uris": ([QA, WEB], ["two.example.org"]),
    "no-sans": ([], []),
    "other-domain": (["spiffe://other.org/ns/qa/sa/tester"], []),
    # SANs that x-forwarded-client-cert cannot carry as they are: an mTLS caller without a name
    "comma": ([f"spiffe://example.org/ns/prod/a,URI={QA}"], []),
    "space": ([QA], ["a b.example.org"]),
}
IDENTITY_RULES = f"""
version: 1
clusters: [stable, canary, v2]
default: stable
trust:
  identities: [{{glob: "spiffe://example.org/ns/qa/*"}}]
  override_headers: [x-canary]
coloring:
  lanes: {{stable: stable, canary: canary}}
rules:
  - name: force
    match: {{headers: {{x-canary: "1"}}}}
    route: canary
  - name: web-exact
    match: {{identity: {{exact: "{WEB}"}}, path: {{prefix: /web}}}}
    route: v2
  - name: other
    match: {{identity: {{trust_domain: other.org}}}}
    route: v2
  - name: api-dns
    match: {{identity: {{dns: "*.example.org"}}, path: {{prefix: /dns}}}}
    route: canary
  - name: nobody
    match: {{identity: {{absent: true}}, path: {{prefix: /dns}}}}
    deny: {{status: 401, reason: "who are you"}}
  - name: by-caller
    split:
      key: [identity]
      to: [{{cluster: stable, weight: 1}}, {{cluster: canary, weight: 1}}]
      when_key_missing: v2
"""


def each_peer(envoy: LuaEnvoy, ca: Authority, tmp_path: Path) -> Iterator[tuple[str, Identity]]:
    """Connect to `envoy` as each of CERTIFICATES in turn: its name and the identity the
    sidecar reads from it (a SAN `x-forwarded-client-cert` cannot carry: MTLS_UNNAMED)."""
    for name, (uris, dns) in CERTIFICATES.items():
        key, cert = write_pair(tmp_path, name, make_leaf(ca, name, uris, dns))
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        context.load_cert_chain(str(cert), str(key))
        envoy.connect(context)
        bare = all(re.fullmatch(r"[!#-+\--:<>-~]*", san) for san in uris + dns)
        yield name, Identity.from_sans(True, tuple(uris), tuple(dns)) if bare else MTLS_UNNAMED


def test_identity_from_the_peer_certificate(tmp_path: Path) -> None:
    """URI and DNS SANs read by the Lua SSL API decide as `Identity.from_sans`: exact, glob,
    trust domain, DNS wildcard, absent, trust (an override honoured only from QA), lanes from
    a trusted caller, identity as the split key."""
    ca = make_ca()
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    write_pair(tmp_path, "server", make_leaf(ca, "localhost", dns=["localhost"], ips=["127.0.0.1"]))
    table = compile_table(yaml.safe_load(IDENTITY_RULES), "v1", "rules.yaml")
    envoy = LuaEnvoy(bootstrap(static_lua(lua_source(table, NAMES).source), tls_dir=tmp_path), tmp_path)
    cases: list[Case] = [
        ("GET", "/web", []),
        ("GET", "/dns", []),
        ("GET", "/", [("x-canary", "1")]),
        ("GET", "/", [("x-graysteer-lane", "canary")]),
        ("GET", "/", [("x-graysteer-lane", "no such lane")]),
        ("GET", "/", [("baggage", "a=1, graysteer.lane=canary")]),  # a lane from a trusted caller's baggage
        ("GET", "/", [("baggage", "graysteer.lane=v2;p=1"), ("x-graysteer-lane", "")]),
    ]
    try:
        for name, identity in each_peer(envoy, ca, tmp_path):
            for method, path, headers in cases:
                got = view(table, envoy.ask(method, path, headers), headers)
                assert got == reference(table, method, path, headers, identity), (name, path, headers)
    finally:
        envoy.stop()


def test_text_the_lua_cannot_read_as_python_does_is_left_to_the_sidecar(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 (the fast path reads each as `!`), a query that decodes to
    them, and a cookie whose value starts with a Unicode space Python strips: never guessed."""
    table = compile_table(yaml.safe_load(RULES), "v1", "rules.yaml")
    envoy = LuaEnvoy(bootstrap(static_lua(lua_source(table, NAMES).source)), tmp_path)
    try:
        left = [
            envoy.ask("GET", "/", [("x-user-id", "caf\udce9")]),  # the byte 0xe9 alone: not UTF-8
            envoy.ask("GET", "/p?gid=%FF%FE", []),
            envoy.ask("GET", "/", [("cookie", "uid=\u00a0u1")]),
            envoy.ask("GET", "/", [("cookie", "uid=u1\u2003")]),
        ]
        decided = [
            envoy.ask("GET", "/", [("x-user-id", "café")]),
            envoy.ask("GET", "/p?gid=%C3%A9", []),
            envoy.ask("GET", "/", [("cookie", "uid= \tu1 ")]),
            envoy.ask("GET", "/", [("cookie", "uid=é")]),
        ]
    finally:
        envoy.stop()
    assert [answer.undecided for answer in left] == [True] * 4
    assert [answer.undecided for answer in decided] == [False] * 4
