"""Every validation error names the file, the rule and the field, and loads nothing."""

import copy
from pathlib import Path
from typing import Any

import pytest

from sidecar.core import Request, RulesError, compile_table
from sidecar.table.load import load_rules, parse_rules

GOOD: dict[str, Any] = {
    "version": 1,
    "clusters": ["stable", "canary"],
    "default": "stable",
    "rules": [
        {"name": "force", "match": {"headers": {"x-canary": "1"}}, "route": "canary"},
        {
            "name": "ramp",
            "split": {
                "key": ["header:x-user-id"],
                "to": [{"cluster": "stable", "weight": 90}, {"cluster": "canary", "weight": 10}],
            },
        },
    ],
}


def with_change(path: str, value: Any) -> dict[str, Any]:
    """GOOD with one field set (value None deletes it); path like 'rules.1.split.seed'."""
    doc = copy.deepcopy(GOOD)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node: Any = doc
    for part in parents:
        node = node[part]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return doc


CASES = [
    # (document, expected fragments of one problem)
    (with_change("default", "stabel"), ["field default", "unknown cluster 'stabel'"]),
    (
        with_change("rules.0.route", "nowhere"),
        ["rule 'force' (rules[0]) field route", "unknown cluster 'nowhere'"],
    ),
    (
        with_change("rules.1.split.to.1.cluster", "cnary"),
        ["rule 'ramp' (rules[1]) field split.to[1].cluster", "unknown cluster 'cnary'"],
    ),
    (with_change("rules.1.name", "force"), ["rule 'force' (rules[1]) field name", "duplicate rule name"]),
    (with_change("rules.0.route", None), ["rule 'force' (rules[0])", "exactly one action", "none"]),
    (
        with_change("rules.0.split", {"key": ["header:u"], "to": [{"cluster": "canary", "weight": 1}]}),
        ["rule 'force' (rules[0])", "exactly one action", "'route', 'split'"],
    ),
    (
        with_change(
            "rules.1.split.to", [{"cluster": "stable", "weight": 0}, {"cluster": "canary", "weight": 0}]
        ),
        ["rule 'ramp' (rules[1]) field split.to", "total weight must be greater than 0"],
    ),
    (
        with_change("rules.1.split.to.0.weight", -5),
        ["rule 'ramp' (rules[1]) field split.to[0].weight", "-5 is less than the minimum of 0"],
    ),
    (with_change("rules.1.split.to.0.weight", 2.5), ["field split.to[0].weight", "must be an integer"]),
    (
        with_change("rules.1.split.to.0.weight", "90"),
        ["field split.to[0].weight", "must be an integer, got string '90'"],
    ),
    (
        with_change("rules.0.match", {"headers": {"x-canary": {"regex": "(["}}}),
        ["rule 'force' (rules[0]) field match.headers.x-canary.regex", "invalid regex"],
    ),
    (with_change("rules.0.match", {"path": {"regex": "*"}}), ["field match.path.regex", "invalid regex"]),
    (
        with_change("rules.0.match", {"headers": {"x-api-version": {"semver": "^1.2 ||| 2"}}}),
        ["rule 'force' (rules[0]) field match.headers.x-api-version.semver", "not a version range"],
    ),
    (
        with_change("rules.0.match", {"headers": {"x-api-version": {"semver": "  "}}}),
        ["field match.headers.x-api-version.semver", "an empty range; write `*`"],
    ),
    (with_change("rules.0.rout", "canary"), ["rule 'force' (rules[0])", "unknown key 'rout'"]),
    (with_change("colors", "x"), ["document", "unknown key 'colors'"]),
    (with_change("rules.1.split.weights", 1), ["field split", "unknown key 'weights'"]),
    (
        with_change("rules.0.match", {"headers": {"x-canary": 1}}),
        ["field match.headers.x-canary", "must be a string or a mapping, got integer 1", "quote"],
    ),
    (
        with_change("rules.0.match", {"headers": {"x-canary": {"exact": "1", "prefix": "2"}}}),
        ["field match.headers.x-canary", "exactly one of exact, prefix, regex, semver, present, absent"],
    ),
    (
        with_change("rules.0.match", {"headers": {"x-canary": {"contains": "1"}}}),
        ["field match.headers.x-canary", "unknown key 'contains'"],
    ),
    (
        with_change("rules.0.match", {"headers": {"X-A": "1", "x-a": "2"}}),
        ["field match.headers.x-a", "case-insensitive"],
    ),
    (with_change("rules.0.match", {"path": "/api"}), ["field match.path", "must be a mapping"]),
    (with_change("rules.0.match", {"method": []}), ["field match.method", "must not be empty"]),
    (with_change("rules.1.split.key", []), ["rule 'ramp' (rules[1]) field split.key", "must not be empty"]),
    (with_change("rules.1.split.key", ["user"]), ["field split.key[0]", "'user' is not valid"]),
    (with_change("rules.1.split.to", []), ["field split.to", "must not be empty"]),
    (
        with_change("rules.1.split.when_key_missing", "nowhere"),
        ["field split.when_key_missing", "must be 'random' or a cluster name"],
    ),
    (with_change("rules.1.split.to.1.cluster", "stable"), ["field split.to[1].cluster", "appears twice"]),
    (with_change("rules.1.split.to.1.weight", None), ["field split.to[1]", "'weight' is required"]),
    (with_change("clusters", []), ["field clusters", "must not be empty"]),
    (with_change("clusters", ["stable", "stable"]), ["field clusters", "non-unique"]),
    (with_change("clusters", ["stable", "bad name"]), ["field clusters[1]", "is not valid"]),
    (with_change("version", 2), ["field version", "must be 1"]),
    (with_change("default", None), ["document", "'default' is required"]),
    (with_change("rules", "none"), ["field rules", "must be a list"]),
    (with_change("rules.0", "force"), ["rules[0]", "must be a mapping"]),
    (with_change("rules.0.name", None), ["rules[0]", "'name' is required"]),
    (with_change("routing_header", "x route"), ["field routing_header", "is not valid"]),
]


@pytest.mark.parametrize(("doc", "fragments"), CASES, ids=[", ".join(c[1])[:60] for c in CASES])
def test_each_problem_is_located(doc: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(RulesError) as caught:
        compile_table(doc, "v", "rules.yaml")
    rendered = [str(p) for p in caught.value.problems]
    assert any(all(f in line for f in fragments) for line in rendered), rendered
    assert all(line.startswith("  rules.yaml: ") for line in str(caught.value).splitlines()[1:])


def test_the_good_document_compiles() -> None:
    table = compile_table(GOOD, "v", "rules.yaml")
    assert [r.name for r in table.rules] == ["force", "ramp"]


def test_all_problems_are_reported_not_just_the_first() -> None:
    doc = with_change("default", "nope")
    doc["rules"][0]["route"] = "nowhere"
    doc["rules"][1]["name"] = "force"
    with pytest.raises(RulesError) as caught:
        compile_table(doc, "v", "rules.yaml")
    assert len(caught.value.problems) == 3


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"version: 1\nclusters: [stable\n", "invalid YAML"),
        (b"version: 1\n  bad: indent\n", "line 2"),
        (b"- just\n- a list\n", "document: must be a mapping of fields, got list"),
        (b"", "document: must be a mapping of fields, got null"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_unparseable_files(content: bytes, fragment: str) -> None:
    with pytest.raises(RulesError) as caught:
        parse_rules(content, "/etc/graysteer/rules.yaml")
    assert "/etc/graysteer/rules.yaml" in str(caught.value)
    assert fragment in str(caught.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match=r"nope\.yaml: .*cannot read"):
        load_rules(tmp_path / "nope.yaml")


def test_version_is_a_hash_of_the_content(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("version: 1\nclusters: [a]\ndefault: a\n")
    first = load_rules(path).version
    assert load_rules(path).version == first
    path.write_text("version: 1\nclusters: [a]\ndefault: a\n# edited\n")
    assert load_rules(path).version != first


def test_example_rules_file_is_valid() -> None:
    table = load_rules(Path(__file__).parents[2] / "examples" / "rules.yaml")
    assert table.clusters == ("stable", "canary")


# ---- regexes are RE2, as Envoy's safe_regex --------------------------------------------------

REGEX_CASES = [
    # (where the regex goes, pattern, expected fragments)
    (
        "rules.0.match",
        {"headers": {"x-user-tier": {"regex": r"(a)\1"}}},
        ["rule 'force' (rules[0]) field match.headers.x-user-tier.regex", "RE2", "\\1"],
    ),
    (
        "rules.0.match",
        {"path": {"regex": "(?=a)"}},
        ["rule 'force' (rules[0]) field match.path.regex", "RE2"],
    ),
    ("rules.0.match", {"path": {"regex": "(?<=a)b"}}, ["field match.path.regex", "RE2"]),
    ("rules.0.match", {"path": {"regex": r"/a\Z"}}, ["field match.path.regex", "RE2"]),
    (
        "rules.0.match",
        {"headers": {"x-a": {"regex": "a{97}"}}},
        ["field match.headers.x-a.regex", "program size 101 > 100"],
    ),
    (
        "rules.0.match",
        {"identity": {"regex": "(abc|def){50}"}},
        ["rule 'force' (rules[0]) field match.identity.regex", "program size 404 > 100"],
    ),
    (
        "trust",
        {"identities": [{"regex": "(abc|def){50}"}]},
        ["field trust.identities[0].regex", "program size 404 > 100"],
    ),
    ("trust", {"identities": [{"regex": r"spiffe://(x)\1"}]}, ["field trust.identities[0].regex", "RE2"]),
]


@pytest.mark.parametrize(
    ("path", "value", "fragments"),
    REGEX_CASES,
    ids=[c[2][0][-40:] + " " + str(c[1])[-30:] for c in REGEX_CASES],
)
def test_regexes_envoy_would_refuse_are_refused(path: str, value: Any, fragments: list[str]) -> None:
    with pytest.raises(RulesError) as caught:
        compile_table(with_change(path, value), "v", "rules.yaml")
    rendered = [str(p) for p in caught.value.problems]
    assert any(all(f in line for f in fragments) for line in rendered), rendered


def test_program_size_at_envoys_limit_is_accepted() -> None:
    # a{96} has RE2 program size 100: Envoy accepts it (checked with `envoy --mode validate`),
    # a{97} (101) it refuses.
    doc = with_change("rules.0.match", {"headers": {"x-a": {"regex": "a{96}"}}})
    assert compile_table(doc, "v", "rules.yaml").rules[0].name == "force"


# ---- identity matchers: what could never match, or match too much, is refused -----------------

IDENTITY_CASES = [
    # (matcher form, expected fragments)
    ({"trust_domain": "Example.org"}, ["trust domains are lower-case", "'example.org'"]),
    ({"trust_domain": "spiffe://example.org"}, ["without spiffe://"]),
    ({"trust_domain": "example.org/ns"}, ["without spiffe://"]),
    ({"trust_domain": "exa mple.org"}, ["letters, digits"]),
    ({"trust_domain": "a" * 256}, ["longer than 255"]),
    ({"exact": "spiffe://Example.org/ns/qa"}, ["trust domains are lower-case"]),
    ({"exact": "spiffe://example.org"}, ["no path", "not a workload"]),
    ({"exact": "spiffe://example.org/"}, ["not a valid SPIFFE ID"]),
    ({"exact": "spiffe://example.org/ns//qa"}, ["not a valid SPIFFE ID"]),
    ({"exact": "spiffe://example.org/ns/qa?x=1"}, ["not a valid SPIFFE ID"]),
    ({"glob": "spiffe://example.org*"}, ["literal trust domain", "spiffe://<trust domain>/"]),
    ({"glob": "spiffe://*"}, ["literal trust domain"]),
    ({"glob": "spiffe://*.example.org/x"}, ["literal trust domain"]),
    ({"glob": "https://example.org/*"}, ["spiffe://<trust domain>/"]),
    ({"glob": "spiffe://Example.org/*"}, ["trust domains are lower-case"]),
    ({"glob": "spiffe://example.org/ns/?a"}, ["only `*`", "?"]),
    ({"glob": "spiffe://example.org/ns/[ab]/*"}, ["only `*`", "["]),
    ({"glob": "spiffe://example.org/ns/qa]"}, ["only `*`"]),
    ({"glob": "spiffe://example.org/ns/%41/*"}, ["can never match", "'%'"]),
    ({"glob": "spiffe://example.org"}, ["no path", "not a workload"]),
    ({"glob": "spiffe:///ns/*"}, ["trust domain is empty"]),
    ({"exact": "spiffe:///ns/qa"}, ["trust domain is empty"]),
    ({"dns": "a.*.example.org"}, ["whole left-most label"]),
    ({"dns": "a*.example.org"}, ["whole left-most label"]),
    ({"dns": "*example.org"}, ["whole left-most label"]),
    ({"dns": "*"}, ["whole left-most label"]),
    ({"dns": "*.*.example.org"}, ["whole left-most label"]),
    ({"dns": "?.example.org"}, ["only `*`"]),
    ({"dns": "[ab].example.org"}, ["only `*`"]),
    ({"dns": "a..example.org"}, ["empty label"]),
]


@pytest.mark.parametrize(("form", "fragments"), IDENTITY_CASES, ids=[str(c[0])[:50] for c in IDENTITY_CASES])
def test_identity_matchers_are_validated_where_they_are_used(
    form: dict[str, Any], fragments: list[str]
) -> None:
    key = next(iter(form))
    in_rule = with_change("rules.0.match", {"identity": form})
    in_trust = with_change("trust", {"identities": [{"present": True}, form]})
    for doc, where in (
        (in_rule, f"rule 'force' (rules[0]) field match.identity.{key}"),
        (in_trust, f"field trust.identities[1].{key}"),
    ):
        with pytest.raises(RulesError) as caught:
            compile_table(doc, "v", "rules.yaml")
        rendered = [str(p) for p in caught.value.problems]
        assert any(line.startswith(where) and all(f in line for f in fragments) for line in rendered), (
            rendered
        )


@pytest.mark.parametrize(
    "form",
    [
        {"trust_domain": "example.org"},
        {"trust_domain": "a-b_c.9"},
        {"exact": "spiffe://example.org/ns/qa/sa/tester"},
        {"glob": "spiffe://example.org/*"},
        {"glob": "spiffe://example.org/ns/*/sa/Web-1"},
        {"glob": "spiffe://example.org/ns/qa/sa/tester"},  # no wildcard: exactly this ID
        {"dns": "*.example.org"},
        {"dns": "API.Example.org"},
        {"regex": r"spiffe://example\.org/ns/(qa|dev)/.*"},
    ],
)
def test_valid_identity_matchers_load(form: dict[str, Any]) -> None:
    compile_table(with_change("rules.0.match", {"identity": form}), "v", "rules.yaml")
    compile_table(with_change("trust", {"identities": [form]}), "v", "rules.yaml")


# ---- gRPC services and methods ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "path", "expected"),
    [
        ({"service": "shop.v1.Cart", "method": "Get"}, "/shop.v1.Cart/Get", True),
        ({"service": "shop.v1.Cart", "method": "Get"}, "/shop.v1.Cart/GetAll", False),
        ({"service": "shop.v1.Cart", "method": "Get"}, "/shop.v1.Cart/Get/x", False),
        ({"service": "shop.v1.Cart"}, "/shop.v1.Cart/Put", True),  # any method of the service
        ({"service": "shop.v1.Cart"}, "/shop.v1.CartAdmin/Put", False),
        ({"service": "shop.v1.Cart"}, "/shop.v1.Cart/", True),
        ({"service": "shop.v1.Cart"}, "/shop.v1.Cart/a/b", False),
        ({"service": "Cart"}, "/Cart/Get", True),  # no package
    ],
)
def test_grpc_conditions_read_the_path(form: dict[str, str], path: str, expected: bool) -> None:
    doc = with_change("rules.0.match", {"grpc": form})
    table = compile_table(doc, "v", "rules.yaml")
    assert (table.decide(Request({}, "POST", path)).rule == "force") is expected


@pytest.mark.parametrize(
    ("form", "where"),
    [
        ({"method": "Get"}, "field match.grpc"),  # the service is required
        ({"service": "shop/Cart"}, "field match.grpc.service"),
        ({"service": "shop.Cart", "method": "Get/x"}, "field match.grpc.method"),
        ({"service": "shop.Cart", "methods": ["Get"]}, "field match.grpc"),
    ],
)
def test_bad_grpc_conditions_are_located(form: dict[str, str], where: str) -> None:
    with pytest.raises(RulesError) as caught:
        compile_table(with_change("rules.0.match", {"grpc": form}), "v", "rules.yaml")
    assert any(str(p).startswith(f"rule 'force' (rules[0]) {where}") for p in caught.value.problems), [
        str(p) for p in caught.value.problems
    ]


# ---- mirror -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (
            {"rules.0.mirror": {"cluster": "shadow", "percent": 5}},
            ["rule 'force' (rules[0]) field mirror.cluster", "unknown cluster 'shadow'"],
        ),
        (
            {"rules.0.mirror": {"cluster": "canary", "percent": 5}},
            ["field mirror.cluster", "already routes to 'canary'"],
        ),
        ({"rules.0.mirror": {"cluster": "stable", "percent": 0}}, ["field mirror.percent", "0"]),
        ({"rules.0.mirror": {"cluster": "stable", "percent": 101}}, ["field mirror.percent", "101"]),
        ({"rules.0.mirror": {"cluster": "stable"}}, ["field mirror", "'percent' is required"]),
        ({"mirror_header": "X-Route-Cluster"}, ["field mirror_header", "must differ from routing_header"]),
    ],
)
def test_bad_mirrors_are_located(change: dict[str, Any], fragments: list[str]) -> None:
    ((where, value),) = change.items()
    with pytest.raises(RulesError) as caught:
        compile_table(with_change(where, value), "v", "rules.yaml")
    rendered = [str(p) for p in caught.value.problems]
    assert any(all(f in line for f in fragments) for line in rendered), rendered


def test_a_deny_rule_cannot_mirror() -> None:
    doc = with_change(
        "rules.0", {"name": "no", "deny": {"status": 403}, "mirror": {"cluster": "canary", "percent": 1}}
    )
    with pytest.raises(RulesError, match=r"field mirror: a deny rule forwards nothing to mirror"):
        compile_table(doc, "v", "rules.yaml")
