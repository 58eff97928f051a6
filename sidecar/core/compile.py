"""Validate a parsed rules document and compile it into an immutable `Table`.

Two passes, and every problem of both is reported, never just the first:
structure by JSON Schema (unknown keys, wrong types, missing fields), then
meaning (unknown clusters, duplicate names, actions, weights, regexes as Envoy's RE2
accepts them, identity matchers). Any problem refuses the whole document: a table is never
half-loaded.
"""

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator, ValidationError

from sidecar.core.bucketing import cumulative
from sidecar.core.identity import compile_regex, identity_form_problem, identity_matcher, regex_problem
from sidecar.core.model import Coloring, Decision, Reason, Trust
from sidecar.core.request import Request
from sidecar.core.rollout import Analysis, RolloutSpec, Step, parse_duration
from sidecar.core.schema import RULES_SCHEMA
from sidecar.core.table import Condition, KeyGetter, Rule, Split, Table

DEFAULT_ROUTING_HEADER = "x-route-cluster"
DEFAULT_COLOR_HEADER = "x-graysteer-lane"
DEFAULT_BAGGAGE_KEY = "graysteer.lane"
_VALIDATOR = Draft202012Validator(RULES_SCHEMA)
_MATCH_FORMS = "exact, prefix, regex, present, absent"
_PATH_FORMS = "exact, prefix, regex"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a rules document, located by rule and field."""

    where: str  # e.g. "rule 'beta-tier' (rules[1]) field match.path.regex"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class RulesError(ValueError):
    """The rules document is invalid; `problems` lists every reason."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        lines = "\n".join(f"  {source}: {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s) in rules file\n{lines}")


def compile_table(document: Any, version: str, source: str) -> Table:
    """Validate `document` (the parsed YAML) and compile it, or raise RulesError."""
    problems = list(_schema_problems(document))
    if not problems:
        problems = list(_meaning_problems(document))
    if problems:
        raise RulesError(source, problems)
    return _compile(document, version, source)


# ---- structure -------------------------------------------------------------------------------


def _schema_problems(document: Any) -> Iterable[Problem]:
    if not isinstance(document, dict):
        yield Problem("document", f"must be a mapping of fields, got {_kind(document)}")
        return
    errors = sorted(_VALIDATOR.iter_errors(document), key=lambda e: list(map(str, e.path)))
    for error in errors:
        yield Problem(_where(document, list(error.absolute_path)), _explain(error))


def _explain(error: ValidationError) -> str:
    value: Any = error.instance
    schema: Any = error.schema
    if error.validator == "additionalProperties":
        allowed = ", ".join(schema.get("properties", {}))
        extra = ", ".join(repr(k) for k in value if k not in schema.get("properties", {}))
        return f"unknown key {extra} (allowed: {allowed})"
    if error.validator == "type":
        types: Any = error.validator_value
        wanted = " or ".join(_TYPE_NAMES[t] for t in ([types] if isinstance(types, str) else types))
        hint = ' (quote it: "1")' if isinstance(value, int | float) and "a string" in wanted else ""
        return f"must be {wanted}, got {_kind(value)} {value!r}{hint}"
    if error.validator in ("minProperties", "maxProperties") and "present" in schema.get("properties", {}):
        return f"needs exactly one of {_MATCH_FORMS}, got {sorted(value) or 'none'}"
    if error.validator in ("minProperties", "maxProperties") and "exact" in schema.get("properties", {}):
        return f"needs exactly one of {_PATH_FORMS}, got {sorted(value) or 'none'}"
    if error.validator == "required":
        return error.message.replace("is a required property", "is required")
    if error.validator == "pattern":
        return f"{value!r} is not valid (must match {error.validator_value})"
    if error.validator == "const":
        return f"must be {error.validator_value!r}, got {value!r}"
    if error.validator == "minItems" and not value:
        return "must not be empty"
    return error.message


_TYPE_NAMES = {
    "string": "a string",
    "object": "a mapping",
    "array": "a list",
    "integer": "an integer",
    "boolean": "true or false",
    "number": "a number",
}


def _kind(value: Any) -> str:
    return {
        dict: "mapping",
        list: "list",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _where(document: dict[str, Any], path: list[Any]) -> str:
    """Name the rule (by name and index) and the field a problem is in."""
    if len(path) >= 2 and path[0] == "rules" and isinstance(path[1], int):
        rules = document.get("rules") or []
        rule = rules[path[1]] if path[1] < len(rules) else None
        name = rule.get("name") if isinstance(rule, dict) else None
        label = f"rule {name!r} (rules[{path[1]}])" if isinstance(name, str) else f"rules[{path[1]}]"
        field = _dotted(path[2:])
        return f"{label} field {field}" if field else label
    return f"field {_dotted(path)}" if path else "document"


def _dotted(path: Sequence[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ---- meaning ---------------------------------------------------------------------------------


def _meaning_problems(doc: dict[str, Any]) -> Iterable[Problem]:
    clusters = set(doc["clusters"])
    known = ", ".join(doc["clusters"])

    def unknown(where: str, name: str) -> Problem:
        return Problem(where, f"unknown cluster {name!r} (clusters: {known})")

    if doc["default"] not in clusters:
        yield unknown("field default", doc["default"])
    yield from _steering_problems(doc, clusters, unknown)
    seen: dict[str, int] = {}
    for index, rule in enumerate(doc.get("rules") or []):
        path = ["rules", index]
        name = rule["name"]
        if name in seen:
            yield Problem(
                _where(doc, path + ["name"]), f"duplicate rule name (first used by rules[{seen[name]}])"
            )
        seen.setdefault(name, index)
        actions = [a for a in ("route", "split", "deny") if a in rule]
        if len(actions) != 1:
            yield Problem(
                _where(doc, path), f"needs exactly one action (route, split or deny), got {actions or 'none'}"
            )
        if "route" in rule and rule["route"] not in clusters:
            yield unknown(_where(doc, path + ["route"]), rule["route"])
        yield from _match_problems(doc, path, rule.get("match") or {})
        if "split" in rule:
            yield from _split_problems(doc, path, rule["split"], clusters, unknown)
        if "rollout" in rule:
            yield from _rollout_problems(doc, path, rule)


def _match_problems(doc: dict[str, Any], path: list[Any], match: dict[str, Any]) -> Iterable[Problem]:
    lowered: dict[str, str] = {}
    for header, form in (match.get("headers") or {}).items():
        where = path + ["match", "headers", header]
        if header.lower() in lowered:
            yield Problem(
                _where(doc, where), f"same header as {lowered[header.lower()]!r} (names are case-insensitive)"
            )
        lowered.setdefault(header.lower(), header)
        if isinstance(form, dict) and "regex" in form:
            yield from _regex_problem(doc, where + ["regex"], form["regex"])
        if isinstance(form, dict) and (form.get("present") is False or form.get("absent") is False):
            yield Problem(_where(doc, where), "use `present: true` or `absent: true`")
    if "regex" in (match.get("path") or {}):
        yield from _regex_problem(doc, path + ["match", "path", "regex"], match["path"]["regex"])
    if "identity" in match:
        yield from _identity_problem(doc, path + ["match", "identity"], match["identity"])
    if (match.get("identity") or {}).get("present") is False or (match.get("identity") or {}).get(
        "absent"
    ) is False:
        yield Problem(_where(doc, path + ["match", "identity"]), "use `present: true` or `absent: true`")


def _steering_problems(doc: dict[str, Any], clusters: set[str], unknown: Any) -> Iterable[Problem]:
    for index, form in enumerate((doc.get("trust") or {}).get("identities") or []):
        yield from _identity_problem(doc, ["trust", "identities", index], form)
    coloring = doc.get("coloring")
    if coloring is None:
        return
    for lane, cluster in coloring["lanes"].items():
        if cluster not in clusters:
            yield unknown(f"field coloring.lanes.{lane}", cluster)
    if coloring.get("fallback", doc["default"]) not in clusters:
        yield unknown("field coloring.fallback", coloring["fallback"])
    header = coloring.get("header", DEFAULT_COLOR_HEADER).lower()
    if header == doc.get("routing_header", DEFAULT_ROUTING_HEADER).lower():
        yield Problem("field coloring.header", "must differ from routing_header")


def _regex_problem(doc: dict[str, Any], path: list[Any], pattern: str) -> Iterable[Problem]:
    """RE2, as Envoy's safe_regex: what Envoy would refuse is refused here too."""
    problem = regex_problem(pattern)
    if problem:
        yield Problem(_where(doc, path), problem)


def _identity_problem(doc: dict[str, Any], path: list[Any], form: dict[str, Any]) -> Iterable[Problem]:
    """An identity matcher form (in trust.identities or a rule's match.identity), located at
    its one key."""
    problem = identity_form_problem(form)
    if problem:
        yield Problem(_where(doc, path + list(form)[:1]), problem)


def _split_problems(
    doc: dict[str, Any], path: list[Any], split: dict[str, Any], clusters: set[str], unknown: Any
) -> Iterable[Problem]:
    seen: set[str] = set()
    for i, entry in enumerate(split["to"]):
        where = _where(doc, path + ["split", "to", i, "cluster"])
        if entry["cluster"] not in clusters:
            yield unknown(where, entry["cluster"])
        elif entry["cluster"] in seen:
            yield Problem(where, f"cluster {entry['cluster']!r} appears twice in this split")
        seen.add(entry["cluster"])
    if sum(e["weight"] for e in split["to"]) <= 0:
        yield Problem(_where(doc, path + ["split", "to"]), "total weight must be greater than 0")
    missing = split.get("when_key_missing", "random")
    if missing != "random" and missing not in clusters:
        yield Problem(
            _where(doc, path + ["split", "when_key_missing"]),
            f"must be 'random' or a cluster name, got {missing!r} (clusters: {', '.join(sorted(clusters))})",
        )


def _rollout_problems(doc: dict[str, Any], path: list[Any], rule: dict[str, Any]) -> Iterable[Problem]:
    rollout = rule["rollout"]
    where = path + ["rollout"]
    if "split" not in rule:
        yield Problem(_where(doc, where), "a rollout drives a split: this rule has no split")
        return
    entries = [e["cluster"] for e in rule["split"]["to"]]
    total = sum(e["weight"] for e in rule["split"]["to"])
    if rollout["canary"] not in entries:
        yield Problem(
            _where(doc, where + ["canary"]),
            f"{rollout['canary']!r} is not an entry of this split ({', '.join(entries)})",
        )
    elif len(entries) < 2:
        yield Problem(_where(doc, where + ["canary"]), "the split needs another entry to compare")
    previous = -1
    for i, step in enumerate(rollout["steps"]):
        if step["weight"] > total:
            yield Problem(
                _where(doc, where + ["steps", i, "weight"]),
                f"{step['weight']} is more than the split's total weight {total}",
            )
        if step["weight"] < previous:
            yield Problem(
                _where(doc, where + ["steps", i, "weight"]),
                f"steps must not go down ({previous} -> {step['weight']})",
            )
        previous = step["weight"]
        if "hold" in step:
            yield from _duration_problem(doc, where + ["steps", i, "hold"], step["hold"])
        elif i < len(rollout["steps"]) - 1:
            yield Problem(_where(doc, where + ["steps", i]), "every step but the last needs a hold")
    yield from _duration_problem(doc, where + ["analysis", "window"], rollout["analysis"]["window"])


def _duration_problem(doc: dict[str, Any], path: list[Any], text: str) -> Iterable[Problem]:
    try:
        if parse_duration(text) <= 0:
            yield Problem(_where(doc, path), "must be longer than 0")
    except ValueError as error:
        yield Problem(_where(doc, path), str(error))


def _rollout_spec(rule: dict[str, Any]) -> RolloutSpec:
    rollout, split = rule["rollout"], rule["split"]
    analysis = rollout["analysis"]
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
            Step(s["weight"], parse_duration(s["hold"]) if "hold" in s else 0.0) for s in rollout["steps"]
        ),
        analysis=Analysis(
            parse_duration(analysis["window"]),
            analysis["min_requests"],
            float(analysis["max_error_rate"]),
            analysis.get("max_error_rate_vs_stable"),
            analysis.get("max_p99_ms"),
        ),
        on_failure=rollout.get("on_failure", "rollback"),
        total=sum(e["weight"] for e in split["to"]),
        fingerprint=fingerprint.hexdigest()[:12],
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
    )


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
        return Rule(name, conditions, Decision(rule["route"], name, version), None)
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
    compiled = Split(
        rule=name,
        version=version,
        keys=tuple((source, _key_getter(source)) for source in split["key"]),
        seed=split.get("seed", name),
        clusters=tuple(e["cluster"] for e in split["to"]),
        weights=weights,
        bounds=cumulative(weights),
        when_key_missing=None if missing == "random" else missing,
    )
    return Rule(name, conditions, None, compiled)


def _conditions(match: dict[str, Any]) -> Iterable[Condition]:
    for header, form in (match.get("headers") or {}).items():
        yield _header_condition(header.lower(), form)
    if "path" in match:
        yield _path_condition(match["path"])
    if "identity" in match:
        matches_identity = identity_matcher(match["identity"])
        yield lambda request: matches_identity(request.identity)
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
    if form.get("present"):
        return lambda request: name in request.headers
    return lambda request: name not in request.headers


def _path_condition(form: dict[str, Any]) -> Condition:
    if "exact" in form:
        value = form["exact"]
        return lambda request: request.path == value
    if "prefix" in form:
        prefix = form["prefix"]
        return lambda request: request.path.startswith(prefix)
    fullmatch = compile_regex(form["regex"])
    return lambda request: fullmatch(request.path)


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
