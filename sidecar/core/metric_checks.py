"""A rollout's metric checks, the pure part: PromQL queries its analysis runs against
Prometheus (`analysis.metrics` in the rules file), their placeholders filled in without
letting a value change what the query means, and each answer judged against its threshold.
Asking Prometheus is the controller's (sidecar/rollouts/prometheus.py): it passes the
answers in.

A query names the clusters it judges with placeholders: `{lane}` (the canary's cluster; the
baseline's when the same query runs for the baseline), `{baseline}` and `{window}` (the
analysis window as a PromQL duration). `{lane}` and `{baseline}` go inside a double-quoted
label value of an equality matcher (`envoy_cluster_name="{lane}"`); the value is written
there as a PromQL string's escaped content, so no cluster name can close the string, add a
matcher or append to the query. Whether a query places them so is checked at load with
Prometheus' own grammar (promql-parser) and a hostile stand-in value.
"""

import json
import math
from dataclasses import dataclass

import promql_parser

LANE, BASELINE, WINDOW = "{lane}", "{baseline}", "{window}"
DEFAULT_QUERY_TIMEOUT, MAX_QUERY_TIMEOUT = 5.0, 60.0
# One answer of Prometheus, and a check's result (closed sets: the metrics' `result` label)
OK, NO_DATA, TIMEOUT, ERROR = "ok", "no_data", "timeout", "error"
PASS, BREACH, INCONCLUSIVE = "pass", "breach", "inconclusive"
# Stand-ins used at load: every character that could end a string or a matcher
_HOSTILE = {LANE: 'graysteer-lane"}\\\'`,x="', BASELINE: 'graysteer-baseline"}\\\'`,x="'}


@dataclass(frozen=True)
class MetricCheck:
    """One `analysis.metrics` entry: a query and its threshold (any of four bounds)."""

    name: str
    query: str  # with placeholders
    max: float | None = None
    min: float | None = None
    max_vs_baseline: float | None = None  # canary <= this x the same query for the baseline
    min_vs_baseline: float | None = None  # canary >= this x the same query for the baseline
    dry_run: bool = False  # evaluated, shown and counted; never holds, rolls back or passes a step
    timeout: float = DEFAULT_QUERY_TIMEOUT  # seconds, each query

    @property
    def compares(self) -> bool:
        """Whether the same query also runs for the baseline."""
        return self.max_vs_baseline is not None or self.min_vs_baseline is not None

    def threshold(self) -> str:
        """The threshold as shown: 'max 0.05', 'min 0.99, max 1.2x baseline', ..."""
        parts = [
            f"{word} {value:g}{suffix}"
            for word, value, suffix in (
                ("min", self.min, ""),
                ("max", self.max, ""),
                ("min", self.min_vs_baseline, "x baseline"),
                ("max", self.max_vs_baseline, "x baseline"),
            )
            if value is not None
        ]
        return ", ".join(parts)


@dataclass(frozen=True)
class Answer:
    """What one query gave: a finite value, or why none (`result`: OK, NO_DATA, TIMEOUT, ERROR)."""

    value: float | None
    result: str = OK
    problem: str = ""


@dataclass(frozen=True)
class MetricResult:
    """A check judged: PASS, BREACH or INCONCLUSIVE, with the values and the reason."""

    check: MetricCheck
    outcome: str
    reason: str
    value: float | None = None
    baseline_value: float | None = None
    result: str = OK  # the answer's result that decided it (the counter's label)

    @property
    def acts(self) -> bool:
        """Whether it may hold, roll back or pass a step (a dry-run check never does)."""
        return not self.check.dry_run


def promql_string(value: str) -> str:
    """`value` as the content of a double-quoted PromQL string: PromQL strings take Go's
    escapes, which JSON's are a subset of (\\\\, \\", \\n, \\uXXXX for control characters)."""
    return json.dumps(value, ensure_ascii=False)[1:-1]


def promql_duration(seconds: float) -> str:
    """A window as a PromQL duration: '30s', or '1500ms' when not whole seconds."""
    whole = round(seconds)
    return f"{whole}s" if math.isclose(seconds, whole) else f"{round(seconds * 1000)}ms"


def fill(query: str, lane: str, baseline: str, window: float) -> str:
    """The query with its placeholders filled: the cluster names escaped as string content."""
    return (
        query.replace(LANE, promql_string(lane))
        .replace(BASELINE, promql_string(baseline))
        .replace(WINDOW, promql_duration(window))
    )


def _matcher_values(expr: promql_parser.Expr) -> list[tuple[str, str]]:
    """(operator, value) of every label matcher in the expression."""
    found: list[tuple[str, str]] = []

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            groups = [node.matchers.matchers, *node.matchers.or_matchers]
            found.extend((str(m.op), m.value) for group in groups for m in group)

    promql_parser.walk(expr, visit)
    return found


def query_problem(query: str) -> str | None:
    """Why a metric's query cannot run (it does not parse, or a placeholder sits where a
    value could change the query), or None."""
    try:
        promql_parser.parse(fill(query, "lane", "baseline", 60.0))
    except ValueError as error:
        return f"is not PromQL: {error}"
    expected = query.count(LANE) + query.count(BASELINE)
    hostile = fill(query, _HOSTILE[LANE], _HOSTILE[BASELINE], 60.0)
    try:
        values = _matcher_values(promql_parser.parse(hostile))
    except ValueError:
        values = []
    placed = sum(
        value.count(stand_in)
        for op, value in values
        for stand_in in _HOSTILE.values()
        if op.endswith("Equal")
    )
    if placed != expected:
        return (
            f"{LANE} and {BASELINE} go inside the double-quoted value of an = or != label matcher, "
            f'as in envoy_cluster_name="{LANE}" (not in a regex, a single-quoted or raw string, '
            "or outside a matcher)"
        )
    return None


def judge_metric(check: MetricCheck, canary: Answer, baseline: Answer | None) -> MetricResult:
    """A check on its answers (`baseline`: the same query for the baseline, when it compares)."""
    if canary.value is None:
        return MetricResult(
            check, INCONCLUSIVE, f"metric {check.name}: {canary.problem}", result=canary.result
        )
    value = canary.value
    if check.compares and (baseline is None or baseline.value is None):
        problem = baseline.problem if baseline is not None else "not asked"
        result = baseline.result if baseline is not None else ERROR
        return MetricResult(
            check, INCONCLUSIVE, f"metric {check.name} for the baseline: {problem}", value, result=result
        )
    base = baseline.value if baseline is not None else None
    for broken, shown in _breaches(check, value, base):
        if broken:
            return MetricResult(check, BREACH, f"metric {check.name} {value:.4g} {shown}", value, base)
    return MetricResult(
        check, PASS, f"metric {check.name} {value:.4g} within {check.threshold()}", value, base
    )


def _breaches(check: MetricCheck, value: float, base: float | None) -> list[tuple[bool, str]]:
    out = []
    if check.max is not None:
        out.append((value > check.max, f"> max {check.max:g}"))
    if check.min is not None:
        out.append((value < check.min, f"< min {check.min:g}"))
    if base is not None and check.max_vs_baseline is not None:
        out.append(
            (value > check.max_vs_baseline * base, f"> {check.max_vs_baseline:g} x baseline {base:.4g}")
        )
    if base is not None and check.min_vs_baseline is not None:
        out.append(
            (value < check.min_vs_baseline * base, f"< {check.min_vs_baseline:g} x baseline {base:.4g}")
        )
    return out
