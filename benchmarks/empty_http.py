"""Scenario (h0): the floor of the HTTP transport here. An asyncio Protocol with the httptools
parser on uvloop, the same server shape as graysteer's HTTP ext_authz server: it receives each
check's headers into a dict (as the gRPC floor receives its message) and answers one constant
200 carrying the routing header (the shape of graysteer's answer), the health path included;
it decides nothing, counts nothing.
Run: python -m benchmarks.empty_http PORT"""

import asyncio
import sys

import httptools

ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx-route-cluster: stable\r\n\r\n"


class Constant(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.headers: dict[str, str] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()
            return
        if self.out:
            self.transport.write(b"".join(self.out))
            self.out = []

    def on_message_begin(self) -> None:
        self.headers = {}

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("utf-8", "replace")

    def on_message_complete(self) -> None:
        self.out.append(ANSWER)


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Constant, "127.0.0.1", port)
    bound = server.sockets[0].getsockname()[1]
    print(f"HTTP ext_authz on 127.0.0.1:{bound}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    import uvloop  # the same event loop graysteer runs on by default

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
