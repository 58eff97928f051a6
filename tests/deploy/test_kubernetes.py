"""deploy/kubernetes: every manifest valid against Kubernetes' own schemas (PyPI
kubernetes-validate, strict: unknown fields are errors), each variant as `kubectl apply -k`
builds it (its kustomize JSON patches applied with PyPI jsonpatch, RFC 6902), the probes on the
sidecar's health endpoints, the container arguments accepted by `graysteer serve`, and the
Envoy ConfigMap equal to the generator's output, clean under `check --envoy` and accepted by
Envoy."""

import copy
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from sidecar.cli import build_parser
from sidecar.dev.processes import envoy_binary
from sidecar.envoyconf.lint import check
from sidecar.sources.etcd_address import EtcdAddress
from sidecar.table.load import load_rules, parse_rules

REPO = Path(__file__).parents[2]
KUBE = REPO / "deploy" / "kubernetes"
VERSION = "1.30.0"  # the oldest Kubernetes release the manifests are checked against
VARIANTS = ("configmap", "etcd", "spire")


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def resources(directory: Path) -> list[dict[str, Any]]:
    """What `kubectl apply -k directory` applies (kustomization resources, recursively, then
    its JSON patches on the resources they target)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    out: list[dict[str, Any]] = []
    for entry in kustomization["resources"]:
        target = (directory / entry).resolve()
        out += resources(target) if target.is_dir() else documents(target)
    for patch in kustomization.get("patches") or []:
        operations = yaml.safe_load((directory / patch["path"]).read_text())
        targets = [d for d in out if d["kind"] == patch["target"]["kind"]]
        (found,) = [d for d in targets if d["metadata"]["name"] == patch["target"]["name"]]
        out[out.index(found)] = jsonpatch.apply_patch(found, operations)
    return out


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and (kind != "ConfigMap" or "envoy.yaml" in d["data"])]
    return found


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


MANIFESTS = sorted(
    p for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml" and ".patch." not in p.name
)


@pytest.mark.parametrize("path", MANIFESTS)
def test_every_manifest_is_valid_kubernetes(path: Path) -> None:
    for doc in documents(path):
        kubernetes_validate.validate(doc, VERSION, strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_as_applied_is_valid_kubernetes(variant: str) -> None:
    for doc in resources(KUBE / variant):
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_the_validator_refuses_a_misspelt_field() -> None:
    deployment = copy.deepcopy(by_kind(resources(KUBE / "etcd"), "Deployment"))
    container(deployment, "graysteer")["readinessProb"] = container(deployment, "graysteer").pop(
        "readinessProbe"
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSION, strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_is_complete(variant: str) -> None:
    docs = resources(KUBE / variant)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["ConfigMap", "Service", "PodDisruptionBudget", "Deployment"]
        + (["ConfigMap"] if variant in ("configmap", "spire") else [])  # the rules
    )
    deployment = by_kind(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert by_kind(docs, "Service")["spec"]["selector"].items() <= labels.items()
    assert by_kind(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["replicas"] == (3 if variant == "etcd" else 1)
    assert deployment["spec"]["template"]["spec"]["containers"][0]["name"] == "envoy"  # patches say 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_resources_and_arguments(variant: str) -> None:
    deployment = by_kind(resources(KUBE / variant), "Deployment")
    sidecar = container(deployment, "graysteer")
    args = build_parser().parse_args([a.replace("$(POD_NAME)", "checkout-front-0") for a in sidecar["args"]])
    port = int(args.http_listen.rpartition(":")[2])
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert ports["metrics"] == port
    assert args.admin_listen.startswith("unix:")  # the admin API: this container only
    for name in ("envoy", "graysteer"):
        resources_ = container(deployment, name)["resources"]
        assert (
            resources_["requests"]["cpu"]
            and resources_["requests"]["memory"]
            and resources_["limits"]["memory"]
        )
        assert container(deployment, name)["securityContext"]["runAsNonRoot"]
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    if variant == "etcd":
        assert args.config.startswith("etcd://") and args.replica_id == "checkout-front-0"
        assert len(EtcdAddress.parse(args.config).members) == 3  # the cluster's members, not one VIP
        assert args.etcd_ca and args.etcd_cert and args.etcd_key
        assert all(Path(f).parent.as_posix() in mounts for f in (args.etcd_ca, args.etcd_cert, args.etcd_key))
        assert Path(args.etcd_cache).is_relative_to(next(p for p, n in mounts.items() if n == "state"))
    else:
        assert mounts[str(Path(args.config).parent)] == "rules"  # the directory: ConfigMap swaps are seen
        rules = yaml.safe_load(by_kind_rules(resources(KUBE / variant))["data"]["rules.yaml"])
        assert parse_rules(yaml.safe_dump(rules).encode(), "rules.yaml").rules


def by_kind_rules(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == "ConfigMap" and "rules.yaml" in d["data"]]
    return found


@pytest.mark.parametrize("variant", ["etcd", "spire"])
def test_the_envoy_config_is_the_generators_and_clean(variant: str, tmp_path: Path) -> None:
    docs = resources(KUBE / variant)
    text = by_kind(docs, "ConfigMap")["data"]["envoy.yaml"]
    command = text.splitlines()[0].removeprefix("# Generated by: ")
    generated = subprocess.run(
        [sys.executable, "-m", "sidecar", *shlex.split(command)[1:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert generated.strip() == text.strip()
    config = yaml.safe_load(text)
    assert check(load_rules(REPO / "examples" / "rules.yaml"), config) == []
    clusters = {c["name"]: c["type"] for c in config["static_resources"]["clusters"]}
    expected = {"graysteer": "STATIC", "stable": "STRICT_DNS", "canary": "STRICT_DNS"}
    if variant == "spire":  # the agent's socket is in a volume of Envoy's container
        expected["spire_agent"] = "STATIC"
        (agent,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "spire_agent"]
        socket = agent["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["pipe"][
            "path"
        ]
        mounts = {m["mountPath"] for m in container(by_kind(docs, "Deployment"), "envoy")["volumeMounts"]}
        assert str(Path(socket).parent) in mounts
    assert clusters == expected
    (tmp_path / "envoy.yaml").write_text(text)
    validated = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(tmp_path / "envoy.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert validated.returncode == 0, validated.stderr[-2000:]
