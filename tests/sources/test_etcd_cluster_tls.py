"""A replica on a real three-member etcd cluster serving its clients over TLS (one CA for the
cluster), each member on a loopback address of its own with a certificate for that address
alone: the member the replica talks to is SIGKILLed and it fails over, over TLS, checking
each member's certificate against that member's address; a member whose certificate another
CA signed is refused and left for the next, never used, and the reason is shown."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from sidecar.dev.devstack import Sidecar
from sidecar.dev.etcd import EtcdCluster
from sidecar.dev.processes import wait_for
from sidecar.sources.etcd_client import EtcdTls
from sidecar.table.load import config_version
from tests.tls import Authority, make_ca, make_leaf, write_pair

HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
NOT_SIGNED = "TLS: the member's certificate is not signed by the etcd CA (--etcd-ca)"
RULES = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    rules:
      - name: marker
        match: {headers: {x-marker: "MARKER"}}
        route: canary
    """)


def serve_files(directory: Path, ca: Authority, signer: Authority, host: str) -> Path:
    """etcd's TLS files: clients signed by `ca` trusted, a server certificate for `host`
    alone, signed by `signer`. etcd reads its certificate again at every handshake: files
    replaced under a running member are what its next client meets (the member is not
    restarted: a restart would disturb the cluster, and move the replica, before the test
    means to)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(ca.pem)
    new = directory / "new"
    new.mkdir(exist_ok=True)
    write_pair(new, "server", make_leaf(signer, f"etcd {host}", ips=[host]))
    for name in ("server.key", "server.pem"):
        (new / name).replace(directory / name)
    return directory


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_failover_over_tls_checks_each_member_and_refuses_a_foreign_certificate(tmp_path: Path) -> None:
    ca, foreign = make_ca("etcd cluster CA"), make_ca("another CA")
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    write_pair(tmp_path, "client", make_leaf(ca, "graysteer"))
    tls = EtcdTls(tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client.key")
    flags = ["--etcd-ca", str(tls.ca), "--etcd-cert", str(tls.cert), "--etcd-key", str(tls.key)]
    dirs = [serve_files(tmp_path / f"tls{i}", ca, ca, host) for i, host in enumerate(HOSTS)]
    cluster = EtcdCluster(tmp_path, hosts=HOSTS, tls_dirs=dirs, client_tls=tls)
    url = cluster.url() + "/shop/checkout"
    names = [f"{host}:{m.port}" for host, m in zip(HOSTS, cluster.members, strict=True)]
    sidecar: Sidecar | None = None
    try:

        def push(marker: str) -> str:
            text = RULES.replace("MARKER", marker)
            (tmp_path / "rules.yaml").write_text(text)
            run = run_cli("push", str(tmp_path / "rules.yaml"), url, *flags, "--yes")
            assert run.returncode == 0, run.stderr
            return config_version(text.encode())

        def readyz() -> dict:
            assert sidecar is not None
            return dict(json.loads(sidecar.http_get("/readyz")[1]))

        start = push("start")
        cache = ["--etcd-cache", str(tmp_path / "cache"), "--replica-id", "r0"]
        sidecar = Sidecar(url, tmp_path, [*flags, *cache])
        wait_for(lambda: readyz()["version"].startswith(start), 20, "the replica to serve the pushed rules")
        used = names.index(readyz()["etcd"]["member"])
        # the member the replica would move to next presents a certificate for its own
        # address, signed by another CA
        rogue, last = (used + 1) % 3, (used + 2) % 3
        serve_files(dirs[rogue], ca, foreign, HOSTS[rogue])

        cluster.members[used].kill()
        wait_for(
            lambda: readyz()["etcd"]["member"] == names[last], 20, f"the replica to move to {names[last]}"
        )
        version = push("after-failover")
        wait_for(lambda: readyz()["version"].startswith(version), 10, "the push to reach the replica")

        down = {m["member"]: m["reason"] for m in readyz()["etcd"]["members_down"]}
        assert set(down) == {names[used], names[rogue]}, down
        assert down[names[rogue]] == f"{NOT_SIGNED}: unable to get local issuer certificate: refused"
        assert f"moving to {names[last]}" in sidecar.log_text()

        def fleet_status() -> dict:
            return dict(json.loads(run_cli("status", "--fleet", url, *flags, "--json").stdout))

        def record_shows_failover() -> dict | None:
            status = fleet_status()
            (replica,) = status["replicas"]
            moved = replica["etcd_member"] == names[last] and names[rogue] in replica["etcd_down"]
            return status if moved else None

        probes = {m["member"]: m for m in wait_for(record_shows_failover, 10, "the record")["etcd_members"]}
        assert probes[names[rogue]]["error"].startswith(NOT_SIGNED)
        assert probes[names[last]]["up"] and not probes[names[used]]["up"]

        # signed by the CA, but for another member's address: refused as well
        serve_files(dirs[rogue], ca, ca, HOSTS[last])
        probes = {m["member"]: m for m in fleet_status()["etcd_members"]}
        assert probes[names[rogue]]["error"] == (
            f"TLS: the member's certificate is not for its address {HOSTS[rogue]} "
            "(not among its subject alternative names): refused"
        )
    finally:
        if sidecar is not None:
            sidecar.stop()
        cluster.stop()
