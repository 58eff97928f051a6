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
is counted here as `lua_error`. The steering events the Lua met (filed only on the requests
where one happens: sidecar.core.lua_table.EVENTS_KEY) are counted in
`graysteer_steering_events_total` with the decision; a value the Lua never writes (a name not
in EVENTS, one twice, not a string) counts no event: the entry is counted `malformed`. When
a decided request is replayed (a decision log or shadow table: sidecar.transports.envoy_decided),
the replay counts its events instead, never both.

An entry is hundreds of bytes of which the sidecar reads one field, the dynamic metadata, and
a decision's metadata repeats (a route's is constant, a split's varies by bucket). So the
stream is read with a message type of its own (`ENTRIES`): Envoy's messages on the wire,
with only the path to the metadata declared and the metadata kept as its bytes. Envoy writes
a Struct's keys in no fixed order (a protobuf map's), so the same decision arrives as many
different byte strings: each is brought to its canonical form (parsed and written again with
sorted keys, in C: about 3 µs), and each distinct canonical metadata is read once (reading
the fields of a parsed message from Python costs ten times as much) and its labels looked
up after.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2
from google.protobuf.message import DecodeError

from sidecar.contract import LUA_NAMES
from sidecar.core import DEFAULT_RULE, Table
from sidecar.core.lua_table import EVENTS, EVENTS_KEY, INPUTS_KEY, INPUTS_NAMESPACE, LUA_ERROR_KEY
from sidecar.core.model import UNKNOWN_LANE_RULE
from sidecar.ops.metrics import Metrics

if TYPE_CHECKING:
    from sidecar.transports.envoy_decided import Feeds

log = logging.getLogger("graysteer.access_log")

SERVICE = "envoy.service.accesslog.v3.AccessLogService"
KNOWN_METADATA = 4096  # distinct metadata remembered with their labels (then forgotten)
# ... and their bytes, at most, in each of the two memories: a decision's metadata is a few
# hundred bytes, but anyone on the loopback can send entries of a megabyte each.
REMEMBERED_BYTES = 4 * 1024 * 1024
# A message of the stream, at most (the --xds-listen server's receive limit): Envoy sends a
# batch when ACCESS_LOG_BUFFER_BYTES (256 KiB) are buffered, one entry past it at most.
MAX_MESSAGE_BYTES = 1024 * 1024
_INPUTS_NAME = INPUTS_NAMESPACE.encode()
CHUNK = 256  # entries read between two turns of the serving loop
# cluster, rule, mirror, a key issued, the steering events (None: a value the Lua never writes)
Labels = tuple[str, str, str | None, bool, tuple[str, ...] | None]
MAX_EVENTS_CHARS = 256  # every name of EVENTS once is less
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
    """(cluster, rule, mirror, a key issued, steering events) of a decision the Lua took, from
    an entry's metadata bytes; LUA_FAILED when the Lua failed on the request; None when it did
    not decide (the fast path did, or nothing did). DecodeError: not Envoy's metadata."""
    found = metadata_decision(raw)
    return found if found is None or isinstance(found, str) else found[0]


def metadata_decision(raw: bytes) -> tuple[Labels, dict[str, str]] | str | None:
    """`metadata_labels`, with the decision's fields as the Lua filed them (names as
    `decision_fields` has them, values as text)."""
    metadata = base_pb2.Metadata.FromString(raw).filter_metadata
    marked = metadata.get(LUA_NAMES.mark_namespace)
    if marked is not None and marked.fields[LUA_ERROR_KEY].bool_value:
        return LUA_FAILED  # the fast path decided it and counted it; the failure is counted here
    if marked is not None and marked.fields[LUA_NAMES.mark_key].bool_value:
        return None  # the fast path decided it, and counted it
    decided = metadata.get(LUA_NAMES.namespace)
    if decided is None:
        return None
    prefix = LUA_NAMES.key_prefix
    fields = {
        key[len(prefix) :].replace("-", "_"): value.string_value
        for key, value in decided.fields.items()
        if key.startswith(prefix) and value.WhichOneof("kind") == "string_value"
    }
    if "rule" not in fields or "cluster" not in fields:
        return None
    events = lua_events(metadata.get(INPUTS_NAMESPACE))
    mirror = fields.get("mirror") or None
    labels = (fields["cluster"], fields["rule"], mirror, "issued_cookie" in fields, events)
    return labels, fields


def lua_events(filed: struct_pb2.Struct | None) -> tuple[str, ...] | None:
    """The steering events the Lua filed in its namespace `filed`: () none; None: a value it
    never writes (never a label)."""
    value = filed.fields.get(EVENTS_KEY) if filed is not None else None
    if value is None:
        return ()
    if value.WhichOneof("kind") != "string_value" or len(value.string_value) > MAX_EVENTS_CHARS:
        return None
    names = tuple(value.string_value.split(","))
    if len(set(names)) != len(names) or not EVENTS.issuperset(names):
        return None
    return names


class DecisionLogServicer:
    """AccessLogService: one client stream per Envoy worker, answered when it ends. With a
    decision log or a shadow table (`feeds`), each decided request's inputs go on to them
    (sidecar.transports.envoy_decided)."""

    def __init__(self, table: Callable[[], Table], metrics: Metrics, feeds: "Feeds | None" = None) -> None:
        self.table, self.metrics, self.feeds = table, metrics, feeds
        self._table: Table | None = None
        self._names: tuple[frozenset[str], frozenset[str], frozenset[str]] = (frozenset(),) * 3
        # metadata as received -> labels (most are received once: Envoy writes a Struct's
        # keys in no fixed order); canonical metadata -> labels; canonical -> the fields.
        # Labels: a decision's, False: unknown labels, True: not the Lua's, or LUA_FAILED.
        self._seen: dict[bytes, Labels | bool | str] = {}
        self._known: dict[bytes, Labels | bool | str] = {}
        self._fields: dict[bytes, dict[str, str]] = {}
        self._seen_bytes = self._known_bytes = 0  # the keys' bytes in _seen, in _known
        self._counted = metrics.envoy_decision_logs.labels("counted")
        self._unknown = metrics.envoy_decision_logs.labels("unknown")
        self._failed = metrics.envoy_decision_logs.labels(LUA_FAILED)
        self._malformed = metrics.envoy_decision_logs.labels("malformed")

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in request_iterator:
            metadata = [entry.common.metadata for entry in message.http_logs.log_entry]
            for at in range(0, len(metadata), CHUNK):
                if at:  # a batch holds thousands: the loop also serves the fast path's checks
                    await asyncio.sleep(0)
                feeds = self.feeds
                if feeds is not None and feeds.wanted():
                    self.feed(metadata[at : at + CHUNK], feeds)
                else:
                    self.count(metadata[at : at + CHUNK])
        return als_pb2.StreamAccessLogsResponse()

    def feed(self, metadata: list[bytes], feeds: "Feeds") -> None:
        """Count a batch, then hand each decided request's inputs to `feeds`: the inputs are
        taken out of the metadata, whose rest is then a decision's, met before."""
        decided: list[bytes] = []
        captured: list[tuple[bytes, str | None, tuple[str, ...] | None]] = []
        for raw in metadata:
            if _INPUTS_NAME not in raw:
                decided.append(raw)
                continue
            try:
                parsed = base_pb2.Metadata.FromString(raw)
            except DecodeError:
                decided.append(raw)  # counted as malformed
                continue
            filed = parsed.filter_metadata.get(INPUTS_NAMESPACE)
            if filed is None or INPUTS_KEY not in filed.fields:  # no inputs (events alone, or none)
                decided.append(raw)
                continue
            inputs, events = _inputs(filed), lua_events(filed)
            del parsed.filter_metadata[INPUTS_NAMESPACE]  # the events with it: counted below
            rest = parsed.SerializeToString(deterministic=True)
            decided.append(rest)
            captured.append((rest, inputs, events))
        self.count(decided)
        table = self._table
        for rest, inputs, events in captured:
            fields = self._fields.get(rest)
            if table is None or fields is None or not isinstance(self._known.get(rest), tuple):
                continue  # not counted: nor are its events
            if not feeds.replay(table, fields, inputs):  # the replay counts the events it met
                self._count_events(events)

    def count(self, metadata: list[bytes]) -> None:
        """Count the decisions of a batch of entries (each entry's metadata bytes)."""
        table = self.table()
        if table is not self._table:  # what a label may be follows the served table
            self._forget(table)
        seen, known = self._seen, self._known
        count_decided = self.metrics.count_decided
        counted = unknown = 0
        evented: list[tuple[str, ...] | None] = []
        for raw in metadata:
            labels = seen.get(raw)
            if labels is None:
                labels = known.get(raw)  # already canonical (`feed` made it so)
            if labels is None:
                labels = self._read(raw)
                if len(seen) >= KNOWN_METADATA or self._seen_bytes + len(raw) > REMEMBERED_BYTES:
                    seen.clear()
                    self._seen_bytes = 0
                seen[raw] = labels
                self._seen_bytes += len(raw)
            if labels is True:
                continue
            if labels is False:
                unknown += 1
                continue
            if labels == LUA_FAILED:
                self._failed.inc()
                continue
            assert not isinstance(labels, str)
            cluster, rule, mirror, issued, events = labels
            count_decided(cluster, rule, mirror, issued)
            counted += 1
            if events != ():  # rare: a request where a steering event happened
                evented.append(events)
        if counted:
            self._counted.inc(counted)
        if unknown:
            self._unknown.inc(unknown)
        for events in evented:
            self._count_events(events)

    def _count_events(self, events: tuple[str, ...] | None) -> None:
        if events is None:
            self._malformed.inc()
            return
        for event in events:
            self.metrics.count_event(event)

    def _forget(self, table: Table) -> None:
        self._table = table
        self._seen, self._known, self._fields = {}, {}, {}
        self._seen_bytes = self._known_bytes = 0
        lanes = table.coloring.lanes if table.coloring is not None else {}
        rules = {r.name for r in table.rules} | {DEFAULT_RULE, UNKNOWN_LANE_RULE}
        self._names = (
            frozenset(rules),
            frozenset(f"lane:{lane}" for lane in lanes),
            frozenset(table.clusters),
        )

    def _read(self, raw: bytes) -> Labels | bool | str:
        """The labels of metadata not seen as it is: parsed once in each canonical form."""
        try:
            canonical = base_pb2.Metadata.FromString(raw).SerializeToString(deterministic=True)
        except DecodeError:  # not from Envoy: never a label
            self._malformed.inc()
            return True
        labels = self._known.get(canonical)
        if labels is None:
            full = self._known_bytes + len(canonical) > REMEMBERED_BYTES
            if len(self._known) >= KNOWN_METADATA or full:
                self._known.clear()
                self._fields.clear()
                self._known_bytes = 0
            labels = self._labels(canonical)
            self._known[canonical] = labels
            self._known_bytes += len(canonical)
        return labels

    def _labels(self, canonical: bytes) -> Labels | bool | str:
        found = metadata_decision(canonical)
        if found is None:
            return True
        if isinstance(found, str):
            return found
        labels, fields = found
        cluster, rule, mirror, _, _ = labels
        rules, lanes, clusters = self._names
        known_rule = rule in rules or rule in lanes
        if cluster not in clusters or not known_rule or (mirror is not None and mirror not in clusters):
            return False  # e.g. an older table's rule: never a label from elsewhere
        self._fields[canonical] = fields
        return labels


def _inputs(filed: struct_pb2.Struct) -> str | None:
    """The inputs the Lua filed (INPUTS_KEY of its namespace): a string, else None."""
    value = filed.fields.get(INPUTS_KEY)
    if value is None or value.WhichOneof("kind") != "string_value":
        return None
    return str(value.string_value)


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
