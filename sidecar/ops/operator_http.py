"""The operator HTTP endpoint (`serve --http-listen`, and the `--workers` supervisor's):
/metrics, /healthz, /readyz, the JSON views of `extra` (/rollouts, the live page's /ui/...)
and, with `ui`, the live page's static files (/ui/: package data, no build step, no CDN).

It runs on a thread of its own with its own asyncio loop, apart from the sidecar's, so that a
connection costs a descriptor, not a thread, while its request arrives. Slow clients cannot
hold the probes (Kubernetes restarts a pod whose /healthz does not answer):

- a connection must send its first byte (with TLS: finish its handshake and send one) within
  `Limits.first_byte_deadline`, a request must arrive whole within `request_deadline` of the
  connection, however its bytes are spread out (a total, not a timeout per read), and its
  answer be taken within `write_deadline`;
- /healthz and /readyz are answered on the loop itself (they read flags in memory), never
  waiting for a slot;
- at `max_connections`, a new connection takes the place of a silent one (nothing read from
  it and nothing waiting in its socket), the oldest first; only when none is silent, of the
  one that has waited longest for the rest of its request; only when every connection is
  being answered is it refused. A probe sends its request at once, so a flood of silent
  connections evicts its own, never the probes (whose bytes wait in the socket even before
  the loop, busy accepting a batch of connections, reads them);
- /metrics and the views, which take CPU, run in a small thread pool, `busy_slots` at once:
  beyond that they are answered 503 at once. OFREP's evaluations take all but one of them
  (429 beyond): a flood of applications' evaluations leaves /metrics scraped;
- a field a request carries once (SINGLETONS: Host, Authorization, ...) given twice is a 400.

POST is read only for `extra`'s answers (the page's explain form and rollout actions) and
OFREP's (`ofrep`, under /ofrep/): a body of at most `max_body_bytes`, with a Content-Length,
within the same request deadline; OFREP gets its own error answers (PARSE_ERROR for a body
it cannot read, 429 with Retry-After when busy).
Every answer carries headers that keep the page to itself: a Content-Security-Policy with
no source but this endpoint, no framing, no MIME sniffing, no caching.

With `tls` (a function giving the ssl.SSLContext for the next connection) it serves HTTPS:
each connection's handshake uses the context `tls()` gives as it is accepted, so a rotated
certificate or CA is used by new connections (sidecar.admin.security.HttpTls); a client
certificate the context verified reaches `extra` as `Request.peer_certificate` (the page's
actions are authenticated so).

A request whose Host names another site (DNS rebinding: a page of another origin made to
resolve here) is answered 421, the probes excepted (host_allowed).

One request per connection: answered, then closed.
"""

import asyncio
import concurrent.futures
import http
import importlib.resources
import ipaddress
import json
import logging
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import SupportsIndex, cast

import httptools
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from sidecar.ops.health import ReadinessView
from sidecar.sockets import pending_bytes

log = logging.getLogger("graysteer.http")

Headers = tuple[tuple[str, str], ...]
# status, body, content type (and headers of its own: an OFREP ETag)
Answer = tuple[int, bytes, str] | tuple[int, bytes, str, Headers]
OFREP_PREFIX = "/ofrep/"  # OpenFeature remote evaluation (`ofrep`): sidecar.ops.ofrep_http
PROBES = ("/healthz", "/readyz")
UI_PREFIX = "/ui/"
UI_FILES = {  # the live page's files (sidecar/ops/ui/), by name, with their content types
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# On every answer: the page may load only from here, be framed nowhere, and nothing is cached.
SAFETY_HEADERS = (
    (
        "content-security-policy",
        "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
)


@dataclass(frozen=True)
class Request:
    """One request as `extra` sees it."""

    method: str  # GET or POST
    path: str  # without the query
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""
    peer_certificate: bytes | None = None  # DER of a client certificate the TLS context verified
    secure: bool = False  # arrived over TLS


Extra = Callable[[Request], "tuple[int, object] | None"]
Handler = Callable[[Request], Answer]  # answers every request under a prefix, whole
TlsSource = Callable[[], ssl.SSLContext]  # the context for the next connection's handshake


@dataclass(frozen=True, slots=True)
class Limits:
    first_byte_deadline: float = 2.0  # from the connection to its first byte (and TLS handshake)
    request_deadline: float = 5.0  # from the connection to the end of the request head
    write_deadline: float = 5.0  # for the client to take the answer
    max_connections: int = 64  # open at once; within the descriptors the fast path leaves
    busy_slots: int = 4  # /metrics and views being built at once
    max_head_bytes: int = 16 * 1024
    max_body_bytes: int = 16 * 1024  # a POST's body (the explain form: headers and a path)


# Fields a request carries once (RFC 9110 5.3): given twice, which one a proxy in front read
# is unknown (a Host checked against DNS rebinding, a token), so the request is refused.
SINGLETONS = frozenset({"host", "authorization", "content-length", "content-type"})


class _Head:
    """httptools callbacks: the request target and headers (a list field given twice joined
    with commas, as RFC 9110 5.3 reads it; a SINGLETONS one given twice noted)."""

    def __init__(self) -> None:
        self.target = b""
        self.headers: dict[str, str] = {}
        self.repeated = False  # a SINGLETONS field given twice

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        if key in self.headers:
            self.repeated = self.repeated or key in SINGLETONS
            text = f"{self.headers[key]}, {text}"
        self.headers[key] = text


class _Reader(asyncio.StreamReader):
    """asyncio's stream reader, noting that bytes arrived before the connection's task reads
    them (a connection that has sent something is not silent)."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit, loop)
        self.heard = False

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        self.heard = True
        super().feed_data(data)


def _fileno(writer: asyncio.StreamWriter) -> int:
    sock = writer.get_extra_info("socket")
    return -1 if sock is None else int(sock.fileno())


def _oldest(writers: Iterable[asyncio.StreamWriter]) -> asyncio.StreamWriter | None:
    return next(iter(writers), None)


def _encode(answer: Answer) -> bytes:
    status, body, content_type = answer[:3]
    own: Headers = answer[3] if len(answer) > 3 else ()
    safety = "".join(f"{name}: {value}\r\n" for name, value in (*own, *SAFETY_HEADERS))
    head = (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\n{safety}connection: close\r\n\r\n"
    )
    return head.encode() + body


def _ui_files() -> dict[str, bytes]:
    """The live page's files, read once from the package."""
    folder = importlib.resources.files("sidecar.ops") / "ui"
    return {name: (folder / name).read_bytes() for name in UI_FILES}


def _text(status: int, text: str) -> Answer:
    return status, text.encode(), "text/plain; charset=utf-8"


def _json(status: int, document: object, indent: int | None = None) -> Answer:
    return status, json.dumps(document, indent=indent).encode() + b"\n", "application/json"


class OperatorHttpServer:
    """Serves from a daemon thread once constructed; `server_address` is the bound address,
    `shutdown()` stops it."""

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        readiness: ReadinessView,
        details: Callable[[], dict[str, object]],
        extra: Extra | None = None,
        limits: Limits = Limits(),
        ui: bool = False,
        tls: TlsSource | None = None,
        hosts: frozenset[str] = frozenset(),
        ofrep: Handler | None = None,
    ) -> None:
        self.registry, self.readiness, self.details, self.extra = registry, readiness, details, extra
        self.ofrep = ofrep
        self.hosts = frozenset(name.lower().rstrip(".") for name in hosts)
        self.limits = limits
        self.ui_files = _ui_files() if ui else {}
        self.tls = tls
        self.server_address: tuple[str, int] = address
        self.silent: dict[asyncio.StreamWriter, _Reader] = {}  # oldest first, until a first byte is read
        self.waiting: dict[asyncio.StreamWriter, None] = {}  # oldest first, while the rest arrives
        self.connections = 0
        self.busy = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(limits.busy_slots, "graysteer-http-work")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: OSError | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="graysteer-http")
        self._thread.daemon = True
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            loop, limit = self._loop, self.limits.max_head_bytes
            server = await loop.create_server(  # asyncio.start_server, with a reader that notes bytes
                lambda: asyncio.StreamReaderProtocol(_Reader(limit, loop), self._serve),
                *self.server_address,
                backlog=1024,  # a burst of connections waits in the kernel, not in SYN retries
            )
        except OSError as error:
            self._error = error
            self._started.set()
            return
        self.server_address = server.sockets[0].getsockname()[:2]
        self._started.set()
        await self._stop.wait()
        server.close()
        for writer in [*self.silent, *self.waiting]:
            writer.transport.abort()
        await server.wait_closed()

    def shutdown(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.limits.max_connections and not self._make_room():
            writer.write(_encode(_text(503, "busy: every connection is being answered\n")))
            writer.close()
            return
        self.connections += 1
        self.silent[writer] = cast(_Reader, reader)
        try:
            async with asyncio.timeout(self.limits.request_deadline):
                head = await self._read_head(reader, writer)
                request = self._parse(head, writer)
                if isinstance(request, Request) and request.method == "POST":
                    request = await self._read_body(request, reader)
            del self.waiting[writer]
            try:
                answer = request if isinstance(request, tuple) else await self._answer(request)
            except Exception:  # a bug in a view: answered, and logged
                log.exception("operator HTTP: failed on a request")
                answer = _text(500, "internal error\n")
            writer.write(_encode(answer))
            async with asyncio.timeout(self.limits.write_deadline):
                await writer.drain()
        except asyncio.LimitOverrunError:
            writer.write(_encode(_text(431, "request head too large\n")))
        except (TimeoutError, asyncio.IncompleteReadError, OSError):
            pass  # too slow, gone, or a failed handshake (ssl.SSLError): closed below
        finally:
            self.silent.pop(writer, None)
            self.waiting.pop(writer, None)
            self.connections -= 1
            writer.close()

    async def _read_head(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        """The request head; the connection moves from `silent` to `waiting` with its first byte."""
        async with asyncio.timeout(self.limits.first_byte_deadline):
            if self.tls is not None:  # the context of now: a rotated certificate is used at once
                if pending_bytes(_fileno(writer)):  # its ClientHello: a handshake is not silence
                    self.silent[writer].heard = True
                await self._start_tls(writer)
            first = await reader.readexactly(1)
        del self.silent[writer]
        self.waiting[writer] = None
        return first + await reader.readuntil(b"\r\n\r\n")

    async def _start_tls(self, writer: asyncio.StreamWriter) -> None:
        assert self.tls is not None
        raw = writer.transport
        try:
            await writer.start_tls(self.tls())
        except AttributeError:
            if cast(object, writer.transport) is not None:
                raise
            # Lost as its handshake ended: asyncio (3.11) then leaves the writer without a
            # transport and fails on it, as would the writer's __del__. Give it the closed one.
            setattr(writer, "_transport", raw)  # noqa: B010 (a private attribute, on purpose)
            raise ConnectionResetError("lost during the TLS handshake") from None

    def _make_room(self) -> bool:
        """Close a silent connection (the oldest with nothing waiting in its socket), else the
        one that has waited longest for the rest of its request, else the oldest silent one
        whose bytes wait unread; False when every connection is being answered."""
        victim = next(
            (w for w, r in self.silent.items() if not r.heard and not pending_bytes(_fileno(w))), None
        )
        if victim is None:
            victim = _oldest(self.waiting) or _oldest(self.silent)
        if victim is None:
            return False
        self.silent.pop(victim, None)
        self.waiting.pop(victim, None)
        victim.transport.abort()
        return True

    def _parse(self, head: bytes, writer: asyncio.StreamWriter) -> "Request | Answer":
        """The request of a head, or the answer that refuses it."""
        parsed = _Head()
        parser = httptools.HttpRequestParser(parsed)
        try:
            parser.feed_data(head)
        except httptools.HttpParserError:
            return _text(400, "malformed request\n")
        if parsed.repeated:
            return _text(400, f"malformed request: one of {', '.join(sorted(SINGLETONS))} given twice\n")
        method = parser.get_method().decode("latin-1")
        if method not in ("GET", "POST"):
            return _text(405, "only GET, and POST from the live page\n")
        tls = writer.get_extra_info("ssl_object")
        return Request(
            method,
            parsed.target.decode("latin-1").partition("?")[0],
            parsed.headers,
            peer_certificate=tls.getpeercert(binary_form=True) if tls is not None else None,
            secure=tls is not None,
        )

    async def _read_body(self, request: Request, reader: asyncio.StreamReader) -> "Request | Answer":
        length = request.headers.get("content-length", "")
        ofrep = self.ofrep is not None and request.path.startswith(OFREP_PREFIX)
        if "transfer-encoding" in request.headers or not length.isdigit():
            if ofrep:  # OFREP's answer to a body it cannot read
                return _json(
                    400, {"errorCode": "PARSE_ERROR", "errorDetails": "a POST needs a Content-Length"}
                )
            return _text(411, "a POST needs a Content-Length\n")
        if int(length) > self.limits.max_body_bytes:
            message = f"a body of at most {self.limits.max_body_bytes} bytes"
            if ofrep:
                return _json(400, {"errorCode": "PARSE_ERROR", "errorDetails": message})
            return _text(413, message + "\n")
        body = await reader.readexactly(int(length))
        return Request(
            request.method, request.path, request.headers, body, request.peer_certificate, request.secure
        )

    async def _answer(self, request: Request) -> Answer:
        path = request.path
        if path in PROBES:
            return self._probe(path) if request.method == "GET" else _text(405, "only GET\n")
        if not host_allowed(request.headers.get("host"), self.hosts):
            return _text(421, "this endpoint answers only to its address, localhost or a --http-host name\n")
        if self.ui_files and request.method == "GET" and path.startswith(UI_PREFIX):
            name = path[len(UI_PREFIX) :] or "index.html"
            if name in self.ui_files:
                return 200, self.ui_files[name], UI_FILES[name]
        ofrep = self.ofrep is not None and path.startswith(OFREP_PREFIX)
        # OFREP (applications, many) never takes the last slot: a flood of evaluations leaves
        # /metrics scraped and the views answered.
        slots = self.limits.busy_slots - (1 if ofrep and self.limits.busy_slots > 1 else 0)
        if self.busy >= slots:
            if ofrep:  # OFREP's way: the provider waits
                return (
                    429,
                    b'{"errorDetails": "busy: try again"}\n',
                    "application/json",
                    (("retry-after", "1"),),
                )
            return _text(503, "busy: try again\n")
        self.busy += 1
        try:
            assert self._loop is not None
            return await self._loop.run_in_executor(self._pool, self._view, request)
        finally:
            self.busy -= 1

    def _probe(self, path: str) -> Answer:
        if path == "/healthz":  # liveness: the process answers
            return _text(200, "ok\n")
        ready = self.readiness.ready
        return _json(
            200 if ready else 503, {"ready": ready, "reason": self.readiness.reason, **self.details()}
        )

    def _view(self, request: Request) -> Answer:
        if request.path == "/metrics" and request.method == "GET":
            return 200, generate_latest(self.registry), CONTENT_TYPE_LATEST
        if self.ofrep is not None and request.path.startswith(OFREP_PREFIX):
            return self.ofrep(request)
        if self.extra is not None and (answer := self.extra(request)) is not None:
            return _json(answer[0], answer[1], indent=1)
        if request.method != "GET":
            return _text(405, "only GET here\n")
        return _text(
            404,
            "not found: try /metrics, /healthz, /readyz, /rollouts"
            + (", /ui/" if self.ui_files else "")
            + "\n",
        )


def host_allowed(host: str | None, names: frozenset[str]) -> bool:
    """Whether a request's Host names this endpoint: an IP address (a browser sends one only
    for a page of that very address), localhost or a name under .localhost (always loopback),
    or one of `names` (serve --http-host). Any other name is a page of another site whose
    name was made to resolve here (DNS rebinding). The port is not compared: port
    forwarding (kubectl port-forward, docker -p) changes it, and a rebinding page chooses it."""
    if not host:
        return True  # no browser sends a request without one
    if host.startswith("["):
        name, sep, rest = host[1:].partition("]")
        if not sep or (rest and not (rest[0] == ":" and rest[1:].isascii() and rest[1:].isdecimal())):
            return False
    else:
        name, _, port = host.partition(":")
        if port and not (port.isascii() and port.isdecimal()):
            return False
    name = name.lower().rstrip(".")
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return name == "localhost" or name.endswith(".localhost") or name in names


def start_http(
    host: str,
    port: int,
    registry: CollectorRegistry,
    readiness: ReadinessView,
    details: Callable[[], dict[str, object]],
    extra: Extra | None = None,
    limits: Limits = Limits(),
    ui: bool = False,
    tls: TlsSource | None = None,
    hosts: frozenset[str] = frozenset(),
    ofrep: Handler | None = None,
) -> OperatorHttpServer:
    """Serve /metrics, /healthz and /readyz (whatever `extra` answers, as JSON, and with
    `ui` the live page's files) from a daemon thread; returns the server. OSError when the
    address cannot be bound. Requests other than the probes whose Host is none of this
    endpoint's (host_allowed, with `hosts`) are answered 421. With `ofrep`, it answers every
    request under OFREP_PREFIX (OpenFeature remote evaluation: sidecar.ops.ofrep_http)."""
    return OperatorHttpServer(
        (host, port), registry, readiness, details, extra, limits, ui, tls, hosts, ofrep
    )
