"""`graysteer envoy-config`: reproduces envoy/, guards exactly the rules' clusters, and the
real Envoy accepts every generated config."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sidecar.envoyconf.generate import EnvoyOptions, bootstrap, bootstrap_document, parse_bootstrap
from sidecar.envoyconf.lint import check, guard_regex
from sidecar.envoyconf.tls import TlsOptions
from sidecar.table.load import load_rules, parse_rules
from tests.e2e.conftest import REPO, envoy_validate

THREE = b"""version: 1
clusters: [v1.stable, v2-canary, v3_next]
default: v1.stable
routing_header: X-Lane
rules:
  - {name: next, match: {headers: {x-next: "1"}}, route: v3_next}
"""


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("envoy.yaml", EnvoyOptions()),
        ("mtls.yaml", EnvoyOptions(mtls=TlsOptions())),
        ("ext_authz.yaml", EnvoyOptions(mode="ext_authz", mtls=TlsOptions())),
        ("ext_authz_http.yaml", EnvoyOptions(mode="ext_authz_http", sidecar=("127.0.0.1", 50080))),
        ("envoy_decides.yaml", EnvoyOptions(mode="envoy_decides", sidecar=("127.0.0.1", 50080))),
    ],
)
def test_envoy_files_are_the_generated_configs(name: str, options: EnvoyOptions) -> None:
    table = load_rules(REPO / "examples" / "rules.yaml")
    committed = parse_bootstrap(yaml.safe_load((REPO / "envoy" / name).read_text()))
    assert committed == bootstrap(table, options)


def test_guard_lists_exactly_the_rules_clusters() -> None:
    table = parse_rules(THREE, "three.yaml")
    assert guard_regex(table.clusters) == r"^(v1\.stable|v2-canary|v3_next)$"
    rendered = bootstrap_document(table, EnvoyOptions())
    assert [c["name"] for c in rendered["static_resources"]["clusters"]] == [
        "graysteer",
        "v1.stable",
        "v2-canary",
        "v3_next",
    ]
    assert check(table, rendered) == []


@pytest.mark.parametrize("rules", [REPO / "examples" / "rules.yaml", "three"])
def test_generated_configs_pass_envoy_validate(rules: Path | str, tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(THREE if rules == "three" else Path(rules).read_bytes())
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "envoy-config",
            "--rules",
            str(path),
            "--listen",
            "0.0.0.0:8080",
            "--sidecar",
            "10.1.2.3:9000",
            "--upstream",
            f"{load_rules(path).default}=10.0.0.9:80",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    generated = tmp_path / "envoy.yaml"
    generated.write_text(out.stdout)
    result = envoy_validate(generated)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(out.stdout)
    assert config["static_resources"]["listeners"][0]["address"]["socket_address"] == {
        "address": "0.0.0.0",
        "port_value": 8080,
    }


def test_unknown_upstream_cluster_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from sidecar.cli import main

    assert (
        main(
            [
                "envoy-config",
                "--rules",
                str(REPO / "examples" / "rules.yaml"),
                "--upstream",
                "nope=1.2.3.4:80",
            ]
        )
        == 1
    )
    assert "--upstream names cluster(s) the rules do not have: nope" in capsys.readouterr().err


def test_workers_become_endpoints_of_the_sidecar_cluster(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "envoy-config",
            "--rules",
            str(REPO / "examples" / "rules.yaml"),
            "--workers",
            "3",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    config = yaml.safe_load(out.stdout)
    (sidecar,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "graysteer"]
    ports = [
        e["endpoint"]["address"]["socket_address"]["port_value"]
        for e in sidecar["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert ports == [50051, 50052, 50053]
    generated = tmp_path / "envoy.yaml"
    generated.write_text(out.stdout)
    assert envoy_validate(generated).returncode == 0


@pytest.mark.parametrize("form", ["file", "spire"])
def test_sds_configs_pass_check_and_envoy_validate(form: str, tmp_path: Path) -> None:
    """`--mtls --sds`: clean under `check --envoy`, accepted by Envoy (a file SDS directory
    must exist with its files, as a mounted volume does)."""
    from sidecar.envoyconf.sds import FileSds
    from sidecar.envoyconf.tls import sds_files
    from tests.tls import make_ca, make_leaf

    directory = tmp_path / "tls"
    directory.mkdir()
    sds = f"file:{directory}" if form == "file" else f"spire:unix://{tmp_path}/agent.sock"
    if form == "file":
        ca = make_ca()
        key, cert = make_leaf(ca, "envoy", dns=["localhost"])
        for name, document in sds_files(FileSds(str(directory))).items():
            (directory / name).write_text(yaml.safe_dump(document))
        (directory / "tls.crt").write_bytes(cert)
        (directory / "tls.key").write_bytes(key)
        (directory / "ca.crt").write_bytes(ca.pem)
    rules = REPO / "examples" / "rules.yaml"
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "envoy-config", "--rules", str(rules), "--mtls", "--sds", sds],
        capture_output=True,
        text=True,
        check=True,
    )
    generated = tmp_path / "envoy.yaml"
    generated.write_text(out.stdout)
    checked = subprocess.run(
        [sys.executable, "-m", "sidecar", "check", str(rules), "--envoy", str(generated)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    result = envoy_validate(generated)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("name", "mode"),
    [("envoy.yaml", "ext_proc"), ("mtls.yaml", "ext_proc"), ("ext_authz.yaml", "ext_authz"),
     ("ext_authz_http.yaml", "ext_authz_http")],
)  # fmt: skip
def test_the_commented_tracing_in_envoy_files_is_what_otlp_generates(name: str, mode: str) -> None:
    """Uncommented, each shipped file's tracing block and collector cluster are --otlp's."""
    text = (REPO / "envoy" / name).read_text()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# tracing:")
    block = ["tracing:"]
    for line in lines[start + 1 :]:
        if not line.strip().startswith("#  "):  # the block's lines are indented; prose follows
            break
        block.append(line.strip()[2:])
    shipped = yaml.safe_load("\n".join(block))["tracing"]
    cluster_at = next(i for i, line in enumerate(lines) if line.strip() == "# - name: otel_collector")
    cluster_lines = [lines[cluster_at].strip()[2:]]
    for line in lines[cluster_at + 1 :]:
        if not line.strip().startswith("#  "):
            break
        cluster_lines.append(line.strip()[2:])
    shipped_cluster = yaml.safe_load("\n".join(cluster_lines))[0]
    table = load_rules(REPO / "examples" / "rules.yaml")
    options = EnvoyOptions(mode=mode, otlp=("127.0.0.1", 4317))
    generated = bootstrap_document(table, options)
    hcm = generated["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert parse_bootstrap({"static_resources": {"clusters": [shipped_cluster]}}) == parse_bootstrap(
        {
            "static_resources": {
                "clusters": [
                    c for c in generated["static_resources"]["clusters"] if c["name"] == "otel_collector"
                ]
            }
        }
    )
    assert yaml.safe_load(yaml.safe_dump(shipped)) == yaml.safe_load(yaml.safe_dump(hcm["tracing"]))
