"""Raw-wire MCP for benchmarks: HTTP/1.1 over a plain asyncio socket, parsed here.

What a client library costs (building requests, validating models, its own tasks) stays out
of the numbers: a request is one prebuilt `write()`, a tools/call answer is read by its
Content-Length (or chunks), and an SSE stream's frames are split on the blank line as the bytes
arrive. Used by bench_links.py to time delivery from A's request written to B's frame received.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlsplit

VERSION = "2026-07-28"


def _meta(client: str) -> dict[str, Any]:
    return {
        "io.modelcontextprotocol/protocolVersion": VERSION,
        "io.modelcontextprotocol/clientInfo": {"name": client, "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {},
    }


def build_request(url: str, body: bytes, extra: dict[str, str], *, version: str | None = VERSION) -> bytes:
    """One POST's bytes: head and body. `version=None` leaves MCP-Protocol-Version to `extra`
    (a handshake-era caller sends none on initialize, then the negotiated one)."""
    u = urlsplit(url)
    head = [
        f"POST {u.path or '/'} HTTP/1.1",
        f"Host: {u.netloc}",
        "Accept: application/json, text/event-stream",
        "Content-Type: application/json",
        *([f"MCP-Protocol-Version: {version}"] if version else []),
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in extra.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _open(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    u = urlsplit(url)
    return await asyncio.open_connection(u.hostname, u.port or 80)


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """An HTTP/1.1 answer's status and headers (names lowercased), read off the stream."""
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    return status, headers


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 answer off the stream: its status and body (by Content-Length or chunks);
    an SSE body is reduced to its first event's data (a tools/call answer is one event)."""
    status, headers = await read_head(reader)
    if "content-length" in headers:
        payload = await reader.readexactly(int(headers["content-length"]))
    else:  # chunked
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(chunk[:-2])
        payload = b"".join(parts)
    if payload.startswith(b"event:") or payload.startswith(b"id:") or b"data: " in payload[:64]:
        payload = payload[payload.index(b"data: ") + 6 :].split(b"\r\n", 1)[0].split(b"\n", 1)[0]
    return status, payload


class RawCaller:
    """One 2026-07-28 session (keyed by its client name) calling tools over one keep-alive socket."""

    def __init__(self, url: str, client: str) -> None:
        self.url = url
        self.client = client
        self.rid = 0
        self._io: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    def request(self, tool: str, args: dict[str, Any]) -> bytes:
        self.rid += 1
        body = {
            "jsonrpc": "2.0",
            "id": self.rid,
            "method": "tools/call",
            "params": {"name": tool, "arguments": args, "_meta": _meta(self.client)},
        }
        routing = {"Mcp-Method": "tools/call", "Mcp-Name": tool}
        return build_request(self.url, json.dumps(body).encode(), routing)

    async def send(self, data: bytes) -> tuple[float, dict[str, Any]]:
        """Write a prebuilt request; (perf_counter right after the write, the parsed answer)."""
        if self._io is None:
            self._io = await _open(self.url)
        reader, writer = self._io
        writer.write(data)
        written = time.perf_counter()
        status, payload = await read_answer(reader)
        if status != 200:
            raise RuntimeError(f"{status} {payload[:300]!r}")
        answer = json.loads(payload)
        result = answer.get("result") or {}
        if "error" in answer or result.get("isError"):
            raise RuntimeError(f"{self.client}: {answer}")
        return written, result.get("structuredContent") or {}

    async def call(self, tool: str, args: dict[str, Any]) -> dict[str, Any]:
        return (await self.send(self.request(tool, args)))[1]

    async def close(self) -> None:
        if self._io is not None:
            self._io[1].close()
            self._io = None


class RawListen:
    """A 2026-07-28 `subscriptions/listen` stream of a session, read frame by frame.

    `frames` gets (perf_counter when the frame's last byte was read, the frame's bytes) for
    every message frame; `arrived` is set on each."""

    def __init__(self, url: str, client: str, uris: list[str]) -> None:
        self.url = url
        self.client = client
        self.uris = uris
        self.frames: list[tuple[float, bytes]] = []
        self.arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.acknowledged = asyncio.Event()

    async def start(self) -> None:
        reader, writer = await _open(self.url)
        self._writer = writer
        body = {
            "jsonrpc": "2.0",
            "id": "listen-1",
            "method": "subscriptions/listen",
            "params": {"notifications": {"resourceSubscriptions": self.uris}, "_meta": _meta(self.client)},
        }
        routing = {"Mcp-Method": "subscriptions/listen"}
        writer.write(build_request(self.url, json.dumps(body).encode(), routing))
        status, headers = await read_head(reader)
        if status != 200:
            raise RuntimeError(f"listen: {status}")
        self._task = asyncio.create_task(self._read(reader, headers.get("transfer-encoding") == "chunked"))
        await asyncio.wait_for(self.acknowledged.wait(), 10)

    async def _read(self, reader: asyncio.StreamReader, chunked: bool) -> None:
        buf = b""
        while True:
            if chunked:
                size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                data = await reader.readexactly(size + 2)
                if size == 0:
                    return
                buf += data[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    return
                buf += data
            now = time.perf_counter()
            while (end := buf.find(b"\r\n\r\n")) >= 0:
                frame, buf = buf[:end], buf[end + 4 :]
                if b"subscriptions/acknowledged" in frame:
                    self.acknowledged.set()
                elif b"data: " in frame:
                    self.frames.append((now, frame))
                    self.arrived.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._writer is not None:
            self._writer.close()
