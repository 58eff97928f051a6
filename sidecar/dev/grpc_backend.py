"""A sample gRPC backend for the tests and the gRPC walk-through in the docs.

It answers every unary method of every service (a generic handler: no .proto needed) with a
JSON document naming itself, the method and the metadata it received, so a caller sees which
lane a call reached. With `forward_to` it is a service in a call chain: it calls the same
method on the next hop (through its own outbound Envoy) with the trace context, baggage, lane
and user metadata, and embeds that answer, as an OpenTelemetry-instrumented service would.
"""

import json
from concurrent import futures
from typing import Any

import grpc

from sidecar.dev.backend import PROPAGATED


def _identity(data: bytes) -> bytes:
    return data


class GrpcBackend:
    """A grpcio server on host:port (0: any free port) answering every unary call."""

    def __init__(
        self, name: str, host: str = "127.0.0.1", port: int = 0, forward_to: tuple[str, int] | None = None
    ) -> None:
        self.name = name
        self.calls = 0
        self.forward_to = forward_to
        self._next: grpc.Channel | None = None
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self._server.add_generic_rpc_handlers([_Handler(self)])
        self.port = self._server.add_insecure_port(f"{host}:{port}")

    def start(self) -> "GrpcBackend":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)
        if self._next is not None:
            self._next.close()

    def answer(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.calls += 1
        metadata = {key: value for key, value in context.invocation_metadata() if isinstance(value, str)}
        echo: dict[str, Any] = {"backend": self.name, "method": method, "metadata": metadata}
        if self.forward_to is not None:
            echo["next"] = self._call_next_hop(method, request, metadata)
        return json.dumps(echo).encode()

    def _call_next_hop(self, method: str, request: bytes, metadata: dict[str, str]) -> object:
        assert self.forward_to is not None
        if self._next is None:
            host, port = self.forward_to
            self._next = grpc.insecure_channel(f"{host}:{port}")
        call = self._next.unary_unary(method, request_serializer=_identity, response_deserializer=_identity)
        passed_on = [(name, metadata[name]) for name in PROPAGATED if name in metadata]
        try:
            return json.loads(call(request, metadata=passed_on, timeout=10))
        except grpc.RpcError as error:
            return {"code": error.code().name, "details": error.details()}


class _Handler(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, backend: GrpcBackend) -> None:
        self.backend = backend

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method

        def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
            return self.backend.answer(method, request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=_identity, response_serializer=_identity
        )
