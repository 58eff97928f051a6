"""`graysteer status --watch` as a person sees it: a real terminal (tmux, a fixed size) drawing
a rollout that runs through the real Envoy. The screen must show the step advance, then the
rollback when the canary starts failing, and Ctrl-C must end the view cleanly. Where stdout
is a pipe, the same view comes as plain lines."""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from sidecar.dev.devstack import Stack
from sidecar.dev.load import BackgroundLoad
from sidecar.dev.processes import ensure_tool, free_port, wait_for
from tests.e2e.conftest import ENVOY_CONFIG
from tests.e2e.test_rollout_envoy import RULES

COLUMNS, ROWS = 150, 60
# Runs a command and writes its exit status to a file (tmux's own #{pane_dead_status} is
# missing when the terminal closes before tmux reaps the process). It ignores Ctrl-C itself;
# the command gets it as from a person's shell.
RECORD_EXIT = """
import signal, subprocess, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
status = subprocess.call(sys.argv[2:], preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
open(sys.argv[1], "w").write(str(status))
"""


class Tmux:
    """One tmux server of our own (its own socket: never anyone else's sessions) running
    one command in a window of a fixed size."""

    def __init__(self, socket: Path, command: list[str]) -> None:
        self.binary = ensure_tool("tmux", "tmux")
        self.socket = socket
        # The pane stays after its command ends, to read what it left (set in the same call:
        # before the command can have ended).
        self.run(
            *("new-session", "-d", "-s", "view", "-x", str(COLUMNS), "-y", str(ROWS), *command),
            *(";", "set-option", "-g", "remain-on-exit", "on"),
        )

    def run(self, *args: str) -> str:
        # pytest exports COLUMNS=80 and LINES=24, which a program takes over the terminal's
        # own size: the server (and so the view) gets the environment of a person's shell.
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        done = subprocess.run(
            [self.binary, "-S", str(self.socket), *args], capture_output=True, text=True, timeout=10, env=env
        )
        if done.returncode != 0:
            raise RuntimeError(f"tmux {args[0]}: {done.stderr.strip()}")
        return done.stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "view")

    def wait_for_screen(self, *texts: str, timeout: float) -> str:
        """The screen once it shows every one of `texts` (TimeoutError with the last screen)."""
        last = [""]

        def shows() -> str | None:
            last[0] = self.screen()
            return last[0] if all(text in last[0] for text in texts) else None

        try:
            return str(wait_for(shows, timeout, f"the screen to show {texts}"))
        except TimeoutError as error:
            raise TimeoutError(f"{error}; the screen was:\n{last[0]}") from None

    def kill(self) -> None:
        subprocess.run([self.binary, "-S", str(self.socket), "kill-server"], capture_output=True, timeout=10)


def rollout_stack(tmp_path: Path, *sidecar_args: str) -> Stack:
    """A rollout whose first step holds 2 s and the second a minute (the rollback happens
    there), judged on a 3 s window."""
    rules = tmp_path / "rules.yaml"
    steps = "hold: HOLD}, {weight: 50, hold: HOLD"
    assert steps in RULES
    rules.write_text(RULES.replace(steps, "hold: 2s}, {weight: 50, hold: 60s").replace("MIN", "20"))
    admin = free_port()
    return Stack(
        rules,
        ENVOY_CONFIG,
        tmp_path,
        envoy_admin_port=admin,
        sidecar_args=["--envoy-admin", f"127.0.0.1:{admin}", "--rollout-poll", "0.25", *sidecar_args],
    )


ADVANCE_SECONDS = 60  # the hold (2 s), then a 3 s window with 20 canary requests: the load's pace


def advanced(stack: Stack) -> dict[str, Any]:
    """Wait for the rollout to reach its second step: bounded, and on the event itself, since
    how soon a window holds enough requests is the machine's pace. A rollout that aborted (a
    canary judged unhealthy) fails at once, with its reason."""
    assert stack.sidecar is not None
    sidecar = stack.sidecar
    seen: list[dict[str, Any]] = []

    def second_step() -> bool:
        seen.append(json.loads(sidecar.http_get("/rollouts/ramp")[1]))
        assert seen[-1]["phase"] != "aborted", seen[-1]
        return int(seen[-1]["canary_weight"]) >= 50

    try:
        wait_for(second_step, ADVANCE_SECONDS, "the rollout's second step")
    except TimeoutError as error:
        raise AssertionError(f"{error}; the rollout now: {seen[-1]}") from None
    return seen[-1]


def test_the_terminal_view_shows_a_step_advance_then_a_rollback_and_quits_on_ctrl_c(tmp_path: Path) -> None:
    with rollout_stack(tmp_path) as stack:
        assert stack.sidecar is not None
        view = [sys.executable, "-m", "sidecar", "status", "--watch", "--admin", stack.sidecar.admin]
        exit_file = tmp_path / "exit-status"
        tmux = Tmux(tmp_path / "tmux.sock", [sys.executable, "-c", RECORD_EXIT, str(exit_file), *view])
        load = None
        try:
            # no traffic yet: no verdict, so the rollout holds its first step
            first = tmux.wait_for_screen("rollout ramp", "[>]  step 1  weight 20", timeout=20)
            assert "80 (80%)" in first and "20 (20%)" in first  # the split's bars, at the first step
            assert "requests per cluster" in first and "from Envoy at" in first
            load = BackgroundLoad(stack.port, {}, threads=2, vary_user=True)
            advanced(stack)  # the rollout itself, then the view follows
            second = tmux.wait_for_screen("[x]  step 1", "[>]  step 2  weight 50", "50 (50%)", timeout=20)
            assert "step 2 of 3, canary weight 50 of 100" in second
            assert "left of 60s" in second  # the time left in the current hold
            assert "0.00% / max 10.00%" in second  # the canary's error rate against its threshold
            stack.backends["canary"].fail_rate = 0.5
            rolled_back = tmux.wait_for_screen(
                "aborted: canary error rate", "canary weight 0 of 100", timeout=20
            )
            assert "100 (100%)" in rolled_back  # every user back on stable
            assert "analysis breach" in rolled_back
            tmux.run("send-keys", "-t", "view", "C-c")
            wait_for(lambda: exit_file.exists() and exit_file.read_text(), 10, "the view to end on Ctrl-C")
            assert exit_file.read_text() == "0", tmux.screen()  # not killed by the signal: it quit
        finally:
            if load is not None:
                load.stop()
            tmux.kill()


def test_without_a_terminal_the_view_comes_as_plain_lines_when_they_change(tmp_path: Path) -> None:
    with rollout_stack(tmp_path) as stack:
        assert stack.sidecar is not None
        command = [sys.executable, "-m", "sidecar", "status", "--watch", "--admin", stack.sidecar.admin]
        blocks: list[list[str]] = [[]]
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as view:

            def read() -> None:
                assert view.stdout is not None
                for line in view.stdout:
                    if line.strip():
                        blocks[-1].append(line.rstrip("\n"))
                    else:
                        blocks.append([])

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            try:
                wait_for(lambda: len(blocks) >= 3, 20, "three views")
            finally:
                view.send_signal(signal.SIGINT)
                status = view.wait(10)
                reader.join(5)
            assert status == 0, view.stderr.read() if view.stderr else ""
        first = blocks[0]
        assert first[0].startswith("graysteer at ")
        assert "rollout ramp: progressing: started" in first
        assert any(line.startswith("  [>] step 1: weight 20") for line in first)
        assert not any("\x1b[" in line for block in blocks for line in block)  # no terminal codes
