"""The decision log (`serve --decision-log PATH|-`): one JSON line per sampled decision, for
Loki, Elasticsearch or `grep`, as OPA-Envoy's decision logs.

A line holds: `time` (UTC, RFC 3339), `decision_id` (Envoy's `x-request-id`, so the line
joins the access log and the trace's `guid:x-request-id`; a random id without it),
`trace_id` and `span_id` (from the request's W3C `traceparent`, when it has one), the
`transport`, the `listener_port`, the caller's `identity` and whether it used `mtls`, the
`method` and `path` (each query parameter's value `<redacted>`, but those of the parameters
the rules' keys read), the rule-relevant `headers` (those the rules read; the values of the
headers the rules name in `decision_log.redact`, and of `authorization`,
`proxy-authorization` and `cookie` always, are `<redacted>`; of `baggage`, every member's
value but the lane member's), the untrusted headers removed
(`removed_headers`), and the `decision`'s fields (as `graysteer explain` shows them); with a
shadow table (sidecar.table.shadow), `shadow` holds its decision's fields when it differs.
`graysteer explain --from-log LINE` reads one back and decides it again.

Off the serving path, and bounded: the serving code samples (`--decision-log-sample`),
then appends a reference to a bounded deque; a writer thread builds and writes the lines. A
writer that falls behind (a slow disk, a pipe nobody reads) drops new lines and counts them
(`graysteer_decision_log_lines_total{outcome="dropped_queue_full"}`); a write error (a full
disk) drops the batch and is counted and logged once; a line over `max_line_bytes` is marked
`truncated`: each string field (path included) is cut with `...<cut>`, then header values go,
then all but the time and the decision. SIGHUP reopens the file: logrotate renames
it, then signals (or uses `copytruncate`, which needs no signal). With `--workers N` every
worker appends to the same file, one whole write per batch of lines (O_APPEND).
"""

import contextlib
import json
import logging
import os
import random
import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import IO, Any
from urllib.parse import unquote_plus

import orjson

from sidecar.core import Decision, Request, Steering, Table, decision_fields
from sidecar.ops.metrics import Metrics

log = logging.getLogger("graysteer.decision_log")

REDACTED = "<redacted>"
MAX_LINE_BYTES = 16 * 1024
MAX_PENDING = 10_000  # decisions waiting for the writer; more are dropped and counted
MAX_VALUE_CHARS = 512  # a field longer than this is cut in a line over the limit
CUT_MARK = "...<cut>"
WRITE_EVERY_SECONDS = 0.2  # the writer's pace when decisions trickle in

Pending = tuple[float, str, Request, Steering, Table, Decision | None]


class DecisionLog:
    def __init__(
        self,
        target: str,
        sample: float,
        metrics: Metrics,
        *,
        max_line_bytes: int = MAX_LINE_BYTES,
        max_pending: int = MAX_PENDING,
        chance: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < sample <= 1:
            raise ValueError(f"--decision-log-sample: expected a share above 0 and up to 1, got {sample}")
        self.target = target
        self.sample = sample
        self.metrics = metrics
        self.max_line_bytes = max_line_bytes
        self.max_pending = max_pending
        self.chance = chance
        self._pending: deque[Pending] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._reopen = threading.Event()
        self._stream: IO[str] | None = None
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="graysteer-decision-log", daemon=True)
        self._reused = LineParts()  # the writer thread's

    # -- the serving side: cheap, never blocks ----------------------------------------------

    def offer(
        self,
        transport: str,
        request: Request,
        steering: Steering,
        table: Table,
        shadow: Decision | None = None,
    ) -> None:
        """Hand a decision to the writer, when it is sampled and there is room (`shadow`: the
        shadow table's decision, when it differs)."""
        if self.sample < 1 and self.chance() >= self.sample:
            return
        if len(self._pending) >= self.max_pending:
            self.metrics.count_log("dropped_queue_full")
            return
        self._pending.append((time.time(), transport, request, steering, table, shadow))
        if len(self._pending) > 256:  # a burst: write now, not at the next beat
            self._wake.set()

    def reopen(self) -> None:
        """Open the file again before the next write (SIGHUP: logrotate moved it)."""
        self._reopen.set()
        self._wake.set()

    # -- the writer thread ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()  # opens the file itself: a FIFO nobody reads must not block here

    def close(self, timeout: float = 2.0) -> None:
        """Write what is pending (for up to `timeout` seconds); the writer then closes the
        file. A writer stuck in a write (a pipe nobody reads) closes it when the write ends,
        or is left to the process's exit."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        self._open()
        try:
            while True:
                self._wake.wait(WRITE_EVERY_SECONDS)
                self._wake.clear()
                if self._reopen.is_set():
                    self._reopen.clear()
                    self._open()
                self._write_pending()
                if self._stop.is_set():
                    return
        finally:  # the writer closes its own file: another thread would wait on a stuck write
            if self._stream is not None and self._stream is not sys.stdout:
                with contextlib.suppress(OSError):  # what was buffered could not be written: counted
                    self._stream.close()

    def _open(self) -> None:
        if self.target == "-":
            self._stream = sys.stdout
            return
        old, self._stream = self._stream, None
        if old is not None:
            with contextlib.suppress(OSError):
                old.close()
        try:
            self._stream = open(self.target, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        except OSError as error:
            self._fail(f"cannot open {self.target}: {error}")

    def _write_pending(self) -> None:
        lines = []
        while self._pending:
            lines.append(self.line(*self._pending.popleft()))
        if not lines:
            return
        if self._stream is None:
            self.metrics.count_log("dropped_write_error", len(lines))
            return
        try:
            self._stream.write("".join(lines))
            self._stream.flush()
        except (OSError, ValueError) as error:  # ValueError: a closed stream
            self.metrics.count_log("dropped_write_error", len(lines))
            self._fail(f"cannot write to {self.target}: {error}")
            return
        self.metrics.count_log("written", len(lines))
        if self._failing:
            self._failing = False
            log.info("writing decision log lines to %s again", self.target)

    def _fail(self, why: str) -> None:
        if not self._failing:
            self._failing = True
            log.error("decision log: %s; lines are dropped and counted until it works again", why)

    # -- one line ---------------------------------------------------------------------------------

    def line(
        self,
        at: float,
        transport: str,
        request: Request,
        steering: Steering,
        table: Table,
        shadow: Decision | None = None,
    ) -> str:
        """The JSON line (with its newline) for one decision, within `max_line_bytes`."""
        record = log_record(at, transport, request, steering, table, self._reused)
        if shadow is not None:
            record["shadow"] = decision_fields(shadow)
        data = dumps(record)
        if len(data) > self.max_line_bytes:
            self.metrics.count_log("truncated")
            data = within(record, self.max_line_bytes)
        return data.decode() + "\n"


def cut(value: object) -> object:
    """A string over MAX_VALUE_CHARS cut, with a marker; anything else as it is."""
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        return value[:MAX_VALUE_CHARS] + CUT_MARK
    return value


def within(record: dict[str, Any], max_bytes: int) -> bytes:
    """A record over `max_bytes` made to fit, marked `truncated`: every string field (the path,
    the decision id, the identity, each header value) cut to MAX_VALUE_CHARS; then without
    header values; then only the time and the decision; at last only the time."""
    record["truncated"] = True
    for name, value in record.items():
        record[name] = cut(value)
    record["headers"] = {name: cut(value) for name, value in record["headers"].items()}
    data = dumps(record)
    if len(data) > max_bytes:
        record["headers"] = {}
        data = dumps(record)
    if len(data) > max_bytes:
        data = dumps({"time": record["time"], "truncated": True, "decision": record["decision"]})
    if len(data) > max_bytes:
        data = dumps({"time": record["time"], "truncated": True})
    return data


def dumps(record: dict[str, Any]) -> bytes:
    """One line's JSON: orjson, or json's ASCII escapes for what is not UTF-8 (a header value
    with lone surrogates, as undecodable bytes arrive)."""
    try:
        return orjson.dumps(record)
    except orjson.JSONEncodeError:
        return json.dumps(record, separators=(",", ":")).encode()


class LineParts:
    """What the writer thread reuses from line to line: RFC 3339 UTC times with milliseconds
    (the date and time of day formatted once per second), each shared decision's fields
    (decisions are immutable and the engine shares them), each table's header names in order."""

    CACHED = 4096  # decisions whose fields are kept (then cleared)

    def __init__(self) -> None:
        self._second, self._text = -1, ""
        self._fields: dict[int, tuple[Decision, dict[str, str | int]]] = {}
        self._names: tuple[Table | None, tuple[tuple[str, ...], frozenset[str]]] = (None, ((), frozenset()))

    def time(self, at: float) -> str:
        second = int(at)
        if second != self._second:
            self._second, self._text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._text}.{int(at * 1000) % 1000:03d}Z"

    def fields(self, decision: Decision) -> dict[str, str | int]:
        known = self._fields.get(id(decision))
        if known is not None and known[0] is decision:
            return dict(known[1])  # a copy: a line's record may be changed (truncated)
        fields = decision_fields(decision)
        if len(self._fields) >= self.CACHED:
            self._fields.clear()
        self._fields[id(decision)] = (decision, fields)  # holds `decision`: its id stays its own
        return dict(fields)

    def names(self, table: Table) -> tuple[str, ...]:
        """The headers a line may show for `table` (those its rules read), sorted."""
        return self._shows(table)[0]

    def params(self, table: Table) -> frozenset[str]:
        """The query parameters whose values a line shows for `table` (its key sources')."""
        return self._shows(table)[1]

    def _shows(self, table: Table) -> tuple[tuple[str, ...], frozenset[str]]:
        if self._names[0] is not table:
            self._names = (table, (tuple(sorted(table.read_headers)), read_params(table)))
        return self._names[1]


def read_params(table: Table) -> frozenset[str]:
    """The query parameters `table`'s split (and mirror) keys read."""
    return frozenset(
        source.partition(":")[2]
        for rule in table.rules
        if rule.split is not None
        for source, _ in rule.split.keys
        if source.startswith("query:")
    )


def shown_query(query: str, kept: frozenset[str]) -> str:
    """A query string with each parameter's value <redacted> (names kept), but those of the
    parameters in `kept` (what the rules read)."""
    parts = []
    for part in query.split("&"):
        name, sep, _ = part.partition("=")
        plain = unquote_plus(name) if "%" in name or "+" in name else name
        parts.append(part if plain in kept or not sep else f"{name}={REDACTED}")
    return "&".join(parts)


def shown_baggage(baggage: str, key: str | None) -> str:
    """A baggage header with every member's value <redacted> but the lane member's (`key`)."""
    members = []
    for member in baggage.split(","):
        name = member.partition("=")[0].strip()
        if not member.strip():
            continue
        members.append(member.strip() if key and name == key else f"{name}={REDACTED}")
    return ",".join(members)


def replayed_path(path: str) -> tuple[str, list[str]]:
    """A logged path with the query parameters whose values were <redacted> left out, and their
    names: a replay decides without them, as without any redacted value."""
    base, sep, query = path.partition("?")
    if not sep:
        return path, []
    kept, redacted = [], []
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if value == REDACTED:
            redacted.append(unquote_plus(name))
        else:
            kept.append(part)
    return (base + "?" + "&".join(kept) if kept else base), redacted


def log_record(
    at: float,
    transport: str,
    request: Request,
    steering: Steering,
    table: Table,
    reused: LineParts | None = None,
) -> dict[str, Any]:
    """The fields of one decision log line (see the module docstring)."""
    headers = request.headers
    reused = reused or LineParts()
    trace_id, span_id = trace_context(headers.get("traceparent", ""))
    redacted = table.redacted_headers
    shown = {
        name: REDACTED if name in redacted else headers[name]
        for name in reused.names(table)
        if name in headers
    }
    if "baggage" in shown and shown["baggage"] != REDACTED:
        shown["baggage"] = shown_baggage(shown["baggage"], table.coloring.baggage if table.coloring else None)
    query = "?" + shown_query(request.query, reused.params(table)) if request.query else ""
    return {
        "time": reused.time(at),
        "decision_id": headers.get("x-request-id") or secrets.token_hex(16),
        "trace_id": trace_id,
        "span_id": span_id,
        "transport": transport,
        "listener_port": request.listener_port,
        "identity": steering.identity.principal or None,
        "mtls": steering.identity.mtls,
        "method": request.method,
        "path": request.path + query,
        "headers": shown,
        "removed_headers": list(steering.remove_headers),
        "decision": reused.fields(steering.decision),
    }


def trace_context(traceparent: str) -> tuple[str | None, str | None]:
    """(trace id, parent span id) of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), or
    (None, None) when it is not one (all-zero ids are invalid)."""
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None, None
    try:
        int(parts[1], 16), int(parts[2], 16)
    except ValueError:
        return None, None
    if parts[1] == "0" * 32 or parts[2] == "0" * 16 or parts[0] == "ff":
        return None, None
    return parts[1].lower(), parts[2].lower()


def open_decision_log(target: str | None, sample: float, metrics: Metrics) -> DecisionLog | None:
    """The decision log the options ask for, started; None without --decision-log."""
    if target is None:
        return None
    if target != "-":
        directory = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(directory):
            raise OSError(f"--decision-log {target}: no such directory {directory}")
    decision_log = DecisionLog(target, sample, metrics)
    decision_log.start()
    return decision_log
