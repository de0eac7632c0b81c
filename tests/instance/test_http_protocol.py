"""instance/http_protocol.py: a response's head leaves with its body, never out of order."""

from __future__ import annotations

import asyncio
from typing import Any

from instance import http_protocol
from instance.http_protocol import HeadHolder

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


def chunk(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(body), body)


def event(payload: bytes, event_id: bytes | None = None) -> bytes:
    lines = (b"id: " + event_id + b"\r\n" if event_id else b"") + b"event: message\r\ndata: " + payload
    return chunk(lines + b"\r\n\r\n")


RESPONSE = event(b'{"jsonrpc":"2.0","id":7,"result":{"content":[]}}')
PROGRESS = event(b'{"jsonrpc":"2.0","method":"notifications/progress","params":{"progress":1}}')
CLIENT_REQUEST = event(b'{"jsonrpc":"2.0","id":"s-1","method":"sampling/createMessage","params":{}}')


def sse_holder(sock: Recording, method: str = "POST") -> HeadHolder:
    return HeadHolder(sock, asyncio.get_running_loop(), lambda: method)


async def test_a_quick_sse_answer_leaves_in_one_write_however_many_turns_it_takes() -> None:
    sock = Recording()
    holder = sse_holder(sock)
    holder.write(SSE_HEAD)
    for _ in range(20):  # the SDK's stream machinery takes turns before the event comes
        await asyncio.sleep(0)
    assert sock.writes == []
    holder.write(RESPONSE)
    for _ in range(10):  # ... and more before it ends the stream
        await asyncio.sleep(0)
    assert sock.writes == []
    holder.write(END)
    assert sock.writes == [SSE_HEAD + RESPONSE + END]


async def test_an_error_answer_with_a_string_id_and_an_event_id_waits_for_the_end_too() -> None:
    sock = Recording()
    holder = sse_holder(sock)
    error = event(b'{"jsonrpc":"2.0","id":"a\\"b","error":{"code":-32602,"message":"x"}}', b"e-1")
    holder.write(SSE_HEAD)
    holder.write(error)
    assert sock.writes == []
    holder.write(END)
    assert sock.writes == [SSE_HEAD + error + END]


async def test_notifications_and_requests_to_the_client_are_not_held() -> None:
    sock = Recording()
    holder = sse_holder(sock)
    holder.write(SSE_HEAD)
    holder.write(PROGRESS)
    assert sock.writes == [SSE_HEAD + PROGRESS]  # the client sees its progress at once
    holder.write(CLIENT_REQUEST)
    assert sock.writes[-1] == CLIENT_REQUEST
    holder.write(RESPONSE)  # the head went already: the response alone waits for the end
    assert sock.writes[-1] == CLIENT_REQUEST
    holder.write(END)
    assert sock.writes == [SSE_HEAD + PROGRESS, CLIENT_REQUEST, RESPONSE + END]


async def test_holding_is_bounded_in_time_and_never_reorders() -> None:
    sock = Recording()
    holder = sse_holder(sock)
    holder.write(SSE_HEAD)
    await asyncio.sleep(http_protocol.SSE_HEAD_WAIT * 2)
    assert sock.writes == [SSE_HEAD]  # a slow tool: its head went out alone, in time
    holder.write(RESPONSE)
    await asyncio.sleep(http_protocol.END_WAIT * 5)
    assert sock.writes == [SSE_HEAD, RESPONSE]  # the end was late: the response did not wait for it
    holder.write(END)
    assert sock.writes == [SSE_HEAD, RESPONSE, END]


async def test_a_response_written_with_its_end_marker_and_a_get_stream_are_not_held() -> None:
    sock = Recording()
    holder = sse_holder(sock)
    holder.write(SSE_HEAD)
    holder.write(RESPONSE + END)  # uvicorn joins a last body and the end marker itself
    assert sock.writes == [SSE_HEAD + RESPONSE + END]
    listen = Recording()
    holder = sse_holder(listen, method="GET")  # a listening stream: its head goes next turn
    holder.write(SSE_HEAD)
    await asyncio.sleep(0)
    assert listen.writes == [SSE_HEAD]
    holder.write(RESPONSE)
    assert listen.writes == [SSE_HEAD, RESPONSE]


async def test_closing_sends_what_an_sse_answer_holds() -> None:
    sock = Recording()
    holder = sse_holder(sock)
    holder.write(SSE_HEAD)
    holder.write(RESPONSE)
    holder.close()
    assert sock.writes == [SSE_HEAD + RESPONSE] and sock.closed
    await asyncio.sleep(http_protocol.END_WAIT * 3)
    assert sock.writes == [SSE_HEAD + RESPONSE]
