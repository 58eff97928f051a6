"""A small OTLP/gRPC trace receiver (opentelemetry.proto's TraceService/Export) for the tests
and local trials: Envoy is the real exporter, this keeps what it sends.

    python -m sidecar.dev.otlp 4317      # prints one JSON line per span

The message classes come from the copy of opentelemetry-proto that `xds-protos` ships (it
has no gRPC stub, so the method is registered by name). That copy is older:
`ResourceSpans` calls its field 2 `instrumentation_library_spans` where newer releases say
`scope_spans`; the wire format is the same, and either name is read.
"""

import json
import sys
import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


@dataclass(frozen=True)
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any] = field(default_factory=dict)
    service: str = ""


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return (
        getattr(value, kind)
        if kind in ("string_value", "bool_value", "int_value", "double_value")
        else str(value)
    )


def spans_of(request: otlp.ExportTraceServiceRequest) -> list[Span]:
    out = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
        scopes = getattr(resource_spans, "scope_spans", None) or resource_spans.instrumentation_library_spans
        for scope in scopes:
            for span in scope.spans:
                out.append(
                    Span(
                        span.name,
                        span.trace_id.hex(),
                        span.span_id.hex(),
                        span.parent_span_id.hex(),
                        {kv.key: _value(kv.value) for kv in span.attributes},
                        str(resource.get("service.name", "")),
                    )
                )
    return out


class Receiver:
    """Receives spans on 127.0.0.1 (port 0: a free one, see `.port`) until `stop()`."""

    def __init__(self, port: int = 0, echo: bool = False, keep: bool = True) -> None:
        """`keep=False` (benchmarks): count the exports and their bytes, decode nothing, so
        that receiving costs the machine the least."""
        self._spans: list[Span] = []
        self._lock = threading.Lock()
        self.echo = echo
        self.exports = self.received_bytes = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.unary_unary_rpc_method_handler(
            self._export if keep else self._count,
            request_deserializer=otlp.ExportTraceServiceRequest.FromString if keep else None,
            response_serializer=otlp.ExportTraceServiceResponse.SerializeToString,
        )
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Export": handler}),)
        )
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.server.start()

    def _export(
        self, request: otlp.ExportTraceServiceRequest, context: Any
    ) -> otlp.ExportTraceServiceResponse:
        received = spans_of(request)
        with self._lock:
            self._spans.extend(received)
        if self.echo:
            for span in received:
                print(json.dumps(span.__dict__), flush=True)
        return otlp.ExportTraceServiceResponse()

    def _count(self, request: bytes, context: Any) -> otlp.ExportTraceServiceResponse:
        with self._lock:
            self.exports += 1
            self.received_bytes += len(request)
        return otlp.ExportTraceServiceResponse()

    @property
    def spans(self) -> list[Span]:
        with self._lock:
            return list(self._spans)

    def stop(self) -> None:
        self.server.stop(0).wait(5)


def main() -> None:
    receiver = Receiver(int(sys.argv[1]) if len(sys.argv) > 1 else 4317, echo=True)
    print(json.dumps({"listening": receiver.port}), flush=True)
    receiver.server.wait_for_termination()


if __name__ == "__main__":
    main()
