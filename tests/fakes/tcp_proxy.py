"""A loopback TCP forwarder that a test can cut and restore, to make Postgres "unreachable".

It runs in its own thread and event loop so the instance subprocess keeps being served (or
refused) whatever the test's own loop is doing. `down()` closes the listener and every open
connection; `up()` listens again on the same port. `delay` (seconds, settable at any time)
holds every chunk coming back from the target that long: a slow network to Postgres. `hang()`
makes the link a black hole until `unhang()`: connections are still accepted, but nothing
goes through in either direction (held, as TCP would retransmit it once the path is back), as
when packets to the server are dropped rather than refused. `tap`
(optional) is called, on the proxy's thread, with a connection number and every chunk a client
sends, before it is forwarded: a test can read what went to the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class TcpProxy:
    def __init__(
        self, target_host: str, target_port: int, *, tap: Callable[[int, bytes], None] | None = None
    ) -> None:
        self.target = (target_host, target_port)
        self.tap = tap
        self._numbers = itertools.count(1)
        self.host = "127.0.0.1"
        self.port = 0
        self.delay = 0.0
        self._passing = asyncio.Event()  # clear while the link is a black hole
        self._passing.set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="tcp-proxy")

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        slow: bool = False,
        number: int | None = None,
    ) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                await self._through()
                if slow and self.delay > 0:
                    await asyncio.sleep(self.delay)
                if number is not None and self.tap is not None:
                    self.tap(number, data)
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _through(self) -> None:
        """Wait while the link is a black hole (`hang`)."""
        await self._passing.wait()

    async def _pass(self, passing: bool) -> None:
        (self._passing.set if passing else self._passing.clear)()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._through()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        try:
            number = next(self._numbers)
            await asyncio.gather(
                self._pipe(reader, up_writer, number=number), self._pipe(up_reader, writer, slow=True)
            )
        finally:
            self._writers.difference_update((writer, up_writer))

    async def _start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._handle, sock=sock)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def _run(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    def up(self) -> None:
        self._run(self._start())

    def down(self) -> None:
        self._run(self._stop())

    def hang(self) -> None:
        self._run(self._pass(False))

    def unhang(self) -> None:
        self._run(self._pass(True))

    @contextmanager
    def running(self) -> Iterator[TcpProxy]:
        self._thread.start()
        self.up()
        try:
            yield self
        finally:
            self.down()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
