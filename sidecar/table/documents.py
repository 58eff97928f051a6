"""Reading a large rules document in another process, so that the serving process never
stalls on it.

Parsing and validating a rules document builds a large, short-lived object graph (a 580 KB
document of 4,001 regex rules: ~3 s of YAML parsing and ~1 s of validation, millions of
objects). In a thread of the serving process that work competes for the GIL, and the
garbage collector's full collections over that graph stop every thread: serving stalls of
0.3-0.6 s were measured. A document of at least `offload_bytes` is therefore parsed and
validated in a child process (`python -m sidecar.table.documents`, started on first use
and kept for later reloads), and only the validated document comes back; compiling it into
a table (regexes, matchers) stays in the serving process, in a thread. Smaller documents
are read in the calling thread: they take milliseconds. docs/operations.md gives the costs.

The child is a plain subprocess speaking length-prefixed pickles over its stdin/stdout (it
is this process's own child: nobody else can write to those pipes), not multiprocessing,
whose spawn re-imports the parent's main module.

Bounded: a read that takes longer than `timeout` seconds is refused (the child is killed
and a new one started on the next read), as is one whose child dies; the last good table
stays.
"""

import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from typing import IO, Any

from sidecar.core import Problem, RulesError
from sidecar.table.load import read_document

log = logging.getLogger("graysteer.documents")

OFFLOAD_BYTES = 128 * 1024
TIMEOUT_SECONDS = 60.0
_LENGTH = struct.Struct("!I")


class DocumentReader:
    def __init__(self, offload_bytes: int = OFFLOAD_BYTES, timeout: float = TIMEOUT_SECONDS) -> None:
        self.offload_bytes = offload_bytes
        self.timeout = timeout
        self._child: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # one read at a time through the child

    def read(self, content: bytes, source: str) -> dict[str, Any]:
        """The validated document (see load.read_document); RulesError otherwise."""
        if len(content) < self.offload_bytes:
            return read_document(content, source)
        with self._lock:
            try:
                outcome, value = self._ask((content, source))
            except (OSError, EOFError, TimeoutError, pickle.UnpicklingError) as error:
                self._stop()
                why = (
                    "not read in time" if isinstance(error, TimeoutError) else "the process reading it failed"
                )
                raise RulesError(source, [Problem("document", f"{why} ({error}): refused")]) from None
        if outcome == "error":
            raise value
        return value  # type: ignore[no-any-return]

    def _ask(self, question: object) -> tuple[str, Any]:
        if self._child is not None and self._child.poll() is not None:
            self._stop()  # died since the last read
        if self._child is None:
            self._child = subprocess.Popen(
                [sys.executable, "-m", "sidecar.table.documents"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        child = self._child
        assert child.stdin is not None and child.stdout is not None
        _send(child.stdin, question)
        deadline = time.monotonic() + self.timeout
        size = _LENGTH.unpack(_read(child.stdout, _LENGTH.size, deadline))[0]
        answer = pickle.loads(_read(child.stdout, size, deadline))
        return answer  # type: ignore[no-any-return]

    def _stop(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            child.kill()
            child.wait()
            for pipe in (child.stdin, child.stdout):
                if pipe is not None:
                    pipe.close()

    def close(self) -> None:
        with self._lock:
            self._stop()


def _send(pipe: IO[bytes], message: object) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    pipe.write(_LENGTH.pack(len(data)) + data)
    pipe.flush()


def _read(pipe: IO[bytes], size: int, deadline: float) -> bytes:
    """Exactly `size` bytes before `deadline` (TimeoutError), or EOFError."""
    chunks, fd = [], pipe.fileno()
    while size:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise TimeoutError("no answer in time")
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise EOFError("the process ended")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def serve(stdin: IO[bytes], stdout: IO[bytes]) -> None:
    """The child: answer each (content, source) with ("ok", document) or ("error", RulesError)
    until stdin closes."""
    while True:
        head = stdin.read(_LENGTH.size)
        if len(head) < _LENGTH.size:
            return
        content, source = pickle.loads(stdin.read(_LENGTH.unpack(head)[0]))
        try:
            answer: tuple[str, object] = ("ok", read_document(content, source))
        except RulesError as error:
            answer = ("error", error)
        _send(stdout, answer)


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
