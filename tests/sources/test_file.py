"""The file source: the rules file's directory is watched, and every way a file gets replaced
(in place, renamed over, a Kubernetes ConfigMap's symlink swap) is picked up, by inotify
and by polling."""

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.sources.file import watch_directory
from tests.helpers import request
from tests.table.test_reload import BROKEN, A, B, make_reloader, until


def in_place(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def rename_over(path: Path, text: str) -> None:
    tmp = path.with_name(".rules.yaml.swp")
    tmp.write_text(text)
    os.replace(tmp, path)


def configmap_swap(path: Path, text: str) -> None:
    """What the kubelet does: a new timestamped dir, then the ..data symlink is swapped."""
    directory = path.parent
    new = directory / f"..{len(list(directory.glob('..2*'))) + 2026}"
    new.mkdir()
    (new / "rules.yaml").write_text(text)
    tmp_link = directory / "..data_tmp"
    tmp_link.symlink_to(new.name)
    os.replace(tmp_link, directory / "..data")


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
@pytest.mark.parametrize(
    "replace", [in_place, rename_over, configmap_swap], ids=["in-place", "rename", "configmap"]
)
def test_watcher_picks_up_each_kind_of_update(
    tmp_path: Path, replace: Callable[[Path, str], None], polling: bool
) -> None:
    path = tmp_path / "rules.yaml"
    if replace is configmap_swap:
        (tmp_path / "..2025").mkdir()
        (tmp_path / "..2025" / "rules.yaml").write_text(A)
        (tmp_path / "..data").symlink_to("..2025")
        path.symlink_to("..data/rules.yaml")
    else:
        path.write_text(A)
    reloader = make_reloader(path)

    async def scenario() -> None:
        stop = asyncio.Event()
        watcher = asyncio.create_task(
            watch_directory(
                path, lambda: reloader.reload("watch"), stop, force_polling=polling, resync_seconds=0.5
            )
        )
        await asyncio.sleep(0.1)
        replace(path, B)
        await until(lambda: reloader.holder.table.default == "canary")  # type: ignore[union-attr]
        replace(path, BROKEN)
        await until(lambda: reloader.failures == 1)
        assert reloader.holder.table.default == "canary"  # type: ignore[union-attr]
        replace(path, A)
        await until(lambda: reloader.holder.table.default == "stable")  # type: ignore[union-attr]
        stop.set()
        await asyncio.wait_for(watcher, 5)

    asyncio.run(scenario())
    assert reloader.holder.table.decide(request(u="x")).rule == "ramp"
