"""What reading Envoy's access log stream costs the sidecar per entry (envoy_decides), in
process: `python -m benchmarks.access_log_stream [--entries 20000]`.

The entries are those (l50) streams: the 50-rule realistic table's decisions of the requests
wrk sends (`GET /checkout`, a new `x-user-id` each), their metadata written as the Lua
writes it, with each Struct's keys in a random order as Envoy's protobuf maps write them.
Measured: `count` (the metrics alone, what every request costs) and, with a decision log,
`feed` (the inputs filed by the Lua read back, decided again, offered to the log; the line
itself is written by the log's thread, measured apart). Microseconds per entry, the median
of `--rounds`. Run with another checkout's PYTHONPATH to compare commits."""

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from benchmarks.decide import realistic_document
from sidecar.contract import LUA_NAMES
from sidecar.core import Request, compile_table, decision_fields
from sidecar.core.table import Table
from sidecar.ops.decision_log import DecisionLog
from sidecar.ops.metrics import Metrics
from sidecar.table.decider import Decider
from sidecar.table.holder import TableHolder, serving_engine
from sidecar.transports import access_log

PREFIX = LUA_NAMES.key_prefix
FEEDS: Any
try:
    from sidecar.transports.envoy_decided import Feeds as FEEDS
except ImportError:  # a commit before the feeds: `count` alone
    FEEDS = None


def _struct(fields: dict[str, str]) -> bytes:
    """A google.protobuf.Struct of string values, its keys in a random order."""
    out = bytearray()
    items = list(fields.items())
    random.shuffle(items)
    for key, value in items:
        k, v = key.encode(), value.encode()
        inner = b"\x1a" + _varint(len(v)) + v  # Value.string_value (3)
        entry = b"\x0a" + _varint(len(k)) + k + b"\x12" + _varint(len(inner)) + inner
        out += b"\x0a" + _varint(len(entry)) + entry
    return bytes(out)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _namespace(name: str, struct: bytes) -> bytes:
    n = name.encode()
    entry = b"\x0a" + _varint(len(n)) + n + b"\x12" + _varint(len(struct)) + struct
    return b"\x0a" + _varint(len(entry)) + entry


def entries(table: Table, count: int, filed: bool) -> list[bytes]:
    """Each entry's metadata bytes as the servicer reads them from the stream."""
    engine = serving_engine(table)
    message = access_log.ENTRIES()  # the metadata kept as the bytes Envoy wrote
    for i in range(count):
        headers = {"x-user-id": f"user-{i}", ":authority": "127.0.0.1:10000", "x-request-id": f"{i:032x}"}
        steering = engine.steer(Request(headers, "GET", "/checkout", listener_port=10000))
        fields = {PREFIX + k.replace("_", "-"): str(v) for k, v in decision_fields(steering.decision).items()}
        metadata = _namespace(LUA_NAMES.namespace, _struct(fields))
        if filed:
            text = "\n".join(["1", "GET", "/checkout", "127.0.0.1:10000", "", "", ""])
            text += "".join(f"\n{k}\n{v}" for k, v in sorted(headers.items()))
            metadata += _namespace("graysteer.request", _struct({"in": text}))
        message.http_logs.log_entry.add().common.metadata = metadata
    read = access_log.ENTRIES.FromString(message.SerializeToString())
    return [e.common.metadata for e in read.http_logs.log_entry]


def measure(count: int, rounds: int) -> dict[str, float]:
    table = compile_table(realistic_document(), "realistic", "realistic.yaml")
    plain, filed = entries(table, count, False), entries(table, count, True)
    results: dict[str, list[float]] = {"count_us": [], "feed_us": [], "line_us": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            metrics = Metrics(CollectorRegistry())
            servicer = access_log.DecisionLogServicer(lambda: table, metrics)
            started = time.perf_counter()
            for at in range(0, count, 500):  # batches as Envoy sends them
                servicer.count(plain[at : at + 500])
            results["count_us"].append((time.perf_counter() - started) / count * 1e6)
            if FEEDS is None:  # a commit before the feeds
                continue
            log = DecisionLog(str(Path(tmp) / "d.jsonl"), 1.0, metrics, max_pending=count * rounds)
            feeds = FEEDS(Decider(TableHolder(table), metrics, log), metrics)
            servicer = access_log.DecisionLogServicer(lambda: table, metrics, feeds)
            started = time.perf_counter()
            for at in range(0, count, 500):
                servicer.feed(filed[at : at + 500], feeds)
            results["feed_us"].append((time.perf_counter() - started) / count * 1e6)
            pending = list(log._pending)
            started = time.perf_counter()
            for item in pending:
                log.line(*item)
            results["line_us"].append((time.perf_counter() - started) / max(1, len(pending)) * 1e6)
    return {name: round(statistics.median(values), 2) for name, values in results.items() if values}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(measure(args.entries, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
