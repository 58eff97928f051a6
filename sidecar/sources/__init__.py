"""Where the rules and the runtime state come from, one module per source, each of one shape
(`Source`), chosen from `--config` (sidecar.serving.build): a rules file and a state file
beside it (`file`), or a fleet's prefix in etcd (`etcd`)."""

import asyncio
from typing import Protocol

from sidecar.table.reload import Reloader, RulesSource, StateStore


class Source(Protocol):
    """The rules, the runtime state, and how both are followed."""

    @property
    def rules(self) -> RulesSource: ...

    @property
    def state(self) -> StateStore: ...

    @property
    def next_rules(self) -> RulesSource | None: ...  # the shadow table's rules, when followed

    async def start(self) -> None: ...  # connect and read (OSError when nothing can be read)

    def use_cache(self) -> bool: ...  # serve a local copy instead (the source's is unusable)

    async def follow(self, reloader: Reloader, stop: asyncio.Event) -> None: ...  # reload on changes

    def health(self) -> dict[str, object]: ...  # for /readyz and status

    async def close(self) -> None: ...
