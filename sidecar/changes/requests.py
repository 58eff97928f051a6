"""Requests read back from logs, to try a change of the rules on (`graysteer diff
--requests FILE`): a decision log (serve --decision-log: JSON lines) or an Envoy access log
in the format the generated configs write (`... mirror=... 12ms h:x-user-id=u1 ...`; the
headers the rules read, `-` when the request had none). Lines of neither kind are counted
and skipped; a decision log's redacted values are left out of the request.

Each line is read on its own, within bounds: a line over MAX_LINE_CHARS, JSON nested deeper
than orjson's limit (1,024), or an access log line that cannot be read one way only is
counted as unreadable and the run goes on. Requests are yielded one at a time: a caller that
aggregates as it goes (sidecar.core.diff.compare) holds none of them.

Envoy writes header values as they came, spaces included, so ` h:x-canary=1` inside a
value looks like one more header. An access log line is therefore read against the header
names a generated config logs (sidecar.envoyconf.generate.logged_headers of a table): each
` h:NAME=` of them must be there exactly once, in that order. A value holding another such
name's ` h:NAME=` makes the line ambiguous: it is counted, never guessed.
"""

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from sidecar.core import Identity, Request
from sidecar.core.identity import NO_IDENTITY
from sidecar.ops.decision_log import REDACTED, replayed_path

MAX_LINE_CHARS = 64 * 1024  # a decision log line is at most 16 KiB; an access log line, Envoy's

_ACCESS = re.compile(
    r'^\[[^\]]*\] "(?P<method>\S+) (?P<path>\S+)" \S+ \S+ cluster=\S* rule=\S* bucket=\S* lane=\S* '
    r"identity=(?P<identity>\S*) version=\S* mirror=\S* (?:\d+|-)ms(?P<rest>.*)"
)


class Unreadable(ValueError):
    """A line of a log kind that cannot be read (too long, too deep, ambiguous)."""


@dataclass
class ReadCount:
    read: int = 0
    skipped: int = 0  # lines of neither kind
    unreadable: int = 0  # too long, nested too deep, or an ambiguous access log line
    redacted: int = 0  # requests that had a value redacted or cut: decided again without it


def identity_of(principal: str) -> Identity:
    if not principal or principal == "-":
        return NO_IDENTITY
    if principal.startswith("spiffe://"):
        return Identity.from_sans(True, (principal,))
    return Identity.from_sans(True, dns_sans=(principal,))


def request_of(
    method: str, path: str, headers: dict[str, str], identity: Identity, port: int | None
) -> Request:
    return Request({**headers, ":method": method, ":path": path}, method, path, identity, port)


def from_decision_log(line: str, count: ReadCount) -> Request | None:
    try:
        record: Any = orjson.loads(line)
    except orjson.JSONDecodeError as error:
        if "depth" in str(error):
            raise Unreadable("nested too deep") from None
        if "surrogate" in str(error):  # a "\ud800" escape: text no C extension may be given
            raise Unreadable("holds a lone surrogate: not UTF-8 text") from None
        return None
    try:
        headers = {str(k): str(v) for k, v in dict(record["headers"]).items()}
        method = str(record["method"])
        path, params = replayed_path(str(record["path"]))
        port = record.get("listener_port")
        principal = str(record.get("identity") or "")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    kept = {k: v for k, v in headers.items() if v != REDACTED}
    if len(kept) < len(headers) or params or record.get("truncated"):
        count.redacted += 1
    return request_of(method, path, kept, identity_of(principal), port if isinstance(port, int) else None)


def logged_values(rest: str, names: Sequence[str]) -> dict[str, str] | None:
    """`rest` read as ` h:NAME=VALUE` for exactly `names`, in order (None: not these names);
    Unreadable when one of them is there more than once."""
    starts = []
    for name in names:
        marker = f" h:{name}="
        at = rest.find(marker)
        if at < 0:
            return None
        if rest.find(marker, at + 1) >= 0:
            raise Unreadable(f"ambiguous: h:{name}= more than once")
        starts.append((at, len(marker), name))
    if [s[0] for s in starts] != sorted(s[0] for s in starts) or (starts and starts[0][0] != 0):
        return None
    if not starts and rest:
        return None
    ends = [s[0] for s in starts[1:]] + [len(rest)]
    values = {name: rest[at + size : end] for (at, size, name), end in zip(starts, ends, strict=True)}
    return {name: value for name, value in values.items() if value != "-"}


def from_access_log(line: str, logged: Sequence[Sequence[str]]) -> Request | None:
    """A request of an access log line whose headers are one of the `logged` lists of names."""
    found = _ACCESS.fullmatch(line.rstrip("\n"))
    if found is None:
        return None
    for names in logged:
        headers = logged_values(found["rest"], names)
        if headers is not None:
            return request_of(found["method"], found["path"], headers, identity_of(found["identity"]), None)
    raise Unreadable("its headers are none of the ones the rules log")


def read_requests(
    lines: Iterable[str], count: ReadCount, logged: Sequence[Sequence[str]]
) -> Iterator[Request]:
    """Every request the lines hold, decision log or access log, told apart line by line,
    one at a time (`logged`: the lists of header names an access log line may carry)."""
    for line in lines:
        if not line.strip():
            continue
        try:
            if len(line) > MAX_LINE_CHARS:
                raise Unreadable("too long")
            json = line.lstrip().startswith("{")
            request = from_decision_log(line, count) if json else from_access_log(line, logged)
        except Unreadable:
            count.unreadable += 1
            continue
        if request is None:
            count.skipped += 1
            continue
        count.read += 1
        yield request
