"""Test certificates made at test time with `cryptography`: a CA, servers, SPIFFE clients.
No private key is committed; everything is written under pytest's tmp dirs. And a directory
updated as Kubernetes updates a Secret volume (`swap_directory`)."""

import datetime
import ipaddress
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Authority:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example"),
        ]
    )


def make_ca(name: str = "graysteer test CA") -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Authority(key, certificate)


def make_leaf(
    ca: Authority,
    common_name: str,
    uris: list[str] = (),  # type: ignore[assignment]
    dns: list[str] = (),
    ips: list[str] = (),
    expired: bool = False,
    starts_in: datetime.timedelta = datetime.timedelta(0),
) -> tuple[bytes, bytes]:  # type: ignore[assignment]
    """(key PEM, certificate PEM) signed by `ca` with the given SANs; `expired`: valid until
    yesterday; `starts_in`: valid from that long from now (a clock ahead of this one). Every
    leaf has the KeyUsage a real SVID has (Envoy's SPIFFE validator refuses a leaf without one)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3 if expired else 0)
    now += starts_in + (datetime.timedelta(minutes=5) if starts_in else datetime.timedelta(0))
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    certificate = builder.sign(ca.key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)


def write_pair(directory: Path, name: str, pair: tuple[bytes, bytes]) -> tuple[Path, Path]:
    """Write (key, cert) as NAME.key / NAME.pem; returns (key path, cert path)."""
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    key_path.write_bytes(pair[0])
    key_path.chmod(0o600)
    cert_path.write_bytes(pair[1])
    return key_path, cert_path


def swap_directory(directory: Path, files: Mapping[str, bytes]) -> None:
    """Replace every file of `directory` at once, as the kubelet updates a Secret or projected
    volume: the files go into a new `..<time>` directory, the `..data` link is renamed onto it
    (the one event a watcher sees), and each top-level name links through `..data`."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    version = directory / f"..{time.time_ns()}"
    version.mkdir()
    for name, content in files.items():
        (version / name).write_bytes(content)
        if name.endswith(".key"):
            (version / name).chmod(0o600)
    for name in files:  # before the swap: a reader woken by it must find every name
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(Path("..data") / name)
    (directory / "..data_tmp").symlink_to(version.name)
    os.replace(directory / "..data_tmp", data)
    if old is not None:
        for stale in (directory / old).iterdir():
            stale.unlink()
        (directory / old).rmdir()
