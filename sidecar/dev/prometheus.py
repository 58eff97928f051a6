"""A real Prometheus server on loopback for the rollout metric tests and local trials:
Debian's `prometheus` package, installed with apt-get when missing (as root). It scrapes
the given targets every second (the sample backends' /metrics, Envoy's /stats/prometheus),
so a test sees a change within seconds; restartable on the same port and data (an outage,
then recovery)."""

import json
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sidecar.dev.processes import Process, ensure_tool, free_port, wait_for

SCRAPE_SECONDS = 1


class PrometheusServer:
    """Its port is chosen at once (a sidecar can be told the URL first); `start(targets)`
    starts it scraping `targets`: job name -> (metrics path, [HOST:PORT, ...])."""

    def __init__(self, workdir: Path) -> None:
        self.binary = ensure_tool("prometheus", "prometheus")
        self.workdir = workdir
        self.port = free_port()
        self.config = workdir / "prometheus.yml"
        self.process: Process | None = None

    def scrape(
        self, targets: Mapping[str, tuple[str, list[str]]], query_log: Path | None = None
    ) -> "PrometheusServer":
        """Start scraping `targets`; with `query_log`, Prometheus writes every query it runs
        there (one JSON line each: its own record of what reached it)."""
        scrapes = [
            {"job_name": job, "metrics_path": path, "static_configs": [{"targets": list(hosts)}]}
            for job, (path, hosts) in targets.items()
        ]
        interval = f"{SCRAPE_SECONDS}s"
        config: dict[str, Any] = {"global": {"scrape_interval": interval, "evaluation_interval": interval}}
        if query_log is not None:
            config["global"]["query_log_file"] = str(query_log)
        self.config.write_text(json.dumps({**config, "scrape_configs": scrapes}))  # JSON is YAML
        self.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = Process(
            "prometheus",
            [
                self.binary,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.workdir / 'prometheus.data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            self.workdir / "prometheus.log",
        )
        wait_for(self.ready, 30, "prometheus to be ready")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's vector, straight from the HTTP API (for tests to wait on)."""
        data = urllib.parse.urlencode({"query": promql}).encode()
        with urllib.request.urlopen(f"{self.url}/api/v1/query", data, timeout=5) as answer:
            result: list[dict[str, Any]] = json.loads(answer.read())["data"]["result"]
            return result

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def __enter__(self) -> "PrometheusServer":
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
