"""The listener's TLS: client certificates required, their SPIFFE IDs under a prefix."""

from dataclasses import dataclass

from envoy_data_plane.envoy.config.core.v3 import (
    DataSource,
    TransportSocket,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    DownstreamTlsContext,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    TlsCertificate,
)
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
from envoy_data_plane.google.protobuf import Any as AnyMessage


@dataclass(frozen=True)
class TlsOptions:
    """A listener that requires client certificates from `ca` with a URI SAN under `san_prefix`."""

    ca: str = "/etc/graysteer/tls/ca.pem"
    cert: str = "/etc/graysteer/tls/server.pem"
    key: str = "/etc/graysteer/tls/server.key"
    san_prefix: str = "spiffe://example.org/"


def tls_socket(tls: TlsOptions) -> TransportSocket:
    context = DownstreamTlsContext(
        require_client_certificate=True,
        common_tls_context=CommonTlsContext(
            alpn_protocols=["h2", "http/1.1"],  # gRPC clients over TLS require h2 by ALPN
            tls_certificates=[
                TlsCertificate(
                    certificate_chain=DataSource(filename=tls.cert), private_key=DataSource(filename=tls.key)
                )
            ],
            validation_context=CertificateValidationContext(
                trusted_ca=DataSource(filename=tls.ca),
                match_typed_subject_alt_names=[
                    SubjectAltNameMatcher(
                        san_type=SubjectAltNameMatcherSanType.URI,
                        matcher=StringMatcher(prefix=tls.san_prefix),
                    )
                ],
            ),
        ),
    )
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=AnyMessage.pack(context))
