"""Scenario (e): the floor of Python gRPC here. An ext_proc servicer on grpc.aio that
answers every request-headers message with one constant response (the same shape of
answer graysteer gives: one header set, clear_route_cache), decides nothing, counts
nothing. Run: python -m benchmarks.empty_servicer PORT"""

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ANSWER = ep.ProcessingResponse(
    request_headers=ep.HeadersResponse(
        response=ep.CommonResponse(
            header_mutation=ep.HeaderMutation(
                set_headers=[
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(key="x-route-cluster", raw_value=b"stable"),
                        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                    )
                ]
            ),
            clear_route_cache=True,
        )
    )
)
OTHER = ep.ProcessingResponse(response_headers=ep.HeadersResponse())


class Constant(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    async def Process(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for message in requests:
            yield ANSWER if message.HasField("request_headers") else OTHER


async def main(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    ep_grpc.add_ExternalProcessorServicer_to_server(Constant(), server)
    health_servicer = health.aio.HealthServicer()  # Envoy health-checks the sidecar cluster
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await health_servicer.set(
        "envoy.service.ext_proc.v3.ExternalProcessor", health_pb2.HealthCheckResponse.SERVING
    )
    print(f"serving ext_proc and ext_authz on 127.0.0.1:{bound}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    import uvloop  # the same event loop graysteer runs on by default

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
