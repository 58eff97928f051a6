"""The operator endpoint's HTTPS (`serve --http-actions` with `--admin-tls-*`) takes a rotated
certificate and CA as the admin API does: new handshakes use them, and a rotation clients could
not verify (an expired certificate, one from another CA, a CA that does not sign the
certificate) is refused on both endpoints, logged and counted, the last good files in use.
A real `graysteer serve`, real TLS handshakes on loopback."""

import http.client
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from sidecar.dev.devstack import Sidecar
from sidecar.dev.processes import wait_for
from tests.admin.test_security import OPS, RULES, served_serial
from tests.tls import Authority, make_ca, make_leaf, swap_directory, write_pair


def serial(port: int, cafile: Path) -> int:
    """The serial of the certificate the operator endpoint presents to a new connection."""
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def reloads(port: int, cafile: Path, outcome: str) -> float:
    connection = http.client.HTTPSConnection(
        "127.0.0.1", port, context=ssl.create_default_context(cafile=str(cafile)), timeout=5
    )
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    line = f'graysteer_tls_reloads_total{{outcome="{outcome}",use="admin"}} '
    return float(next((row.removeprefix(line) for row in text.splitlines() if row.startswith(line)), 0))


def server_pair(ca: Authority, name: str, expired: bool = False) -> tuple[bytes, bytes]:
    return make_leaf(ca, name, dns=["localhost"], ips=["127.0.0.1"], expired=expired)


def number(pair: tuple[bytes, bytes]) -> int:
    return x509.load_pem_x509_certificate(pair[1]).serial_number


def test_the_operator_https_endpoint_takes_rotations_and_refuses_unverifiable_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca, stranger = make_ca("admin CA"), make_ca("another CA")
    first, second = server_pair(ca, "sidecar-1"), server_pair(ca, "sidecar-2")
    mounted, clients = tmp_path / "admin-tls", tmp_path / "clients"

    def mount(pair: tuple[bytes, bytes], trusted: bytes = ca.pem) -> None:
        swap_directory(mounted, {"tls.key": pair[0], "tls.crt": pair[1], "ca.crt": trusted})

    mount(first)
    clients.mkdir()
    (clients / "ca.pem").write_bytes(ca.pem)
    ops = write_pair(clients, "ops", make_leaf(ca, "ops", uris=[OPS]))
    flags = ["--admin-tls-cert", str(mounted / "tls.crt"), "--admin-tls-key", str(mounted / "tls.key")]
    flags += ["--admin-tls-ca", str(mounted / "ca.crt"), "--admin-allow", OPS, "--http-actions"]
    sidecar = Sidecar(RULES, tmp_path, flags)
    cafile = clients / "ca.pem"

    def both_serve(pair: tuple[bytes, bytes]) -> bool:
        served = (serial(sidecar.http, cafile), served_serial(sidecar.admin, cafile, ops[1], ops[0]))
        return served == (number(pair), number(pair))

    try:
        assert both_serve(first)
        mount(second)
        wait_for(
            lambda: serial(sidecar.http, cafile) == number(second), 5, "the rotated certificate on HTTPS"
        )
        assert both_serve(second)
        for refused, (pair, trusted, says) in enumerate(
            (
                (server_pair(ca, "old", expired=True), ca.pem, "the certificate expired at"),
                (server_pair(stranger, "stranger"), ca.pem, "the certificate does not chain to a CA in"),
                (second, stranger.pem, "the certificate does not chain to a CA in"),  # a CA not signing it
            ),
            start=1,
        ):
            mount(pair, trusted)
            assert both_serve(second)  # the last good files stay, for new handshakes on both
            assert reloads(sidecar.http, cafile, "refused") == refused
            assert says in sidecar.log_text()
        mount(first, ca.pem + stranger.pem)  # a good rotation is taken again
        wait_for(lambda: serial(sidecar.http, cafile) == number(first), 5, "the next good rotation")
        assert both_serve(first)
        assert reloads(sidecar.http, cafile, "loaded") == 2
    finally:
        sidecar.stop()
        capsys.readouterr()
