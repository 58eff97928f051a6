"""The listener's TLS: client certificates required, their SPIFFE IDs under a prefix.

From static files (read once: a rotated certificate needs a restart) or by SDS (envoyconf.sds:
a watched directory or the SPIRE agent), where they rotate without one. With SDS the SAN
matcher stays in the bootstrap and only the CA (SPIRE: the trust bundle) comes by SDS; each
form needs a node in the bootstrap (generate.py adds one); and the listener stays unbound
until the first secrets arrive (`initial_fetch_timeout: 0s`) rather than going live without
a certificate and refusing every handshake.
"""

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from betterproto2 import Casing
from envoy_data_plane.envoy.config.core.v3 import (
    ApiConfigSource,
    ApiConfigSourceApiType,
    ApiVersion,
    ConfigSource,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    PathConfigSource,
    TransportSocket,
    WatchedDirectory,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    CommonTlsContextCombinedCertificateValidationContext,
    DownstreamTlsContext,
    SdsSecretConfig,
    Secret,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    TlsCertificate,
)
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
from envoy_data_plane.google.protobuf import Any as AnyMessage

from sidecar.envoyconf.clusters import SPIRE_AGENT_CLUSTER
from sidecar.envoyconf.sds import (
    CA_FILE,
    CA_SDS_FILE,
    CERT_FILE,
    CERT_SDS_FILE,
    KEY_FILE,
    SERVER_SECRET,
    SPIRE_BUNDLE_SECRET,
    SPIRE_SVID_SECRET,
    TRUST_SECRET,
    FileSds,
    Sds,
)


@dataclass(frozen=True)
class TlsOptions:
    """A listener that requires client certificates with a URI SAN under `san_prefix`, from
    `ca` (static files: `ca`, `cert`, `key`), or from what `sds` delivers."""

    ca: str = "/etc/graysteer/tls/ca.pem"
    cert: str = "/etc/graysteer/tls/server.pem"
    key: str = "/etc/graysteer/tls/server.key"
    san_prefix: str = "spiffe://example.org/"
    sds: Sds | None = None


def san_matchers(tls: TlsOptions) -> list[SubjectAltNameMatcher]:
    return [
        SubjectAltNameMatcher(
            san_type=SubjectAltNameMatcherSanType.URI, matcher=StringMatcher(prefix=tls.san_prefix)
        )
    ]


def tls_socket(tls: TlsOptions) -> TransportSocket:
    common = CommonTlsContext(alpn_protocols=["h2", "http/1.1"])  # gRPC clients over TLS require h2
    if tls.sds is None:
        common.tls_certificates = [
            TlsCertificate(
                certificate_chain=DataSource(filename=tls.cert), private_key=DataSource(filename=tls.key)
            )
        ]
        common.validation_context = CertificateValidationContext(
            trusted_ca=DataSource(filename=tls.ca), match_typed_subject_alt_names=san_matchers(tls)
        )
    else:
        certificate, trust = secret_configs(tls.sds)
        common.tls_certificate_sds_secret_configs = [certificate]
        # The SAN matcher stays in the bootstrap; only the CA (or SPIRE's bundle) comes by SDS.
        common.combined_validation_context = CommonTlsContextCombinedCertificateValidationContext(
            default_validation_context=CertificateValidationContext(
                match_typed_subject_alt_names=san_matchers(tls)
            ),
            validation_context_sds_secret_config=trust,
        )
    context = DownstreamTlsContext(require_client_certificate=True, common_tls_context=common)
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=AnyMessage.pack(context))


def secret_configs(sds: Sds) -> tuple[SdsSecretConfig, SdsSecretConfig]:
    """(the server certificate's, the trusted CA's) SDS secret configs."""
    wait_for_first = timedelta(0)  # listen only once the secrets are there
    if isinstance(sds, FileSds):

        def watched(name: str) -> ConfigSource:
            return ConfigSource(
                path_config_source=PathConfigSource(
                    path=sds.path(name), watched_directory=WatchedDirectory(path=sds.directory)
                ),
                initial_fetch_timeout=wait_for_first,
                resource_api_version=ApiVersion.V3,
            )

        return (
            SdsSecretConfig(name=SERVER_SECRET, sds_config=watched(CERT_SDS_FILE)),
            SdsSecretConfig(name=TRUST_SECRET, sds_config=watched(CA_SDS_FILE)),
        )
    agent = ConfigSource(
        api_config_source=ApiConfigSource(
            api_type=ApiConfigSourceApiType.GRPC,
            transport_api_version=ApiVersion.V3,
            grpc_services=[GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=SPIRE_AGENT_CLUSTER))],
        ),
        initial_fetch_timeout=wait_for_first,
        resource_api_version=ApiVersion.V3,
    )
    return (
        SdsSecretConfig(name=SPIRE_SVID_SECRET, sds_config=agent),
        SdsSecretConfig(name=SPIRE_BUNDLE_SECRET, sds_config=agent),
    )


def sds_files(sds: FileSds) -> dict[str, dict[str, Any]]:
    """The SDS resource files Envoy reads from `sds.directory` (file name -> document): each
    names its PEMs in the same directory, so one swap of the directory changes them all."""
    certificate = Secret(
        name=SERVER_SECRET,
        tls_certificate=TlsCertificate(
            certificate_chain=DataSource(filename=sds.path(CERT_FILE)),
            private_key=DataSource(filename=sds.path(KEY_FILE)),
        ),
    )
    trust = Secret(
        name=TRUST_SECRET,
        validation_context=CertificateValidationContext(trusted_ca=DataSource(filename=sds.path(CA_FILE))),
    )
    return {
        name: {"resources": [AnyMessage.pack(secret).to_dict(casing=Casing.SNAKE)]}
        for name, secret in ((CERT_SDS_FILE, certificate), (CA_SDS_FILE, trust))
    }
