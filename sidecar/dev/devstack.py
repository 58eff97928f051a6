"""Run Envoy, the sidecar and sample backends on loopback: for the demo, tests, benchmarks.

Every process gets a free port and a log file; the Envoy config under `envoy/` is
used as it is, with only its addresses rewritten (listener and admin on port 0,
clusters pointed at the processes started here).
"""

import copy
import http.client
import itertools
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from sidecar.contract import LUA_FILTER_NAME, XDS_CLUSTER
from sidecar.dev.load import HttpClient
from sidecar.dev.processes import Process, envoy_binary, free_port, wait_for

Address = tuple[str, int]


def rewrite_envoy_config(
    config: Mapping[str, Any],
    clusters: Mapping[str, Address | Sequence[Address]],
    listener_port: int = 0,
    admin_port: int = 0,
    tls_dir: Path | None = None,
) -> dict[str, Any]:
    """A copy of an Envoy bootstrap with listener/admin ports and cluster endpoints replaced
    (a cluster given several addresses gets one endpoint each), and certificate files
    taken from `tls_dir` (same file names) when given."""
    doc = copy.deepcopy(dict(config))
    if tls_dir is not None:
        _replace_filenames(doc, tls_dir)
    doc["admin"]["address"]["socket_address"]["port_value"] = admin_port
    for listener in doc["static_resources"]["listeners"]:
        listener["address"]["socket_address"]["port_value"] = listener_port
    for cluster in doc["static_resources"]["clusters"]:
        if cluster["name"] not in clusters:
            continue
        given = clusters[cluster["name"]]
        addresses: list[Address] = (
            [given] if isinstance(given[0], str) else list(given)  # type: ignore[list-item, arg-type]
        )
        cluster["load_assignment"]["endpoints"] = [
            {
                "lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                    for host, port in addresses
                ]
            }
        ]
    return doc


def _replace_filenames(node: Any, directory: Path) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "filename" and isinstance(value, str):
                node[key] = str(directory / Path(value).name)
            else:
                _replace_filenames(value, directory)
    elif isinstance(node, list):
        for value in node:
            _replace_filenames(value, directory)


# Envoy's statistic of the ECDS Lua filter's version ("" until the first table)
LUA_TABLE_VERSION = f"extension_config_discovery.http_filter.{LUA_FILTER_NAME}.version_text"


def serves_xds(envoy_config: Mapping[str, Any]) -> bool:
    """Whether the Envoy config asks the sidecar for its table over ECDS (envoy_decides)."""
    return any(c["name"] == XDS_CLUSTER for c in envoy_config["static_resources"]["clusters"])


def sidecar_transport(envoy_config: Mapping[str, Any]) -> str:
    """ "http" when the Envoy config health-checks the sidecar over HTTP (ext_authz over
    HTTP), else "grpc"."""
    for cluster in envoy_config["static_resources"]["clusters"]:
        if cluster["name"] == "graysteer":
            checks = cluster.get("health_checks") or [{}]
            return "http" if "http_health_check" in checks[0] else "grpc"
    return "grpc"


class Sidecar(Process):
    """`graysteer serve` on free loopback ports: `port` (gRPC, or with transport="http" the HTTP
    ext_authz server), `admin` API, `http` port (metrics, health)."""

    def __init__(
        self,
        rules: Path | str,
        workdir: Path,
        extra_args: Sequence[str] = (),
        name: str = "sidecar",
        port: int = 0,
        transport: str = "grpc",
        preexec: Callable[[], None] | None = None,
    ) -> None:
        listen = (
            ["--listen", f"127.0.0.1:{port}"]
            if transport == "grpc"
            else ["--listen", "off", "--authz-http-listen", f"127.0.0.1:{port}"]
        )
        argv = [
            sys.executable,
            "-m",
            "sidecar",
            "serve",
            "--config",
            str(rules),
            *listen,
            "--admin-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--drain",
            "0",
            *extra_args,
        ]
        super().__init__(name, argv, workdir / f"{name}.log", preexec=preexec)
        self.transport = transport
        try:
            self._wait_until_serving(argv, transport)
        except BaseException:  # never leave the process or its log open behind a failed start
            self.stop()
            raise

    def _wait_until_serving(self, argv: Sequence[str], transport: str) -> None:
        self.http = int(self.wait_for_log(r"/readyz on https?://127\.0\.0\.1:(\d+)").group(1))
        workers = int(argv[argv.index("--workers") + 1]) if "--workers" in argv else 1
        key = "ext_proc" if transport == "grpc" else "authz_http"
        if workers == 1:
            serving = (
                r"serving gRPC ext_proc and ext_authz on 127\.0\.0\.1:(\d+)"
                if transport == "grpc"
                else r"HTTP ext_authz on 127\.0\.0\.1:(\d+)"
            )
            self.ports = [int(self.wait_for_log(serving).group(1))]
            self.admins = [self.wait_for_log(r"admin API on (\S+);").group(1)]
        else:
            ready = r"worker (\d+) \(pid \d+\) ready (.*)"
            self.wait_for_log(ready.replace(r"(\d+) \(pid", f"({workers - 1}) \\(pid"))
            found = sorted(re.findall(ready, self.log_text()), key=lambda m: int(m[0]))
            fields = [dict(pair.split("=", 1) for pair in line.split()) for _, line in found[:workers]]
            self.ports = [int(f[key].rpartition(":")[2]) for f in fields]
            self.admins = [f["admin"] for f in fields]
        self.port, self.admin = self.ports[0], self.admins[0]

    def http_get(self, path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http, timeout=5)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()


class Envoy:
    """A running Envoy: its listener port, its admin API and its logs: `NAME.log` holds what it
    writes to stdout (the generated configs' access log) and nothing else, `own_log`
    (`NAME.stderr.log`) Envoy's own log. Envoy writes a buffered access log one 16 KiB piece
    at a time; in a shared file a line of its own could land inside an access log line."""

    def __init__(
        self,
        config: Mapping[str, Any],
        workdir: Path,
        name: str = "envoy",
        concurrency: int = 1,
        wrapper: Sequence[str] = (),  # a command that runs Envoy (e.g. a profiler)
        start_timeout: float = 20,
    ) -> None:
        self.name = name
        config_path = workdir / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        admin_file = workdir / f"{name}.admin"
        admin_file.unlink(missing_ok=True)
        self.own_log = workdir / f"{name}.stderr.log"
        self.process = Process(
            name,
            [
                *wrapper,
                envoy_binary(),
                "-c",
                str(config_path),
                "--use-dynamic-base-id",
                "--admin-address-path",
                str(admin_file),
                "--concurrency",
                str(concurrency),
                "-l",
                "warning",
                "--disable-hot-restart",
                "--file-flush-interval-msec",
                "100",
            ],
            workdir / f"{name}.log",
            stderr_path=self.own_log,
        )
        admin = wait_for(lambda: self._read_admin(admin_file), start_timeout, f"{name} admin address")
        host, _, port = admin.rpartition(":")
        self.admin: Address = (host, int(port))
        wait_for(lambda: self.admin_get("/ready")[0] == 200, start_timeout, f"{name} to be ready")
        listeners = json.loads(self.admin_get("/listeners?format=json")[1])
        self.ports = {
            entry["name"]: entry["local_address"]["socket_address"]["port_value"]
            for entry in listeners["listener_statuses"]
        }
        self.port: int = next(iter(self.ports.values()))

    def _read_admin(self, path: Path) -> str | None:
        if self.process.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited:\n{self.process.output_tail()}")
        text = path.read_text().strip() if path.exists() else ""
        return text or None

    def admin_get(self, path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection(*self.admin, timeout=5)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode()
        except OSError:
            return 0, ""
        finally:
            conn.close()

    def stats(self) -> dict[str, int]:
        """Counter and gauge values from the admin API."""
        body = json.loads(self.admin_get("/stats?format=json")[1])
        return {s["name"]: s["value"] for s in body["stats"] if "value" in s}

    def stop(self) -> int:
        return self.process.stop()


class Stack:
    """Sample backends + the sidecar + Envoy (from an `envoy/` config), all on loopback."""

    def __init__(
        self,
        rules: Path | str,
        envoy_config: Path | str | Mapping[str, Any],
        workdir: Path,
        backends: Sequence[str] = ("stable", "canary"),
        sidecar_args: Sequence[str] = (),
        envoy_admin_port: int = 0,
        sidecar_first: bool = True,
        sidecar_preexec: Callable[[], None] | None = None,
    ) -> None:
        """With `sidecar_first=False` Envoy starts alone, as in a pod where its container
        comes up first; `start_sidecar()` then starts the sidecar on the port Envoy uses.
        The sidecar serves the transport the Envoy config calls (gRPC, or HTTP ext_authz)."""
        from sidecar.dev.backend import BackendServer

        # a rules file, or a fleet's etcd://HOST:PORT,.../PREFIX (kept as written: Path would fold "//")
        self.rules: Path | str = rules if str(rules).startswith("etcd://") else Path(rules)
        self.workdir = workdir
        self.sidecar_args = tuple(sidecar_args)
        self.sidecar_preexec = sidecar_preexec  # run in the sidecar's process before it starts
        self.backends = {name: BackendServer(name).start_in_thread() for name in backends}
        self.sidecar: Sidecar | None = None
        self.envoy: Envoy | None = None
        self._clients: list[HttpClient] = []
        self._starts = itertools.count()
        self.sidecar_port = 0  # known once the first sidecar listens, or chosen for Envoy
        template = (
            yaml.safe_load(Path(envoy_config).read_text())
            if isinstance(envoy_config, str | Path)
            else envoy_config
        )
        self.transport = sidecar_transport(template)
        if serves_xds(template):  # one port for every start: Envoy keeps asking there
            self.xds_port = free_port()
            self.sidecar_args += ("--xds-listen", f"127.0.0.1:{self.xds_port}")
        try:
            if sidecar_first:
                self.start_sidecar()
                assert self.sidecar is not None
                ports = self.sidecar.ports
            else:
                ports = [free_port()]
            self.sidecar_port = ports[0]
            endpoints: dict[str, Address | list[Address]] = {
                "graysteer": [("127.0.0.1", port) for port in ports]
            }
            endpoints.update({n: ("127.0.0.1", b.port) for n, b in self.backends.items()})
            if serves_xds(template):
                endpoints[XDS_CLUSTER] = ("127.0.0.1", self.xds_port)
            self.envoy = Envoy(
                rewrite_envoy_config(template, endpoints, admin_port=envoy_admin_port), workdir
            )
            if sidecar_first and serves_xds(template):  # Envoy decides once it has the table
                envoy = self.envoy
                wait_for(lambda: envoy.stats().get(LUA_TABLE_VERSION), 20, "Envoy to get the table over ECDS")
        except BaseException:
            self.stop()
            raise

    def start_sidecar(self) -> "Sidecar":
        """Start the sidecar (again), on the port Envoy sends to once that is known."""
        if self.sidecar is not None:
            self.sidecar.stop()
        n = next(self._starts)
        self.sidecar = Sidecar(
            self.rules,
            self.workdir,
            self.sidecar_args,
            name="sidecar" if n == 0 else f"sidecar-{n}",
            port=self.sidecar_port,
            transport=self.transport,
            preexec=self.sidecar_preexec,
        )
        return self.sidecar

    @property
    def port(self) -> int:
        assert self.envoy is not None
        return self.envoy.port

    def client(self) -> HttpClient:
        """A keep-alive client to Envoy's listener, closed when the stack stops."""
        client = HttpClient(self.port)
        self._clients.append(client)
        return client

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        if self.envoy is not None:
            self.envoy.stop()
        if self.sidecar is not None:
            self.sidecar.stop()
        for backend in self.backends.values():
            backend.stop()

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
