"""The fast path for POST /mcp (router/fastpath.py) and the requests it leaves to aiohttp.

Raw HTTP/1.1 over one keep-alive socket, so the test controls how the bytes arrive: in one
write (the fast path), split, pipelined, or with framing the fast path does not take. Every
way must give the same answers, in order, on the same connection.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fleet import Fleet
from tests.router.conftest import ROUTER_TEST_SETTINGS

pytestmark = pytest.mark.asyncio

VERSION = "2026-07-28"


@pytest.fixture(scope="module")
def files_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fast-files")


@pytest.fixture(scope="module")
def fleet(module_fleet_factory: Callable[..., Fleet], files_root: Path) -> Fleet:
    return module_fleet_factory(
        instances=2, max_instances=2, allowed_file_roots=[files_root], **ROUTER_TEST_SETTINGS
    )


def _call(rid: int, client: str = "fast", tool: str = "version") -> bytes:
    return json.dumps(
        {
            "jsonrpc": "2.0",
            "id": rid,
            "method": "tools/call",
            "params": {
                "name": tool,
                "arguments": {},
                "_meta": {
                    "io.modelcontextprotocol/protocolVersion": VERSION,
                    "io.modelcontextprotocol/clientInfo": {"name": client, "version": "1"},
                    "io.modelcontextprotocol/clientCapabilities": {},
                },
            },
        }
    ).encode()


def post(body: bytes, *, version: str = VERSION, extra: bytes = b"", tool: str = "version") -> bytes:
    if version == VERSION:  # the 2026-07-28 wire names the method and tool in headers too
        extra = b"Mcp-Method: tools/call\r\nMcp-Name: " + tool.encode() + b"\r\n" + extra
    return (
        b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Accept: application/json, text/event-stream\r\nMCP-Protocol-Version: "
        + version.encode()
        + b"\r\n"
        + extra
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


class Conn:
    """One keep-alive connection to the router; answers read one by one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, fleet: Fleet) -> Conn:
        port = int(fleet.router_url.rsplit(":", 1)[1])
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    @classmethod
    async def open_slow(cls, fleet: Fleet) -> Conn:
        """A client that reads slowly: a tiny socket receive buffer and a tiny read-ahead, so
        whatever it has not read yet backs up into the router. Small segments too: the router's
        send buffer grows with the segment size, and loopback's 64 KiB segments would let the
        kernel take a whole large answer off the router's hands."""
        port = int(fleet.router_url.rsplit(":", 1)[1])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1024)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return cls(*await asyncio.open_connection(sock=sock, limit=4096))

    async def send(self, *parts: bytes, pause: float = 0.0) -> None:
        for part in parts:
            self.writer.write(part)
            await self.writer.drain()
            if pause:
                await asyncio.sleep(pause)

    async def answer(self) -> tuple[int, dict[str, str], bytes]:
        async with asyncio.timeout(20):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            if headers.get("transfer-encoding") == "chunked":
                body = b""
                while True:
                    size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                    chunk = await self.reader.readexactly(size + 2)
                    if size == 0:
                        break
                    body += chunk[:-2]
            else:
                length = int(headers.get("content-length", "0"))
                body = await self.reader.readexactly(length) if length else b""
        return status, headers, body

    async def closed(self) -> bool:
        async with asyncio.timeout(10):
            return await self.reader.read(1) == b""

    def close(self) -> None:
        self.writer.close()


def _result(body: bytes) -> dict[str, Any]:
    data = json.loads(body)
    assert "result" in data, data
    return dict(data)


async def _fast_count(fleet: Fleet, name: str = "fast_path_requests") -> float:
    _, text = await fleet.admin("GET", "/metrics")
    found = re.search(rf"^exai_router_{name}_total (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def _express_count(fleet: Fleet) -> float:
    return await _fast_count(fleet, "express_calls")


async def _pool_settled(fleet: Fleet) -> None:
    """Wait until no pooled connection to an instance is busy. An SSE answer reaches the client
    with the event holding its response; the instance ends its stream a moment later, and the
    router reads that end before the connection is idle again (Response.drain). A call sent
    before then finds no idle connection and takes the proxy's path, not the express path: on
    a loaded machine the instance's end can come after the client's next request."""
    async with asyncio.timeout(10):
        while True:
            _, text = await fleet.admin("GET", "/metrics")
            busy = re.search(r'^exai_router_upstream_connections\{state="busy"\} (\S+)$', text, re.M)
            idle = re.search(r'^exai_router_upstream_connections\{state="idle"\} (\S+)$', text, re.M)
            assert busy is not None and idle is not None, text[:500]
            if float(busy.group(1)) == 0 and float(idle.group(1)) >= 1:
                return
            await asyncio.sleep(0.02)


async def test_calls_on_one_connection_take_the_fast_path(fleet: Fleet) -> None:
    conn = await Conn.open(fleet)
    try:
        before, express = await _fast_count(fleet), await _express_count(fleet)
        for rid in range(1, 6):
            await conn.send(post(_call(rid)))
            status, headers, body = await conn.answer()
            assert status == 200, body
            assert headers["content-type"].startswith("application/json")
            assert "date" in headers and "transfer-encoding" not in headers
            assert _result(body)["id"] == rid
        assert await _fast_count(fleet) >= before + 5
        # once the session is open and bound, calls go out on the express path (no task)
        assert await _express_count(fleet) >= express + 4
    finally:
        conn.close()


async def test_errors_on_the_fast_path_keep_the_connection(fleet: Fleet) -> None:
    conn = await Conn.open(fleet)
    try:
        await conn.send(post(_call(1), version="1999-01-01"))
        status, headers, body = await conn.answer()
        assert status == 400 and headers["content-type"].startswith("application/json")
        error = json.loads(body)["error"]
        assert "1999-01-01" in error["message"]
        await conn.send(post(b"{not json"))
        status, _, body = await conn.answer()
        assert status == 400 and "error" in json.loads(body)
        await conn.send(post(_call(2)))  # the same connection still serves calls
        status, _, body = await conn.answer()
        assert status == 200 and _result(body)["id"] == 2
    finally:
        conn.close()


async def test_each_call_s_own_headers_are_judged_on_one_connection(fleet: Fleet) -> None:
    # The express path keeps what it read from a client's headers per connection; a call with
    # other headers (a foreign Origin, a header value with a line break) is judged on its own.
    conn = await Conn.open(fleet)
    try:
        await conn.send(post(_call(1)))
        assert (await conn.answer())[0] == 200
        await conn.send(post(_call(2), extra=b"Origin: https://evil.example\r\n"))
        status, _, body = await conn.answer()
        assert status == 403 and "evil.example" in json.loads(body)["error"]["message"]
        await conn.send(post(_call(3)))
        status, _, body = await conn.answer()
        assert status == 200 and _result(body)["id"] == 3
        await conn.send(post(_call(44444)))  # another Content-Length, the same headers
        status, _, body = await conn.answer()
        assert status == 200 and _result(body)["id"] == 44444
    finally:
        conn.close()


async def test_split_pipelined_and_held_requests_are_answered_in_order(fleet: Fleet) -> None:
    conn = await Conn.open(fleet)
    try:
        # split: headers first, body a moment later (aiohttp's path from then on)
        whole = post(_call(1))
        cut = whole.index(b"\r\n\r\n") + 4
        await conn.send(whole[:cut], whole[cut:], pause=0.05)
        status, _, body = await conn.answer()
        assert status == 200 and _result(body)["id"] == 1
        # pipelined: two calls in one write
        await conn.send(post(_call(2)) + post(_call(3)))
        ids = [_result((await conn.answer())[2])["id"] for _ in range(2)]
        assert ids == [2, 3]
    finally:
        conn.close()

    conn = await Conn.open(fleet)
    try:
        # a second call sent while the first is still on the fast path: held, then served
        await conn.send(post(_call(4)))
        await conn.send(post(_call(5)))
        ids = [_result((await conn.answer())[2])["id"] for _ in range(2)]
        assert ids == [4, 5]
        await conn.send(post(_call(6)))
        assert _result((await conn.answer())[2])["id"] == 6
    finally:
        conn.close()


async def test_a_repeated_head_is_taken_only_for_exactly_one_request(fleet: Fleet) -> None:
    # After a call, the fast path takes a request whose head is the same bytes but for the
    # Content-Length value without parsing it again: only when the read is exactly that one
    # request. Two in one read, a body still to come, or other headers go the usual ways.
    conn = await Conn.open(fleet)
    try:
        for rid in (1, 22, 333):  # the same head, other lengths
            await conn.send(post(_call(rid)))
            status, _, body = await conn.answer()
            assert status == 200 and _result(body)["id"] == rid
        await conn.send(post(_call(4)) + post(_call(5)))  # pipelined, the same head
        assert [_result((await conn.answer())[2])["id"] for _ in range(2)] == [4, 5]
    finally:
        conn.close()
    conn = await Conn.open(fleet)
    try:
        await conn.send(post(_call(6)))
        assert _result((await conn.answer())[2])["id"] == 6
        whole = post(_call(7))  # the same head with part of the body, the rest a moment later
        await conn.send(whole[:-5], whole[-5:], pause=0.05)
        assert _result((await conn.answer())[2])["id"] == 7
    finally:
        conn.close()
    conn = await Conn.open(fleet)
    try:
        await conn.send(post(_call(8)))
        assert _result((await conn.answer())[2])["id"] == 8
        body = _call(9)  # a length that says less than the body
        await conn.send(post(body).replace(b"Content-Length: %d" % len(body), b"Content-Length: 5"))
        status, _, answer = await conn.answer()
        assert status == 400 and "error" in json.loads(answer)
    finally:
        conn.close()


async def _session_of(conn: Conn, rid: int, client: str) -> str:
    await conn.send(post(_call(rid, client, tool="status"), tool="status"))
    status, _, body = await conn.answer()
    assert status == 200, body
    result = _result(body)
    assert result["id"] == rid
    return str(result["result"]["structuredContent"]["session"])


async def test_a_repeated_body_is_read_again_unless_only_its_id_changed(fleet: Fleet) -> None:
    # The express path takes a body that is the connection's last one but for the request's
    # id without parsing it again. Anything else in it (another client name, so another
    # session; a tool; an id that is no plain JSON integer) is read afresh.
    conn = await Conn.open(fleet)
    try:
        express = await _express_count(fleet)
        first = await _session_of(conn, 1, "memo-a")
        for rid in (2, 30, 4000, 5):
            assert await _session_of(conn, rid, "memo-a") == first
        assert await _express_count(fleet) >= express + 4
        other = await _session_of(conn, 6, "memo-b")  # only the client's name changed
        assert other != first
        assert await _session_of(conn, 7, "memo-a") == first
        await conn.send(post(_call(8, "memo-a")))  # another tool, the same client
        status, _, body = await conn.answer()
        assert status == 200 and _result(body)["id"] == 8
        for bad in (b"08", b"-8", b'"8"'):
            raw = _call(9, "memo-a", tool="status").replace(b'"id": 9', b'"id": ' + bad)
            await conn.send(post(raw, tool="status"))
            status, _, body = await conn.answer()
            if bad == b"08":  # not JSON: refused, as before
                assert status == 400 and json.loads(body)["error"]["code"] == -32700
            else:
                assert status == 200 and json.loads(body)["id"] == json.loads(bad)
        assert await _session_of(conn, 10, "memo-a") == first
    finally:
        conn.close()


async def test_requests_the_fast_path_leaves_to_aiohttp(fleet: Fleet) -> None:
    # Connection: close is answered, then the connection is closed.
    conn = await Conn.open(fleet)
    try:
        await conn.send(post(_call(1), extra=b"Connection: close\r\n"))
        status, _, body = await conn.answer()
        assert status == 200 and _result(body)["id"] == 1
        assert await conn.closed()
    finally:
        conn.close()
    # A chunked request body.
    conn = await Conn.open(fleet)
    try:
        body = _call(2)
        head = post(body).split(b"Content-Length")[0] + b"Transfer-Encoding: chunked\r\n\r\n"
        await conn.send(head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        status, _, answer = await conn.answer()
        assert status == 200 and _result(answer)["id"] == 2
        # HTTP/1.0 on a fresh connection: answered with a length, connection closed after
    finally:
        conn.close()
    conn = await Conn.open(fleet)
    try:
        await conn.send(post(_call(3)).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
        status, _, answer = await conn.answer()
        assert status == 200 and _result(answer)["id"] == 3
    finally:
        conn.close()


async def _handshake(conn: Conn) -> bytes:
    """Open a handshake-era session on the connection; the header line that names it."""
    init = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "sse"}},
        }
    ).encode()
    await conn.send(post(init, version="2025-11-25"))
    status, headers, body = await conn.answer()
    assert status == 200, body
    extra = b"Mcp-Session-Id: " + headers["mcp-session-id"].encode() + b"\r\n"
    note = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
    await conn.send(post(note, version="2025-11-25", extra=extra))
    status, _, _ = await conn.answer()
    assert status == 202
    return extra


def _handshake_call(rid: int, tool: str, arguments: dict[str, Any]) -> bytes:
    params = {"name": tool, "arguments": arguments}
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params}).encode()


def _sse_result(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """The JSON-RPC answer in an SSE body (its last data event), or the JSON body itself."""
    if headers["content-type"].startswith("text/event-stream"):
        assert headers.get("transfer-encoding") == "chunked"
        data = [ln[5:].strip() for ln in body.decode().splitlines() if ln.startswith("data:")]
        body = data[-1].encode()
    return _result(body)


async def test_handshake_era_sse_answers_on_the_fast_path(fleet: Fleet) -> None:
    conn = await Conn.open(fleet)
    try:
        extra = await _handshake(conn)
        sid = extra.split(b": ")[1].strip().decode()
        before, express = await _fast_count(fleet), await _express_count(fleet)
        for rid in (1, 2, 3):
            # the previous answer's upstream connection is back in the pool (see _pool_settled)
            await _pool_settled(fleet)
            await conn.send(post(_handshake_call(rid, "version", {}), version="2025-11-25", extra=extra))
            status, headers, body = await conn.answer()
            assert status == 200 and headers["mcp-session-id"] == sid
            assert _sse_result(headers, body)["id"] == rid
        assert await _fast_count(fleet) == before + 3
        # sent on the express path, the SSE answers copied there as they come
        assert await _express_count(fleet) == express + 3
    finally:
        conn.close()


async def test_a_slow_client_gets_a_large_streamed_answer_whole_on_the_express_path(
    fleet: Fleet, files_root: Path
) -> None:
    # An SSE answer far larger than what the client's socket, the router's write buffer and
    # the relay's read-ahead hold: while the client does not read, the router stops copying
    # (and stops reading the instance); as it reads, copying resumes. Nothing is lost,
    # reordered or repeated, and the connection serves the next call.
    lines = [f"{n:06d} " + "abcdefghij" * 9 + "\n" for n in range(2300)]  # ~230 KiB
    big = files_root / "big.txt"
    big.write_text("".join(lines))
    conn = await Conn.open_slow(fleet)
    try:
        extra = await _handshake(conn)
        await conn.send(post(_handshake_call(1, "version", {}), version="2025-11-25", extra=extra))
        assert (await conn.answer())[0] == 200  # bound, with an idle connection to its instance
        await _pool_settled(fleet)  # once the router has read that answer's end
        express = await _express_count(fleet)
        call = _handshake_call(2, "file_read", {"path": str(big)})
        await conn.send(post(call, version="2025-11-25", extra=extra))
        await asyncio.sleep(1.0)  # not reading: the answer backs up
        status, headers, body = await conn.answer()
        assert status == 200
        answer = _sse_result(headers, body)
        assert answer["id"] == 2 and not answer["result"].get("isError"), answer
        assert answer["result"]["structuredContent"]["text"] == "".join(lines)
        assert await _express_count(fleet) == express + 1  # this call went out on the express path
        await conn.send(post(_handshake_call(3, "version", {}), version="2025-11-25", extra=extra))
        status, headers, body = await conn.answer()
        assert status == 200 and _sse_result(headers, body)["id"] == 3
    finally:
        conn.close()


async def test_the_fast_path_can_be_turned_off(fleet_factory: Callable[..., Fleet]) -> None:
    # EXAI_ROUTER_FAST_PATH=false: the same calls, served by aiohttp's own request path.
    slow = await asyncio.to_thread(
        fleet_factory, instances=1, max_instances=1, router_fast_path=False, **ROUTER_TEST_SETTINGS
    )
    conn = await Conn.open(slow)
    try:
        for rid in range(1, 4):
            await conn.send(post(_call(rid)))
            status, _, body = await conn.answer()
            assert status == 200, body
            assert _result(body)["id"] == rid
        assert await _fast_count(slow) == 0
    finally:
        conn.close()


def _file_call(rid: int, path: Path) -> bytes:
    return json.dumps(
        {
            "jsonrpc": "2.0",
            "id": rid,
            "method": "tools/call",
            "params": {
                "name": "file_read",
                "arguments": {"path": str(path)},
                "_meta": {
                    "io.modelcontextprotocol/protocolVersion": VERSION,
                    "io.modelcontextprotocol/clientInfo": {"name": "big-json", "version": "1"},
                    "io.modelcontextprotocol/clientCapabilities": {},
                },
            },
        }
    ).encode()


async def test_large_json_answers_of_the_2026_era_arrive_whole_and_framed(
    fleet: Fleet, files_root: Path
) -> None:
    # 2026-07-28 answers are JSON: above the express path's read-ahead (256 KiB) the proxy reads
    # them, up to 1 MiB whole with Content-Length, beyond that copied as they come (chunked).
    # Either way the client gets every byte, to a slow reader too, and the connection goes on.
    plain = "".join(f"{n:06d} " + "abcdefghij" * 9 + "\n" for n in range(2000))  # ~200 KiB
    escaped = '"\\' * 120_000  # 240 KiB that JSON writes at twice the size, twice (text, structured)
    cases = [("plain.txt", plain, "content-length"), ("escaped.txt", escaped, "transfer-encoding")]
    conn = await Conn.open_slow(fleet)
    try:
        for rid, (name, text, framing) in enumerate(cases, start=1):
            path = files_root / name
            path.write_text(text)
            await conn.send(post(_file_call(rid, path), tool="file_read"))
            await asyncio.sleep(0.5)  # not reading: the answer backs up into the router
            status, headers, answer = await conn.answer()
            assert status == 200, answer[:300]
            assert framing in headers, headers
            if framing == "content-length":
                assert int(headers["content-length"]) == len(answer)
            result = _result(answer)
            assert result["id"] == rid and not result["result"].get("isError"), str(result)[:300]
            assert result["result"]["structuredContent"]["text"] == text
        await conn.send(post(_call(9, client="big-json")))
        status, _, answer = await conn.answer()
        assert status == 200 and _result(answer)["id"] == 9
    finally:
        conn.close()
