"""The sidecar's own TLS files (the admin API's, the etcd client's), read again when they
change, so a rotated certificate, key or CA needs no restart.

`TlsFiles.current()` is cheap enough for every handshake: it stats the files (following links,
so a Kubernetes Secret volume swapping its `..data` link is seen, as is a rename) and reads
them only when one changed. A change is taken only whole: every PEM parses, the key belongs to
the certificate, the certificate is valid now (neither expired nor not yet valid), with
`verify_chain` it chains to a CA of the bundle (the admin API's clients verify it with that
bundle, so a certificate from another CA, or a new CA that does not sign the certificate,
would lock every operator out), and no file changed while they were read (a rotation caught
half way, say a new certificate beside the old key, is looked at again at the next ask). A
change that does not load keeps the last good files: logged once for that state of the files
and counted (`graysteer_tls_reloads_total{use, outcome="refused"}`); the next change is tried
afresh, and a certificate refused as not yet valid is tried again once its time has come.
At start-up the files must load, or the error names the file.
"""

import datetime
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError
from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger("graysteer.tls")

LOADED, REFUSED = "loaded", "refused"


@dataclass(frozen=True)
class TlsPem:
    """What one consistent read of the files gave: the CA bundle, and the certificate chain and
    its private key when there is a certificate."""

    ca: bytes
    chain: bytes | None = None
    key: bytes | None = None


class TlsReloads:
    """`graysteer_tls_reloads_total`: changed TLS files, by use and outcome."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.counter = Counter(
            "graysteer_tls_reloads",
            "Changed TLS files read again, by use (admin, etcd) and outcome: loaded, or refused "
            "(the last good files stay in use).",
            ["use", "outcome"],
            registry=registry,
        )

    def count(self, use: str, outcome: str) -> None:
        self.counter.labels(use, outcome).inc()


def certificates(data: bytes, path: Path) -> list[x509.Certificate]:
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError:
        found = []
    if not found:
        raise ValueError(f"{path}: no PEM certificate")
    return found


class NotYetValid(ValueError):
    """A certificate whose validity starts at `start` (a clock behind the issuer's)."""

    def __init__(self, message: str, start: datetime.datetime) -> None:
        super().__init__(message)
        self.start = start


def utc_now() -> datetime.datetime:
    """The time certificates are checked against (one place, so tests can move it)."""
    return datetime.datetime.now(datetime.UTC)


def check_validity(leaf: x509.Certificate, path: Path, now: datetime.datetime) -> None:
    """ValueError (NotYetValid before its start) unless `leaf` is valid at `now`."""
    if now < leaf.not_valid_before_utc:
        raise NotYetValid(
            f"{path}: the certificate is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC",
            leaf.not_valid_before_utc,
        )
    if now > leaf.not_valid_after_utc:
        raise ValueError(
            f"{path}: the certificate expired at {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
        )


def check_chain(chain: list[x509.Certificate], cas: list[x509.Certificate], cert: Path, ca: Path) -> None:
    """ValueError unless the leaf of `chain` (its intermediates after it) chains to one of `cas`,
    each certificate of the path valid now: cryptography's path builder with the Web PKI's
    rules for CAs; the leaf's own extensions are left to the peer (it may serve and be a client)."""
    verifier = (
        PolicyBuilder()
        .store(Store(cas))
        .time(utc_now())
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all()
        )
        .build_client_verifier()
    )
    try:
        verifier.verify(chain[0], chain[1:])
    except VerificationError as error:
        raise ValueError(f"{cert}: the certificate does not chain to a CA in {ca} ({error})") from None


def read_pem(ca: Path, cert: Path | None, key: Path | None, verify_chain: bool = False) -> TlsPem:
    """The files, checked: OSError when one cannot be read, ValueError (naming the file) when
    one is no PEM of its kind, the key is not the certificate's, the certificate is not valid
    now (NotYetValid before its start) or, with `verify_chain`, does not chain to the CA bundle."""
    ca_pem = ca.read_bytes()
    cas = certificates(ca_pem, ca)
    if cert is None or key is None:
        return TlsPem(ca_pem)
    chain_pem, key_pem = cert.read_bytes(), key.read_bytes()
    chain = certificates(chain_pem, cert)
    leaf = chain[0]
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:  # TypeError: it is encrypted
        raise ValueError(f"{key}: no unencrypted PEM private key ({error})") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise ValueError(f"{key} is not the private key of the certificate in {cert}")
    check_validity(leaf, cert, utc_now())
    if verify_chain:
        check_chain(chain, cas, cert, ca)
    return TlsPem(ca_pem, chain_pem, key_pem)


Signature = tuple[tuple[int, int, int, int], ...]


def signature(paths: Sequence[Path]) -> Signature:
    """What changes when a file is replaced or rewritten (OSError when one is missing)."""
    found = []
    for path in paths:
        info = os.stat(path)  # follows links: a `..data` swap changes the inode seen here
        found.append((info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size))
    return tuple(found)


class TlsFiles:
    """A CA bundle, and optionally a certificate and its key, for `use` (admin, etcd); with
    `verify_chain` the certificate must chain to the bundle (the admin API: its clients verify
    the server with the CA that verifies them; etcd's CA is the server's, not this client's)."""

    def __init__(
        self,
        use: str,
        ca: Path,
        cert: Path | None = None,
        key: Path | None = None,
        reloads: TlsReloads | None = None,
        verify_chain: bool = False,
    ) -> None:
        if (cert is None) != (key is None):
            raise ValueError(f"{use} TLS: a certificate and its key go together")
        self.use = use
        self.paths = (ca, cert, key)
        self.reloads = reloads
        self.verify_chain = verify_chain
        self._lock = threading.Lock()  # the admin API asks from gRPC's own threads
        self._seen = signature(self._existing())
        self._pem = read_pem(ca, cert, key, verify_chain)
        self._refused: Signature | str | None = None  # the state last refused (logged once)
        self._retry_at: float | None = None  # when a refused state may load (not yet valid then)

    def _existing(self) -> list[Path]:
        return [p for p in self.paths if p is not None]

    def current(self) -> TlsPem:
        """The files' contents now if they changed and load, else the last good ones."""
        with self._lock:
            try:
                now = signature(self._existing())
            except OSError as error:  # a file removed: keep serving what was read
                self._refuse(f"{error.filename}: {error.strerror}", str(error.filename))
                return self._pem
            if now == self._seen or (now == self._refused and not self._retry_due()):
                return self._pem
            try:
                pem = read_pem(*self.paths, self.verify_chain)
                if signature(self._existing()) != now:
                    return self._pem  # changed while read: read again at the next ask
            except (OSError, ValueError) as error:
                reason = f"{error.filename}: {error.strerror}" if isinstance(error, OSError) else str(error)
                self._refuse(reason, now)
                self._retry_at = error.start.timestamp() if isinstance(error, NotYetValid) else None
                return self._pem
            self._pem, self._seen, self._refused, self._retry_at = pem, now, None, None
            log.info("%s TLS files changed: loaded, new connections use them", self.use)
            if self.reloads is not None:
                self.reloads.count(self.use, LOADED)
            return pem

    def _retry_due(self) -> bool:
        return self._retry_at is not None and utc_now().timestamp() >= self._retry_at

    def _refuse(self, reason: str, state: Signature | str) -> None:
        if state == self._refused:
            return
        self._refused = state
        log.error(
            "%s TLS files changed but cannot be used (%s): keeping the last good ones", self.use, reason
        )
        if self.reloads is not None:
            self.reloads.count(self.use, REFUSED)
