"""WatchTable under load: at most MAX_WATCHERS streams per process (RESOURCE_EXHAUSTED at
once over it), one table status built per change however many watch, and a watcher that
does not read holds only the newest change, never a backlog. An in-process admin server
(grpc.aio, port 0) on a real Reloader and rules file; weight changes through the reloader."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from benchmarks.admin_watchers import rules  # the table whose fan-out the benchmark measures
from sidecar.admin import servicer
from sidecar.admin.api import admin_pb2 as pb
from sidecar.admin.api import admin_pb2_grpc as pb_grpc
from sidecar.admin.servicer import MAX_WATCHERS, AdminServicer
from sidecar.ops.metrics import Metrics
from sidecar.sources.file import RulesFile
from sidecar.sources.state_file import StateFile
from sidecar.table.reload import Reloader

# No BDP probing: the stream's flow-control window stays at gRPC's 64 KiB, so a watcher that
# does not read stops taking messages after one or two large tables.
STALLED = [("grpc.http2.bdp_probe", 0)]


@contextlib.asynccontextmanager
async def admin_server(tmp_path: Path, text: str) -> AsyncIterator[tuple[Reloader, str]]:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    reloader = Reloader(RulesFile(path), Metrics(CollectorRegistry()), StateFile(tmp_path / "state.json"))
    server = grpc.aio.server()
    pb_grpc.add_AdminServicer_to_server(AdminServicer(reloader), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield reloader, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}") from None


def open_watchers(reloader: Reloader) -> float | None:
    return reloader.metrics.registry.get_sample_value("graysteer_admin_watchers")


def test_watchers_over_the_limit_are_refused_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            admin_server(tmp_path, rules(0)) as (reloader, address),
            grpc.aio.insecure_channel(address) as channel,
        ):
            stub = pb_grpc.AdminStub(channel)
            streams = [stub.WatchTable(pb.WatchTableRequest()) for _ in range(MAX_WATCHERS)]
            for stream in streams:
                assert (await stream.read()).table.version == reloader.table.version
            assert open_watchers(reloader) == MAX_WATCHERS
            received = []
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for event in stub.WatchTable(pb.WatchTableRequest()):
                    received.append(event)
            assert received == []
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.details() == (
                f"{MAX_WATCHERS} WatchTable streams are open on this process, the most it serves: "
                "close one, or poll GetTable"
            )
            assert open_watchers(reloader) == MAX_WATCHERS  # a refused one is not counted
            streams[0].cancel()
            await until(lambda: open_watchers(reloader) == MAX_WATCHERS - 1, "the closed watcher to go")
            again = stub.WatchTable(pb.WatchTableRequest())
            assert (await again.read()).table.version == reloader.table.version
            for stream in [*streams, again]:
                stream.cancel()
            await until(lambda: open_watchers(reloader) == 0, "every watcher to go")

    asyncio.run(main())


def test_a_burst_of_changes_builds_one_status_each_and_queues_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = 0
    build = servicer.table_status

    def counted(*args: Any, **kwargs: Any) -> pb.TableStatus:
        nonlocal builds
        builds += 1
        return build(*args, **kwargs)

    monkeypatch.setattr(servicer, "table_status", counted)
    changes = 30
    readers = MAX_WATCHERS // 2

    async def main() -> None:
        async with (
            admin_server(tmp_path, rules(300)) as (reloader, address),  # about 46 KB per event
            grpc.aio.insecure_channel(address) as channel,
            grpc.aio.insecure_channel(address, options=STALLED) as stalled_channel,
        ):
            assert servicer.table_status(reloader).ByteSize() > 40_000
            reading = [pb_grpc.AdminStub(channel).WatchTable(pb.WatchTableRequest()) for _ in range(readers)]
            stalled = [
                pb_grpc.AdminStub(stalled_channel).WatchTable(pb.WatchTableRequest())
                for _ in range(MAX_WATCHERS - readers)
            ]
            for stream in stalled:  # the first table (subscribed), and then never read again
                await stream.read()
            seen = [""] * readers

            async def follow(index: int) -> None:
                async for event in reading[index]:
                    seen[index] = event.table.version

            followers = [asyncio.create_task(follow(i)) for i in range(readers)]
            await until(lambda: all(seen), "the readers' first tables")
            before = builds
            most_pending = 0
            for change in range(changes):
                await reloader.set_weights("ramp", {"canary": 11 + change})
                most_pending = max(most_pending, *(q.qsize() for q in reloader._subscribers))
            newest = reloader.table.version
            await until(lambda: seen == [newest] * readers, "every reader to see the newest table")
            # One status per change at most, whatever the number of watchers (not one each).
            assert 1 <= builds - before <= changes
            assert most_pending <= 1  # no watcher, reading or not, ever holds more than one change
            assert all(q.qsize() <= 1 for q in reloader._subscribers)
            # A watcher that did not read gets the newest table within the few messages that
            # were already on their way (flow control), not one per change it missed.
            reads = 0
            while (await stalled[0].read()).table.version != newest:
                reads += 1
                assert reads < 5, "a stalled watcher is replaying a backlog of changes"
            for stream in [*reading, *stalled]:
                stream.cancel()
            await asyncio.gather(*followers, return_exceptions=True)

    asyncio.run(main())
