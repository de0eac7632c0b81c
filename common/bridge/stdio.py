"""Newline-delimited JSON-RPC on the process's own stdin and stdout, without blocking the loop.

Pipes (what MCP clients give a stdio server) and terminals get asyncio pipe transports; a
regular file (`exai-bridge < requests.jsonl`) cannot, so it is read and written in a thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

# One JSON-RPC message per line; a line may carry a large tool result or file contents.
MAX_LINE_BYTES = 64 * 1024 * 1024


class LineReader:
    """Lines from stdin; `None` at end of input (the client closed its end)."""

    def __init__(self, reader: asyncio.StreamReader | None) -> None:
        self._reader = reader

    @classmethod
    async def open(cls) -> LineReader:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
        try:
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        except (ValueError, OSError):
            return cls(None)
        return cls(reader)

    async def readline(self) -> bytes | None:
        if self._reader is None:
            line = await asyncio.to_thread(sys.stdin.buffer.readline)
        else:
            line = await self._reader.readline()
        return line or None


class LineWriter:
    """Writes one JSON message per line to stdout, in order, whoever calls."""

    def __init__(self, writer: asyncio.StreamWriter | None) -> None:
        self._writer = writer
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls) -> LineWriter:
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout)
        except (ValueError, OSError):
            return cls(None)
        return cls(asyncio.StreamWriter(transport, protocol, None, loop))

    async def write(self, message: Any) -> None:
        data = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        async with self._lock:
            if self._writer is None:
                await asyncio.to_thread(_write_all, sys.stdout.fileno(), data)
                return
            self._writer.write(data)
            await self._writer.drain()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
