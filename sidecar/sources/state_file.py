"""The sidecar's persisted runtime state (weight overrides, rollouts), written atomically.

A write goes to a temporary file in the same directory, is fsynced, then renamed over
the old file (and the directory fsynced), so a crash leaves either the old or the new
state, never a torn one. The etcd store (sources/etcd.py) keeps the same document under a
key, with the same reading rules (`parse_state`): a document that cannot be read or does
not pass the state schema (sidecar.core.state) is a StateError, and whoever reads it keeps
what it had.

No document is "no state" only until this process has seen one. The writer never leaves an
empty document (a rename replaces the file whole), so an empty one (0 bytes: a crashed
writer of another tool, `> file`, a full disk) is a StateError like truncated JSON; and a
document that this process read or wrote and that is gone now is StateRemoved, never "no
state": read as none, an aborted rollout would start again. A missing document at start is a
first start: nothing can tell it from one removed while the sidecar was stopped.
"""

import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from sidecar.core.state import STATE_FORMAT, StateError, StateRemoved, state_problems
from sidecar.table.load import read_regular_file

MAX_STATE_BYTES = 1024 * 1024  # weights and rollouts of a few hundred rules fit in a few KiB


def default_state_path(rules: Path) -> Path:
    """`rules.yaml` -> `.rules.yaml.graysteer-state.json` in the same directory."""
    return rules.parent / f".{rules.name}.graysteer-state.json"


class StateConflict(Exception):
    """The state changed in the store since it was read (another replica or operator wrote
    it): nothing was written; read again and retry."""


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e400
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def present(raw: bytes | None, where: str, existed: bool) -> bytes:
    """A stored state as read (None: there is none) -> its bytes, b"" for none: StateError
    when it is empty, StateRemoved when there is none but this process had seen one."""
    if raw is None:
        if existed:
            raise StateRemoved(
                f"state {where} was removed after it was read: the weights and rollout states last "
                "read stay in force and are written back"
            )
        return b""
    if not raw:
        raise StateError(
            f"state {where} is empty (0 bytes): the sidecar never writes an empty state, so it was "
            "cut short (a crashed writer, a truncation, a full disk)"
        )
    return raw


def parse_state(raw: bytes, where: str) -> dict[str, Any]:
    """A state document; {} when there is none (empty); StateError naming `where` and what
    is wrong when it cannot be read (not JSON, NaN or infinite numbers, another format, or
    anything the state schema refuses)."""
    if not raw:
        return {}
    if len(raw) > MAX_STATE_BYTES:
        raise StateError(f"state {where}: {len(raw)} bytes, over the limit of {MAX_STATE_BYTES}")
    try:
        data = json.loads(raw, parse_float=_finite, parse_constant=_no_constant)
    except (ValueError, RecursionError) as error:
        raise StateError(f"state {where} is not valid JSON: {error}") from None
    problems = state_problems(data)
    if problems:
        raise StateError(f"state {where} is not a state document: {'; '.join(problems)}")
    return dict(data)


def state_bytes(state: dict[str, Any]) -> bytes:
    return (json.dumps({**state, "format": STATE_FORMAT}, indent=2, sort_keys=True) + "\n").encode()


class StateFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.existed = False  # read or written by this process: from then on, missing is removed

    @property
    def label(self) -> str:
        return str(self.path)

    def read_bytes(self) -> bytes:
        """The raw state: b"" when there is none; StateError when it cannot be read or is
        empty, StateRemoved when it is gone after this process saw it (see the module)."""
        raw: bytes | None
        try:
            raw = read_regular_file(self.path, MAX_STATE_BYTES)
        except FileNotFoundError:
            raw = None
        except OSError as error:
            raise StateError(f"state file {self.path} cannot be read: {error.strerror or error}") from error
        raw = present(raw, f"file {self.path}", self.existed)
        self.existed = self.existed or bool(raw)
        return raw

    def load(self) -> dict[str, Any]:
        """The saved state; {} when there is none; StateError when it cannot be read (the
        file is left in place: it is not overwritten until it reads again)."""
        return self.parse(self.read_bytes())

    def parse(self, raw: bytes) -> dict[str, Any]:
        return parse_state(raw, f"file {self.path}")

    async def save(self, state: dict[str, Any]) -> None:
        """Replace the state file atomically, off the event loop; OSError on failure."""
        await asyncio.to_thread(self.write, state)

    def write(self, state: dict[str, Any]) -> None:
        """Replace the state file atomically; OSError names the file on failure."""
        atomic_write(self.path, state_bytes(state))
        self.existed = True

    async def restore(self, raw: bytes) -> bool:
        """Write `raw` (the state last read) back where the state was removed, never over a
        state that is there again (another process restored or wrote one first): True when
        written."""
        return await asyncio.to_thread(atomic_write, self.path, raw, False)


def atomic_write(path: Path, content: bytes, replace: bool = True) -> bool:
    """Replace `path` with `content` so that a crash leaves the old or the new file, never a
    torn one: a temporary file in the same directory, fsynced, renamed over, directory fsynced.
    With `replace` false, only where there is no file (a hard link, which fails on an existing
    name): False when there was one, and nothing was written."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                Path(tmp).unlink(missing_ok=True)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True
