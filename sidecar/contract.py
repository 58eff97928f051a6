"""The names Envoy and the sidecar share: what the generated Envoy configs (sidecar.envoyconf)
send and expect, and what the transports (sidecar.transports) read and answer. One place, so
that generating a config imports none of the serving stack and a name cannot drift between
the two sides."""

from sidecar.core.lua_table import LuaNames
from sidecar.core.xfcc import XFCC  # Envoy's own with SANITIZE_SET; the core parses it

__all__ = ["XFCC"]  # and every name below

# ---- ext_proc -----------------------------------------------------------------------------------

METADATA_NAMESPACE = "graysteer"  # the decision as dynamic metadata: %DYNAMIC_METADATA(graysteer:rule)%
ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"  # Envoy keys attributes so, whatever the filter's name
DENIED_DETAILS = "graysteer_denied"  # %RESPONSE_CODE_DETAILS% of a denied request
# What Envoy must send with each ext_proc request for identity and trust by listener.
REQUEST_ATTRIBUTES = (
    "connection.mtls",
    "connection.uri_san_peer_certificate",
    "connection.dns_san_peer_certificate",
    "connection.subject_peer_certificate",
    "destination.port",
)

# ---- ext_authz (gRPC and HTTP) ------------------------------------------------------------------

EXT_AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"  # where Envoy files ext_authz metadata

# ---- ext_authz over HTTP (the fast path) ----------------------------------------------------------

PATH_PREFIX = "/graysteer-check"  # authorization_request path_prefix
HEALTH_PATH = "/graysteer-health"  # outside PATH_PREFIX: no forwarded request reaches it
LISTENER_PORT_HEADER = "x-graysteer-listener-port"  # headers_to_add: %DOWNSTREAM_LOCAL_PORT%
# The client certificate's URI and DNS SANs as Envoy's formatter joins them (`,`), bracketed: an
# empty value would leave a client-sent header of the same name in place.
PEER_SAN_HEADERS = {
    "x-graysteer-peer-uri-sans": "[%DOWNSTREAM_PEER_URI_SAN%]",
    "x-graysteer-peer-dns-sans": "[%DOWNSTREAM_PEER_DNS_SAN%]",
}
HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"  # Envoy's name with the default header prefix
# Not "x-graysteer-": the default color header is x-graysteer-lane, and the decision has a lane.
DECISION_HEADER_PREFIX = "x-graysteer-decision-"  # dynamic_metadata_from_headers
# The client headers Envoy's listener accepts (HCM common_http_protocol_options.max_headers_count,
# Envoy's default; the generated configs set it). A check carries them and up to about ten of
# Envoy's own; the HTTP server accepts ENVOY_MAX_HEADERS + CHECK_HEADER_HEADROOM.
ENVOY_MAX_HEADERS = 100
CHECK_HEADER_HEADROOM = 32
# Envoy's pool of connections to the sidecar closes idle ones after this many seconds (the
# generated configs set it), well before the sidecar's HTTP server closes them itself
# (AUTHZ_HTTP_IDLE_SECONDS): a check sent on a connection the sidecar closes at that moment fails.
ENVOY_POOL_IDLE_TIMEOUT = 20.0
AUTHZ_HTTP_IDLE_SECONDS = 60.0
# Envoy's circuit breaker for the fast path's sidecar cluster (max_connections,
# max_pending_requests, max_requests; the generated configs set them): Envoy never holds more
# connections to the sidecar than this, so the HTTP server's cap (from its file descriptor
# limit, above this with `serve` raising the soft limit, and even at a shell's 1,024) always
# leaves room for connections that are not Envoy's, which are given up first. Far above what
# one sidecar answers within Envoy's check timeout.
ENVOY_SIDECAR_CONNECTIONS = 512

# ---- health ---------------------------------------------------------------------------------------

# The gRPC health service names Envoy's health checks (and operators) ask about.
HEALTH_SERVICES = ("", "envoy.service.ext_proc.v3.ExternalProcessor", "envoy.service.auth.v3.Authorization")

# ---- the decision inside Envoy (envoy-config --mode envoy_decides, serve --xds-listen) -----------

LUA_FILTER_NAME = "graysteer.decide"  # the ECDS resource: the Lua filter holding the table
LUA_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
UNDECIDED_KEY = "undecided"  # METADATA_NAMESPACE: true when the Lua leaves the request to the sidecar
XDS_CLUSTER = "graysteer_xds"  # the sidecar's ECDS endpoint (gRPC)
# The Lua files its decision where the fast path's answer does (ext_authz's namespace, keyed by
# the decision headers' names): one access log format and one set of trace tags for both.
LUA_NAMES = LuaNames(EXT_AUTHZ_NAMESPACE, DECISION_HEADER_PREFIX, METADATA_NAMESPACE, UNDECIDED_KEY)
