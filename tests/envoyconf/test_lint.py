"""`graysteer check --envoy`: each broken part of an Envoy config is found, with its fix."""

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.cli import main
from sidecar.envoyconf.lint import check
from sidecar.table.load import load_rules, parse_rules
from tests.helpers import table_from_yaml

REPO = Path(__file__).parents[2]
ENVOY = yaml.safe_load((REPO / "envoy" / "envoy.yaml").read_text())
TABLE = load_rules(REPO / "examples" / "rules.yaml")


def hcm(config: dict[str, Any]) -> dict[str, Any]:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def ext_proc(config: dict[str, Any]) -> dict[str, Any]:
    return hcm(config)["http_filters"][0]["typed_config"]


def routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    return hcm(config)["route_config"]["virtual_hosts"][0]["routes"]


def guard(config: dict[str, Any]) -> dict[str, Any]:
    return routes(config)[0]["match"]["headers"][0]


def sidecar_cluster(config: dict[str, Any]) -> dict[str, Any]:
    return config["static_resources"]["clusters"][0]


CASES: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    (
        "no early strip",
        lambda c: hcm(c).pop("early_header_mutation_extensions"),
        "does not strip a client-sent 'x-route-cluster'",
    ),
    (
        "guard accepts anything",
        lambda c: guard(c)["string_match"]["safe_regex"].update(regex=".*"),
        "lets unknown cluster names through",
    ),
    (
        "guard is a bare prefix",
        lambda c: guard(c)["string_match"]["safe_regex"].update(regex="(stable|canary).*"),
        "lets unknown cluster names through",
    ),
    ("no guard", lambda c: routes(c)[0]["match"].pop("headers"), "does not check"),
    (
        "guard forgets canary",
        lambda c: guard(c)["string_match"]["safe_regex"].update(regex="^(stable)$"),
        "refuses cluster(s) canary",
    ),
    ("no fallback route", lambda c: routes(c).pop(1), "no fallback route"),
    ("route cache kept", lambda c: ext_proc(c).update(route_cache_action="RETAIN"), "keeps the route cache"),
    (
        "clear route cache disabled",
        lambda c: ext_proc(c).update(disable_clear_route_cache=True),
        "keeps the route cache",
    ),
    (
        "headers skipped",
        lambda c: ext_proc(c)["processing_mode"].update(request_header_mode="SKIP"),
        "nothing is decided",
    ),
    ("metadata dropped", lambda c: ext_proc(c).pop("metadata_options"), "drops the decision's"),
    (
        "idle sidecar checked every minute",
        lambda c: sidecar_cluster(c)["health_checks"][0].pop("no_traffic_interval"),
        "re-checked only every 60s",
    ),
    (
        "idle check too slow",
        lambda c: sidecar_cluster(c)["health_checks"][0].update(no_traffic_interval="30s"),
        "re-checked only every 30s",
    ),
    ("no health check", lambda c: sidecar_cluster(c).pop("health_checks"), "has no health check"),
    (
        "no deny backstop",
        lambda c: hcm(c)["http_filters"].pop(2),
        "lets deny rule(s) block-admin through while the sidecar is away",
    ),
    (
        "deny backstop off on the fallback route",
        lambda c: routes(c)[1].update(typed_per_filter_config=routes(c)[0]["typed_per_filter_config"]),
        "switches the RBAC deny backstop off",
    ),
    (
        "fallback keeps the lane header",
        lambda c: routes(c)[1].pop("request_headers_to_remove"),
        "passes client-sent x-graysteer-lane to the backend",
    ),
    (
        "no baggage strip",
        lambda c: hcm(c)["http_filters"].pop(1),
        "passes a client-sent baggage member 'graysteer.lane'",
    ),
    ("paths not normalized", lambda c: hcm(c).pop("normalize_path"), "does not normalize it"),
    ("slashes not merged", lambda c: hcm(c).pop("merge_slashes"), "merge_slashes: true"),
    (
        "escaped slashes kept",
        lambda c: hcm(c).update(path_with_escaped_slashes_action="KEEP_UNCHANGED"),
        "path_with_escaped_slashes_action",
    ),
    (
        "mutations rejected",
        lambda c: ext_proc(c).update(mutation_rules={"disallow_all": True}),
        "may reject the routing header",
    ),
    (
        "sidecar not HTTP/2",
        lambda c: sidecar_cluster(c).pop("typed_extension_protocol_options"),
        "does not speak HTTP/2",
    ),
    (
        "sidecar cluster missing",
        lambda c: c["static_resources"]["clusters"].pop(0),
        "points at cluster 'graysteer', which does not exist",
    ),
    (
        "canary cluster missing",
        lambda c: c["static_resources"]["clusters"].pop(2),
        "the rules name cluster 'canary' but Envoy defines no such cluster",
    ),
    (
        "other routing header",
        lambda c: routes(c)[0]["route"].update(cluster_header="x-other"),
        "no route forwards with cluster_header: x-route-cluster",
    ),
    (
        "raw_value runtime off",
        lambda c: c.update(
            layered_runtime={
                "layers": [
                    {
                        "name": "static",
                        "static_layer": {"envoy.reloadable_features.send_header_raw_value": False},
                    }
                ]
            }
        ),
        "routing header arrives empty",
    ),
    ("no sidecar filter", lambda c: hcm(c)["http_filters"].pop(0), "the sidecar is never asked"),
]


@pytest.mark.parametrize("name", ["envoy.yaml", "mtls.yaml", "ext_authz.yaml"])
def test_the_shipped_configs_are_clean(name: str) -> None:
    assert check(TABLE, yaml.safe_load((REPO / "envoy" / name).read_text())) == []


AUTHZ = yaml.safe_load((REPO / "envoy" / "ext_authz.yaml").read_text())


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"clear_route_cache": False}, "does not clear the route cache"),
        ({"encode_raw_headers": True}, "reads `raw_value`"),
    ],
)
def test_ext_authz_breakages(change: dict[str, Any], expected: str) -> None:
    config = copy.deepcopy(AUTHZ)
    ext_proc(config).update(change)  # the first HTTP filter: here, ext_authz
    assert any(expected in str(f) for f in check(TABLE, config))


@pytest.mark.parametrize(("name", "breakage", "expected"), CASES, ids=[c[0] for c in CASES])
def test_each_breakage_is_found_with_a_fix(
    name: str, breakage: Callable[[dict[str, Any]], Any], expected: str
) -> None:
    config = copy.deepcopy(ENVOY)
    breakage(config)
    findings = [str(f) for f in check(TABLE, config)]
    assert any(expected in f and ". Fix: " in f for f in findings), findings


def test_camel_case_config_is_understood() -> None:
    from betterproto2 import Casing

    from sidecar.envoyconf.generate import parse_bootstrap

    camel = json.loads(json.dumps(parse_bootstrap(ENVOY).to_dict(casing=Casing.CAMEL)))
    assert "staticResources" in camel
    assert check(TABLE, camel) == []


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = str(REPO / "examples" / "rules.yaml")
    assert main(["check", rules, "--envoy", str(REPO / "envoy" / "envoy.yaml")]) == 0
    broken = copy.deepcopy(ENVOY)
    hcm(broken).pop("early_header_mutation_extensions")
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(broken))
    assert main(["check", rules, "--envoy", str(path)]) == 1
    err = capsys.readouterr().err
    lines = err.splitlines()  # neither the routing, the mirror nor the decision headers are stripped
    assert len(lines) == 3 and all(line.startswith(f"{path}: listener 'ingress'") for line in lines)
    path.write_text("- not a bootstrap\n")
    assert main(["check", rules, "--envoy", str(path)]) == 1
    assert "not an Envoy bootstrap" in capsys.readouterr().err


def test_failing_closed_is_a_choice_not_a_finding() -> None:
    """Fail-closed lets nothing through undecided, so it needs no backstop either."""
    config = copy.deepcopy(ENVOY)
    ext_proc(config).update(failure_mode_allow=False)
    del hcm(config)["http_filters"][1:3]  # no Lua, no RBAC
    assert check(TABLE, config) == []


XFCC_TABLE = table_from_yaml("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    trust: {xfcc: true, identities: [{trust_domain: example.org}], override_headers: [x-canary]}
    rules: [{name: force, match: {headers: {x-canary: "1"}}, route: canary}]
    """)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("ALWAYS_FORWARD_ONLY", "a client can claim any identity"),
        ("APPEND_FORWARD", "a client can claim any identity"),
        ("FORWARD_ONLY", "a client can claim any identity"),
        ("SANITIZE", "a client can claim any identity"),
    ],
)
def test_trusting_xfcc_needs_envoy_to_set_it(mode: str, expected: str) -> None:
    config = yaml.safe_load((REPO / "envoy" / "mtls.yaml").read_text())
    assert not any("x-forwarded-client-cert" in str(f) for f in check(XFCC_TABLE, config))
    hcm(config)["forward_client_cert_details"] = mode
    assert any(expected in str(f) for f in check(XFCC_TABLE, config))


def test_xfcc_without_the_uri_san_is_found() -> None:
    config = yaml.safe_load((REPO / "envoy" / "mtls.yaml").read_text())
    hcm(config)["set_current_client_cert_details"]["uri"] = False
    assert any("without the URI SAN" in str(f) for f in check(XFCC_TABLE, config))


def _principals(rules_yaml: str) -> Any:
    from sidecar.envoyconf.generate import EnvoyOptions, bootstrap_document

    config = bootstrap_document(table_from_yaml(rules_yaml), EnvoyOptions())
    rbac = next(f for f in hcm(config)["http_filters"] if f["name"] == "envoy.filters.http.rbac")
    policy = next(iter(rbac["typed_config"]["rules"]["policies"].values()))
    return policy["principals"][0]


def _deny_on(identity: str) -> str:
    return f"""
version: 1
clusters: [stable, canary]
default: stable
rules:
  - name: no-qa
    match: {{identity: {identity}}}
    deny: {{status: 403}}
"""


def test_backstop_matches_a_trailing_glob_by_prefix_whatever_its_length() -> None:
    glob = "spiffe://example.org/ns/" + "q" * 150 + "/*"
    principal = _principals(_deny_on(f'{{glob: "{glob}"}}'))
    assert principal["authenticated"]["principal_name"] == {"prefix": glob[:-1]}


def test_backstop_refuses_a_glob_envoy_could_not_compile() -> None:
    from sidecar.envoyconf.generate import EnvoyOptions, bootstrap

    glob = "spiffe://example.org/ns/*/" + "q" * 150 + "/*"
    with pytest.raises(ValueError, match="cannot be enforced by Envoy's RBAC backstop"):
        bootstrap(table_from_yaml(_deny_on(f'{{glob: "{glob}"}}')), EnvoyOptions())
    short = _principals(_deny_on('{glob: "spiffe://example.org/ns/*/sa/x"}'))
    assert short["authenticated"]["principal_name"]["safe_regex"]["regex"] == (
        r"spiffe://example\.org/ns/.*/sa/x"
    )


def test_a_guard_envoy_cannot_compile_is_no_guard() -> None:
    config = copy.deepcopy(ENVOY)
    guard(config)["string_match"] = {"safe_regex": {"regex": "^(?=s)(stable|canary)$"}}  # lookahead: not RE2
    assert any("does not check" in str(f) for f in check(TABLE, config))


def test_mirroring_needs_the_route_policy_and_the_early_strip() -> None:
    mirroring = parse_rules(
        b"version: 1\nclusters: [stable, canary]\ndefault: stable\n"
        b"rules:\n  - {name: all, route: stable, mirror: {cluster: canary, percent: 5}}\n",
        "mirror.yaml",
    )
    assert check(mirroring, ENVOY) == []
    no_policy = copy.deepcopy(ENVOY)
    decided = hcm(no_policy)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    decided.pop("request_mirror_policies")
    (finding,) = check(mirroring, no_policy)
    assert "mirror requests but no route copies them by 'x-mirror-cluster'" in str(finding)
    assert check(TABLE, no_policy) == []  # no rule mirrors: nothing to say
    unstripped = copy.deepcopy(ENVOY)
    mutations = hcm(unstripped)["early_header_mutation_extensions"][0]["typed_config"]["mutations"]
    mutations[:] = [m for m in mutations if m.get("remove") != "x-mirror-cluster"]
    for table in (TABLE, mirroring):  # a policy a client can trigger is a finding either way
        (finding,) = check(table, unstripped)
        assert "mirrors by 'x-mirror-cluster' but does not strip a client-sent one" in str(finding)


def test_client_sent_decision_headers_must_be_stripped() -> None:
    unstripped = copy.deepcopy(ENVOY)
    mutations = hcm(unstripped)["early_header_mutation_extensions"][0]["typed_config"]["mutations"]
    mutations[:] = [m for m in mutations if "remove_on_match" not in m]
    (finding,) = check(TABLE, unstripped)
    assert "does not strip client-sent x-graysteer-decision-* headers" in str(finding)
    mutations.append({"remove_on_match": {"key_matcher": {"prefix": "x-graysteer-"}}})  # wider is fine
    assert check(TABLE, unstripped) == []


def test_tracing_to_a_collector_that_cannot_receive_is_found() -> None:
    from sidecar.envoyconf.generate import EnvoyOptions, bootstrap_document

    table = TABLE
    traced = bootstrap_document(table, EnvoyOptions(otlp=("127.0.0.1", 4317)))
    assert check(table, traced) == []
    clusters = traced["static_resources"]["clusters"]
    collector = next(c for c in clusters if c["name"] == "otel_collector")
    del collector["typed_extension_protocol_options"]
    assert any("does not speak HTTP/2" in str(f) for f in check(table, traced))
    clusters.remove(collector)
    assert any("Envoy does not define: no span is exported" in str(f) for f in check(table, traced))
