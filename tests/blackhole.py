"""A TCP proxy on loopback that forwards to one port until told to swallow: then every byte
either way is read and dropped, and every connection (open or new) stays open. A peer
behind it looks partitioned, not down: nothing is refused, nothing comes back."""

import asyncio
import contextlib
import threading


class BlackHoleProxy:
    """Listens on 127.0.0.1:`port` (a free one), forwards to 127.0.0.1:`target`."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.swallowing = False
        self.loop = asyncio.new_event_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self.loop
        ).result(10)
        self.port: int = self._server.sockets[0].getsockname()[1]

    def swallow(self) -> None:
        """From now on: forward nothing, close nothing."""
        self.swallowing = True

    def forward(self) -> None:
        self.swallowing = False

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass  # stop(): asyncio's stream callback would log a cancelled task as an error
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.swallowing:
            await self._pipe(reader, None)
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            return  # the target is down: the client sees its connection closed
        pipes = [
            asyncio.ensure_future(self._pipe(reader, upstream_writer)),
            asyncio.ensure_future(self._pipe(upstream_reader, writer)),
        ]
        try:  # until either end closes (while forwarding: a swallowing pipe never ends)
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            upstream_writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if self.swallowing or writer is None:
                    continue
                writer.write(data)
                await writer.drain()
        while self.swallowing:  # the far end closed: this one stays open, silent
            await asyncio.sleep(3600)
