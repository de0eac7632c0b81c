"""instance/http_protocol.py: a response's head leaves with its body, never out of order."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from common.protocol import INTERNAL_TOKEN_HEADER, SESSION_HEADER
from instance import http_protocol
from instance.http_protocol import HeadHolder
from tests.bench.rawwire import build_request
from tests.fakes.provider import FakeProvider
from tests.instance.conftest import INTERNAL_TOKEN, SpawnInstance, new_session

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"


class Recording:
    """What the socket was asked to send, one entry per write (one send, one TCP segment)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.extra = {"peername": ("127.0.0.1", 1)}

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)


async def test_a_head_and_a_body_written_in_one_turn_leave_in_one_write() -> None:
    sock = Recording()
    holder = HeadHolder(sock, asyncio.get_running_loop())
    holder.write(HEAD)
    assert sock.writes == []
    holder.write(b"{}")
    assert sock.writes == [HEAD + b"{}"]
    await asyncio.sleep(0)
    assert sock.writes == [HEAD + b"{}"]  # the loop's turn finds nothing left to send


async def test_a_head_whose_body_takes_longer_goes_out_on_the_next_turn() -> None:
    sock = Recording()
    holder = HeadHolder(sock, asyncio.get_running_loop())
    holder.write(HEAD)
    await asyncio.sleep(0)
    assert sock.writes == [HEAD]
    holder.write(b"5\r\nhello\r\n")
    assert sock.writes == [HEAD, b"5\r\nhello\r\n"]


async def test_closing_sends_a_held_head_first_and_bodies_are_never_held() -> None:
    sock = Recording()
    holder = HeadHolder(sock, asyncio.get_running_loop())
    holder.write(b"HTTP/1.1 is how this body begins")  # not a whole head: written at once
    assert sock.writes == [b"HTTP/1.1 is how this body begins"]
    holder.write(HEAD)
    holder.close()
    assert sock.writes[-1] == HEAD and sock.closed
    await asyncio.sleep(0)  # the pending turn does not write to the closed socket
    assert len(sock.writes) == 2


async def test_everything_else_is_the_transports_own() -> None:
    sock = Recording()
    holder = HeadHolder(sock, asyncio.get_running_loop())
    assert holder.get_extra_info("peername") == ("127.0.0.1", 1)
    assert holder.is_closing() is False


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
END = b"0\r\n\r\n"


def event(payload: bytes) -> bytes:
    body = b"event: message\r\ndata: " + payload + b"\r\n\r\n"
    return b"%x\r\n%s\r\n" % (len(body), body)


RESPONSE = event(b'{"jsonrpc":"2.0","id":7,"result":{"content":[]}}')
PROGRESS = event(b'{"jsonrpc":"2.0","method":"notifications/progress","params":{"progress":1}}')
CLIENT_REQUEST = event(b'{"jsonrpc":"2.0","id":"s-1","method":"sampling/createMessage","params":{}}')
ERROR = event(b'{"jsonrpc":"2.0","id":"a\\"b","error":{"code":-32602,"message":"x"}}')


def sse_holder(sock: Recording, method: str = "POST") -> HeadHolder:
    return HeadHolder(sock, asyncio.get_running_loop(), lambda: method)


async def test_a_quick_sse_answer_leaves_whole_in_one_write_and_uvicorns_end_is_not_sent_again() -> None:
    sock = Recording()
    holder = sse_holder(sock)
    holder.write(SSE_HEAD)
    for _ in range(20):  # the SDK's stream machinery takes turns before the event comes
        await asyncio.sleep(0)
    assert sock.writes == []
    holder.write(RESPONSE)
    assert sock.writes == [SSE_HEAD + RESPONSE + END]  # at once, ended: nothing waits for the SDK
    holder.write(END)  # uvicorn's own end, after the SDK's teardown: the body has ended already
    assert sock.writes == [SSE_HEAD + RESPONSE + END]
    holder.write(SSE_HEAD)  # the connection's next answer is written as usual
    holder.write(RESPONSE)
    assert sock.writes[-1] == SSE_HEAD + RESPONSE + END


async def test_a_notification_first_leaves_with_the_head_and_the_response_ends_the_body() -> None:
    sock = Recording()
    holder = sse_holder(sock)
    holder.write(SSE_HEAD)
    holder.write(PROGRESS)
    assert sock.writes == [SSE_HEAD + PROGRESS]  # the client sees its progress at once
    holder.write(CLIENT_REQUEST)  # a request to the client does not end the stream
    holder.write(ERROR)
    holder.write(END)
    assert sock.writes == [SSE_HEAD + PROGRESS, CLIENT_REQUEST, ERROR + END]


async def test_a_ping_that_races_the_end_is_not_sent_and_anything_else_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sock = Recording()
    holder = sse_holder(sock)
    holder.write(SSE_HEAD)
    holder.write(RESPONSE)
    holder.write(b"2a\r\n: ping - 2026-11-29 09:00:00.000000+00:00\r\n\r\n\r\n")
    assert sock.writes == [SSE_HEAD + RESPONSE + END] and not caplog.records
    holder.write(PROGRESS + END)
    assert sock.writes == [SSE_HEAD + RESPONSE + END]
    assert any("dropped" in r.getMessage() for r in caplog.records)


async def test_a_slow_tools_sse_head_goes_out_alone_once_its_wait_runs_out() -> None:
    sock = Recording()
    holder = sse_holder(sock)
    holder.write(SSE_HEAD)
    await asyncio.sleep(http_protocol.SSE_HEAD_WAIT * 2)
    assert sock.writes == [SSE_HEAD]
    holder.write(RESPONSE)
    holder.write(END)
    assert sock.writes == [SSE_HEAD, RESPONSE + END]


async def test_a_get_streams_head_is_held_one_turn_only_and_its_events_never_end_it() -> None:
    sock = Recording()
    holder = sse_holder(sock, method="GET")  # a listening stream: the client waits for its 200
    holder.write(SSE_HEAD)
    await asyncio.sleep(0)
    assert sock.writes == [SSE_HEAD]
    holder.write(RESPONSE)  # (a response to a client's answer, relayed on the listen stream)
    assert sock.writes == [SSE_HEAD, RESPONSE]


async def test_closing_sends_a_held_sse_head_and_its_timer_writes_nothing_after() -> None:
    sock = Recording()
    holder = sse_holder(sock)
    holder.write(SSE_HEAD)
    holder.close()
    assert sock.writes == [SSE_HEAD] and sock.closed
    await asyncio.sleep(http_protocol.SSE_HEAD_WAIT * 2)
    assert sock.writes == [SSE_HEAD]


async def test_a_response_written_with_its_end_marker_is_not_ended_twice() -> None:
    sock = Recording()
    holder = sse_holder(sock)
    holder.write(SSE_HEAD)
    holder.write(RESPONSE + END)  # uvicorn joins a last body and the end marker itself
    holder.write(SSE_HEAD)
    assert sock.writes == [SSE_HEAD + RESPONSE + END]  # and the next answer is not swallowed
    await asyncio.sleep(http_protocol.SSE_HEAD_WAIT * 2)
    assert sock.writes == [SSE_HEAD + RESPONSE + END, SSE_HEAD]


async def test_an_sse_answer_of_known_length_is_never_given_an_end_marker() -> None:
    sock = Recording()
    holder = sse_holder(sock)
    sized = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 92\r\n\r\n"
    holder.write(sized)
    await asyncio.sleep(0)
    holder.write(RESPONSE)
    assert sock.writes == [sized, RESPONSE]


# --- a real instance, over a raw keep-alive socket --------------------------------------------


async def _answer(reader: asyncio.StreamReader) -> tuple[bytes, list[bytes]]:
    """One HTTP/1.1 answer: its head and its chunks, read to the end marker."""
    head = await reader.readuntil(b"\r\n\r\n")
    chunks: list[bytes] = []
    if b"content-length:" in head.lower():
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        return head, [await reader.readexactly(length)]
    while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
        chunks.append((await reader.readexactly(size + 2))[:-2])
    await reader.readexactly(2)  # the end marker's last line
    return head, chunks


async def test_a_real_instances_sse_answers_end_at_their_response_and_the_connection_serves_the_next_at_once(
    fake: FakeProvider, spawn_instance: SpawnInstance
) -> None:
    """The handshake era through a real instance: each tools/call answer is a chunked SSE
    stream that ends right after its response event, and a call written the moment that end
    arrives (before the SDK has torn the stream down) is answered in order on the same
    connection, with nothing written after an answer's end dropped."""
    inst = spawn_instance()
    base = {INTERNAL_TOKEN_HEADER: INTERNAL_TOKEN, SESSION_HEADER: new_session()}

    def post(body: dict[str, object], headers: dict[str, str]) -> bytes:
        return build_request(f"{inst.url}/mcp", json.dumps(body).encode(), headers, version=None)

    reader, writer = await asyncio.open_connection("127.0.0.1", inst.port)
    try:
        async with asyncio.timeout(30):
            init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t"}}
            writer.write(post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init}, base))
            head, _ = await _answer(reader)
            sid = next(
                line.split(b":", 1)[1].strip().decode()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"mcp-session-id:")
            )
            headers = {**base, "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
            writer.write(post({"jsonrpc": "2.0", "method": "notifications/initialized"}, headers))
            await _answer(reader)
            for i in range(1, 31):
                call = {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": "version"}}
                writer.write(post(call, headers))
                head, chunks = await _answer(reader)
                assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head, head
                events = [c for c in chunks if c.startswith(b"event:") or c.startswith(b"id:")]
                assert len(events) == 1, chunks
                data = json.loads(events[0].split(b"data: ", 1)[1])
                assert data["id"] == i and "result" in data, data
    finally:
        writer.close()
    assert "written after an SSE answer's response event" not in inst.log()
