"""The sidecar's own TLS files (the admin API's, the etcd client's), read again when they
change, so a rotated certificate, key or CA needs no restart.

`TlsFiles.current()` is cheap enough for every handshake: it stats the files (following links,
so a Kubernetes Secret volume swapping its `..data` link is seen, as is a rename) and reads
them only when one changed. A change is taken only whole: every PEM parses, the key belongs to
the certificate, and no file changed while they were read (a rotation caught half way, say a
new certificate beside the old key, is looked at again at the next ask). A change that does not
load keeps the last good files: logged once for that state of the files and counted
(`graysteer_tls_reloads_total{use, outcome="refused"}`); the next change is tried afresh.
At start-up the files must load, or the error names the file.
"""

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
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


def read_pem(ca: Path, cert: Path | None, key: Path | None) -> TlsPem:
    """The files, checked: OSError when one cannot be read, ValueError (naming the file) when
    one is no PEM of its kind or the key is not the certificate's."""
    ca_pem = ca.read_bytes()
    certificates(ca_pem, ca)
    if cert is None or key is None:
        return TlsPem(ca_pem)
    chain, key_pem = cert.read_bytes(), key.read_bytes()
    leaf = certificates(chain, cert)[0]
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:  # TypeError: it is encrypted
        raise ValueError(f"{key}: no unencrypted PEM private key ({error})") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise ValueError(f"{key} is not the private key of the certificate in {cert}")
    return TlsPem(ca_pem, chain, key_pem)


Signature = tuple[tuple[int, int, int, int], ...]


def signature(paths: Sequence[Path]) -> Signature:
    """What changes when a file is replaced or rewritten (OSError when one is missing)."""
    found = []
    for path in paths:
        info = os.stat(path)  # follows links: a `..data` swap changes the inode seen here
        found.append((info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size))
    return tuple(found)


class TlsFiles:
    """A CA bundle, and optionally a certificate and its key, for `use` (admin, etcd)."""

    def __init__(
        self,
        use: str,
        ca: Path,
        cert: Path | None = None,
        key: Path | None = None,
        reloads: TlsReloads | None = None,
    ) -> None:
        if (cert is None) != (key is None):
            raise ValueError(f"{use} TLS: a certificate and its key go together")
        self.use = use
        self.paths = (ca, cert, key)
        self.reloads = reloads
        self._lock = threading.Lock()  # the admin API asks from gRPC's own threads
        self._seen = signature(self._existing())
        self._pem = read_pem(ca, cert, key)
        self._refused: Signature | str | None = None  # the state last refused (logged once)

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
            if now in (self._seen, self._refused):
                return self._pem
            try:
                pem = read_pem(*self.paths)
                if signature(self._existing()) != now:
                    return self._pem  # changed while read: read again at the next ask
            except (OSError, ValueError) as error:
                reason = f"{error.filename}: {error.strerror}" if isinstance(error, OSError) else str(error)
                self._refuse(reason, now)
                return self._pem
            self._pem, self._seen, self._refused = pem, now, None
            log.info("%s TLS files changed: loaded, new connections use them", self.use)
            if self.reloads is not None:
                self.reloads.count(self.use, LOADED)
            return pem

    def _refuse(self, reason: str, state: Signature | str) -> None:
        if state == self._refused:
            return
        self._refused = state
        log.error(
            "%s TLS files changed but cannot be used (%s): keeping the last good ones", self.use, reason
        )
        if self.reloads is not None:
            self.reloads.count(self.use, REFUSED)
