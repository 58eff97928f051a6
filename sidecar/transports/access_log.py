"""The decisions Envoy takes itself (envoy_decides), counted from its gRPC access log stream.

Envoy's gRPC access logger (`envoy.access_loggers.http_grpc`, configured by
sidecar.envoyconf.decides for the requests its Lua decided) streams log entries to the
sidecar's AccessLogService on the `--xds-listen` server, in batches, off the request path:
it buffers a bounded number of bytes and drops what the stream cannot take (Envoy counts
them), so a slow or absent sidecar never slows a request. Each entry carries the decision's
dynamic metadata, which is counted in the metrics every mode counts
(`graysteer_decisions_total`, `graysteer_mirrored_total`). A rule or cluster the served
table does not know is not turned into a label: it is counted as `unknown`. A request the Lua
failed on (a bug: Envoy logs the error) was decided by the fast path, which counted it; it
is counted here as `lua_error`.

An entry is hundreds of bytes of which the sidecar reads one field, the dynamic metadata, and
a decision's metadata repeats (a route's is constant, a split's varies by bucket). So the
stream is read with a message type of its own (`ENTRIES`): Envoy's messages on the wire,
with only the path to the metadata declared and the metadata kept as its bytes; each
distinct metadata is parsed once (Envoy's `Metadata` message) and its labels looked up after.
"""

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from sidecar.contract import LUA_NAMES
from sidecar.core import DEFAULT_RULE, Table
from sidecar.core.lua_table import LUA_ERROR_KEY
from sidecar.core.model import UNKNOWN_LANE_RULE
from sidecar.ops.metrics import Metrics

log = logging.getLogger("graysteer.access_log")

SERVICE = "envoy.service.accesslog.v3.AccessLogService"
KNOWN_METADATA = 4096  # distinct metadata remembered with their labels (then forgotten)
Labels = tuple[str, str, str | None, bool]  # cluster, rule, mirror, a key issued
LUA_FAILED = "lua_error"  # what `_known` holds for an entry whose request the Lua failed on


def _entries_type() -> Any:
    """StreamAccessLogsMessage as far as the metadata: http_logs (2) -> log_entry (1) ->
    common_properties (1) -> metadata (17), the last as bytes (the same wire type)."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="graysteer/access_log_metadata.proto", package="graysteer"
    )
    path = [
        ("Entries", "http_logs", 2, "Logs"),
        ("Logs", "log_entry", 1, "Entry"),
        ("Entry", "common", 1, "Common"),
    ]
    for name, field, number, kind in path:
        message = proto.message_type.add(name=name)
        label = message.field.add(
            name=field, number=number, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
        )
        label.type_name = f".graysteer.{kind}"
        label.label = (
            descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
            if field == "log_entry"
            else descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
        )
    common = proto.message_type.add(name="Common")
    common.field.add(
        name="metadata",
        number=17,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("graysteer.Entries"))


ENTRIES = _entries_type()


def metadata_labels(raw: bytes) -> Labels | str | None:
    """(cluster, rule, mirror, a key issued) of a decision the Lua took, from an entry's metadata bytes;
    LUA_FAILED when the Lua failed on the request; None when it did not decide (the fast
    path did, or nothing did)."""
    metadata = base_pb2.Metadata.FromString(raw).filter_metadata
    marked = metadata.get(LUA_NAMES.mark_namespace)
    if marked is not None and marked.fields[LUA_ERROR_KEY].bool_value:
        return LUA_FAILED  # the fast path decided it and counted it; the failure is counted here
    if marked is not None and marked.fields[LUA_NAMES.mark_key].bool_value:
        return None  # the fast path decided it, and counted it
    decided = metadata.get(LUA_NAMES.namespace)
    if decided is None:
        return None
    fields = decided.fields
    prefix = LUA_NAMES.key_prefix
    if prefix + "rule" not in fields:
        return None
    mirror = fields[prefix + "mirror"].string_value if prefix + "mirror" in fields else None
    issued = prefix + "issued-cookie" in fields
    return (
        fields[prefix + "cluster"].string_value,
        fields[prefix + "rule"].string_value,
        mirror or None,
        issued,
    )


class DecisionLogServicer:
    """AccessLogService: one client stream per Envoy worker, answered when it ends."""

    def __init__(self, table: Callable[[], Table], metrics: Metrics) -> None:
        self.table, self.metrics = table, metrics
        self._table: Table | None = None
        # metadata -> labels; False: unknown labels, True: not the Lua's, LUA_FAILED
        self._known: dict[bytes, Labels | bool | str] = {}
        self._counted = metrics.envoy_decision_logs.labels("counted")
        self._unknown = metrics.envoy_decision_logs.labels("unknown")
        self._failed = metrics.envoy_decision_logs.labels(LUA_FAILED)

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in request_iterator:
            self.count([entry.common.metadata for entry in message.http_logs.log_entry])
        return als_pb2.StreamAccessLogsResponse()

    def count(self, metadata: list[bytes]) -> None:
        """Count the decisions of a batch of entries (each entry's metadata bytes)."""
        table = self.table()
        if table is not self._table:  # what a label may be follows the served table
            self._table, self._known = table, {}
        known = self._known
        count_decided = self.metrics.count_decided
        counted = unknown = 0
        for raw in metadata:
            labels = known.get(raw)
            if labels is None:
                labels = self._labels(table, raw)
                if len(known) >= KNOWN_METADATA:
                    known.clear()
                known[raw] = labels
            if labels is True:
                continue
            if labels is False:
                unknown += 1
                continue
            if labels == LUA_FAILED:
                self._failed.inc()
                continue
            assert not isinstance(labels, str)
            count_decided(*labels)
            counted += 1
        if counted:
            self._counted.inc(counted)
        if unknown:
            self._unknown.inc(unknown)

    @staticmethod
    def _labels(table: Table, raw: bytes) -> Labels | bool | str:
        labels = metadata_labels(raw)
        if labels is None:
            return True
        if isinstance(labels, str):
            return labels
        cluster, rule, mirror, _ = labels
        lanes = table.coloring.lanes if table.coloring is not None else {}
        rules = {r.name for r in table.rules} | {DEFAULT_RULE, UNKNOWN_LANE_RULE}
        known_rule = rule in rules or (rule.startswith("lane:") and rule[5:] in lanes)
        clusters = set(table.clusters)
        if cluster not in clusters or not known_rule or (mirror is not None and mirror not in clusters):
            return False  # e.g. an older table's rule: never a label from elsewhere
        return labels


def add_to_server(servicer: DecisionLogServicer, server: grpc.aio.Server) -> None:
    """Serve `servicer` as Envoy's AccessLogService, reading requests as ENTRIES."""
    handler = grpc.stream_unary_rpc_method_handler(
        servicer.StreamAccessLogs,
        request_deserializer=ENTRIES.FromString,
        response_serializer=als_pb2.StreamAccessLogsResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"StreamAccessLogs": handler}),)
    )
