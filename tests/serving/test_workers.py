"""The `--workers` supervisor with a worker that serves nothing (tests/serving/noop_worker.py):
each worker receives the options object with its own index and addresses, a worker that
dies is started again on the same addresses, a stop stops them all, and a worker that fails
to start fails the supervisor."""

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from sidecar.serving.options import ServeOptions
from sidecar.serving.workers import RESTART_DELAY_SECONDS, Supervisor, worker_address

NOOP = [sys.executable, str(Path(__file__).with_name("noop_worker.py"))]


def seen(directory: Path) -> list[dict]:
    return sorted(
        (json.loads(p.read_text()) for p in directory.glob("worker-*.json")), key=lambda o: o["worker_index"]
    )


async def until(condition: object, timeout: float = 30) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


def test_worker_addresses() -> None:
    assert worker_address("127.0.0.1:50051", 2) == "127.0.0.1:50053"
    assert worker_address("127.0.0.1:0", 2) == "127.0.0.1:0"
    assert worker_address("unix:/run/g.sock", 1) == "unix:/run/g.sock.1"
    assert worker_address(None, 1) is None


def test_workers_get_the_options_restart_and_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAYSTEER_TEST_DIR", str(tmp_path))
    options = ServeOptions(
        config="rules.yaml",
        listen="127.0.0.1:6000",
        admin_listen="127.0.0.1:7000",
        workers=3,
        grace_seconds=2.5,
    )
    supervisor = Supervisor(options, NOOP)

    async def scenario() -> int:
        stop = asyncio.Event()
        running = asyncio.create_task(supervisor.run(stop))
        await until(lambda: len(seen(tmp_path)) == 3 and all(w.ready for w in supervisor.workers))
        first = seen(tmp_path)
        assert [o["worker_index"] for o in first] == [0, 1, 2]
        assert [o["listen"] for o in first] == ["127.0.0.1:6000", "127.0.0.1:6001", "127.0.0.1:6002"]
        assert [o["admin_listen"] for o in first] == ["127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002"]
        assert all(o["workers"] == 1 and o["config"] == "rules.yaml" for o in first)  # never re-supervised
        victim = supervisor.workers[1].process
        assert victim is not None
        os.kill(victim.pid, signal.SIGKILL)
        await until(
            lambda: supervisor.workers[1].process is not victim and supervisor.workers[1].ready,
            RESTART_DELAY_SECONDS + 10,
        )
        again = [o for o in seen(tmp_path) if o["worker_index"] == 1]
        assert len(again) == 2 and again[0]["listen"] == again[1]["listen"]  # where Envoy sends it
        stop.set()
        return await running

    assert asyncio.run(scenario()) == 0
    assert all(w.process is not None and w.process.returncode == 0 for w in supervisor.workers)


def test_a_worker_that_fails_to_start_fails_the_supervisor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRAYSTEER_TEST_DIR", str(tmp_path))
    monkeypatch.setenv("GRAYSTEER_TEST_FAIL_START", "1")
    supervisor = Supervisor(ServeOptions(config="rules.yaml", workers=2), NOOP)
    with pytest.raises(RuntimeError, match=r"worker \d failed to start \(exit code 3\)"):
        asyncio.run(supervisor.run(asyncio.Event()))
