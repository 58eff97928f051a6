"""Building and running a sidecar in-process: the parts follow from the options alone, start
binds every listener (port 0: a free one), readiness goes SERVING, and stop drains: NOT_SERVING
first, then every listener closed and every background task ended."""

import asyncio
import json
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from sidecar.serving.build import Sidecar
from sidecar.serving.options import ServeOptions
from sidecar.serving.run import Running

RULES = """version: 1
clusters: [stable, canary]
default: stable
rules:
  - name: ramp
    split: {key: [header:x-user-id], to: [{cluster: stable, weight: 90}, {cluster: canary, weight: 10}]}
"""


def options(tmp_path: Path, **changes: object) -> ServeOptions:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    base = {
        "config": str(rules),
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "http_listen": "127.0.0.1:0",
        "drain_seconds": 0.0,
        "grace_seconds": 1.0,
    }
    return ServeOptions(**{**base, **changes})  # type: ignore[arg-type]


def test_the_parts_follow_from_the_options(tmp_path: Path) -> None:
    async def build(**changes: object) -> Sidecar:
        sidecar = await Sidecar.build(options(tmp_path, **changes), CollectorRegistry())
        sidecar.reloader.close()
        return sidecar

    plain = asyncio.run(build())
    assert plain.grpc_server is not None and plain.authz_http is None
    assert plain.stats is None and plain.bypass is None and plain.fleet is None
    fast = asyncio.run(build(listen=None, authz_http_listen="127.0.0.1:0", envoy_admin="127.0.0.1:9901"))
    assert fast.grpc_server is None and fast.authz_http is not None
    assert fast.stats is not None and fast.bypass is not None
    assert fast.controller.analysis is fast.stats


def test_a_broken_rules_file_builds_nothing(tmp_path: Path) -> None:
    broken = options(tmp_path)
    Path(broken.config).write_text("clusters: [oops")
    with pytest.raises(ValueError, match="invalid YAML"):
        asyncio.run(Sidecar.build(broken, CollectorRegistry()))


def test_start_serves_and_stop_drains(tmp_path: Path) -> None:
    async def scenario() -> None:
        running = Running(await Sidecar.build(options(tmp_path), CollectorRegistry()))
        await running.start()
        stop = asyncio.Event()
        running.follow(stop)
        assert running.tasks  # the source, the rollouts
        async with grpc.aio.insecure_channel(running.grpc_address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert running.http is not None
        url = f"http://127.0.0.1:{running.http.server_address[1]}/readyz"
        body = await asyncio.to_thread(lambda: json.loads(urllib.request.urlopen(url, timeout=5).read()))
        assert body["ready"] and body["version"] == running.sidecar.reloader.table.version
        stop.set()
        await running.stop()
        assert not running.sidecar.readiness.ready
        assert not running.tasks  # every background task ended
        async with grpc.aio.insecure_channel(running.grpc_address) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)

    asyncio.run(scenario())
