"""Validate a parsed rules document: every problem, located by rule and field.

Two passes, and every problem of both is reported, never just the first: structure by JSON
Schema (unknown keys, wrong types, missing fields), then meaning (unknown clusters,
duplicate names, actions, weights, regexes as Envoy's RE2 accepts them, identity matchers).
`compile` refuses a document with any problem: a table is never half-loaded.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from jsonschema import ValidationError

from sidecar.core.checker import Validator
from sidecar.core.cookies import assign_problems, cookie_spec
from sidecar.core.gates import MAX_GATE_TIMEOUT
from sidecar.core.hosts import host_problem
from sidecar.core.identity import identity_form_problem
from sidecar.core.metric_checks import MAX_QUERY_TIMEOUT, query_problem
from sidecar.core.regex import regex_problem
from sidecar.core.rollout import parse_duration
from sidecar.core.schema import (
    DEFAULT_COLOR_HEADER,
    DEFAULT_MIRROR_HEADER,
    DEFAULT_ROUTING_HEADER,
    RULES_SCHEMA,
)
from sidecar.core.text import unencodable, why_unencodable
from sidecar.core.versions import range_problem

_VALIDATOR = Validator(RULES_SCHEMA)
_MATCH_FORMS = "exact, prefix, regex, semver, present, absent"
_PATH_FORMS = "exact, prefix, regex"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a rules document, located by rule and field."""

    where: str  # e.g. "rule 'beta-tier' (rules[1]) field match.path.regex"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


MAX_PROBLEM_TEXT = 300  # characters of one problem: values from the file are quoted in them
MAX_PROBLEMS_LISTED = 50


def _short(text: str) -> str:
    return text if len(text) <= MAX_PROBLEM_TEXT else f"{text[:MAX_PROBLEM_TEXT]}... (truncated)"


class RulesError(ValueError):
    """The rules document is invalid; `problems` lists every reason. The message lists at
    most MAX_PROBLEMS_LISTED of them, each cut to MAX_PROBLEM_TEXT characters, so that a
    hostile file cannot make a huge error (it is logged, stored and sent by the admin API)."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems = tuple(Problem(_short(p.where), _short(p.message)) for p in problems)
        listed = self.problems[:MAX_PROBLEMS_LISTED]
        lines = "\n".join(f"  {source}: {p}" for p in listed)
        more = len(self.problems) - len(listed)
        tail = f"\n  ... and {more} more" if more else ""
        super().__init__(f"{source}: {len(self.problems)} problem(s) in rules file\n{lines}{tail}")

    def __reduce__(self) -> tuple[type["RulesError"], tuple[str, tuple[Problem, ...]]]:
        return RulesError, (self.source, self.problems)  # across processes (table.documents)


def problems(document: Any) -> list[Problem]:
    """Every problem of `document` (the parsed YAML): text that is not UTF-8 first (nothing
    else is read while a string could crash a C extension), then structure, then, when the
    structure holds, meaning. Empty when it is valid."""
    found = _text_problems(document)
    if found:
        return found
    found = list(_schema_problems(document))
    if not found:
        found = list(_meaning_problems(document))
    return found


def _text_problems(document: Any) -> list[Problem]:
    """A problem for each string, key or value, that cannot be encoded as UTF-8 (see text.py)."""
    where = document if isinstance(document, dict) else {}
    return [
        Problem(_where(where, list(path)), f"{text!r} {why_unencodable(text)}")
        for path, text in unencodable(document)
    ]


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
    if error.validator == "enum":
        choices: Any = error.validator_value
        return f"must be one of {', '.join(map(str, choices))}, got {value!r}"
    if error.validator == "const":
        return f"must be {error.validator_value!r}, got {value!r}"
    if error.validator == "minItems" and not value:
        return "must not be empty"
    if error.validator == "oneOf" and "description" in schema:
        return f"must be {schema['description']}, got {value!r}"
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
    mirror_header = doc.get("mirror_header", DEFAULT_MIRROR_HEADER).lower()
    if mirror_header == doc.get("routing_header", DEFAULT_ROUTING_HEADER).lower():
        yield Problem("field mirror_header", f"must differ from routing_header ({mirror_header!r})")
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
        if "mirror" in rule:
            yield from _mirror_problems(doc, path, rule, clusters, unknown)
        yield from _match_problems(doc, path, rule.get("match") or {})
        if "split" in rule:
            yield from _split_problems(doc, path, rule["split"], clusters, unknown)
        if "rollout" in rule:
            yield from _rollout_problems(doc, path, rule)
    yield from _cookie_conflicts(doc)


def _cookie_conflicts(doc: dict[str, Any]) -> Iterable[Problem]:
    """One cookie name, one set of attributes: two rules issuing it differently would rewrite
    each other's cookie on every visit."""
    first: dict[str, tuple[int, Any]] = {}
    for index, rule in enumerate(doc.get("rules") or []):
        missing = (rule.get("split") or {}).get("when_key_missing")
        if not isinstance(missing, dict) or assign_problems(missing["assign"]):
            continue
        spec = cookie_spec(missing["assign"])
        seen = first.setdefault(spec.name, (index, spec))
        if seen[1] != spec:
            yield Problem(
                _where(doc, ["rules", index, "split", "when_key_missing", "assign"]),
                f"cookie {spec.name!r} is also issued by rules[{seen[0]}] with other attributes: "
                "give both the same, or another name",
            )


def _mirror_problems(
    doc: dict[str, Any], path: list[Any], rule: dict[str, Any], clusters: set[str], unknown: Any
) -> Iterable[Problem]:
    cluster = rule["mirror"]["cluster"]
    if cluster not in clusters:
        yield unknown(_where(doc, path + ["mirror", "cluster"]), cluster)
    if "deny" in rule:
        yield Problem(_where(doc, path + ["mirror"]), "a deny rule forwards nothing to mirror")
    if rule.get("route") == cluster:
        yield Problem(_where(doc, path + ["mirror", "cluster"]), f"the rule already routes to {cluster!r}")


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
        if isinstance(form, dict) and "semver" in form and (problem := range_problem(form["semver"])):
            yield Problem(_where(doc, where + ["semver"]), problem)
        if isinstance(form, dict) and (form.get("present") is False or form.get("absent") is False):
            yield Problem(_where(doc, where), "use `present: true` or `absent: true`")
    if "regex" in (match.get("path") or {}):
        yield from _regex_problem(doc, path + ["match", "path", "regex"], match["path"]["regex"])
    if "identity" in match:
        yield from _identity_problem(doc, path + ["match", "identity"], match["identity"])
    hosts = match.get("host")
    for index, pattern in enumerate([hosts] if isinstance(hosts, str) else hosts or []):
        if problem := host_problem(pattern):
            where = ["match", "host"] if isinstance(hosts, str) else ["match", "host", index]
            yield Problem(_where(doc, path + where), problem)
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
    fallback = coloring.get("fallback")  # absent: `default`, checked on its own
    if fallback is not None and fallback not in clusters:
        yield unknown("field coloring.fallback", fallback)
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
    if isinstance(missing, dict):
        for field, problem in assign_problems(missing["assign"]):
            yield Problem(_where(doc, path + ["split", "when_key_missing", "assign", field]), problem)
    elif missing != "random" and missing not in clusters:
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
    if rollout["steps"][-1].get("approve"):
        yield Problem(
            _where(doc, where + ["steps", len(rollout["steps"]) - 1, "approve"]),
            "the last step is the promotion and waits for nothing: put approve on the step before it "
            "(it then waits for `graysteer rollout approve` before promoting)",
        )
    yield from _duration_problem(doc, where + ["analysis", "window"], rollout["analysis"]["window"])
    on_failure = rollout.get("on_failure")
    if isinstance(on_failure, dict):
        yield from _duration_problem(doc, where + ["on_failure", "ramp_down"], on_failure["ramp_down"])
    for i, gate in enumerate(rollout.get("gates") or []):
        yield from _gate_problems(doc, where + ["gates", i], gate)
    names: set[str] = set()
    for i, metric in enumerate(rollout["analysis"].get("metrics") or []):
        metric_path = where + ["analysis", "metrics", i]
        if metric["name"] in names:
            yield Problem(_where(doc, metric_path + ["name"]), f"metric {metric['name']!r} appears twice")
        names.add(metric["name"])
        yield from _metric_problems(doc, metric_path, metric)


def _metric_problems(doc: dict[str, Any], path: list[Any], metric: dict[str, Any]) -> Iterable[Problem]:
    bounds = ("max", "min", "max_vs_baseline", "min_vs_baseline")
    if not any(bound in metric for bound in bounds):
        yield Problem(_where(doc, path), f"a metric needs a threshold: one or more of {', '.join(bounds)}")
    for low, high in (("min", "max"), ("min_vs_baseline", "max_vs_baseline")):
        if low in metric and high in metric and metric[low] > metric[high]:
            yield Problem(_where(doc, path + [low]), f"{metric[low]} is above {high} {metric[high]}")
    problem = query_problem(metric["query"])
    if problem is not None:
        yield Problem(_where(doc, path + ["query"]), problem)
    if "timeout" in metric:
        found = list(_duration_problem(doc, path + ["timeout"], metric["timeout"]))
        yield from found
        if not found and parse_duration(metric["timeout"]) > MAX_QUERY_TIMEOUT:
            yield Problem(_where(doc, path + ["timeout"]), f"must be at most {MAX_QUERY_TIMEOUT:g}s")


def _gate_problems(doc: dict[str, Any], path: list[Any], gate: dict[str, Any]) -> Iterable[Problem]:
    try:
        parts = urlsplit(gate["url"])
        parts.port  # noqa: B018 (a port out of range raises here)
    except ValueError as error:
        yield Problem(_where(doc, path + ["url"]), f"{gate['url']!r} is not a URL: {error}")
        return
    if parts.scheme not in ("http", "https") or not parts.hostname:
        yield Problem(
            _where(doc, path + ["url"]),
            f"{gate['url']!r} must be an absolute http:// or https:// URL with a host",
        )
    if "timeout" in gate:
        timeout_path = path + ["timeout"]
        problems = list(_duration_problem(doc, timeout_path, gate["timeout"]))
        yield from problems
        if not problems and parse_duration(gate["timeout"]) > MAX_GATE_TIMEOUT:
            yield Problem(
                _where(doc, timeout_path), f"must be at most {MAX_GATE_TIMEOUT:g}s (a gate is asked again)"
            )


def _duration_problem(doc: dict[str, Any], path: list[Any], text: str) -> Iterable[Problem]:
    try:
        if parse_duration(text) <= 0:
            yield Problem(_where(doc, path), "must be longer than 0")
    except ValueError as error:
        yield Problem(_where(doc, path), str(error))
