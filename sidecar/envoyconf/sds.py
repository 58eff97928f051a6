"""Where Envoy's listener certificates come from when they rotate (`envoy-config --sds`),
and the names both sides agree on. No Envoy API import: the command line reads these.

- `file:DIR` -> FileSds: Envoy's file-based SDS on a watched directory. DIR holds the two SDS
  resource files (cert.yaml, ca.yaml: envoyconf.tls.sds_files) and the PEMs they name, with a
  kubernetes.io/tls Secret's names (tls.crt, tls.key, ca.crt). A rename in DIR (a Kubernetes
  Secret or projected volume swapping its `..data` link, or an `mv`) makes Envoy read both
  secrets again, so certificate, key and CA change together; a file written in place is not
  seen.
- `spire:unix:///PATH` -> SpireSds: the SPIRE agent's SDS API on a unix socket, with the
  secret names SPIRE serves by default: `default` (this workload's X509-SVID) and `ROOTCA`
  (its trust domain's bundle, sent for Envoy's SPIFFE certificate validator).
"""

from dataclasses import dataclass
from pathlib import PurePosixPath

CERT_SDS_FILE = "cert.yaml"
CA_SDS_FILE = "ca.yaml"
CERT_FILE, KEY_FILE, CA_FILE = "tls.crt", "tls.key", "ca.crt"
SERVER_SECRET = "server_cert"
TRUST_SECRET = "trusted_ca"

SPIRE_SVID_SECRET = "default"  # the SPIRE agent's `default_svid_name`
SPIRE_BUNDLE_SECRET = "ROOTCA"  # its `default_bundle_name`


@dataclass(frozen=True)
class FileSds:
    """Certificates from a watched directory (an absolute path)."""

    directory: str

    def path(self, name: str) -> str:
        return str(PurePosixPath(self.directory) / name)


@dataclass(frozen=True)
class SpireSds:
    """Certificates from a SPIRE agent's SDS API on a unix socket (an absolute path)."""

    socket: str


Sds = FileSds | SpireSds


def parse_sds(text: str) -> Sds:
    """`file:DIR` or `spire:unix:///PATH`, both absolute; ValueError naming the forms."""
    forms = "expected file:/ABSOLUTE/DIR or spire:unix:///ABSOLUTE/PATH"
    if text.startswith("file:"):
        directory = text.removeprefix("file:")
        if not directory.startswith("/") or directory.startswith("//"):
            raise ValueError(f"{forms}, got {text!r}: the directory must be an absolute path")
        return FileSds(directory.rstrip("/") or "/")
    if text.startswith("spire:"):
        socket = text.removeprefix("spire:")
        if not socket.startswith("unix:///") or socket.endswith("/"):
            raise ValueError(f"{forms}, got {text!r}: the SPIRE agent listens on a unix socket")
        return SpireSds(socket.removeprefix("unix://"))
    raise ValueError(f"{forms}, got {text!r}")
