"""docker-compose.yml and the Dockerfile stay consistent with envoy/ and the rules files.

There is no Docker engine in CI, so this checks what a broken compose stack would
get wrong: missing files, and ports or paths that do not line up with envoy.yaml.
"""

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from sidecar.table.load import load_rules

REPO = Path(__file__).parents[1]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
ENVOY = yaml.safe_load((REPO / "envoy" / "envoy.yaml").read_text())


def cluster_port(name: str) -> int:
    (cluster,) = [c for c in ENVOY["static_resources"]["clusters"] if c["name"] == name]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    return int(endpoint["address"]["socket_address"]["port_value"])


def flag(service: dict[str, Any], name: str) -> str:
    command = service["command"]
    return str(command[command.index(name) + 1])


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path, for every bind mount of a service."""
    result = {}
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        if host.startswith((".", "/")):  # a bind mount, not a named volume
            result[container] = REPO / host
    return result


def host_path(service: dict[str, Any], container_path: str) -> Path:
    for container, host in mounts(service).items():
        if container_path == container:
            return host
        if container_path.startswith(container.rstrip("/") + "/"):
            return host / container_path[len(container.rstrip("/")) + 1 :]
    raise AssertionError(f"{container_path} is not mounted into the service")


def test_every_bind_mount_exists() -> None:
    for name, service in COMPOSE["services"].items():
        for container, host in mounts(service).items():
            assert host.exists(), f"{name}: {host} (mounted at {container}) does not exist"


def test_built_services_have_a_dockerfile_whose_sources_exist() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in shlex.split(line)[1:-1]:
                assert (REPO / source).exists(), f"Dockerfile copies missing {source}"
    assert [n for n, s in COMPOSE["services"].items() if s.get("build") == "."] == [
        "sidecar",
        "stable",
        "canary",
    ]


def test_envoy_service_uses_envoy_yaml_with_only_the_listener_rebound() -> None:
    envoy = COMPOSE["services"]["envoy"]
    script = envoy["command"][0]
    source = re.search(r"(/etc/envoy/\S+\.yaml) >", script).group(1)
    assert host_path(envoy, source) == REPO / "envoy" / "envoy.yaml"
    sed = re.search(r"sed 's/([^/]+)/([^/]+)/'", script)
    original = (REPO / "envoy" / "envoy.yaml").read_text()
    assert original.count(sed.group(1)) == 1  # exactly the listener address, nothing else
    listener_port = ENVOY["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    assert f"port_value: {listener_port}" in sed.group(2)
    assert envoy["ports"] == [f"{listener_port}:{listener_port}"]


def test_sidecar_and_backends_listen_where_envoy_sends() -> None:
    services = COMPOSE["services"]
    assert flag(services["sidecar"], "--listen") == f"127.0.0.1:{cluster_port('graysteer')}"
    for backend in ("stable", "canary"):
        assert flag(services[backend], "--name") == backend
        assert flag(services[backend], "--listen") == f"127.0.0.1:{cluster_port(backend)}"
    for name in ("sidecar", "stable", "canary"):
        assert services[name]["network_mode"] == "service:envoy"


def test_sidecar_rules_file_is_mounted_and_valid() -> None:
    sidecar = COMPOSE["services"]["sidecar"]
    rules = host_path(sidecar, flag(sidecar, "--config"))
    table = load_rules(rules)
    # every cluster the rules may name is one envoy.yaml defines
    envoy_clusters = {c["name"] for c in ENVOY["static_resources"]["clusters"]}
    assert set(table.clusters) <= envoy_clusters


def test_sidecar_reads_the_envoy_admin_envoy_yaml_defines_and_keeps_state_in_a_volume() -> None:
    sidecar = COMPOSE["services"]["sidecar"]
    admin = ENVOY["admin"]["address"]["socket_address"]
    assert flag(sidecar, "--envoy-admin") == f"{admin['address']}:{admin['port_value']}"
    state_dir = str(Path(flag(sidecar, "--state-file")).parent)
    named = {v.split(":")[0]: v.split(":")[1] for v in sidecar["volumes"] if not v.startswith(".")}
    assert state_dir in named.values() and set(named) <= set(COMPOSE["volumes"])
