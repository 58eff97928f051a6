"""Compile a validated rules document into an immutable `Table` (see `validate` for the
checks that come first: `compile_table` refuses any document they find a problem in)."""

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from sidecar.core.bucketing import cumulative
from sidecar.core.cookies import cookie_spec, well_formed
from sidecar.core.gates import DEFAULT_GATE_TIMEOUT, Gate
from sidecar.core.hosts import host_matcher
from sidecar.core.identity import identity_matcher
from sidecar.core.metric_checks import DEFAULT_QUERY_TIMEOUT, MetricCheck
from sidecar.core.model import Coloring, Decision, Reason, Trust
from sidecar.core.regex import compile_regex
from sidecar.core.request import Request
from sidecar.core.rollout import RAMP_DOWN, ROLLBACK, Analysis, RolloutSpec, Step, parse_duration
from sidecar.core.schema import (
    DEFAULT_BAGGAGE_KEY,
    DEFAULT_COLOR_HEADER,
    DEFAULT_MIRROR_HEADER,
    DEFAULT_ROUTING_HEADER,
)
from sidecar.core.table import MIRROR_BUCKETS, Condition, KeyGetter, Mirror, Rule, Split, Table
from sidecar.core.validate import Problem, RulesError, problems
from sidecar.core.versions import range_matcher
from sidecar.core.xfcc import XFCC

__all__ = ["DEFAULT_ROUTING_HEADER", "Problem", "RulesError", "compile_table"]


def compile_table(document: Any, version: str, source: str, *, validated: bool = False) -> Table:
    """Validate `document` (the parsed YAML) and compile it, or raise RulesError. With
    `validated`, the caller vouches that `problems(document)` is empty (it was checked
    elsewhere, e.g. in another process, or only weights changed within their bounds)."""
    if not validated:
        found = problems(document)
        if found:
            raise RulesError(source, found)
    return _compile(document, version, source)


def _rollout_spec(rule: dict[str, Any]) -> RolloutSpec:
    rollout, split = rule["rollout"], rule["split"]
    analysis, on_failure = rollout["analysis"], rollout.get("on_failure", ROLLBACK)
    entries = [e["cluster"] for e in split["to"]]
    # What restarts a rollout when the rules file changes: its own section, the split's
    # clusters and total; not the split's current weights, which the rollout itself sets.
    fingerprint = hashlib.sha256(
        json.dumps([rollout, entries, sum(e["weight"] for e in split["to"])], sort_keys=True).encode()
    )
    return RolloutSpec(
        rule=rule["name"],
        canary=rollout["canary"],
        baseline=next(c for c in entries if c != rollout["canary"]),
        steps=tuple(
            Step(s["weight"], parse_duration(s["hold"]) if "hold" in s else 0.0, bool(s.get("approve")))
            for s in rollout["steps"]
        ),
        analysis=Analysis(
            parse_duration(analysis["window"]),
            analysis["min_requests"],
            float(analysis["max_error_rate"]),
            analysis.get("max_error_rate_vs_stable"),
            analysis.get("max_p99_ms"),
            tuple(_metric_check(m) for m in analysis.get("metrics") or []),
        ),
        on_failure=RAMP_DOWN if isinstance(on_failure, dict) else on_failure,
        total=sum(e["weight"] for e in split["to"]),
        fingerprint=fingerprint.hexdigest()[:12],
        ramp_down=parse_duration(on_failure["ramp_down"]) if isinstance(on_failure, dict) else 0.0,
        gates=tuple(
            Gate(g["url"], g["before"], parse_duration(g.get("timeout", f"{DEFAULT_GATE_TIMEOUT:g}s")))
            for g in rollout.get("gates") or []
        ),
    )


def _metric_check(metric: dict[str, Any]) -> MetricCheck:
    return MetricCheck(
        metric["name"],
        metric["query"],
        metric.get("max"),
        metric.get("min"),
        metric.get("max_vs_baseline"),
        metric.get("min_vs_baseline"),
        bool(metric.get("dry_run")),
        parse_duration(metric["timeout"]) if "timeout" in metric else DEFAULT_QUERY_TIMEOUT,
    )


# ---- compile ---------------------------------------------------------------------------------


def _compile(doc: dict[str, Any], version: str, source: str) -> Table:
    rules = tuple(_compile_rule(r, version, doc["default"]) for r in doc.get("rules") or [])
    coloring = _coloring(doc)
    return Table(
        version=version,
        source=source,
        clusters=tuple(doc["clusters"]),
        default=doc["default"],
        routing_header=doc.get("routing_header", DEFAULT_ROUTING_HEADER).lower(),
        rules=rules,
        document=doc,
        trust=_trust(doc.get("trust") or {}, coloring),
        coloring=coloring,
        deny_rules=tuple(r for r in rules if r.route is not None and r.route.deny_status),
        rollouts={r["name"]: _rollout_spec(r) for r in doc.get("rules") or [] if "rollout" in r},
        version_headers=frozenset(_version_headers(doc)),
        mirror_header=doc.get("mirror_header", DEFAULT_MIRROR_HEADER).lower(),
        read_headers=frozenset(read_headers(doc)),
        redacted_headers=ALWAYS_REDACTED
        | {h.lower() for h in (doc.get("decision_log") or {}).get("redact") or []},
    )


# Credentials never reach a decision log, whatever the rules say.
ALWAYS_REDACTED = frozenset(("authorization", "proxy-authorization", "cookie"))


def read_headers(doc: dict[str, Any]) -> Iterable[str]:
    """Every header the rules read: match conditions (a host is `:authority`, a gRPC method
    `:path`), split and mirror keys (`cookie:` reads `cookie`; `query:` reads the path),
    the trust's override headers, the coloring header and baggage, XFCC when trusted."""
    for rule in doc.get("rules") or []:
        match = rule.get("match") or {}
        yield from (header.lower() for header in match.get("headers") or {})
        if "host" in match:
            yield ":authority"
        for source in (rule.get("split") or {}).get("key") or []:
            kind, _, name = source.partition(":")
            if kind == "header":
                yield name.lower()
            elif kind == "cookie":
                yield "cookie"
        if isinstance((rule.get("split") or {}).get("when_key_missing"), dict):
            yield "cookie"
    trust = doc.get("trust") or {}
    yield from (header.lower() for header in trust.get("override_headers") or [])
    if trust.get("xfcc"):
        yield XFCC
    coloring = doc.get("coloring")
    if coloring is not None:
        yield coloring.get("header", DEFAULT_COLOR_HEADER).lower()
        if coloring.get("baggage", DEFAULT_BAGGAGE_KEY):
            yield "baggage"


def _version_headers(doc: dict[str, Any]) -> Iterable[str]:
    """The headers some rule reads as a version (a value that is not one is counted)."""
    for rule in doc.get("rules") or []:
        for header, form in ((rule.get("match") or {}).get("headers") or {}).items():
            if isinstance(form, dict) and "semver" in form:
                yield header.lower()


def _trust(trust: dict[str, Any], coloring: Coloring | None) -> Trust:
    protected = {h.lower() for h in trust.get("override_headers") or []}
    if coloring is not None:
        protected.add(coloring.header)
    return Trust(
        identities=tuple(identity_matcher(form) for form in trust.get("identities") or []),
        plaintext=bool(trust.get("plaintext", False)),
        listener_ports=frozenset(trust.get("listener_ports") or ()),
        xfcc=bool(trust.get("xfcc", False)),
        protected=frozenset(protected),
    )


def _coloring(doc: dict[str, Any]) -> Coloring | None:
    coloring = doc.get("coloring")
    if coloring is None:
        return None
    lanes = dict(coloring["lanes"])
    lane_of: dict[str, str] = {}
    for lane, cluster in lanes.items():
        lane_of.setdefault(cluster, lane)
    return Coloring(
        header=coloring.get("header", DEFAULT_COLOR_HEADER).lower(),
        baggage=coloring.get("baggage", DEFAULT_BAGGAGE_KEY),
        lanes=lanes,
        fallback=coloring.get("fallback", doc["default"]),
        lane_of=lane_of,
    )


def _compile_rule(rule: dict[str, Any], version: str, default: str) -> Rule:
    name = rule["name"]
    conditions = tuple(_conditions(rule.get("match") or {}))
    if "route" in rule:
        return Rule(name, conditions, Decision(rule["route"], name, version), None, _mirror(rule, None))
    if "deny" in rule:
        deny = rule["deny"]
        body = deny.get("reason") or f"denied by rule {name}"
        return Rule(
            name,
            conditions,
            Decision(
                default, name, version, reason=Reason.DENY, deny_status=deny["status"], deny_reason=body
            ),
            None,
        )
    split = rule["split"]
    weights = tuple(e["weight"] for e in split["to"])
    missing = split.get("when_key_missing", "random")
    assign = cookie_spec(missing["assign"]) if isinstance(missing, dict) else None
    sources = list(split["key"])
    if assign is not None and assign.source not in sources:
        sources.append(assign.source)  # a visitor who comes back is bucketed by the cookie
    compiled = Split(
        rule=name,
        version=version,
        keys=tuple(
            (
                source,
                _assigned_getter(assign.name) if assign and source == assign.source else _key_getter(source),
            )
            for source in sources
        ),
        seed=split.get("seed", name),
        clusters=tuple(e["cluster"] for e in split["to"]),
        weights=weights,
        bounds=cumulative(weights),
        when_key_missing=None if missing == "random" or assign is not None else missing,
        assign=assign,
    )
    return Rule(name, conditions, None, compiled, _mirror(rule, compiled))


def _mirror(rule: dict[str, Any], split: Split | None) -> Mirror | None:
    if "mirror" not in rule:
        return None
    mirror = rule["mirror"]
    share = max(1, round(float(mirror["percent"]) * MIRROR_BUCKETS / 100))
    seed = (split.seed if split is not None else rule["name"]) + "/mirror"
    return Mirror(mirror["cluster"], share, split.keys if split is not None else (), seed)


def _conditions(match: dict[str, Any]) -> Iterable[Condition]:
    for header, form in (match.get("headers") or {}).items():
        yield _header_condition(header.lower(), form)
    if "path" in match:
        yield _path_condition(match["path"])
    if "identity" in match:
        matches_identity = identity_matcher(match["identity"])
        yield lambda request: matches_identity(request.identity)
    if "host" in match:
        hosts = match["host"]
        matches_host = host_matcher([hosts] if isinstance(hosts, str) else hosts)
        yield lambda request: matches_host(request.headers.get(":authority") or request.headers.get("host"))
    if "grpc" in match:
        yield _grpc_condition(match["grpc"])
    if "method" in match:
        methods = match["method"]
        allowed = frozenset(m.upper() for m in ([methods] if isinstance(methods, str) else methods))
        yield lambda request: request.method in allowed


def _header_condition(name: str, form: str | dict[str, Any]) -> Condition:
    if isinstance(form, str):
        form = {"exact": form}
    if "exact" in form:
        value = form["exact"]
        return lambda request: request.headers.get(name) == value
    if "prefix" in form:
        prefix = form["prefix"]
        return lambda request: request.headers.get(name, "").startswith(prefix)
    if "regex" in form:
        fullmatch = compile_regex(form["regex"])
        return lambda request: (v := request.headers.get(name)) is not None and fullmatch(v)
    if "semver" in form:
        in_range = range_matcher(form["semver"])
        return lambda request: (v := request.headers.get(name)) is not None and in_range(v)
    if form.get("present"):
        return lambda request: name in request.headers
    return lambda request: name not in request.headers


def _grpc_condition(form: dict[str, str]) -> Condition:
    """A gRPC call's path is `/<package.Service>/<Method>`."""
    service = f"/{form['service']}/"
    if "method" in form:
        path = service + form["method"]
        return lambda request: request.path == path
    return lambda request: request.path.startswith(service) and "/" not in request.path[len(service) :]


def _path_condition(form: dict[str, Any]) -> Condition:
    if "exact" in form:
        value = form["exact"]
        return lambda request: request.path == value
    if "prefix" in form:
        prefix = form["prefix"]
        return lambda request: request.path.startswith(prefix)
    fullmatch = compile_regex(form["regex"])
    return lambda request: fullmatch(request.path)


def _assigned_getter(name: str) -> KeyGetter:
    """The issued cookie as a key: only a value of the shape issued, else missing (a new key)."""
    return lambda request: well_formed(request.cookie(name))


def _key_getter(source: str) -> KeyGetter:
    if source == "identity":  # callers sticky by workload identity
        return lambda request: request.identity.principal or None
    kind, _, name = source.partition(":")
    if kind == "header":
        name = name.lower()
        return lambda request: request.headers.get(name)
    if kind == "cookie":
        return lambda request: request.cookie(name)
    return lambda request: request.query_param(name)


__all__ = ["DEFAULT_ROUTING_HEADER", "Problem", "Request", "RulesError", "compile_table"]
