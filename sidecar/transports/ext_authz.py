"""The Envoy ext_authz servicer (`envoy.service.auth.v3.Authorization/Check`).

The same steering as ext_proc, shaped for ext_authz: headers Envoy must add go in
OkHttpResponse.headers with `value` (ext_authz ignores `raw_value`), untrusted ones in
headers_to_remove, the decision in dynamic metadata (Envoy files it under the filter's
namespace, `envoy.filters.http.ext_authz`), and a deny rule becomes a denied response.

Identity: with `include_peer_certificate` Envoy forwards the client certificate as
URL-encoded PEM, and every SAN is read from it; otherwise `source.principal` (the first
URI SAN, else DNS SAN, else subject) is all there is.
"""

import logging
from typing import Any
from urllib.parse import unquote

from cryptography import x509
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from sidecar.core import NO_IDENTITY, Decision, Identity, Request, Steering, decision_fields
from sidecar.table.decider import Decider

log = logging.getLogger("graysteer.extauthz")

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD


def certificate_identity(pem: str) -> Identity | None:
    """Every URI and DNS SAN of a (URL-encoded) PEM certificate; None if unreadable. With
    more than one URI SAN the certificate is no X509-SVID: no SPIFFE identity, and its
    SPIFFE-like SANs count as malformed (`Identity.from_sans`)."""
    try:
        certificate = x509.load_pem_x509_certificate(unquote(pem).encode())
        try:
            sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            sans = x509.SubjectAlternativeName([])
        return Identity.from_sans(
            True,
            tuple(sans.get_values_for_type(x509.UniformResourceIdentifier)),
            tuple(sans.get_values_for_type(x509.DNSName)),
            certificate.subject.rfc4514_string(),
        )
    except ValueError:
        return None


def peer_identity(source: Any) -> tuple[Identity, bool]:
    """(identity, malformed certificate?) of the downstream peer of a CheckRequest. Without
    the certificate (`include_peer_certificate` off) only `principal`, the first URI SAN, is
    known: a certificate with several URI SANs cannot be told apart then."""
    if source.certificate:
        identity = certificate_identity(source.certificate)
        if identity is not None:
            return identity, False
    principal = source.principal
    if not principal:
        return NO_IDENTITY, bool(source.certificate)
    if "://" in principal:
        return Identity.from_sans(True, (principal,)), bool(source.certificate)
    if "=" in principal:  # a subject, not a SAN
        return Identity.from_sans(True, subject=principal), bool(source.certificate)
    return Identity.from_sans(True, dns_sans=(principal,)), bool(source.certificate)


def check_response(steering: Steering) -> authz.CheckResponse:
    decision = steering.decision
    metadata = decision_struct(decision)
    if decision.deny_status is not None:
        return authz.CheckResponse(
            status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED),
            denied_response=authz.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=decision.deny_status), body=decision.deny_reason or ""
            ),
            dynamic_metadata=metadata,
        )
    return authz.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=authz.OkHttpResponse(
            headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=k, value=v), append_action=_OVERWRITE
                )
                for k, v in steering.set_headers
            ],
            headers_to_remove=list(steering.remove_headers),
            # added to the client's response: an issued key's set-cookie, beside the backend's own
            response_headers_to_add=[
                base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v), append_action=_APPEND)
                for k, v in steering.response_headers
            ],
        ),
        dynamic_metadata=metadata,
    )


def decision_struct(decision: Decision) -> struct_pb2.Struct:
    metadata = struct_pb2.Struct()
    metadata.update(decision_fields(decision))
    return metadata


class AuthorizationServicer(authz_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, decider: Decider) -> None:
        self.decider = decider

    async def Check(self, request: authz.CheckRequest, context: Any) -> authz.CheckResponse:
        return self.check(request)[0]

    def check(self, request: authz.CheckRequest) -> tuple[authz.CheckResponse, Decision]:
        http = request.attributes.request.http
        steering = self.decider.steer_input(
            "ext_authz",
            lambda: {k.lower(): v for k, v in http.headers.items()},
            lambda headers: self.request(request, headers),
        )
        return check_response(steering), steering.decision

    def request(self, check: authz.CheckRequest, headers: dict[str, str]) -> Request:
        attributes = check.attributes
        http = attributes.request.http
        identity, malformed = peer_identity(attributes.source)
        if malformed:
            self.decider.metrics.count_event("malformed_certificate")
        port = attributes.destination.address.socket_address.port_value or None
        return Request(headers, http.method or "GET", http.path or "/", identity, port)
