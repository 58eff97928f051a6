"""The sidecar's persisted runtime state (weight overrides, rollouts), written atomically.

A write goes to a temporary file in the same directory, is fsynced, then renamed over
the old file (and the directory fsynced), so a crash leaves either the old or the new
state, never a torn one. The etcd store (sources/etcd.py) keeps the same document under a
key, with the same reading rules (`parse_state`).
"""

import asyncio
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from sidecar.runtime.load import read_regular_file

log = logging.getLogger("graysteer.state")

STATE_FORMAT = 1
MAX_STATE_BYTES = 1024 * 1024  # weights and rollouts of a few hundred rules fit in a few KiB


def default_state_path(rules: Path) -> Path:
    """`rules.yaml` -> `.rules.yaml.graysteer-state.json` in the same directory."""
    return rules.parent / f".{rules.name}.graysteer-state.json"


class StateConflict(Exception):
    """The state changed in the store since it was read (another replica or operator wrote
    it): nothing was written; read again and retry."""


def parse_state(raw: bytes, where: str) -> dict[str, Any]:
    """A state document; {} when empty, unreadable or of another format (reported)."""
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError as error:
        log.error("state %s is unreadable, starting without runtime overrides: %s", where, error)
        return {}
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        log.error("state %s has an unknown format; ignoring it", where)
        return {}
    return data


def state_bytes(state: dict[str, Any]) -> bytes:
    return (json.dumps({**state, "format": STATE_FORMAT}, indent=2, sort_keys=True) + "\n").encode()


class StateFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def label(self) -> str:
        return str(self.path)

    def read_bytes(self) -> bytes:
        """The raw state (b"" when there is none or it cannot be read)."""
        try:
            return read_regular_file(self.path, MAX_STATE_BYTES)
        except FileNotFoundError:
            return b""
        except OSError as error:
            log.error("state file %s cannot be read: %s", self.path, error)
            return b""

    def load(self) -> dict[str, Any]:
        """The saved state; {} when there is none. A corrupt file is reported and ignored
        (left in place for inspection until the next write replaces it)."""
        return self.parse(self.read_bytes())

    def parse(self, raw: bytes) -> dict[str, Any]:
        return parse_state(raw, f"file {self.path}")

    async def save(self, state: dict[str, Any]) -> None:
        """Replace the state file atomically, off the event loop; OSError on failure."""
        await asyncio.to_thread(self.write, state)

    def write(self, state: dict[str, Any]) -> None:
        """Replace the state file atomically; OSError names the file on failure."""
        payload = state_bytes(state).decode()
        directory = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
