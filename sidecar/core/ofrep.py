"""OpenFeature remote evaluation (OFREP) mapped onto a table: pure, no I/O.

Applications ask "for this user, which lane?" and get the router's own answer:

- every split rule is a flag named after the rule. Its variant and value are the cluster the
  context's key is bucketed into, with the split's current weights (runtime weights and
  rollout steps included), by the router's bucketing (sidecar.core.bucketing). The key is
  the first of the split's own key sources the context names (`header:x-user-id`,
  `cookie:uid`, `query:gray_id`, `identity`), in the split's order, as the router reads a
  request; else the context's `targetingKey`. The rule's conditions are not checked: the
  flag answers for the requests that reach the rule. No key: TARGETING_KEY_MISSING (the
  router would pick at random or send the request to `when_key_missing`: no lane of a user);
- the flag TABLE_FLAG decides the context as a request, through the whole table (deny,
  lanes, trust, routes, splits, default), as `graysteer explain` does: see `as_request`.

The answers follow OFREP's schema (open-feature/protocol service/openapi.yaml): an
evaluation success (key, value, variant, reason, metadata) or failure (key, errorCode,
errorDetails). Reasons and error codes come from closed sets (OfrepReason, OfrepError).
"""

import hashlib
import json
from collections.abc import Mapping
from enum import StrEnum
from typing import Any
from urllib.parse import urlencode

from sidecar.core.bucketing import bucket, entry_for
from sidecar.core.engine import Engine
from sidecar.core.identity import NO_IDENTITY
from sidecar.core.model import Reason, decision_fields
from sidecar.core.request import DEFAULT_AUTHORITY, Request
from sidecar.core.table import Split, Table
from sidecar.core.text import unencodable, why_unencodable
from sidecar.core.xfcc import identity_from_first_sans

TABLE_FLAG = "_cluster"  # no rule can have this name: rule names begin with a letter or digit
TARGETING_KEY = "targetingKey"
MAPPING_VERSION = "ofrep-1"  # part of every ETag: a change of this mapping changes every answer
# Context attributes read as the request's own fields (TABLE_FLAG); "header:", "cookie:" and
# "query:" attributes name one header, cookie or query parameter each.
REQUEST_FIELDS = ("method", "path", "host", "identity")
KEY_KINDS = ("header:", "cookie:", "query:")
# Objects and lists within a context, at most: the checks below (and the ETag's encoding)
# recurse, and orjson reads up to 1,024 levels, past Python's recursion limit.
MAX_CONTEXT_DEPTH = 32


class OfrepReason(StrEnum):
    """The OpenFeature reasons these flags give."""

    TARGETING_MATCH = "TARGETING_MATCH"  # a rule decided (a route, a lane, a deny)
    SPLIT = "SPLIT"  # a weighted split decided
    DEFAULT = "DEFAULT"  # no rule matched: the table's default cluster


class OfrepError(StrEnum):
    """OFREP's error codes (FLAG_NOT_FOUND is answered 404, the others 400)."""

    FLAG_NOT_FOUND = "FLAG_NOT_FOUND"
    PARSE_ERROR = "PARSE_ERROR"
    TARGETING_KEY_MISSING = "TARGETING_KEY_MISSING"
    INVALID_CONTEXT = "INVALID_CONTEXT"
    GENERAL = "GENERAL"


# Graysteer's reason of a decision -> OpenFeature's. FALLBACK (deciding failed) is an error.
_REASONS = {
    Reason.ROUTE: OfrepReason.TARGETING_MATCH,
    Reason.LANE: OfrepReason.TARGETING_MATCH,
    Reason.DENY: OfrepReason.TARGETING_MATCH,
    Reason.SPLIT: OfrepReason.SPLIT,
    Reason.DEFAULT: OfrepReason.DEFAULT,
}
# Decision fields never given back: the identity is the caller's own input.
_HIDDEN = frozenset({"identity"})


class Failure(Exception):
    """An evaluation that has no value: its OFREP error code and a message for the caller."""

    def __init__(self, code: OfrepError, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details

    def answer(self, key: str | None) -> dict[str, object]:
        body: dict[str, object] = {"errorCode": str(self.code), "errorDetails": self.details}
        return body if key is None else {"key": key, **body}


Context = Mapping[str, Any]


def read_context(document: object) -> Context:
    """The evaluation context of a decoded request body (`{"context": {...}}`), checked:
    Failure(PARSE_ERROR) when the body is no JSON object, Failure(INVALID_CONTEXT) when the
    context is no object, one of the attributes read here (REQUEST_FIELDS, `targetingKey`,
    `header:`/`cookie:`/`query:` ones) is no string, or any string in it (keys included) is
    no UTF-8 text (a lone surrogate: it must never reach mmh3 or re2, see sidecar.core.text).
    A body without a context has an empty one (the Python provider sends `{}` then)."""
    if not isinstance(document, dict):
        raise Failure(OfrepError.PARSE_ERROR, 'the body must be a JSON object: {"context": {...}}')
    context = document.get("context", {})
    if not isinstance(context, dict):
        raise Failure(OfrepError.INVALID_CONTEXT, "the context must be a JSON object")
    if _too_deep(context, MAX_CONTEXT_DEPTH):
        raise Failure(OfrepError.INVALID_CONTEXT, f"the context nests deeper than {MAX_CONTEXT_DEPTH} levels")
    for path, text in unencodable(context):
        where = ".".join(str(part) for part in path) or "a key"
        raise Failure(OfrepError.INVALID_CONTEXT, f"context {where}: {why_unencodable(text)}")
    for name, value in context.items():
        if _is_read(name) and not isinstance(value, str):
            raise Failure(OfrepError.INVALID_CONTEXT, f"context attribute {name!r} must be a string")
    return context


def _too_deep(value: object, limit: int) -> bool:
    """Whether objects and lists nest in `value` deeper than `limit` (walked without recursion)."""
    level: list[dict[str, Any] | list[Any]] = [value] if isinstance(value, dict | list) else []
    for _ in range(limit):
        level = [
            item
            for container in level
            for item in (container.values() if isinstance(container, dict) else container)
            if isinstance(item, dict | list)
        ]
        if not level:
            return False
    return True


def _is_read(name: str) -> bool:
    return name == TARGETING_KEY or name in REQUEST_FIELDS or name.startswith(KEY_KINDS)


def flag_keys(table: Table) -> list[str]:
    """Every flag of `table`: its split rules, in table order, then TABLE_FLAG."""
    return [rule.name for rule in table.rules if rule.split is not None] + [TABLE_FLAG]


def etag(table: Table, context: Context) -> str:
    """The bulk answer's entity tag: changes with the table (its version, which holds the
    runtime weights and rollout steps, and every split's weights, seed and keys) and with
    the context, so a tag is never taken for another context's answers."""
    splits = [
        [r.name, r.split.seed, [s for s, _ in r.split.keys], r.split.clusters, r.split.weights]
        for r in table.rules
        if r.split is not None
    ]
    state = [MAPPING_VERSION, table.version, table.default, splits, context]
    digest = hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()
    return f'"{digest[:32]}"'


def evaluate(engine: Engine, key: str, context: Context) -> dict[str, object]:
    """One flag's OFREP evaluation success; Failure when it has no value."""
    table = engine.table
    if key == TABLE_FLAG:
        return _whole_table(engine, context)
    rule = table.rule(key)
    if rule is None or rule.split is None:
        flags = ", ".join(flag_keys(table))
        raise Failure(OfrepError.FLAG_NOT_FOUND, f"no flag {key!r} (flags: {flags})")
    return _split_flag(rule.split, context)


def evaluate_all(engine: Engine, context: Context) -> list[dict[str, object]]:
    """Every flag's evaluation, a failure in place of each that has no value."""
    answers = []
    for key in flag_keys(engine.table):
        try:
            answers.append(evaluate(engine, key, context))
        except Failure as failure:
            answers.append(failure.answer(key))
    return answers


def _split_flag(split: Split, context: Context) -> dict[str, object]:
    found = split_key(split, context)
    if found is None:
        names = ", ".join([*(source for source, _ in split.keys), TARGETING_KEY])
        raise Failure(OfrepError.TARGETING_KEY_MISSING, f"flag {split.rule!r} needs one of: {names}")
    source, key = found
    b = bucket(split.seed, key, split.total)
    cluster = split.clusters[entry_for(split.bounds, b)]
    metadata: dict[str, object] = {"rule": split.rule, "bucket": b, "key_source": source}
    metadata["version"] = split.version
    return _success(split.rule, cluster, OfrepReason.SPLIT, metadata)


def split_key(split: Split, context: Context) -> tuple[str, str] | None:
    """(source, key) of the split's first key source the context names with a non-empty
    value (header names compared without case), else of `targetingKey`; None without one."""
    headers = _headers(context)
    for source, _ in split.keys:
        kind, _, name = source.partition(":")
        value = headers.get(name.lower()) if kind == "header" else context.get(source)
        if isinstance(value, str) and value:
            return source, value
    target = context.get(TARGETING_KEY)
    return (TARGETING_KEY, target) if isinstance(target, str) and target else None


def _headers(context: Context) -> dict[str, str]:
    """The `header:NAME` attributes by lower-case name (the first of names equal but for case)."""
    headers: dict[str, str] = {}
    for name, value in context.items():
        if name.startswith("header:") and isinstance(value, str):
            headers.setdefault(name[len("header:") :].lower(), value)
    return headers


def as_request(context: Context) -> Request:
    """The request a context stands for (TABLE_FLAG), built as `graysteer explain` builds one:
    `method` (default GET), `path` (default /, may hold a query), `host` (the authority,
    default DEFAULT_AUTHORITY), `header:NAME`, `cookie:NAME` (one Cookie header),
    `query:NAME` (added to the path's query), and `identity`: the caller's SPIFFE ID
    (spiffe://...) or DNS name, as if it came over mTLS with that certificate. Other
    attributes, `targetingKey` among them, are not part of a request and are not read."""
    method = str(context.get("method") or "GET").upper()
    path = str(context.get("path") or "/")
    params = [(n[len("query:") :], str(v)) for n, v in context.items() if n.startswith("query:")]
    if params:
        path += ("&" if "?" in path else "?") + urlencode(params)
    headers: dict[str, str] = {":method": method, ":path": path, ":scheme": "http"}
    headers[":authority"] = str(context.get("host") or DEFAULT_AUTHORITY)
    for name, value in _headers(context).items():
        if not name.startswith(":") and name != "host":  # the pseudo-headers come from the fields
            headers[name] = value
    cookies = [f"{n[len('cookie:') :]}={v}" for n, v in context.items() if n.startswith("cookie:")]
    if cookies:
        headers["cookie"] = "; ".join([*filter(None, [headers.get("cookie", "")]), *cookies])
    caller = str(context.get("identity") or "")
    identity = NO_IDENTITY
    if caller:  # as Envoy's attributes give a certificate's first URI SAN and first DNS SAN
        spiffe = caller.startswith("spiffe://")
        identity = identity_from_first_sans(caller if spiffe else "", "" if spiffe else caller, "", None)
    return Request(headers, method, path, identity)


def _whole_table(engine: Engine, context: Context) -> dict[str, object]:
    try:
        decision = engine.steer(as_request(context)).decision
    except Exception as error:  # a bug, or input the engine cannot handle: no value, never a crash
        what = f"the table could not decide this context ({type(error).__name__})"
        raise Failure(OfrepError.GENERAL, what) from None
    reason = _REASONS.get(decision.reason)
    if reason is None or decision.error is not None:
        raise Failure(OfrepError.GENERAL, "the table could not decide this context")
    metadata = {k: v for k, v in decision_fields(decision).items() if k not in _HIDDEN}
    return _success(TABLE_FLAG, decision.cluster, reason, metadata)


def _success(key: str, cluster: str, reason: OfrepReason, metadata: dict[str, Any]) -> dict[str, object]:
    return {"key": key, "value": cluster, "variant": cluster, "reason": str(reason), "metadata": metadata}
