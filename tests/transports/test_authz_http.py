"""The HTTP ext_authz server through real sockets on loopback, against a real Decider."""

import asyncio
import contextlib
import os
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import httptools
import pytest
import uvloop
from prometheus_client import CollectorRegistry

from sidecar.contract import DECISION_HEADER_PREFIX
from sidecar.core import Decision
from sidecar.ops.metrics import Metrics
from sidecar.table.decider import Decider
from sidecar.table.holder import TableHolder
from sidecar.transports.authz_http import (
    RESERVED_DESCRIPTORS,
    AuthzHttpServer,
    Limits,
    connection_cap,
    start_authz_http,
)
from sidecar.transports.explain import Peer, headers_message
from sidecar.transports.ext_proc import ExtProcServicer
from tests.helpers import table_from_yaml

QA = "spiffe://example.org/ns/qa/sa/tester"
WEB = "spiffe://example.org/ns/prod/sa/web"
RULES = """
version: 1
clusters: [stable, canary]
default: stable
trust:
  identities: [{glob: "spiffe://example.org/ns/qa/*"}]
  override_headers: [x-canary]
  listener_ports: [15001]
coloring:
  lanes: {stable: stable, canary: canary}
rules:
  - name: no-admin
    match: {path: {prefix: /admin}}
    deny: {status: 451, reason: "no admin here"}
  - name: api-v2
    match: {path: {prefix: /api/v2}}
    route: canary
  - name: force-canary
    match: {headers: {x-canary: "1"}}
    route: canary
  - name: by-user
    split:
      key: [header:x-user-id]
      to: [{cluster: stable, weight: 50}, {cluster: canary, weight: 50}]
      when_key_missing: stable
"""
FAST = Limits(request_timeout=0.3, idle_timeout=5.0)
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


@pytest.fixture(params=[asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest) -> LoopFactory:
    """Every socket test runs on both loops: uvloop in production, asyncio's own elsewhere."""
    return request.param  # type: ignore[no-any-return]


def decider() -> Decider:
    return Decider(TableHolder(table_from_yaml(RULES)), Metrics(CollectorRegistry()))


def envoy_xfcc(uris: tuple[str, ...] = (), dns: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """What Envoy adds to a check for a client certificate with these SANs (--mtls)."""
    pairs = ["Hash=9ee752a4", 'Subject="O=Example,CN=client"', *(f"URI={u}" for u in uris or ("",))]
    pairs += [f"DNS={d}" for d in dns]
    return [
        ("x-forwarded-client-cert", ";".join(pairs)),
        ("x-graysteer-peer-uri-sans", f"[{','.join(uris)}]"),
        ("x-graysteer-peer-dns-sans", f"[{','.join(dns)}]"),
    ]


def check(path: str, *headers: tuple[str, str], method: str = "GET", port: int = 8080) -> bytes:
    """The check request Envoy sends for `path` (with its path_prefix) on listener `port`."""
    lines = [
        f"{method} /graysteer-check{path} HTTP/1.1",
        "host: shop.example",
        "content-length: 0",
        f"x-graysteer-listener-port: {port}",
        *(f"{k}: {v}" for k, v in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def decision(self) -> Decision:
        """The Decision back from the x-graysteer-decision-* headers."""
        fields: dict[str, object] = {
            k[len(DECISION_HEADER_PREFIX) :].replace("-", "_"): v
            for k, v in self.headers
            if k.startswith(DECISION_HEADER_PREFIX)
        }
        for number in ("bucket", "deny_status"):
            if number in fields:
                fields[number] = int(str(fields[number]))
        return Decision(**fields)  # type: ignore[arg-type]


@dataclass
class Client:
    """One connection; answers parsed with httptools' response parser."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    answers: list[Answer] = field(default_factory=list)
    closed: bool = False

    def __post_init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.current = Answer(0, [])

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name.decode().lower(), value.decode()))

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        self.current.status = self.parser.get_status_code()
        self.answers.append(self.current)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def receive(self, count: int, timeout: float = 5.0) -> list[Answer]:
        async with asyncio.timeout(timeout):
            while len(self.answers) < count and not self.closed:
                await self.read_some()
        taken, self.answers = self.answers[:count], self.answers[count:]
        return taken

    async def read_some(self) -> None:
        try:
            data = await self.reader.read(65536)
        except ConnectionResetError:  # the server aborts (RST) connections past their deadline
            data = b""
        if not data:
            self.closed = True
        else:
            self.parser.feed_data(data)

    async def wait_closed(self, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not self.closed:
                await self.read_some()

    async def ask(self, data: bytes) -> Answer:
        await self.send(data)
        (answer,) = await self.receive(1)
        return answer


def serve(
    loop: LoopFactory,
    test: Callable[[AuthzHttpServer, Callable[[], Awaitable[Client]]], Awaitable[None]],
    ready: Callable[[], bool] = lambda: True,
    limits: Limits = FAST,
    the_decider: Decider | None = None,
) -> None:
    async def run() -> None:
        server = await start_authz_http(the_decider or decider(), "127.0.0.1", 0, ready, limits=limits)
        clients: list[Client] = []

        async def connect() -> Client:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            clients.append(Client(reader, writer))
            return clients[-1]

        try:
            await test(server, connect)
        finally:
            for client in clients:
                client.writer.close()
            await server.close(grace=1.0)
            assert not server.connections

    with asyncio.Runner(loop_factory=loop) as runner:
        runner.run(run())


def test_keep_alive_answers_several_requests_on_one_connection(loop: LoopFactory) -> None:
    async def test(server: AuthzHttpServer, connect: Callable[[], Awaitable[Client]]) -> None:
        client = await connect()
        for _ in range(3):
            answer = await client.ask(check("/", ("x-user-id", "7")))
            assert answer.status == 200
            assert answer.header("connection") is None
            assert answer.header("x-route-cluster") in ("stable", "canary")
        assert not client.closed and len(server.connections) == 1

    serve(loop, test)


def test_pipelined_requests_are_answered_in_order(loop: LoopFactory) -> None:
    async def test(server: AuthzHttpServer, connect: Callable[[], Awaitable[Client]]) -> None:
        client = await connect()
        await client.send(check("/api/v2/x") + check("/admin") + check("/shop"))
        answers = await client.receive(3)
        assert [a.status for a in answers] == [200, 451, 200]
        assert [a.decision().rule for a in answers] == ["api-v2", "no-admin", "by-user"]
        assert answers[0].header("x-route-cluster") == "canary"
        assert answers[2].header("x-route-cluster") == "stable"

    serve(loop, test)


def test_malformed_request_gets_400_and_the_connection_closes(loop: LoopFactory) -> None:
    async def test(server: AuthzHttpServer, connect: Callable[[], Awaitable[Client]]) -> None:
        client = await connect()
        await client.send(b"GET /graysteer-check/ HTTP/1.1\r\nbad header line\r\n\r\n")
        (answer,) = await client.receive(1)
        assert answer.status == 400
        assert answer.header("connection") == "close"
        assert b"malformed request" in answer.body
        await client.wait_closed()

    serve(loop, test)


@pytest.mark.parametrize(
    "headers",
    [
        [("x-big", "a" * 70_000)],  # one header over the 64 KiB head
        # more than Envoy's listener accepts plus what Envoy adds to a check
        [(f"x-h{i}", "1") for i in range(Limits().max_headers)],
    ],
    ids=["bytes", "count"],
)
def test_oversized_request_head_gets_431(headers: list[tuple[str, str]], loop: LoopFactory) -> None:
    async def test(server: AuthzHttpServer, connect: Callable[[], Awaitable[Client]]) -> None:
        client = await connect()
        assert (await client.ask(check("/", *headers))).status == 431
        await client.wait_closed()

    serve(loop, test, limits=Limits())


def test_a_head_that_never_ends_is_cut_at_the_limit(loop: LoopFactory) -> None:
    async def test(server: AuthzHttpServer, connect: Callable[[], Awaitable[Client]]) -> None:
        client = await connect()
        await client.send(b"GET /graysteer-check/ HTTP/1.1\r\nx-endless: ")
        answers: list[Answer] = []
        for _ in range(20):  # 80 KiB of one header value, never finished
            await client.send(b"a" * 4096)
            if client.closed or answers:
                break
            with contextlib.suppress(TimeoutError):
                answers = await client.receive(1, timeout=0.01)
        answers = answers or await client.receive(1)
        assert answers[0].status == 431

    serve(loop, test, limits=Limits())


def test_request_body_is_discarded_and_bounded(loop: LoopFactory) -> None:
    async def test(server: AuthzHttpServer, connect: Callable[[], Awaitable[Client]]) -> None:
        client = await connect()
        small = check("/").replace(b"content-length: 0", b"content-length: 5") + b"hello"
        assert (await client.ask(small)).status == 200
        big = check("/").replace(b"content-length: 0", b"content-length: 100") + b"x" * 100
        answer = await client.ask(big)
        assert answer.status == 413
        await client.wait_closed()

    serve(loop, test, limits=replace(FAST, max_body_bytes=64))


def test_slow_clients_do_not_stall_others_and_are_cut_off(loop: LoopFactory) -> None:
    async def test(server: AuthzHttpServer, connect: Callable[[], Awaitable[Client]]) -> None:
        stalled, trickling, good = await connect(), await connect(), await connect()
        await stalled.send(b"GET /graysteer-check/ HTTP/1.1\r\nx-a: ")

        async def trickle() -> None:  # one byte every 50 ms: bytes keep coming, the request never ends
            await trickling.send(b"GET /graysteer-check/ HTTP/1.1\r\n")
            while not trickling.closed and not trickling.writer.transport.is_closing():
                try:
                    trickling.writer.write(b"x")
                except (ConnectionError, RuntimeError):  # cut off by the server: uvloop raises
                    return
                await asyncio.sleep(0.05)

        trickler = asyncio.create_task(trickle())
        for _ in range(5):
            assert (await good.ask(check("/api/v2/"))).status == 200
        await stalled.wait_closed(timeout=2.0)  # past request_timeout (0.3 s)
        await trickling.wait_closed(timeout=2.0)
        trickler.cancel()
        assert (await good.ask(check("/"))).status == 200  # the good connection lives on

    serve(loop, test)


def test_deny_rule_answers_its_status_and_reason(loop: LoopFactory) -> None:
    async def test(server: AuthzHttpServer, connect: Callable[[], Awaitable[Client]]) -> None:
        answer = await (await connect()).ask(check("/admin/users"))
        assert answer.status == 451
        assert answer.body == b"no admin here"
        assert answer.header("x-route-cluster") is None
        assert answer.decision().deny_status == 451

    serve(loop, test)


def test_untrusted_override_header_is_listed_for_removal(loop: LoopFactory) -> None:
    async def test(server: AuthzHttpServer, connect: Callable[[], Awaitable[Client]]) -> None:
        answer = await (await connect()).ask(check("/", ("x-canary", "1")))
        assert answer.status == 200
        assert answer.header("x-envoy-auth-headers-to-remove") == "x-canary"
        assert answer.header("x-route-cluster") == "stable"
        assert answer.decision().rule == "by-user"

    serve(loop, test)


def test_xfcc_identity_trusted_by_the_rules_has_its_override_honoured(loop: LoopFactory) -> None:
    async def test(server: AuthzHttpServer, connect: Callable[[], Awaitable[Client]]) -> None:
        client = await connect()
        trusted = await client.ask(check("/", *envoy_xfcc((QA,), ("qa.example.org",)), ("x-canary", "1")))
        assert trusted.header("x-route-cluster") == "canary"
        assert trusted.header("x-envoy-auth-headers-to-remove") is None
        assert trusted.decision().identity == QA
        other = await client.ask(check("/", *envoy_xfcc((WEB,)), ("x-canary", "1")))
        assert other.header("x-envoy-auth-headers-to-remove") == "x-canary"

    serve(loop, test)


# Certificates whose SANs hold XFCC's separators, as Envoy writes them: (XFCC, SAN headers).
def _hostile(uris: list[str], dns: list[str]) -> list[tuple[str, str]]:
    pairs = ["Hash=ab", 'Subject="CN=x"', *(f"URI={u}" for u in uris), *(f"DNS={d}" for d in dns)]
    return [
        ("x-forwarded-client-cert", ";".join(pairs)),
        ("x-graysteer-peer-uri-sans", f"[{','.join(uris)}]"),
        ("x-graysteer-peer-dns-sans", f"[{','.join(dns)}]"),
    ]


@pytest.mark.parametrize(
    "headers",
    [
        _hostile([f"spiffe://example.org/ns/prod/a,URI={QA}"], []),
        _hostile(["spiffe://example.org/ns/prod/b"], [f"b.example.org,URI={QA}"]),
        _hostile(["spiffe://example.org/ns/prod/c"], [f"c.example.org;URI={QA}"]),
        # Well-formed as XFCC (URI=QA;DNS=d.example.org) but the one URI SAN is `QA;DNS=...`:
        # only Envoy's own SAN lists tell.
        _hostile([f"{QA};DNS=d.example.org"], []),
        _hostile([QA, WEB], [f"e.example.org,URI={QA}"]),
        # a well-formed header without the SAN lists (an Envoy config from before them)
        envoy_xfcc((QA,))[:1],
        # SAN lists that disagree with the header
        [envoy_xfcc((QA,))[0], ("x-graysteer-peer-uri-sans", f"[{QA},{WEB}]"), envoy_xfcc((QA,))[2]],
        [*envoy_xfcc((QA,))[:2], ("x-graysteer-peer-dns-sans", "[a.example.org]")],
    ],
)
def test_xfcc_with_separators_in_a_san_is_mtls_without_a_name(
    loop: LoopFactory, headers: list[tuple[str, str]]
) -> None:
    the_decider = decider()

    async def test(server: AuthzHttpServer, connect: Callable[[], Awaitable[Client]]) -> None:
        answer = await (await connect()).ask(
            check("/", *headers, ("x-canary", "1"), ("x-graysteer-lane", "canary"))
        )
        assert answer.header("x-route-cluster") == "stable"
        assert answer.header("x-graysteer-lane") == "stable"
        assert answer.header("x-envoy-auth-headers-to-remove") == "x-canary"
        assert answer.decision().identity is None

    serve(loop, test, the_decider=the_decider)
    events = the_decider.metrics.registry.get_sample_value(
        "graysteer_steering_events_total", {"event": "malformed_xfcc"}
    )
    assert events == 1


@pytest.mark.parametrize(
    "port", ["\u0661\u0665\u0660\u0660\u0661", "\uff11\uff15\uff10\uff10\uff11", "15001\u0660"]
)
def test_listener_port_is_read_in_ascii_digits_only(loop: LoopFactory, port: str) -> None:
    # int() reads Arabic-Indic and full-width digits as 15001, a trusted listener here
    async def test(server: AuthzHttpServer, connect: Callable[[], Awaitable[Client]]) -> None:
        client = await connect()
        trusted = await client.ask(check("/", ("x-canary", "1"), port=15001))
        assert trusted.header("x-route-cluster") == "canary"
        request = check("/", ("x-canary", "1")).replace(
            b"listener-port: 8080", f"listener-port: {port}".encode()
        )
        answer = await client.ask(request)
        assert answer.header("x-route-cluster") == "stable"
        assert answer.header("x-envoy-auth-headers-to-remove") == "x-canary"

    serve(loop, test)


CAPPED = replace(FAST, max_connections=4, request_timeout=5.0)
PARTIAL = b"GET /graysteer-check/ HTTP/1.1\r\nhost: shop.example\r\n"  # a head not yet complete


def test_at_the_connection_cap_a_new_connection_takes_the_longest_idle_ones_place(
    loop: LoopFactory,
) -> None:
    async def test(server: AuthzHttpServer, connect: Callable[[], Awaitable[Client]]) -> None:
        clients = [await connect() for _ in range(4)]
        for client in clients:
            assert (await client.ask(check("/"))).status == 200
        newcomer = await connect()
        assert (await newcomer.ask(check("/"))).status == 200
        await clients[0].wait_closed()  # idle the longest
        for client in clients[1:]:
            assert (await client.ask(check("/"))).status == 200
        assert len(server.connections) == 4

    serve(loop, test, limits=CAPPED)


def test_a_connection_with_a_request_under_way_is_never_closed_for_another(loop: LoopFactory) -> None:
    async def test(server: AuthzHttpServer, connect: Callable[[], Awaitable[Client]]) -> None:
        busy = [await connect() for _ in range(4)]
        for client in busy:  # answered in the same read as the next request's first bytes
            await client.send(check("/") + PARTIAL)
            assert (await client.receive(1))[0].status == 200
        refused = await connect()
        await refused.wait_closed()
        assert refused.answers == []
        await busy[0].send(b"\r\n")  # one request completes: that connection is idle now
        assert (await busy[0].receive(1))[0].status == 200
        newcomer = await connect()
        assert (await newcomer.ask(check("/"))).status == 200
        await busy[0].wait_closed()
        await busy[1].send(b"\r\n")  # the others kept their requests
        assert (await busy[1].receive(1))[0].status == 200

    serve(loop, test, limits=CAPPED)


def test_at_the_cap_connections_that_never_served_go_before_envoys(loop: LoopFactory) -> None:
    """Envoy's pooled connections (they have served checks) stay while silent and half-sent
    connections arrive past the cap: those take each other's places, and a new connection of
    Envoy's is answered."""

    async def test(server: AuthzHttpServer, connect: Callable[[], Awaitable[Client]]) -> None:
        pooled = [await connect() for _ in range(2)]
        for client in pooled:
            assert (await client.ask(check("/"))).status == 200
        strangers = [await connect() for _ in range(6)]  # past the cap of 4
        for stranger in strangers[::2]:
            await stranger.send(PARTIAL)  # half-sent requests
        for _ in range(3):
            for client in pooled:
                assert (await client.ask(check("/"))).status == 200
            reconnect = await connect()  # a new connection of Envoy's, check sent at once
            assert (await reconnect.ask(check("/"))).status == 200
        assert len(server.connections) == 4 and all(c.served for c in server.connections)

    serve(loop, test, limits=CAPPED)


def test_the_cap_leaves_descriptors_for_everything_else() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    assert connection_cap(Limits()) <= soft - in_use - RESERVED_DESCRIPTORS + 2
    assert connection_cap(Limits(max_connections=7)) == 7


def test_health_path_follows_readiness(loop: LoopFactory) -> None:
    state = {"ready": True}

    async def test(server: AuthzHttpServer, connect: Callable[[], Awaitable[Client]]) -> None:
        client = await connect()
        health = b"GET /graysteer-health HTTP/1.1\r\nhost: sidecar\r\n\r\n"
        assert (await client.ask(health)).status == 200
        state["ready"] = False
        assert (await client.ask(health)).status == 503
        # Envoy prefixes every check: a client request to the health path is decided, not answered.
        forwarded = await client.ask(check("/graysteer-health"))
        assert forwarded.status == 200 and forwarded.decision().rule == "by-user"

    serve(loop, test, ready=lambda: state["ready"])


def test_path_prefix_is_stripped_before_matching_path_rules(loop: LoopFactory) -> None:
    async def test(server: AuthzHttpServer, connect: Callable[[], Awaitable[Client]]) -> None:
        answer = await (await connect()).ask(check("/api/v2/orders?id=1"))
        assert answer.decision().rule == "api-v2"
        assert answer.header("x-route-cluster") == "canary"

    serve(loop, test)


def test_close_drains_idle_keep_alive_connections(loop: LoopFactory) -> None:
    async def test(server: AuthzHttpServer, connect: Callable[[], Awaitable[Client]]) -> None:
        client = await connect()
        assert (await client.ask(check("/"))).status == 200
        await server.close(grace=1.0)
        await client.wait_closed(timeout=1.0)

    serve(loop, test)


PARITY_CASES: list[tuple[str, list[tuple[str, str]], Peer]] = [
    ("/", [], Peer()),
    ("/", [("x-user-id", "42")], Peer()),
    ("/", [("x-canary", "1")], Peer()),
    ("/", [("x-canary", "1")], Peer(listener_port=15001)),
    ("/", [("x-canary", "1")], Peer(uri_san=QA)),
    ("/", [("x-canary", "1")], Peer(uri_san=WEB)),
    ("/admin", [], Peer()),
    ("/api/v2/x?q=1", [("x-user-id", "7")], Peer()),
    ("/", [("x-graysteer-lane", "canary"), ("baggage", "graysteer.lane=canary,t=1")], Peer(uri_san=QA)),
    ("/", [("cookie", "a=1; uid=9")], Peer()),
]


def test_same_decisions_as_ext_proc(loop: LoopFactory) -> None:
    the_decider = decider()
    servicer = ExtProcServicer(the_decider)
    expected = [
        servicer.on_request_headers(headers_message("GET", path, headers, peer=peer))[1]
        for path, headers, peer in PARITY_CASES
    ]

    async def test(server: AuthzHttpServer, connect: Callable[[], Awaitable[Client]]) -> None:
        client = await connect()
        for (path, headers, peer), decision in zip(PARITY_CASES, expected, strict=True):
            extra = envoy_xfcc((peer.uri_san,)) if peer.uri_san else []
            request = check(path, *headers, *extra, port=peer.listener_port or 8080)
            assert (await client.ask(request)).decision() == decision, path

    serve(loop, test, the_decider=the_decider)
