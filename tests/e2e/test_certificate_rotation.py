"""Certificates that rotate under steady mTLS load, through the real Envoy, in both SDS forms
`envoy-config --sds` generates: a watched directory swapped as Kubernetes swaps a Secret
volume, and a SPIRE-like SDS server on a unix socket (Envoy is the real SDS client).

One scenario per form, under one load that opens a new connection every few requests (so
handshakes keep happening) and reads its client certificate files for each: the server
certificate rotates; the client CA bundle gains the new CA (both trusted during the overlap);
the server certificate moves to the new CA; the client's certificate changes to a new SPIFFE
ID at the same paths, and the new identity is routed by the rules within 2 s; the old CA is
retired. Every request of the load must succeed and be decided by the sidecar; an expired
client certificate and, once retired, the old CA's are refused at the handshake.
"""

import http.client
import re
import ssl
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from sidecar.dev.devstack import Envoy, Stack
from sidecar.dev.load import BackgroundLoad
from sidecar.dev.processes import wait_for
from sidecar.envoyconf.generate import EnvoyOptions, bootstrap_document
from sidecar.envoyconf.sds import CA_FILE, CERT_FILE, KEY_FILE, FileSds, Sds, SpireSds
from sidecar.envoyconf.tls import TlsOptions, sds_files
from sidecar.table.load import parse_rules
from tests.e2e.conftest import FAULT_FIGURES
from tests.sds import SdsServer
from tests.tls import Authority, make_ca, make_leaf, swap_directory, write_pair

WEB = "spiffe://example.org/ns/prod/sa/web"
QA = "spiffe://example.org/ns/qa/sa/tester"
RULES = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    rules:
      - name: qa-to-canary
        match: {identity: {glob: "spiffe://example.org/ns/qa/*"}}
        route: canary
    """)
IDENTITY_PICKUP_SECONDS = 2.0  # the bound: a rotated client identity is routed by then
APPLY_SECONDS = 10.0  # Envoy reports a rotation applied (measured: well under a second)
Pair = tuple[bytes, bytes]  # (key PEM, certificate PEM)


@dataclass(frozen=True)
class Pki:
    ca1: Authority  # the CA in use
    ca2: Authority  # its successor
    servers: tuple[Pair, Pair, Pair]  # from ca1, ca1, ca2
    bundle: Path  # ca1 + ca2: what the clients trust for the server

    def client(self, ca: Authority, identity: str, expired: bool = False) -> Pair:
        return make_leaf(ca, identity.rsplit("/", 1)[-1], uris=[identity], expired=expired)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca1, ca2 = make_ca("graysteer test CA 1"), make_ca("graysteer test CA 2")
    server = {"dns": ["localhost"], "ips": ["127.0.0.1"]}
    bundle = tmp_path_factory.mktemp("trust") / "bundle.pem"
    bundle.write_bytes(ca1.pem + ca2.pem)
    return Pki(
        ca1,
        ca2,
        (
            make_leaf(ca1, "envoy-1", **server),
            make_leaf(ca1, "envoy-2", **server),
            make_leaf(ca2, "envoy-3", **server),
        ),
        bundle,
    )


def serial(pair: Pair) -> int:
    return x509.load_pem_x509_certificate(pair[1]).serial_number


@dataclass
class Handshake:
    serial: int = 0  # the server certificate's serial (0: no handshake)
    status: int = 0  # the HTTP status (0: no response)
    error: str = ""


def handshake(port: int, cafile: Path, client: Pair | None, directory: Path) -> Handshake:
    """One new connection with `client`'s certificate and one GET."""
    context = ssl.create_default_context(cafile=str(cafile))
    if client is not None:
        key, cert = write_pair(directory, f"probe-{time.monotonic_ns()}", client)
        context.load_cert_chain(cert, key)
    result = Handshake()
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
    try:
        connection.connect()
        assert isinstance(connection.sock, ssl.SSLSocket)
        result.serial = x509.load_der_x509_certificate(
            connection.sock.getpeercert(binary_form=True)
        ).serial_number
        connection.request("GET", "/probe")  # TLS 1.3: a refused client certificate shows here
        result.status = connection.getresponse().status
    except (OSError, http.client.HTTPException) as error:
        result.error = repr(error)
    finally:
        connection.close()
    return result


def client_context(directory: Path, cafile: Path) -> Callable[[], ssl.SSLContext]:
    """A context with the client certificate `directory` holds now (Kubernetes layout: read
    through one resolved `..data`, so certificate and key are of one version)."""

    def make() -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(cafile))
        for _ in range(3):  # a version removed between resolving and reading: resolve again
            current = (directory / "..data").resolve()
            try:
                context.load_cert_chain(current / CERT_FILE, current / KEY_FILE)
                return context
            except FileNotFoundError:
                continue
        raise FileNotFoundError(f"no stable client certificate in {directory}")

    return make


def refused_handshakes(envoy: Envoy) -> int:
    """Envoy's count of client certificates that failed verification (expired, unknown CA)."""
    return sum(
        v for k, v in envoy.stats().items() if re.fullmatch(r"listener\..*\.ssl\.fail_verify_error", k)
    )


class FileForm:
    """Envoy's certificates in a directory that is swapped as the kubelet swaps a volume."""

    def __init__(self, directory: Path) -> None:
        self.sds = FileSds(str(directory))
        self.directory = directory
        self.envoy: Envoy | None = None

    def apply(self, server: Pair, trusted: bytes) -> None:
        files = {name: yaml.safe_dump(doc).encode() for name, doc in sds_files(self.sds).items()}
        files |= {CERT_FILE: server[1], KEY_FILE: server[0], CA_FILE: trusted}
        before = self._updates()
        swap_directory(self.directory, files)
        if self.envoy is not None:  # both secrets read again, and accepted
            wait_for(
                lambda: all(a > b for a, b in zip(self._updates(), before, strict=True)),
                APPLY_SECONDS,
                "the swap",
            )

    def refused(self) -> list[str]:
        """What Envoy refused to load."""
        stats = self.envoy.stats() if self.envoy is not None else {}
        return [name for name in ("server_cert", "trusted_ca") if stats.get(f"sds.{name}.update_rejected", 0)]

    def _updates(self) -> tuple[int, int]:
        if self.envoy is None:
            return (0, 0)
        stats = self.envoy.stats()
        return stats.get("sds.server_cert.update_success", 0), stats.get("sds.trusted_ca.update_success", 0)


class SpireForm:
    """Envoy's certificates from a SPIRE-like SDS server, pushed on its open streams."""

    def __init__(self, directory: Path) -> None:
        self.sds = SpireSds(str(directory / "agent.sock"))
        self.server: SdsServer | None = None

    def apply(self, server: Pair, trusted: bytes) -> None:
        if self.server is None:
            self.server = SdsServer(Path(self.sds.socket), "example.org", server, trusted)
            return
        version = self.server.publish(server, trusted)
        wait_for(
            lambda: self.server is not None and self.server.applied(version), APPLY_SECONDS, "Envoy's ACK"
        )

    def refused(self) -> list[str]:
        """What Envoy refused (NACKs)."""
        return self.server.nacks() if self.server is not None else []

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


Form = FileForm | SpireForm


@pytest.fixture(params=["file", "spire"])
def form(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Form]:
    made: Form = FileForm(tmp_path / "tls") if request.param == "file" else SpireForm(tmp_path)
    yield made
    if isinstance(made, SpireForm):
        made.stop()


def start_stack(sds: Sds, workdir: Path) -> Stack:
    (workdir / "rules.yaml").write_text(RULES)
    table = parse_rules(RULES.encode(), "rules.yaml")
    config = bootstrap_document(table, EnvoyOptions(mtls=TlsOptions(sds=sds)))
    return Stack(workdir / "rules.yaml", config, workdir)


@dataclass
class Scenario:
    """One stack under load, its rotations and probes; `figures` what each took."""

    form: Form
    pki: Pki
    stack: Stack
    workdir: Path
    figures: dict[str, object] = field(default_factory=dict)

    def probe(self, client: Pair | None) -> Handshake:
        return handshake(self.stack.port, self.pki.bundle, client, self.workdir)

    def rotate(self, figure: str, server: Pair, trusted: bytes, picked_up: Callable[[], bool]) -> None:
        """Apply a rotation to Envoy; record the seconds until new handshakes show it."""
        started = time.monotonic()
        self.form.apply(server, trusted)
        wait_for(picked_up, APPLY_SECONDS, figure)
        self.figures[figure] = round(time.monotonic() - started, 3)

    def rotate_client(self, directory: Path, pair: Pair, identity: str, load: BackgroundLoad) -> None:
        """The load's certificate files change to `identity`: routed by the rules within 2 s."""
        rotated = time.monotonic()
        swap_directory(directory, dict(zip((KEY_FILE, CERT_FILE), pair, strict=True)))
        wait_for(
            lambda: any(
                s.at > rotated and identity in s.peer and s.backend == "canary" for s in load.samples
            ),
            IDENTITY_PICKUP_SECONDS,
            "the rotated client identity routed to canary",
        )
        first = min(s.at for s in load.samples if s.at > rotated and identity in s.peer)
        self.figures["client identity routed s"] = round(first - rotated, 3)


def test_rotations_under_load_fail_no_request(form: Form, pki: Pki, tmp_path: Path) -> None:
    ca1, ca2, servers, both = pki.ca1, pki.ca2, pki.servers, pki.ca1.pem + pki.ca2.pem
    form.apply(servers[0], ca1.pem)
    client_dir = tmp_path / "client"
    swap_directory(client_dir, dict(zip((KEY_FILE, CERT_FILE), pki.client(ca1, WEB), strict=True)))
    with start_stack(form.sds, tmp_path) as stack:
        assert stack.envoy is not None
        if isinstance(form, FileForm):
            form.envoy = stack.envoy
        run = Scenario(form, pki, stack, tmp_path)
        assert run.probe(pki.client(ca1, WEB)) == Handshake(serial(servers[0]), 200)
        load = BackgroundLoad(
            stack.port, {}, threads=4, tls=client_context(client_dir, pki.bundle), per_connection=2
        )
        try:
            load.wait_for_more(50, "the load before any rotation")
            run.rotate(
                "server cert s", servers[1], ca1.pem, lambda: run.probe(None).serial == serial(servers[1])
            )
            load.wait_for_more(50, "the load after the server certificate's rotation")
            new_ca_client = pki.client(ca2, WEB)
            assert run.probe(new_ca_client).status == 0  # the new CA is not trusted yet
            run.rotate("ca overlap s", servers[1], both, lambda: run.probe(new_ca_client).status == 200)
            assert run.probe(pki.client(ca1, WEB)).status == 200  # the old CA still is
            run.rotate(
                "server cert (new CA) s",
                servers[2],
                both,
                lambda: run.probe(None).serial == serial(servers[2]),
            )
            load.wait_for_more(50, "the load during the overlap")
            run.rotate_client(client_dir, pki.client(ca2, QA), QA, load)
            load.wait_for_more(50, "the load with the new identity")
            old_ca_client = pki.client(ca1, WEB)
            run.rotate("old CA retired s", servers[2], ca2.pem, lambda: run.probe(old_ca_client).status == 0)
            load.wait_for_more(50, "the load after the old CA's retirement")
            refused = refused_handshakes(stack.envoy)
            expired = run.probe(pki.client(ca2, QA, expired=True))
            assert (expired.status, expired.serial) == (0, serial(servers[2])), expired
            wait_for(
                lambda: refused_handshakes(stack.envoy) > refused, 5, "Envoy to count the refused handshake"
            )
            # the SAN matcher still holds beside the CA that comes by SDS
            assert run.probe(pki.client(ca2, "spiffe://other.org/ns/prod/sa/web")).status == 0
            assert form.refused() == []  # Envoy loaded every rotation it was given
        finally:
            load.stop()
    failed = [s for s in load.samples if s.status != 200 or not s.decided]
    misrouted = [s for s in load.samples if s.backend != ("canary" if QA in s.peer else "stable")]
    run.figures |= {"requests": len(load.samples), "failed": len(failed), "misrouted": len(misrouted)}
    FAULT_FIGURES[f"certificate rotation, {type(form).__name__}"] = run.figures
    assert failed == [], failed[:5]
    assert misrouted == [], misrouted[:5]
    assert any(WEB in s.peer for s in load.samples) and any(QA in s.peer for s in load.samples)
