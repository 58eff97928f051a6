"""TLS files read again when they change: whole and consistent changes are taken, anything
else keeps the last good files (logged once per state of the files, counted)."""

import datetime
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry

from sidecar import tlsfiles
from sidecar.tlsfiles import TlsFiles, TlsPem, TlsReloads
from tests.tls import make_ca, make_leaf, swap_directory

CA = make_ca()
FIRST = make_leaf(CA, "first", dns=["localhost"])
SECOND = make_leaf(CA, "second", dns=["localhost"])
ENCRYPTED = serialization.load_pem_private_key(FIRST[0], None).private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8,
    serialization.BestAvailableEncryption(b"pass"),
)


def mount(directory: Path, pair: tuple[bytes, bytes], ca: bytes = CA.pem) -> None:
    swap_directory(directory, {"tls.key": pair[0], "tls.crt": pair[1], "ca.crt": ca})


@pytest.fixture()
def files(tmp_path: Path) -> tuple[TlsFiles, Path, CollectorRegistry]:
    mount(tmp_path, FIRST)
    registry = CollectorRegistry()
    made = TlsFiles(
        "admin", tmp_path / "ca.crt", tmp_path / "tls.crt", tmp_path / "tls.key", TlsReloads(registry)
    )
    return made, tmp_path, registry


def counted(registry: CollectorRegistry, outcome: str) -> float:
    return registry.get_sample_value("graysteer_tls_reloads_total", {"use": "admin", "outcome": outcome}) or 0


def test_unchanged_files_are_not_read_again(files: tuple[TlsFiles, Path, CollectorRegistry]) -> None:
    tls, _, registry = files
    first = tls.current()
    assert first == TlsPem(CA.pem, FIRST[1], FIRST[0])
    assert tls.current() is first
    assert counted(registry, "loaded") == 0


def test_a_swapped_directory_is_loaded(files: tuple[TlsFiles, Path, CollectorRegistry]) -> None:
    tls, directory, registry = files
    other = make_ca("other")
    mount(directory, SECOND, CA.pem + other.pem)
    assert tls.current() == TlsPem(CA.pem + other.pem, SECOND[1], SECOND[0])
    assert counted(registry, "loaded") == 1


def test_a_file_rewritten_in_place_is_seen_too(files: tuple[TlsFiles, Path, CollectorRegistry]) -> None:
    tls, directory, _ = files
    other = make_ca("other")
    (directory / "ca.crt").resolve().write_bytes(other.pem)
    assert tls.current().ca == other.pem


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        ({"tls.key": SECOND[0], "tls.crt": FIRST[1]}, "is not the private key of the certificate"),
        ({"tls.key": b"not a key", "tls.crt": FIRST[1]}, "no unencrypted PEM private key"),
        ({"tls.key": ENCRYPTED, "tls.crt": FIRST[1]}, "no unencrypted PEM private key"),
        ({"tls.key": FIRST[0], "tls.crt": b""}, "no PEM certificate"),
        (
            {"tls.key": FIRST[0], "tls.crt": FIRST[1], "ca.crt": b"-----BEGIN CERTIFICATE-----\n"},
            "no PEM certificate",
        ),
    ],
)
def test_a_change_that_cannot_be_used_keeps_the_last_good_files(
    files: tuple[TlsFiles, Path, CollectorRegistry],
    broken: dict[str, bytes],
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tls, directory, registry = files
    good = tls.current()
    swap_directory(directory, {"ca.crt": CA.pem, **broken})
    with caplog.at_level(logging.ERROR, "graysteer.tls"):
        for _ in range(3):  # every handshake asks: one log line, one count
            assert tls.current() is good
    assert [r.getMessage() for r in caplog.records if reason in r.getMessage()] != []
    assert len(caplog.records) == 1
    assert counted(registry, "refused") == 1
    mount(directory, SECOND)  # the next good change is taken
    assert tls.current().chain == SECOND[1]
    assert counted(registry, "loaded") == 1


def test_a_missing_file_keeps_the_last_good_files(
    files: tuple[TlsFiles, Path, CollectorRegistry], caplog: pytest.LogCaptureFixture
) -> None:
    tls, directory, registry = files
    good = tls.current()
    os.unlink(directory / "tls.key")
    with caplog.at_level(logging.ERROR, "graysteer.tls"):
        assert tls.current() is good and tls.current() is good
    assert len(caplog.records) == 1 and "tls.key" in caplog.records[0].getMessage()
    assert counted(registry, "refused") == 1


def test_a_ca_bundle_alone(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(CA.pem)
    assert TlsFiles("etcd", tmp_path / "ca.pem").current() == TlsPem(CA.pem)


def test_files_that_cannot_be_used_at_start_up_are_named(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(CA.pem)
    (tmp_path / "cert.pem").write_bytes(FIRST[1])
    (tmp_path / "key.pem").write_bytes(SECOND[0])
    with pytest.raises(ValueError, match=r"key.pem is not the private key of the certificate in .*cert.pem"):
        TlsFiles("admin", tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem")
    with pytest.raises(FileNotFoundError):
        TlsFiles("admin", tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="go together"):
        TlsFiles("admin", tmp_path / "ca.pem", tmp_path / "cert.pem")


@pytest.fixture()
def admin(tmp_path: Path) -> tuple[TlsFiles, Path, CollectorRegistry]:
    """The admin API's files: the certificate must chain to the CA bundle."""
    mount(tmp_path, FIRST)
    registry = CollectorRegistry()
    made = TlsFiles(
        "admin",
        tmp_path / "ca.crt",
        tmp_path / "tls.crt",
        tmp_path / "tls.key",
        TlsReloads(registry),
        verify_chain=True,
    )
    return made, tmp_path, registry


OTHER_CA = make_ca("another CA")


@pytest.mark.parametrize(
    ("rotation", "reason"),
    [
        ({"pair": make_leaf(CA, "old", dns=["localhost"], expired=True)}, "the certificate expired at"),
        (
            {"pair": make_leaf(CA, "early", dns=["localhost"], starts_in=datetime.timedelta(hours=1))},
            "the certificate is not valid before",
        ),
        ({"pair": make_leaf(OTHER_CA, "stranger", dns=["localhost"])}, "does not chain to a CA in"),
        ({"ca": OTHER_CA.pem}, "does not chain to a CA in"),  # a new CA that does not sign the certificate
        ({"pair": make_leaf(OTHER_CA, "both", dns=["localhost"]), "ca": CA.pem}, "does not chain"),
    ],
)
def test_a_rotation_clients_could_not_verify_keeps_the_last_good_files(
    admin: tuple[TlsFiles, Path, CollectorRegistry],
    rotation: dict[str, Any],
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tls, directory, registry = admin
    good = tls.current()
    mount(directory, rotation.get("pair", FIRST), rotation.get("ca", CA.pem))
    with caplog.at_level(logging.ERROR, "graysteer.tls"):
        assert tls.current() is good and tls.current() is good
    assert len(caplog.records) == 1 and reason in caplog.records[0].getMessage()
    assert (counted(registry, "refused"), counted(registry, "loaded")) == (1, 0)
    mount(directory, SECOND, CA.pem + OTHER_CA.pem)  # the next good rotation is taken
    assert tls.current().chain == SECOND[1]


def test_the_etcd_client_certificate_need_not_chain_to_the_server_ca(tmp_path: Path) -> None:
    mount(tmp_path, make_leaf(OTHER_CA, "client"))
    TlsFiles("etcd", tmp_path / "ca.crt", tmp_path / "tls.crt", tmp_path / "tls.key")
    mount(tmp_path, make_leaf(OTHER_CA, "client", expired=True))
    with pytest.raises(ValueError, match="the certificate expired at"):
        TlsFiles("etcd", tmp_path / "ca.crt", tmp_path / "tls.crt", tmp_path / "tls.key")


def test_a_certificate_refused_as_not_yet_valid_is_taken_once_valid(
    admin: tuple[TlsFiles, Path, CollectorRegistry], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An issuer's clock a little ahead of this one: the same files load once their time has
    come, without another change to them."""
    tls, directory, _ = admin
    early = make_leaf(CA, "early", dns=["localhost"], starts_in=datetime.timedelta(seconds=30))
    mount(directory, early)
    assert tls.current().chain == FIRST[1]
    assert tls.current().chain == FIRST[1]  # asked again: still refused, not read again
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=10)
    monkeypatch.setattr(tlsfiles, "utc_now", lambda: later)
    assert tls.current().chain == early[1]


def test_an_admin_certificate_from_another_ca_is_refused_at_start_up(tmp_path: Path) -> None:
    mount(tmp_path, make_leaf(OTHER_CA, "stranger"))
    with pytest.raises(ValueError, match=r"tls.crt: the certificate does not chain to a CA in .*ca.crt"):
        TlsFiles("admin", tmp_path / "ca.crt", tmp_path / "tls.crt", tmp_path / "tls.key", verify_chain=True)
