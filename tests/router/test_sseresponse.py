"""Finding the response's event in an SSE answer as its bytes come (router/sseresponse.py)."""

from __future__ import annotations

import json
from typing import Any

from router.sseresponse import SCAN_LIMIT, ResponseWatch, is_response_to


def _event(obj: dict[str, Any], end: bytes = b"\r\n") -> bytes:
    return b"event: message" + end + b"data: " + json.dumps(obj).encode() + end + end


RESPONSE = _event({"jsonrpc": "2.0", "id": 7, "result": {"content": [], "isError": False}})
PROGRESS = _event({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"id": 7, "progress": 1}})
SAMPLING = _event({"jsonrpc": "2.0", "id": 7, "method": "sampling/createMessage", "params": {}})
OTHER = _event({"jsonrpc": "2.0", "id": 8, "result": {}})


def _fed(watch: ResponseWatch, pieces: list[bytes]) -> tuple[int, int] | None:
    """(which piece, offset in it) where the watch saw the response end; None if it did not."""
    for i, piece in enumerate(pieces):
        cut = watch.feed(piece)
        if cut is not None:
            return i, cut
    return None


def test_the_response_is_found_at_the_end_of_its_event_wherever_the_reads_split() -> None:
    stream = PROGRESS + SAMPLING + OTHER + RESPONSE + PROGRESS
    end = len(PROGRESS + SAMPLING + OTHER + RESPONSE)
    for at in range(1, len(stream)):
        found = _fed(ResponseWatch(7), [stream[:at], stream[at:]])
        assert found is not None, at
        piece, cut = found
        assert (at + cut if piece else cut) == end, at
    # byte by byte too: the last byte of the event's blank line is where it ends
    found = _fed(ResponseWatch(7), [stream[i : i + 1] for i in range(len(stream))])
    assert found == (end - 1, 1)


def test_every_line_end_the_sse_format_allows() -> None:
    for end in (b"\n", b"\r", b"\r\n"):
        stream = _event({"jsonrpc": "2.0", "method": "notifications/message"}, end) + _event(
            {"jsonrpc": "2.0", "id": "a", "error": {"code": -1, "message": "no"}}, end
        )
        watch = ResponseWatch("a")
        if end == b"\r":  # a CR last may be half a CRLF: the watch waits for the next byte
            assert watch.feed(stream) is None
            assert watch.feed(b"\r\n") == 0
        else:
            assert watch.feed(stream) == len(stream), end


def test_notifications_requests_and_other_ids_are_not_the_response() -> None:
    watch = ResponseWatch(7)
    for event in (PROGRESS, SAMPLING, OTHER, b": a comment\r\n\r\n", b"data: not json\r\n\r\n"):
        assert watch.feed(event) is None
    assert ResponseWatch("7").feed(RESPONSE) is None  # an id's type is part of it
    assert not is_response_to(b'{"jsonrpc":"2.0","id":7}', 7)  # neither result nor error
    assert watch.feed(RESPONSE) == len(RESPONSE)


def test_a_response_split_over_data_lines_is_joined() -> None:
    event = b'data: {"jsonrpc":"2.0",\ndata: "id":7,"result":{}}\n\n'
    assert ResponseWatch(7).feed(event) == len(event)


def test_an_event_larger_than_the_limit_stops_the_watch() -> None:
    watch = ResponseWatch(7)
    assert watch.feed(b"data: " + b"x" * SCAN_LIMIT) is None
    assert watch.feed(RESPONSE) is None  # the answer ends when the instance ends it


def test_the_sdk_s_spelling_and_any_other_are_read_alike() -> None:
    spaced = b'event: message\r\ndata: { "id": 7, "jsonrpc": "2.0", "result": {"data: x": 1} }\r\n\r\n'
    assert ResponseWatch(7).feed(spaced) == len(spaced)
    assert ResponseWatch(8).feed(spaced) is None
    field_first = b'data: {"jsonrpc":"2.0","id":7,"result":{}}\r\nevent: message\r\n\r\n'
    assert ResponseWatch(7).feed(field_first) == len(field_first)
    request = b'data: {"jsonrpc":"2.0","method":"ping","id":7,"result":{}}\n\n'  # not a response
    assert ResponseWatch(7).feed(request) is None


def test_the_sdk_s_usual_answer_and_lookalikes() -> None:
    sdk = b'event: message\r\ndata: {"jsonrpc":"2.0","id":7,"result":{"x":1}}\r\n\r\n'
    assert ResponseWatch(7).feed(sdk) == len(sdk)
    # two events in one read, the response second: found at the end of the second
    two = sdk.replace(b'"id":7', b'"id":6') + sdk
    assert ResponseWatch(7).feed(two) == len(two)
    assert ResponseWatch(6).feed(two) == len(sdk)
    # a line end inside what looks like the SDK's one line: two events, the first not a response
    split = b'event: message\r\ndata: {"jsonrpc":"2.0","id":7,"result":\r\n\r\ndata: {}\r\n\r\n'
    assert ResponseWatch(7).feed(split) is None
