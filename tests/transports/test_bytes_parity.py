"""Header bytes that are not UTF-8 are decided alike in every mode: ext_proc receives them raw,
the HTTP fast path parses them with httptools, and Envoy hands ext_authz over gRPC a string
with `!` for each such byte. All three read `!`, so a user's bucket does not depend on the mode,
and none of them lets a lone surrogate reach mmh3."""

import random
from collections.abc import Awaitable, Callable

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as authz
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from sidecar.core.text import header_text
from sidecar.transports.authz_http import AuthzHttpServer
from sidecar.transports.ext_authz import AuthorizationServicer
from sidecar.transports.ext_proc import ExtProcServicer
from tests.transports.test_authz_http import Client, LoopFactory, decider, loop, serve

__all__ = ["loop"]  # the fixture, every socket test on both event loops

TRICKY = [b"\xed\xa0\x80", b"\xff", b"\xe2\x82", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\xef\xbf\xbd", b"!"]


def keys(count: int) -> list[bytes]:
    """User ids with invalid UTF-8 in them: surrogates, cut sequences, overlongs, stray bytes."""
    chance = random.Random(30)
    found = [b"u" + t + b"x" for t in TRICKY]
    while len(found) < count:
        parts = [
            chance.choice([*TRICKY, b"a", b"7", "\u00e9".encode(), bytes([chance.randrange(0x80, 0x100)])])
        ]
        found.append(b"".join(parts * chance.randrange(1, 4)) + str(len(found)).encode())
    return found


def ext_proc_bucket(key: bytes) -> int | None:
    servicer = ExtProcServicer(decider())
    headers = base_pb2.HeaderMap(
        headers=[
            base_pb2.HeaderValue(key=":method", raw_value=b"GET"),
            base_pb2.HeaderValue(key=":path", raw_value=b"/"),
            base_pb2.HeaderValue(key="x-user-id", raw_value=key),
        ]
    )
    _, decision = servicer.on_request_headers(
        ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=headers))
    )
    return decision.bucket


def ext_authz_bucket(key: bytes) -> int | None:
    """As Envoy sends it: the value sanitized to UTF-8 with `!` (service_sanitize_non_utf8_strings)."""
    request = authz.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = "GET", "/"
    http.headers["x-user-id"] = header_text(key)
    _, decision = AuthorizationServicer(decider()).check(request)
    return decision.bucket


def test_every_mode_buckets_invalid_utf8_alike(loop: LoopFactory) -> None:
    users = keys(120)
    wanted = [ext_proc_bucket(key) for key in users]
    assert wanted == [ext_authz_bucket(key) for key in users]
    assert len(set(wanted)) > 20  # real buckets, not one fallback

    async def test(server: AuthzHttpServer, connect: Callable[[], Awaitable[Client]]) -> None:
        client = await connect()
        for key, bucket in zip(users, wanted, strict=True):
            head = b"GET /graysteer-check/ HTTP/1.1\r\nhost: s\r\ncontent-length: 0\r\nx-user-id: " + key
            answer = await client.ask(head + b"\r\n\r\n")
            assert answer.status == 200 and answer.decision().bucket == bucket, key

    serve(loop, test)
