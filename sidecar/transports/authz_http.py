"""Envoy's ext_authz filter over plain HTTP/1.1 (`http_service`): the fast transport.

Envoy sends each check as an HTTP/1.1 request on a keep-alive connection from its pool:
the original method, `path_prefix` + the original path, Host, and the headers the filter
config allows (`allowed_headers`, `authorization_request.headers_to_add`), with
Content-Length: 0. This server parses it with `httptools` (the parser uvicorn uses) in an
asyncio Protocol on whatever loop runs (uvloop in production), decides synchronously
(`Decider.steer`), and answers:

- allowed: 200 with the steering's headers (routing, color, baggage), which Envoy copies to
  the request when `authorization_response.allowed_upstream_headers` lists them; the
  untrusted headers named in `x-envoy-auth-headers-to-remove` (Envoy removes them, OK answers
  only); the decision as `x-graysteer-decision-<field>` headers, which
  `authorization_response.dynamic_metadata_from_headers` turns into dynamic metadata under
  `envoy.filters.http.ext_authz`, e.g.
  `%DYNAMIC_METADATA(envoy.filters.http.ext_authz:x-graysteer-decision-rule)%`;
- denied: the deny rule's status and reason as the body; Envoy sends both to the client.

Never a 5xx for a decision: Envoy treats any 5xx as a failed check (failure_mode_allow or
status_on_error apply), so a deny rule with a 5xx status is answered 403 here, the rule's
status still in `x-graysteer-decision-deny-status`.

Assumptions the generated Envoy config must make true:
- `x-forwarded-client-cert` is Envoy's own: HCM `forward_client_cert_details: SANITIZE_SET`
  with `set_current_client_cert_details: {uri: true, dns: true, subject: true}`, and the
  header listed in `allowed_headers`. It is the connection's identity (no header: a
  plaintext connection). With any other XFCC mode a client could name its own identity.
- Envoy writes URI and DNS SANs into that header unquoted, so a SAN holding `;` can pass for
  more SANs (`URI=spiffe://a;DNS=b` is also a certificate with the URI SAN `spiffe://a;DNS=b`).
  `authorization_request.headers_to_add` therefore also sets `x-graysteer-peer-uri-sans` and
  `x-graysteer-peer-dns-sans` to Envoy's comma-joined SAN lists in brackets (never empty, so
  Envoy always overwrites a client's); the header's SANs count only when they agree, and a
  header that is not one element as Envoy writes it, or that disagrees, gives an mTLS
  connection without a name (MTLS_UNNAMED, counted `malformed_xfcc`).
- `x-graysteer-listener-port` comes from `authorization_request.headers_to_add` with the
  value `%DOWNSTREAM_LOCAL_PORT%` (Envoy overwrites any client value), and is NOT listed in
  `allowed_headers`.
- `path_prefix` is `/graysteer-check` (PATH_PREFIX); the health path (HEALTH_PATH) lies
  outside it, so no forwarded request can reach it.
- `authorization_response.allowed_client_headers` is set (e.g. to content-type): left empty,
  Envoy passes every header of a deny answer to the client, the decision headers included.
- The sidecar cluster's pool closes idle connections (`common_http_protocol_options.
  idle_timeout`, ENVOY_POOL_IDLE_TIMEOUT) well before this server does (Limits.idle_timeout):
  Envoy may send a check on a connection just as the server closes it, and that check
  fails (with failure_mode_allow the request then skips the sidecar).

Bounds: request head bytes and header count (431), body bytes (413), malformed HTTP (400,
then close), a deadline per request from its first byte and an idle deadline per
keep-alive connection, reading paused while a peer does not read its answers, and a cap on
connections below the process's file descriptor limit (`connection_cap`). A connection must
complete its first request within `request_timeout` of being accepted (Envoy sends its check
at once). At the cap a new connection takes the place of, in this order:
1. a connection that has not completed a request (silent, or a request half sent) and has
   nothing waiting in its socket, the oldest first: Envoy's own new connections send their
   check at once and are answered as it arrives, so these are someone else's;
2. a connection that has served requests and waits for the next one, the longest idle first
   (Envoy's pool opens another when it needs one);
3. one that has served requests but whose request under way has stalled for STALLED_SECONDS
   (Envoy writes a check in one go).
It is refused only when none of these exists. Envoy's circuit breaker for the sidecar cluster
(ENVOY_SIDECAR_CONNECTIONS, in every generated config) keeps Envoy's own connections under
the cap, so at the cap there is always someone else's to give up first; a cap under it is
logged at start.
"""

import asyncio
import logging
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import cast

import httptools

from sidecar.contract import (
    AUTHZ_HTTP_IDLE_SECONDS,
    CHECK_HEADER_HEADROOM,
    ENVOY_MAX_HEADERS,
    ENVOY_SIDECAR_CONNECTIONS,
    HEALTH_PATH,
    PATH_PREFIX,
)
from sidecar.core import Request, Steering
from sidecar.core.request import add_header
from sidecar.core.text import header_text
from sidecar.sockets import pending_bytes
from sidecar.table.decider import Decider
from sidecar.transports.answers import AnswerCache
from sidecar.transports.http_check import MTLS_UNNAMED, answer_bytes, check_request, plain_answer

log = logging.getLogger("graysteer.authz_http")


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 64 * 1024  # request line + header names and values, per request
    max_headers: int = ENVOY_MAX_HEADERS + CHECK_HEADER_HEADROOM
    max_body_bytes: int = 64 * 1024  # read and discarded
    request_timeout: float = 10.0  # from a request's first byte to its last
    idle_timeout: float = AUTHZ_HTTP_IDLE_SECONDS  # no request under way; Envoy's pool closes sooner
    answer_cache_bytes: int = 1 << 20
    max_cached_answer: int = 2048  # larger answers (long baggage) are built each time
    max_connections: int = 0  # 0: from the file descriptor limit (connection_cap)


# Descriptors left to everything but these connections: reloads (watching and reading the
# rules, the state file), etcd, the gRPC and operator endpoints, logs.
RESERVED_DESCRIPTORS = 128
# A request of a connection that has served before, under way this long, may be given up at
# the cap (after connections that never served and idle ones): Envoy writes a check at once.
STALLED_SECONDS = 1.0


def connection_cap(limits: Limits) -> int:
    """At most this many connections at once: `limits.max_connections`, else the soft
    RLIMIT_NOFILE less the descriptors open now and RESERVED_DESCRIPTORS, so that a flood of
    connections never leaves a reload without a descriptor."""
    if limits.max_connections > 0:
        return limits.max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc (not Linux): assume a typical start-up
        in_use = 64
    return max(1, soft - in_use - RESERVED_DESCRIPTORS)


_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}


# ---- the server ----------------------------------------------------------------------------------


class _Reject(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text


class AuthzHttpServer:
    """The listening socket, its connections, the answer cache and the deadline sweeper."""

    def __init__(
        self,
        decider: Decider,
        ready: Callable[[], bool],
        *,
        path_prefix: str = PATH_PREFIX,
        health_path: str = HEALTH_PATH,
        limits: Limits = Limits(),
    ) -> None:
        if path_prefix and health_path.startswith(path_prefix):
            raise ValueError(f"health path {health_path!r} lies under the check prefix {path_prefix!r}")
        self.decider, self.ready, self.limits = decider, ready, limits
        self.path_prefix = path_prefix
        self.health_target = health_path.encode()
        self.health_query = self.health_target + b"?"
        self.answers = AnswerCache(answer_bytes, limits.answer_cache_bytes, limits.max_cached_answer)
        self.connections: set[_Connection] = set()
        self.unserved: dict[_Connection, None] = {}  # no request completed yet, oldest first
        self.max_connections = connection_cap(limits)
        if self.max_connections <= ENVOY_SIDECAR_CONNECTIONS:
            log.warning(
                "authz HTTP: at most %d connections (the file descriptor limit), not above the "
                "%d of Envoy's circuit breaker for the sidecar cluster: at the cap Envoy's own "
                "connections may be given up; raise the open file limit (ulimit -n)",
                self.max_connections,
                ENVOY_SIDECAR_CONNECTIONS,
            )
        self.draining = False
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._logged: set[str] = set()

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_port=reuse_port or None
        )
        self._sweeper = loop.create_task(self._sweep())

    @property
    def host(self) -> str:
        assert self._server is not None
        return str(self._server.sockets[0].getsockname()[0])

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting; answer what is under way with `connection: close`, close idle
        connections now, abort what is left after `grace` seconds."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.drain()
        deadline = time.monotonic() + grace
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            await self._server.wait_closed()

    async def _sweep(self) -> None:
        interval = min(1.0, self.limits.request_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for connection in list(self.connections):
                if now > connection.deadline:
                    connection.abort()

    def admit(self, connection: "_Connection") -> bool:
        """Take `connection` in; at the cap, in the place of another (see the module's
        docstring for which), which is closed. False (refused) when none can be given up."""
        if len(self.connections) >= self.max_connections:
            victim = self._victim()
            if victim is None:
                self.log_once("cap", f"authz HTTP: {self.max_connections} connections busy: refused one")
                return False
            self.log_once("evict", f"authz HTTP: {self.max_connections} connections: closing others")
            self.forget(victim)
            if victim.served and not victim.in_message:
                victim.drain()  # idle: closed cleanly, Envoy's pool sees it go
            else:
                victim.abort()
        self.connections.add(connection)
        self.unserved[connection] = None
        return True

    def _victim(self) -> "_Connection | None":
        for connection in self.unserved:
            if not pending_bytes(connection.fileno()):
                return connection
        served = [c for c in self.connections if c.served and not c.closing]
        idle = [c for c in served if not c.in_message]
        if idle:
            return min(idle, key=lambda c: c.idle_since)
        stalled = time.monotonic() - STALLED_SECONDS
        late = [c for c in served if c.began < stalled]
        return min(late, key=lambda c: c.began) if late else None

    def forget(self, connection: "_Connection") -> None:
        self.connections.discard(connection)
        self.unserved.pop(connection, None)

    def steer(self, method: str, target: str, headers: dict[str, str]) -> Steering:
        # Read as a copy (a C call, no Python frame: this runs once per check); `request`
        # consumes it.
        return self.decider.steer_input("ext_authz_http", headers.copy, partial(self.request, method, target))

    def request(self, method: str, target: str, headers: dict[str, str]) -> Request:
        request = check_request(method, target, headers, self.path_prefix)
        if request.identity is MTLS_UNNAMED:
            self.decider.metrics.count_event("malformed_xfcc")
        return request

    def log_once(self, kind: str, message: str) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning("%s (later ones of this kind are not logged)", message)


class _Connection(asyncio.Protocol):
    """One keep-alive connection from Envoy. Parsing and deciding are synchronous, so the
    answers to pipelined requests are produced in order within one `data_received`."""

    def __init__(self, server: AuthzHttpServer) -> None:
        self.server = server
        self.limits = server.limits
        self.max_header_bytes, self.max_headers = self.limits.max_header_bytes, self.limits.max_headers
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.closing = False  # no more requests are read: close once the answers are written
        self.in_message = self.in_body = False
        self.served = 0  # requests completed
        self.idle_since = self.began = time.monotonic()
        # Until its first request is complete, a connection has request_timeout from its accept.
        self.deadline = self.idle_since + self.limits.request_timeout
        self.target = b""
        self.headers: dict[str, str] = {}
        self.head_bytes = self.raw_head_bytes = self.body_bytes = 0

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass
        if self.server.draining or not self.server.admit(self):
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.forget(self)

    def pause_writing(self) -> None:  # the peer is not reading its answers: stop reading requests
        assert self.transport is not None
        if not self.transport.is_closing():  # uvloop raises on a closed transport
            self.transport.pause_reading()
        self.deadline = time.monotonic() + self.limits.request_timeout

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.deadline = time.monotonic() + self.limits.idle_timeout
        if not self.closing and not self.transport.is_closing():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if not self.in_body:  # bytes of a head not yet complete, counted before httptools buffers them
            self.raw_head_bytes += len(data)
        try:
            self.parser.feed_data(data)
            if self.in_message and not self.in_body and self.raw_head_bytes > self.limits.max_header_bytes:
                raise _Reject(431, "request head too large")
        except _Reject as reject:
            self._reject(reject)
        except httptools.HttpParserUpgrade:
            self.closing = True  # answered already (CONNECT, Upgrade): nothing more is HTTP here
        except httptools.HttpParserError as error:
            cause = error.__context__
            if self.closing:
                pass
            elif isinstance(cause, _Reject):
                self._reject(cause)
            elif cause is not None:  # a bug here, not Envoy's: 5xx, so Envoy's failure mode applies
                log.error("authz HTTP: failed on a request", exc_info=cause)
                self._reject(_Reject(500, "internal error"))
            else:
                self._reject(_Reject(400, f"malformed request: {error}"))
        self._flush()

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.closing:  # a request pipelined after one we answer with connection: close
            raise _Reject(0, "")
        self.in_message = True
        self.began = time.monotonic()
        self.deadline = self.began + self.limits.request_timeout if self.served else self.deadline
        self.target = b""
        self.headers = {}
        self.head_bytes = self.body_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.target += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        # Once per header: the limits are read from plain attributes, add_header only for a repeat.
        size = self.head_bytes + len(name) + len(value) + 4  # ": " and CRLF
        self.head_bytes = size
        if size > self.max_header_bytes:
            raise _Reject(431, "request head too large")
        headers = self.headers
        if len(headers) >= self.max_headers:
            raise _Reject(431, "too many request headers")
        key, text = name.decode("latin-1").lower(), header_text(value)
        if key in headers:
            add_header(headers, key, text)
        else:
            headers[key] = text

    def on_headers_complete(self) -> None:
        self.in_body = True
        self.raw_head_bytes = 0

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > self.limits.max_body_bytes:
            raise _Reject(413, "request body too large")

    def on_message_complete(self) -> None:
        if not self.served:
            self.server.unserved.pop(self, None)
        self.served += 1
        self.in_message = self.in_body = False
        self.idle_since = time.monotonic()
        self.deadline = self.idle_since + self.limits.idle_timeout
        answer = self._answer()
        if not self.parser.should_keep_alive() or self.server.draining:
            answer = answer.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)
            self.closing = True
        self.out.append(answer)

    # the rest
    def _answer(self) -> bytes:
        server = self.server
        target = self.target
        if target == server.health_target or target.startswith(server.health_query):
            return plain_answer(200, "ready\n") if server.ready() else plain_answer(503, "not ready\n")
        raw_method = self.parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("latin-1")
        steering = server.steer(method, header_text(target), self.headers)
        if method == "HEAD" or steering.response_headers:  # a new key: an answer of its own
            return answer_bytes(steering, head_only=method == "HEAD")
        return server.answers.get(steering)

    def _count_head(self, size: int) -> None:
        self.head_bytes += size + 4  # ": " and CRLF
        if self.head_bytes > self.limits.max_header_bytes:
            raise _Reject(431, "request head too large")

    def _reject(self, reject: _Reject) -> None:
        self.server.log_once(str(reject.status), f"authz HTTP: answered {reject.status}: {reject.text}")
        self.out.append(plain_answer(reject.status, f"graysteer: {reject.text}\n", close=True))
        self.closing = True

    def _flush(self) -> None:
        assert self.transport is not None
        if self.transport.is_closing():  # closed or aborted already: nobody to answer
            self.out = []
            return
        if self.out:
            self.transport.write(self.out[0] if len(self.out) == 1 else b"".join(self.out))
            self.out = []
        if self.closing:
            self.transport.close()  # after the buffered answers are written

    def drain(self) -> None:
        """Close now when idle, else after answering the request under way."""
        if not self.in_message:
            self.closing = True
            self._flush()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def fileno(self) -> int:
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        return -1 if sock is None else int(sock.fileno())


async def start_authz_http(
    decider: Decider,
    host: str,
    port: int,
    ready: Callable[[], bool],
    *,
    path_prefix: str = PATH_PREFIX,
    health_path: str = HEALTH_PATH,
    limits: Limits = Limits(),
    reuse_port: bool = False,
) -> AuthzHttpServer:
    """Serve Envoy's HTTP ext_authz checks on host:port (port 0: any free port, see `.port`)
    on the running loop; with `reuse_port`, share the port with other processes that ask for
    it too (SO_REUSEPORT: the kernel spreads connections). Stop with `await server.close(grace)`."""
    server = AuthzHttpServer(decider, ready, path_prefix=path_prefix, health_path=health_path, limits=limits)
    await server.start(host, port, reuse_port)
    return server
