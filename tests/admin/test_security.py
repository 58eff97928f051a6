"""The admin API authenticates: a bearer token (rotated without a restart), TLS client
certificates with an allow-list, a remote bind only with one of them, a unix socket for the
owner only. Real `graysteer serve` processes, real gRPC TLS."""

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.dev.devstack import Sidecar, wait_for
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
