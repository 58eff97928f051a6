"""The checks a rollout runs off the controller's tick (webhook gates, Prometheus queries),
each an asyncio task kept by what it checks."""

import asyncio
from typing import Any


async def cancel_all(running: dict[Any, asyncio.Task[None]]) -> None:
    """Cancel every task in `running`, wait until each has ended, and forget them."""
    tasks = list(running.values())
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    running.clear()
