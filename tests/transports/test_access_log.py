"""Counting Envoy's own decisions from its access log entries (sidecar.transports.access_log)."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
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
from sidecar.core.lua_table import EVENTS_KEY, INPUTS_KEY, INPUTS_NAMESPACE
from sidecar.ops.decision_log import DecisionLog
from sidecar.ops.metrics import Metrics
from sidecar.serving.build import xds_server
from sidecar.table.decider import Decider
from sidecar.table.holder import TableHolder
from sidecar.transports import access_log
from sidecar.transports.access_log import ENTRIES, DecisionLogServicer
from sidecar.transports.envoy_decided import Feeds
from tests.helpers import table_from_yaml

TABLE = table_from_yaml("""\
version: 1
clusters: [stable, canary]
default: stable
coloring: {lanes: {stable: stable, canary: canary}}
rules:
  - {name: beta, match: {headers: {x-beta: "1"}}, route: canary, mirror: {cluster: stable, percent: 10}}
""")
FORCED = table_from_yaml("""\
version: 1
clusters: [stable, canary]
default: stable
trust: {override_headers: [x-force]}
rules:
  - {name: forced, match: {headers: {x-force: "1"}}, route: canary}
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


def with_events(
    log: accesslog_pb2.HTTPAccessLogEntry, events: object, **more: object
) -> accesslog_pb2.HTTPAccessLogEntry:
    """`log` with the steering events the Lua files (and `more` of its namespace: the inputs)."""
    filed = struct_pb2.Struct()
    filed.update({EVENTS_KEY: events, **more})
    log.common_properties.metadata.filter_metadata[INPUTS_NAMESPACE].CopyFrom(filed)
    return log


# Values the Lua never writes: none becomes a label, each entry is counted malformed.
FORGED_EVENTS: list[object] = [
    "malformed_anything",  # a name of the family, not of the set
    "untrusted_headers_removed,untrusted_headers_removed",  # a name twice
    "untrusted_headers_removed,",  # an empty name
    "",
    "x" * 10_000,
    7,  # not a string
    True,
    ["malformed_lane"],
]


def test_the_events_the_lua_files_are_counted_and_forged_ones_never_become_labels() -> None:
    registry = CollectorRegistry()
    servicer = DecisionLogServicer(lambda: TABLE, Metrics(registry))
    decided = {"cluster": "stable", "rule": "default"}
    genuine = [
        with_events(entry(decided), "untrusted_headers_removed"),
        with_events(entry(decided), "malformed_spiffe_id,malformed_dns_san,baggage_over_limit"),
        with_events(entry(decided), "malformed_lane"),
        with_events(entry(decided), "malformed_lane"),  # the same bytes: read once, counted twice
        entry(decided),  # no event: nothing more
    ]
    servicer.count(read_back(*genuine, *(with_events(entry(decided), value) for value in FORGED_EVENTS)))
    value = registry.get_sample_value
    events = {
        s.labels["event"]: s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == "graysteer_steering_events_total"
    }
    assert events == {
        "untrusted_headers_removed": 1,
        "malformed_spiffe_id": 1,
        "malformed_dns_san": 1,
        "baggage_over_limit": 1,
        "malformed_lane": 2,
    }
    assert value("graysteer_access_log_entries_total", {"result": "malformed"}) == len(FORGED_EVENTS)
    # the decision is Envoy's whatever its events: counted
    assert value("graysteer_decisions_total", decided) == len(genuine) + len(FORGED_EVENTS)


def test_events_are_counted_once_when_a_decision_log_replays_the_request(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    decider = Decider(TableHolder(FORCED), metrics, DecisionLog(str(tmp_path / "d.jsonl"), 1.0, metrics))
    servicer = DecisionLogServicer(lambda: FORCED, metrics, Feeds(decider, metrics))
    decided = {"cluster": "stable", "rule": "default", "reason": "default"}
    stripped = "\n".join(["1", "GET", "/", "10.0.0.1:8080", "", "", "", "x-force", "1"])
    entries = [
        with_events(entry(decided), "untrusted_headers_removed", **{INPUTS_KEY: stripped}),  # replayed
        with_events(entry(decided), "untrusted_headers_removed", **{INPUTS_KEY: "2\nGET"}),  # refused
        with_events(entry(decided), "malformed_lane"),  # inputs not filed (yet): the Lua's events
    ]
    servicer.feed(read_back(*entries), servicer.feeds)  # type: ignore[arg-type]
    value = registry.get_sample_value
    assert value("graysteer_steering_events_total", {"event": "untrusted_headers_removed"}) == 2
    assert value("graysteer_steering_events_total", {"event": "malformed_lane"}) == 1
    assert value("graysteer_access_log_entries_total", {"result": "refused_inputs"}) == 1
    assert value("graysteer_decisions_total", {"cluster": "stable", "rule": "default"}) == 3
