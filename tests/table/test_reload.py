"""The reloader and the directory watcher with real files (no Envoy)."""

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import sidecar.table.reload as reload_module
from sidecar.core import Table
from sidecar.core.engine import Engine
from sidecar.core.state import StateRemoved
from sidecar.ops.metrics import Metrics
from sidecar.sources.file import RulesFile
from sidecar.sources.state_file import StateFile, default_state_path
from sidecar.table.reload import Outcome, Reloader

A = """version: 1
clusters: [stable, canary]
default: stable
rules:
  - name: ramp
    split: {key: ["header:u"], to: [{cluster: stable, weight: 90}, {cluster: canary, weight: 10}]}
"""
B = A.replace("default: stable", "default: canary")
BROKEN = A.replace("weight: 10", "weight: -10")


def make_reloader(path: Path) -> Reloader:
    return Reloader(RulesFile(path), Metrics(CollectorRegistry()), StateFile(default_state_path(path)))


def started(tmp_path: Path, text: str = A) -> tuple[Path, Reloader]:
    """A rules file with `text` and a reloader that has loaded it."""
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path, make_reloader(path)


def reloads(reloader: Reloader, result: str) -> float:
    return reloader.metrics.registry.get_sample_value("graysteer_reloads_total", {"result": result}) or 0


def test_reload_swaps_only_valid_tables(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(A)
    reloader = make_reloader(path)
    first = reloader.table
    holder = reloader.holder

    async def scenario() -> None:
        assert (await reloader.reload("test")).outcome is Outcome.UNCHANGED
        path.write_text(BROKEN)
        result = await reloader.reload("test")
        assert result.outcome is Outcome.INVALID
        assert f"{path}: rule 'ramp' (rules[0]) field split.to[1].weight" in result.error
        assert holder.table is first  # the last good table stays
        path.unlink()
        assert (await reloader.reload("test")).outcome is Outcome.MISSING
        assert holder.table is first
        path.write_text(B)
        assert (await reloader.reload("test")).outcome is Outcome.LOADED
        assert holder.table.default == "canary"

    asyncio.run(scenario())
    assert reloader.failures == 2
    assert (reloads(reloader, "invalid"), reloads(reloader, "missing")) == (1, 1)
    assert reloads(reloader, "loaded") == 2  # start-up and B
    assert reloader.last_result is not None and reloader.last_result.outcome is Outcome.LOADED


def test_startup_on_a_broken_file_raises_with_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(BROKEN)
    with pytest.raises(ValueError, match=r"field split\.to\[1\]\.weight"):
        make_reloader(path)


def test_set_weights_persists_and_survives_a_restart(tmp_path: Path) -> None:
    path, reloader = started(tmp_path)
    loaded = asyncio.run(reloader.set_weights("ramp", {"canary": 30}))
    assert loaded.table.rules[0].split is not None
    assert loaded.table.rules[0].split.weights == (70, 30)
    assert loaded.table.version.startswith(loaded.file_version + "+o")
    state = json.loads(default_state_path(path).read_text())
    assert state["weight_overrides"]["ramp"] == {
        "weights": {"stable": 70, "canary": 30},
        "base": {"stable": 90, "canary": 10},
    }
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

    restarted = make_reloader(path)
    table = restarted.table
    assert table.version == loaded.table.version
    assert table.rules[0].split is not None and table.rules[0].split.weights == (70, 30)
    # back to the file's weights: the override disappears
    asyncio.run(restarted.set_weights("ramp", {"canary": 10}))
    assert restarted.loaded is not None and restarted.loaded.overrides == {}
    assert json.loads(default_state_path(path).read_text())["weight_overrides"] == {}


def test_editing_the_rules_weights_in_the_file_drops_the_override(tmp_path: Path) -> None:
    path, reloader = started(tmp_path)

    async def scenario() -> None:
        await reloader.set_weights("ramp", {"canary": 50})
        path.write_text(A + "# an unrelated edit\n")
        await reloader.reload("test")
        assert reloader.holder.table.rules[0].split.weights == (50, 50)  # type: ignore[union-attr]
        path.write_text(A.replace("weight: 90", "weight: 80").replace("weight: 10", "weight: 20"))
        await reloader.reload("test")
        assert reloader.holder.table.rules[0].split.weights == (80, 20)  # type: ignore[union-attr]

    asyncio.run(scenario())
    assert reloader.loaded is not None and reloader.loaded.overrides == {}


@pytest.mark.parametrize(
    ("rule", "weights", "message"),
    [
        ("nope", {"canary": 1}, "no such rule"),
        ("ramp", {"cnary": 1}, "unknown cluster"),
        ("ramp", {"canary": 101}, "exceed"),
    ],
)
def test_set_weights_refusals_change_nothing(tmp_path: Path, rule: str, weights: dict, message: str) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(A)
    reloader = make_reloader(path)
    table = reloader.table
    with pytest.raises(ValueError, match=message):
        asyncio.run(reloader.set_weights(rule, weights))
    assert reloader.holder.table is table
    assert not default_state_path(path).exists()


@pytest.mark.parametrize(
    "corrupt",
    [
        "{not json",
        '{"format": 1, "weight_overrides": {"ramp": {"weights": {"stable": NaN}, "base": {}}}}',
        '{"format": 1, "weight_overrides": {"ramp": {"weights": {"stable": 1e400}, "base": {}}}}',
        '{"format": 1, "weight_overrides": {"ramp": {"weights": {"stable": -5}, "base": {}}}}',
        '{"format": 1, "rollouts": {"ramp": {"phase": "dancing", "step": 0, "step_started": 0}}}',
        '{"format": 2}',
        "[]",
        "",
    ],
    ids=["not-json", "nan", "infinite", "negative", "phase", "format", "list", "empty"],
)
def test_a_corrupt_state_moves_no_traffic(tmp_path: Path, corrupt: str) -> None:
    """Read as "no state", a broken state file would put every weight back to the file's."""
    path, reloader = started(tmp_path)
    asyncio.run(reloader.set_weights("ramp", {"canary": 40}))
    served = reloader.table
    state = default_state_path(path)
    good = state.read_bytes()
    state.write_text(corrupt)
    result = asyncio.run(reloader.reload("watch"))
    assert result.outcome is Outcome.INVALID and f"state file {state}" in result.error
    assert "stay in force" in result.error
    assert reloader.table is served  # 60/40 still served
    with pytest.raises(ValueError, match=r"weights not changed|state file"):
        asyncio.run(reloader.set_weights("ramp", {"canary": 50}))
    assert state.read_text() == corrupt  # never overwritten while it cannot be read
    with pytest.raises(ValueError, match=f"state file {state}.*fix it, or remove it"):
        make_reloader(path)  # a restart does not start over from the file's weights
    state.write_bytes(good)
    assert asyncio.run(reloader.reload("watch")).outcome is Outcome.LOADED
    split = reloader.table.rules[0].split
    assert split is not None and split.weights == (60, 40)


def test_a_state_file_removed_while_serving_is_written_back_not_read_as_no_state(tmp_path: Path) -> None:
    """Read as "no state", a removed state file would put every weight back to the file's."""
    path, reloader = started(tmp_path)
    asyncio.run(reloader.set_weights("ramp", {"canary": 40}))
    served, state = reloader.table, default_state_path(path)
    good = state.read_bytes()
    state.unlink()
    asyncio.run(reloader.reload("watch"))
    assert reloader.table.version == served.version  # 60/40 still served
    assert state.read_bytes() == good  # written back from the state in force
    split = make_reloader(path).table.rules[0].split  # and a restart reads it
    assert split is not None and split.weights == (60, 40)


def test_a_removed_state_is_never_written_over_one_that_is_back(tmp_path: Path) -> None:
    path, reloader = started(tmp_path)
    asyncio.run(reloader.set_weights("ramp", {"canary": 40}))
    state = default_state_path(path)
    state.unlink()
    newer = make_reloader(path)  # another process: no state yet, then it writes one
    asyncio.run(newer.set_weights("ramp", {"canary": 30}))
    written = state.read_bytes()
    assert not asyncio.run(reloader.state.restore(b"stale"))
    assert state.read_bytes() == written


def test_a_state_file_at_start_is_a_first_start_only_while_never_seen(tmp_path: Path) -> None:
    """No file at start: a first start (nothing can tell it from one removed while stopped)."""
    path, reloader = started(tmp_path)
    split = reloader.table.rules[0].split
    assert split is not None and split.weights == (90, 10)
    state = StateFile(default_state_path(path))
    assert state.read_bytes() == b""
    state.write({"weight_overrides": {}})
    default_state_path(path).unlink()
    with pytest.raises(StateRemoved, match="was removed"):
        state.read_bytes()


def test_an_unreadable_state_file_is_not_read_as_no_state(tmp_path: Path) -> None:
    path, reloader = started(tmp_path)
    asyncio.run(reloader.set_weights("ramp", {"canary": 40}))
    state = default_state_path(path)
    state.unlink()
    state.mkdir()  # a directory where the file was: not "no state"
    result = asyncio.run(reloader.reload("watch"))
    assert result.outcome is Outcome.INVALID and "not a regular file" in result.error
    split = reloader.table.rules[0].split
    assert split is not None and split.weights == (60, 40)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


def test_a_broken_file_left_in_place_is_reported_once(tmp_path: Path) -> None:
    path, reloader = started(tmp_path)

    async def scenario() -> list[Outcome]:
        path.write_text(BROKEN)
        outcomes = [(await reloader.reload("watch")).outcome for _ in range(3)]
        outcomes.append((await reloader.reload("sighup", force=True)).outcome)  # forced: again
        return outcomes

    assert asyncio.run(scenario()) == [Outcome.INVALID, Outcome.UNCHANGED, Outcome.UNCHANGED, Outcome.INVALID]
    assert reloader.failures == 2


def test_a_half_written_file_is_read_again_before_it_counts(tmp_path: Path) -> None:
    """A watch-triggered read of a torn in-place write settles on the finished content."""
    path, reloader = started(tmp_path)

    async def scenario() -> Outcome:
        path.write_text(B[: len(B) // 2])  # the writer is half-way
        reload = asyncio.create_task(reloader.reload("watch"))
        await asyncio.sleep(0.05)
        path.write_text(B)  # ... and finishes
        return (await reload).outcome

    assert asyncio.run(scenario()) is Outcome.LOADED
    assert reloader.failures == 0
    assert reloader.holder.table.default == "canary"


def test_hostile_files_are_refused_and_the_last_good_table_stays(tmp_path: Path) -> None:
    from tests.table.test_load import ALIAS_BOMB

    path, reloader = started(tmp_path)
    first = reloader.table

    async def scenario() -> None:
        for hostile in (ALIAS_BOMB, "[" * 5000):
            path.write_text(hostile)
            result = await reloader.reload("test")
            assert result.outcome is Outcome.INVALID, result
            assert result.error is not None and len(result.error) < 2000
            assert reloader.table is first
        path.unlink()
        path.symlink_to("/dev/zero")
        result = await reloader.reload("test")
        assert result.outcome is Outcome.MISSING and "not a regular file" in (result.error or "")
        assert reloader.table is first

    asyncio.run(scenario())


def test_a_subscriber_holds_only_the_newest_change(tmp_path: Path) -> None:
    """A subscriber that does not read holds one change, the newest, whatever happened in
    between: a LOADED result read is the table being served."""
    path, reloader = started(tmp_path)

    async def scenario() -> None:
        late, prompt = reloader.subscribe(), reloader.subscribe()
        for canary in (20, 30, 40):
            await reloader.set_weights("ramp", {"canary": canary})
            loaded, result = await prompt.get()  # a subscriber that keeps up sees each one
            assert result.outcome is Outcome.LOADED and loaded is reloader.loaded
            assert late.qsize() == 1
        loaded, result = late.get_nowait()
        assert loaded is reloader.loaded and loaded.table.rules[0].split.weights == (60, 40)  # type: ignore[union-attr]
        assert late.empty()
        await reloader.set_weights("ramp", {"canary": 50})
        path.write_text(BROKEN)
        assert (await reloader.reload("test")).outcome is Outcome.INVALID
        loaded, result = await late.get()  # the newest: the refusal, with the table still served
        assert result.outcome is Outcome.INVALID and loaded.table.rules[0].split.weights == (50, 50)  # type: ignore[union-attr]
        assert late.empty() and prompt.qsize() == 1
        reloader.unsubscribe(late)
        reloader.unsubscribe(prompt)

    asyncio.run(scenario())


def test_a_reload_serves_the_engine_it_built_off_the_loop(tmp_path: Path) -> None:
    """The table's generated engine is built in the reload's thread, with the table, and the
    swap on the loop only takes it (a large table's code takes as long as the table)."""
    path, reloader = started(tmp_path)
    built: list[tuple[object, str]] = []
    real_prepare = reload_module.prepare

    def recording_prepare(table: Table) -> Engine:
        engine = real_prepare(table)
        built.append((engine, threading.current_thread().name))
        return engine

    async def scenario() -> None:
        path.write_text(B)
        assert (await reloader.reload("test")).outcome is Outcome.LOADED

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reload_module, "prepare", recording_prepare)
        asyncio.run(scenario())
    engine, thread = built[-1]
    assert reloader.holder.engine is engine and engine.table is reloader.holder.table
    assert engine.generated and thread != threading.main_thread().name
