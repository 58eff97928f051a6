"""gRPC traffic end to end: a real gRPC client, real gRPC backends (grpcio) and the real Envoy
with configs from `envoy-config --upstream-protocol http2`, in every mode. Rules match the
gRPC service and method, route by metadata (headers to Envoy), split sticky by a metadata
entry, deny with a gRPC status the client reads, and the lane travels through a two-hop
chain: client -> Envoy -> service A -> A's outbound Envoy -> service B."""

import json
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from sidecar.dev.devstack import Envoy, Sidecar, rewrite_envoy_config
from sidecar.dev.grpc_backend import GrpcBackend
from sidecar.envoyconf.generate import EnvoyOptions, bootstrap_document
from sidecar.envoyconf.tls import TlsOptions
from sidecar.table.load import parse_rules
from sidecar.transports.explain import explain_local
from tests.tls import make_ca, make_leaf, write_pair

FRONT_RULES = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    coloring:
      lanes: {stable: stable, canary: canary}
    rules:
      - name: no-admin-rpcs
        match: {grpc: {service: shop.v1.Admin}}
        deny: {status: 403, reason: "admin RPCs are internal"}
      - name: cart-get
        match: {grpc: {service: shop.v1.Cart, method: Get}}
        route: canary
      - name: beta-tier
        match: {headers: {x-tier: beta}}
        route: canary
      - name: beta-host
        match: {host: "beta.*"}
        route: canary
      - name: by-user
        split:
          key: [header:x-user-id]
          to: [{cluster: stable, weight: 50}, {cluster: canary, weight: 50}]
          when_key_missing: stable
    """)
# Service B's sidecar, behind A's outbound Envoy: A calls it in plaintext from loopback.
B_RULES = textwrap.dedent("""\
    version: 1
    clusters: [b-stable, b-canary]
    default: b-stable
    trust: {plaintext: true}
    coloring:
      lanes: {stable: b-stable, canary: b-canary}
    """)


@dataclass
class Chain:
    port: int
    backends: dict[str, GrpcBackend]
    rules: Path

    def call(
        self, method: str, metadata: dict[str, str] | None = None, authority: str | None = None
    ) -> dict[str, Any]:
        options = [("grpc.default_authority", authority)] if authority else []
        with grpc.insecure_channel(f"127.0.0.1:{self.port}", options) as channel:
            stub = channel.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)
            return json.loads(stub(b"{}", metadata=list((metadata or {}).items()), timeout=10))


def envoy_config(
    rules: str, mode: str, endpoints: dict[str, tuple[str, int]], tls_dir: Path | None = None
) -> dict[str, Any]:
    """`envoy-config --upstream-protocol http2` for `rules` (with `tls_dir`: `--mtls`, its
    certificates from there), on the given endpoints."""
    table = parse_rules(rules.encode(), "rules.yaml")
    options = EnvoyOptions(mode=mode, upstream_protocol="http2", mtls=TlsOptions() if tls_dir else None)
    config = bootstrap_document(table, options)
    return rewrite_envoy_config(config, endpoints, tls_dir=tls_dir)


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz", "ext_authz_http"])
def chain(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    mode = request.param
    workdir = tmp_path_factory.mktemp(f"grpc-{mode}")
    transport = "http" if mode == "ext_authz_http" else "grpc"
    (workdir / "front-rules.yaml").write_text(FRONT_RULES)
    (workdir / "b-rules.yaml").write_text(B_RULES)
    stack: list[Any] = []
    try:
        backends = {name: GrpcBackend(name).start() for name in ("b-stable", "b-canary")}
        stack.extend(backends.values())
        b_sidecar = Sidecar(workdir / "b-rules.yaml", workdir, name="b-sidecar", transport=transport)
        stack.append(b_sidecar)
        outbound = Envoy(
            envoy_config(
                B_RULES,
                mode,
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
            backends[f"a-{lane}"] = GrpcBackend(f"a-{lane}", forward_to=("127.0.0.1", outbound.port)).start()
            stack.append(backends[f"a-{lane}"])
        front_sidecar = Sidecar(
            workdir / "front-rules.yaml", workdir, name="front-sidecar", transport=transport
        )
        stack.append(front_sidecar)
        front = Envoy(
            envoy_config(
                FRONT_RULES,
                mode,
                {
                    "graysteer": ("127.0.0.1", front_sidecar.port),
                    "stable": ("127.0.0.1", backends["a-stable"].port),
                    "canary": ("127.0.0.1", backends["a-canary"].port),
                },
            ),
            workdir,
            name="front",
        )
        stack.append(front)
        yield Chain(front.port, backends, workdir / "front-rules.yaml")
    finally:
        for item in reversed(stack):
            item.stop()


def test_a_grpc_method_rule_routes_by_service_and_method(chain: Chain) -> None:
    get = chain.call("/shop.v1.Cart/Get")
    assert (get["backend"], get["method"]) == ("a-canary", "/shop.v1.Cart/Get")
    assert chain.call("/shop.v1.Cart/Put")["backend"] == "a-stable"  # another method: the split's default


def test_metadata_routes_as_headers(chain: Chain) -> None:
    assert chain.call("/shop.v1.Cart/Put", {"x-tier": "beta"})["backend"] == "a-canary"
    assert chain.call("/shop.v1.Cart/Put", {"x-tier": "gold"})["backend"] == "a-stable"


def test_a_host_rule_reads_the_http2_authority(chain: Chain) -> None:
    assert chain.call("/shop.v1.Cart/Put", authority="Beta.Shop.io:443")["backend"] == "a-canary"
    assert chain.call("/shop.v1.Cart/Put", authority="shop.io")["backend"] == "a-stable"


def test_a_split_keyed_on_metadata_is_sticky_and_explained(chain: Chain) -> None:
    seen = {}
    for i in range(30):
        user = f"user-{i}"
        backend = chain.call("/shop.v1.Orders/List", {"x-user-id": user})["backend"]
        expected = explain_local(str(chain.rules), "POST", "/shop.v1.Orders/List", [("x-user-id", user)])
        assert backend == f"a-{expected['cluster']}", user
        seen[user] = backend
    assert set(seen.values()) == {"a-stable", "a-canary"}
    for user, backend in seen.items():
        assert chain.call("/shop.v1.Orders/List", {"x-user-id": user})["backend"] == backend


def test_a_deny_rule_is_a_grpc_status_the_client_reads(chain: Chain) -> None:
    before = {name: b.calls for name, b in chain.backends.items()}
    with pytest.raises(grpc.RpcError) as caught:
        chain.call("/shop.v1.Admin/DropTables")
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED  # 403
    assert caught.value.details() == "admin RPCs are internal"
    assert {name: b.calls for name, b in chain.backends.items()} == before  # nothing reached a backend


@pytest.mark.parametrize(
    ("metadata", "lane"), [({"x-tier": "beta"}, "canary"), ({"x-tier": "gold"}, "stable")]
)
def test_the_lane_travels_through_two_grpc_hops(chain: Chain, metadata: dict[str, str], lane: str) -> None:
    answer = chain.call("/shop.v1.Cart/Put", metadata)
    assert answer["backend"] == f"a-{lane}"
    assert answer["metadata"]["x-graysteer-lane"] == lane
    assert "graysteer.lane=" + lane in answer["metadata"]["baggage"]
    hop = answer["next"]
    assert hop["backend"] == f"b-{lane}", hop  # B's sidecar honoured the lane A passed on
    assert hop["metadata"]["x-graysteer-lane"] == lane


QA = "spiffe://example.org/ns/qa/sa/tester"
MTLS_RULES = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    rules:
      - name: qa-to-canary
        match: {identity: {glob: "spiffe://example.org/ns/qa/*"}}
        route: canary
    """)


@pytest.mark.parametrize("mode", ["ext_proc", "ext_authz"])
def test_grpc_over_mtls_routes_by_the_client_identity(mode: str, tmp_path: Path) -> None:
    """The TLS listener offers h2 by ALPN (gRPC requires it) and the identity rule applies."""
    ca = make_ca()
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    write_pair(tmp_path, "server", make_leaf(ca, "envoy", dns=["localhost"], ips=["127.0.0.1"]))
    clients = {
        name: make_leaf(ca, name, uris=[uri])
        for name, uri in (("tester", QA), ("web", "spiffe://example.org/ns/prod/sa/web"))
    }
    (tmp_path / "rules.yaml").write_text(MTLS_RULES)
    stack: list[Any] = []
    try:
        backends = {name: GrpcBackend(f"a-{name}").start() for name in ("stable", "canary")}
        stack.extend(backends.values())
        sidecar = Sidecar(tmp_path / "rules.yaml", tmp_path)
        stack.append(sidecar)
        endpoints = {
            "graysteer": ("127.0.0.1", sidecar.port),
            **{n: ("127.0.0.1", b.port) for n, b in backends.items()},
        }
        front = Envoy(envoy_config(MTLS_RULES, mode, endpoints, tmp_path), tmp_path, name="front")
        stack.append(front)
        for name, expected in (("tester", "a-canary"), ("web", "a-stable")):
            key, cert = clients[name]
            credentials = grpc.ssl_channel_credentials(ca.pem, key, cert)
            with grpc.secure_channel(f"127.0.0.1:{front.port}", credentials) as channel:
                stub = channel.unary_unary(
                    "/shop.v1.Cart/Put", request_serializer=bytes, response_deserializer=bytes
                )
                assert json.loads(stub(b"{}", timeout=10))["backend"] == expected, name
    finally:
        for item in reversed(stack):
            item.stop()
