"""A rules file and the state file beside it, as a source: read from disk, followed by
watching their directories.

Watch the directory, not the file: an editor's write-to-temp-and-rename, an in-place write
and a Kubernetes ConfigMap update (which swaps the `..data` symlink) all show up as
changes in the directory, while a watch on the file itself would be lost on the first
rename. Every change triggers a reload attempt; the reloader ignores content it
already serves. inotify is used where it works, polling otherwise.

After `resync_seconds` without any event the file is looked at anyway: a change made
while the watch was being set up, or an event lost by the kernel or a network
filesystem, is picked up within that time. A look costs one read and one hash.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import watchfiles

from sidecar.sources.state_file import StateFile, default_state_path
from sidecar.table.load import MAX_FILE_BYTES, read_regular_file
from sidecar.table.reload import Reloader

log = logging.getLogger("graysteer.watch")

POLL_INTERVAL_MS = 300
RESYNC_SECONDS = 5.0


async def watch_directory(
    path: Path,
    on_change: Callable[[], Awaitable[object]],
    stop: asyncio.Event,
    force_polling: bool = False,
    ignore: frozenset[str] = frozenset(),
    resync_seconds: float = RESYNC_SECONDS,
) -> None:
    """Call `on_change` after changes in `path`'s directory (names in `ignore` excepted),
    and after every `resync_seconds` without changes."""
    directory = path.parent
    while not stop.is_set():
        try:
            async for changes in watchfiles.awatch(
                directory,
                watch_filter=None,
                debounce=50,
                step=25,
                stop_event=stop,
                force_polling=force_polling,
                poll_delay_ms=POLL_INTERVAL_MS,
                recursive=False,
                rust_timeout=int(resync_seconds * 1000),
                yield_on_timeout=True,
            ):
                if not changes or any(Path(changed).name not in ignore for _, changed in changes):
                    await on_change()
        except (OSError, RuntimeError) as error:
            if stop.is_set():
                return
            # inotify can fail (watch limits, some network filesystems): fall back to polling.
            log.warning(
                "watching %s failed (%s); polling every %d ms instead", directory, error, POLL_INTERVAL_MS
            )
            force_polling = True
            await asyncio.sleep(POLL_INTERVAL_MS / 1000)


class RulesFile:
    """A rules file (a RulesSource): a regular file of at most MAX_FILE_BYTES."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def label(self) -> str:
        return str(self.path)

    def read(self) -> bytes:
        return read_regular_file(self.path, MAX_FILE_BYTES)


class FileSource:
    """The rules file and its state file (by default `.RULES.graysteer-state.json` beside it),
    and the next rules for a shadow table when given (`serve --shadow-config`), followed by
    watching their directories: the state changes when another worker process sets a weight
    or steps a rollout."""

    def __init__(
        self,
        rules: Path,
        state: Path | None = None,
        watch: bool = True,
        polling: bool = False,
        next_rules: Path | None = None,
    ) -> None:
        self.rules = RulesFile(rules)
        self.state = StateFile(state or default_state_path(rules))
        self.next_rules = RulesFile(next_rules) if next_rules is not None else None
        self.watch, self.polling = watch, polling

    async def start(self) -> None:
        """Nothing to connect to: the files are read by the reloader."""

    def use_cache(self) -> bool:
        return False  # the files are the only copy

    async def follow(self, reloader: Reloader, stop: asyncio.Event) -> None:
        """Reload on every change in the rules' and the state's directories, until `stop`."""
        if not self.watch:
            await stop.wait()
            return
        paths = [self.state.path, self.rules.path] + ([self.next_rules.path] if self.next_rules else [])
        watched = {path.parent.resolve(): path for path in paths}
        await asyncio.gather(
            *(
                watch_directory(path, lambda: reloader.reload("watch"), stop, self.polling)
                for path in watched.values()
            )
        )

    def health(self) -> dict[str, object]:
        return {}

    async def close(self) -> None:
        pass
