"""Where the rules and the runtime state come from, one module per source, each of one shape
(`Source`), chosen from `--config`: a rules file and a state file beside it (`file`), or a
fleet's prefix in etcd (`etcd`)."""

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sidecar.table.reload import Reloader, RulesSource, StateStore

if TYPE_CHECKING:
    from sidecar.ops.metrics import Metrics
    from sidecar.serving.options import ServeOptions


class Source(Protocol):
    """The rules, the runtime state, and how both are followed."""

    @property
    def rules(self) -> RulesSource: ...

    @property
    def state(self) -> StateStore: ...

    async def start(self) -> None: ...  # connect and read (OSError when nothing can be read)

    def use_cache(self) -> bool: ...  # serve a local copy instead (the source's is unusable)

    async def follow(self, reloader: Reloader, stop: asyncio.Event) -> None: ...  # reload on changes

    def health(self) -> dict[str, object]: ...  # for /readyz and status

    async def close(self) -> None: ...


def open_source(options: "ServeOptions", metrics: "Metrics") -> Source:
    """The source `--config` names (not started)."""
    if options.is_etcd:
        from sidecar.sources.etcd import EtcdSource, default_cache_dir
        from sidecar.sources.etcd_client import EtcdAddress

        address = EtcdAddress.parse(options.config)
        cache = Path(options.etcd_cache) if options.etcd_cache else default_cache_dir(address)
        if options.worker_index is not None:
            cache = cache / f"worker-{options.worker_index}"
        return EtcdSource(address, options.etcd_tls, cache, metrics)
    from sidecar.sources.file import FileSource

    state = Path(options.state_file) if options.state_file else None
    return FileSource(Path(options.config), state, options.watch, options.watch_polling)
