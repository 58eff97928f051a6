"""Requests read back from logs, to try a change of the rules on (`graysteer diff
--requests FILE`): a decision log (serve --decision-log: JSON lines) or an Envoy access log
in the format the generated configs write (`... mirror=... 12ms h:x-user-id=u1 ...`; the
headers the rules read, `-` when the request had none). Lines of neither kind are counted
and skipped; a decision log's redacted values are left out of the request."""

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from sidecar.core import Identity, Request
from sidecar.core.identity import NO_IDENTITY
from sidecar.ops.decision_log import REDACTED, replayed_path

_ACCESS = re.compile(
    r'^\[[^\]]*\] "(?P<method>\S+) (?P<path>\S+)" \S+ \S+ cluster=\S* rule=\S* bucket=\S* lane=\S* '
    r"identity=(?P<identity>\S*) version=\S* mirror=\S* (?:\d+|-)ms(?P<rest>.*)$"
)
# A value runs to the next ` h:NAME=` or the end of the line: Envoy writes values as they
# came, spaces included.
_HEADER = re.compile(r" h:(?P<name>[^=\s]+)=(?P<value>.*?)(?= h:[^=\s]+=|$)")


@dataclass
class ReadCount:
    read: int = 0
    skipped: int = 0
    redacted: int = 0  # requests that had a value redacted: decided again without it


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
        record = json.loads(line)
        headers = {str(k): str(v) for k, v in dict(record["headers"]).items()}
        method = str(record["method"])
        path, params = replayed_path(str(record["path"]))
        port = record.get("listener_port")
    except (ValueError, KeyError, TypeError):
        return None
    kept = {k: v for k, v in headers.items() if v != REDACTED}
    if len(kept) < len(headers) or params or record.get("truncated"):
        count.redacted += 1
    return request_of(
        method, path, kept, identity_of(record.get("identity") or ""), port if isinstance(port, int) else None
    )


def from_access_log(line: str) -> Request | None:
    found = _ACCESS.match(line.rstrip("\n"))
    if found is None:
        return None
    headers = {m["name"]: m["value"] for m in _HEADER.finditer(found["rest"]) if m["value"] != "-"}
    return request_of(found["method"], found["path"], headers, identity_of(found["identity"]), None)


def read_requests(lines: IO[str], count: ReadCount) -> Iterator[Request]:
    """Every request the lines hold, decision log or access log, told apart line by line."""
    for line in lines:
        if not line.strip():
            continue
        request = from_decision_log(line, count) if line.lstrip().startswith("{") else from_access_log(line)
        if request is None:
            count.skipped += 1
            continue
        count.read += 1
        yield request
