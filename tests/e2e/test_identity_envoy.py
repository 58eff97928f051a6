"""Identity, trust and coloring through the real Envoy with real mTLS, for both the
ext_proc (envoy/mtls.yaml) and the ext_authz (envoy/ext_authz.yaml) front proxies."""

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.dev.backend import BackendServer
from sidecar.dev.devstack import Envoy, Sidecar, rewrite_envoy_config
from sidecar.dev.load import HttpClient
from sidecar.envoyconf.generate import EnvoyOptions, bootstrap
from sidecar.envoyconf.tls import TlsOptions
from sidecar.table.load import parse_rules
from tests.e2e.conftest import REPO
from tests.tls import make_ca, make_leaf, write_pair

QA = "spiffe://example.org/ns/qa/sa/tester"
OPS = "spiffe://example.org/ns/ops/sa/release"
WEB = "spiffe://example.org/ns/prod/sa/web"

FRONT_RULES = f"""
version: 1
clusters: [stable, canary]
default: stable
trust:
  identities: [{{glob: "spiffe://example.org/ns/qa/*"}}, {{exact: "{OPS}"}}]
  override_headers: [x-canary]
coloring:
  lanes: {{stable: stable, canary: canary}}
rules:
  - name: force-canary
    match: {{headers: {{x-canary: "1"}}}}
    route: canary
  - name: qa-to-canary
    match: {{identity: {{glob: "spiffe://example.org/ns/qa/*"}}}}
    route: canary
"""

# Service B's sidecar, behind service A's outbound Envoy: A's calls come in plaintext on
# loopback from A itself, a trusted caller.
B_RULES = """
version: 1
clusters: [b-stable, b-canary]
default: b-stable
trust: {plaintext: true}
coloring:
  lanes: {stable: b-stable, canary: b-canary}
  fallback: b-stable
"""
B_RULES_NO_CANARY = B_RULES.replace("stable: b-stable, canary: b-canary", "stable: b-stable")


# Certificates from the trusted CA whose SANs hold XFCC's separators. Envoy writes URI and DNS
# SANs into x-forwarded-client-cert unquoted, so each reads there as a trusted QA identity
# (or hides a second URI SAN) unless the sidecar parses Envoy's grammar strictly.
HOSTILE: dict[str, tuple[list[str], list[str]]] = {
    "comma-uri": ([f"spiffe://example.org/ns/prod/a,URI={QA}"], []),
    "comma-dns": (["spiffe://example.org/ns/prod/sa/b"], [f"b.example.org,URI={QA}"]),
    "semicolon-dns": (["spiffe://example.org/ns/prod/sa/c"], [f"c.example.org;URI={QA}"]),
    "semicolon-uri": ([f"{QA}x;DNS=d.example.org"], []),
    "twin-comma": ([QA, WEB], [f"e.example.org,URI={QA}"]),
}


@dataclass
class Chain:
    port: int
    tls_dir: Path
    front: Envoy
    backends: dict[str, BackendServer]

    def client(self, identity: str | None) -> HttpClient:
        context = ssl.create_default_context(cafile=str(self.tls_dir / "ca.pem"))
        if identity is not None:
            name = identity.rsplit("/", 1)[-1]
            context.load_cert_chain(self.tls_dir / f"{name}.pem", self.tls_dir / f"{name}.key")
        return HttpClient(self.port, tls=context)


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    ca = make_ca()
    (directory / "ca.pem").write_bytes(ca.pem)
    write_pair(directory, "server", make_leaf(ca, "envoy", dns=["localhost"], ips=["127.0.0.1"]))
    for uri in (QA, OPS, WEB, "spiffe://other.org/ns/x/sa/outsider"):
        name = uri.rsplit("/", 1)[-1]
        write_pair(directory, name, make_leaf(ca, name, uris=[uri], dns=[f"{name}.example.org"]))
    # Two URI SANs: no SVID (X509-SVID), so no SPIFFE identity in any mode.
    write_pair(directory, "twin", make_leaf(ca, "twin", uris=[QA, WEB]))
    for name, (uris, dns) in HOSTILE.items():
        write_pair(directory, name, make_leaf(ca, name, uris=uris, dns=dns))
    stranger = make_ca("another CA")
    write_pair(directory, "stranger", make_leaf(stranger, "stranger", uris=[QA]))
    return directory


def start_chain(mode: str, b_rules: str, tls_dir: Path, workdir: Path, stack: list[Any]) -> Chain:
    """front Envoy (mTLS) + sidecar -> service A (stable/canary) -> A's outbound Envoy +
    sidecar -> service B lanes. Everything started is appended to `stack` for teardown."""
    (workdir / "front-rules.yaml").write_text(FRONT_RULES)
    (workdir / "b-rules.yaml").write_text(b_rules)
    backends = {name: BackendServer(name).start_in_thread() for name in ("b-stable", "b-canary")}
    stack.extend(backends.values())
    transport = "http" if mode == "ext_authz_http" else "grpc"
    b_sidecar = Sidecar(workdir / "b-rules.yaml", workdir, name="b-sidecar", transport=transport)
    stack.append(b_sidecar)
    b_table = parse_rules(b_rules.encode(), "b")
    outbound_config = bootstrap(b_table, EnvoyOptions(mode=mode)).to_dict(
        casing=__import__("betterproto2").Casing.SNAKE
    )
    outbound = Envoy(
        rewrite_envoy_config(
            outbound_config,
            {
                "graysteer": ("127.0.0.1", b_sidecar.port),
                **{n: ("127.0.0.1", b.port) for n, b in backends.items()},
            },
        ),
        workdir,
        name="a-outbound",
    )
    stack.append(outbound)
    for lane in ("stable", "canary"):
        backends[f"a-{lane}"] = BackendServer(f"a-{lane}", forward_to=("127.0.0.1", outbound.port))
        stack.append(backends[f"a-{lane}"].start_in_thread())
    front_sidecar = Sidecar(workdir / "front-rules.yaml", workdir, name="front-sidecar", transport=transport)
    stack.append(front_sidecar)
    if mode == "ext_authz_http":  # no shipped mTLS file for it: the generator's output
        template = bootstrap(
            parse_rules(FRONT_RULES.encode(), "front"), EnvoyOptions(mode=mode, mtls=TlsOptions())
        ).to_dict(casing=__import__("betterproto2").Casing.SNAKE)
    else:
        template = yaml.safe_load(
            (REPO / "envoy" / ("mtls.yaml" if mode == "ext_proc" else "ext_authz.yaml")).read_text()
        )
    front = Envoy(
        rewrite_envoy_config(
            template,
            {
                "graysteer": ("127.0.0.1", front_sidecar.port),
                "stable": ("127.0.0.1", backends["a-stable"].port),
                "canary": ("127.0.0.1", backends["a-canary"].port),
            },
            tls_dir=tls_dir,
        ),
        workdir,
        name="front",
    )
    stack.append(front)
    return Chain(front.port, tls_dir, front, backends)


@pytest.fixture(params=["ext_proc", "ext_authz", "ext_authz_http"], scope="module")
def chain(
    request: pytest.FixtureRequest, tls_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Chain]:
    stack: list[Any] = []
    try:
        yield start_chain(request.param, B_RULES, tls_dir, tmp_path_factory.mktemp("chain"), stack)
    finally:
        for item in reversed(stack):
            item.stop()


def call(
    chain: Chain, identity: str | None, headers: dict[str, str] | None = None, path: str = "/"
) -> dict[str, Any]:
    client = chain.client(identity)
    try:
        status, echo = client.get(path, headers or {})
    finally:
        client.close()
    assert status == 200, echo
    return echo


def test_qa_identity_goes_to_canary_another_to_stable(chain: Chain) -> None:
    assert call(chain, QA)["backend"] == "a-canary"
    assert call(chain, WEB)["backend"] == "a-stable"


def test_a_certificate_with_two_uri_sans_has_no_identity(chain: Chain) -> None:
    # The first SAN is QA (trusted, routed to canary): honoured, it would be canary.
    echo = call(chain, "twin", {"x-canary": "1"})
    assert echo["backend"] == "a-stable"
    assert "x-canary" not in echo["headers"]  # untrusted: the override is removed too


def test_sans_holding_xfcc_separators_give_no_identity(chain: Chain) -> None:
    lane = {"x-graysteer-lane": "canary", "x-canary": "1"}
    trusted = call(chain, QA, lane)
    assert (trusted["backend"], trusted["headers"]["x-graysteer-lane"]) == ("a-canary", "canary")
    for name in HOSTILE:
        echo = call(chain, name, lane)
        assert echo["backend"] == "a-stable", name
        assert echo["headers"]["x-graysteer-lane"] == "stable", name  # the sent lane is replaced
        assert "x-canary" not in echo["headers"], name


def test_override_header_counts_only_from_a_trusted_identity(chain: Chain) -> None:
    untrusted = call(chain, WEB, {"x-canary": "1"})
    assert untrusted["backend"] == "a-stable"
    assert "x-canary" not in untrusted["headers"]  # never reaches the upstream
    trusted = call(chain, OPS, {"x-canary": "1"})
    assert trusted["backend"] == "a-canary"
    assert call(chain, OPS)["backend"] == "a-stable"  # OPS itself is not routed to canary


def test_client_sent_xfcc_claiming_qa_has_no_effect(chain: Chain) -> None:
    echo = call(chain, WEB, {"x-forwarded-client-cert": f"Hash=x;URI={QA}"})
    assert echo["backend"] == "a-stable"
    assert QA not in echo["headers"]["x-forwarded-client-cert"]  # Envoy set its own
    assert WEB in echo["headers"]["x-forwarded-client-cert"]


@pytest.mark.parametrize("identity", [None, "stranger", "spiffe://other.org/ns/x/sa/outsider"])
def test_handshake_refused_without_an_acceptable_client_certificate(
    chain: Chain, identity: str | None
) -> None:
    before = sum(b.requests for b in chain.backends.values())
    client = chain.client(identity)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        client.get("/")
    client.close()
    assert sum(b.requests for b in chain.backends.values()) == before


def test_two_hops_a_canary_request_lands_on_b_canary_with_its_color(chain: Chain) -> None:
    echo = call(
        chain,
        QA,
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "baggage": "tenant=acme"},
    )
    assert echo["backend"] == "a-canary"
    assert echo["headers"]["x-graysteer-lane"] == "canary"
    b = echo["downstream"]
    assert (b["status"], b["backend"]) == (200, "b-canary")
    assert b["headers"]["x-graysteer-lane"] == "canary"
    assert b["headers"]["baggage"] == "tenant=acme,graysteer.lane=canary"
    assert b["headers"]["traceparent"] == (
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    )  # untouched
    stable = call(chain, WEB)["downstream"]
    assert (stable["backend"], stable["headers"]["x-graysteer-lane"]) == ("b-stable", "stable")


@pytest.mark.parametrize("mode", ["ext_proc", "ext_authz"])
def test_two_hops_without_a_canary_lane_fall_back_and_keep_the_color(
    mode: str, tls_dir: Path, tmp_path: Path
) -> None:
    stack: list[Any] = []
    try:
        chain = start_chain(mode, B_RULES_NO_CANARY, tls_dir, tmp_path, stack)
        b = call(chain, QA)["downstream"]
        assert (b["status"], b["backend"]) == (200, "b-stable")
        assert b["headers"]["x-graysteer-lane"] == "canary"  # still passed on to the next hop
        assert "graysteer.lane=canary" in b["headers"]["baggage"]
    finally:
        for item in reversed(stack):
            item.stop()


def test_generated_tls_configs_validate(tls_dir: Path, tmp_path: Path) -> None:
    from tests.e2e.conftest import envoy_validate

    for name in ("mtls.yaml", "ext_authz.yaml"):
        config = rewrite_envoy_config(
            yaml.safe_load((REPO / "envoy" / name).read_text()),
            {},
            listener_port=10000,
            admin_port=9901,
            tls_dir=tls_dir,
        )
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config))
        result = envoy_validate(path)
        assert result.returncode == 0, result.stdout + result.stderr
