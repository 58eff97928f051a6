"""Counting Envoy's own decisions from its access log entries (sidecar.transports.access_log)."""

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import struct_pb2
from google.protobuf.internal.encoder import _VarintBytes
from prometheus_client import CollectorRegistry

from sidecar.contract import LUA_NAMES
from sidecar.ops.metrics import Metrics
from sidecar.serving.build import xds_server
from sidecar.transports import access_log
from sidecar.transports.access_log import ENTRIES, DecisionLogServicer
from tests.helpers import table_from_yaml

TABLE = table_from_yaml("""\
version: 1
clusters: [stable, canary]
default: stable
coloring: {lanes: {stable: stable, canary: canary}}
rules:
  - {name: beta, match: {headers: {x-beta: "1"}}, route: canary, mirror: {cluster: stable, percent: 10}}
""")


def entry(
    fields: dict[str, str], undecided: bool = False, failed: bool = False
) -> accesslog_pb2.HTTPAccessLogEntry:
    log = accesslog_pb2.HTTPAccessLogEntry()
    metadata = log.common_properties.metadata.filter_metadata
    decided = struct_pb2.Struct()
    decided.update({LUA_NAMES.key_prefix + k: v for k, v in fields.items()})
    metadata[LUA_NAMES.namespace].CopyFrom(decided)
    if undecided:
        mark = struct_pb2.Struct()
        mark.update({LUA_NAMES.mark_key: True, **({"lua_error": True} if failed else {})})
        metadata[LUA_NAMES.mark_namespace].CopyFrom(mark)
    return log


def test_known_decisions_are_counted_and_others_never_become_labels() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    servicer = DecisionLogServicer(lambda: TABLE, metrics)
    entries = [
        entry({"cluster": "canary", "rule": "beta", "mirror": "stable"}),
        entry({"cluster": "stable", "rule": "default"}),
        entry({"cluster": "canary", "rule": "lane:canary"}),
        entry({"cluster": "stable", "rule": "default"}, undecided=True),  # the fast path's
        entry({"cluster": "canary", "rule": "an-old-rule"}),
        entry({"cluster": "elsewhere", "rule": "beta"}),
        entry({"cluster": "canary", "rule": "lane:not-a-lane"}),
        entry({"cluster": "stable", "rule": "default"}, undecided=True, failed=True),  # the Lua failed
    ]
    message = als_pb2.StreamAccessLogsMessage()
    message.http_logs.log_entry.extend(entries)
    read = ENTRIES.FromString(message.SerializeToString())  # as the servicer reads the stream
    servicer.count([e.common.metadata for e in read.http_logs.log_entry])
    value = registry.get_sample_value
    assert value("graysteer_decisions_total", {"cluster": "canary", "rule": "beta"}) == 1
    assert value("graysteer_decisions_total", {"cluster": "stable", "rule": "default"}) == 1
    assert value("graysteer_decisions_total", {"cluster": "canary", "rule": "lane:canary"}) == 1
    assert value("graysteer_mirrored_total", {"rule": "beta", "cluster": "stable"}) == 1
    assert value("graysteer_decisions_total", {"cluster": "canary", "rule": "an-old-rule"}) is None
    assert value("graysteer_access_log_entries_total", {"result": "counted"}) == 3
    assert value("graysteer_access_log_entries_total", {"result": "unknown"}) == 3
    assert value("graysteer_access_log_entries_total", {"result": "lua_error"}) == 1


def read_back(*entries: accesslog_pb2.HTTPAccessLogEntry) -> list[bytes]:
    """The entries' metadata as the servicer reads them from the stream."""
    message = als_pb2.StreamAccessLogsMessage()
    message.http_logs.log_entry.extend(entries)
    read = ENTRIES.FromString(message.SerializeToString())
    return [e.common.metadata for e in read.http_logs.log_entry]


def test_metadata_that_is_not_envoys_is_counted_as_malformed_and_the_stream_goes_on() -> None:
    registry = CollectorRegistry()
    servicer = DecisionLogServicer(lambda: TABLE, Metrics(registry))
    servicer.count([b"\xff\xff\xff", b"\x0a\x05ab"])  # no message; a field cut short
    servicer.count(read_back(entry({"cluster": "stable", "rule": "default"})))
    value = registry.get_sample_value
    assert value("graysteer_access_log_entries_total", {"result": "malformed"}) == 2
    assert value("graysteer_decisions_total", {"cluster": "stable", "rule": "default"}) == 1


def reordered(raw: bytes) -> bytes:
    """The same metadata with its decision's keys written in reverse order, as Envoy may
    (a protobuf map has no fixed order on the wire)."""
    metadata = base_pb2.Metadata.FromString(raw)
    fields = metadata.filter_metadata[LUA_NAMES.namespace].fields
    out = b""
    for key in reversed(sorted(fields)):
        one = struct_pb2.Struct()
        one.fields[key].CopyFrom(fields[key])
        out += one.SerializeToString()
    namespace = LUA_NAMES.namespace.encode()
    item = b"\x0a" + _VarintBytes(len(namespace)) + namespace + b"\x12" + _VarintBytes(len(out)) + out
    return b"\x0a" + _VarintBytes(len(item)) + item


def test_one_decision_in_any_key_order_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[bytes] = []
    original = access_log.metadata_decision
    monkeypatch.setattr(access_log, "metadata_decision", lambda raw: reads.append(raw) or original(raw))
    registry = CollectorRegistry()
    servicer = DecisionLogServicer(lambda: TABLE, Metrics(registry))
    (raw,) = read_back(entry({"cluster": "canary", "rule": "beta", "mirror": "stable", "reason": "route"}))
    other = reordered(raw)
    assert other != raw
    servicer.count([raw, other, raw, other])
    assert len(reads) == 1
    value = registry.get_sample_value
    assert value("graysteer_decisions_total", {"cluster": "canary", "rule": "beta"}) == 4


def test_a_large_batch_is_read_in_chunks_between_turns_of_the_serving_loop() -> None:
    """The loop that reads the stream also answers the fast path's checks: a batch of
    thousands of entries must not hold it from start to end."""
    registry = CollectorRegistry()
    servicer = DecisionLogServicer(lambda: TABLE, Metrics(registry))
    message = als_pb2.StreamAccessLogsMessage()
    message.http_logs.log_entry.extend(entry({"cluster": "stable", "rule": "default"}) for _ in range(1000))
    read = ENTRIES.FromString(message.SerializeToString())

    async def scenario() -> list[float]:
        seen: list[float] = []

        async def messages() -> AsyncIterator[Any]:
            yield read

        async def check() -> None:  # what a fast path check would see between two chunks
            while True:
                seen.append(
                    registry.get_sample_value("graysteer_access_log_entries_total", {"result": "counted"})
                    or 0
                )
                await asyncio.sleep(0)

        checking = asyncio.create_task(check())
        await asyncio.sleep(0)
        await servicer.StreamAccessLogs(messages(), None)  # type: ignore[arg-type]
        checking.cancel()
        return seen

    seen = asyncio.run(scenario())
    assert any(0 < counted < 1000 for counted in seen)


def test_distinct_large_metadata_never_grow_memory_past_its_bound() -> None:
    """Anyone on the loopback can send entries of a megabyte each, every one different: what
    is remembered of them is bounded in bytes, not only in number, and each is still counted."""
    registry = CollectorRegistry()
    servicer = DecisionLogServicer(lambda: TABLE, Metrics(registry))
    big = "x" * 64 * 1024
    for batch in range(4):
        servicer.count(
            read_back(
                *(
                    entry({"cluster": "stable", "rule": "default", "version": f"{big}{batch}.{i}"})
                    for i in range(40)
                )
            )
        )
        assert sum(map(len, servicer._seen)) <= access_log.REMEMBERED_BYTES
        assert sum(map(len, servicer._known)) <= access_log.REMEMBERED_BYTES
        assert len(servicer._fields) <= len(servicer._known)
    value = registry.get_sample_value
    assert value("graysteer_decisions_total", {"cluster": "stable", "rule": "default"}) == 160


def test_the_xds_server_refuses_a_message_larger_than_envoy_sends() -> None:
    registry = CollectorRegistry()
    stand_ins = SimpleNamespace(table=TABLE, log=None, shadow=None)  # a reloader's, a decider's

    def message(entries: int, version: str) -> bytes:
        batch = als_pb2.StreamAccessLogsMessage()
        fields = {"cluster": "stable", "rule": "default", "version": version}
        batch.http_logs.log_entry.extend(entry(fields) for _ in range(entries))
        return batch.SerializeToString()

    async def scenario() -> tuple[grpc.StatusCode, grpc.StatusCode]:
        server, _ = xds_server(stand_ins, stand_ins, Metrics(registry))  # type: ignore[arg-type]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stream = channel.stream_unary(
                    f"/{access_log.SERVICE}/StreamAccessLogs",
                    request_serializer=lambda raw: raw,
                    response_deserializer=als_pb2.StreamAccessLogsResponse.FromString,
                )
                codes = []
                for sent in (message(10, "v1"), message(40, "x" * 64 * 1024)):  # 2.5 MiB
                    try:
                        await stream(iter([sent]), timeout=10)
                        codes.append(grpc.StatusCode.OK)
                    except grpc.aio.AioRpcError as error:
                        codes.append(error.code())
                return codes[0], codes[1]
        finally:
            await server.stop(None)

    assert asyncio.run(scenario()) == (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert (
        registry.get_sample_value("graysteer_decisions_total", {"cluster": "stable", "rule": "default"}) == 10
    )
