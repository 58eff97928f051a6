"""A table's rule chain generated as Python source: one specialized function per table.

`Table.decide` walks the rules and calls one closure per condition; Python pays a call for
each (about 0.1 µs), and most of a realistic table's rules do not match. Here the same rules
become one function of `if` statements whose conditions are inline expressions on local
names (`headers.get("x-canary") == "1"`, `path.startswith("/api/")`), compiled once per table
with `compile()`: no compiler toolchain, the same on every machine.

Consecutive rules that each test one header for an exact value (per-tenant routes) are
indexed by that value: one dict lookup finds the few that can match, in table order, instead
of a test per rule. First match still wins: a rule left out by the index cannot match.

What one `compile()` call is given is bounded by size, not by rule count: `compile()` holds
the GIL for all of its text, so a reload building the next table in a thread would stop the
serving loop for as long. A rule whose conditions (or whose split's key sources) would take
more than MAX_RULE_CHARS of source is generated as a call to the reference's own matchers
(and key getters) instead, and the chain is compiled in pieces of about CHUNK_CHARS.

Leaf matchers that are more than an expression (RE2 regexes, version ranges, host and
identity matchers) are the core's own, built from the same rules document. The reference is
`Table.decide`/`Table.denied`; tests run both on every core test and on generated tables
and requests (tests/core/test_engine_differential.py).
"""

import dataclasses
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sidecar.core.bucketing import bucket, entry_for
from sidecar.core.cookies import well_formed
from sidecar.core.hosts import host_matcher
from sidecar.core.identity import identity_matcher
from sidecar.core.model import Decision, Reason
from sidecar.core.regex import compile_regex
from sidecar.core.request import Request
from sidecar.core.table import MIRROR_BUCKETS, Condition, Mirror, Rule, Split, Table
from sidecar.core.versions import range_matcher

# What the generator knows. A table with anything else (a field or form added to the rules
# file or to `Rule` later) is left to the reference walk rather than generated without it.
KNOWN_RULE_KEYS = frozenset(("name", "match", "route", "deny", "split", "rollout", "mirror"))
KNOWN_MATCH_KEYS = frozenset(("headers", "path", "identity", "host", "grpc", "method"))
KNOWN_HEADER_FORMS = frozenset(("exact", "prefix", "regex", "semver", "present", "absent"))
KNOWN_PATH_FORMS = frozenset(("exact", "prefix", "regex"))
KNOWN_RULE_FIELDS = ("name", "conditions", "route", "split", "mirror")
MIN_INDEXED_RUN = 4  # shorter runs of exact-header rules are tested one by one
# Above this many rules the chain stays the reference walk: compiling the source of a huge
# function costs more reload time than its requests save (see benchmarks/table_size.py).
MAX_GENERATED_RULES = 5000
# compile() holds the GIL for its whole text (about 1 ms per KiB here), and the serving loop
# waits that long: the chain is compiled a piece of about CHUNK_CHARS of source at a time,
# and no rule writes more than MAX_RULE_CHARS for its conditions nor for its split's keys.
CHUNK_CHARS = 8 * 1024
MAX_RULE_CHARS = 2 * 1024
RULE_CHARS = 160  # a rule's source besides its conditions and key sources (an upper bound)
MIN_CONDITION_CHARS = 20  # the shortest condition's source: "('x' in headers) and "
KEY_CHARS = 90  # a key source's source besides its expression
# Nothing given to one compile() call is longer (tests/core/test_engine.py checks it).
MAX_COMPILE_CHARS = CHUNK_CHARS + 2 * MAX_RULE_CHARS + 2 * RULE_CHARS

Decide = Callable[[Request], Decision]
Denied = Callable[[Request], "Decision | None"]


class _Condition:
    """One condition as an expression; `exact` is (header, value) for an exact header test."""

    __slots__ = ("exact", "expression")

    def __init__(self, expression: str, exact: tuple[str, str] | None = None) -> None:
        self.expression, self.exact = expression, exact


class _Source:
    """The generated module: its lines and the objects its code refers to by name."""

    def __init__(self) -> None:
        self.lines: list[str] = []  # the function being written
        self.preamble: list[str] = []  # what it uses: functions per indexed value, their dicts
        self.names: dict[str, object] = {}

    def nested(self, lines: list[str]) -> "_Source":
        """Another function's lines, sharing this module's names and preamble."""
        other = _Source()
        other.lines, other.preamble, other.names = lines, self.preamble, self.names
        return other

    def constant(self, value: object) -> str:
        """A name (or a literal) the generated code uses for `value`."""
        if type(value) in (str, int, bool) or value is None:
            return repr(value)
        name = f"_k{len(self.names)}"
        self.names[name] = value
        return name


def generate(table: Table) -> tuple[Decide, Denied] | None:
    """(decide, denied) for `table`, equal to `table.decide` and `table.denied`; None when the
    table is not generated (its rules do not line up with its document, or too many)."""
    documents = table.document.get("rules") if isinstance(table.document, dict) else None
    documents = documents or []
    if not isinstance(documents, list) or len(documents) != len(table.rules):
        return None
    if len(table.rules) > MAX_GENERATED_RULES:
        return None
    if any(not isinstance(d, dict) or d.get("name") != r.name for d, r in zip(documents, table.rules)):  # noqa: B905
        return None
    if tuple(f.name for f in dataclasses.fields(Rule)) != KNOWN_RULE_FIELDS:
        return None
    if not all(_known(document) for document in documents):
        return None
    source = _Source()
    conditions = [
        _bounded(source, rule, d.get("match") or {}) for d, rule in zip(documents, table.rules, strict=True)
    ]
    denying = {id(rule) for rule in table.deny_rules}
    deny = [i for i, rule in enumerate(table.rules) if id(rule) in denying]
    if len(deny) != len(table.deny_rules):
        return None
    chained = list(zip(table.rules, conditions, strict=True))
    namespace: dict[str, Any] = {}
    _chunked(source, namespace, "decide", chained, source.constant(table.default_decision), table.version)
    _chunked(source, namespace, "denied", [chained[i] for i in deny], "None", table.version)
    return namespace["decide"], namespace["denied"]


def _chunked(
    source: _Source,
    namespace: dict[str, Any],
    name: str,
    rules: Sequence[tuple[Rule, list[_Condition]]],
    last: str,
    version: str,
) -> None:
    """Function `name` in `namespace`, compiled about CHUNK_CHARS of source at a time:
    `compile()` holds the GIL for all of its text (4,000 rules: over 0.2 s in one call; one
    rule of 45,000 conditions: 0.7 s), a stall of the serving loop while a reload runs in its
    thread. A long chain is compiled as one function per piece, tried in order from a tuple,
    with the GIL free between pieces."""
    chunks = list(_chunks(rules))
    if len(chunks) <= 1:
        _function(source, name, rules, last)
        _run(source, namespace, version)
        return
    parts = []
    for number, chunk in enumerate(chunks):
        part = f"_{name}_{number}"
        _function(source, part, chunk, "None", "request, headers, path")
        _run(source, namespace, version)
        parts.append(namespace[part])
    source.lines += [
        f"def {name}(request):",
        "    headers = request.headers",
        "    path = request.path",
        f"    for _part in {source.constant(tuple(parts))}:",  # each answers None when none matched
        "        _d = _part(request, headers, path)",
        "        if _d is not None:",
        "            return _d",
        f"    return {last}",
    ]
    _run(source, namespace, version)


def _chunks(rules: Sequence[tuple[Rule, list[_Condition]]]) -> Iterable[list[tuple[Rule, list[_Condition]]]]:
    """`rules` in consecutive pieces of at most CHUNK_CHARS of source each (one rule alone
    when it is longer)."""
    chunk: list[tuple[Rule, list[_Condition]]] = []
    chars = 0
    for rule, conditions in rules:
        size = _rule_chars(rule, conditions)
        if chunk and chars + size > CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
        chunk.append((rule, conditions))
        chars += size
    if chunk:
        yield chunk


def _rule_chars(rule: Rule, conditions: Sequence[_Condition]) -> int:
    """At least the characters of source `rule` takes, wherever it is written (in a chain, or
    in an index's function with its entry)."""
    chars = RULE_CHARS + _conditions_chars(conditions)
    if rule.split is not None and _keys_written(rule.split):
        chars += _keys_chars(rule.split)
    return chars


def _conditions_chars(conditions: Sequence[_Condition]) -> int:
    return sum(len(c.expression) + 7 for c in conditions)  # "(...) and "


def _keys_chars(split: Split) -> int:
    return sum(len(_key_expression(label)) + KEY_CHARS for label, _ in split.keys)


def _keys_written(split: Split) -> bool:
    """Whether a split's key sources are written out (else `SplitDecisions.decide` tries
    them): when they take at most MAX_RULE_CHARS of source."""
    return len(split.keys) * KEY_CHARS <= MAX_RULE_CHARS and _keys_chars(split) <= MAX_RULE_CHARS


def _bounded(source: _Source, rule: Rule, match: Mapping[str, Any]) -> list[_Condition]:
    """The conditions of `match`, or when they would take more than MAX_RULE_CHARS of source,
    one condition that calls the reference's own matchers of `rule` (the same test, as data).
    Rules with too many conditions are not even written out: a rule of 45,000 conditions made
    as many objects, and the garbage collector then held the GIL as long as the compile."""
    if len(rule.conditions) * MIN_CONDITION_CHARS <= MAX_RULE_CHARS:
        conditions = [*_conditions(source, match)]
        if _conditions_chars(conditions) <= MAX_RULE_CHARS:
            return conditions
    return [_Condition(f"{source.constant(_all_hold(rule.conditions))}(request)")] if rule.conditions else []


def _all_hold(conditions: Sequence[Condition]) -> Callable[[Request], bool]:
    """Whether every one of `conditions` holds, tried in order as `Table.decide` does."""

    def holds(request: Request) -> bool:
        return all(condition(request) for condition in conditions)

    return holds


def _run(source: _Source, namespace: dict[str, Any], version: str) -> None:
    """Compile what `source` holds into `namespace` and start `source` on the next piece."""
    for name, value in source.names.items():  # earlier pieces' names are bound already
        namespace.setdefault(name, value)
    text = "\n".join([*source.preamble, *source.lines])
    exec(compile(text, f"<rules {version}>", "exec"), namespace)
    source.lines, source.preamble = [], []


def _known(rule: Mapping[str, Any]) -> bool:
    """Whether every key of a rule's document is one the generator writes code for."""
    match = rule.get("match") or {}
    if not KNOWN_RULE_KEYS.issuperset(rule) or not KNOWN_MATCH_KEYS.issuperset(match):
        return False
    headers = match.get("headers") or {}
    if any(isinstance(form, dict) and not KNOWN_HEADER_FORMS.issuperset(form) for form in headers.values()):
        return False
    return "path" not in match or KNOWN_PATH_FORMS.issuperset(match["path"])


# ---- the functions -----------------------------------------------------------------------------


def _function(
    source: _Source,
    name: str,
    rules: Sequence[tuple[Rule, list[_Condition]]],
    last: str,
    arguments: str = "request",
) -> None:
    source.lines.append(f"def {name}({arguments}):")
    if arguments == "request":
        source.lines += ["    headers = request.headers", "    path = request.path"]
    _chain(source, rules, "    ")
    source.lines.append(f"    return {last}")


def _chain(source: _Source, rules: Sequence[tuple[Rule, list[_Condition]]], indent: str) -> None:
    i = 0
    while i < len(rules):
        header, end = _indexed_run(rules, i)
        if header is None:
            if not _rule(source, rules[i][0], rules[i][1], indent):
                return  # a rule without conditions: nothing after it is reached
            i += 1
            continue
        _index(source, header, rules[i:end], indent)
        i = end


def _rule(source: _Source, rule: Rule, conditions: Sequence[_Condition], indent: str) -> bool:
    """The rule's test; False when it always matches (the chain ends with it)."""
    inner = indent + "    " if conditions else indent
    if conditions:
        test = " and ".join(f"({c.expression})" for c in conditions)
        source.lines.append(f"{indent}if {test}:")
    if rule.route is not None and rule.mirror is None:
        source.lines.append(f"{inner}return {source.constant(rule.route)}")  # the table's own
    elif rule.split is not None:
        _split(source, SplitDecisions(rule.split, rule.mirror), inner)
    else:  # a mirror: rare, and it draws from the same keys and random numbers: as the reference
        source.lines.append(f"{inner}return {source.constant(rule)}.decide(request)")
    return bool(conditions)


def _split(source: _Source, split_decisions: "SplitDecisions", indent: str) -> None:
    """`Rule.decide` of a split inline: the first key present, its bucket, the decision."""
    decisions = source.constant(split_decisions)
    if not _keys_written(split_decisions.split):  # too many to write out: as data
        source.lines.append(f"{indent}return {decisions}.decide(request)")
        return
    split = split_decisions.split
    for number, (label, _) in enumerate(split.keys):
        expression = _key_expression(label)
        if split.assign is not None and label == split.assign.source:  # as compile._assigned_getter
            expression = f"{source.constant(well_formed)}({expression})"
        source.lines += [
            f"{indent}_key = {expression}",
            f"{indent}if _key:",
            f"{indent}    return {decisions}.keyed({number}, _key)",
        ]
    if split.assign is not None:
        source.lines.append(f"{indent}return {decisions}.issue(request)")
    else:
        source.lines.append(f"{indent}return {decisions}.without_key()")


def _key_expression(label: str) -> str:
    """The expression of `compile._key_getter(label)`."""
    if label == "identity":
        return "request.identity.principal or None"
    kind, _, name = label.partition(":")
    if kind == "header":
        return f"headers.get({name.lower()!r})"
    if kind == "cookie":
        return f"request.cookie({name!r})"
    return f"request.query_param({name!r})"


MAX_SHARED_BUCKETS = 10_000  # splits with a larger total build each decision
# A key source's decisions before the first is made: read, never written (replaced first).
_NOTHING_MADE: tuple[dict[int, Decision], dict[int, Decision]] = ({}, {})


class SplitDecisions:
    """A split rule's decisions (`Rule.decide`), built once per (key source, bucket, mirrored)
    and then shared: a decision is immutable, and building one costs more than the rest of the
    split. A mirror draws as `Mirror.picks` does: its own bucket of the same key, else a
    random number, after the split's own draw."""

    __slots__ = ("_made", "_share", "labels", "mirror", "seed", "split", "total")

    def __init__(self, split: Split, mirror: Mirror | None = None) -> None:
        self.split, self.mirror, self.seed, self.total = split, mirror, split.seed, split.bounds[-1]
        self.labels = tuple(label for label, _ in split.keys)
        self._share = self.total <= MAX_SHARED_BUCKETS
        # per key source (then "missing", "random"): bucket -> decision, unmirrored and mirrored;
        # made on first use (a split of 30,000 key sources made 60,000 dicts up front, and the
        # garbage collector's passes over them held the GIL for 0.1 s)
        self._made = [_NOTHING_MADE] * (len(self.labels) + 2)

    def decide(self, request: Request) -> Decision:
        """`Rule.decide`: the first key source present, else the decision without a key (what
        the generated code writes out for a split with few key sources)."""
        for number, (_, getter) in enumerate(self.split.keys):
            key = getter(request)
            if key:
                return self.keyed(number, key)
        return self.issue(request) if self.split.assign is not None else self.without_key()

    def issue(self, request: Request) -> Decision:
        """A new key (`Split.issue`): a decision of its own each time, never kept; a mirror
        draws at random, as `Mirror.picks` does for a request without a key."""
        decision = self.split.issue(request)
        mirror = self.mirror
        if (
            mirror is not None
            and decision.cluster != mirror.cluster
            and random.randrange(MIRROR_BUCKETS) < mirror.share
        ):
            return decision.mirrored(mirror.cluster)
        return decision

    def keyed(self, number: int, key: str) -> Decision:
        chosen = bucket(self.seed, key, self.total)
        decision = self._made[number][0].get(chosen) or self._decision(number, chosen, False)
        mirror = self.mirror
        if mirror is None or decision.cluster == mirror.cluster:
            return decision
        if bucket(mirror.seed, key, MIRROR_BUCKETS) < mirror.share:
            return self._made[number][1].get(chosen) or self._decision(number, chosen, True)
        return decision

    def without_key(self) -> Decision:
        if self.split.when_key_missing is not None:
            number, chosen = len(self.labels), -1
        else:
            number, chosen = len(self.labels) + 1, random.randrange(self.total)
        decision = self._made[number][0].get(chosen) or self._decision(number, chosen, False)
        mirror = self.mirror
        # drawn only when the reference draws: `Rule.decide` asks `Mirror.picks` last
        if (
            mirror is not None
            and decision.cluster != mirror.cluster
            and random.randrange(MIRROR_BUCKETS) < mirror.share
        ):
            return self._made[number][1].get(chosen) or self._decision(number, chosen, True)
        return decision

    def _decision(self, number: int, chosen: int, mirrored: bool) -> Decision:
        split = self.split
        source = (*self.labels, "missing", "random")[number]
        if chosen < 0:
            made = Decision(
                split.when_key_missing or "", split.rule, split.version, None, source, reason=SPLIT
            )
        else:
            cluster = split.clusters[entry_for(split.bounds, chosen)]
            made = Decision(cluster, split.rule, split.version, chosen, source, reason=SPLIT)
        if mirrored:
            assert self.mirror is not None
            made = made.mirrored(self.mirror.cluster)
        if self._share:
            if self._made[number] is _NOTHING_MADE:
                self._made[number] = ({}, {})
            self._made[number][mirrored][chosen] = made
        return made


SPLIT = Reason.SPLIT


def _indexed_run(rules: Sequence[tuple[Rule, list[_Condition]]], start: int) -> tuple[str | None, int]:
    """(header, end) of the longest run from `start` of rules that all test `header` for an
    exact value, when at least MIN_INDEXED_RUN long; else (None, start)."""
    common: set[str] | None = None
    end = start
    while end < len(rules):
        tested = {c.exact[0] for c in rules[end][1] if c.exact is not None}
        narrowed = tested if common is None else common & tested
        if not narrowed:
            break
        common, end = narrowed, end + 1
    if common is None or end - start < MIN_INDEXED_RUN:
        return None, start
    return min(common), end


def _index(source: _Source, header: str, rules: Sequence[tuple[Rule, list[_Condition]]], indent: str) -> None:
    """A run of rules that each test `header` for one value: a function per value holding
    that value's rules in table order (the indexing test itself left out), looked up once."""
    by_value: dict[str, list[tuple[Rule, list[_Condition]]]] = {}
    for rule, conditions in rules:
        key = next(i for i, c in enumerate(conditions) if c.exact is not None and c.exact[0] == header)
        exact = conditions[key].exact
        assert exact is not None
        by_value.setdefault(exact[1], []).append((rule, conditions[:key] + conditions[key + 1 :]))
    lookup = f"_index{len(source.names)}"
    source.names[lookup] = None  # bound by the preamble's assignment below
    entries = []
    for number, (value, members) in enumerate(by_value.items()):
        name = f"{lookup}_{number}"
        body = source.nested([f"def {name}(request, headers, path):"])
        _chain(body, members, "    ")
        source.preamble += [*body.lines, "    return None", ""]
        entries.append(f"{value!r}: {name}")
    source.preamble.append(f"{lookup} = {{{', '.join(entries)}}}")
    source.lines += [
        f"{indent}_f = {lookup}.get(headers.get({header!r}))",
        f"{indent}if _f is not None:",
        f"{indent}    _d = _f(request, headers, path)",
        f"{indent}    if _d is not None:",
        f"{indent}        return _d",
    ]


# ---- conditions --------------------------------------------------------------------------------


def _conditions(source: _Source, match: Mapping[str, Any]) -> Iterable[_Condition]:
    """The conditions of `compile._conditions`, in the same order, as expressions."""
    for header, form in (match.get("headers") or {}).items():
        yield _header(source, header.lower(), form)
    if "path" in match:
        yield _path(source, match["path"])
    if "identity" in match:
        yield _Condition(f"{source.constant(identity_matcher(match['identity']))}(request.identity)")
    if "host" in match:
        hosts = match["host"]
        matches = source.constant(host_matcher([hosts] if isinstance(hosts, str) else hosts))
        yield _Condition(f"{matches}(headers.get(':authority') or headers.get('host'))")
    if "grpc" in match:
        form = match["grpc"]
        service = f"/{form['service']}/"
        if "method" in form:
            yield _Condition(f"path == {source.constant(service + form['method'])}")
        else:
            s = source.constant(service)
            yield _Condition(f"path.startswith({s}) and '/' not in path[{len(service)}:]")
    if "method" in match:
        methods = match["method"]
        allowed = frozenset(m.upper() for m in ([methods] if isinstance(methods, str) else methods))
        yield _Condition(f"request.method in {source.constant(allowed)}")


def _header(source: _Source, name: str, form: str | dict[str, Any]) -> _Condition:
    if isinstance(form, str):
        form = {"exact": form}
    n = repr(name)
    if "exact" in form:
        value = form["exact"]
        exact = (name, value) if type(value) is str else None
        return _Condition(f"headers.get({n}) == {source.constant(value)}", exact)
    if "prefix" in form:
        return _Condition(f"headers.get({n}, '').startswith({source.constant(form['prefix'])})")
    if "regex" in form:
        matches = source.constant(compile_regex(form["regex"]))
        return _Condition(f"(_v := headers.get({n})) is not None and {matches}(_v)")
    if "semver" in form:
        matches = source.constant(range_matcher(form["semver"]))
        return _Condition(f"(_v := headers.get({n})) is not None and {matches}(_v)")
    if form.get("present"):
        return _Condition(f"{n} in headers")
    return _Condition(f"{n} not in headers")


def _path(source: _Source, form: Mapping[str, Any]) -> _Condition:
    if "exact" in form:
        return _Condition(f"path == {source.constant(form['exact'])}")
    if "prefix" in form:
        return _Condition(f"path.startswith({source.constant(form['prefix'])})")
    return _Condition(f"{source.constant(compile_regex(form['regex']))}(path)")
