"""The admin API authenticates: a bearer token (rotated without a restart), TLS client
certificates with an allow-list, a remote bind only with one of them, a unix socket for the
owner only. Real `graysteer serve` processes, real gRPC TLS."""

import logging
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor

from sidecar.admin.api import admin_pb2 as pb
from sidecar.admin.security import AdminAuth, TokenFile
from sidecar.cli import main
from sidecar.dev.devstack import Sidecar
from sidecar.dev.processes import wait_for
from tests.tls import make_ca, make_leaf, write_pair

REPO = Path(__file__).parents[2]
RULES = REPO / "examples" / "rules.yaml"
OPS = "spiffe://example.org/ns/ops/sa/release"
WEB = "spiffe://example.org/ns/prod/sa/web"


@pytest.fixture()
def tls(tmp_path: Path) -> Path:
    ca = make_ca()
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    write_pair(tmp_path, "server", make_leaf(ca, "sidecar", dns=["localhost"], ips=["127.0.0.1"]))
    write_pair(tmp_path, "ops", make_leaf(ca, "ops", uris=[OPS]))
    write_pair(tmp_path, "web", make_leaf(ca, "web", uris=[WEB]))
    stranger = make_ca("another CA")
    write_pair(tmp_path, "stranger", make_leaf(stranger, "stranger", uris=[OPS]))
    return tmp_path


def status(admin: str, *flags: str) -> int:
    return main(["status", "--admin", admin, *flags])


@pytest.fixture()
def token_sidecar(tmp_path: Path) -> Iterator[tuple[Sidecar, Path]]:
    token = tmp_path / "token"
    token.write_text("s3cret-one\n")
    token.chmod(0o600)
    sidecar = Sidecar(RULES, tmp_path, ["--admin-token-file", str(token)])
    yield sidecar, token
    sidecar.stop()


def test_a_bearer_token_is_required_and_rotates_without_a_restart(
    token_sidecar: tuple[Sidecar, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sidecar, token = token_sidecar
    assert status(sidecar.admin) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    wrong = tmp_path / "wrong"
    wrong.write_text("s3cret-two")
    assert status(sidecar.admin, "--admin-token-file", str(wrong)) == 1
    assert status(sidecar.admin, "--admin-token-file", str(token)) == 0
    assert main(["set-weight", "checkout-ramp", "canary=20", "--admin", sidecar.admin]) == 1  # no token
    token.write_text("s3cret-two")  # rotation: the sidecar reads the file again when it changes
    assert status(sidecar.admin, "--admin-token-file", str(wrong)) == 0
    assert status(sidecar.admin, "--admin-token-file", str(tmp_path / "token")) == 0


ADMIN = pb.DESCRIPTOR.services_by_name["Admin"]
REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def call(
    channel: grpc.Channel, method: MethodDescriptor, metadata: Sequence[tuple[str, str]] = ()
) -> tuple[int, grpc.StatusCode]:
    """Call one admin method with an empty request: (messages received, status code). A
    stream is cancelled after its first message (it was let in)."""
    path = f"/{ADMIN.full_name}/{method.name}"
    request = message_factory.GetMessageClass(method.input_type)()
    kinds = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }
    callable_ = kinds[(method.client_streaming, method.server_streaming)](
        path, request_serializer=type(request).SerializeToString
    )
    argument = iter([request]) if method.client_streaming else request
    try:
        if method.server_streaming:
            responses = callable_(argument, timeout=10, metadata=metadata)
            next(responses)
            responses.cancel()
            return 1, grpc.StatusCode.OK
        callable_(argument, timeout=10, metadata=metadata)
        return 1, grpc.StatusCode.OK
    except grpc.RpcError as error:
        return 0, error.code()


def every_method(
    channel: grpc.Channel, metadata: Sequence[tuple[str, str]] = ()
) -> dict[str, tuple[int, grpc.StatusCode]]:
    return {method.name: call(channel, method, metadata) for method in ADMIN.methods}


def test_every_admin_rpc_of_every_kind_needs_the_token(token_sidecar: tuple[Sidecar, Path]) -> None:
    sidecar, _ = token_sidecar
    assert any(method.server_streaming for method in ADMIN.methods)  # WatchTable among them
    with grpc.insecure_channel(sidecar.admin) as channel:
        for metadata in ([], [("authorization", "Bearer s3cret-two")], [("authorization", "s3cret-one")]):
            answers = every_method(channel, metadata)
            assert answers == {m.name: (0, grpc.StatusCode.UNAUTHENTICATED) for m in ADMIN.methods}, metadata
        let_in = every_method(channel, [("authorization", "Bearer s3cret-one")])
    # With the token every method runs (an empty request may be invalid, never refused).
    assert not [name for name, (_, code) in let_in.items() if code in REFUSED]
    assert let_in["WatchTable"] == (1, grpc.StatusCode.OK) and let_in["GetTable"] == (1, grpc.StatusCode.OK)


def test_tls_client_certificates_and_the_allow_list(
    tls: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sidecar = Sidecar(
        RULES,
        tmp_path,
        [
            "--admin-tls-cert",
            str(tls / "server.pem"),
            "--admin-tls-key",
            str(tls / "server.key"),
            "--admin-tls-ca",
            str(tls / "ca.pem"),
            "--admin-allow",
            "spiffe://example.org/ns/ops/*",
        ],
    )
    try:

        def client(name: str) -> list[str]:
            return [
                "--admin-tls-ca",
                str(tls / "ca.pem"),
                "--admin-tls-cert",
                str(tls / f"{name}.pem"),
                "--admin-tls-key",
                str(tls / f"{name}.key"),
            ]

        assert status(sidecar.admin, *client("ops")) == 0
        capsys.readouterr()
        assert status(sidecar.admin, *client("web")) == 1
        assert "PERMISSION_DENIED" in capsys.readouterr().err
        assert status(sidecar.admin, *client("stranger")) == 1  # not from the CA: no handshake

        def channel(name: str) -> grpc.Channel:
            return grpc.secure_channel(
                sidecar.admin,
                grpc.ssl_channel_credentials(
                    (tls / "ca.pem").read_bytes(),
                    (tls / f"{name}.key").read_bytes(),
                    (tls / f"{name}.pem").read_bytes(),
                ),
            )

        with channel("web") as web:  # every method, streams included: refused, nothing sent
            assert every_method(web) == {
                m.name: (0, grpc.StatusCode.PERMISSION_DENIED) for m in ADMIN.methods
            }
        with channel("ops") as ops:
            let_in = every_method(ops)
        assert not [name for name, (_, code) in let_in.items() if code in REFUSED]
        assert let_in["WatchTable"] == (1, grpc.StatusCode.OK)
        assert status(sidecar.admin, "--admin-tls-ca", str(tls / "ca.pem")) == 1  # no client certificate
        assert status(sidecar.admin) == 1  # plaintext
    finally:
        sidecar.stop()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--admin-listen", "0.0.0.0:0"], "not loopback or a unix socket"),
        (["--admin-listen", "0.0.0.0:0", "--admin-allow-remote"], "and authentication"),
        (["--admin-allow", OPS], "--admin-allow needs --admin-tls"),
        (["--admin-tls-cert", "x.pem"], "go together"),
        (["--admin-token-file", "/nonexistent/token"], "--admin-token-file"),
    ],
)
def test_unsafe_admin_settings_are_refused(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--config", str(RULES), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_unix_socket_is_for_its_owner_only(tmp_path: Path) -> None:
    socket_path = tmp_path / "admin.sock"
    sidecar = Sidecar(RULES, tmp_path, ["--admin-listen", f"unix:{socket_path}"])
    try:
        wait_for(socket_path.exists, 10, "the admin socket")
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        assert status(f"unix:{socket_path}") == 0
    finally:
        sidecar.stop()


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        (0o644, "lets every user read"),
        (0o604, "lets every user read"),
        (0o620, "lets other users change"),
        (0o602, "lets other users change"),
        (0o660, "lets other users change"),
    ],
)
def test_a_token_file_others_can_read_or_change_is_refused_at_start(
    tmp_path: Path, mode: int, why: str
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-one\n")
    token.chmod(mode)
    # A process, so that a regression (it starts serving) ends in the timeout, not a hang.
    argv = ["serve", "--config", str(RULES), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", *argv, "--admin-token-file", str(token)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    error = result.stderr
    assert f"--admin-token-file {token}: mode {mode:04o} {why} the admin token" in error
    assert f"chmod 600 {token}" in error


@pytest.mark.parametrize(("mode", "warned"), [(0o600, False), (0o400, False), (0o640, True), (0o440, True)])
def test_a_group_readable_token_file_is_accepted_and_logged_once(
    tmp_path: Path, mode: int, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-one\n")
    token.chmod(mode)
    assert AdminAuth(token_file=str(token)).problem() is None
    tokens = TokenFile(str(token))
    with caplog.at_level(logging.WARNING, "graysteer.admin"):
        for _ in range(3):
            assert tokens.accepts([("authorization", "Bearer s3cret-one")])
    warnings = [r.getMessage() for r in caplog.records if "lets its group read the token" in r.getMessage()]
    assert warnings == (
        [
            f"admin token file {token}: mode {mode:04o} lets its group read the token (accepted: a "
            "Kubernetes Secret volume with fsGroup); `chmod 600` keeps it to this user"
        ]
        if warned
        else []
    )


def test_a_token_file_that_becomes_readable_by_others_stops_being_accepted(
    token_sidecar: tuple[Sidecar, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sidecar, token = token_sidecar
    assert status(sidecar.admin, "--admin-token-file", str(token)) == 0
    token.chmod(0o644)  # neither the content nor the mtime changes
    for _ in range(3):
        assert status(sidecar.admin, "--admin-token-file", str(token)) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
    refusal = f"admin token file {token}: mode 0644 lets every user read the admin token"
    assert sidecar.log_text().count(refusal) == 1  # logged once, not per call
    token.chmod(0o600)
    assert status(sidecar.admin, "--admin-token-file", str(token)) == 0
    sidecar.wait_for_log(f"admin token file {token}: readable and safe again")


def served_serial(address: str, cafile: Path, cert: Path, key: Path) -> int:
    """The serial of the certificate the admin API presents to a new connection."""
    import socket
    import ssl

    from cryptography import x509

    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=str(cafile))
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def tls_reloads(sidecar: Sidecar, outcome: str) -> float:
    text = sidecar.http_get("/metrics")[1]
    line = f'graysteer_tls_reloads_total{{outcome="{outcome}",use="admin"}} '
    return float(next((row.removeprefix(line) for row in text.splitlines() if row.startswith(line)), 0))


def test_tls_files_rotate_under_a_running_sidecar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Certificate, key and CA swapped as a Kubernetes Secret volume is: new handshakes use
    them (the new CA's clients get in, the retired CA's do not), an open connection goes on,
    and a swap that cannot be used keeps the last good files, logged once and counted."""
    from cryptography import x509

    from tests.tls import swap_directory

    ca1, ca2 = make_ca("admin CA 1"), make_ca("admin CA 2")
    servers = [
        make_leaf(ca, f"sidecar-{n}", dns=["localhost"], ips=["127.0.0.1"]) for n, ca in ((1, ca1), (2, ca2))
    ]
    serials = [x509.load_pem_x509_certificate(cert).serial_number for _, cert in servers]
    mounted, clients = tmp_path / "admin-tls", tmp_path / "clients"

    def mount(pair: tuple[bytes, bytes], trusted: bytes) -> None:
        swap_directory(mounted, {"tls.key": pair[0], "tls.crt": pair[1], "ca.crt": trusted})

    mount(servers[0], ca1.pem)
    clients.mkdir()
    old = write_pair(clients, "ops-1", make_leaf(ca1, "ops", uris=[OPS]))
    new = write_pair(clients, "ops-2", make_leaf(ca2, "ops", uris=[OPS]))
    bundle = clients / "bundle.pem"
    bundle.write_bytes(ca1.pem + ca2.pem)
    flags = ["--admin-tls-cert", str(mounted / "tls.crt"), "--admin-tls-key", str(mounted / "tls.key")]
    flags += ["--admin-tls-ca", str(mounted / "ca.crt"), "--admin-allow", "spiffe://example.org/ns/ops/*"]
    sidecar = Sidecar(RULES, tmp_path, flags)

    def calls(pair: tuple[Path, Path]) -> bool:
        flags = [
            "--admin-tls-ca",
            str(bundle),
            "--admin-tls-key",
            str(pair[0]),
            "--admin-tls-cert",
            str(pair[1]),
        ]
        return status(sidecar.admin, *flags) == 0

    def serial(pair: tuple[Path, Path]) -> int:
        return served_serial(sidecar.admin, bundle, pair[1], pair[0])

    credentials = grpc.ssl_channel_credentials(bundle.read_bytes(), old[0].read_bytes(), old[1].read_bytes())
    get_table = ADMIN.methods_by_name["GetTable"]
    try:
        assert calls(old) and not calls(new) and serial(old) == serials[0]  # CA 2 not trusted yet
        mount(servers[0], ca1.pem + ca2.pem)  # the overlap: both CAs' clients get in
        wait_for(lambda: calls(new), 5, "CA 2's client to be accepted")
        assert calls(old)
        with grpc.secure_channel(sidecar.admin, credentials) as open_channel:
            assert call(open_channel, get_table) == (1, grpc.StatusCode.OK)
            mount(servers[1], ca2.pem)  # the new CA's certificate, and CA 1 retired
            wait_for(lambda: serial(new) == serials[1], 5, "the new server certificate")
            assert not calls(old) and calls(new)  # a new connection with CA 1's certificate: refused
            assert call(open_channel, get_table) == (1, grpc.StatusCode.OK)  # the open one goes on
        assert (tls_reloads(sidecar, "loaded"), tls_reloads(sidecar, "refused")) == (2, 0)
        mount((servers[0][0], servers[1][1]), ca2.pem)  # a key that is not the certificate's
        # the files are looked at on the next handshake: it still gets the last good ones
        assert serial(new) == serials[1] and calls(new)
        assert tls_reloads(sidecar, "refused") == 1
        assert sidecar.log_text().count("admin TLS files changed but cannot be used") == 1
        assert "is not the private key of the certificate" in sidecar.log_text()
        mount(servers[1], ca1.pem + ca2.pem)  # fixed: taken at the next handshake
        wait_for(lambda: calls(old), 5, "the fixed files")
        assert tls_reloads(sidecar, "loaded") == 3
    finally:
        sidecar.stop()
        capsys.readouterr()
