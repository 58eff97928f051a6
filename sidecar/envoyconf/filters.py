"""The HTTP filters that call the sidecar: ext_proc, ext_authz over gRPC, ext_authz over HTTP."""

from datetime import timedelta

from envoy_data_plane.envoy.config.core.v3 import (
    ApiVersion,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HttpUri,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import (
    AuthorizationRequest,
    AuthorizationResponse,
    ExtAuthz,
    HttpService,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ExternalProcessor,
    MetadataOptions,
    MetadataOptionsMetadataNamespaces,
    ProcessingMode,
    ProcessingModeBodySendMode,
    ProcessingModeHeaderSendMode,
)
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpFilter,
)
from envoy_data_plane.envoy.type.matcher.v3 import (
    ListStringMatcher,
    MetadataMatcher,
    RegexMatcher,
    StringMatcher,
)
from envoy_data_plane.google.protobuf import Any as AnyMessage

from sidecar.contract import (
    DECISION_HEADER_PREFIX,
    LISTENER_PORT_HEADER,
    METADATA_NAMESPACE,
    PATH_PREFIX,
    PEER_SAN_HEADERS,
    REQUEST_ATTRIBUTES,
)
from sidecar.core import Table
from sidecar.core.steering import steered_headers
from sidecar.envoyconf.clusters import SIDECAR_CLUSTER


def processing_mode(response_headers: ProcessingModeHeaderSendMode) -> ProcessingMode:
    """Request headers only, and the response headers as given."""
    return ProcessingMode(
        request_header_mode=ProcessingModeHeaderSendMode.SEND,
        response_header_mode=response_headers,
        request_body_mode=ProcessingModeBodySendMode.NONE,
        response_body_mode=ProcessingModeBodySendMode.NONE,
        request_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
        response_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
    )


def cookie_mode() -> ProcessingMode:
    """The mode a request issued a key asks for (sidecar.transports.ext_proc.RESPONSE_HEADERS_MODE)."""
    return processing_mode(ProcessingModeHeaderSendMode.SEND)


def ext_proc_filter(message_timeout_ms: int) -> HttpFilter:
    processor = ExternalProcessor(
        grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=SIDECAR_CLUSTER)),
        failure_mode_allow=True,
        message_timeout=timedelta(milliseconds=message_timeout_ms),
        processing_mode=processing_mode(ProcessingModeHeaderSendMode.SKIP),
        metadata_options=MetadataOptions(
            receiving_namespaces=MetadataOptionsMetadataNamespaces(untyped=[METADATA_NAMESPACE])
        ),
        request_attributes=list(REQUEST_ATTRIBUTES),
        # a request issued a new key asks for its response headers, to set the cookie; no other mode
        allow_mode_override=True,
        allowed_override_modes=[cookie_mode()],
    )
    return HttpFilter(name="envoy.filters.http.ext_proc", typed_config=AnyMessage.pack(processor))


def ext_authz_filter(timeout_ms: int, mtls: bool) -> HttpFilter:
    authz = ExtAuthz(
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=SIDECAR_CLUSTER),
            timeout=timedelta(milliseconds=timeout_ms),
        ),
        transport_api_version=ApiVersion.V3,
        failure_mode_allow=True,
        clear_route_cache=True,  # re-route on the header the sidecar sets
        include_peer_certificate=mtls,
    )  # every SAN, not only the first
    return HttpFilter(name="envoy.filters.http.ext_authz", typed_config=AnyMessage.pack(authz))


def ext_authz_http_filter(
    table: Table, timeout_ms: int, mtls: bool = False, enabled_by: MetadataMatcher | None = None
) -> HttpFilter:
    """ext_authz over plain HTTP/1.1 (sidecar.transports.authz_http): the check carries every request
    header (XFCC is Envoy's own with --mtls, with the certificate's SAN lists beside it to
    confirm it) and the listener port, set by Envoy; a 200's
    steered headers are copied to the request, its `x-envoy-auth-headers-to-remove` are
    removed, its decision headers become dynamic metadata; a deny answer reaches the client
    with its status, body and content-type only. With `enabled_by`, it runs only for the
    requests whose dynamic metadata matches (envoy_decides: those the Lua left undecided)."""

    def exact(*names: str) -> ListStringMatcher:
        return ListStringMatcher(patterns=[StringMatcher(exact=name) for name in names])

    authz = ExtAuthz(
        http_service=HttpService(
            server_uri=HttpUri(
                uri=f"http://{SIDECAR_CLUSTER}",
                cluster=SIDECAR_CLUSTER,
                timeout=timedelta(milliseconds=timeout_ms),
            ),
            path_prefix=PATH_PREFIX,
            authorization_request=AuthorizationRequest(
                headers_to_add=[
                    HeaderValue(key=LISTENER_PORT_HEADER, value="%DOWNSTREAM_LOCAL_PORT%"),
                    *(HeaderValue(key=k, value=v) for k, v in PEER_SAN_HEADERS.items() if mtls),
                ]
            ),
            authorization_response=AuthorizationResponse(
                allowed_upstream_headers=exact(*steered_headers(table)),
                allowed_client_headers=exact("content-type"),
                # an issued key's cookie reaches the client on success (sidecar.core.cookies)
                allowed_client_headers_on_success=exact("set-cookie"),
                dynamic_metadata_from_headers=ListStringMatcher(
                    patterns=[StringMatcher(prefix=DECISION_HEADER_PREFIX)]
                ),
            ),
        ),
        allowed_headers=ListStringMatcher(patterns=[StringMatcher(safe_regex=RegexMatcher(regex=".*"))]),
        failure_mode_allow=True,
        clear_route_cache=True,  # re-route on the header the sidecar sets
        filter_enabled_metadata=enabled_by,
    )
    return HttpFilter(name="envoy.filters.http.ext_authz", typed_config=AnyMessage.pack(authz))
