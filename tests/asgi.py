"""One HTTP request handed to an ASGI app in-process, without a server: its status, headers
(names lowercase) and body. For tests and benchmarks that time or compare the instance's own
request handling with nothing of a transport around it."""

from __future__ import annotations

import asyncio
from typing import Any

from common import protocol as p


async def call_asgi(
    app: Any, headers: list[tuple[bytes, bytes]], body: bytes, method: str = "POST", path: str = p.MCP_PATH
) -> tuple[int, dict[str, str], bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [*headers, (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 5555),
        "server": ("127.0.0.1", 1),
        "state": {},
    }
    delivered = False
    done = asyncio.Event()
    status = 0
    answer_headers: dict[str, str] = {}
    parts: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()  # then the client "goes away" once the answer is complete
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            answer_headers.update((k.decode().lower(), v.decode()) for k, v in message.get("headers", []))
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    await app(scope, receive, send)
    done.set()
    return status, answer_headers, b"".join(parts)
