"""The admin interceptor checks every kind of call before its method runs: unary and
streaming either way, async generators and methods that write with context.write; a handler
of a kind it does not know is refused. An in-process grpc.aio server with the interceptor
and a service with one method of each kind (the admin service has only two of them)."""

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from sidecar.admin.security import AdminAuth, AdminAuthInterceptor

TOKEN = "s3cret"
SERVICE = "test.Kinds"


def kinds_service(ran: list[str]) -> grpc.GenericRpcHandler:
    """One method of each kind, echoing bytes; each records in `ran` that it ran."""

    async def unary_unary(request: bytes, context: Any) -> bytes:
        ran.append("UnaryUnary")
        return request

    async def unary_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        ran.append("UnaryStream")
        yield request
        yield request

    async def unary_stream_writes(request: bytes, context: Any) -> None:
        ran.append("UnaryStreamWrites")
        await context.write(request)
        await context.write(request)

    async def stream_unary(requests: AsyncIterator[bytes], context: Any) -> bytes:
        ran.append("StreamUnary")
        return b"".join([r async for r in requests])

    async def stream_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        ran.append("StreamStream")
        async for request in requests:
            yield request

    # A handler whose flags name a kind it has no method for: nothing to wrap, nothing to pass.
    unknown = grpc.unary_unary_rpc_method_handler(unary_unary)._replace(request_streaming=True)  # type: ignore[attr-defined]
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "UnaryUnary": grpc.unary_unary_rpc_method_handler(unary_unary),
            "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream),
            "UnaryStreamWrites": grpc.unary_stream_rpc_method_handler(unary_stream_writes),
            "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary),
            "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream),
            "Unknown": unknown,
        },
    )


async def received(
    channel: grpc.aio.Channel, method: str, token: str | None, requests: list[bytes]
) -> tuple[list[bytes], grpc.StatusCode]:
    """Every message a call of `method` received, and its status code. A request stream
    sends `requests` (none: the call stays open for writing, as a client's that has not
    sent yet; a refusal must not wait for one, and the aio client reports a write racing the
    server's end of the call as INTERNAL, hiding the status)."""
    path = f"/{SERVICE}/{method}"
    metadata = [("authorization", f"Bearer {token}")] if token else []
    stream = iter(requests) if requests else None
    calls: dict[str, Callable[[], Any]] = {
        "UnaryUnary": lambda: channel.unary_unary(path)(b"x", metadata=metadata, timeout=5),
        "UnaryStream": lambda: channel.unary_stream(path)(b"x", metadata=metadata, timeout=5),
        "UnaryStreamWrites": lambda: channel.unary_stream(path)(b"x", metadata=metadata, timeout=5),
        "StreamUnary": lambda: channel.stream_unary(path)(stream, metadata=metadata, timeout=5),
        "StreamStream": lambda: channel.stream_stream(path)(stream, metadata=metadata, timeout=5),
        "Unknown": lambda: channel.stream_stream(path)(stream, metadata=metadata, timeout=5),
    }
    messages: list[bytes] = []
    call = calls[method]()
    try:
        if hasattr(call, "__aiter__"):
            async for message in call:
                messages.append(message)
        else:
            messages.append(await call)
    except grpc.aio.AioRpcError as error:
        return messages, error.code()
    return messages, grpc.StatusCode.OK


def run(tmp_path: Path, work: Callable[[grpc.aio.Channel], Any]) -> Any:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)

    async def main() -> Any:
        server = grpc.aio.server(interceptors=[AdminAuthInterceptor(AdminAuth(token_file=str(token)))])
        server.add_generic_rpc_handlers([kinds_service(ran)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await work(channel)
        finally:
            await server.stop(0)

    ran: list[str] = []
    return asyncio.run(main()), ran


KINDS = ["UnaryUnary", "UnaryStream", "UnaryStreamWrites", "StreamUnary", "StreamStream"]


@pytest.mark.parametrize("method", KINDS)
def test_every_kind_of_call_is_refused_before_its_method_runs(tmp_path: Path, method: str) -> None:
    async def work(channel: grpc.aio.Channel) -> Any:
        return [await received(channel, method, token, []) for token in (None, "wrong")]

    answers, ran = run(tmp_path, work)
    assert answers == [([], grpc.StatusCode.UNAUTHENTICATED)] * 2
    assert ran == []


@pytest.mark.parametrize(
    ("method", "messages"),
    [
        ("UnaryUnary", [b"x"]),  # unary requests are b"x"
        ("UnaryStream", [b"x", b"x"]),
        ("UnaryStreamWrites", [b"x", b"x"]),
        ("StreamUnary", [b"xy"]),
        ("StreamStream", [b"x", b"y"]),
    ],
)
def test_every_kind_of_call_runs_with_the_token(tmp_path: Path, method: str, messages: list[bytes]) -> None:
    async def work(channel: grpc.aio.Channel) -> Any:
        return await received(channel, method, TOKEN, [b"x", b"y"])

    answer, ran = run(tmp_path, work)
    assert answer == (messages, grpc.StatusCode.OK)
    assert ran == [method]


def test_a_handler_of_a_kind_it_does_not_know_is_refused_even_with_the_token(tmp_path: Path) -> None:
    async def work(channel: grpc.aio.Channel) -> Any:
        return await received(channel, "Unknown", TOKEN, [])

    (messages, code), ran = run(tmp_path, work)
    assert (messages, code) == ([], grpc.StatusCode.UNIMPLEMENTED)
    assert ran == []
