"""Run wrk and read its report."""

import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from sidecar.dev.processes import ensure_tool

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


@dataclass(frozen=True)
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx/3xx responses + socket errors

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def ensure_wrk() -> str:
    """wrk from Debian; installed with apt-get when missing (needs root)."""
    return ensure_tool("wrk", "wrk")


def lua_script(path: Path, headers: dict[str, str], vary_user: bool) -> Path:
    """A wrk script sending `headers`, plus a new x-user-id per request when `vary_user`."""
    fixed = ", ".join(f'["{k}"] = "{v}"' for k, v in headers.items())
    lines = [
        "counter = 0",
        "request = function()",
        "  counter = counter + 1",
        f"  local headers = {{{fixed}}}",
    ]
    if vary_user:
        lines.append('  headers["x-user-id"] = "user-" .. counter')
    lines += ['  return wrk.format("GET", "/checkout", headers)', "end"]
    path.write_text("\n".join(lines) + "\n")
    return path


def parse(output: str) -> WrkResult:
    def latency(percent: str) -> float:
        match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M)
        if match is None:
            raise ValueError(f"no {percent}% latency in wrk output:\n{output}")
        return float(match.group(1)) * _UNITS[match.group(2)]

    requests = re.search(r"(\d+) requests in", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if requests is None or rps is None:
        raise ValueError(f"unexpected wrk output:\n{output}")
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", output))
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if socket:
        errors += sum(int(n) for n in socket.groups())
    return WrkResult(int(requests.group(1)), float(rps.group(1)), latency("50"), latency("99"), errors)


def run(wrk: str, port: int, connections: int, seconds: float, script: Path) -> WrkResult:
    out = subprocess.run(
        [
            wrk,
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    )
    return parse(out.stdout)
